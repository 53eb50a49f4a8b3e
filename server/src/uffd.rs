//! The UFFD memory handler over the engine: [`EngineSource`] answers `thaw-uffd`'s page lookups
//! and fetches from a [`LayeredFile`] (the memfile), and [`serve_uffd`] runs one VM's handler:
//! handshake, fault loop, optional prefetch, summary.
//!
//! ```text
//! fault (4 KiB or 2 MiB page)
//!   one header mapping:  nil -> Zero (ZEROPAGE / zero buffer)
//!                        present -> Ready(pointer into the build's cache memory): UFFDIO_COPY
//!                                   straight from the cache, no copy in this process
//!   several mappings (a 2 MiB page over up to 512 4 KiB mappings):
//!                        all nil -> Zero; all present -> Owned(aligned staging page assembled
//!                        from the pieces, alive until the copy is done)
//!   anything missing  -> Missing: LayeredFile::request (non-blocking; completion on a fetch
//!                        thread, which installs the page)
//! ```
//!
//! Prefetch (`prefetch.memory` of the build's `metadata.json`, e2b's recorded first-touch
//! order): worker threads warm each page in the engine at prefetch priority (demand transfers go
//! first in the fetch pool; a frame wanted by both is fetched once), then *prefault* it with
//! [`thaw_uffd::Prefaulter`]: installed only if the guest has not touched it yet, claimed in the
//! handler's page state before the copy, so each page is written into the guest once. Ahead of
//! them, the plan's distinct 2 MiB regions are warmed in plan order, as many at once as there
//! are workers: pages of one frame are recorded together, so page-by-page workers alone would
//! all wait on the same frame and fetch frames one at a time.

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use thaw_codec::{BuildId, FileKind};
use thaw_uffd::{
    Exit, FaultHandler, FetchDone, FetchError, HandlerConfig, HandshakeConfig, Lookup,
    MetricsSnapshot, PAGE_BUF_ALIGN, PageBuf, PageSource, PeerCred, Prefault, Prefaulter,
    RegionMap, UffdError,
};

use crate::engine::{Engine, EngineStats, LayeredFile, PrefetchPlan, load_prefetch_plan};
use crate::export::{BlockSource, ChangeSet, Exported, export_layer};

/// A [`LayeredFile`] as a [`PageSource`].
#[derive(Debug)]
pub struct EngineSource {
    file: Arc<LayeredFile>,
    staged: AtomicU64,
}

impl EngineSource {
    /// A source over `file` (the memfile of the build being resumed).
    pub fn new(file: Arc<LayeredFile>) -> Self {
        Self {
            file,
            staged: AtomicU64::new(0),
        }
    }

    /// The file.
    pub fn file(&self) -> &Arc<LayeredFile> {
        &self.file
    }

    /// Pages handed out as assembled staging copies (pages over several mappings).
    pub fn staged_pages(&self) -> u64 {
        self.staged.load(Ordering::Relaxed)
    }

    /// A page over several mappings (or, defensively, a borrow that is not 4 KiB-aligned):
    /// zeros if every piece is nil, an assembled copy if every piece is present.
    fn assemble(&self, offset: u64, len: usize) -> Lookup {
        let len64 = len as u64;
        let Ok(segments) = self.file.segments(offset, len64) else {
            return Lookup::Missing;
        };
        if segments
            .iter()
            .all(|s| matches!(s, crate::engine::Segment::Zeros { .. }))
        {
            return Lookup::Zero;
        }
        if !self.file.is_present(offset, len64) {
            return Lookup::Missing;
        }
        let mut buf = PageBuf::zeroed(len);
        // Everything is present (and present bytes never change): this is a copy, not a wait.
        match self.file.read_at(offset, buf.as_mut_slice()) {
            Ok(()) => {
                self.staged.fetch_add(1, Ordering::Relaxed);
                Lookup::Owned(buf)
            }
            Err(_) => Lookup::Missing,
        }
    }
}

impl PageSource for EngineSource {
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn lookup(&self, offset: u64, len: u64) -> Lookup {
        let Ok(n) = usize::try_from(len) else {
            return Lookup::Missing;
        };
        let maps = &self.file.header().mappings;
        let Some(m) = maps
            .partition_point(|m| m.offset <= offset)
            .checked_sub(1)
            .and_then(|i| maps.get(i))
        else {
            return Lookup::Missing;
        };
        if offset.saturating_add(len) > m.end() {
            return self.assemble(offset, n);
        }
        if m.is_nil() {
            return Lookup::Zero;
        }
        match self.file.try_get(offset, n) {
            // The common case: the kernel copies straight from the cache memory (2 MiB-aligned,
            // and mappings are 4 KiB-aligned in it). Present bytes stay put while `file` lives,
            // and `self` owns `file`.
            Some(b) if (b.as_ptr() as usize).is_multiple_of(PAGE_BUF_ALIGN) => {
                Lookup::Ready(b.as_ptr())
            }
            Some(_) => self.assemble(offset, n),
            None => Lookup::Missing,
        }
    }

