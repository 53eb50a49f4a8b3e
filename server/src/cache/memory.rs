//! Cache memory ([`CacheMemory`]) and the safe access discipline over it ([`ChunkCache`],
//! [`FillGuard`]). All `unsafe` code of the cache lives in this file.
//!
//! # Safety model
//!
//! A [`CacheMemory`] owns one anonymous private mapping of `len` bytes (`len` a multiple of
//! 2 MiB, `len <= isize::MAX`), readable and writable, zero-filled by the kernel, so every byte
//! is always initialised. The mapping lives exactly as long as the value (unmapped in `Drop`);
//! nothing else maps, unmaps or `mremap`s it. Its raw pointers ([`CacheMemory::as_ptr`],
//! [`ChunkCache::as_ptr`]) are handed out for io_uring buffer registration and `UFFDIO_COPY`;
//! writing through them is `unsafe` for the caller, who must keep the invariants below.
//!
//! A [`ChunkCache`] creates references into the memory only under these invariants, for
//! block `b` with bytes `B(b) = b * block_size .. min((b + 1) * block_size, size)`:
//!
//! 1. **Present bytes are frozen.** Once `b`'s presence bit is set, no byte of `B(b)` is ever
//!    written again, until [`ChunkCache::reset`], which takes `&mut self` (so no shared borrow
//!    returned by [`ChunkCache::get`] and no [`FillGuard`] can be alive).
//! 2. **Only a claim holder writes, and a claim is exclusive.** Bytes of `B(b)` are written only
//!    through a [`FillGuard`] whose claimed range contains `b`. Claims are bits of the private
//!    `filling` bitmap taken with a compare-exchange that succeeds only if the bit was clear
//!    (`Bitmap::try_claim`), so at most one live guard holds `b`. The guard clears its bits
//!    in `Drop`, after its last write.
//! 3. **Only a claim holder sets presence.** Presence bits are set only by
//!    [`FillGuard::commit`], on blocks the guard holds (the `Presence` itself is private; the
//!    cache only forwards its read-only queries). A guard is created only if, *after* its claim
//!    succeeded, none of its blocks is present. Since every earlier holder set presence before
//!    releasing its claim (Release), and the claim is acquired (Acquire, reading from that
//!    release sequence), the check sees every commit ever made on those blocks: a guard's blocks
//!    are absent when it is created and stay absent until it commits them.
//! 4. **A guard never hands out committed bytes.** [`FillGuard::buf`] borrows `&mut self` and
//!    covers only the uncommitted suffix `next..end` of the claim; `commit` also takes
//!    `&mut self`, so no `&mut [u8]` from `buf` survives a commit.
//!
//! From these: a `&[u8]` from `get` covers only bytes of present blocks (checked with Acquire
//! loads), which by (1) nothing writes while it lives, so it aliases no `&mut`; the bytes it
//! reads were written before the Release that set presence, so they happen-before the read. A
//! `&mut [u8]` from `buf` covers only claimed, absent blocks: by (2) no other guard can write
//! them, by (3) and the `get` check no reader can borrow them, by (4) not even the guard itself
//! still holds an older borrow. Two holders of the same block in sequence are ordered by the
//! claim's Release/Acquire, so their writes do not race either.
//!
//! Leaking a guard (`mem::forget`) leaves its blocks claimed forever: they can no longer be
//! filled, which is a leak, not unsoundness.
//!
//! Under Miri (which cannot `mmap`), the memory is a zeroed 2 MiB-aligned heap allocation with
//! the same lifetime and the same accessors, so the bitmap and guard logic can be checked there.

use std::ops::Range;
use std::ptr::NonNull;

use super::presence::{Bitmap, Presence};
use super::{CacheError, HUGE_PAGE};

/// `HUGE_PAGE` as `usize` (2 MiB fits every supported target).
const HUGE: usize = 2 << 20;
const _: () = assert!(HUGE as u64 == HUGE_PAGE);

/// Anonymous, 2 MiB-aligned memory advised `MADV_HUGEPAGE`, unmapped on drop.
///
/// The size is the requested size rounded up to 2 MiB; size 0 maps nothing. This type gives no
/// safe access to its bytes: [`ChunkCache`] does that. It only exposes the base pointer and
/// length, for io_uring buffer registration and `UFFDIO_COPY`.
#[derive(Debug)]
pub struct CacheMemory {
    /// Start of the mapping (2 MiB-aligned). For `len == 0`, a non-null, aligned pointer with
    /// no provenance, valid only for zero-sized accesses.
    ptr: NonNull<u8>,
    /// Bytes mapped: a multiple of 2 MiB, `<= isize::MAX`.
    len: usize,
}

// SAFETY: Safe because `CacheMemory` exclusively owns its mapping (like a `Box<[u8]>`) and its
// only safe methods read the pointer value and the length; the bytes are reachable only through
// `unsafe` code, which carries its own obligations.
unsafe impl Send for CacheMemory {}
// SAFETY: Safe because `&CacheMemory` gives no safe access to the bytes at all (see above);
// concurrent access through `ChunkCache` is governed by the module's safety model.
unsafe impl Sync for CacheMemory {}

