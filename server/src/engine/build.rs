//! One build's data of one file: where it is ([`DataSource`]), its [`ChunkCache`], and the
//! fetch sessions that fill it.
//!
//! # Fetch sessions
//!
//! A session is one fetch unit in flight: a frame (compressed data) or a 4 MiB chunk
//! (uncompressed). The process-wide [`SessionTable`] holds at most one session per unit, so
//! every reader of the unit (any connection, core or fault) shares one transfer. The table is
//! sharded by the unit's owner shard (a hash of build file and unit); it is touched only on a
//! miss, never on a hit.
//!
//! - **Frames** are fetched by one transfer: the cache directories first (a `.frm` file that
//!   does not decode is deleted and the next tier is tried), then the store, streamed through
//!   the [`StreamDecoder`] straight into the cache memory. The frame's blocks are committed (made
//!   visible) only after it decoded to its exact size with its checksum verified; then the
//!   compressed bytes are written back to the directory tiers.
//! - **Chunks** are fetched request-first: the first transfer starts at the first missing block
//!   the reader asked for and runs to the end of the chunk, committing blocks as they land.
//!   A later reader whose block is more than `join_window` bytes ahead of every running
//!   transfer starts another transfer at its block (up to `max_runs_per_chunk`); a transfer
//!   stops when it reaches blocks that are present or being filled by another one. When the
//!   last transfer stops, it fetches whatever the chunk still misses (wrapping around to the
//!   chunk's start). So bytes are transferred once, and a cold 4 KiB read waits for about one
//!   block after the first byte, not for half a chunk.
//!
//! A failed transfer fails the waiters whose blocks are not present, with an error naming the
//! build, unit and tier; nothing it did not verify is marked present; the session leaves the
//! table, so the next read starts a new one.
//!
//! [`StreamDecoder`]: thaw_codec::StreamDecoder

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::ops::{ControlFlow, Range};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use anyhow::bail;
use slab::Slab;
use thaw_codec::{CHUNK_SIZE, Frame, FrameTable, StreamDecoder};

use super::pool::Priority;
use super::{FetchError, FetchErrorKind, Shared, bump};
use crate::cache::{CacheErrorKind, ChunkCache, FillGuard};
use crate::layout::DataSource;
use crate::store::StoreErrorKind;
use crate::store::shared_cache::WriteOutcome;

/// A fetch unit: a frame index (compressed) or a chunk index (uncompressed).
type UnitKey = (u64, u64);

/// The process-wide table of fetch sessions, sharded by owner.
#[derive(Debug)]
pub(crate) struct SessionTable {
    shards: Vec<Mutex<Shard>>,
}

#[derive(Debug, Default)]
struct Shard {
    sessions: Slab<Arc<Session>>,
    index: HashMap<UnitKey, usize>,
}

impl SessionTable {
    pub(crate) fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
        }
    }

    /// The owner shard of a unit.
    fn shard(&self, key: UnitKey) -> MutexGuard<'_, Shard> {
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        let n = u64::try_from(self.shards.len()).unwrap_or(1);
        let i = usize::try_from(h.finish() % n).unwrap_or(0);
        // Nothing panics while a shard is locked except allocation failure (which aborts), so
        // a poisoned shard is still consistent.
        self.shards
            .get(i)
            .unwrap_or(&self.shards[0])
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a session for `key` is in flight.
    fn contains(&self, key: UnitKey) -> bool {
        self.shard(key).index.contains_key(&key)
    }

    /// Sessions in flight.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).index.len())
            .sum()
    }

    fn remove(&self, session: &Session) {
        let mut shard = self.shard(session.key);
        if let Some(&slot) = shard.index.get(&session.key)
            && shard
                .sessions
                .get(slot)
                .is_some_and(|s| std::ptr::eq(Arc::as_ptr(s), session))
        {
            shard.index.remove(&session.key);
            shard.sessions.remove(slot);
        }
    }
}

/// The fetch unit of a session.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Unit {
    Frame { index: usize, frame: Frame },
    Chunk { index: u64 },
}

