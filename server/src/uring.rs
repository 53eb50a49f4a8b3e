//! io_uring file reads (tokio-uring) for the workers of [`crate::runtime`].
//!
//! - [`read_exact_at`]: fill an owned buffer from a file offset, looping over short reads; a read
//!   that hits end of file first fails with [`io::ErrorKind::UnexpectedEof`] (never short data).
//!   Buffers follow tokio-uring's ownership model: the buffer moves into the operation and comes
//!   back with the result ([`tokio_uring::BufResult`]), also on error, so the kernel can never
//!   write into memory that Rust code has freed or is reading.
//! - [`FixedPool`] + [`read_fixed_exact_at`]: a per-worker pool of buffers registered with the
//!   worker's ring (`IORING_REGISTER_BUFFERS`), read with `IORING_OP_READ_FIXED` (no per-I/O page
//!   pinning). This is where compressed frames land before they are decoded.
//! - [`RegionBuf`]: a buffer that is a window of memory owned elsewhere (the chunk cache's
//!   mapping), so uncompressed chunks are read straight into the cache without a copy.
//!
//! All functions must run on a worker of a [`crate::runtime::Runtime`] (they need the thread's
//! tokio-uring context); elsewhere they fail with [`io::ErrorKind::Unsupported`] instead of
//! panicking as tokio-uring would.
//!
//! # Safety model
//!
//! The one `unsafe` contract here is the buffer that points into foreign memory:
//!
//! - [`StableRegion`] (unsafe trait): its implementor promises that [`StableRegion::region`]
//!   answers the same pointer and length for as long as the value lives, and that those `len`
//!   bytes stay allocated, writable and unmoved until the value is dropped. A [`RegionBuf`] holds
//!   an `Arc` of the region, and tokio-uring holds the `RegionBuf` in its operation slab until the
//!   operation's completion has been reaped (even when the future is dropped), so the memory
//!   outlives every kernel write into it.
//! - [`RegionBuf::new`] (unsafe fn): its caller promises exclusive access to the window
//!   `[offset, offset + len)` while the `RegionBuf` lives: no other `RegionBuf`, reference or
//!   write covers those bytes (the cache's exclusive fill guard gives exactly this). With the
//!   bounds check in `new`, this makes the `IoBuf`/`IoBufMut` impls sound: the pointer is valid
//!   for `len` bytes, stable, and only the kernel (during the operation) or the owner of the
//!   `RegionBuf` (after it) touches the window.
//! - [`HeapRegion`]: a `Vec`-free heap region (boxed `UnsafeCell<u8>` slice) implementing
//!   `StableRegion`, for tests and as the model implementation.

use std::cell::UnsafeCell;
use std::io;
use std::sync::Arc;

use tokio_uring::BufResult;
use tokio_uring::buf::fixed::{FixedBuf, FixedBufPool};
use tokio_uring::buf::{BoundedBuf, BoundedBufMut, IoBuf, IoBufMut, Slice};
use tokio_uring::fs::File;

use crate::runtime::current_worker;

/// Fails unless this thread is a runtime worker (which has a tokio-uring context).
fn check_context() -> io::Result<()> {
    match current_worker() {
        Some(_) => Ok(()),
        None => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring read outside a thaw runtime worker",
        )),
    }
}

fn eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "end of file before the buffer was filled",
    )
}

fn check_range(len: usize, offset: u64) -> io::Result<()> {
    let len = u64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    match offset.checked_add(len) {
        Some(_) => Ok(()),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "read range overflows u64",
        )),
    }
}

/// Reads exactly `buf.bytes_total()` bytes at `offset` into `buf` (for a `Vec`, its capacity;
/// pass `vec.slice(..n)` for a prefix), looping over short reads. End of file before the buffer
/// is full is an [`io::ErrorKind::UnexpectedEof`] error; the bytes read so far are then in the
/// buffer but must not be used. The buffer comes back in every case.
pub async fn read_exact_at<B: BoundedBufMut>(file: &File, buf: B, offset: u64) -> BufResult<(), B> {
    read_exact_with(buf, offset, |slice, pos| file.read_at(slice, pos)).await
}

/// [`read_exact_at`] with a registered buffer from a [`FixedPool`] (`IORING_OP_READ_FIXED`).
pub async fn read_fixed_exact_at<B>(file: &File, buf: B, offset: u64) -> BufResult<(), B>
where
    B: BoundedBufMut<BufMut = FixedBuf>,
{
    read_exact_with(buf, offset, |slice, pos| file.read_fixed_at(slice, pos)).await
}