impl CacheMemory {
    /// Maps `size` bytes rounded up to 2 MiB, 2 MiB-aligned, and advises `MADV_HUGEPAGE` (a
    /// refusal is logged at debug level and otherwise ignored). `size == 0` maps nothing.
    ///
    /// The mapping is `MAP_NORESERVE`: pages are only committed when first touched.
    ///
    /// # Errors
    /// [`CacheError::TooLarge`] if the rounded size does not fit the address space,
    /// [`CacheError::Map`] if the kernel refuses the mapping.
    pub fn new(size: u64) -> Result<Self, CacheError> {
        let too_large = || CacheError::TooLarge(size);
        let rounded = size
            .checked_next_multiple_of(HUGE_PAGE)
            .ok_or_else(too_large)?;
        let len = usize::try_from(rounded).map_err(|_| too_large())?;
        if isize::try_from(len).is_err() {
            return Err(too_large());
        }
        if len == 0 {
            return Ok(Self {
                ptr: NonNull::without_provenance(HUGE_NONZERO),
                len: 0,
            });
        }
        let ptr = map_aligned(len).map_err(|source| CacheError::Map {
            len: rounded,
            source,
        })?;
        advise_hugepage(ptr, len);
        Ok(Self { ptr, len })
    }

    /// Bytes mapped (the requested size rounded up to 2 MiB).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address of the mapping, 2 MiB-aligned, valid for reads of [`len`](Self::len) bytes
    /// while `self` lives. For io_uring buffer registration and as the source of `UFFDIO_COPY`.
    /// Reading bytes that a [`FillGuard`] may be writing is a data race: read only present
    /// blocks.
    #[must_use]
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr().cast_const()
    }

    /// Base address of the mapping as `*mut u8`, for APIs that want one (io_uring fixed buffer
    /// registration). Writing through it is only sound within a [`FillGuard`]'s uncommitted
    /// blocks (prefer [`FillGuard::as_mut_ptr`]); present bytes must never be written.
    #[must_use]
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Pointer to `start..start + len` if that range is inside the mapping, else `None`.
    #[inline]
    fn range_ptr(&self, start: usize, len: usize) -> Option<*mut u8> {
        let end = start.checked_add(len)?;
        // `wrapping_add` is in bounds here (start <= self.len); it is only used for its value.
        (end <= self.len).then(|| self.ptr.as_ptr().wrapping_add(start))
    }

    /// Gives all pages back to the OS; the contents read as zeros afterwards (or keep their old
    /// values if the kernel refuses, which is logged). Exclusive access: nothing borrows bytes.
    fn discard(&mut self) {
        if self.len == 0 {
            return;
        }
        discard_pages(self.ptr, self.len);
    }
}

impl Drop for CacheMemory {
    fn drop(&mut self) {
        if self.len != 0 {
            unmap(self.ptr, self.len);
        }
    }
}

/// 2 MiB as a `NonZero` address for the empty mapping's pointer.
const HUGE_NONZERO: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(HUGE) {
    Some(n) => n,
    None => panic!("HUGE is not zero"),
};

#[cfg(not(miri))]
fn map_aligned(len: usize) -> std::io::Result<NonNull<u8>> {
    use std::io::{Error, ErrorKind};

    let over = len
        .checked_add(HUGE)
        .ok_or_else(|| Error::from(ErrorKind::OutOfMemory))?;
    // SAFETY: Safe because this asks for a fresh anonymous mapping at an address of the
    // kernel's choosing (null hint, no MAP_FIXED), so no existing memory is affected.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(Error::last_os_error());
    }
    let raw = raw.cast::<u8>();
    // Bytes before the first 2 MiB boundary (a multiple of the page size, since mmap returns a
    // page-aligned address); the over-mapping leaves HUGE - head bytes after `len`.
    let head = raw.addr().wrapping_neg() % HUGE;
    let tail = HUGE - head;
    let aligned = raw.wrapping_add(head);
    if head != 0 {
        // SAFETY: Safe because `raw..raw + head` is the start of the mapping just created, which
        // nothing references yet.
        let rc = unsafe { libc::munmap(raw.cast(), head) };
        log_trim_failure(rc, "head");
    }
    if tail != 0 {
        // SAFETY: Safe because `aligned + len..raw + over` is the end of the mapping just
        // created (head + len + tail == over), which nothing references yet.
        let rc = unsafe { libc::munmap(aligned.wrapping_add(len).cast(), tail) };
        log_trim_failure(rc, "tail");
    }
    NonNull::new(aligned).ok_or_else(|| Error::from(ErrorKind::InvalidData))
}

#[cfg(not(miri))]
fn log_trim_failure(rc: i32, what: &str) {
    if rc != 0 {
        // The untrimmed part stays mapped (a leak of < 2 MiB of address space, never touched).
        tracing::debug!(what, error = %std::io::Error::last_os_error(), "cache memory: trim munmap failed");
    }
}

#[cfg(not(miri))]
fn advise_hugepage(ptr: NonNull<u8>, len: usize) {
    // SAFETY: Safe because `ptr..ptr + len` is a mapping this module owns; MADV_HUGEPAGE only
    // changes how the kernel backs it, never its contents.
    let rc = unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        tracing::debug!(
            len,
            error = %std::io::Error::last_os_error(),
            "cache memory: madvise(MADV_HUGEPAGE) refused; using base pages"
        );
    }
}

#[cfg(not(miri))]
fn discard_pages(ptr: NonNull<u8>, len: usize) {
    // SAFETY: Safe because `ptr..ptr + len` is a private anonymous mapping this module owns and
    // the caller holds `&mut CacheMemory`, so no reference into it exists; MADV_DONTNEED makes
    // its pages read as zeros afterwards, which are valid `u8`s.
    let rc = unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_DONTNEED) };
    if rc != 0 {
        tracing::debug!(len, error = %std::io::Error::last_os_error(), "cache memory: MADV_DONTNEED refused");
    }
}

