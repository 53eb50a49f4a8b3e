//! UFFD handlers started and stopped at runtime (`thaw uffd --control`, `/v1/handlers`): a
//! registry of named handlers, each serving one VM's memory from one build.
//!
//! ```text
//! add ──> waiting ──(Firecracker's handshake)──> serving ──(VM gone / killed)──> finished
//!            │                                      │                            (or failed)
//!            └── remove: stop listening,            └── remove: refused while the VM runs,
//!                remove the socket                      unless forced (the peer is SIGKILLed)
//! ```
//!
//! Adding a handler opens the build's file (and every build under it) and binds the socket
//! before answering, so an unknown build or a busy socket is the caller's error at once; the
//! handshake is awaited on a thread of the handler, which then watches the fault loop. A VM is
//! never left hanging on a dead handler: stopping a serving handler (forced removal, shutdown)
//! SIGKILLs its peer first, as the fault loop does when it cannot produce a page.

use std::collections::BTreeMap;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use thaw_codec::{BuildId, FileKind};

use crate::engine::{Engine, load_prefetch_plan};
use crate::store::StoreError;
use crate::uffd::{PrefetchReport, UffdOptions, UffdServer, prepare};

/// How often a waiting handler checks for a connection or its removal, and a serving one for
/// the end of its fault loop.
const POLL: Duration = Duration::from_millis(5);

/// What `POST /v1/handlers` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSpec {
    /// The handler's name (unique in the process).
    pub name: String,
    /// The build to serve.
    pub build: BuildId,
    /// The file to serve (default `memfile`).
    #[serde(default = "default_file", with = "file_kind")]
    pub file: FileKind,
    /// The unix socket Firecracker connects to (`mem_backend.backend_path`).
    pub socket: PathBuf,
    /// Warm and prefault the build's recorded prefetch plan.
    #[serde(default)]
    pub prefetch: bool,
}

fn default_file() -> FileKind {
    FileKind::Memfile
}

/// A [`FileKind`] as its file name (`memfile`, `rootfs.ext4`).
mod file_kind {
    use serde::{Deserialize, Deserializer, Serializer};
    use thaw_codec::FileKind;

    pub fn serialize<S: Serializer>(f: &FileKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(f.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<FileKind, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("file {s:?}: {e}")))
    }
}

/// Why a handler could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A handler of that name exists.
    #[error("a handler named {0:?} exists")]
    Duplicate(String),
    /// The socket is in use (another handler's, or another process answers on it).
    #[error("{0}")]
    Busy(String),
    /// The build (or its file) is not in the store.
    #[error("{0}")]
    UnknownBuild(String),
    /// No handler of that name (or nothing of what was asked for).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The request is refused in the handler's state.
    #[error("{0}")]
    Conflict(String),
    /// Anything else (the store failed, the socket cannot be bound, ...).
    #[error("{0:#}")]
    Other(anyhow::Error),
}

/// `GET /v1/handlers` (each) and the reply of add/remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerInfo {
    /// The handler's name.
    pub name: String,
    /// The served build.
    pub build: BuildId,
    /// The served file.
    pub file: String,
    /// The socket Firecracker connects to.
    pub socket: PathBuf,
    /// `waiting`, `serving`, `finished` or `failed`.
    pub state: String,
    /// Why the handler failed (`failed`), or how the fault loop failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Firecracker's pid (after the handshake).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_pid: Option<i32>,
    /// Guest page size (after the handshake).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Whether Firecracker sent its memfd (otherwise a snapshot reads the peer's memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memfd: Option<bool>,
    /// Whether the memory is registered for write-protect tracking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_protect: Option<bool>,
    /// Pages written by the guest.
    pub dirty_pages: u64,
    /// Pages that read as zeros and were not written since.
    pub zero_pages: u64,
    /// The fault loop's counters (after the handshake).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<HandlerCounters>,
    /// Prefetch progress, in pages (when prefetching).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<PrefetchInfo>,
}