/// One unit in flight.
#[derive(Debug)]
pub(crate) struct Session {
    key: UnitKey,
    file: Arc<BuildFile>,
    pub(crate) unit: Unit,
    /// Uncompressed byte range of the unit in the build's data (clamped to the cache size).
    pub(crate) bytes: Range<u64>,
    state: Mutex<State>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct State {
    failed: Option<Arc<FetchError>>,
    /// The session left the table (all transfers stopped).
    finished: bool,
    /// Transfers running or queued.
    active: usize,
    /// Next byte of each running transfer (for request-first joining).
    cursors: Vec<(u64, u64)>,
    /// The first transfer is looking the whole chunk up in the directory tiers: no other
    /// transfer may start (it would make the chunk partly claimed and the tier copy unusable).
    tier_lookup: bool,
    next_run: u64,
    /// Async waiters: (id, byte range wanted, waker).
    waiters: Vec<(u64, Range<u64>, Waker)>,
    next_waiter: u64,
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the waiters whose bytes are now present (all of them once the session failed or
    /// finished).
    ///
    /// Consumes the lock guard: wakers run after it is released, so a woken task may poll this
    /// session at once (on this thread, for [`LayeredFile::request`] callbacks).
    ///
    /// [`LayeredFile::request`]: super::LayeredFile::request
    fn notify(&self, mut state: MutexGuard<'_, State>) {
        let cache = &self.file.cache;
        let all = state.failed.is_some() || state.finished;
        let mut wake = Vec::new();
        state.waiters.retain(|(_, r, w)| {
            if all || cache.all_present(r.start, r.end - r.start) {
                wake.push(w.clone());
                false
            } else {
                true
            }
        });
        drop(state);
        self.cond.notify_all();
        for w in wake {
            w.wake();
        }
    }

    /// Where a reader of `want` stands: `Ready(Ok)` when present, `Ready(Err)` when the session
    /// failed (or finished without the bytes, which only a bug could cause).
    fn check(&self, state: &State, want: &Range<u64>) -> Option<Result<(), Arc<FetchError>>> {
        if self
            .file
            .cache
            .all_present(want.start, want.end - want.start)
        {
            return Some(Ok(()));
        }
        if let Some(e) = &state.failed {
            return Some(Err(Arc::clone(e)));
        }
        if state.finished {
            return Some(Err(self.file.error(
                &self.unit,
                "engine",
                "the fetch ended without these blocks".into(),
                FetchErrorKind::Engine,
            )));
        }
        None
    }

    /// Blocks until `want` is present or the session failed, at most until `deadline`.
    fn wait_blocking(&self, want: &Range<u64>, deadline: Instant) -> Result<(), Arc<FetchError>> {
        let mut state = self.lock();
        loop {
            if let Some(r) = self.check(&state, want) {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.expire(state));
            }
            state = self
                .cond
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The reader's deadline passed: fail the session (its waiters and the stalled transfer's
    /// result) so the next read starts afresh.
    fn expire(&self, mut state: MutexGuard<'_, State>) -> Arc<FetchError> {
        let err = self.file.error(
            &self.unit,
            "deadline",
            format!(
                "no data within the fetch deadline of {:?}",
                self.file.shared.config.fetch_deadline
            ),
            FetchErrorKind::Deadline,
        );
        if state.failed.is_none() {
            state.failed = Some(Arc::clone(&err));
            bump(&self.file.shared.counters.fetch_errors, 1);
        }
        // Leave the table now: a stalled transfer may take long to return.
        self.file.shared.table.remove(self);
        self.notify(state);
        err
    }

    fn poll_wait(
        &self,
        want: &Range<u64>,
        id: &mut Option<u64>,
        cx: &Context<'_>,
    ) -> Poll<Result<(), Arc<FetchError>>> {
        let mut state = self.lock();
        if let Some(r) = self.check(&state, want) {
            if let Some(id) = id.take() {
                state.waiters.retain(|(i, _, _)| *i != id);
            }
            return Poll::Ready(r);
        }
        match *id {
            Some(i) => {
                if let Some(w) = state.waiters.iter_mut().find(|(x, _, _)| *x == i) {
                    w.2.clone_from(cx.waker());
                } else {
                    state.waiters.push((i, want.clone(), cx.waker().clone()));
                }
            }
            None => {
                let i = state.next_waiter;
                state.next_waiter += 1;
                *id = Some(i);
                state.waiters.push((i, want.clone(), cx.waker().clone()));
            }
        }
        Poll::Pending
    }

    /// Records the end of one transfer; returns where to continue if this was the last running
    /// transfer and the chunk still misses blocks (the caller continues as a new transfer).
    /// When `hold` is set and this last transfer completed the unit, the session stays in the
    /// table (so the unit is not fetched again meanwhile) until [`leave`](Self::leave).
    pub(crate) fn end_run(
        &self,
        run: u64,
        result: Result<(), Arc<FetchError>>,
        stopped_at: u64,
    ) -> Option<u64> {
        self.end_run_with(run, result, stopped_at, false).0
    }

    /// Like [`end_run`](Self::end_run); the second value says the session completed and is
    /// held (only with `hold`): call [`leave`](Self::leave) after the write-back.
    fn end_run_with(
        &self,
        run: u64,
        result: Result<(), Arc<FetchError>>,
        stopped_at: u64,
        hold: bool,
    ) -> (Option<u64>, bool) {
        let mut state = self.lock();
        if let Err(e) = result
            && state.failed.is_none()
        {
            bump(&self.file.shared.counters.fetch_errors, 1);
            tracing::warn!(error = %e, "fetch failed");
            state.failed = Some(e);
            // Leave the table now: the next read starts afresh while the other transfers of
            // this session (if any) notice the failure and stop.
            self.file.shared.table.remove(self);
        }
        let mut next = None;
        if state.active == 1 && state.failed.is_none() && !state.finished {
            next = self.file.next_missing(&self.bytes, stopped_at);
        }
        match next {
            Some(at) => {
                if let Some(c) = state.cursors.iter_mut().find(|(r, _)| *r == run) {
                    c.1 = at;
                }
            }
            None => {
                if hold && state.active == 1 && state.failed.is_none() && !state.finished {
                    self.notify(state);
                    return (None, true);
                }
                state.cursors.retain(|(r, _)| *r != run);
                state.active = state.active.saturating_sub(1);
                if state.active == 0 && !state.finished {
                    state.finished = true;
                    self.file.shared.table.remove(self);
                }
            }
        }
        self.notify(state);
        (next, false)
    }

    /// Ends a session held by [`end_run_with`](Self::end_run_with).
    fn leave(&self) {
        let mut state = self.lock();
        state.cursors.clear();
        state.active = 0;
        if !state.finished {
            state.finished = true;
            self.file.shared.table.remove(self);
        }
        self.notify(state);
    }

    pub(crate) fn set_cursor(&self, run: u64, at: u64) {
        let mut state = self.lock();
        if let Some(c) = state.cursors.iter_mut().find(|(r, _)| *r == run) {
            c.1 = at;
        }
        self.notify(state);
    }

    fn is_failed(&self) -> bool {
        self.lock().failed.is_some()
    }
}

/// Runs a session's transfer on a fetch thread; if the job is dropped unrun (engine shutdown),
/// the session fails instead of leaving its waiters hanging.
struct Ticket {
    session: Arc<Session>,
    run: u64,
    start: u64,
    used: AtomicBool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.used.load(std::sync::atomic::Ordering::Relaxed) {
            let err = self.session.file.error(
                &self.session.unit,
                "engine",
                "the engine shut down before the fetch ran".into(),
                FetchErrorKind::Engine,
            );
            let _ = self.session.end_run(self.run, Err(err), self.start);
        }
    }
}

thread_local! {
    static DECODER: RefCell<StreamDecoder> = RefCell::new(StreamDecoder::new());
}

/// One build's data of one file, with its cache. Shared by every [`super::LayeredFile`] that
/// references the build.
pub struct BuildFile {
    pub(crate) shared: Arc<Shared>,
    id: u64,
    source: DataSource,
    /// The frame table: the union of the (possibly trimmed) tables of every header that
    /// referenced the build. Read on misses only.
    frames: RwLock<FrameTable>,
    pub(crate) cache: Arc<ChunkCache>,
    /// The data object's local file, when the store is a local directory read with io_uring.
    local_path: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for BuildFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildFile")
            .field("id", &self.id)
            .field("build", &self.source.build)
            .field("file", &self.source.file)
            .field("object", &self.source.object)
            .field("size", &self.cache.size())
            .field("present_blocks", &self.cache.present_count())
            .finish()
    }
}

impl BuildFile {
    pub(crate) fn new(
        shared: Arc<Shared>,
        id: u64,
        source: DataSource,
        block_size: u64,
    ) -> anyhow::Result<Self> {
        let frames_end = source.frames.frames().last().map_or(0, Frame::end_u);
        let size = source.size.unwrap_or(0).max(frames_end);
        let cache = ChunkCache::new(size, block_size).map_err(|e| {
            anyhow::anyhow!(
                "cache for build {} ({}), {size} bytes in {block_size}-byte blocks: {e}",
                source.build,
                source.file
            )
        })?;
        let local_path = if shared.uring.is_some() && shared.tiers.is_empty() {
            shared.store.local_path(&source.object)
        } else {
            None
        };
        Ok(Self {
            shared,
            id,
            frames: RwLock::new(source.frames.clone()),
            source,
            cache: Arc::new(cache),
            local_path,
        })
    }

