//! The local-directory store read with io_uring on the engine's I/O workers (thread-per-core
//! tokio-uring runtimes): compressed frames land in registered buffers (`IORING_OP_READ_FIXED`)
//! and are decoded into the cache; uncompressed chunks are read straight into the cache memory
//! (the requested blocks first, then the rest of the chunk).
//!
//! The workers are process-wide (one set per process, started by the first engine over a local
//! store) and live until the process exits: engines come and go (tests, `thaw read`), and a
//! runtime must never be dropped from one of its own workers.

use std::cell::OnceCell;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use thaw_codec::{CompressionType, Frame, FrameDecoder};
use tokio_uring::buf::BoundedBuf;

use super::FetchErrorKind;
use super::build::{BuildFile, Session, Unit};
use crate::cache::{CacheErrorKind, ChunkCache};
use crate::runtime::{Handle, Runtime};
use crate::store::StoreErrorKind;
use crate::uring::{FixedPool, read_exact_at, read_fixed_exact_at, read_into_claim};

/// Registered buffers per worker, and their size (frames up to this size use them).
const FIXED_BUFS: usize = 8;
const FIXED_BUF_LEN: usize = 4 << 20;

/// The first read of a chunk transfer: the requested blocks, so a cold 4 KiB read does not wait
/// for the whole chunk.
const FIRST_PIECE: u64 = 64 << 10;

static WORKERS: OnceLock<Option<Runtime>> = OnceLock::new();

thread_local! {
    static POOL: OnceCell<Option<FixedPool>> = const { OnceCell::new() };
    static DECODER: std::cell::RefCell<FrameDecoder> = std::cell::RefCell::new(FrameDecoder::new());
}

/// The process-wide I/O workers (`None` if they cannot start: the engine then reads local
/// stores on its fetch threads).
pub(crate) fn workers() -> Option<Handle> {
    WORKERS
        .get_or_init(|| match Runtime::new(0) {
            Ok(rt) => Some(rt),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring workers unavailable; local reads use pread");
                None
            }
        })
        .as_ref()
        .map(|rt| rt.handle().clone())
}

/// Reads `len` bytes at `offset` of `file` into an owned buffer: a registered buffer of this
/// worker's pool when it fits, else a heap buffer.
async fn read_compressed(
    file: &tokio_uring::fs::File,
    offset: u64,
    len: usize,
) -> std::io::Result<Compressed> {
    let pool = POOL.with(|p| {
        p.get_or_init(|| match FixedPool::register(FIXED_BUFS, FIXED_BUF_LEN) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "cannot register io_uring buffers; using heap buffers");
                None
            }
        })
        .clone()
    });
    if let Some(pool) = pool
        && len <= pool.buf_len()
    {
        let buf = pool.next().await;
        let (res, slice) = read_fixed_exact_at(file, buf.slice(..len), offset).await;
        res?;
        return Ok(Compressed::Fixed(slice.into_inner(), len));
    }
    let (res, buf) = read_exact_at(file, Vec::with_capacity(len), offset).await;
    res?;
    Ok(Compressed::Heap(buf))
}

enum Compressed {
    Fixed(tokio_uring::buf::fixed::FixedBuf, usize),
    Heap(Vec<u8>),
}

impl Compressed {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Fixed(b, n) => b.get(..*n).unwrap_or_default(),
            Self::Heap(v) => v,
        }
    }
}

fn io_kind(e: &std::io::Error) -> FetchErrorKind {
    FetchErrorKind::Store(match e.kind() {
        std::io::ErrorKind::NotFound => StoreErrorKind::NotFound,
        std::io::ErrorKind::UnexpectedEof => StoreErrorKind::Truncated,
        _ => StoreErrorKind::Io,
    })
}

impl BuildFile {
    fn engine_error(&self, unit: &Unit, what: &str) -> Arc<FetchError> {
        self.error(unit, "engine", what.to_owned(), FetchErrorKind::Engine)
    }

    fn tier_name(&self) -> String {
        format!("{} (io_uring)", self.shared.store.url())
    }

