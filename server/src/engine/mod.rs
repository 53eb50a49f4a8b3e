//! The engine: layered reads over per-build chunk caches, with one fetch per frame or chunk.
//!
//! ```text
//! LayeredFile::read(offset, len)
//!   header mappings -> segments: zeros (nil build) or (build file, offset in its data)
//!   per build file: ChunkCache (hugepage-aligned memory + atomic presence bitmap)
//!     hit  -> one Acquire load + a borrow (no lock, no allocation)
//!     miss -> fetch session for the frame (compressed) or 4 MiB chunk (uncompressed),
//!             shared by every caller in the process; tiers: cache dir -> shared cache -> store
//! ```
//!
//! - [`Engine`]: the process-wide state: the store, the directory cache tiers, the session
//!   table, the fetch threads, counters. [`Engine::open`] gives a [`LayeredFile`].
//! - [`LayeredFile`]: a build file as its header sees it; builds are opened lazily and shared
//!   (one cache per build file per process).
//! - `build.rs`: one build's data (source, cache, fetch sessions and transfers).
//! - `prefetch.rs`: background warming from a list of offsets (e2b's `prefetch.memory`).
//!
//! See `docs/engine.md` for the design and its invariants.

mod build;
mod callback;
mod layered;
mod local;
mod pool;
mod prefetch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use thaw_codec::{BuildId, FileKind};

use crate::store::shared_cache::{CachedStore, SharedCache};
use crate::store::{Store, StoreErrorKind};

pub use build::BuildFile;
pub use layered::{LayeredFile, ReadBuf, Segment};
pub use prefetch::{
    PrefetchHandle, PrefetchPlan, PrefetchProgress, load_prefetch_plan, parse_prefetch_plan,
    prefetch_offsets,
};

use build::SessionTable;
use pool::FetchPool;

/// Default deadline of one fetch (one transfer of a frame or a run of a chunk): well below the
/// 90 s kernel NBD timeout (and e2b's 60 s), so a stalled backend fails one request, not the
/// device.
pub const DEFAULT_FETCH_DEADLINE: Duration = Duration::from_secs(30);

/// Engine settings. [`Default`] gives production defaults.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Deadline of one transfer and of one reader's wait for it.
    pub fetch_deadline: Duration,
    /// Retries of a failed transfer (transient store errors, truncated bodies, undecodable
    /// bytes), with full-jitter exponential backoff, within the deadline.
    pub retries: u32,
    /// Backoff cap of the first retry (doubling with each retry).
    pub retry_base: Duration,
    /// Most fetch threads (transfers in flight).
    pub fetch_threads: usize,
    /// Most prefetch transfers in flight (demand transfers always go first).
    pub prefetch_concurrency: usize,
    /// Request-first joining (uncompressed chunks): a reader whose block lies within this many
    /// bytes ahead of a running transfer waits for it; farther away, it starts its own transfer
    /// at its block (up to [`max_runs_per_chunk`](Self::max_runs_per_chunk)).
    pub join_window: u64,
    /// Most concurrent transfers filling one uncompressed chunk.
    pub max_runs_per_chunk: usize,
    /// Sequential read-ahead: units (frames or chunks) fetched ahead of a demand miss that
    /// follows its predecessor. 0 disables it.
    pub readahead_units: usize,
    /// Number of session-table shards (each frame has an owner shard); 0 = one per core.
    pub shards: usize,
    /// Read a local-directory store (`file://`) with io_uring on the process's I/O workers,
    /// straight into cache memory, instead of `pread` on the fetch threads.
    pub uring_local: bool,
    /// A local directory frame/chunk cache (e2b's file names and write protocol), checked first.
    pub cache_dir: Option<PathBuf>,
    /// The shared directory cache (an NFS mount in production), checked after `cache_dir`.
    pub shared_cache: Option<PathBuf>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            fetch_deadline: DEFAULT_FETCH_DEADLINE,
            retries: 3,
            retry_base: Duration::from_millis(25),
            fetch_threads: 64,
            prefetch_concurrency: 8,
            join_window: 512 * 1024,
            max_runs_per_chunk: 8,
            readahead_units: 2,
            shards: 0,
            uring_local: true,
            cache_dir: None,
            shared_cache: None,
        }
    }
}

/// A fetch failure, shared by every reader that waited for the transfer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what} of build {build} ({file}) from {tier}: {cause}")]
pub struct FetchError {
    /// The build whose data failed.
    pub build: BuildId,
    /// Its file.
    pub file: FileKind,
    /// The fetch unit: `frame N (C offset .., U offset ..) of OBJECT` or `chunk N of OBJECT`.
    pub what: String,
    /// The tier that failed: `store URL`, `cache-dir`, `shared-cache`, `deadline`, `engine`.
    pub tier: String,
    /// What went wrong.
    pub cause: String,
    /// Classification.
    pub kind: FetchErrorKind,
}