#[cfg(not(miri))]
fn unmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: Safe because `ptr..ptr + len` is exactly the mapping created by `map_aligned`
    // (after trimming), owned by the `CacheMemory` being dropped; every borrow of it is tied to
    // that `CacheMemory`'s lifetime, so none outlives this call.
    let rc = unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
    if rc != 0 {
        tracing::debug!(len, error = %std::io::Error::last_os_error(), "cache memory: munmap failed");
    }
}

#[cfg(miri)]
fn layout(len: usize) -> std::io::Result<std::alloc::Layout> {
    std::alloc::Layout::from_size_align(len, HUGE)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::OutOfMemory))
}

#[cfg(miri)]
fn map_aligned(len: usize) -> std::io::Result<NonNull<u8>> {
    let layout = layout(len)?;
    // SAFETY: Safe because `layout` has a non-zero size (len > 0 is checked by the caller).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    NonNull::new(ptr).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::OutOfMemory))
}

#[cfg(miri)]
fn advise_hugepage(_ptr: NonNull<u8>, _len: usize) {}

#[cfg(miri)]
fn discard_pages(_ptr: NonNull<u8>, _len: usize) {}

#[cfg(miri)]
fn unmap(ptr: NonNull<u8>, len: usize) {
    if let Ok(layout) = layout(len) {
        // SAFETY: Safe because `ptr` came from `alloc_zeroed` with this same layout and the
        // owning `CacheMemory` is being dropped.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
    }
}

/// One build file's cache: [`CacheMemory`] of the file's uncompressed size, a [`Presence`]
/// bitmap, and the claims of in-flight fills. See the module's safety model.
///
/// - Hit: [`get`](Self::get) / [`copy_to`](Self::copy_to): presence loads plus a slice or copy;
///   no lock, no allocation.
/// - Miss: [`reserve_fill`](Self::reserve_fill) a block range, write it through the
///   [`FillGuard`], [`commit`](FillGuard::commit) it (progressively if you like). Dropping the
///   guard uncommitted leaves the blocks absent and claimable again.
#[derive(Debug)]
pub struct ChunkCache {
    memory: CacheMemory,
    /// File size in bytes (bytes past it, up to the 2 MiB rounding, are never handed out).
    size: u64,
    presence: Presence,
    /// Claim bits of in-flight fills (one per block), see `Bitmap::try_claim`.
    filling: Bitmap,
}

impl ChunkCache {
    /// A cache for a file of `size` bytes in blocks of `block_size` bytes (a power of two from
    /// 4 KiB to 2 MiB; the last block may be partial). Nothing is present.
    ///
    /// # Errors
    /// [`CacheError::BlockSize`], [`CacheError::TooLarge`], [`CacheError::Map`].
    pub fn new(size: u64, block_size: u64) -> Result<Self, CacheError> {
        let presence = Presence::for_size(size, block_size)?;
        let filling = Bitmap::new(presence.blocks())?;
        let memory = CacheMemory::new(size)?;
        Ok(Self {
            memory,
            size,
            presence,
            filling,
        })
    }

    /// File size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Block size in bytes.
    #[must_use]
    pub fn block_size(&self) -> u64 {
        self.presence.block_size()
    }

    /// Number of blocks (the last one may be partial).
    #[must_use]
    pub fn blocks(&self) -> u64 {
        self.presence.blocks()
    }

    /// The cache memory (base pointer and length for io_uring registration / `UFFDIO_COPY`).
    #[must_use]
    pub fn memory(&self) -> &CacheMemory {
        &self.memory
    }

    /// Base of the cache memory; byte `o` of the file is at `as_ptr() + o`. Valid for reads of
    /// [`memory().len()`](CacheMemory::len) bytes while `self` lives; read only present blocks
    /// (e.g. as the `UFFDIO_COPY` source after [`all_present`](Self::all_present)).
    #[must_use]
    pub fn as_ptr(&self) -> *const u8 {
        self.memory.as_ptr()
    }

    /// Bytes of bookkeeping (presence and filling bitmaps): 64 KiB per GiB at 4 KiB blocks.
    #[must_use]
    pub fn bookkeeping_bytes(&self) -> usize {
        self.presence
            .bookkeeping_bytes()
            .saturating_add(self.filling.heap_bytes())
    }

    /// The blocks touched by `offset..offset + len`; `None` if empty, overflowing or past the
    /// end of the file.
    #[must_use]
    pub fn blocks_of(&self, offset: u64, len: u64) -> Option<Range<u64>> {
        let end = offset.checked_add(len)?;
        if end > self.size {
            return None;
        }
        self.presence.blocks_of(offset, len)
    }

    /// Whether `block` is present. Out of range: `false`.
    #[inline]
    #[must_use]
    pub fn is_present(&self, block: u64) -> bool {
        self.presence.is_present(block)
    }