    /// The data source (object, codec, size).
    pub fn source(&self) -> &DataSource {
        &self.source
    }

    /// The cache.
    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// Adds frames another header's (trimmed) table knows and ours does not.
    pub(crate) fn merge_source(&self, other: &DataSource) -> anyhow::Result<()> {
        if other.object != self.source.object {
            bail!(
                "build {} ({}) is referenced as {} and as {}",
                self.source.build,
                self.source.file,
                self.source.object,
                other.object
            );
        }
        if !other.frames.is_compressed() {
            return Ok(());
        }
        let mut frames = self.frames.write().unwrap_or_else(PoisonError::into_inner);
        let known = frames.frames();
        let missing: Vec<Frame> = other
            .frames
            .frames()
            .iter()
            .filter(|f| !known.iter().any(|k| k.start_u == f.start_u))
            .copied()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut all: Vec<Frame> = known.iter().copied().chain(missing).collect();
        all.sort_by_key(|f| f.start_u);
        if all.last().map_or(0, Frame::end_u) > self.cache.size() {
            bail!(
                "build {} ({}): a frame table reaches past the cached size {}",
                self.source.build,
                self.source.file,
                self.cache.size()
            );
        }
        *frames = FrameTable::new(frames.compression(), all)?;
        Ok(())
    }

    pub(crate) fn error(
        &self,
        unit: &Unit,
        tier: &str,
        cause: String,
        kind: FetchErrorKind,
    ) -> Arc<FetchError> {
        let what = match unit {
            Unit::Frame { index, frame } => format!(
                "frame {index} (C offset {}, {} bytes; U offset {}, {} bytes) of {}",
                frame.start_c,
                u64::from(frame.size_c),
                frame.start_u,
                u64::from(frame.size_u),
                self.source.object
            ),
            Unit::Chunk { index } => format!("chunk {index} of {}", self.source.object),
        };
        Arc::new(FetchError {
            build: self.source.build,
            file: self.source.file,
            what,
            tier: tier.to_owned(),
            cause,
            kind,
        })
    }