/// Classification of a [`FetchError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchErrorKind {
    /// The store answered with an error (I/O, not found, truncated body, ...).
    Store(StoreErrorKind),
    /// The bytes arrived but did not decode or verify.
    Corrupt,
    /// The deadline passed.
    Deadline,
    /// The engine is shutting down or could not run the transfer.
    Engine,
}

/// Why a read failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The range is not inside the device.
    #[error("read [{offset}, +{len}) is outside the device of {size} bytes")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// A build the header references could not be opened (header or data object missing,
    /// malformed metadata).
    #[error("opening build {build} ({file}): {cause}")]
    Open {
        /// The build.
        build: BuildId,
        /// Its file.
        file: FileKind,
        /// The cause, with its context chain.
        cause: String,
    },
    /// A fetch failed.
    #[error(transparent)]
    Fetch(#[from] Arc<FetchError>),
}

impl ReadError {
    /// The errno an NBD or UFFD caller should report (`EIO` for everything but a bad range).
    pub fn errno(&self) -> i32 {
        match self {
            Self::OutOfRange { .. } => libc::EINVAL,
            _ => libc::EIO,
        }
    }
}

/// Counters of the engine (monotonic, relaxed).
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Reads that waited for at least one fetch (hits are not counted here: the hit path
    /// touches no shared cache line; callers count their requests).
    pub misses: AtomicU64,
    /// Fetch sessions started (frames or chunks).
    pub sessions: AtomicU64,
    /// Readers that joined a session another caller started.
    pub joined: AtomicU64,
    /// Transfers from the store (requests).
    pub store_requests: AtomicU64,
    /// Bytes received from the store.
    pub store_bytes: AtomicU64,
    /// Frames or chunks served by the local cache directory.
    pub cache_dir_hits: AtomicU64,
    /// Frames or chunks served by the shared cache.
    pub shared_cache_hits: AtomicU64,
    /// Cache files that did not decode or verify and were deleted.
    pub tier_evictions: AtomicU64,
    /// Frames or chunks written back to a directory tier.
    pub writebacks: AtomicU64,
    /// Failed fetches.
    pub fetch_errors: AtomicU64,
    /// Transfers retried after a transient failure.
    pub retries: AtomicU64,
    /// Units fetched ahead of sequential readers.
    pub readahead: AtomicU64,
    /// Uncompressed bytes made present in the caches.
    pub filled_bytes: AtomicU64,
}

/// A snapshot of [`EngineCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    /// See [`EngineCounters::misses`].
    pub misses: u64,
    /// See [`EngineCounters::sessions`].
    pub sessions: u64,
    /// See [`EngineCounters::joined`].
    pub joined: u64,
    /// See [`EngineCounters::store_requests`].
    pub store_requests: u64,
    /// See [`EngineCounters::store_bytes`].
    pub store_bytes: u64,
    /// See [`EngineCounters::cache_dir_hits`].
    pub cache_dir_hits: u64,
    /// See [`EngineCounters::shared_cache_hits`].
    pub shared_cache_hits: u64,
    /// See [`EngineCounters::tier_evictions`].
    pub tier_evictions: u64,
    /// See [`EngineCounters::writebacks`].
    pub writebacks: u64,
    /// See [`EngineCounters::fetch_errors`].
    pub fetch_errors: u64,
    /// See [`EngineCounters::retries`].
    pub retries: u64,
    /// See [`EngineCounters::readahead`].
    pub readahead: u64,
    /// See [`EngineCounters::filled_bytes`].
    pub filled_bytes: u64,
}

impl EngineCounters {
    fn snapshot(&self) -> EngineStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineStats {
            misses: l(&self.misses),
            sessions: l(&self.sessions),
            joined: l(&self.joined),
            store_requests: l(&self.store_requests),
            store_bytes: l(&self.store_bytes),
            cache_dir_hits: l(&self.cache_dir_hits),
            shared_cache_hits: l(&self.shared_cache_hits),
            tier_evictions: l(&self.tier_evictions),
            writebacks: l(&self.writebacks),
            fetch_errors: l(&self.fetch_errors),
            retries: l(&self.retries),
            readahead: l(&self.readahead),
            filled_bytes: l(&self.filled_bytes),
        }
    }
}

pub(crate) fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

/// A directory cache tier (the local `--cache-dir` or the `--shared-cache`).
#[derive(Debug)]
pub(crate) struct Tier {
    pub(crate) name: &'static str,
    pub(crate) cache: Arc<SharedCache>,
}

