//! The NBD server (`thaw serve`): exports of layered build files over TCP and unix sockets, on
//! the thread-per-core runtime.
//!
//! ```text
//! acceptor thread per listener (blocking accept)
//!     -> connection handed to a worker (round robin), as a tokio-uring socket
//!        handshake: thaw_codec::nbd::ServerHandshake, under a deadline
//!        transmission: read a request, validate, spawn a local task; many in flight,
//!        answered out of order; replies queued whole, one writer task per connection
//!        sends every queued reply with one writev
//!            READ          engine (zero-copy from the cache when present) + overlay
//!            WRITE/ZEROES  copy-on-write overlay (overlay.rs)
//!            BLOCK_STATUS  header mappings (nil = HOLE|ZERO) + overlay
//!            CACHE         prefetch of the range
//! ```
//!
//! Shutdown ([`Server::shutdown`]): listeners close, connections in the handshake get
//! `ERR_SHUTDOWN` for their next options (for a short grace), connections in transmission stop
//! reading, finish their in-flight requests and close. See `docs/nbd-server.md`.
//!
//! The export set is dynamic ([`Exports`]): exports are added and removed while connections run.
//! A connection's handshake works on the set as it was when the connection arrived (an
//! `Arc<ExportSet>` taken once); a connection in transmission holds its [`Export`] and reads no
//! shared state per request. Removing an export stops its connections the way shutdown does
//! (each export has its own stop signal, which shutdown raises on every export).

pub mod attach;
mod conn;
pub mod gate;
pub mod io;
pub mod overlay;

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use thaw_codec::nbd::{
    BlockSize, Command, ExportConfig, ExportFeatures, HandshakeConfig, Negotiated,
};
use tokio::sync::watch;

use crate::engine::LayeredFile;
use crate::runtime::{Handle, Runtime, TaskError};
pub use gate::{HeldWrites, WriteGate};
pub use overlay::Overlay;

/// Default handshake deadline: generous, because a slow (emulated) guest's `nbd-client` may take
/// seconds to read the greeting.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default bytes of READ/WRITE payload in flight per connection (backpressure: the connection
/// stops reading requests above it).
pub const DEFAULT_MAX_INFLIGHT: u64 = 256 << 20;

/// Default cap on open connections (a guard against floods of half-open handshakes).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Largest READ/WRITE payload advertised (the spec's default maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// One export: a layered build file, with an overlay when writable.
#[derive(Debug)]
pub struct Export {
    /// What the handshake advertises.
    pub config: ExportConfig,
    /// The image.
    pub file: Arc<LayeredFile>,
    /// The copy-on-write overlay (`None`: read-only).
    pub overlay: Option<Arc<Overlay>>,
    /// Holds writes back while the export is snapshotted (pause).
    pub gate: WriteGate,
    /// Raised when the export is removed or the server shuts down: its connections stop
    /// reading requests, finish the ones in flight and close.
    stop: watch::Sender<bool>,
    /// Connections in transmission on this export.
    connections: AtomicUsize,
    /// The overlay generation ([`Overlay::settled_generation`]) a snapshot last stored: the
    /// overlay holds unsaved changes while its generation differs.
    saved_generation: AtomicU64,
}

impl Export {
    /// An export named `name` of `file`: read-only without an overlay, writable with one
    /// (which must have the file's size). Every optional feature is advertised (write-like ones
    /// only when writable); block sizes: minimum 1, preferred 4096 (or the file's block size),
    /// maximum 32 MiB.
    ///
    /// # Errors
    /// The overlay's size differs from the file's; a name over 4096 bytes.
    pub fn new(
        name: &str,
        file: Arc<LayeredFile>,
        overlay: Option<Arc<Overlay>>,
    ) -> anyhow::Result<Self> {
        if let Some(ov) = &overlay
            && ov.size() != file.size()
        {
            bail!(
                "overlay of {} bytes for an export of {} bytes",
                ov.size(),
                file.size()
            );
        }
        let preferred = u32::try_from(file.block_size())
            .ok()
            .filter(|b| b.is_power_of_two() && (512..=MAX_PAYLOAD).contains(b))
            .unwrap_or(4096);
        let config = ExportConfig {
            name: name.to_string(),
            description: format!(
                "thaw: build {} {}",
                file.header().metadata.build_id,
                file.file()
            ),
            size: file.size(),
            read_only: overlay.is_none(),
            block_size: BlockSize {
                min: 1,
                preferred,
                max: MAX_PAYLOAD,
            },
            features: ExportFeatures {
                flush: true,
                fua: true,
                trim: true,
                write_zeroes: true,
                fast_zero: true,
                cache: true,
                // Every connection of an export shares its overlay: a FLUSH on one covers all.
                multi_conn: true,
                rotational: false,
                df: true,
                base_allocation: true,
            },
        };
        config.validate().context("export configuration")?;
        Ok(Self {
            config,
            file,
            overlay,
            gate: WriteGate::default(),
            stop: watch::Sender::new(false),
            connections: AtomicUsize::new(0),
            saved_generation: AtomicU64::new(0),
        })
    }

