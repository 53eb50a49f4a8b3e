//! What the handler needs from the layered store: the [`PageSource`] trait.

use std::fmt;

/// The answer of a non-blocking [`PageSource::lookup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The page is present: a pointer to `len` readable bytes holding the page, page-aligned to at
    /// least 4 KiB (the kernel requires it for `UFFDIO_COPY`), that stay valid and unchanged for as
    /// long as the source lives. The kernel, not this process, reads through it: a pointer that
    /// breaks this contract makes the copy fail (EFAULT/EINVAL) and the handler fail closed.
    Ready(*const u8),
    /// The page is known to be zeros (a nil mapping): installed without a fetch.
    Zero,
    /// Not present yet: [`PageSource::fetch`] it.
    Missing,
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

    /// Non-blocking lookup of the page at `offset`. Called from the fault thread (and from fetch
    /// completions): must not block or allocate on a hit.
    fn lookup(&self, offset: u64, len: u64) -> Lookup;

    /// Starts fetching the page at `offset` (deduplicated by the source) and calls `done`, on any
    /// thread, once the page is present (`Ok`: the next `lookup` returns `Ready` or `Zero`) or the
    /// fetch failed. Must not call `done` while holding locks `lookup` needs.
    fn fetch(&self, offset: u64, len: u64, done: FetchDone);
}