    /// The unit holding uncompressed byte `offset`, with its byte range.
    fn unit_at(&self, offset: u64) -> Result<(Unit, Range<u64>), Arc<FetchError>> {
        let size = self.cache.size();
        let frames = self.frames.read().unwrap_or_else(PoisonError::into_inner);
        if frames.is_compressed() {
            let Some(index) = frames.locate(offset) else {
                return Err(self.error(
                    &Unit::Chunk {
                        index: offset / CHUNK_SIZE,
                    },
                    "engine",
                    format!("offset {offset} is in no frame of the table"),
                    FetchErrorKind::Corrupt,
                ));
            };
            let frame = frames.frames()[index];
            Ok((
                Unit::Frame { index, frame },
                frame.start_u..frame.end_u().min(size),
            ))
        } else {
            let index = offset / CHUNK_SIZE;
            let start = index * CHUNK_SIZE;
            Ok((Unit::Chunk { index }, start..(start + CHUNK_SIZE).min(size)))
        }
    }

    fn unit_key(&self, unit: &Unit) -> UnitKey {
        match unit {
            Unit::Frame { index, .. } => (self.id, u64::try_from(*index).unwrap_or(u64::MAX)),
            Unit::Chunk { index } => (self.id, *index),
        }
    }

    /// The first missing byte (block-aligned) of `chunk` at or after `from`, wrapping around.
    fn next_missing(&self, chunk: &Range<u64>, from: u64) -> Option<u64> {
        let bs = self.cache.block_size();
        let blocks = self.cache.blocks_of(chunk.start, chunk.end - chunk.start)?;
        let at = (from / bs).clamp(blocks.start, blocks.end);
        self.cache
            .first_missing(at..blocks.end)
            .or_else(|| self.cache.first_missing(blocks.start..at))
            .map(|b| b * bs)
    }

    /// Starts (or joins) the fetches that make `offset..offset + len` present. Returns the
    /// sessions to wait for with the byte range wanted from each.
    pub(crate) fn start(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        priority: Priority,
    ) -> Result<Waits, Arc<FetchError>> {
        let end = offset.saturating_add(len).min(self.cache.size());
        let mut waits = Vec::new();
        let mut pos = offset;
        let mut last_miss: Option<Range<u64>> = None;
        while pos < end {
            let (unit, bytes) = self.unit_at(pos)?;
            let want = pos..end.min(bytes.end);
            pos = want.end.max(pos + 1);
            if self.cache.all_present(want.start, want.end - want.start) {
                continue;
            }
            if let Some(session) = self.session_for(unit, bytes.clone(), &want, priority) {
                waits.push((session, want));
                last_miss = Some(bytes);
            }
        }
        if priority == Priority::Demand
            && let Some(missed) = last_miss
        {
            self.read_ahead(&missed);
        }
        Ok(waits)
    }

    /// Sequential read-ahead: when a demand miss on a unit follows its predecessor (present or
    /// in flight), the next `readahead_units` units are fetched at prefetch priority, so a
    /// sequential reader keeps several transfers in flight instead of paying one time to
    /// first byte per frame. Random access (the predecessor absent) triggers nothing.
    fn read_ahead(self: &Arc<Self>, missed: &Range<u64>) {
        let units = self.shared.config.readahead_units;
        if units == 0 || missed.start == 0 {
            return;
        }
        let Ok((prev_unit, prev)) = self.unit_at(missed.start - 1) else {
            return;
        };
        let sequential = self.cache.all_present(prev.start, prev.end - prev.start)
            || self.shared.table.contains(self.unit_key(&prev_unit));
        if !sequential {
            return;
        }
        let mut next = missed.end;
        for _ in 0..units {
            if next >= self.cache.size() {
                break;
            }
            let Ok((unit, bytes)) = self.unit_at(next) else {
                break;
            };
            if !self.cache.all_present(bytes.start, bytes.end - bytes.start)
                && !self.shared.table.contains(self.unit_key(&unit))
            {
                let _ = self.session_for(unit, bytes.clone(), &bytes, Priority::Prefetch);
                bump(&self.shared.counters.readahead, 1);
            }
            next = bytes.end;
        }
    }

    /// The session of `unit`, creating it (and starting its transfer) if needed.
    fn session_for(
        self: &Arc<Self>,
        unit: Unit,
        bytes: Range<u64>,
        want: &Range<u64>,
        priority: Priority,
    ) -> Option<Arc<Session>> {
        let key = self.unit_key(&unit);
        let counters = &self.shared.counters;
        let mut shard = self.shared.table.shard(key);
        if let Some(&slot) = shard.index.get(&key)
            && let Some(existing) = shard.sessions.get(slot)
        {
            let session = Arc::clone(existing);
            drop(shard);
            bump(&counters.joined, 1);
            if matches!(unit, Unit::Chunk { .. }) {
                self.maybe_add_run(&session, want, priority);
            }
            return Some(session);
        }
        // Re-check under the shard lock: a session that just finished marked everything
        // present before leaving the table.
        if self.cache.all_present(want.start, want.end - want.start) {
            return None;
        }
        let start = match unit {
            Unit::Frame { .. } => bytes.start,
            Unit::Chunk { .. } => self.next_missing(&bytes, want.start).unwrap_or(want.start),
        };
        let session = Arc::new(Session {
            key,
            file: Arc::clone(self),
            unit,
            bytes,
            state: Mutex::new(State {
                active: 1,
                cursors: vec![(0, start)],
                tier_lookup: matches!(unit, Unit::Chunk { .. }) && !self.shared.tiers.is_empty(),
                next_run: 1,
                ..State::default()
            }),
            cond: Condvar::new(),
        });
        let slot = shard.sessions.insert(Arc::clone(&session));
        shard.index.insert(key, slot);
        drop(shard);
        bump(&counters.sessions, 1);
        self.submit(&session, 0, start, priority);
        Some(session)
    }