/// The fill loop shared by the plain and the registered-buffer reads: `read` issues one read of
/// the remaining slice at `pos`; short reads continue where they stopped, `Ok(0)` is end of file.
async fn read_exact_with<B, R, Fut>(buf: B, offset: u64, mut read: R) -> BufResult<(), B>
where
    B: BoundedBufMut,
    R: FnMut(Slice<B::BufMut>, u64) -> Fut,
    Fut: std::future::Future<Output = BufResult<usize, Slice<B::BufMut>>>,
{
    if let Err(error) = check_context().and_then(|()| check_range(buf.bytes_total(), offset)) {
        return (Err(error), buf);
    }
    let bounds = buf.bounds();
    let mut slice = buf.slice_full();
    let mut pos = offset;
    let mut result = Ok(());
    while slice.bytes_total() != 0 {
        let (res, back) = read(slice, pos).await;
        match res {
            Ok(0) => {
                result = Err(eof());
                slice = back;
                break;
            }
            Ok(n) => {
                pos = advance(pos, n);
                slice = reslice(back, n);
            }
            Err(error) => {
                result = Err(error);
                slice = back;
                break;
            }
        }
    }
    (result, B::from_buf_bounds(slice.into_inner(), bounds))
}

/// `pos + n`; cannot overflow because `check_range` bounded `offset + total` and `n` is at
/// most what remained.
fn advance(pos: u64, n: usize) -> u64 {
    pos.saturating_add(u64::try_from(n).unwrap_or(u64::MAX))
}

/// The rest of `slice` after its first `n` bytes. The read op has marked those bytes
/// initialised, which `Slice::slice` requires; `n` is clamped to the slice (the kernel never
/// returns more than asked, but a panic here would be worse than a wrong count).
fn reslice<T: IoBufMut>(slice: Slice<T>, n: usize) -> Slice<T> {
    let n = n.min(slice.bytes_total());
    slice.slice(n..)
}

/// A pool of buffers registered with the current worker's ring. A ring holds one registered set
/// at a time, so create one pool per worker (registering a second set fails).
/// The pool is `!Send`: it belongs to its worker.
#[derive(Clone)]
pub struct FixedPool {
    pool: FixedBufPool<Vec<u8>>,
    buf_len: usize,
    count: usize,
}

impl std::fmt::Debug for FixedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedPool")
            .field("count", &self.count)
            .field("buf_len", &self.buf_len)
            .finish_non_exhaustive()
    }
}

impl FixedPool {
    /// Allocates `count` zeroed buffers of `buf_len` bytes and registers them with this worker's
    /// ring. Registered memory is pinned (counted against `RLIMIT_MEMLOCK` or the memory cgroup).
    pub fn register(count: usize, buf_len: usize) -> io::Result<Self> {
        check_context()?;
        if count == 0 || buf_len == 0 || count > usize::from(u16::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "fixed pool: count must be 1..=65535 and buf_len > 0",
            ));
        }
        let pool = FixedBufPool::new((0..count).map(|_| vec![0_u8; buf_len]));
        pool.register()?;
        Ok(Self {
            pool,
            buf_len,
            count,
        })
    }

    /// Length of each buffer.
    #[must_use]
    pub fn buf_len(&self) -> usize {
        self.buf_len
    }

    /// Number of buffers.
    #[must_use]
    pub fn count(&self) -> usize {
        self.count
    }

    /// A free buffer, if one is checked in. Dropping the buffer checks it back in.
    #[must_use]
    pub fn try_next(&self) -> Option<FixedBuf> {
        self.pool.try_next(self.buf_len)
    }

    /// A free buffer, waiting for one to be checked in if all are in use.
    pub async fn next(&self) -> FixedBuf {
        self.pool.next(self.buf_len).await
    }

    /// Unregisters the buffers from the ring (buffers checked out stay valid memory, but can no
    /// longer be used for fixed I/O).
    pub fn unregister(&self) -> io::Result<()> {
        check_context()?;
        self.pool.unregister()
    }
}

/// Memory owned elsewhere that io_uring may write into; see the module's safety model.
///
/// # Safety
///
/// `region()` must answer the same `(ptr, len)` for the value's whole life, and those `len` bytes
/// must stay allocated, writable and at the same address until the value is dropped.
pub unsafe trait StableRegion: Send + Sync + 'static {
    /// Base pointer and length of the region.
    fn region(&self) -> (*mut u8, usize);
}