    fn fetch(&self, offset: u64, len: u64, done: FetchDone) {
        self.file.request(offset, len, move |r| {
            done(r.map_err(|e| FetchError(e.to_string())));
        });
    }
}

/// Settings of [`serve_uffd`].
#[derive(Debug, Clone)]
pub struct UffdOptions {
    /// The build file to serve (the memfile).
    pub file: FileKind,
    /// Deadline for Firecracker to connect and send its handshake.
    pub handshake_timeout: Duration,
    /// SIGKILL the peer when the handshake fails (it would hang forever without a handler).
    pub kill_peer_on_handshake_error: bool,
    /// The fault loop's settings (fetch attempts, backoff, EAGAIN budget, kill on failure).
    pub handler: HandlerConfig,
    /// Warm and prefault the build's recorded prefetch plan (`metadata.json`).
    pub prefetch: bool,
    /// Prefetch worker threads (pages warmed at once).
    pub prefetch_concurrency: usize,
}

impl Default for UffdOptions {
    fn default() -> Self {
        Self {
            file: FileKind::Memfile,
            handshake_timeout: Duration::from_secs(10),
            kill_peer_on_handshake_error: true,
            handler: HandlerConfig::default(),
            prefetch: false,
            prefetch_concurrency: 8,
        }
    }
}

/// Progress of a prefetch, in pages of the guest's page size.
#[derive(Debug, Default)]
struct PrefetchCounters {
    total: AtomicU64,
    warmed: AtomicU64,
    prefaulted: AtomicU64,
    skipped: AtomicU64,
    failed: AtomicU64,
}

/// A snapshot of the prefetch's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchReport {
    /// Pages in the plan (deduplicated, inside the file).
    pub total: u64,
    /// Pages made present in the engine's cache.
    pub warmed: u64,
    /// Pages installed into the guest before it touched them.
    pub prefaulted: u64,
    /// Pages the guest (a demand fault) got to first, or a pending mapping change deferred.
    pub skipped: u64,
    /// Pages whose warm-up or prefault failed (demand faults fetch them again).
    pub failed: u64,
}

impl PrefetchCounters {
    fn report(&self) -> PrefetchReport {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PrefetchReport {
            total: l(&self.total),
            warmed: l(&self.warmed),
            prefaulted: l(&self.prefaulted),
            skipped: l(&self.skipped),
            failed: l(&self.failed),
        }
    }
}

/// Where prefetch workers get the prefaulter from once the handshake is done.
#[derive(Clone)]
enum Target {
    Waiting,
    Ready(Prefaulter<EngineSource>),
    /// Warm the cache only (the guest's page size does not match the plan's pages).
    WarmOnly,
    Cancelled,
}

struct Prefetcher {
    counters: Arc<PrefetchCounters>,
    cancel: Arc<AtomicBool>,
    target: Arc<(Mutex<Target>, Condvar)>,
    threads: Vec<JoinHandle<()>>,
    /// Warms the plan's distinct 2 MiB regions ahead of the page workers, `workers` regions at
    /// once: pages of one frame are recorded together, so page-by-page workers would all wait
    /// on the same frame and fetch frames one at a time.
    ahead: Option<crate::engine::PrefetchHandle>,
}

/// The plan's 2 MiB regions (indices), in first-touch order, each once.
fn plan_regions(pages: &[u64]) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    pages
        .iter()
        .map(|&p| p / REGION)
        .filter(|r| seen.insert(*r))
        .collect()
}

/// The read-ahead granularity of the prefetch plan: one frame at the default frame size.
const REGION: u64 = 2 << 20;