    /// Request-first joining: starts another transfer of the chunk at the reader's first
    /// missing block unless a running one will reach it within the join window.
    fn maybe_add_run(
        self: &Arc<Self>,
        session: &Arc<Session>,
        want: &Range<u64>,
        priority: Priority,
    ) {
        let config = &self.shared.config;
        let Some(blocks) = self.cache.blocks_of(want.start, want.end - want.start) else {
            return;
        };
        let Some(block) = self.cache.first_missing(blocks) else {
            return;
        };
        let at = block * self.cache.block_size();
        let mut state = session.lock();
        if state.failed.is_some()
            || state.finished
            || state.tier_lookup
            || state.active >= config.max_runs_per_chunk
        {
            return;
        }
        let bs = self.cache.block_size();
        let soon = state
            .cursors
            .iter()
            .any(|&(_, c)| c <= at.saturating_add(bs) && at < c.saturating_add(config.join_window));
        if soon {
            return;
        }
        let run = state.next_run;
        state.next_run += 1;
        state.active += 1;
        state.cursors.push((run, at));
        drop(state);
        self.submit(session, run, at, priority);
    }

    fn submit(self: &Arc<Self>, session: &Arc<Session>, run: u64, start: u64, priority: Priority) {
        let ticket = Ticket {
            session: Arc::clone(session),
            run,
            start,
            used: AtomicBool::new(false),
        };
        if let (Some(path), Some(workers)) = (&self.local_path, &self.shared.uring) {
            // Local store: the unit's owner core reads it with io_uring. A refused task is
            // dropped with its ticket, which fails the session.
            let core = owner(session.key, workers.workers());
            let (file, path) = (Arc::clone(self), path.clone());
            let compression = self.compression();
            let _ = workers.spawn_on(core, move || async move {
                let ticket = ticket;
                ticket
                    .used
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let session = &ticket.session;
                match session.unit {
                    Unit::Frame { index, frame } => {
                        let res = file
                            .fetch_frame_local(index, frame, compression, &path)
                            .await;
                        let _ = session.end_run(ticket.run, res, session.bytes.end);
                    }
                    Unit::Chunk { index } => {
                        file.run_chunk_local(session, index, ticket.run, ticket.start, &path)
                            .await;
                    }
                }
            });
            return;
        }
        let job = Box::new(move || {
            ticket
                .used
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let session = &ticket.session;
            match session.unit {
                Unit::Frame { index, frame } => {
                    let res = session.file.fetch_frame(session, index, frame);
                    let _ = session.end_run(ticket.run, res, session.bytes.end);
                }
                Unit::Chunk { index } => {
                    session
                        .file
                        .run_chunk(session, index, ticket.run, ticket.start)
                }
            }
        });
        // A refused job is dropped, and its ticket fails the session.
        let _ = self.shared.pool.submit(priority, job);
    }

    /// The codec of the data object.
    fn compression(&self) -> thaw_codec::CompressionType {
        self.frames
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .compression()
    }

    // ---- compressed frames ------------------------------------------------------------------