/// A heap-allocated [`StableRegion`] (a boxed slice: it never reallocates).
pub struct HeapRegion {
    cells: Box<[UnsafeCell<u8>]>,
}

impl std::fmt::Debug for HeapRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeapRegion")
            .field("len", &self.cells.len())
            .finish()
    }
}

impl HeapRegion {
    /// A zeroed region of `len` bytes.
    #[must_use]
    pub fn zeroed(len: usize) -> Self {
        Self {
            cells: (0..len).map(|_| UnsafeCell::new(0)).collect(),
        }
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether the region is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// The bytes, once nothing else can access them (ownership proves it).
    #[must_use]
    pub fn into_vec(self) -> Vec<u8> {
        self.cells.into_iter().map(UnsafeCell::into_inner).collect()
    }
}

// SAFETY: the bytes are only accessed through raw pointers under `RegionBuf`'s exclusive-window
// contract, or by value in `into_vec` (which needs ownership); `UnsafeCell<u8>` holds no
// thread-affine state.
unsafe impl Sync for HeapRegion {}

// SAFETY: `cells` is a boxed slice: its address and length are fixed from construction to drop,
// and `UnsafeCell` makes writes through the shared pointer permitted.
unsafe impl StableRegion for HeapRegion {
    fn region(&self) -> (*mut u8, usize) {
        (UnsafeCell::raw_get(self.cells.as_ptr()), self.cells.len())
    }
}

/// A window `[offset, offset + len)` of a [`StableRegion`], usable as an owned io_uring buffer.
/// It holds the region's `Arc`, so the memory outlives the I/O.
pub struct RegionBuf<R: StableRegion> {
    region: Arc<R>,
    offset: usize,
    len: usize,
    init: usize,
}

impl<R: StableRegion> std::fmt::Debug for RegionBuf<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionBuf")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("init", &self.init)
            .finish_non_exhaustive()
    }
}

impl<R: StableRegion> RegionBuf<R> {
    /// The window `[offset, offset + len)` of `region`; `None` if it is not inside the region.
    /// The window starts uninitialised (`bytes_init() == 0`).
    ///
    /// # Safety
    ///
    /// While the returned value lives, nothing else may read or write the window's bytes: no
    /// other `RegionBuf` overlapping it and no reference into it.
    pub unsafe fn new(region: Arc<R>, offset: usize, len: usize) -> Option<Self> {
        let (_, region_len) = region.region();
        let end = offset.checked_add(len)?;
        if end > region_len {
            return None;
        }
        Some(Self {
            region,
            offset,
            len,
            init: 0,
        })
    }

    /// The region this window belongs to.
    #[must_use]
    pub fn region(&self) -> &Arc<R> {
        &self.region
    }

    /// Window offset within the region.
    #[must_use]
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Window length.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks the whole window initialised (e.g. before a write, or once the caller knows it was
    /// filled by other means). Safe: any byte pattern is a valid `u8`, and the region's bytes are
    /// always initialised memory (a `StableRegion` is allocated memory, and `HeapRegion` zeroes).
    pub fn assume_filled(&mut self) {
        self.init = self.len;
    }

    /// The initialised prefix of the window.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        let ptr = IoBuf::stable_ptr(self);
        // SAFETY: `ptr` is valid for `len >= init` bytes (bounds checked in `new`, memory kept
        // alive by `self.region`), and `new`'s contract gives this value exclusive access to the
        // window; the shared borrow of `self` keeps the kernel out (an operation owns the buffer
        // by value).
        unsafe { std::slice::from_raw_parts(ptr, self.init) }
    }
}

// SAFETY: the pointer is `base + offset` of a `StableRegion`, valid for `len` bytes for as long as
// `self.region` (an `Arc` this value owns) lives, and stable across moves of `self`;
// `bytes_init() <= bytes_total() == len`.
unsafe impl<R: StableRegion> IoBuf for RegionBuf<R> {
    fn stable_ptr(&self) -> *const u8 {
        let (base, _) = self.region.region();
        base.wrapping_add(self.offset).cast_const()
    }

    fn bytes_init(&self) -> usize {
        self.init
    }

    fn bytes_total(&self) -> usize {
        self.len
    }
}

