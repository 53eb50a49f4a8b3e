//! What the handler needs from the layered store: the [`PageSource`] trait.

use std::fmt;

/// The answer of a non-blocking [`PageSource::lookup`].
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The page is present: a pointer to `len` readable bytes holding the page, page-aligned to at
    /// least 4 KiB (the kernel requires it for `UFFDIO_COPY`), that stay valid and unchanged for as
    /// long as the source lives. The kernel, not this process, reads through it: a pointer that
    /// breaks this contract makes the copy fail (EFAULT/EINVAL) and the handler fail closed.
    Ready(*const u8),
    /// The page is present but not contiguous in the source (e.g. a 2 MiB page made of pieces of
    /// several builds): the source assembled it into an owned, aligned staging page, which lives
    /// until the copy is done. The rare case; `Ready` is the zero-copy one.
    Owned(PageBuf),
    /// The page is known to be zeros (a nil mapping): installed without a fetch.
    Zero,
    /// Not present yet: [`PageSource::fetch`] it.
    Missing,
}

/// Alignment of a [`PageBuf`]: the kernel requires `UFFDIO_COPY`'s source to be 4 KiB-aligned.
pub const PAGE_BUF_ALIGN: usize = 4096;

/// An owned staging page for [`Lookup::Owned`]: `len` zeroed bytes starting at a 4 KiB-aligned
/// address. Built on a `Vec` over-allocated by one alignment unit (no `unsafe`); allocated per
/// use, which is fine for the rare multi-segment page.
#[derive(PartialEq, Eq)]
pub struct PageBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    /// A zeroed, 4 KiB-aligned buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len + PAGE_BUF_ALIGN];
        let addr = buf.as_ptr() as usize;
        let start = addr.next_multiple_of(PAGE_BUF_ALIGN) - addr;
        Self { buf, start, len }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    /// The bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }

    /// Pointer to the first byte (4 KiB-aligned).
    pub fn as_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for PageBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBuf")
            .field("ptr", &self.as_ptr())
            .field("len", &self.len)
            .finish()
    }
}

/// A failed fetch: a human-readable cause (the tier, object and error), shown in the handler's
/// error and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchError(pub String);

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FetchError {}

/// Completion callback of [`PageSource::fetch`].
pub type FetchDone = Box<dyn FnOnce(Result<(), FetchError>) + Send>;

/// The memory file as the handler sees it. Implemented by the engine's layered store.
///
/// Offsets and lengths are always one whole page of the memory file (4 KiB or 2 MiB, the page
/// size of the regions), page-aligned.
pub trait PageSource: Send + Sync + 'static {
    /// Size of the memory file in bytes.
    fn size(&self) -> u64;

    /// Non-blocking lookup of the page at `offset`. Called from the fault thread, from fetch
    /// completions and from [`Prefaulter::prefault`](crate::Prefaulter::prefault): must not block,
    /// and must not allocate on the common hit (`Ready`); [`Lookup::Owned`] is for pages the
    /// source cannot hand out in one piece.
    fn lookup(&self, offset: u64, len: u64) -> Lookup;

    /// Starts fetching the page at `offset` (deduplicated by the source) and calls `done`, on any
    /// thread, once the page is present (`Ok`: the next `lookup` returns `Ready` or `Zero`) or the
    /// fetch failed. Must not call `done` while holding locks `lookup` needs.
    fn fetch(&self, offset: u64, len: u64, done: FetchDone);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_bufs_are_aligned_and_zeroed() {
        for len in [4096usize, 2 << 20, 3 * 4096] {
            let mut b = PageBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % PAGE_BUF_ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            b.as_mut_slice()[len - 1] = 7;
            assert_eq!(b.as_slice()[len - 1], 7);
        }
    }
}