    /// Whether every block touched by `offset..offset + len` is present (a hit). Empty,
    /// overflowing or past the end: `false`.
    #[inline]
    #[must_use]
    pub fn all_present(&self, offset: u64, len: u64) -> bool {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => self.presence.all_present(offset, len),
            _ => false,
        }
    }

    /// The first absent block of `blocks` (`None`: all present, or invalid range).
    #[must_use]
    pub fn first_missing(&self, blocks: Range<u64>) -> Option<u64> {
        self.presence.first_missing(blocks)
    }

    /// The first present block of `blocks` (`None`: none present, or invalid range).
    #[must_use]
    pub fn first_present(&self, blocks: Range<u64>) -> Option<u64> {
        self.presence.first_present(blocks)
    }

    /// Number of present blocks.
    #[must_use]
    pub fn present_count(&self) -> u64 {
        self.presence.present_count()
    }

    /// The bytes `offset..offset + len` if every block they touch is present, else `None`
    /// (also for `len == 0`, overflow, or a range past the end of the file). No lock, no
    /// allocation: one `Acquire` load when the range lies within 64 blocks of one bitmap word.
    #[inline]
    #[must_use]
    pub fn get(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let len64 = u64::try_from(len).ok()?;
        if !self.all_present(offset, len64) {
            return None;
        }
        let ptr = self.memory.range_ptr(usize::try_from(offset).ok()?, len)?;
        // SAFETY: Safe because `ptr..ptr + len` is inside the live mapping (`range_ptr`), every
        // byte is initialised (zero-filled mapping), and every block it touches is present
        // (Acquire-checked above), so by the safety model's invariant (1) nothing writes these
        // bytes while the returned borrow of `self` lives, and the writes that filled them
        // happen-before this read. `len <= isize::MAX` because the mapping is.
        Some(unsafe { std::slice::from_raw_parts(ptr.cast_const(), len) })
    }

    /// Copies `offset..offset + dst.len()` into `dst` if every block it touches is present;
    /// returns whether it did (`dst` is untouched on `false`, and for an empty `dst`).
    #[inline]
    pub fn copy_to(&self, offset: u64, dst: &mut [u8]) -> bool {
        match self.get(offset, dst.len()) {
            Some(src) => {
                dst.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    /// Claims `blocks` for filling: the returned guard is the only writer of those blocks until
    /// it is dropped. Fails if any block is present or claimed by another guard.
    ///
    /// # Errors
    /// - [`CacheError::EmptyRange`] / [`CacheError::OutOfRange`] for a bad range;
    /// - [`CacheError::AlreadyPresent`] if some block is present (nothing to fill; use
    ///   [`first_missing`](Self::first_missing) to find the absent part);
    /// - [`CacheError::Busy`] if some block is being filled. Claims over several bitmap words
    ///   are taken word by word, so a claim overlapping another in-flight claim may fail even if
    ///   that one fails too: callers treat `Busy` as "wait for the other fetch, then re-check".
    pub fn reserve_fill(&self, blocks: Range<u64>) -> Result<FillGuard<'_>, CacheError> {
        self.filling.check(&blocks)?;
        // Cheap early answer before touching the claim bits.
        if let Some(block) = self.presence.first_present(blocks.clone()) {
            return Err(CacheError::AlreadyPresent { block });
        }
        let bytes = self
            .presence
            .bytes_of(&blocks)
            .ok_or(CacheError::TooLarge(self.size))?;
        let to_usize =
            |b: u64| usize::try_from(b.min(self.size)).map_err(|_| CacheError::TooLarge(b));
        let (start, end) = (to_usize(bytes.start)?, to_usize(bytes.end)?);
        if !self.filling.try_claim(&blocks) {
            return Err(CacheError::Busy {
                start: blocks.start,
                end: blocks.end,
            });
        }
        // From here on the guard owns the claim: returning early drops it and releases it.
        let guard = FillGuard {
            cache: self,
            next: blocks.start,
            blocks,
            next_byte: start,
            end_byte: end,
        };
        // Invariant (3): re-check presence *after* the claim (Acquire), which sees every commit
        // made by earlier holders of these blocks.
        if let Some(block) = self.presence.first_present(guard.blocks.clone()) {
            return Err(CacheError::AlreadyPresent { block });
        }
        Ok(guard)
    }

    /// Forgets every cached block and gives the memory back to the OS (eviction). Needs
    /// exclusive access, so no borrow from [`get`](Self::get) and no [`FillGuard`] is alive.
    pub fn reset(&mut self) {
        self.presence.reset();
        self.filling.reset();
        self.memory.discard();
    }
}

/// Exclusive write access to a claimed, absent block range of a [`ChunkCache`].
///
/// Write the bytes through [`buf`](Self::buf) (or [`as_mut_ptr`](Self::as_mut_ptr) for
/// io_uring), then [`commit`](Self::commit) a prefix of blocks as their bytes are complete,
/// or [`commit_all`](Self::commit_all). Committed blocks leave the guard: `buf` then covers only
/// the rest. Dropping the guard releases the claim; uncommitted blocks stay absent.
#[derive(Debug)]
#[must_use = "dropping a FillGuard without commit leaves its blocks absent"]
pub struct FillGuard<'a> {
    cache: &'a ChunkCache,
    /// The claimed blocks.
    blocks: Range<u64>,
    /// First uncommitted block (`blocks.start..=blocks.end`).
    next: u64,
    /// File offset of block `next` (clamped to `end_byte`).
    next_byte: usize,
    /// File offset of the end of the claim (clamped to the file size).
    end_byte: usize,
}

