//! The fault loop: one dedicated thread reads `uffd_msg`s and answers them from a [`PageSource`].
//!
//! - The thread drains the (non-blocking, as Firecracker creates it) userfaultfd with `read`s of up
//!   to 64 messages, and sleeps in `poll` only when the queue is empty, on three fds: the uffd, the
//!   handshake connection (its hang-up = the VM exited) and an eventfd (stop requests and work
//!   handed back by fetch completions). A plain blocking `read` could not notice a dead peer: a
//!   userfaultfd whose process exited is never readable again and never reports POLLHUP.
//! - In each batch, REMOVE/UNMAP events are applied before the faults (events can arrive out of
//!   causal order), then faults are served: hit -> one `UFFDIO_COPY` from the source's pointer;
//!   zero -> `UFFDIO_ZEROPAGE` (4 KiB) or a copy from a zero mapping; miss -> `fetch`, whose
//!   completion installs the page from the fetch thread while this thread keeps serving.
//! - EEXIST -> `UFFDIO_WAKE`; EAGAIN -> deferred and retried after the next drain, with backoff,
//!   within [`HandlerConfig::eagain_budget`]; ESRCH -> the VM is gone, exit quietly.
//! - A failed fetch is retried [`HandlerConfig::fetch_attempts`] times with backoff; then the
//!   handler fails closed: SIGKILL the peer and return an error naming the page and the cause.
//!   Unknown data is never installed.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thaw_codec::RegionMap;

use crate::error::{ErrorKind, Result, UffdError};
use crate::handshake::Handshake;
use crate::ioctl::{self, Event};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::os;
use crate::panic_hook;
use crate::source::{FetchError, Lookup, PageSource};
use crate::state::{PageState, PageStates};

/// Tuning of the fault loop.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// Fetch attempts per page before failing closed (at least 1).
    pub fetch_attempts: u32,
    /// Delay before the first fetch retry; doubled for each further retry.
    pub fetch_backoff: Duration,
    /// How long one page may keep getting EAGAIN before the handler fails closed.
    pub eagain_budget: Duration,
    /// Largest delay between two EAGAIN retries of one page.
    pub eagain_max_backoff: Duration,
    /// SIGKILL the peer when failing closed (and from the panic hook).
    pub kill_peer_on_failure: bool,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        Self {
            fetch_attempts: 3,
            fetch_backoff: Duration::from_millis(20),
            eagain_budget: Duration::from_secs(5),
            eagain_max_backoff: Duration::from_millis(50),
            kill_peer_on_failure: true,
        }
    }
}

/// Why the fault loop ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The peer hung up or its address space is gone (ESRCH).
    PeerGone,
    /// [`FaultHandler::stop`] was called.
    Stopped,
}

/// One page of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Page {
    /// Page-aligned host address in the peer.
    host: u64,
    /// Offset in the memory file.
    offset: u64,
    /// Index in the state table.
    idx: usize,
}

/// Work the fault thread does later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Serve a fault again (its install got EAGAIN).
    Serve { write: bool },
    /// Install a fetched page again (the completion's install got EAGAIN).
    Install { write: bool },
    /// Unprotect a page again (its write-protect fault got EAGAIN).
    Unprotect,
    /// Fetch again after a failure.
    Refetch { write: bool, attempt: u32 },
}

#[derive(Debug)]
struct Deferred {
    page: Page,
    work: Work,
    /// EAGAIN retries so far (for the backoff) and when the first happened (for the budget).
    eagain_retries: u32,
    first: Instant,
    not_before: Instant,
}

/// Result of one attempt to serve or install a page.
enum Step {
    /// Installed, or already present.
    Done,
    /// A fetch is in flight; its completion installs the page.
    Pending,
    /// EAGAIN: retry later.
    Again,
    /// ESRCH: the peer's address space is gone.
    Gone,
    /// Fail closed.
    Fatal(UffdError),
}

const WP_UNKNOWN: u8 = 0;
const WP_ON: u8 = 1;
const WP_OFF: u8 = 2;

struct Shared<S> {
    uffd: OwnedFd,
    stream: Option<UnixStream>,
    regions: RegionMap,
    page_size: u64,
    source: Arc<S>,
    states: PageStates,
    zeros: os::ZeroPages,
    wake: OwnedFd,
    deferred: Mutex<Vec<Deferred>>,
    /// Length of `deferred`, read without the lock on the fault path.
    deferred_len: AtomicUsize,
    stop: AtomicBool,
    gone: AtomicBool,
    /// The fault thread has left its loop (prefaults are refused from then on).
    ended: AtomicBool,
    fatal: Mutex<Option<UffdError>>,
    /// Whether the guest memory is registered for write-protect tracking (learned from the first
    /// `UFFDIO_COPY_MODE_WP`: EINVAL means it is not).
    wp: AtomicU8,
    metrics: Metrics,
    peer_pid: i32,
    config: HandlerConfig,
}