    /// Connections in transmission on this export (kernel attach connections included).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Whether the export was stopped (removed, or the server shuts down).
    pub fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Records that a snapshot stored the overlay as of `generation` (read with
    /// [`Overlay::settled_generation`] while the write gate was held).
    pub fn mark_saved(&self, generation: u64) {
        self.saved_generation.store(generation, Ordering::Release);
    }

    /// Whether the overlay holds writes no snapshot stored: its generation moved since the last
    /// [`mark_saved`](Self::mark_saved) (a fresh overlay is at generation 0, so an export never
    /// written is clean). Read-only exports never are. Exact only while the write gate is held.
    pub fn has_unsaved_changes(&self) -> bool {
        self.overlay.as_ref().is_some_and(|ov| {
            ov.settled_generation() != self.saved_generation.load(Ordering::Acquire)
        })
    }

    /// Stops the export's connections (sticky: connections that start later stop at once).
    fn raise_stop(&self) {
        self.stop.send_replace(true);
    }
}

/// Counts a connection in transmission on its export while alive.
pub(crate) struct ExportConnGuard(Arc<Export>);

impl ExportConnGuard {
    pub(crate) fn new(export: &Arc<Export>) -> Self {
        export.connections.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(export))
    }
}

impl Drop for ExportConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The exports at one moment, with the handshake configuration that offers them.
#[derive(Debug)]
pub struct ExportSet {
    exports: Vec<Arc<Export>>,
    handshake: HandshakeConfig,
}

impl ExportSet {
    /// `exports` (names unique, checked), with `default` as the export an empty name selects
    /// when it is in the set.
    fn new(exports: Vec<Arc<Export>>, default: Option<&str>) -> anyhow::Result<Self> {
        let mut handshake =
            HandshakeConfig::new(exports.iter().map(|e| e.config.clone()).collect());
        handshake.default_export = default
            .filter(|d| exports.iter().any(|e| e.config.name == *d))
            .map(str::to_string);
        // Validates names (unique) and limits up front.
        thaw_codec::nbd::ServerHandshake::new(handshake.clone()).context("export set")?;
        Ok(Self { exports, handshake })
    }

    /// The exports, in the order they were added.
    pub fn exports(&self) -> &[Arc<Export>] {
        &self.exports
    }

    /// The export named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Export>> {
        self.exports.iter().find(|e| e.config.name == name)
    }
}

/// Why an export could not be added.
#[derive(Debug)]
pub enum AddError {
    /// An export of that name is served.
    Duplicate(String),
    /// The server is shutting down.
    Stopping,
    /// The export cannot be offered (a name over 4096 bytes, say).
    Invalid(anyhow::Error),
}