/// What every build file and session shares.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Data objects are read from here.
    pub(crate) store: Arc<dyn Store>,
    /// Headers, sizes and blobs (through the directory tiers when configured).
    pub(crate) meta: Arc<dyn Store>,
    pub(crate) tiers: Vec<Tier>,
    pub(crate) config: EngineConfig,
    pub(crate) table: SessionTable,
    pub(crate) pool: FetchPool,
    /// The io_uring workers reading a local-directory store (see `local.rs`).
    pub(crate) uring: Option<crate::runtime::Handle>,
    pub(crate) counters: EngineCounters,
    /// Open build files (one cache per build file per process).
    builds: Mutex<HashMap<(BuildId, FileKind), Weak<BuildFile>>>,
    next_file_id: AtomicU64,
}

/// The process-wide engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// An engine over `store` with `config`. The cache directories are created if missing.
    ///
    /// # Errors
    /// A cache directory that cannot be created.
    pub fn new(store: Arc<dyn Store>, config: EngineConfig) -> anyhow::Result<Self> {
        let mut tiers = Vec::new();
        for (name, dir) in [
            ("cache-dir", &config.cache_dir),
            ("shared-cache", &config.shared_cache),
        ] {
            if let Some(dir) = dir {
                std::fs::create_dir_all(dir).map_err(|e| {
                    anyhow::anyhow!("creating the {name} directory {}: {e}", dir.display())
                })?;
                tiers.push(Tier {
                    name,
                    cache: Arc::new(SharedCache::new(dir.clone())),
                });
            }
        }
        let mut meta: Arc<dyn Store> = Arc::clone(&store);
        for tier in tiers.iter().rev() {
            meta = Arc::new(CachedStore::new(Arc::clone(&tier.cache), meta));
        }
        let shards = if config.shards == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            config.shards
        };
        let pool = FetchPool::new(config.fetch_threads, config.prefetch_concurrency);
        let uring = if config.uring_local && tiers.is_empty() && store.local_path("probe").is_some()
        {
            local::workers()
        } else {
            None
        };
        Ok(Self {
            shared: Arc::new(Shared {
                store,
                meta,
                tiers,
                table: SessionTable::new(shards),
                pool,
                uring,
                counters: EngineCounters::default(),
                builds: Mutex::new(HashMap::new()),
                next_file_id: AtomicU64::new(1),
                config,
            }),
        })
    }

    /// The store data objects are read from.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Counters.
    pub fn stats(&self) -> EngineStats {
        self.shared.counters.snapshot()
    }

    /// Waits until no fetch session is in flight (transfers finished, write-backs to the
    /// directory tiers done), at most `timeout`. Returns whether it drained. Call it before the
    /// process exits, so no write-back is cut short (which would leave a temp and a lock file
    /// and lose the cached copy).
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.shared.table.len() == 0 {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Fetch threads started so far.
    pub fn fetch_threads(&self) -> usize {
        self.shared.pool.threads()
    }

    /// Fetch sessions in flight (for tests and metrics).
    pub fn sessions_in_flight(&self) -> usize {
        self.shared.table.len()
    }

    /// The store for headers and blobs (through the directory tiers when configured).
    pub fn meta_store(&self) -> &Arc<dyn Store> {
        &self.shared.meta
    }

    /// Opens `file` of `build`: loads its header (or e2b's legacy synthetic header). The data of
    /// the builds it references is opened on first read.
    ///
    /// # Errors
    /// The build has no such file, or its header is unreadable or malformed.
    pub fn open(&self, build: BuildId, file: FileKind) -> anyhow::Result<LayeredFile> {
        LayeredFile::open(Arc::clone(&self.shared), build, file)
    }
}

impl Shared {
    /// The shared [`BuildFile`] of `source`'s build and file: the open one (its frame table
    /// extended with `source`'s frames, as trimmed tables of different children differ), or a
    /// new one.
    pub(crate) fn build_file(
        self: &Arc<Self>,
        source: crate::layout::DataSource,
        block_size: u64,
    ) -> anyhow::Result<Arc<BuildFile>> {
        let key = (source.build, source.file);
        let mut builds = self.builds.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = builds.get(&key).and_then(Weak::upgrade) {
            existing.merge_source(&source)?;
            return Ok(existing);
        }
        let id = self.next_file_id.fetch_add(1, Ordering::Relaxed);
        let opened = Arc::new(BuildFile::new(Arc::clone(self), id, source, block_size)?);
        builds.retain(|_, w| w.strong_count() > 0);
        builds.insert(key, Arc::downgrade(&opened));
        Ok(opened)
    }
}