/// The fault loop's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerCounters {
    /// Missing-page faults.
    pub faults: u64,
    /// Of those, write faults.
    pub write_faults: u64,
    /// Write-protect faults.
    pub wp_faults: u64,
    /// Pages installed with data.
    pub copies: u64,
    /// Pages installed as zeros.
    pub zero_installs: u64,
    /// Bytes installed with data.
    pub bytes_copied: u64,
    /// Pages the guest removed.
    pub removed_pages: u64,
    /// Store fetches started.
    pub fetches: u64,
    /// Failed fetch attempts.
    pub fetch_failures: u64,
    /// Pages installed ahead of any fault.
    pub prefaults: u64,
}

/// Prefetch progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchInfo {
    /// Pages asked for.
    pub total: u64,
    /// Pages made present in the cache.
    pub warmed: u64,
    /// Pages installed before the guest touched them.
    pub prefaulted: u64,
    /// Pages the guest got to first.
    pub skipped: u64,
    /// Pages whose warm-up or prefault failed.
    pub failed: u64,
}

impl From<PrefetchReport> for PrefetchInfo {
    fn from(r: PrefetchReport) -> Self {
        Self {
            total: r.total,
            warmed: r.warmed,
            prefaulted: r.prefaulted,
            skipped: r.skipped,
            failed: r.failed,
        }
    }
}

enum State {
    Waiting,
    Serving(Arc<UffdServer>),
    /// The fault loop ended (or the handler was removed before the handshake): the last info.
    Finished(Box<HandlerInfo>),
    Failed(String),
}

/// One named handler.
pub struct Handler {
    spec: HandlerSpec,
    state: Mutex<State>,
    /// Asks the handler's thread to stop listening (waiting) or to stop the fault loop.
    cancel: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Started from the command line (`--build`): the command joins it; it cannot be removed.
    fixed: bool,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl Handler {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Whether `thaw uffd --build` started it.
    pub fn is_fixed(&self) -> bool {
        self.fixed
    }

    /// What it was added with.
    pub fn spec(&self) -> &HandlerSpec {
        &self.spec
    }

    /// The server, once the handshake is done and until the fault loop is joined.
    pub fn server(&self) -> Option<Arc<UffdServer>> {
        match &*self.lock() {
            State::Serving(s) => Some(Arc::clone(s)),
            _ => None,
        }
    }

    /// The handler's state and counters.
    pub fn info(&self) -> HandlerInfo {
        let mut info = HandlerInfo {
            name: self.spec.name.clone(),
            build: self.spec.build,
            file: self.spec.file.name().to_string(),
            socket: self.spec.socket.clone(),
            state: "waiting".into(),
            error: None,
            peer_pid: None,
            page_size: None,
            memfd: None,
            write_protect: None,
            dirty_pages: 0,
            zero_pages: 0,
            counters: None,
            prefetch: None,
        };
        match &*self.lock() {
            State::Waiting => {}
            State::Failed(e) => {
                info.state = "failed".into();
                info.error = Some(e.clone());
            }
            State::Finished(last) => return (**last).clone(),
            State::Serving(s) => fill(&mut info, s),
        }
        info
    }
}

/// `info` from a serving (or just finished) server.
fn fill(info: &mut HandlerInfo, s: &UffdServer) {
    let changes = s.memory_changes();
    let count = |runs: &[std::ops::Range<u64>]| runs.iter().map(|r| r.end - r.start).sum();
    let m = s.handler().metrics();
    info.state = if s.is_finished() {
        "finished"
    } else {
        "serving"
    }
    .into();
    info.peer_pid = Some(s.peer().pid);
    info.page_size = Some(s.handler().page_size());
    info.memfd = Some(s.memfd().is_some());
    info.write_protect = s.handler().write_protect_tracking();
    info.dirty_pages = count(&changes.dirty);
    info.zero_pages = count(&changes.zero);
    info.counters = Some(HandlerCounters {
        faults: m.faults_missing,
        write_faults: m.faults_write,
        wp_faults: m.faults_wp,
        copies: m.copies,
        zero_installs: m.zero_installs,
        bytes_copied: m.bytes_copied,
        removed_pages: m.removed_pages,
        fetches: m.fetches,
        fetch_failures: m.fetch_failures,
        prefaults: m.prefaults,
    });
    info.prefetch = s.prefetch_progress().map(PrefetchInfo::from);
}

/// The handlers of one process.
pub struct Handlers {
    engine: Engine,
    options: UffdOptions,
    map: Mutex<BTreeMap<String, Arc<Handler>>>,
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handlers").finish_non_exhaustive()
    }
}