// SAFETY: as for `IoBuf`; the window is exclusively this value's by `new`'s contract, so writes
// through the pointer race with nothing. `set_init` only records a length bounded by `len`.
unsafe impl<R: StableRegion> IoBufMut for RegionBuf<R> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        let (base, _) = self.region.region();
        base.wrapping_add(self.offset)
    }

    unsafe fn set_init(&mut self, pos: usize) {
        self.init = self.init.max(pos.min(self.len));
    }
}

// SAFETY: Safe because a `ChunkCache`'s memory is one mapping made at construction and unmapped
// only when the cache is dropped (`reset` discards pages but keeps the mapping), so the pointer
// and length `region` answers are the same for the cache's whole life, and the bytes stay
// allocated, writable and unmoved until it is dropped (a `RegionBuf` holds an `Arc` of it).
unsafe impl StableRegion for crate::cache::ChunkCache {
    fn region(&self) -> (*mut u8, usize) {
        (self.memory().as_mut_ptr(), self.memory().len())
    }
}

/// Leaks a fill claim whose io_uring read may still be in flight (the future was dropped before
/// the completion arrived): the blocks stay claimed, so no other fill can write them while the
/// kernel still might. Disarmed once the read completed.
struct ClaimKeeper<'a> {
    guard: Option<crate::cache::FillGuard<'a>>,
    armed: bool,
}

impl Drop for ClaimKeeper<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Some(guard) = self.guard.take()
        {
            tracing::warn!(
                blocks = ?guard.blocks(),
                "an io_uring read into the cache was cancelled in flight: its blocks stay claimed"
            );
            std::mem::forget(guard);
        }
    }
}

/// Reads the next `len` uncommitted bytes of `guard`'s claim (a fill of `cache`) from `file` at
/// `file_offset`, straight into the cache memory (no intermediate buffer), then commits the
/// blocks that are complete. Returns the result and the guard (with those blocks committed; on
/// error nothing is committed).
///
/// Sound under cancellation: if the returned future is dropped while the kernel may still be
/// writing, the claim is leaked (never released), so no other writer or reader can touch those
/// bytes.
///
/// # Errors
/// An I/O error, or end of file before `len` bytes ([`io::ErrorKind::UnexpectedEof`]); a `guard`
/// that is not a claim of `cache`, or a `len` beyond it ([`io::ErrorKind::InvalidInput`]).
pub async fn read_into_claim<'a>(
    file: &File,
    cache: &'a Arc<crate::cache::ChunkCache>,
    guard: crate::cache::FillGuard<'a>,
    file_offset: u64,
    len: usize,
) -> (io::Result<()>, Option<crate::cache::FillGuard<'a>>) {
    let window = guard.uncommitted_bytes();
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_owned());
    if !guard.is_claim_of(cache) {
        return (Err(invalid("fill claim of another cache")), Some(guard));
    }
    let (Ok(start), Ok(avail)) = (
        usize::try_from(window.start),
        usize::try_from(window.end - window.start),
    ) else {
        return (Err(invalid("fill window out of range")), Some(guard));
    };
    if len > avail || len == 0 {
        return (Err(invalid("read past the fill claim")), Some(guard));
    }
    // SAFETY: Safe because `[start, start + len)` lies inside the uncommitted part of the claim
    // `guard` holds: no other guard can hold those blocks, they are absent so no reader borrows
    // them, and the claim is released only after the read completed (on cancellation the
    // `ClaimKeeper` below leaks it), so only the kernel writes the window while the buffer lives.
    let Some(buf) = (unsafe { RegionBuf::new(Arc::clone(cache), start, len) }) else {
        return (Err(invalid("fill window out of range")), Some(guard));
    };
    let mut keeper = ClaimKeeper {
        guard: Some(guard),
        armed: true,
    };
    let (res, _buf) = read_exact_at(file, buf, file_offset).await;
    keeper.armed = false;
    let Some(mut guard) = keeper.guard.take() else {
        return (Err(invalid("fill claim lost")), None);
    };
    if let Err(e) = res {
        return (Err(e), Some(guard));
    }
    // Commit the blocks now complete (all of them when the read reached the claim's end).
    let bs = cache.block_size();
    let done = u64::try_from(len).unwrap_or(0);
    let full = if done == window.end - window.start {
        guard.uncommitted().end - guard.uncommitted().start
    } else {
        done / bs
    };
    let res = guard
        .commit(full)
        .map(|_| ())
        .map_err(|e| invalid(&e.to_string()));
    (res, Some(guard))
}