impl FillGuard<'_> {
    /// The claimed blocks.
    #[must_use]
    pub fn blocks(&self) -> Range<u64> {
        self.blocks.clone()
    }

    /// The blocks not yet committed.
    #[must_use]
    pub fn uncommitted(&self) -> Range<u64> {
        self.next..self.blocks.end
    }

    /// File byte range of the uncommitted blocks (the last block of the file may be partial).
    #[must_use]
    pub fn uncommitted_bytes(&self) -> Range<u64> {
        // usize -> u64 never fails on supported targets; an empty range is the safe fallback.
        match (u64::try_from(self.next_byte), u64::try_from(self.end_byte)) {
            (Ok(start), Ok(end)) => start..end,
            _ => 0..0,
        }
    }

    /// Whether this guard is a claim of `cache`.
    #[must_use]
    pub fn is_claim_of(&self, cache: &ChunkCache) -> bool {
        std::ptr::eq(self.cache, cache)
    }

    /// The uncommitted bytes (`uncommitted_bytes()` of the file), writable. Empty once
    /// everything is committed. Initially they hold zeros or leftovers of a failed fill.
    pub fn buf(&mut self) -> &mut [u8] {
        let len = self.end_byte.saturating_sub(self.next_byte);
        let Some(ptr) = self.cache.memory.range_ptr(self.next_byte, len) else {
            return &mut [];
        };
        // SAFETY: Safe because `ptr..ptr + len` is inside the live mapping (`range_ptr`) and
        // initialised, and covers exactly the uncommitted blocks of this guard's claim: no other
        // guard can hold them (invariant 2), they are absent so no `get` borrow covers them
        // (invariant 3), and the borrow is tied to `&mut self`, so no earlier `buf` borrow is
        // alive and `commit` cannot run while this one is (invariant 4).
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }

    /// Start of [`buf`](Self::buf) as a raw pointer, valid for writes of
    /// `uncommitted_bytes()` length until the next `commit` or the guard's drop, e.g. as the
    /// destination of an io_uring read. The caller must make any such write complete before it
    /// commits the blocks or drops the guard.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.cache.memory.as_mut_ptr().wrapping_add(self.next_byte)
    }

    /// Marks the next `blocks` uncommitted blocks present (Release): their bytes must be final.
    /// Returns the blocks committed. `commit(0)` does nothing.
    ///
    /// # Errors
    /// [`CacheError::CommitTooLong`] if `blocks` exceeds the uncommitted count (nothing is
    /// committed then).
    pub fn commit(&mut self, blocks: u64) -> Result<Range<u64>, CacheError> {
        let remaining = self.blocks.end - self.next;
        if blocks > remaining {
            return Err(CacheError::CommitTooLong {
                requested: blocks,
                remaining,
            });
        }
        let r = self.next..self.next + blocks;
        if blocks == 0 {
            return Ok(r);
        }
        let end_byte = self
            .cache
            .presence
            .bytes_of(&(r.end..r.end))
            .and_then(|b| usize::try_from(b.start).ok())
            .map_or(self.end_byte, |b| b.min(self.end_byte));
        self.cache.presence.mark_present(r.clone())?;
        self.next = r.end;
        self.next_byte = end_byte;
        Ok(r)
    }

    /// Commits every uncommitted block and releases the claim. Returns the blocks committed by
    /// this call.
    pub fn commit_all(mut self) -> Range<u64> {
        let remaining = self.blocks.end - self.next;
        self.commit(remaining).unwrap_or(self.next..self.next)
    }
}