impl std::fmt::Display for AddError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Duplicate(n) => write!(f, "an export named {n:?} is already served"),
            Self::Stopping => f.write_str("the server is shutting down"),
            Self::Invalid(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for AddError {}

/// The dynamic export set of a running [`Server`] (cheap to clone; the control API holds one).
#[derive(Debug, Clone)]
pub struct Exports {
    shared: Arc<Shared>,
}

impl Exports {
    /// The current set.
    pub fn current(&self) -> Arc<ExportSet> {
        self.shared.current()
    }

    /// Adds `export` (new handshakes see it at once) and returns it.
    ///
    /// # Errors
    /// [`AddError`]: the name is taken, the server is stopping, the export is invalid.
    pub fn add(&self, export: Export) -> Result<Arc<Export>, AddError> {
        let mut slot = self
            .shared
            .exports
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if *self.shared.shutdown.borrow() {
            return Err(AddError::Stopping);
        }
        if slot.get(&export.config.name).is_some() {
            return Err(AddError::Duplicate(export.config.name.clone()));
        }
        let export = Arc::new(export);
        let mut list = slot.exports.clone();
        list.push(Arc::clone(&export));
        *slot = Arc::new(
            ExportSet::new(list, self.shared.default_export.as_deref())
                .map_err(AddError::Invalid)?,
        );
        tracing::info!(export = %export.config.name, "nbd: export added");
        Ok(export)
    }

    /// Removes the export named `name` from the set (new handshakes no longer see it) and stops
    /// its connections: each stops reading requests, finishes the ones in flight and closes.
    /// Returns the export (its connections may still be draining: [`Export::connections`]);
    /// `None` when no export has that name.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut slot = self
            .shared
            .exports
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let export = Arc::clone(slot.get(name)?);
        let list: Vec<Arc<Export>> = slot
            .exports
            .iter()
            .filter(|e| !Arc::ptr_eq(e, &export))
            .cloned()
            .collect();
        // A subset of a valid set is valid; the fallback keeps the old set, never panics.
        match ExportSet::new(list, self.shared.default_export.as_deref()) {
            Ok(set) => *slot = Arc::new(set),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "nbd: export set after a removal");
                return None;
            }
        }
        drop(slot);
        export.raise_stop();
        tracing::info!(export = name, "nbd: export removed");
        Some(export)
    }
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `tcp:HOST:PORT` (port 0: an ephemeral port).
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Self::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            if a.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!("{s:?}: expected tcp:HOST:PORT"));
            }
            return Ok(Self::Tcp(a.to_string()));
        }
        Err(format!("{s:?}: expected unix:PATH or tcp:HOST:PORT"))
    }
}

/// A bound listener's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    /// TCP, with the actual port.
    Tcp(SocketAddr),
    /// Unix socket path.
    Unix(PathBuf),
}