impl Handlers {
    /// An empty registry serving from `engine` with `options` (the handshake timeout, the fault
    /// loop's settings, prefetch threads; `file` and `prefetch` come from each request).
    pub fn new(engine: Engine, options: UffdOptions) -> Self {
        Self {
            engine,
            options,
            map: Mutex::new(BTreeMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Handler>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every handler, by name.
    pub fn list(&self) -> Vec<Arc<Handler>> {
        self.map().values().cloned().collect()
    }

    /// The handler named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Handler>> {
        self.map().get(name).cloned()
    }

    /// Registers the server `thaw uffd --build` started (already serving). It cannot be removed;
    /// the command joins it when the VM goes away.
    ///
    /// # Errors
    /// A handler of that name exists.
    pub fn insert_fixed(
        &self,
        spec: HandlerSpec,
        server: Arc<UffdServer>,
    ) -> Result<(), HandlerError> {
        let mut map = self.map();
        if map.contains_key(&spec.name) {
            return Err(HandlerError::Duplicate(spec.name));
        }
        let name = spec.name.clone();
        map.insert(
            name,
            Arc::new(Handler {
                spec,
                state: Mutex::new(State::Serving(server)),
                cancel: Arc::new(AtomicBool::new(false)),
                thread: Mutex::new(None),
                fixed: true,
            }),
        );
        Ok(())
    }

    /// Adds a handler: opens the build's file and every build under it (and its prefetch plan),
    /// binds the socket, and waits for Firecracker's handshake on a thread of its own. Blocking
    /// (store reads): call it off any async runtime.
    ///
    /// # Errors
    /// [`HandlerError::Duplicate`] name, [`HandlerError::Busy`] socket (another handler's, a
    /// live socket of another process, or a file that is not a socket),
    /// [`HandlerError::UnknownBuild`], [`HandlerError::Other`] for the rest.
    pub fn add(&self, spec: HandlerSpec) -> Result<Arc<Handler>, HandlerError> {
        if spec.name.is_empty() || spec.name.contains('/') {
            return Err(HandlerError::Invalid(format!(
                "handler name {:?}: must be non-empty and without '/'",
                spec.name
            )));
        }
        self.check_free(&spec)?;
        let build = spec.build;
        // The engine's open says "no such file" without a typed error: ask the store first.
        let meta = self.engine.meta_store();
        match crate::layout::load_header(meta.as_ref(), build, spec.file) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(HandlerError::UnknownBuild(format!(
                    "{}: build {build} has no {}",
                    meta.url(),
                    spec.file
                )));
            }
            Err(e) => {
                return Err(HandlerError::Other(e.context(format!(
                    "reading the header of build {build} ({})",
                    spec.file
                ))));
            }
        }
        let file = self
            .engine
            .open(build, spec.file)
            .and_then(|f| {
                f.open_all()?;
                Ok(f)
            })
            .map_err(|e| {
                let not_found = e.chain().any(|c| {
                    c.downcast_ref::<StoreError>()
                        .is_some_and(StoreError::is_not_found)
                });
                let msg = format!("opening build {build} ({}): {e:#}", spec.file);
                if not_found {
                    HandlerError::UnknownBuild(msg)
                } else {
                    HandlerError::Other(anyhow::anyhow!(msg))
                }
            })?;
        let plan = if spec.prefetch {
            load_prefetch_plan(self.engine.meta_store().as_ref(), build)
                .with_context(|| format!("reading the prefetch plan of build {build}"))
                .map_err(HandlerError::Other)?
        } else {
            None
        };
        // Bind under the registry lock: two requests for one socket cannot both succeed.
        let mut map = self.map();
        if map.contains_key(&spec.name) {
            return Err(HandlerError::Duplicate(spec.name));
        }
        if let Some(other) = map.values().find(|h| h.spec.socket == spec.socket) {
            return Err(HandlerError::Busy(format!(
                "socket {} is handler {:?}'s",
                spec.socket.display(),
                other.spec.name
            )));
        }
        let listener = bind(&spec.socket)?;
        let options = UffdOptions {
            file: spec.file,
            prefetch: spec.prefetch,
            ..self.options.clone()
        };
        let pending = prepare(&self.engine, Arc::new(file), plan.as_ref(), &options);
        let handler = Arc::new(Handler {
            spec: spec.clone(),
            state: Mutex::new(State::Waiting),
            cancel: Arc::new(AtomicBool::new(false)),
            thread: Mutex::new(None),
            fixed: false,
        });
        let h = Arc::clone(&handler);
        let thread = std::thread::Builder::new()
            .name(format!("thaw-handler-{}", spec.name))
            .spawn(move || run(&h, listener, pending))
            .context("starting the handler thread")
            .map_err(HandlerError::Other)?;
        *handler
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(thread);
        map.insert(spec.name.clone(), Arc::clone(&handler));
        tracing::info!(name = %spec.name, %build, socket = %spec.socket.display(), "UFFD handler waiting for Firecracker");
        Ok(handler)
    }