impl Prefetcher {
    /// Starts warming `pages` (file offsets, in order) at once; prefaults wait for
    /// [`set_target`](Self::set_target).
    fn start(file: &Arc<LayeredFile>, pages: Vec<u64>, page_size: u64, workers: usize) -> Self {
        let counters = Arc::new(PrefetchCounters::default());
        counters.total.store(pages.len() as u64, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        let target = Arc::new((Mutex::new(Target::Waiting), Condvar::new()));
        let next = Arc::new(AtomicU64::new(0));
        let ahead = Some(crate::engine::prefetch_offsets(
            Arc::clone(file),
            plan_regions(&pages),
            REGION,
            workers.max(1),
        ));
        let pages = Arc::new(pages);
        let threads = (0..workers.max(1))
            .filter_map(|_| {
                let ctx = Worker {
                    file: Arc::clone(file),
                    pages: Arc::clone(&pages),
                    next: Arc::clone(&next),
                    page_size,
                    counters: Arc::clone(&counters),
                    cancel: Arc::clone(&cancel),
                    target: Arc::clone(&target),
                };
                std::thread::Builder::new()
                    .name("thaw-uffd-prefetch".into())
                    .spawn(move || ctx.run())
                    .map_err(|e| tracing::warn!(error = %e, "could not start a prefetch thread"))
                    .ok()
            })
            .collect();
        Self {
            counters,
            cancel,
            target,
            threads,
            ahead,
        }
    }

    fn set_target(&self, t: Target) {
        let (m, c) = &*self.target;
        *m.lock().unwrap_or_else(PoisonError::into_inner) = t;
        c.notify_all();
    }

    fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(a) = &self.ahead {
            a.cancel();
        }
        self.set_target(Target::Cancelled);
    }