impl Drop for FillGuard<'_> {
    fn drop(&mut self) {
        // Release: our writes (and commits) happen-before the next claim of these blocks.
        self.cache.filling.clear(&self.blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheErrorKind;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const K4: u64 = 4 << 10;
    const M2: u64 = 2 << 20;

    /// The test pattern: each 8-byte word holds its own file offset, scrambled.
    fn pattern_word(offset: u64) -> u64 {
        offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5_A5A5_A5A5_A5A5
    }

    /// Fills `buf`, which starts at file offset `start`, with the pattern.
    fn fill_pattern(buf: &mut [u8], start: u64) {
        let byte =
            |off: u64| pattern_word(off & !7).to_le_bytes()[usize::try_from(off % 8).unwrap()];
        let head = usize::try_from(start.next_multiple_of(8) - start)
            .unwrap()
            .min(buf.len());
        let (head_bytes, rest) = buf.split_at_mut(head);
        for (off, b) in (start..).zip(head_bytes.iter_mut()) {
            *b = byte(off);
        }
        let aligned = start + u64::try_from(head).unwrap();
        let whole = rest.len() / 8 * 8;
        let mut chunks = rest.chunks_exact_mut(8);
        for (off, chunk) in (aligned..).step_by(8).zip(&mut chunks) {
            chunk.copy_from_slice(&pattern_word(off).to_le_bytes());
        }
        let tail = chunks.into_remainder();
        let tail_start = aligned + u64::try_from(whole).unwrap();
        for (off, b) in (tail_start..).zip(tail.iter_mut()) {
            *b = byte(off);
        }
    }

    /// Checks that `bytes` (at file offset `start`) hold the pattern.
    fn is_pattern(bytes: &[u8], start: u64) -> bool {
        let mut expect = vec![0; bytes.len()];
        fill_pattern(&mut expect, start);
        expect == bytes
    }

    fn sizes() -> (u64, u64) {
        // Keep Miri runs small (it interprets every byte of the pattern); 3 huge pages natively.
        if cfg!(miri) {
            (16 * K4 - 100, K4)
        } else {
            (3 * M2 - 100, K4)
        }
    }

    #[test]
    fn memory_is_aligned_and_rounded() {
        for size in [1, K4, M2, M2 + 1, 5 * M2 - 7] {
            let m = CacheMemory::new(size).unwrap();
            assert_eq!(m.as_ptr().addr() % HUGE, 0, "size {size}");
            assert_eq!(u64::try_from(m.len()).unwrap(), size.next_multiple_of(M2));
            if cfg!(miri) {
                break;
            }
        }
        let empty = CacheMemory::new(0).unwrap();
        assert!(empty.is_empty());
        assert_eq!(empty.as_ptr().addr() % HUGE, 0);
        assert!(matches!(
            CacheMemory::new(u64::MAX),
            Err(CacheError::TooLarge(_))
        ));
        assert!(matches!(
            CacheMemory::new(u64::MAX - M2),
            Err(CacheError::TooLarge(_))
        ));
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri has no mmap or /proc")]
    fn hugepage_advice_applied() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.contains("[never]") || thp.is_empty() {
            println!("skipped: transparent huge pages are disabled ({thp:?})");
            return;
        }
        let cache = ChunkCache::new(8 * M2, K4).unwrap();
        let blocks = cache.blocks_of(0, 2 * M2).unwrap();
        let mut guard = cache.reserve_fill(blocks).unwrap();
        fill_pattern(guard.buf(), 0);
        let _ = guard.commit_all();
        let base = cache.as_ptr().addr();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut vma: Option<Vec<&str>> = None;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                if vma.is_some() {
                    break;
                }
                if (lo..hi).contains(&base) {
                    vma = Some(Vec::new());
                }
                continue;
            }
            if let Some(v) = vma.as_mut() {
                v.push(line);
            }
        }
        let vma = vma.expect("cache mapping not found in /proc/self/smaps");
        let field = |name: &str| {
            vma.iter()
                .find(|l| l.starts_with(name))
                .map(|l| l.to_string())
                .unwrap_or_default()
        };
        let flags = field("VmFlags:");
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "no MADV_HUGEPAGE flag: {flags}"
        );
        let anon_huge: u64 = field("AnonHugePages:")
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(
            anon_huge > 0,
            "AnonHugePages is 0 kB after touching 4 MiB (THP {thp:?})"
        );
    }

    #[test]
    fn fill_commit_get() {
        let (size, bs) = sizes();
        let cache = ChunkCache::new(size, bs).unwrap();
        let blocks = cache.blocks();
        assert_eq!(blocks, size.div_ceil(bs));
        assert_eq!(cache.get(0, 1), None);
        let mut g = cache.reserve_fill(0..blocks).unwrap();
        assert_eq!(g.uncommitted_bytes(), 0..size);
        let buf = g.buf();
        assert_eq!(u64::try_from(buf.len()).unwrap(), size);
        fill_pattern(buf, 0);
        assert_eq!(g.commit_all(), 0..blocks);
        assert_eq!(cache.present_count(), blocks);
        let s = cache.get(0, usize::try_from(size).unwrap()).unwrap();
        assert!(is_pattern(s, 0));
        assert!(is_pattern(cache.get(12345, 999).unwrap(), 12345));
        assert_eq!(cache.get(size - 1, 1).unwrap(), {
            let mut b = [0u8; 1];
            fill_pattern(&mut b, size - 1);
            b
        });
        let mut dst = [0u8; 4096];
        assert!(cache.copy_to(3 * K4, &mut dst));
        assert!(is_pattern(&dst, 3 * K4));
        // Present blocks cannot be filled again.
        let e = cache.reserve_fill(1..2).unwrap_err();
        assert_eq!(e.kind(), CacheErrorKind::AlreadyPresent);
    }

    #[test]
    fn miss_when_any_block_absent() {
        let cache = ChunkCache::new(M2, K4).unwrap();
        let mut g = cache.reserve_fill(2..4).unwrap();
        fill_pattern(g.buf(), 2 * K4);
        let _ = g.commit_all();
        assert!(cache.get(2 * K4, 8192).is_some());
        assert!(cache.get(2 * K4 - 1, 2).is_none());
        assert!(cache.get(2 * K4, 8193).is_none());
        assert!(cache.get(K4, 1).is_none());
        let mut dst = [7u8; 10];
        assert!(!cache.copy_to(4 * K4 - 5, &mut dst));
        assert_eq!(dst, [7u8; 10], "a missed copy leaves dst untouched");
    }

    #[test]
    fn double_claim_prevented() {
        let cache = ChunkCache::new(M2, K4).unwrap();
        let g = cache.reserve_fill(10..100).unwrap();
        for r in [10..100, 0..11, 99..200, 50..51, 0..512] {
            let e = cache.reserve_fill(r.clone()).unwrap_err();
            assert_eq!(e.kind(), CacheErrorKind::Busy, "{r:?}");
        }
        // Disjoint neighbours are fine, and the failed attempts released what they took.
        let a = cache.reserve_fill(0..10).unwrap();
        let b = cache.reserve_fill(100..512).unwrap();
        drop((a, b, g));
        assert!(cache.reserve_fill(0..512).is_ok());
    }

    #[test]
    fn dropped_guard_leaves_blocks_absent() {
        let cache = ChunkCache::new(M2, K4).unwrap();
        {
            let mut g = cache.reserve_fill(0..16).unwrap();
            fill_pattern(g.buf(), 0);
            // A failed fetch: no commit.
        }
        assert_eq!(cache.present_count(), 0);
        assert!(cache.get(0, 1).is_none());
        assert_eq!(cache.first_missing(0..16), Some(0));
        let mut g = cache.reserve_fill(0..16).expect("claim released on drop");
        fill_pattern(g.buf(), 0);
        let _ = g.commit_all();
        assert!(is_pattern(cache.get(0, 16 * 4096).unwrap(), 0));
    }

    #[test]
    fn progressive_commit() {
        let cache = ChunkCache::new(M2, K4).unwrap();
        let mut g = cache.reserve_fill(4..12).unwrap();
        assert!(matches!(
            g.commit(9),
            Err(CacheError::CommitTooLong {
                requested: 9,
                remaining: 8
            })
        ));
        fill_pattern(&mut g.buf()[..3 * 4096], 4 * K4);
        assert_eq!(g.commit(3).unwrap(), 4..7);
        assert_eq!(g.commit(0).unwrap(), 7..7);
        assert!(is_pattern(cache.get(4 * K4, 3 * 4096).unwrap(), 4 * K4));
        assert!(cache.get(4 * K4, 3 * 4096 + 1).is_none());
        assert_eq!(cache.first_missing(4..12), Some(7));
        // buf now starts at block 7.
        assert_eq!(g.uncommitted(), 7..12);
        assert_eq!(g.uncommitted_bytes(), 7 * K4..12 * K4);
        assert_eq!(g.buf().len(), 5 * 4096);
        fill_pattern(&mut g.buf()[..4096], 7 * K4);
        assert_eq!(g.commit(1).unwrap(), 7..8);
        // Still claimed: nobody else may fill the rest.
        assert_eq!(
            cache.reserve_fill(8..12).unwrap_err().kind(),
            CacheErrorKind::Busy
        );
        drop(g);
        assert_eq!(cache.present_count(), 4);
        assert_eq!(cache.first_missing(4..12), Some(8));
        // The rest is claimable again; the committed prefix is not.
        assert_eq!(
            cache.reserve_fill(4..12).unwrap_err().kind(),
            CacheErrorKind::AlreadyPresent
        );
        let mut g = cache.reserve_fill(8..12).unwrap();
        fill_pattern(g.buf(), 8 * K4);
        assert_eq!(g.commit_all(), 8..12);
        assert!(is_pattern(cache.get(4 * K4, 8 * 4096).unwrap(), 4 * K4));
        assert_eq!(g_empty_buf_len(&cache), 0);
    }

    /// A guard that committed everything has an empty buffer.
    fn g_empty_buf_len(cache: &ChunkCache) -> usize {
        let mut g = cache.reserve_fill(100..101).unwrap();
        assert_eq!(g.commit(1).unwrap(), 100..101);
        g.buf().len()
    }

    #[test]
    fn partial_last_block() {
        let size = M2 + 100;
        let cache = ChunkCache::new(size, K4).unwrap();
        let last = cache.blocks() - 1;
        assert_eq!(last, M2 / K4);
        let mut g = cache.reserve_fill(last..last + 1).unwrap();
        assert_eq!(g.buf().len(), 100);
        fill_pattern(g.buf(), M2);
        let _ = g.commit_all();
        assert!(is_pattern(cache.get(M2, 100).unwrap(), M2));
        assert!(cache.get(M2, 101).is_none(), "past the file size");
        assert_eq!(cache.memory().len(), 2 * HUGE);
    }

    #[test]
    fn edge_inputs_never_panic() {
        let cache = ChunkCache::new(M2, K4).unwrap();
        // Contents do not matter here, only presence.
        let _ = cache.reserve_fill(0..512).unwrap().commit_all();
        assert!(cache.get(0, 0).is_none());
        assert!(cache.get(M2, 1).is_none());
        assert!(cache.get(M2 - 1, 2).is_none());
        assert!(cache.get(u64::MAX, 1).is_none());
        assert!(cache.get(u64::MAX - 2, 8).is_none());
        assert!(cache.get(1, usize::MAX).is_none());
        assert!(cache.get(0, usize::MAX).is_none());
        assert!(!cache.copy_to(u64::MAX, &mut [0; 16]));
        assert!(!cache.copy_to(0, &mut []));
        assert!(!cache.all_present(u64::MAX, u64::MAX));
        assert_eq!(cache.blocks_of(u64::MAX, 1), None);
        assert_eq!(cache.blocks_of(0, 0), None);
        #[expect(clippy::reversed_empty_ranges, reason = "testing bad input")]
        let reversed = 9..3;
        for r in [
            0..0,
            reversed,
            0..513,
            512..513,
            u64::MAX - 1..u64::MAX,
            0..u64::MAX,
        ] {
            let e = cache.reserve_fill(r.clone()).unwrap_err();
            assert_eq!(e.kind(), CacheErrorKind::InvalidArgument, "{r:?}: {e}");
        }
        for bs in [0, 1, 1000, 8 << 20] {
            assert!(matches!(
                ChunkCache::new(M2, bs),
                Err(CacheError::BlockSize(_))
            ));
        }
        assert!(ChunkCache::new(u64::MAX, K4).is_err());
        assert!(ChunkCache::new(u64::MAX, M2).is_err());
        // Size 0: every request misses or is refused.
        let empty = ChunkCache::new(0, K4).unwrap();
        assert_eq!(empty.blocks(), 0);
        assert!(empty.get(0, 1).is_none());
        assert!(empty.get(0, 0).is_none());
        assert!(empty.reserve_fill(0..1).is_err());
        assert!(empty.reserve_fill(0..0).is_err());
    }

    #[test]
    fn huge_block_granularity() {
        let size = if cfg!(miri) { M2 } else { 3 * M2 };
        let cache = ChunkCache::new(size, M2).unwrap();
        assert_eq!(cache.blocks(), size / M2);
        let mut g = cache.reserve_fill(0..1).unwrap();
        assert_eq!(g.buf().len(), HUGE);
        fill_pattern(&mut g.buf()[..8192], 0);
        let _ = g.commit_all();
        assert!(cache.is_present(0));
        assert!(is_pattern(cache.get(0, 8192).unwrap(), 0));
        assert!(cache.get(M2 - 1, 1).is_some());
        if size > M2 {
            assert!(cache.get(M2 - 1, 2).is_none());
            assert!(!cache.is_present(1));
        }
        assert_eq!(cache.present_count(), 1);
        assert_eq!(cache.bookkeeping_bytes(), 16);
    }

    #[test]
    fn reset_forgets_everything() {
        let mut cache = ChunkCache::new(M2, K4).unwrap();
        let n = if cfg!(miri) { 16 } else { 512 };
        let mut g = cache.reserve_fill(0..n).unwrap();
        fill_pattern(g.buf(), 0);
        let _ = g.commit_all();
        cache.reset();
        assert_eq!(cache.present_count(), 0);
        assert!(cache.get(0, 1).is_none());
        let mut g = cache.reserve_fill(0..n).unwrap();
        if !cfg!(miri) {
            assert!(
                g.buf().iter().all(|&b| b == 0),
                "MADV_DONTNEED zeroes the pages"
            );
        }
        fill_pattern(g.buf(), 0);
        let _ = g.commit_all();
        assert!(is_pattern(cache.get(0, 4096).unwrap(), 0));
    }

    #[test]
    fn bookkeeping_is_64k_per_gib() {
        if cfg!(miri) {
            return;
        }
        let cache = ChunkCache::new(1 << 30, K4).unwrap();
        assert_eq!(cache.bookkeeping_bytes(), 64 << 10);
    }

    /// Several writer threads race to fill random, overlapping block ranges (committing them
    /// progressively, sometimes abandoning them), while reader threads read random ranges and
    /// check that every hit shows the committed pattern, never zeros or a partial write.
    #[test]
    fn concurrent_fills_and_readers() {
        use rand::{Rng, SeedableRng, rngs::SmallRng};

        let (size, bs) = sizes();
        let cache = Arc::new(ChunkCache::new(size, bs).unwrap());
        let blocks = cache.blocks();
        let done = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let (writers, readers) = if cfg!(miri) { (2, 2) } else { (3, 3) };
        // Under Miri: fewer, shorter operations in a small span (it interprets every byte).
        let (rounds, max_blocks, max_read, span) = if cfg!(miri) {
            (30, 3, 256, 16)
        } else {
            (4000, 70, 3 * 4096, blocks)
        };
        let mut handles = Vec::new();
        for t in 0..writers {
            let cache = Arc::clone(&cache);
            handles.push(std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t);
                let mut committed = 0u64;
                for _ in 0..rounds {
                    let start = rng.random_range(0..span);
                    let len = rng.random_range(1..=(span - start).min(max_blocks));
                    let Ok(mut g) = cache.reserve_fill(start..start + len) else {
                        continue;
                    };
                    let first = g.uncommitted_bytes().start;
                    fill_pattern(g.buf(), first);
                    // Commit a random prefix, maybe the rest, maybe abandon it.
                    let prefix = rng.random_range(0..=len);
                    committed += g.commit(prefix).unwrap().end - start;
                    if rng.random_bool(0.5) {
                        committed += g.commit_all().end - start - prefix;
                    }
                }
                committed
            }));
        }
        let mut reader_handles = Vec::new();
        for t in 0..readers {
            let (cache, done, hits) = (Arc::clone(&cache), Arc::clone(&done), Arc::clone(&hits));
            reader_handles.push(std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(100 + t);
                let mut dst = vec![0u8; max_read];
                while !done.load(Ordering::Relaxed) {
                    let off = rng.random_range(0..(span * bs).min(size));
                    let len =
                        rng.random_range(1..=usize::try_from(size - off).unwrap().min(max_read));
                    if let Some(s) = cache.get(off, len) {
                        assert!(
                            is_pattern(s, off),
                            "torn or uncommitted read at {off}+{len}"
                        );
                        hits.fetch_add(1, Ordering::Relaxed);
                    }
                    if cache.copy_to(off, &mut dst[..len]) {
                        assert!(is_pattern(&dst[..len], off));
                    }
                    if cfg!(miri) {
                        std::thread::yield_now();
                    }
                }
            }));
        }
        let committed: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        done.store(true, Ordering::Relaxed);
        for h in reader_handles {
            h.join().unwrap();
        }
        // Every block was committed at most once, and the count matches the bitmap.
        assert_eq!(committed, cache.present_count());
        let mut counted = 0;
        for b in 0..blocks {
            if cache.is_present(b) {
                counted += 1;
                let (off, len) = (b * bs, usize::try_from(bs.min(size - b * bs)).unwrap());
                assert!(is_pattern(cache.get(off, len).unwrap(), off));
            }
        }
        assert_eq!(counted, committed);
        // Nothing is left claimed.
        for b in 0..blocks {
            if !cache.is_present(b) {
                drop(cache.reserve_fill(b..b + 1).unwrap());
            }
        }
        println!(
            "concurrent: {committed} blocks committed, {} hits",
            hits.load(Ordering::Relaxed)
        );
    }

    /// Many threads race for the same range: exactly one wins each round.
    #[test]
    fn racing_claims_have_one_winner() {
        let cache = Arc::new(ChunkCache::new(M2, K4).unwrap());
        let rounds: u64 = if cfg!(miri) { 5 } else { 200 };
        for round in 0..rounds {
            let r = (round % 4) * 100..(round % 4) * 100 + 90;
            let wins = Arc::new(AtomicU64::new(0));
            let barrier = Arc::new(std::sync::Barrier::new(3));
            let hs: Vec<_> = (0..3)
                .map(|_| {
                    let (cache, wins, barrier, r) = (
                        Arc::clone(&cache),
                        Arc::clone(&wins),
                        Arc::clone(&barrier),
                        r.clone(),
                    );
                    std::thread::spawn(move || {
                        barrier.wait();
                        if let Ok(g) = cache.reserve_fill(r) {
                            wins.fetch_add(1, Ordering::Relaxed);
                            // Hold the claim until everyone tried.
                            barrier.wait();
                            drop(g);
                        } else {
                            barrier.wait();
                        }
                    })
                })
                .collect();
            for h in hs {
                h.join().unwrap();
            }
            assert_eq!(wins.load(Ordering::Relaxed), 1, "round {round}");
        }
    }
}