    fn check_free(&self, spec: &HandlerSpec) -> Result<(), HandlerError> {
        let map = self.map();
        if map.contains_key(&spec.name) {
            return Err(HandlerError::Duplicate(spec.name.clone()));
        }
        if let Some(other) = map.values().find(|h| h.spec.socket == spec.socket) {
            return Err(HandlerError::Busy(format!(
                "socket {} is handler {:?}'s",
                spec.socket.display(),
                other.spec.name
            )));
        }
        Ok(())
    }

    /// Removes a handler: a waiting one stops listening and removes its socket; a serving one
    /// is refused while its VM runs unless `force` (then the peer is SIGKILLed first and the
    /// fault loop stopped). Returns the handler's last state.
    ///
    /// # Errors
    /// [`HandlerError::NotFound`]; [`HandlerError::Conflict`] for a serving handler without
    /// `force`, or the one `thaw uffd --build` started.
    pub fn remove(&self, name: &str, force: bool) -> Result<HandlerInfo, HandlerError> {
        let handler = self
            .get(name)
            .ok_or_else(|| HandlerError::NotFound(format!("no handler named {name:?}")))?;
        if handler.fixed {
            return Err(HandlerError::Conflict(format!(
                "handler {name:?} was started with --build: it ends with its VM"
            )));
        }
        if let Some(s) = handler.server()
            && !s.is_finished()
        {
            if !force {
                return Err(HandlerError::Conflict(format!(
                    "handler {name:?} is serving a running VM (pid {}): stop the VM first, or \
                     force=true to kill it",
                    s.peer().pid
                )));
            }
            kill(&s);
        }
        handler.cancel.store(true, Ordering::Relaxed);
        let thread = handler
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        self.map().remove(name);
        Ok(handler.info())
    }

    /// Starts warming and prefaulting pages of a serving handler: `ranges` (`[offset, len]` in
    /// the file) or, when absent, the build's recorded prefetch plan. Returns the pages queued.
    /// Blocking (reads the plan): call it off any async runtime.
    ///
    /// # Errors
    /// [`HandlerError::NotFound`] (no such handler, or no recorded plan), a handler that is not
    /// serving ([`HandlerError::Conflict`]), a range outside the file
    /// ([`HandlerError::Other`]).
    pub fn prefetch(&self, name: &str, ranges: Option<&[(u64, u64)]>) -> Result<u64, HandlerError> {
        let handler = self
            .get(name)
            .ok_or_else(|| HandlerError::NotFound(format!("no handler named {name:?}")))?;
        let server = handler
            .server()
            .filter(|s| !s.is_finished())
            .ok_or_else(|| {
                HandlerError::Conflict(format!("handler {name:?} is not serving a VM"))
            })?;
        let page = server.handler().page_size();
        let size = server.source().file().size();
        let pages = match ranges {
            Some(ranges) => {
                let mut seen = std::collections::HashSet::new();
                let mut pages = Vec::new();
                for &(offset, len) in ranges {
                    let end = offset
                        .checked_add(len)
                        .filter(|&e| e <= size)
                        .ok_or_else(|| {
                            HandlerError::Invalid(format!(
                                "range [{offset}, {len}] is outside the file ({size} bytes)"
                            ))
                        })?;
                    let mut p = offset / page * page;
                    while p < end {
                        if seen.insert(p) {
                            pages.push(p);
                        }
                        p += page;
                    }
                }
                pages
            }
            None => {
                let build = handler.spec.build;
                let plan = load_prefetch_plan(self.engine.meta_store().as_ref(), build)
                    .with_context(|| format!("reading the prefetch plan of build {build}"))
                    .map_err(HandlerError::Other)?
                    .ok_or_else(|| {
                        HandlerError::NotFound(format!(
                            "build {build} has no recorded prefetch plan (metadata.json \
                             prefetch.memory)"
                        ))
                    })?;
                crate::uffd::plan_pages(&plan, page, size)
            }
        };
        Ok(server.start_prefetch(pages, self.options.prefetch_concurrency))
    }