/// A running fault handler.
pub struct FaultHandler<S: PageSource> {
    shared: Arc<Shared<S>>,
    thread: Option<JoinHandle<Result<Exit>>>,
}

impl<S: PageSource> std::fmt::Debug for FaultHandler<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultHandler")
            .field("regions", &self.shared.regions.to_string())
            .field("peer_pid", &self.shared.peer_pid)
            .finish_non_exhaustive()
    }
}

impl<S: PageSource> FaultHandler<S> {
    /// Starts the fault thread for a completed handshake. The source must be the memory file the
    /// regions were validated against.
    pub fn spawn(hs: Handshake, source: Arc<S>, config: HandlerConfig) -> Result<Self> {
        let Handshake {
            regions,
            uffd,
            memfd: _,
            peer,
            stream,
        } = hs;
        Self::spawn_parts(uffd, regions, Some(stream), peer.pid, source, config)
    }

    /// Starts the fault thread from parts: `stream` (if any) is watched for hang-up, `peer_pid` is
    /// killed when failing closed.
    pub fn spawn_parts(
        uffd: OwnedFd,
        regions: RegionMap,
        stream: Option<UnixStream>,
        peer_pid: i32,
        source: Arc<S>,
        config: HandlerConfig,
    ) -> Result<Self> {
        if source.size() != regions.total_size() {
            return Err(UffdError::new(
                ErrorKind::Regions,
                format!(
                    "page source has {} bytes but the regions cover {}; {regions}",
                    source.size(),
                    regions.total_size()
                ),
            ));
        }
        let page_size = regions.page_size();
        let pages = usize::try_from(regions.total_size() / page_size)
            .map_err(|_| UffdError::new(ErrorKind::Regions, "memory file too large"))?;
        let zeros = usize::try_from(page_size)
            .map_err(io::Error::other)
            .and_then(os::ZeroPages::new)
            .map_err(|e| UffdError::io(ErrorKind::Io, "map the zero buffer", e))?;
        let wake = os::eventfd().map_err(|e| UffdError::io(ErrorKind::Io, "eventfd", e))?;
        if let Some(s) = &stream {
            s.set_nonblocking(true)
                .map_err(|e| UffdError::io(ErrorKind::Io, "set the connection non-blocking", e))?;
        }
        let shared = Arc::new(Shared {
            uffd,
            stream,
            regions,
            page_size,
            source,
            states: PageStates::new(pages),
            zeros,
            wake,
            deferred: Mutex::new(Vec::new()),
            deferred_len: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            fatal: Mutex::new(None),
            wp: AtomicU8::new(WP_UNKNOWN),
            metrics: Metrics::default(),
            peer_pid,
            config,
        });
        let kill = shared.config.kill_peer_on_failure;
        let me = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("thaw-uffd".into())
            .spawn(move || {
                let _guard = kill.then(|| panic_hook::register_peer(peer_pid));
                me.run()
            })
            .map_err(|e| UffdError::io(ErrorKind::Io, "spawn the fault thread", e))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks the fault thread to exit (it returns [`Exit::Stopped`]).
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        os::eventfd_signal(self.shared.wake.as_fd());
    }

    /// Whether the fault thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the fault thread and returns how it ended.
    pub fn join(mut self) -> Result<Exit> {
        self.join_inner()
    }

    /// Waits for the fault thread like [`join`](Self::join), keeping the handler for inspection
    /// (page states, dirty pages, metrics after the VM is gone). A second call returns
    /// `Ok(Exit::Stopped)`.
    pub fn wait(&mut self) -> Result<Exit> {
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<Exit> {
        let Some(t) = self.thread.take() else {
            return Ok(Exit::Stopped);
        };
        t.join().unwrap_or_else(|_| {
            Err(UffdError::new(
                ErrorKind::Panicked,
                "the fault thread panicked",
            ))
        })
    }

    /// File offsets of the pages the guest wrote (write faults and write-protect faults). Exact
    /// only when the peer registered write-protect mode; without it, pages first read and then
    /// written are not seen.
    pub fn dirty_pages(&self) -> Vec<u64> {
        self.offsets(|s| s == PageState::Dirty)
    }

    /// File offsets of the pages installed as zeros or removed by the guest, and not written since.
    pub fn zero_or_removed_pages(&self) -> Vec<u64> {
        self.offsets(|s| matches!(s, PageState::Zero | PageState::Removed))
    }

    /// The state of the page at file offset `offset`.
    pub fn page_state(&self, offset: u64) -> Option<PageState> {
        let idx = usize::try_from(offset / self.shared.page_size).ok()?;
        (idx < self.shared.states.len()).then(|| self.shared.states.get(idx))
    }

    /// Whether the peer's memory is registered for write-protect tracking, once known.
    pub fn write_protect_tracking(&self) -> Option<bool> {
        match self.shared.wp.load(Ordering::Relaxed) {
            WP_ON => Some(true),
            WP_OFF => Some(false),
            _ => None,
        }
    }

    /// The page size of the regions.
    pub fn page_size(&self) -> u64 {
        self.shared.page_size
    }

    /// A copy of the metrics.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.metrics.snapshot()
    }