    fn is_done(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    fn join(mut self) -> PrefetchReport {
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        if let Some(a) = self.ahead.take() {
            a.cancel();
            let _ = a.join();
        }
        self.counters.report()
    }
}

impl Drop for Prefetcher {
    /// A server dropped without `join` (or a failed start) leaves no worker warming or waiting.
    fn drop(&mut self) {
        self.cancel();
    }
}

struct Worker {
    file: Arc<LayeredFile>,
    pages: Arc<Vec<u64>>,
    next: Arc<AtomicU64>,
    page_size: u64,
    counters: Arc<PrefetchCounters>,
    cancel: Arc<AtomicBool>,
    target: Arc<(Mutex<Target>, Condvar)>,
}

impl Worker {
    fn run(self) {
        let bump = |a: &AtomicU64| {
            a.fetch_add(1, Ordering::Relaxed);
        };
        while !self.cancel.load(Ordering::Relaxed) {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&offset) = usize::try_from(i).ok().and_then(|i| self.pages.get(i)) else {
                return;
            };
            if let Err(e) = self.file.prefetch_blocking(offset, self.page_size) {
                bump(&self.counters.failed);
                tracing::warn!(offset, error = %e, "UFFD prefetch: warming failed");
                continue;
            }
            bump(&self.counters.warmed);
            let prefaulter = match self.target() {
                Target::Ready(p) => p,
                Target::WarmOnly => continue,
                Target::Waiting | Target::Cancelled => return,
            };
            match prefaulter.prefault(offset) {
                Ok(Prefault::Installed) => bump(&self.counters.prefaulted),
                Ok(Prefault::Skipped(_) | Prefault::Busy) => bump(&self.counters.skipped),
                Ok(Prefault::NotReady) => {
                    // Warmed but not there: the source and the engine disagree. Demand faults
                    // will fetch it again; count it and go on.
                    bump(&self.counters.failed);
                    tracing::warn!(offset, "UFFD prefetch: page still missing after warm-up");
                }
                Ok(Prefault::Ended) => {
                    self.cancel.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    bump(&self.counters.failed);
                    tracing::warn!(error = %e, "UFFD prefetch: prefault failed; prefetch stopped");
                    self.cancel.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    /// Waits for the handshake (or cancellation).
    fn target(&self) -> Target {
        let (m, c) = &*self.target;
        let t = m.lock().unwrap_or_else(PoisonError::into_inner);
        let t = c
            .wait_while(t, |t| matches!(t, Target::Waiting))
            .unwrap_or_else(PoisonError::into_inner);
        t.clone()
    }
}

/// The pages (file offsets, deduplicated, in plan order) that `plan` names, in pages of
/// `page_size` bytes of a file of `size` bytes. A plan block larger than a page names every page
/// in it; smaller blocks name the page that holds them.
pub fn plan_pages(plan: &PrefetchPlan, page_size: u64, size: u64) -> Vec<u64> {
    let pages = size.div_ceil(page_size.max(1));
    let mut seen = vec![false; usize::try_from(pages).unwrap_or(0)];
    let mut out = Vec::new();
    for &idx in &plan.indices {
        let Some(start) = idx.checked_mul(plan.block_size) else {
            continue;
        };
        let end = start.saturating_add(plan.block_size).min(size);
        let mut page = start / page_size;
        while page * page_size < end {
            if let Some(s) = usize::try_from(page).ok().and_then(|p| seen.get_mut(p))
                && !*s
            {
                *s = true;
                out.push(page * page_size);
            }
            page += 1;
        }
    }
    out
}

/// How a served VM ended, with everything measured.
#[derive(Debug)]
pub struct UffdReport {
    /// The fault loop's end: the peer went away / was stopped, or the failure (the peer was
    /// SIGKILLed if configured).
    pub result: Result<Exit, UffdError>,
    /// The handler's counters.
    pub metrics: MetricsSnapshot,
    /// The prefetch's progress (all zero without prefetch).
    pub prefetch: Option<PrefetchReport>,
    /// The engine's counters at the end.
    pub engine: EngineStats,
    /// Pages served as assembled copies (over several mappings).
    pub staged_pages: u64,
    /// Time from the handshake to the end.
    pub elapsed: Duration,
    /// The peer.
    pub peer: PeerCred,
}

impl UffdReport {
    /// One line for the log.
    pub fn summary(&self) -> String {
        let m = &self.metrics;
        let q = |x: f64| {
            m.fetch_latency_quantile(x)
                .map_or_else(|| "-".to_owned(), |d| format!("{d:?}"))
        };
        let how = match &self.result {
            Ok(Exit::PeerGone) => "peer gone".to_owned(),
            Ok(Exit::Stopped) => "stopped".to_owned(),
            Err(e) => format!("failed ({})", e.kind()),
        };
        let mut s = format!(
            "uffd: peer pid {} served {:.3} s, {how}; faults {} missing ({} write, {} deduped), {} write-protect; \
             installed {} copies ({} KiB, {} staged), {} zero; eexist {}, eagain {}, removed {} pages; \
             fetches {} (p50 <= {}, p90 <= {}, p99 <= {}), {} retries, {} failed",
            self.peer.pid,
            self.elapsed.as_secs_f64(),
            m.faults_missing,
            m.faults_write,
            m.faults_deduped,
            m.faults_wp,
            m.copies,
            m.bytes_copied / 1024,
            self.staged_pages,
            m.zero_installs,
            m.eexist,
            m.eagain,
            m.removed_pages,
            m.fetches,
            q(0.5),
            q(0.9),
            q(0.99),
            m.fetch_retries,
            m.fetch_failures,
        );
        if let Some(p) = &self.prefetch {
            s.push_str(&format!(
                "; prefetch {}/{} pages warmed, {} prefaulted ({} KiB), {} taken by faults first, {} failed",
                p.warmed,
                p.total,
                p.prefaulted,
                m.prefault_bytes / 1024,
                p.skipped,
                p.failed
            ));
        }
        let e = &self.engine;
        s.push_str(&format!(
            "; store {} requests ({} KiB), {} retries, {} errors",
            e.store_requests,
            e.store_bytes / 1024,
            e.retries,
            e.fetch_errors
        ));
        s
    }
}

/// Firecracker's memfd as a [`BlockSource`]: guest memory at the memfile's offsets.
#[derive(Debug)]
struct MemfdSource(std::fs::File);

impl BlockSource for MemfdSource {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }
}

/// The peer's address space as a [`BlockSource`] (Firecracker sent no memfd): a memfile offset
/// is translated through the handshake's regions (`offset..offset + size` of the file is
/// `base_host_virt_addr..` in the peer) and read with `process_vm_readv`. A read crossing regions
/// is split; an offset no region maps, a partial read or a dead peer is an error. The fault loop
/// must still be running: once the peer is gone its pid may name another process, so the state
/// is checked before and after each read.
struct PeerMemorySource<'a> {
    pid: i32,
    regions: &'a RegionMap,
    handler: &'a FaultHandler<EngineSource>,
}

impl PeerMemorySource<'_> {
    fn gone(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            format!(
                "the peer (pid {}) is gone: its memory cannot be read without a memfd",
                self.pid
            ),
        )
    }
}

impl BlockSource for PeerMemorySource<'_> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if self.handler.is_finished() {
            return Err(self.gone());
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset.saturating_add(done as u64);
            let Some(r) = self
                .regions
                .regions()
                .iter()
                .find(|r| at >= r.offset && at - r.offset < r.size)
            else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("memfile offset {at:#x} is in none of the peer's regions"),
                ));
            };
            let in_region = at - r.offset;
            let n = usize::try_from(r.size - in_region)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            thaw_uffd::read_process_memory(
                self.pid,
                r.base_host_virt_addr.saturating_add(in_region),
                &mut buf[done..done + n],
            )?;
            done += n;
        }
        if self.handler.is_finished() {
            return Err(self.gone());
        }
        Ok(())
    }
}

