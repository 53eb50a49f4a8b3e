//! The per-build-file chunk cache: cache memory plus its presence bitmap.
//!
//! One [`ChunkCache`] exists per build file. It owns
//!
//! - a [`CacheMemory`]: anonymous memory of the file's full uncompressed size (rounded up to
//!   2 MiB), 2 MiB-aligned and advised `MADV_HUGEPAGE`, so it can be registered with io_uring and
//!   copied into guest memory with `UFFDIO_COPY` in 2 MiB pages;
//! - a [`Presence`] bitmap (one bit per block, `AtomicU64` words): a block is present once its
//!   bytes are final, and from then on they are never written again;
//! - a private "filling" bitmap of the same shape: the claim a single writer holds while it
//!   fills a block range (see [`FillGuard`]).
//!
//! The hit path ([`ChunkCache::get`], [`ChunkCache::copy_to`]) is one or a few `Acquire` loads
//! followed by a slice or a copy: no lock, no allocation. The miss path reserves blocks with
//! [`ChunkCache::reserve_fill`], writes them through the guard's `&mut [u8]`, and commits them
//! (all at once or a prefix at a time as bytes land). Dropping a guard without committing leaves
//! the blocks absent and claimable again: a failed fetch caches nothing.
//!
//! All `unsafe` code of this module lives in `memory.rs`; its `# Safety model` states the
//! invariants. `presence.rs` is safe code that the safety argument relies on (it is private to
//! this crate, so its behaviour is under our control). See `docs/cache.md` for the design notes
//! and benchmark figures.

mod memory;
mod presence;

pub use memory::{CacheMemory, ChunkCache, FillGuard};
pub use presence::Presence;

/// Alignment and rounding unit of cache memory: one x86-64 transparent huge page.
pub const HUGE_PAGE: u64 = 2 << 20;

/// Smallest supported block size (one base page; header mappings use 4 KiB granularity).
pub const MIN_BLOCK_SIZE: u64 = 4 << 10;

/// Largest supported block size (a 2 MiB guest page).
pub const MAX_BLOCK_SIZE: u64 = HUGE_PAGE;

/// Errors of the chunk cache. None of them is raised on the hit path, which answers `Option`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The block size is not a power of two in `MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE`.
    #[error("block size {0} is not a power of two between 4 KiB and 2 MiB")]
    BlockSize(u64),
    /// The requested cache size cannot be mapped on this platform (overflows `usize`).
    #[error("cache size {0} bytes is too large for this platform")]
    TooLarge(u64),
    /// `mmap` (or the trimming `munmap`) failed.
    #[error("mapping {len} bytes of cache memory failed: {source}")]
    Map {
        /// Bytes requested.
        len: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// An empty block range was given where at least one block is required.
    #[error("empty block range {start}..{end}")]
    EmptyRange {
        /// First block.
        start: u64,
        /// End block (exclusive).
        end: u64,
    },
    /// A block range reaches past the last block.
    #[error("block range {start}..{end} is outside 0..{blocks}")]
    OutOfRange {
        /// First block.
        start: u64,
        /// End block (exclusive).
        end: u64,
        /// Number of blocks.
        blocks: u64,
    },
    /// Some block of the range is already being filled by another guard.
    #[error("block range {start}..{end} is being filled by another writer")]
    Busy {
        /// First block.
        start: u64,
        /// End block (exclusive).
        end: u64,
    },
    /// Some block of the range is already present (its bytes are final).
    #[error("block {block} is already present")]
    AlreadyPresent {
        /// The first present block found in the range.
        block: u64,
    },
    /// A commit asked for more blocks than the guard still holds uncommitted.
    #[error("commit of {requested} blocks, but only {remaining} remain uncommitted")]
    CommitTooLong {
        /// Blocks asked for.
        requested: u64,
        /// Blocks still uncommitted in the guard.
        remaining: u64,
    },
}

/// Which broad class a [`CacheError`] falls in (stable across message changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheErrorKind {
    /// The caller passed an invalid argument (size, block size, range, commit length).
    InvalidArgument,
    /// The OS refused the memory.
    Os,
    /// Contention: another writer holds some block; retry or wait for it.
    Busy,
    /// Nothing to do: the bytes are already cached.
    AlreadyPresent,
}

impl CacheError {
    /// The stable class of this error.
    #[must_use]
    pub fn kind(&self) -> CacheErrorKind {
        match self {
            Self::BlockSize(_)
            | Self::TooLarge(_)
            | Self::EmptyRange { .. }
            | Self::OutOfRange { .. }
            | Self::CommitTooLong { .. } => CacheErrorKind::InvalidArgument,
            Self::Map { .. } => CacheErrorKind::Os,
            Self::Busy { .. } => CacheErrorKind::Busy,
            Self::AlreadyPresent { .. } => CacheErrorKind::AlreadyPresent,
        }
    }
}