    /// A handle that installs pages before the guest touches them (prefetch), from any thread.
    pub fn prefaulter(&self) -> Prefaulter<S> {
        Prefaulter {
            shared: Arc::clone(&self.shared),
        }
    }

    fn offsets(&self, pred: impl Fn(PageState) -> bool) -> Vec<u64> {
        self.shared
            .states
            .select(pred)
            .into_iter()
            .map(|i| i as u64 * self.shared.page_size)
            .collect()
    }
}

impl<S: PageSource> Drop for FaultHandler<S> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
            let _ = self.join_inner();
        }
    }
}

/// What [`Prefaulter::prefault`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefault {
    /// Installed now: source data (state Clean, write-protected when the peer registered
    /// write-protect) or zeros (state Zero).
    Installed,
    /// Left alone: the page is no longer NotPresent (a fault installed it or is fetching it, it
    /// was prefaulted before, or the guest removed it), or a fault's install won the race.
    Skipped(PageState),
    /// The source does not have the page yet: warm it, then try again.
    NotReady,
    /// The install got EAGAIN (a mapping change not yet read): left to the fault path.
    Busy,
    /// The fault loop has ended (peer gone, stopped or failed).
    Ended,
}

/// Installs pages ahead of faults (e2b's prefault of the recorded first-touch order). Cheap to
/// clone, usable from any thread while the [`FaultHandler`] runs.
///
/// A page is installed only if its state is NotPresent, claimed with a compare-and-swap to its
/// final state *before* the copy: a fault that arrives meanwhile sees the page as installed and
/// its own copy gets `EEXIST` (then `UFFDIO_WAKE`), so each page is written into the guest once
/// and nothing is written over a page the guest may already have modified.
pub struct Prefaulter<S: PageSource> {
    shared: Arc<Shared<S>>,
}

impl<S: PageSource> Clone for Prefaulter<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: PageSource> std::fmt::Debug for Prefaulter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefaulter")
            .field("peer_pid", &self.shared.peer_pid)
            .finish_non_exhaustive()
    }
}

impl<S: PageSource> Prefaulter<S> {
    /// Installs the page at file offset `offset` (page-aligned) if the guest has not touched it
    /// and the source has it. Never fetches and never blocks on the source.
    ///
    /// # Errors
    /// A misaligned or out-of-range offset, or an install ioctl that failed in a way that is not
    /// "already there", "try later" or "the VM is gone" (the page is left NotPresent for the
    /// fault path; the caller should stop prefaulting).
    pub fn prefault(&self, offset: u64) -> Result<Prefault> {
        self.shared.prefault(offset)
    }

    /// The page size of the regions.
    pub fn page_size(&self) -> u64 {
        self.shared.page_size
    }

    /// Whether the fault loop has ended.
    pub fn is_ended(&self) -> bool {
        self.shared.ended.load(Ordering::Acquire)
    }
}

fn is_errno(e: &io::Error, code: i32) -> bool {
    e.raw_os_error() == Some(code)
}

impl<S: PageSource> Shared<S> {
    // ---- the fault thread ----

    fn run(self: &Arc<Self>) -> Result<Exit> {
        let r = self.run_loop();
        self.ended.store(true, Ordering::Release);
        match r {
            Ok(exit) => {
                tracing::debug!(?exit, "UFFD handler exiting");
                Ok(exit)
            }
            Err(e) => Err(self.fail_closed(e)),
        }
    }

    fn fail_closed(&self, e: UffdError) -> UffdError {
        let killed = self.config.kill_peer_on_failure && os::kill_peer(self.peer_pid);
        tracing::error!(error = %e, peer = self.peer_pid, killed, "UFFD handler failed closed");
        e.with_peer_killed(killed)
    }