    fn fetch_frame(
        &self,
        session: &Session,
        index: usize,
        frame: Frame,
    ) -> Result<(), Arc<FetchError>> {
        let unit = Unit::Frame { index, frame };
        let blocks = self
            .cache
            .blocks_of(frame.start_u, u64::from(frame.size_u))
            .ok_or_else(|| {
                self.error(
                    &unit,
                    "engine",
                    "frame outside the cache".into(),
                    FetchErrorKind::Engine,
                )
            })?;
        let deadline = Instant::now() + self.shared.config.fetch_deadline;
        let mut guard = loop {
            match self.cache.reserve_fill(blocks.clone()) {
                Ok(g) => break g,
                // Frames commit all at once: one present block means the frame is present.
                Err(e) if e.kind() == CacheErrorKind::AlreadyPresent => return Ok(()),
                // A transfer of an abandoned (failed) session still holds the frame: it stops
                // at its next piece.
                Err(e) if e.kind() == CacheErrorKind::Busy && Instant::now() < deadline => {
                    std::thread::sleep(BUSY_RETRY);
                }
                Err(e) => {
                    return Err(self.error(
                        &unit,
                        "engine",
                        format!("claiming the frame's blocks: {e}"),
                        FetchErrorKind::Engine,
                    ));
                }
            }
        };
        let compression = self
            .frames
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .compression();
        let counters = &self.shared.counters;
        let object = &self.source.object;
        // Directory tiers first.
        for (i, tier) in self.shared.tiers.iter().enumerate() {
            match tier
                .cache
                .get_frame(object, frame.start_c, u64::from(frame.size_c))
            {
                Ok(Some(bytes)) => {
                    let res = DECODER.with(|d| {
                        let mut d = d.borrow_mut();
                        d.begin(compression);
                        d.feed(&bytes, guard.buf())
                            .and_then(|()| d.finish(guard.buf()))
                    });
                    match res {
                        Ok(()) => {
                            bump(&counters.filled_bytes, u64::from(frame.size_u));
                            guard.commit_all();
                            bump(
                                if tier.name == "cache-dir" {
                                    &counters.cache_dir_hits
                                } else {
                                    &counters.shared_cache_hits
                                },
                                1,
                            );
                            self.write_back_frame(&self.shared.tiers[..i], frame, &bytes);
                            return Ok(());
                        }
                        Err(e) => {
                            bump(&counters.tier_evictions, 1);
                            tracing::warn!(tier = tier.name, object = %object, frame = index, error = %e,
                                "cached frame does not decode: deleted, falling through");
                            let _ = tier.cache.evict_frame(
                                object,
                                frame.start_c,
                                u64::from(frame.size_c),
                            );
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(tier = tier.name, error = %e, "directory cache read failed, falling through");
                }
            }
        }
        // The store, decoded while it streams.
        let store = &self.shared.store;
        let keep_copy = !self.shared.tiers.is_empty();
        let mut copy = Vec::new();
        if keep_copy {
            copy.reserve_exact(usize::try_from(u64::from(frame.size_c)).unwrap_or(0));
        }
        let mut attempt = 0;
        loop {
            let mut failure: Option<(String, FetchErrorKind)> = None;
            copy.clear();
            bump(&counters.store_requests, 1);
            let res = DECODER.with(|d| {
                let mut d = d.borrow_mut();
                d.begin(compression);
                let streamed = store.read_stream(
                    object,
                    frame.start_c,
                    u64::from(frame.size_c),
                    &mut |piece| {
                        bump(&counters.store_bytes, piece.len() as u64);
                        if keep_copy {
                            copy.extend_from_slice(piece);
                        }
                        if let Err(e) = d.feed(piece, guard.buf()) {
                            failure = Some((e.to_string(), FetchErrorKind::Corrupt));
                            return ControlFlow::Break(());
                        }
                        if Instant::now() > deadline {
                            failure = Some((deadline_msg(&self.shared), FetchErrorKind::Deadline));
                            return ControlFlow::Break(());
                        }
                        if session.is_failed() {
                            failure =
                                Some(("the fetch was abandoned".into(), FetchErrorKind::Deadline));
                            return ControlFlow::Break(());
                        }
                        ControlFlow::Continue(())
                    },
                );
                match streamed {
                    Err(e) => Err((e.to_string(), FetchErrorKind::Store(e.kind()))),
                    Ok(_) if failure.is_some() => Err(failure
                        .take()
                        .unwrap_or_else(|| ("transfer stopped".into(), FetchErrorKind::Engine))),
                    Ok(n) if n != u64::from(frame.size_c) => Err((
                        format!(
                            "the store delivered {n} of {} bytes",
                            u64::from(frame.size_c)
                        ),
                        FetchErrorKind::Store(crate::store::StoreErrorKind::Truncated),
                    )),
                    Ok(_) => d
                        .finish(guard.buf())
                        .map_err(|e| (e.to_string(), FetchErrorKind::Corrupt)),
                }
            });
            match res {
                Ok(()) => {
                    bump(&counters.filled_bytes, u64::from(frame.size_u));
                    guard.commit_all();
                    if keep_copy {
                        self.write_back_frame(&self.shared.tiers, frame, &copy);
                    }
                    return Ok(());
                }
                Err((cause, kind)) => {
                    let e = self.error(&unit, &store.url(), cause, kind);
                    if session.is_failed() || !self.backoff(&e, &mut attempt, deadline) {
                        // The guard drops: the frame's blocks stay absent.
                        return Err(e);
                    }
                }
            }
        }
    }

    fn write_back_frame(&self, tiers: &[super::Tier], frame: Frame, bytes: &[u8]) {
        for tier in tiers {
            match tier
                .cache
                .put_frame(&self.source.object, frame.start_c, bytes)
            {
                Ok(WriteOutcome::Written) => bump(&self.shared.counters.writebacks, 1),
                Ok(_) => {}
                Err(e) => tracing::warn!(tier = tier.name, error = %e, "frame write-back failed"),
            }
        }
    }

    // ---- uncompressed chunks ------------------------------------------------------------------

    /// One transfer of a chunk session, continuing with the chunk's remaining holes when it is
    /// the last one running.
    fn run_chunk(&self, session: &Session, index: u64, run: u64, start: u64) {
        let unit = Unit::Chunk { index };
        let mut at = start;
        let mut first = true;
        let deadline = Instant::now() + self.shared.config.fetch_deadline;
        loop {
            let res = if first && run == 0 {
                first = false;
                let from_tier = self.chunk_from_tiers(session, index);
                session.lock().tier_lookup = false;
                match from_tier {
                    Some(r) => r.map(|()| session.bytes.end),
                    None => self.stream_chunk_retrying(session, &unit, run, at, deadline),
                }
            } else {
                self.stream_chunk_retrying(session, &unit, run, at, deadline)
            };
            let (result, stopped) = match res {
                // No progress: the block is held by a transfer of an abandoned session, which
                // stops at its next piece. Retry shortly, within the deadline.
                Ok(stopped) if stopped == at && Instant::now() >= deadline => (
                    Err(self.error(
                        &unit,
                        "engine",
                        "blocks held by another transfer past the deadline".into(),
                        FetchErrorKind::Deadline,
                    )),
                    at,
                ),
                Ok(stopped) if stopped == at => {
                    std::thread::sleep(BUSY_RETRY);
                    (Ok(()), stopped)
                }
                Ok(stopped) => (Ok(()), stopped),
                Err(e) => (Err(e), at),
            };
            match session.end_run_with(run, result, stopped, true) {
                (Some(next), _) => at = next,
                (None, false) => return,
                (None, true) => break,
            }
        }
        // The chunk is complete (and this session still owns it): write it back to the
        // directory tiers, then leave the table.
        if !self.shared.tiers.is_empty()
            && let Some(bytes) = self.cache.get(
                session.bytes.start,
                usize::try_from(session.bytes.end - session.bytes.start).unwrap_or(0),
            )
        {
            for tier in &self.shared.tiers {
                match tier
                    .cache
                    .put_chunk(&self.source.object, index, CHUNK_SIZE, bytes)
                {
                    Ok(WriteOutcome::Written) => bump(&self.shared.counters.writebacks, 1),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(tier = tier.name, error = %e, "chunk write-back failed")
                    }
                }
            }
        }
        session.leave();
    }

    /// The whole chunk from a directory tier, if one has it (only when nothing of it is present
    /// or claimed yet). `None`: no tier has it.
    fn chunk_from_tiers(
        &self,
        session: &Session,
        index: u64,
    ) -> Option<Result<(), Arc<FetchError>>> {
        if self.shared.tiers.is_empty() {
            return None;
        }
        let bytes = &session.bytes;
        let len = bytes.end - bytes.start;
        let blocks = self.cache.blocks_of(bytes.start, len)?;
        let counters = &self.shared.counters;
        for tier in &self.shared.tiers {
            match tier
                .cache
                .get_chunk(&self.source.object, index, CHUNK_SIZE, len)
            {
                Ok(Some(data)) => {
                    let Ok(mut guard) = self.cache.reserve_fill(blocks) else {
                        return None;
                    };
                    let dst = guard.buf();
                    if dst.len() != data.len() {
                        return None;
                    }
                    dst.copy_from_slice(&data);
                    guard.commit_all();
                    bump(&counters.filled_bytes, len);
                    bump(
                        if tier.name == "cache-dir" {
                            &counters.cache_dir_hits
                        } else {
                            &counters.shared_cache_hits
                        },
                        1,
                    );
                    return Some(Ok(()));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(tier = tier.name, error = %e, "directory cache read failed, falling through")
                }
            }
        }
        None
    }

    /// [`stream_chunk`](Self::stream_chunk), retrying transient store failures from where the
    /// transfer stopped (full-jitter backoff, within the retry budget and the deadline).
    fn stream_chunk_retrying(
        &self,
        session: &Session,
        unit: &Unit,
        run: u64,
        at: u64,
        deadline: Instant,
    ) -> Result<u64, Arc<FetchError>> {
        let mut at = at;
        let mut attempt = 0;
        loop {
            match self.stream_chunk(session, unit, run, at) {
                Ok(stopped) => return Ok(stopped),
                Err((e, reached)) => {
                    if !self.backoff(&e, &mut attempt, deadline) || session.is_failed() {
                        return Err(e);
                    }
                    at = reached;
                }
            }
        }
    }

    /// Whether to retry after `e` (transient store errors and undecodable bytes, within the
    /// retry budget and with time left before `deadline`); sleeps the backoff if so.
    fn backoff(&self, e: &FetchError, attempt: &mut u32, deadline: Instant) -> bool {
        let config = &self.shared.config;
        let transient = matches!(
            e.kind,
            FetchErrorKind::Corrupt
                | FetchErrorKind::Store(StoreErrorKind::Io | StoreErrorKind::Truncated)
        );
        if !transient || *attempt >= config.retries {
            return false;
        }
        *attempt += 1;
        let cap = config
            .retry_base
            .saturating_mul(1u32 << (*attempt - 1).min(16));
        let sleep = cap.mul_f64(rand::random::<f64>());
        if Instant::now() + sleep >= deadline {
            return false;
        }
        bump(&self.shared.counters.retries, 1);
        tracing::info!(error = %e, attempt = *attempt, "retrying fetch");
        std::thread::sleep(sleep);
        true
    }

    /// Streams the chunk from byte `at` to its end, committing blocks as they land; stops at
    /// blocks that are present or claimed by another transfer. Returns where it stopped.
    fn stream_chunk(
        &self,
        session: &Session,
        unit: &Unit,
        run: u64,
        at: u64,
    ) -> Result<u64, (Arc<FetchError>, u64)> {
        let store = &self.shared.store;
        let counters = &self.shared.counters;
        let end = session.bytes.end;
        let bs = self.cache.block_size();
        let deadline = Instant::now() + self.shared.config.fetch_deadline;
        let mut pos = at;
        let mut guard: Option<FillGuard<'_>> = None;
        let mut failure: Option<(String, FetchErrorKind)> = None;
        bump(&counters.store_requests, 1);
        let streamed = store.read_stream(
            &self.source.object,
            at,
            end.saturating_sub(at),
            &mut |mut piece| {
                bump(&counters.store_bytes, piece.len() as u64);
                let mut committed = false;
                while !piece.is_empty() {
                    if guard.is_none() {
                        let first = pos / bs;
                        let want = self
                            .cache
                            .blocks_of(pos, (piece.len() as u64).min(end - pos))
                            .map_or(first..first + 1, |b| first..b.end.max(first + 1));
                        guard = self
                            .cache
                            .reserve_fill(want)
                            .or_else(|_| self.cache.reserve_fill(first..first + 1))
                            .ok();
                        if guard.is_none() {
                            // Present or being filled by another transfer: this one is done.
                            if committed {
                                session.set_cursor(run, pos);
                            }
                            return ControlFlow::Break(());
                        }
                    }
                    let Some(g) = guard.as_mut() else {
                        return ControlFlow::Break(());
                    };
                    let base = g.uncommitted_bytes().start;
                    let off = usize::try_from(pos - base).unwrap_or(usize::MAX);
                    let buf = g.buf();
                    let room = buf.len().saturating_sub(off);
                    let n = room.min(piece.len());
                    if n == 0 {
                        failure = Some((
                            "internal: fill position outside its claim".into(),
                            FetchErrorKind::Engine,
                        ));
                        return ControlFlow::Break(());
                    }
                    buf[off..off + n].copy_from_slice(&piece[..n]);
                    piece = &piece[n..];
                    pos += n as u64;
                    let done = pos - base;
                    let full = if n == room {
                        g.uncommitted().end - g.uncommitted().start
                    } else {
                        done / bs
                    };
                    if full > 0 && g.commit(full).is_ok() {
                        bump(&counters.filled_bytes, full * bs);
                        committed = true;
                    }
                    if g.uncommitted().is_empty() {
                        guard = None;
                    }
                }
                if committed {
                    session.set_cursor(run, pos);
                }
                if Instant::now() > deadline {
                    failure = Some((deadline_msg(&self.shared), FetchErrorKind::Deadline));
                    return ControlFlow::Break(());
                }
                if session.is_failed() {
                    return ControlFlow::Break(());
                }
                ControlFlow::Continue(())
            },
        );
        drop(guard);
        // A partly written block was not committed: a retry starts at its beginning.
        let reached = pos - pos % bs;
        if let Some((cause, kind)) = failure {
            return Err((self.error(unit, &store.url(), cause, kind), reached));
        }
        match streamed {
            Ok(_) => Ok(pos),
            Err(e) => Err((
                self.error(
                    unit,
                    &store.url(),
                    e.to_string(),
                    FetchErrorKind::Store(e.kind()),
                ),
                reached,
            )),
        }
    }
}

/// The owner core of a unit among `n` workers.
fn owner(key: UnitKey, n: usize) -> usize {
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    let n64 = u64::try_from(n.max(1)).unwrap_or(1);
    usize::try_from(h.finish() % n64).unwrap_or(0)
}

/// What a reader waits for: sessions and the byte range wanted from each.
pub(crate) type Waits = Vec<(Arc<Session>, Range<u64>)>;

/// Pause before claiming blocks again that a stopping transfer still holds.
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_millis(1);

fn deadline_msg(shared: &Shared) -> String {
    format!(
        "the transfer exceeded the fetch deadline of {:?}",
        shared.config.fetch_deadline
    )
}

/// Waits for every `(session, range)`: blocking.
pub(crate) fn wait_all_blocking(
    waits: &[(Arc<Session>, Range<u64>)],
    deadline: Instant,
) -> Result<(), Arc<FetchError>> {
    for (session, want) in waits {
        session.wait_blocking(want, deadline)?;
    }
    Ok(())
}

/// Waits for every `(session, range)`: async (any executor; wakes come from fetch threads).
pub(crate) async fn wait_all(
    waits: Vec<(Arc<Session>, Range<u64>)>,
    deadline: Instant,
) -> Result<(), Arc<FetchError>> {
    for (session, want) in waits {
        let wait = SessionWait {
            session: &session,
            want: &want,
            id: None,
        };
        let now = Instant::now();
        let left = deadline.saturating_duration_since(now);
        match tokio::time::timeout(left, wait).await {
            Ok(r) => r?,
            Err(_) => {
                let state = session.lock();
                if let Some(r) = session.check(&state, &want) {
                    r?;
                } else {
                    return Err(session.expire(state));
                }
            }
        }
    }
    Ok(())
}

/// Waits for every `(session, range)` without a timer (for callers outside a tokio runtime):
/// the transfers' own deadlines bound the wait.
pub(crate) async fn wait_all_untimed(waits: Waits) -> Result<(), Arc<FetchError>> {
    for (session, want) in waits {
        SessionWait {
            session: &session,
            want: &want,
            id: None,
        }
        .await?;
    }
    Ok(())
}

struct SessionWait<'a> {
    session: &'a Session,
    want: &'a Range<u64>,
    id: Option<u64>,
}

impl std::future::Future for SessionWait<'_> {
    type Output = Result<(), Arc<FetchError>>;
    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        this.session.poll_wait(this.want, &mut this.id, cx)
    }
}

impl Drop for SessionWait<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.session.lock().waiters.retain(|(i, _, _)| *i != id);
        }
    }
}