    /// Stops every handler (SIGTERM): waiting ones stop listening, serving ones' peers are
    /// SIGKILLed (their VM would otherwise hang on a handler that is gone) and their fault loops
    /// stopped.
    pub fn shutdown(&self) {
        let all: Vec<Arc<Handler>> = std::mem::take(&mut *self.map()).into_values().collect();
        for h in &all {
            if let Some(s) = h.server()
                && !s.is_finished()
                && !h.fixed
            {
                kill(&s);
            }
            h.cancel.store(true, Ordering::Relaxed);
        }
        for h in &all {
            let thread = h
                .thread
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(t) = thread {
                let _ = t.join();
            }
        }
    }
}

/// SIGKILLs a serving handler's peer, then stops its fault loop.
fn kill(s: &UffdServer) {
    let pid = s.peer().pid;
    let killed = thaw_uffd::kill_peer(pid);
    tracing::warn!(
        pid,
        killed,
        "UFFD handler stopped while serving: killed its peer"
    );
    s.stop();
}

/// A handler's thread: waits for the handshake (or removal), then watches the fault loop and
/// joins it when it ends.
fn run(h: &Arc<Handler>, listener: UnixListener, pending: crate::uffd::PendingServer) {
    let socket = h.spec.socket.clone();
    let stream = loop {
        if h.cancel.load(Ordering::Relaxed) {
            drop(listener);
            let _ = std::fs::remove_file(&socket);
            let mut last = h.info();
            last.state = "finished".into();
            *h.lock() = State::Finished(Box::new(last));
            return;
        }
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = std::fs::remove_file(&socket);
                *h.lock() = State::Failed(format!("accepting on {}: {e}", socket.display()));
                return;
            }
        }
    };
    // Firecracker connects once: the socket is not needed any more.
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    let result = stream
        .set_nonblocking(false)
        .context("the handshake connection")
        .and_then(|()| pending.receive(stream));
    let server = match result {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::warn!(name = %h.spec.name, error = %format!("{e:#}"), "UFFD handler: handshake failed");
            *h.lock() = State::Failed(format!("{e:#}"));
            return;
        }
    };
    tracing::info!(name = %h.spec.name, peer = server.peer().pid, "UFFD handler serving");
    *h.lock() = State::Serving(Arc::clone(&server));
    while !server.is_finished() {
        if h.cancel.load(Ordering::Relaxed) {
            server.stop();
        }
        std::thread::sleep(POLL);
    }
    // Join the fault loop once nobody else (a snapshot in progress) holds the server.
    let mut last = h.info();
    *h.lock() = State::Finished(Box::new(last.clone()));
    let mut server = server;
    let report = loop {
        match Arc::try_unwrap(server) {
            Ok(s) => break s.join(),
            Err(shared) => {
                server = shared;
                std::thread::sleep(POLL);
            }
        }
    };
    tracing::info!(name = %h.spec.name, "{}", report.summary());
    if let Err(e) = &report.result {
        last.state = "failed".into();
        last.error = Some(e.to_string());
    }
    last.prefetch = report.prefetch.map(PrefetchInfo::from);
    *h.lock() = State::Finished(Box::new(last));
}

/// Binds `path` for a handler, replacing a stale socket file (never another kind of file, nor
/// a socket another process answers on).
fn bind(path: &Path) -> Result<UnixListener, HandlerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(HandlerError::Busy(format!(
                "{} exists and is not a socket",
                path.display()
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(HandlerError::Busy(format!(
                "{} is in use by another process",
                path.display()
            )));
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))
            .map_err(HandlerError::Other)?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))
        .map_err(HandlerError::Other)?;
    listener
        .set_nonblocking(true)
        .context("the listener")
        .map_err(HandlerError::Other)?;
    Ok(listener)
}