/// A VM being served by [`serve_uffd`].
pub struct UffdServer {
    handler: FaultHandler<EngineSource>,
    source: Arc<EngineSource>,
    prefetch: Option<Prefetcher>,
    /// Prefetches started later (`POST /v1/handlers/{name}/prefetch`).
    extra_prefetch: Mutex<Vec<Prefetcher>>,
    engine: Engine,
    peer: PeerCred,
    memfd: Option<OwnedFd>,
    regions: RegionMap,
    started: Instant,
}

impl std::fmt::Debug for UffdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdServer")
            .field("peer", &self.peer)
            .field("handler", &self.handler)
            .finish_non_exhaustive()
    }
}

impl UffdServer {
    /// The fault handler (page states, dirty pages, metrics).
    pub fn handler(&self) -> &FaultHandler<EngineSource> {
        &self.handler
    }

    /// The page source (the served file).
    pub fn source(&self) -> &Arc<EngineSource> {
        &self.source
    }

    /// The peer (Firecracker).
    pub fn peer(&self) -> PeerCred {
        self.peer
    }

    /// e2b's memfd, if the peer sent one (kept open for the pause step).
    pub fn memfd(&self) -> Option<&OwnedFd> {
        self.memfd.as_ref()
    }

    /// The guest memory's changes since the handshake, in pages: the pages written (write
    /// faults, and write-protect faults when the peer registered write-protect mode) and the
    /// pages that read as zeros (installed as zeros or removed by the guest) and were not written
    /// since. This is e2b's pause diff (dirty wins over empty).
    pub fn memory_changes(&self) -> ChangeSet {
        let page = self.handler.page_size();
        ChangeSet {
            block_size: page,
            dirty: page_runs(page, self.handler.dirty_pages()),
            zero: page_runs(page, self.handler.zero_or_removed_pages()),
        }
    }