impl BoundAddr {
    /// The NBD URI of export `name` on this address (`nbd://HOST:PORT/NAME`,
    /// `nbd+unix:///NAME?socket=PATH`).
    pub fn uri(&self, name: &str) -> String {
        match self {
            Self::Tcp(a) => format!("nbd://{a}/{name}"),
            Self::Unix(p) => format!("nbd+unix:///{name}?socket={}", p.display()),
        }
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Listeners (none: only connections handed in with [`Server::serve_negotiated`], as kernel
    /// attach does).
    pub listen: Vec<ListenAddr>,
    /// Runtime workers (0 = one per core).
    pub workers: usize,
    /// Handshake deadline per connection.
    pub handshake_timeout: Duration,
    /// Payload bytes in flight per connection.
    pub max_inflight_bytes: u64,
    /// Most open connections (handshakes included); more are closed at once.
    pub max_connections: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            workers: 0,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_inflight_bytes: DEFAULT_MAX_INFLIGHT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Server counters (monotonic, relaxed).
#[derive(Debug, Default)]
pub struct ServerCounters {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections that reached transmission.
    pub negotiated: AtomicU64,
    /// Handshakes rejected (protocol violations).
    pub rejected: AtomicU64,
    /// Handshakes that hit the deadline.
    pub handshake_timeouts: AtomicU64,
    /// Requests executed, per command (read, write, flush, trim, cache, write_zeroes,
    /// block_status).
    pub requests: [AtomicU64; 8],
    /// Error replies sent.
    pub errors: AtomicU64,
    /// Bytes returned by READs.
    pub read_bytes: AtomicU64,
    /// Bytes received by WRITEs.
    pub write_bytes: AtomicU64,
}

impl ServerCounters {
    fn bump_negotiated(&self) {
        self.negotiated.fetch_add(1, Ordering::Relaxed);
    }
    fn bump_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }
    fn bump_handshake_timeout(&self) {
        self.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
    }
    fn bump_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
    fn bump_read_bytes(&self, n: u64) {
        self.read_bytes.fetch_add(n, Ordering::Relaxed);
    }
    fn bump_request(&self, cmd: Command, len: u64) {
        let i = usize::from(cmd.as_u16()).min(7);
        if let Some(c) = self.requests.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if cmd == Command::Write {
            self.write_bytes.fetch_add(len, Ordering::Relaxed);
        }
    }
}

/// What every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The current export set: replaced whole by an add or a remove; a handshake clones the
    /// `Arc` once.
    exports: RwLock<Arc<ExportSet>>,
    /// The export an empty name selects while it is served (the first one given at start).
    default_export: Option<String>,
    handshake_timeout: Duration,
    max_inflight_bytes: u64,
    shutdown: watch::Receiver<bool>,
    counters: Arc<ServerCounters>,
}

impl Shared {
    pub(crate) fn current(&self) -> Arc<ExportSet> {
        Arc::clone(&self.exports.read().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A running server. [`Server::shutdown`] (or drop) stops it.
#[derive(Debug)]
pub struct Server {
    runtime: Option<Runtime>,
    shutdown_tx: watch::Sender<bool>,
    acceptors: Vec<Acceptor>,
    live: Arc<AtomicUsize>,
    bound: Vec<BoundAddr>,
    counters: Arc<ServerCounters>,
    shared: Arc<Shared>,
    next_id: Arc<AtomicU64>,
    next_worker: Arc<AtomicUsize>,
}

#[derive(Debug)]
struct Acceptor {
    addr: BoundAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Decrements the live-connection count when the connection task ends (or is dropped).
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("thaw_nbd_connections_active").decrement(1.0);
    }
}

enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Server {
    /// Binds every listener and starts serving `exports` (the first is the default export:
    /// what an empty name selects while it is served). The set may be empty; [`Server::exports`]
    /// adds and removes exports later.
    ///
    /// # Errors
    /// Invalid export set (duplicate names); a listener that cannot be bound; the runtime cannot
    /// start.
    pub fn start(exports: Vec<Export>, opts: &ServeOptions) -> anyhow::Result<Self> {
        let exports: Vec<Arc<Export>> = exports.into_iter().map(Arc::new).collect();
        let default_export = exports.first().map(|e| e.config.name.clone());
        let set = ExportSet::new(exports, default_export.as_deref())?;
        let runtime = Runtime::builder()
            .workers(opts.workers)
            .shutdown_grace(Duration::from_secs(2))
            .build()
            .context("starting the runtime")?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let counters = Arc::new(ServerCounters::default());
        let shared = Arc::new(Shared {
            exports: RwLock::new(Arc::new(set)),
            default_export,
            handshake_timeout: opts.handshake_timeout,
            max_inflight_bytes: opts.max_inflight_bytes,
            shutdown: shutdown_rx,
            counters: Arc::clone(&counters),
        });
        let live = Arc::new(AtomicUsize::new(0));
        let next_id = Arc::new(AtomicU64::new(1));
        let handle = runtime.handle().clone();
        // The runtime goes in first: if a listener fails below, dropping `server` stops the
        // acceptors already started, then the runtime.
        let mut server = Self {
            runtime: Some(runtime),
            shutdown_tx,
            acceptors: Vec::new(),
            live: Arc::clone(&live),
            bound: Vec::new(),
            counters,
            shared: Arc::clone(&shared),
            next_id: Arc::clone(&next_id),
            next_worker: Arc::new(AtomicUsize::new(0)),
        };
        for l in &opts.listen {
            let (addr, listener) = bind(l)?;
            let stop = Arc::new(AtomicBool::new(false));
            let ctx = AcceptCtx {
                handle: handle.clone(),
                shared: Arc::clone(&shared),
                live: Arc::clone(&live),
                next_id: Arc::clone(&next_id),
                stop: Arc::clone(&stop),
                max_connections: opts.max_connections.max(1),
            };
            let thread = thread::Builder::new()
                .name("thaw-nbd-accept".into())
                .spawn(move || ctx.run(listener))
                .context("starting an accept thread")?;
            server.bound.push(addr.clone());
            server.acceptors.push(Acceptor {
                addr,
                stop,
                thread: Some(thread),
            });
        }
        Ok(server)
    }

    /// The bound listener addresses (TCP with the actual port), in `--listen` order.
    pub fn addresses(&self) -> &[BoundAddr] {
        &self.bound
    }

    /// The exports served now.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.shared.current().exports.clone()
    }

    /// The dynamic export set: add and remove exports while the server runs.
    pub fn export_set(&self) -> Exports {
        Exports {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Counters.
    pub fn counters(&self) -> &ServerCounters {
        &self.counters
    }

    /// Serves `stream` as a connection of export `neg.export_name` that starts in the
    /// transmission phase with `neg`'s flags (no handshake): the server end of a socketpair whose
    /// other end the kernel's nbd driver uses (kernel attach, [`attach`]). The connection counts
    /// as live and drains on [`Server::shutdown`] (or the export's removal) like any other.
    ///
    /// # Errors
    /// No such export; the server is stopping (no worker takes the connection).
    pub fn serve_negotiated(&self, stream: UnixStream, neg: Negotiated) -> anyhow::Result<()> {
        let Some(export) = self.shared.current().get(&neg.export_name).cloned() else {
            bail!("no export named {:?}", neg.export_name);
        };
        self.kernel_conns()?.serve_negotiated(stream, neg, export)
    }

    /// A handle that starts handshake-less connections on this server's workers from any
    /// thread (the control API attaches exports it adds with it).
    ///
    /// # Errors
    /// The server is stopped.
    pub fn kernel_conns(&self) -> anyhow::Result<KernelConns> {
        let Some(rt) = self.runtime.as_ref() else {
            bail!("the server is stopped");
        };
        Ok(KernelConns {
            handle: rt.handle().clone(),
            shared: Arc::clone(&self.shared),
            live: Arc::clone(&self.live),
            next_id: Arc::clone(&self.next_id),
            next_worker: Arc::clone(&self.next_worker),
        })
    }

    /// Connections currently open.
    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Stops accepting, asks every connection to finish (handshakes get `ERR_SHUTDOWN`;
    /// transmissions drain their in-flight requests and close), waits up to `grace` for them,
    /// then stops the runtime. Returns the connections still open at the deadline.
    pub fn shutdown(mut self, grace: Duration) -> usize {
        self.stop(grace)
    }

    fn stop(&mut self, grace: Duration) -> usize {
        let _ = self.shutdown_tx.send(true);
        {
            // Under the write lock: an add either finished before (its export is stopped here)
            // or sees the shutdown flag and is refused.
            let set = self
                .shared
                .exports
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            for e in set.exports() {
                e.raise_stop();
            }
        }
        for a in &mut self.acceptors {
            a.stop.store(true, Ordering::Release);
            wake(&a.addr);
            if let Some(t) = a.thread.take() {
                let _ = t.join();
            }
            if let BoundAddr::Unix(p) = &a.addr {
                let _ = std::fs::remove_file(p);
            }
        }
        let deadline = Instant::now() + grace;
        while self.live.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let left = self.live.load(Ordering::Acquire);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown();
        }
        left
    }
}

/// Starts connections of a running [`Server`] that begin in the transmission phase (kernel
/// attach: [`attach`]); cheap to clone. Once the server stopped, starting one fails.
#[derive(Debug, Clone)]
pub struct KernelConns {
    handle: Handle,
    shared: Arc<Shared>,
    live: Arc<AtomicUsize>,
    next_id: Arc<AtomicU64>,
    next_worker: Arc<AtomicUsize>,
}

impl KernelConns {
    /// Serves `stream` as a connection of `export` in the transmission phase with `neg`'s flags
    /// (see [`Server::serve_negotiated`]). It counts as live and drains on shutdown or the
    /// export's removal like any other.
    ///
    /// # Errors
    /// The server is stopping (no worker takes the connection; `stream` is closed).
    pub fn serve_negotiated(
        &self,
        stream: UnixStream,
        neg: Negotiated,
        export: Arc<Export>,
    ) -> anyhow::Result<()> {
        if *self.shared.shutdown.borrow() {
            bail!("the server is shutting down");
        }
        let worker =
            self.next_worker.fetch_add(1, Ordering::Relaxed) % self.handle.workers().max(1);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        spawn_conn(
            &self.handle,
            &self.shared,
            &self.live,
            id,
            worker,
            Accepted::Unix(stream),
            Some((neg, export)),
        )
        .map_err(|e| anyhow::anyhow!("no worker for the connection: {e}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.runtime.is_some() {
            self.stop(Duration::from_secs(5));
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

fn bind(l: &ListenAddr) -> anyhow::Result<(BoundAddr, Listener)> {
    match l {
        ListenAddr::Tcp(a) => {
            let addrs: Vec<SocketAddr> = a
                .to_socket_addrs()
                .with_context(|| format!("resolving {a}"))?
                .collect();
            let listener =
                TcpListener::bind(&addrs[..]).with_context(|| format!("binding tcp:{a}"))?;
            let addr = listener.local_addr()?;
            Ok((BoundAddr::Tcp(addr), Listener::Tcp(listener)))
        }
        ListenAddr::Unix(p) => {
            remove_stale_socket(p)?;
            let listener =
                UnixListener::bind(p).with_context(|| format!("binding unix:{}", p.display()))?;
            Ok((BoundAddr::Unix(p.clone()), Listener::Unix(listener)))
        }
    }
}

/// Removes a socket file nobody listens on (left by a killed server); refuses a live one.
fn remove_stale_socket(p: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(p) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        bail!("{} exists and is not a socket", p.display());
    }
    if UnixStream::connect(p).is_ok() {
        bail!("{} is in use by another server", p.display());
    }
    std::fs::remove_file(p).with_context(|| format!("removing stale socket {}", p.display()))
}

/// Wakes an acceptor blocked in `accept` (it then sees its stop flag).
fn wake(addr: &BoundAddr) {
    match addr {
        BoundAddr::Tcp(a) => {
            let mut target = *a;
            if target.ip().is_unspecified() {
                target.set_ip(match target {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            let _ = TcpStream::connect_timeout(&target, Duration::from_secs(1));
        }
        BoundAddr::Unix(p) => {
            let _ = UnixStream::connect(p);
        }
    }
}

struct AcceptCtx {
    handle: Handle,
    shared: Arc<Shared>,
    live: Arc<AtomicUsize>,
    next_id: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    max_connections: usize,
}

impl AcceptCtx {
    fn run(self, listener: Listener) {
        let mut next_worker = 0usize;
        loop {
            let accepted = match &listener {
                Listener::Tcp(l) => l.accept().map(|(s, _)| Accepted::Tcp(s)),
                Listener::Unix(l) => l.accept().map(|(s, _)| Accepted::Unix(s)),
            };
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "nbd: accept failed");
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if let Accepted::Tcp(s) = &stream
                && let Err(e) = s.set_nodelay(true)
            {
                tracing::debug!(error = %e, "nbd: TCP_NODELAY");
            }
            if self.live.load(Ordering::Acquire) >= self.max_connections {
                // Dropping the socket closes it: the client sees EOF before the greeting.
                tracing::debug!(
                    max = self.max_connections,
                    "nbd: connection limit reached, refusing"
                );
                metrics::counter!("thaw_nbd_connections_refused_total").increment(1);
                continue;
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let worker = next_worker % self.handle.workers().max(1);
            next_worker = next_worker.wrapping_add(1);
            if let Err(e) = spawn_conn(
                &self.handle,
                &self.shared,
                &self.live,
                id,
                worker,
                stream,
                None,
            ) {
                tracing::warn!(error = %e, "nbd: no worker for a connection");
            }
        }
    }
}

/// Counts connection `id` as live and serves it on `worker`: the handshake first, or straight
/// in transmission with `neg` (kernel attach). On error the socket is closed (it went down with
/// the task's closure) and the live count is back where it was.
fn spawn_conn(
    handle: &Handle,
    shared: &Arc<Shared>,
    live: &Arc<AtomicUsize>,
    id: u64,
    worker: usize,
    stream: Accepted,
    neg: Option<(Negotiated, Arc<Export>)>,
) -> Result<(), TaskError> {
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    live.fetch_add(1, Ordering::AcqRel);
    metrics::counter!("thaw_nbd_connections_total").increment(1);
    metrics::gauge!("thaw_nbd_connections_active").increment(1.0);
    let guard = LiveGuard(Arc::clone(live));
    let shared = Arc::clone(shared);
    let spawned = handle.spawn_on(worker, move || async move {
        let _guard = guard;
        let stream = match stream {
            Accepted::Tcp(s) => io::Stream::Tcp(tokio_uring::net::TcpStream::from_std(s)),
            Accepted::Unix(s) => io::Stream::Unix(tokio_uring::net::UnixStream::from_std(s)),
        };
        tracing::debug!(conn = id, worker, kernel = neg.is_some(), "nbd: connection");
        match neg {
            None => conn::serve(stream, shared, id).await,
            Some((neg, export)) => conn::serve_negotiated(stream, shared, id, neg, export).await,
        }
    });
    spawned.map(drop)
}
