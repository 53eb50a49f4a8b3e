//! The engine options every serving command shares (`read`, `uffd`, and later `serve`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::engine::{Engine, EngineConfig};
use crate::store::open_store;

/// Where builds are read from, and the cache tiers in between.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// The store holding the builds: file:///abs/dir, a directory path, gs://bucket/prefix
    /// (Google Cloud Storage), s3://bucket/prefix (S3-compatible; parameters such as
    /// ?endpoint=URL&budget=25s and credentials: see `thaw --help`),
    /// or sim:ttfb=20ms,bw=100MB/s,inner=URL (a simulated object store, for tests and benchmarks).
    #[arg(long, value_name = "URL", env = "THAW_STORE")]
    pub store: String,

    /// A local directory cache of fetched frames (.frm) and chunks (.bin), e2b's file names and
    /// write protocol; checked before the shared cache and the store, survives restarts.
    #[arg(long, value_name = "DIR", env = "THAW_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// The shared directory cache (an NFS mount shared by the nodes; e2b's
    /// SHARED_CHUNK_CACHE_PATH layout). Written only with data that arrived complete and
    /// verified; a corrupt file is deleted and the read falls through to the store.
    #[arg(long, value_name = "DIR", env = "THAW_SHARED_CACHE")]
    pub shared_cache: Option<PathBuf>,

    /// Deadline of one fetch (keep it well below the client's: the kernel NBD timeout is 90 s
    /// by default in e2b's setup).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub fetch_deadline: Duration,

    /// Retries of a failed transfer (transient store errors, truncated bodies, undecodable
    /// bytes), with full-jitter exponential backoff within the deadline.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub fetch_retries: u32,

    /// Most transfers in flight (fetch threads).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub fetch_threads: usize,

    /// Sequential read-ahead: frames (or chunks) fetched ahead of a sequential reader; 0 turns
    /// it off.
    #[arg(long, value_name = "N", default_value_t = EngineConfig::default().readahead_units)]
    pub readahead_units: usize,
}

/// Parses `30s`, `500ms`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::store::sim::parse_duration(s)
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 30s, 500ms)"))
}

impl EngineArgs {
    /// The engine configuration these options describe.
    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            fetch_deadline: self.fetch_deadline,
            retries: self.fetch_retries,
            fetch_threads: self.fetch_threads,
            readahead_units: self.readahead_units,
            cache_dir: self.cache_dir.clone(),
            shared_cache: self.shared_cache.clone(),
            ..EngineConfig::default()
        }
    }

    /// Opens the store and starts the engine.
    ///
    /// # Errors
    /// A bad store URL or a cache directory that cannot be created.
    pub fn engine(&self) -> anyhow::Result<Engine> {
        let store = open_store(&self.store)?;
        Engine::new(Arc::clone(&store), self.config())
    }
}