    /// Fetches frame `index` from the local file at `path` (on an I/O worker).
    pub(crate) async fn fetch_frame_local(
        self: &Arc<Self>,
        index: usize,
        frame: Frame,
        compression: CompressionType,
        path: &Path,
    ) -> Result<(), Arc<FetchError>> {
        let unit = Unit::Frame { index, frame };
        let cache: &Arc<ChunkCache> = &self.cache;
        let Some(blocks) = cache.blocks_of(frame.start_u, u64::from(frame.size_u)) else {
            return Err(self.engine_error(&unit, "frame outside the cache"));
        };
        let deadline = Instant::now() + self.shared.config.fetch_deadline;
        let mut guard = loop {
            match cache.reserve_fill(blocks.clone()) {
                Ok(g) => break g,
                Err(e) if e.kind() == CacheErrorKind::AlreadyPresent => return Ok(()),
                Err(e) if e.kind() == CacheErrorKind::Busy && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => {
                    return Err(
                        self.engine_error(&unit, &format!("claiming the frame's blocks: {e}"))
                    );
                }
            }
        };
        super::bump(&self.shared.counters.store_requests, 1);
        let file = tokio_uring::fs::File::open(path).await.map_err(|e| {
            self.error(
                &unit,
                &self.tier_name(),
                format!("opening {}: {e}", path.display()),
                io_kind(&e),
            )
        })?;
        let len = usize::try_from(frame.size_c).unwrap_or(usize::MAX);
        let read = read_compressed(&file, frame.start_c, len).await;
        let _ = file.close().await;
        let compressed = read.map_err(|e| {
            self.error(
                &unit,
                &self.tier_name(),
                format!("reading the frame: {e}"),
                io_kind(&e),
            )
        })?;
        super::bump(&self.shared.counters.store_bytes, u64::from(frame.size_c));
        DECODER
            .with(|d| {
                d.borrow_mut()
                    .decode(compression, compressed.bytes(), guard.buf())
            })
            .map_err(|e| {
                self.error(
                    &unit,
                    &self.tier_name(),
                    e.to_string(),
                    FetchErrorKind::Corrupt,
                )
            })?;
        super::bump(&self.shared.counters.filled_bytes, u64::from(frame.size_u));
        guard.commit_all();
        Ok(())
    }

    /// One transfer of a chunk session from the local file at `path` (on an I/O worker):
    /// straight into the cache memory, continuing with the chunk's holes when it is the last
    /// transfer running.
    pub(crate) async fn run_chunk_local(
        self: &Arc<Self>,
        session: &Session,
        index: u64,
        run: u64,
        start: u64,
        path: &Path,
    ) {
        let unit = Unit::Chunk { index };
        let deadline = Instant::now() + self.shared.config.fetch_deadline;
        let file = match tokio_uring::fs::File::open(path).await {
            Ok(f) => f,
            Err(e) => {
                let err = self.error(
                    &unit,
                    &self.tier_name(),
                    format!("opening {}: {e}", path.display()),
                    io_kind(&e),
                );
                let _ = session.end_run(run, Err(err), start);
                return;
            }
        };
        let mut at = start;
        loop {
            let (result, stopped) = match self.local_pass(&file, session, run, at).await {
                Ok(stopped) if stopped == at && Instant::now() >= deadline => (
                    Err(self
                        .engine_error(&unit, "blocks held by another transfer past the deadline")),
                    at,
                ),
                Ok(stopped) if stopped == at => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    (Ok(()), stopped)
                }
                Ok(stopped) => (Ok(()), stopped),
                Err(e) => (Err(e), at),
            };
            match session.end_run(run, result, stopped) {
                Some(next) => at = next,
                None => break,
            }
        }
        let _ = file.close().await;
    }

    /// Claims the absent blocks from `at` up to the first present (or claimed) one and reads
    /// them: the first piece, then the rest. Returns where it stopped.
    async fn local_pass(
        self: &Arc<Self>,
        file: &tokio_uring::fs::File,
        session: &Session,
        run: u64,
        at: u64,
    ) -> Result<u64, Arc<FetchError>> {
        let cache: &Arc<ChunkCache> = &self.cache;
        let unit = session.unit;
        let bs = cache.block_size();
        let end = session.bytes.end;
        let Some(blocks) = cache.blocks_of(at, end.saturating_sub(at)) else {
            return Ok(at);
        };
        let limit = cache.first_present(blocks.clone()).unwrap_or(blocks.end);
        let claim = cache
            .reserve_fill(blocks.start..limit)
            .or_else(|_| cache.reserve_fill(blocks.start..blocks.start + 1));
        let Ok(guard) = claim else {
            return Ok(at);
        };
        let window = guard.uncommitted_bytes();
        let total = window.end - window.start;
        let first = FIRST_PIECE.max(bs).min(total);
        let mut guard = Some(guard);
        let mut pos = window.start;
        super::bump(&self.shared.counters.store_requests, 1);
        for piece in [first, total - first] {
            if piece == 0 {
                continue;
            }
            let Some(g) = guard.take() else { break };
            let n = usize::try_from(piece).unwrap_or(usize::MAX);
            let (res, back) = read_into_claim(file, cache, g, pos, n).await;
            guard = back;
            if let Err(e) = res {
                return Err(self.error(
                    &unit,
                    &self.tier_name(),
                    format!("reading [{pos}, +{piece}): {e}"),
                    io_kind(&e),
                ));
            }
            pos += piece;
            super::bump(&self.shared.counters.store_bytes, piece);
            super::bump(&self.shared.counters.filled_bytes, piece);
            session.set_cursor(run, pos);
        }
        drop(guard);
        Ok(pos)
    }
}

use super::FetchError;