    /// [`memory_changes`](Self::memory_changes) with the dirty pages `dirty` names: the
    /// handler's own, or those united with Firecracker's dirty bitmap (the zero set loses every
    /// page the bitmap marks: dirty wins, as in e2b).
    ///
    /// # Errors
    /// A bitmap whose length is not one bit per page of the memfile (rounded up to 64), or that
    /// marks a page past its end.
    pub fn memory_changes_with(&self, dirty: &DirtyPages) -> anyhow::Result<ChangeSet> {
        let mut changes = self.memory_changes();
        let DirtyPages::Bitmap(words) = dirty else {
            return Ok(changes);
        };
        let page = changes.block_size;
        let pages = self.source.file().size().div_ceil(page);
        let want = usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX);
        if words.len() != want {
            bail!(
                "the dirty bitmap has {} words; the memfile's {pages} pages of {page} bytes need {want}",
                words.len()
            );
        }
        let mut marked = Vec::new();
        for (j, &w) in words.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let i = u64::from(w.trailing_zeros());
                w &= w - 1;
                let p = (j as u64) * 64 + i;
                if p >= pages {
                    bail!("the dirty bitmap marks page {p}, past the memfile's {pages} pages");
                }
                marked.push(p * page);
            }
        }
        let mut offsets: Vec<u64> = changes
            .dirty
            .iter()
            .flat_map(|r| (r.start..r.end).map(|b| b * page))
            .chain(marked)
            .collect();
        offsets.sort_unstable();
        offsets.dedup();
        changes.dirty = page_runs(page, offsets);
        changes.zero = subtract_runs(&changes.zero, &changes.dirty);
        Ok(changes)
    }

    /// Stores the guest memory's changes as build `new_build`'s memfile over the served build
    /// (e2b's memory diff at pause): [`memory_changes_with`](Self::memory_changes_with)`(dirty)`
    /// (see [`DirtyPages`] for which source is exact when) over the served
    /// header, the dirty pages read from the memfd Firecracker sent (its file offsets are the
    /// memfile's), written with [`export_layer`] (packed diff, merge rules, data first, header
    /// last, idempotent by build id). The VM must be paused: pages written during the export
    /// would make the diff inconsistent.
    ///
    /// Without a memfd (Firecracker started without `use_memfd`), the dirty pages are read from
    /// the peer's address space with `process_vm_readv` through the handshake's regions: the peer
    /// must still be running (a VM that went away can only be exported from its memfd).
    ///
    /// # Errors
    /// No memfd and the peer is gone or its memory cannot be read (partial read, unmapped
    /// address, no ptrace rights), and everything [`export_layer`] fails with.
    pub fn export_memory(
        &self,
        store: &dyn crate::store::Store,
        new_build: BuildId,
        opts: &crate::writer::WriteOptions,
        dirty: &DirtyPages,
    ) -> anyhow::Result<Exported> {
        let file = self.source.file();
        let parent = file.header().metadata.build_id;
        let changes = self
            .memory_changes_with(dirty)
            .with_context(|| format!("exporting the memory of build {parent} as {new_build}"))?;
        let from_memfd;
        let from_peer;
        let source: &dyn BlockSource = if let Some(memfd) = self.memfd.as_ref() {
            let memfd = std::fs::File::from(memfd.try_clone().context("duplicating the memfd")?);
            from_memfd = MemfdSource(memfd);
            &from_memfd
        } else {
            from_peer = PeerMemorySource {
                pid: self.peer.pid,
                regions: &self.regions,
                handler: &self.handler,
            };
            if self.handler.is_finished() {
                return Err(anyhow::Error::new(from_peer.gone()).context(format!(
                    "exporting the memory of build {parent} as {new_build}"
                )));
            }
            &from_peer
        };
        let result = export_layer(
            store,
            FileKind::Memfile,
            file.header(),
            new_build,
            &changes,
            source,
            opts,
        );
        result.with_context(|| {
            format!(
                "exporting the memory of build {parent} as {new_build} (from the {})",
                if self.memfd.is_some() {
                    "memfd"
                } else {
                    "peer's address space"
                }
            )
        })
    }

    /// The guest memory layout Firecracker sent.
    pub fn regions(&self) -> &RegionMap {
        &self.regions
    }

    /// Starts warming and prefaulting `pages` (file offsets of guest pages, in order) in the
    /// background, as the recorded plan is at start (pages the guest touched first are
    /// skipped). Returns the number of pages queued.
    pub fn start_prefetch(&self, pages: Vec<u64>, workers: usize) -> u64 {
        let page = self.handler.page_size();
        let n = pages.len() as u64;
        let p = Prefetcher::start(self.source.file(), pages, page, workers);
        p.set_target(Target::Ready(self.handler.prefaulter()));
        self.extra_prefetch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(p);
        n
    }

    /// The prefetch's progress so far, if prefetching (the start's plan and every later
    /// prefetch, summed).
    pub fn prefetch_progress(&self) -> Option<PrefetchReport> {
        let extra = self
            .extra_prefetch
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut all = self.prefetch.iter().chain(extra.iter()).peekable();
        all.peek()?;
        Some(all.fold(PrefetchReport::default(), |a, p| {
            let r = p.counters.report();
            PrefetchReport {
                total: a.total + r.total,
                warmed: a.warmed + r.warmed,
                prefaulted: a.prefaulted + r.prefaulted,
                skipped: a.skipped + r.skipped,
                failed: a.failed + r.failed,
            }
        }))
    }

    /// Whether the prefetch workers have all finished (true without prefetch).
    pub fn prefetch_done(&self) -> bool {
        self.prefetch.as_ref().is_none_or(Prefetcher::is_done)
    }

    /// Asks the fault loop to end ([`Exit::Stopped`]).
    pub fn stop(&self) {
        self.handler.stop();
    }

    /// Whether the fault loop has ended.
    pub fn is_finished(&self) -> bool {
        self.handler.is_finished()
    }

    /// Waits for the fault loop to end (the VM went away, [`stop`](Self::stop), or a failure),
    /// stops the prefetch and reports.
    pub fn join(self) -> UffdReport {
        let Self {
            mut handler,
            source,
            prefetch,
            extra_prefetch,
            engine,
            peer,
            memfd,
            regions: _,
            started,
        } = self;
        let result = handler.wait();
        let elapsed = started.elapsed();
        drop(memfd);
        let extra = extra_prefetch
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        let mut prefetch = prefetch.map(|p| {
            p.cancel();
            p.join()
        });
        for p in extra {
            p.cancel();
            let r = p.join();
            let a = prefetch.unwrap_or_default();
            prefetch = Some(PrefetchReport {
                total: a.total + r.total,
                warmed: a.warmed + r.warmed,
                prefaulted: a.prefaulted + r.prefaulted,
                skipped: a.skipped + r.skipped,
                failed: a.failed + r.failed,
            });
        }
        // Read after the prefetch stopped: its last prefaults are counted.
        let metrics = handler.metrics();
        UffdReport {
            result,
            metrics,
            prefetch,
            engine: engine.stats(),
            staged_pages: source.staged_pages(),
            elapsed,
            peer,
        }
    }
}