    fn run_loop(self: &Arc<Self>) -> Result<Exit> {
        let mut events = Vec::with_capacity(ioctl::MSG_BATCH);
        let mut seen = Vec::with_capacity(ioctl::MSG_BATCH);
        loop {
            if self.stop.load(Ordering::Acquire) {
                return Ok(Exit::Stopped);
            }
            if let Some(e) = self.take_fatal() {
                return Err(e);
            }
            if self.gone.load(Ordering::Acquire) {
                return Ok(Exit::PeerGone);
            }
            events.clear();
            match ioctl::read_events(self.uffd.as_fd(), &mut events) {
                Ok(0) if events.is_empty() => {
                    // A read that returns nothing (EOF): nothing more will ever come.
                    return Ok(Exit::PeerGone);
                }
                Ok(_) => {
                    self.handle_events(&events, &mut seen)?;
                    self.run_deferred(false)?;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_errno(&e, libc::ENODEV) || is_errno(&e, libc::ESRCH) => {
                    return Ok(Exit::PeerGone);
                }
                Err(e) => return Err(UffdError::io(ErrorKind::Uffd, "read the userfaultfd", e)),
            }
            // Queue empty: retry due deferred work, then sleep until an event, the next deferred
            // deadline, a wake-up, or the peer's hang-up.
            let next = self.run_deferred(true)?;
            if self.gone.load(Ordering::Acquire) {
                return Ok(Exit::PeerGone);
            }
            let timeout = next.map(|t| t.saturating_duration_since(Instant::now()));
            let mut fds = vec![
                (self.uffd.as_fd(), libc::POLLIN),
                (self.wake.as_fd(), libc::POLLIN),
            ];
            if let Some(s) = &self.stream {
                fds.push((s.as_fd(), libc::POLLIN | libc::POLLRDHUP));
            }
            let rev = os::poll(&fds, timeout)
                .map_err(|e| UffdError::io(ErrorKind::Io, "poll the userfaultfd", e))?;
            if rev[0] & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
                && rev[0] & libc::POLLIN == 0
            {
                return Ok(Exit::PeerGone);
            }
            if rev[1] != 0 {
                os::eventfd_drain(self.wake.as_fd());
            }
            if let (Some(s), Some(&r)) = (&self.stream, rev.get(2))
                && r != 0
            {
                // Firecracker never writes after the handshake: readable means EOF (or noise).
                let closed = r & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
                    || os::socket_closed(s.as_fd()).unwrap_or(true);
                if closed {
                    return Ok(Exit::PeerGone);
                }
            }
        }
    }

    fn take_fatal(&self) -> Option<UffdError> {
        self.fatal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn handle_events(
        self: &Arc<Self>,
        events: &[Event],
        seen: &mut Vec<(usize, bool)>,
    ) -> Result<()> {
        // Removals first: a fault can be delivered before the REMOVE that caused it.
        for ev in events {
            match *ev {
                Event::Remove { start, end } => {
                    Metrics::inc(&self.metrics.remove_events);
                    self.mark_removed(start, end);
                }
                Event::Unmap { start, end } => self.mark_removed(start, end),
                Event::Remap { from, to, len } => {
                    return Err(UffdError::new(
                        ErrorKind::Protocol,
                        format!(
                            "guest memory remapped from {from:#x} to {to:#x} ({len} bytes): the region map no longer describes the VM; {}",
                            self.regions
                        ),
                    ));
                }
                Event::Fork { .. } => {
                    tracing::warn!("UFFD fork event ignored (the new userfaultfd was closed)");
                }
                Event::Unknown(code) => {
                    return Err(UffdError::new(
                        ErrorKind::Protocol,
                        format!("unknown userfaultfd event {code:#x}"),
                    ));
                }
                Event::Pagefault { .. } => {}
            }
        }
        // Several vCPUs faulting on one page produce one message each: serve it once per batch
        // (a batch is at most 64 messages: a linear scan of a reused vector, no allocation).
        seen.clear();
        for ev in events {
            if let Event::Pagefault { flags, address } = *ev {
                self.handle_fault(flags, address, seen)?;
            }
        }
        Ok(())
    }

    fn mark_removed(&self, start: u64, end: u64) {
        let ps = self.page_size;
        let mut n = 0u64;
        for r in self.regions.regions() {
            let lo = start.max(r.base_host_virt_addr);
            let hi = end.min(r.end_addr());
            if lo >= hi {
                continue;
            }
            let first = (lo - r.base_host_virt_addr + r.offset) / ps;
            let last = (hi - r.base_host_virt_addr + r.offset).div_ceil(ps);
            for idx in first..last {
                if let Ok(i) = usize::try_from(idx) {
                    self.states.set(i, PageState::Removed);
                    n += 1;
                }
            }
        }
        Metrics::add(&self.metrics.removed_pages, n);
        tracing::debug!(start, end, pages = n, "UFFD remove");
    }

    fn page(&self, address: u64) -> Result<Page> {
        let p = self.regions.translate(address).ok_or_else(|| {
            UffdError::new(
                ErrorKind::Protocol,
                format!(
                    "fault at {address:#x} outside every region; {}",
                    self.regions
                ),
            )
        })?;
        let idx = usize::try_from(p.file_offset / self.page_size)
            .map_err(|_| UffdError::new(ErrorKind::Protocol, "page index overflow"))?;
        Ok(Page {
            host: p.host,
            offset: p.file_offset,
            idx,
        })
    }

    fn handle_fault(
        self: &Arc<Self>,
        flags: u64,
        address: u64,
        seen: &mut Vec<(usize, bool)>,
    ) -> Result<()> {
        if flags & ioctl::PAGEFAULT_FLAG_MINOR != 0 {
            return Err(UffdError::new(
                ErrorKind::Protocol,
                format!("minor fault at {address:#x}: minor mode is not supported"),
            ));
        }
        let page = self.page(address)?;
        let wp = flags & ioctl::PAGEFAULT_FLAG_WP != 0;
        if seen.contains(&(page.idx, wp)) {
            Metrics::inc(&self.metrics.faults_deduped);
            return Ok(());
        }
        seen.push((page.idx, wp));
        let step = if wp {
            Metrics::inc(&self.metrics.faults_wp);
            self.wp.store(WP_ON, Ordering::Relaxed);
            if self.states.get(page.idx) == PageState::Removed {
                // A write to a zapped page that kept its write-protect marker: it must become a
                // writable zero page, never the source's data.
                match self.install_zero(page, true, PageState::Removed) {
                    Step::Done => self.unprotect(page),
                    other => other,
                }
            } else {
                self.unprotect(page)
            }
        } else {
            Metrics::inc(&self.metrics.faults_missing);
            let write = flags & ioctl::PAGEFAULT_FLAG_WRITE != 0;
            if write {
                Metrics::inc(&self.metrics.faults_write);
            }
            let work = Work::Serve { write };
            if self.is_deferred(page) {
                // Its retry will install the page and wake every waiter.
                Metrics::inc(&self.metrics.faults_deduped);
                return Ok(());
            }
            let step = self.serve(page, write, false);
            if let Step::Again = step {
                self.defer(page, work, Duration::ZERO);
                return Ok(());
            }
            step
        };
        match step {
            Step::Again => self.defer(page, Work::Unprotect, Duration::ZERO),
            Step::Gone => self.gone.store(true, Ordering::Release),
            Step::Fatal(e) => return Err(e),
            Step::Done | Step::Pending => {}
        }
        Ok(())
    }

    /// Runs deferred work; with `only_due`, only items whose time has come. Returns the earliest
    /// deadline of what is left.
    fn run_deferred(self: &Arc<Self>, only_due: bool) -> Result<Option<Instant>> {
        let now = Instant::now();
        let due: Vec<Deferred> = {
            let mut q = self.deferred.lock().unwrap_or_else(PoisonError::into_inner);
            if q.is_empty() {
                return Ok(None);
            }
            let (due, later): (Vec<_>, Vec<_>) = q.drain(..).partition(|d| {
                // After a drain, EAGAIN'd installs are retried at once (the drain may have
                // consumed the event that caused it); fetch retries keep their backoff.
                d.not_before <= now || (!only_due && !matches!(d.work, Work::Refetch { .. }))
            });
            *q = later;
            self.deferred_len.store(q.len(), Ordering::Release);
            due
        };
        for d in due {
            let step = match d.work {
                Work::Serve { write } => self.serve(d.page, write, false),
                Work::Install { write } => self.serve(d.page, write, true),
                Work::Unprotect => self.unprotect(d.page),
                Work::Refetch { write, attempt } => {
                    if self.states.get(d.page.idx) == PageState::Removed {
                        self.serve(d.page, write, true)
                    } else {
                        Metrics::inc(&self.metrics.fetch_retries);
                        self.start_fetch(d.page, write, attempt);
                        Step::Pending
                    }
                }
            };
            match step {
                Step::Done | Step::Pending => {}
                Step::Gone => self.gone.store(true, Ordering::Release),
                Step::Fatal(e) => return Err(e),
                Step::Again => {
                    let waited = now.saturating_duration_since(d.first);
                    if waited >= self.config.eagain_budget {
                        return Err(UffdError::new(
                            ErrorKind::Uffd,
                            format!(
                                "page at file offset {:#x} (host {:#x}) kept getting EAGAIN for {waited:?} ({} retries)",
                                d.page.offset, d.page.host, d.eagain_retries
                            ),
                        ));
                    }
                    let backoff = Duration::from_millis(1)
                        .saturating_mul(1 << d.eagain_retries.min(16))
                        .min(self.config.eagain_max_backoff);
                    self.push_deferred(Deferred {
                        eagain_retries: d.eagain_retries + 1,
                        not_before: Instant::now() + backoff,
                        ..d
                    });
                }
            }
        }
        let q = self.deferred.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(q.iter().map(|d| d.not_before).min())
    }

    fn is_deferred(&self, page: Page) -> bool {
        if self.deferred_len.load(Ordering::Acquire) == 0 {
            return false;
        }
        let q = self.deferred.lock().unwrap_or_else(PoisonError::into_inner);
        q.iter()
            .any(|d| d.page.idx == page.idx && !matches!(d.work, Work::Unprotect))
    }

    // ---- shared by the fault thread and fetch completions ----

    fn defer(&self, page: Page, work: Work, delay: Duration) {
        if matches!(
            work,
            Work::Serve { .. } | Work::Install { .. } | Work::Unprotect
        ) {
            Metrics::inc(&self.metrics.eagain);
        }
        let now = Instant::now();
        self.push_deferred(Deferred {
            page,
            work,
            eagain_retries: 0,
            first: now,
            not_before: now + delay,
        });
    }

    fn push_deferred(&self, d: Deferred) {
        let mut q = self.deferred.lock().unwrap_or_else(PoisonError::into_inner);
        q.push(d);
        self.deferred_len.store(q.len(), Ordering::Release);
        drop(q);
        os::eventfd_signal(self.wake.as_fd());
    }

    /// Hands a failure from a fetch thread to the fault thread.
    fn set_fatal(&self, e: UffdError) {
        let mut f = self.fatal.lock().unwrap_or_else(PoisonError::into_inner);
        if f.is_none() {
            *f = Some(e);
        }
        drop(f);
        os::eventfd_signal(self.wake.as_fd());
    }

    /// Serves a missing-page fault (`from_fetch`: the page's fetch has completed).
    fn serve(self: &Arc<Self>, page: Page, write: bool, from_fetch: bool) -> Step {
        let state = self.states.get(page.idx);
        match state {
            PageState::Fetching if !from_fetch => {
                Metrics::inc(&self.metrics.faults_deduped);
                return Step::Pending;
            }
            PageState::Removed | PageState::Zero => return self.install_zero(page, write, state),
            _ => {}
        }
        match self.source.lookup(page.offset, self.page_size) {
            Lookup::Ready(src) => self.install_copy(page, src, write, state),
            // The staging page lives until the end of this arm, i.e. across the copy.
            Lookup::Owned(buf) => self.install_copy(page, buf.as_ptr(), write, state),
            Lookup::Zero => self.install_zero(page, write, state),
            Lookup::Missing if from_fetch => {
                // The source said the page is present, but it is not: a source bug. Never guess
                // the data: fail closed.
                Step::Fatal(self.source_error(
                    page,
                    &FetchError("fetch reported success but the page is still missing".into()),
                    1,
                ))
            }
            Lookup::Missing => {
                if !self.states.transition(page.idx, state, PageState::Fetching) {
                    // Changed under us (a concurrent REMOVE): serve again with the new state.
                    return self.serve(page, write, false);
                }
                self.start_fetch(page, write, 1);
                Step::Pending
            }
        }
    }

    fn start_fetch(self: &Arc<Self>, page: Page, write: bool, attempt: u32) {
        Metrics::inc(&self.metrics.fetches);
        let started = Instant::now();
        let me = Arc::clone(self);
        self.source.fetch(
            page.offset,
            self.page_size,
            Box::new(move |r| me.fetch_done(page, write, attempt, started, r)),
        );
    }

    /// A fetch completion (any thread).
    fn fetch_done(
        self: &Arc<Self>,
        page: Page,
        write: bool,
        attempt: u32,
        started: Instant,
        r: std::result::Result<(), FetchError>,
    ) {
        self.metrics.record_fetch(started.elapsed());
        match r {
            Ok(()) => match self.serve(page, write, true) {
                Step::Done | Step::Pending => {}
                Step::Again => self.defer(page, Work::Install { write }, Duration::ZERO),
                Step::Gone => {
                    self.gone.store(true, Ordering::Release);
                    os::eventfd_signal(self.wake.as_fd());
                }
                Step::Fatal(e) => self.set_fatal(e),
            },
            Err(e) => {
                Metrics::inc(&self.metrics.fetch_failures);
                if attempt < self.config.fetch_attempts {
                    tracing::warn!(offset = page.offset, attempt, error = %e, "UFFD page fetch failed; retrying");
                    let backoff = self
                        .config
                        .fetch_backoff
                        .saturating_mul(1 << (attempt - 1).min(16));
                    self.defer(
                        page,
                        Work::Refetch {
                            write,
                            attempt: attempt + 1,
                        },
                        backoff,
                    );
                } else {
                    self.set_fatal(self.source_error(page, &e, attempt));
                }
            }
        }
    }

    fn source_error(&self, page: Page, cause: &FetchError, attempts: u32) -> UffdError {
        UffdError::new(
            ErrorKind::Source,
            format!(
                "page at file offset {:#x} ({} bytes, host {:#x}) could not be fetched after {attempts} attempt(s): {cause}",
                page.offset, self.page_size, page.host
            ),
        )
    }

    // ---- prefault (any thread) ----

    fn prefault(&self, offset: u64) -> Result<Prefault> {
        if self.ended.load(Ordering::Acquire)
            || self.stop.load(Ordering::Acquire)
            || self.gone.load(Ordering::Acquire)
        {
            return Ok(Prefault::Ended);
        }
        let ps = self.page_size;
        let host = self
            .regions
            .regions()
            .iter()
            .find(|r| offset >= r.offset && offset - r.offset < r.size)
            .map(|r| r.base_host_virt_addr + (offset - r.offset));
        let (Some(host), true) = (host, offset.is_multiple_of(ps)) else {
            return Err(UffdError::new(
                ErrorKind::Protocol,
                format!(
                    "prefault of file offset {offset:#x}: not a page of the memory file; {}",
                    self.regions
                ),
            ));
        };
        let idx = usize::try_from(offset / ps)
            .map_err(|_| UffdError::new(ErrorKind::Protocol, "page index overflow"))?;
        let page = Page { host, offset, idx };
        let state = self.states.get(idx);
        if state != PageState::NotPresent {
            Metrics::inc(&self.metrics.prefault_skipped);
            return Ok(Prefault::Skipped(state));
        }
        let mode = self.copy_mode(false);
        let (next, r) = match self.source.lookup(offset, ps) {
            Lookup::Missing => return Ok(Prefault::NotReady),
            Lookup::Ready(src) => (PageState::Clean, self.prefault_copy(page, src, mode)),
            Lookup::Owned(buf) => (
                PageState::Clean,
                self.prefault_copy(page, buf.as_ptr(), mode),
            ),
            Lookup::Zero => (
                PageState::Zero,
                self.prefault_copy(page, self.zeros.as_ptr(), mode),
            ),
        };
        let Some(r) = r else {
            Metrics::inc(&self.metrics.prefault_skipped);
            return Ok(Prefault::Skipped(self.states.get(idx)));
        };
        match r {
            Ok(()) => {
                Metrics::inc(&self.metrics.prefaults);
                if next == PageState::Clean {
                    Metrics::add(&self.metrics.prefault_bytes, ps);
                }
                Ok(Prefault::Installed)
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    // A fault's copy got there first (it saw our claim and copied anyway): it
                    // wakes its waiters itself; the state is the fault's.
                    Metrics::inc(&self.metrics.prefault_skipped);
                    Ok(Prefault::Skipped(self.states.get(idx)))
                }
                Some(libc::EAGAIN) => {
                    self.states.transition(idx, next, PageState::NotPresent);
                    Ok(Prefault::Busy)
                }
                Some(libc::ESRCH) => Ok(Prefault::Ended),
                _ => {
                    self.states.transition(idx, next, PageState::NotPresent);
                    Err(UffdError::io(
                        ErrorKind::Uffd,
                        format!(
                            "prefault of the page at file offset {offset:#x} (host {host:#x}, {ps} bytes)"
                        ),
                        e,
                    ))
                }
            },
        }
    }

    /// Claims NotPresent -> (Clean for data, Zero for the zero buffer) and copies; `None` when
    /// the claim failed (a fault got there first).
    fn prefault_copy(&self, page: Page, src: *const u8, mode: u64) -> Option<io::Result<()>> {
        let next = if std::ptr::eq(src, self.zeros.as_ptr()) {
            PageState::Zero
        } else {
            PageState::Clean
        };
        if !self
            .states
            .transition(page.idx, PageState::NotPresent, next)
        {
            return None;
        }
        let r = ioctl::copy(self.uffd.as_fd(), page.host, src, self.page_size, mode);
        Some(if mode != 0 {
            self.learn_wp(r, || {
                ioctl::copy(self.uffd.as_fd(), page.host, src, self.page_size, 0)
            })
        } else {
            r
        })
    }

    /// Whether a read fault should be installed write-protected.
    fn copy_mode(&self, write: bool) -> u64 {
        if !write && self.wp.load(Ordering::Relaxed) != WP_OFF {
            ioctl::COPY_MODE_WP
        } else {
            0
        }
    }

    /// Records `next` for the page *before* the install wakes the faulting thread, so a fault that
    /// has returned always has its state recorded; restores `prev` if the install did not happen.
    fn record_then(&self, page: Page, prev: PageState, next: PageState, step: Step) -> Step {
        match step {
            Step::Done => {}
            Step::Again | Step::Gone | Step::Fatal(_) | Step::Pending => {
                self.states.transition(page.idx, next, prev);
            }
        }
        step
    }

    fn install_copy(&self, page: Page, src: *const u8, write: bool, prev: PageState) -> Step {
        let next = if write {
            PageState::Dirty
        } else {
            PageState::Clean
        };
        if !self.states.transition(page.idx, prev, next) {
            // Removed meanwhile (a REMOVE read by the fault thread): serve zeros instead.
            let now = self.states.get(page.idx);
            if now == PageState::Removed {
                return self.install_zero(page, write, now);
            }
            // Installed meanwhile by a prefault: this copy will get EEXIST. A write fault still
            // writes the page once woken, so it is dirty (without write-protect no later fault
            // would tell).
            if write && matches!(now, PageState::Clean | PageState::Zero) {
                self.states.transition(page.idx, now, PageState::Dirty);
            }
        }
        let mode = self.copy_mode(write);
        let mut r = ioctl::copy(self.uffd.as_fd(), page.host, src, self.page_size, mode);
        if mode != 0 {
            r = self.learn_wp(r, || {
                ioctl::copy(self.uffd.as_fd(), page.host, src, self.page_size, 0)
            });
        }
        let copied = r.is_ok();
        let step = self.ioctl_outcome(page, r, "UFFDIO_COPY");
        if copied {
            Metrics::inc(&self.metrics.copies);
            Metrics::add(&self.metrics.bytes_copied, self.page_size);
        }
        self.record_then(page, prev, next, step)
    }

    fn install_zero(&self, page: Page, write: bool, prev: PageState) -> Step {
        let next = if write {
            PageState::Dirty
        } else {
            PageState::Zero
        };
        self.states.transition(page.idx, prev, next);
        let mode = self.copy_mode(write);
        let r = if self.page_size == thaw_codec::PAGE_SIZE && mode == 0 {
            ioctl::zeropage(self.uffd.as_fd(), page.host, self.page_size)
        } else {
            // Hugetlbfs has no zeropage, and ZEROPAGE cannot write-protect: copy zeros.
            let zeros = self.zeros.as_ptr();
            let r = ioctl::copy(self.uffd.as_fd(), page.host, zeros, self.page_size, mode);
            if mode != 0 {
                self.learn_wp(r, || {
                    if self.page_size == thaw_codec::PAGE_SIZE {
                        ioctl::zeropage(self.uffd.as_fd(), page.host, self.page_size)
                    } else {
                        ioctl::copy(self.uffd.as_fd(), page.host, zeros, self.page_size, 0)
                    }
                })
            } else {
                r
            }
        };
        if r.is_ok() {
            Metrics::inc(&self.metrics.zero_installs);
        }
        let step = self.ioctl_outcome(page, r, "zero install");
        self.record_then(page, prev, next, step)
    }

    /// After a copy with `UFFDIO_COPY_MODE_WP`: EINVAL means the range is not registered for
    /// write-protect; remember that and redo the install without it.
    fn learn_wp(
        &self,
        r: io::Result<()>,
        retry: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        match r {
            Err(e) if is_errno(&e, libc::EINVAL) => {
                let r2 = retry();
                let worked = r2.as_ref().is_ok_and(|()| true)
                    || r2.as_ref().is_err_and(|e| !is_errno(e, libc::EINVAL));
                if worked && self.wp.swap(WP_OFF, Ordering::Relaxed) != WP_OFF {
                    {
                        tracing::info!(
                            "guest memory is not registered for write-protect: dirty tracking covers write faults only"
                        );
                    }
                }
                r2
            }
            Ok(()) => {
                self.wp.store(WP_ON, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn unprotect(&self, page: Page) -> Step {
        // Dirty before the ioctl wakes the writer; a retried or failed unprotect keeps it Dirty
        // (the guest is about to write the page either way).
        self.states.set(page.idx, PageState::Dirty);
        let r = ioctl::write_protect(self.uffd.as_fd(), page.host, self.page_size, false);
        self.ioctl_outcome(page, r, "UFFDIO_WRITEPROTECT")
    }

    /// Classifies an install ioctl's result.
    fn ioctl_outcome(&self, page: Page, r: io::Result<()>, what: &str) -> Step {
        let Err(e) = r else {
            return Step::Done;
        };
        match e.raw_os_error() {
            Some(libc::EEXIST) => {
                // Already present (a concurrent install): wake whoever waits on it.
                Metrics::inc(&self.metrics.eexist);
                match ioctl::wake(self.uffd.as_fd(), page.host, self.page_size) {
                    Ok(()) => Step::Done,
                    Err(e) if is_errno(&e, libc::ESRCH) => Step::Gone,
                    Err(e) if is_errno(&e, libc::EAGAIN) => Step::Again,
                    Err(e) => Step::Fatal(UffdError::io(
                        ErrorKind::Uffd,
                        format!("UFFDIO_WAKE of host {:#x}", page.host),
                        e,
                    )),
                }
            }
            Some(libc::EAGAIN) => Step::Again,
            Some(libc::ESRCH) => Step::Gone,
            _ => Step::Fatal(UffdError::io(
                ErrorKind::Uffd,
                format!(
                    "{what} of the page at file offset {:#x} (host {:#x}, {} bytes) failed",
                    page.offset, page.host, self.page_size
                ),
                e,
            )),
        }
    }
}