/// Serves one VM's memory from `build`'s memfile: opens the file (and every build it references,
/// so faults never wait for store metadata), starts warming the prefetch plan if asked, waits on
/// `listener` for Firecracker's handshake, and starts the fault loop. Returns once the handshake
/// is done; [`UffdServer::join`] waits for the VM to go away.
///
/// # Errors
/// The build or its data cannot be opened, a malformed prefetch plan, or a failed handshake
/// (the peer, if it connected, is SIGKILLed when
/// [`kill_peer_on_handshake_error`](UffdOptions::kill_peer_on_handshake_error) is set).
pub fn serve_uffd(
    engine: &Engine,
    build: BuildId,
    listener: &UnixListener,
    options: &UffdOptions,
) -> anyhow::Result<UffdServer> {
    let file = Arc::new(
        engine
            .open(build, options.file)
            .with_context(|| format!("opening build {build} ({})", options.file))?,
    );
    file.open_all()
        .with_context(|| format!("opening the builds under {build} ({})", options.file))?;
    let plan = if options.prefetch {
        let plan = load_prefetch_plan(engine.meta_store().as_ref(), build)
            .with_context(|| format!("reading the prefetch plan of build {build}"))?;
        if plan.is_none() {
            tracing::info!(%build, "no recorded prefetch plan (metadata.json prefetch.memory)");
        }
        plan
    } else {
        None
    };
    serve_file(engine, file, plan.as_ref(), listener, options)
}

/// [`serve_uffd`] for an already open file and an explicit plan.
///
/// # Errors
/// As [`serve_uffd`].
pub fn serve_file(
    engine: &Engine,
    file: Arc<LayeredFile>,
    plan: Option<&PrefetchPlan>,
    listener: &UnixListener,
    options: &UffdOptions,
) -> anyhow::Result<UffdServer> {
    prepare(engine, file, plan, options).accept(listener)
}

/// A VM's memory ready to be served, waiting for Firecracker's handshake: the file is open and
/// the prefetch plan (if any) is being warmed. [`accept`](Self::accept) or
/// [`receive`](Self::receive) the handshake to start the fault loop.
pub struct PendingServer {
    engine: Engine,
    file: Arc<LayeredFile>,
    prefetch: Option<Prefetcher>,
    page_size: u64,
    options: UffdOptions,
}

impl std::fmt::Debug for PendingServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingServer")
            .field("size", &self.file.size())
            .field("page_size", &self.page_size)
            .finish_non_exhaustive()
    }
}

/// The first half of [`serve_file`]: starts warming `plan` and returns the server waiting for
/// its handshake.
pub fn prepare(
    engine: &Engine,
    file: Arc<LayeredFile>,
    plan: Option<&PrefetchPlan>,
    options: &UffdOptions,
) -> PendingServer {
    let size = file.size();
    // The page size is only known from the handshake; the header's block size is the guest's
    // page size for e2b's memfiles, so warming starts with it and prefaults check it.
    let page_size = file.block_size();
    let prefetch = plan.map(|plan| {
        let pages = plan_pages(plan, page_size, size);
        tracing::info!(
            pages = pages.len(),
            page_size,
            "UFFD prefetch: warming the recorded plan"
        );
        Prefetcher::start(&file, pages, page_size, options.prefetch_concurrency)
    });
    PendingServer {
        engine: engine.clone(),
        file,
        prefetch,
        page_size,
        options: options.clone(),
    }
}

impl PendingServer {
    fn handshake_config(&self) -> HandshakeConfig {
        HandshakeConfig {
            memfile_size: self.file.size(),
            timeout: self.options.handshake_timeout,
            kill_peer_on_error: self.options.kill_peer_on_handshake_error,
        }
    }

    /// Waits (up to the handshake timeout) for one peer on `listener`, then as
    /// [`receive`](Self::receive).
    ///
    /// # Errors
    /// As [`serve_uffd`].
    pub fn accept(self, listener: &UnixListener) -> anyhow::Result<UffdServer> {
        let hs = thaw_uffd::handshake::accept(listener, &self.handshake_config());
        self.start(hs)
    }

    /// Receives the handshake on an accepted connection (within the handshake timeout) and
    /// starts the fault loop.
    ///
    /// # Errors
    /// As [`serve_uffd`].
    pub fn receive(self, stream: UnixStream) -> anyhow::Result<UffdServer> {
        let cfg = self.handshake_config();
        let hs = thaw_uffd::handshake::receive(stream, Instant::now() + cfg.timeout, &cfg);
        self.start(hs)
    }

    fn start(self, hs: thaw_uffd::Result<thaw_uffd::Handshake>) -> anyhow::Result<UffdServer> {
        let Self {
            engine,
            file,
            prefetch,
            page_size,
            options,
        } = self;
        let mut hs = match hs {
            Ok(hs) => hs,
            Err(e) => {
                if let Some(p) = prefetch {
                    p.cancel();
                    p.join();
                }
                return Err(anyhow::Error::new(e).context("UFFD handshake"));
            }
        };
        let peer = hs.peer;
        let guest_page = hs.regions.page_size();
        let regions = hs.regions.clone();
        let memfd = hs.memfd.take();
        let source = Arc::new(EngineSource::new(file));
        let handler = match FaultHandler::spawn(hs, Arc::clone(&source), options.handler.clone()) {
            Ok(h) => h,
            Err(e) => {
                if let Some(p) = prefetch {
                    p.cancel();
                    p.join();
                }
                if options.handler.kill_peer_on_failure {
                    thaw_uffd::kill_peer(peer.pid);
                }
                return Err(anyhow::Error::new(e).context("starting the UFFD fault handler"));
            }
        };
        if let Some(p) = &prefetch {
            if guest_page == page_size {
                p.set_target(Target::Ready(handler.prefaulter()));
            } else {
                // Warming still helps; prefaulting pages of another size would not match the
                // plan.
                tracing::warn!(
                    guest_page,
                    block_size = page_size,
                    "UFFD prefetch: the guest's page size differs from the memfile's block size; warming only"
                );
                p.set_target(Target::WarmOnly);
            }
        }
        Ok(UffdServer {
            handler,
            source,
            prefetch,
            extra_prefetch: Mutex::new(Vec::new()),
            engine,
            peer,
            memfd,
            regions,
            started: Instant::now(),
        })
    }
}

/// Where the dirty pages of a memory snapshot come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirtyPages {
    /// The handler's own tracking: write faults, and write-protect faults when Firecracker
    /// resolves them through the handler (`use_sync_wp`). Exact only then, or for a guest that
    /// writes every page at its first touch: with MISSING-only registration or asynchronous
    /// write-protect, a write to a page the handler already installed never reaches it.
    Handler,
    /// Firecracker's `GET /memory/dirty` bitmap (VM paused; bit `i` of word `j` is page
    /// `64 j + i` of the memfile), united with the handler's own dirty pages.
    Bitmap(Vec<u64>),
}

/// Page offsets (ascending) as runs of page indexes.
fn page_runs(page: u64, offsets: Vec<u64>) -> Vec<std::ops::Range<u64>> {
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for off in offsets {
        let b = off / page;
        match out.last_mut() {
            Some(r) if r.end == b => r.end = b + 1,
            Some(r) if r.end > b => {}
            _ => out.push(b..b + 1),
        }
    }
    out
}

/// `runs` minus `minus` (both sorted and disjoint within themselves).
fn subtract_runs(
    runs: &[std::ops::Range<u64>],
    minus: &[std::ops::Range<u64>],
) -> Vec<std::ops::Range<u64>> {
    let mut out = Vec::new();
    let mut j = 0;
    for r in runs {
        let mut start = r.start;
        while j < minus.len() && minus[j].end <= start {
            j += 1;
        }
        let mut k = j;
        while start < r.end {
            match minus.get(k) {
                Some(m) if m.start < r.end => {
                    if m.start > start {
                        out.push(start..m.start);
                    }
                    start = start.max(m.end);
                    k += 1;
                }
                _ => {
                    out.push(start..r.end);
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{page_runs, subtract_runs};

    #[test]
    #[allow(
        clippy::single_range_in_vec_init,
        reason = "run lists of one run are what is being tested"
    )]
    fn page_runs_and_their_difference() {
        assert_eq!(
            page_runs(4096, vec![0, 4096, 4096, 3 * 4096, 4 * 4096]),
            vec![0..2, 3..5]
        );
        assert_eq!(
            subtract_runs(&[0..10], &[2..3, 5..7]),
            vec![0..2, 3..5, 7..10]
        );
        assert_eq!(subtract_runs(&[0..4, 6..8], &[3..7]), vec![0..3, 7..8]);
        assert_eq!(
            subtract_runs(&[2..4], &[0..10]),
            Vec::<std::ops::Range<u64>>::new()
        );
        assert_eq!(subtract_runs(&[2..4], &[]), vec![2..4]);
        assert_eq!(subtract_runs(&[0..2, 8..9], &[4..5]), vec![0..2, 8..9]);
    }
}
