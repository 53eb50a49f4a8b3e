//! The thread-per-core runtime: N worker threads, each running its own `tokio-uring` runtime
//! (one io_uring, one current-thread tokio runtime, one `LocalSet`).
//!
//! - Work reaches a worker through its *inbox*, an unbounded `tokio::sync::mpsc` channel of
//!   boxed `Send` closures. The closure runs on the worker and builds the task's future there, so
//!   the future itself may be `!Send` (it may hold `Rc`s, registered buffers, a
//!   `tokio_uring::fs::File`).
//! - [`Handle::spawn_on`] answers a [`JoinHandle`] backed by a `tokio::sync::oneshot`: await it
//!   from any worker or async context, or block on it with [`JoinHandle::join`] from a plain
//!   thread.
//! - Cross-worker wakes need nothing special: the `tokio::sync` primitives (`Notify`, `oneshot`,
//!   `watch`) are `Send + Sync` and wake a waiter on another worker's event loop, or from a plain
//!   OS thread (tests `wake_*` in `server/tests/runtime.rs`).
//! - A panic inside a task is caught at the task boundary (when the crate is built with
//!   `panic = "unwind"`, as the test harness is): it is logged, the task's [`JoinHandle`] answers
//!   [`TaskError::Panicked`], and the worker goes on. Release builds use `panic = "abort"`.
//! - [`Runtime::shutdown`] (or drop) closes every inbox, lets each worker run what was already
//!   queued and wait for its live tasks (up to [`Builder::shutdown_grace`]), then joins the
//!   threads. Tasks still pending after the grace period are dropped (their handles answer
//!   [`TaskError::Cancelled`]); tokio-uring keeps the buffers of in-flight operations alive until
//!   their completions are reaped.
//!
//! # Safety model
//!
//! The only `unsafe` code here is the CPU pinning (`pin_current_thread`, `allowed_cpus`):
//! libc's `cpu_set_t` helpers and `sched_getaffinity`/`sched_setaffinity`, which read and write a
//! local, fully initialised `cpu_set_t` whose size is passed alongside it.

use std::any::Any;
use std::cell::Cell;
use std::future::Future;
use std::num::NonZeroUsize;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use std::{fmt, io, thread};

use tokio::sync::{Notify, mpsc, oneshot};

/// Default submission-queue size of each worker's io_uring (completion queue: twice that).
pub const DEFAULT_RING_ENTRIES: u32 = 256;

/// Default time a worker waits, at shutdown, for its live tasks to finish.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A unit of work in a worker's inbox: runs on the worker thread, inside its tokio-uring runtime.
type Task = Box<dyn FnOnce() + Send + 'static>;

/// Inbox message.
enum Msg {
    /// Run this closure (it spawns a local task).
    Run(Task),
    /// Close the inbox, run what is queued, wait for live tasks, exit.
    Stop,
}

thread_local! {
    /// Index of the worker this thread is, if it is one.
    static CURRENT_WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker running on this thread, or `None` on any other thread.
#[must_use]
pub fn current_worker() -> Option<usize> {
    CURRENT_WORKER.with(Cell::get)
}

/// Why a task did not produce a value, or could not be spawned.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// `spawn_on` named a worker that does not exist.
    #[error("no worker {core}: the runtime has {workers} workers")]
    NoSuchWorker {
        /// The requested worker index.
        core: usize,
        /// The number of workers.
        workers: usize,
    },
    /// The target worker has shut down (or is shutting down) and accepts no new tasks.
    #[error("the runtime is shut down")]
    ShutDown,
    /// The task panicked; the message is the panic payload when it was a string.
    #[error("task panicked: {0}")]
    Panicked(String),
    /// The task was dropped before it finished (its worker stopped after the shutdown grace
    /// period, or the worker exited).
    #[error("task was cancelled before it finished")]
    Cancelled,
    /// [`JoinHandle::join`] was called on a thread that is running an async runtime, where it
    /// would block the event loop: `.await` the handle instead.
    #[error("JoinHandle::join called from an async runtime thread; await the handle instead")]
    WouldBlock,
}

/// The result a task's `oneshot` carries.
type Outcome<T> = Result<T, TaskError>;

/// A handle on a spawned task's result. Await it (from any worker or async context) or call
/// [`JoinHandle::join`] from a plain thread. Dropping it detaches the task; it still runs.
#[must_use = "dropping a JoinHandle detaches the task"]
pub struct JoinHandle<T> {
    rx: oneshot::Receiver<Outcome<T>>,
}

impl<T> fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle").finish_non_exhaustive()
    }
}

impl<T> JoinHandle<T> {
    /// Blocks the current thread until the task finishes. Returns [`TaskError::WouldBlock`]
    /// (instead of blocking an event loop) when called on a worker or any tokio runtime thread.
    pub fn join(self) -> Result<T, TaskError> {
        if current_worker().is_some() || tokio::runtime::Handle::try_current().is_ok() {
            return Err(TaskError::WouldBlock);
        }
        match self.rx.blocking_recv() {
            Ok(outcome) => outcome,
            Err(_) => Err(TaskError::Cancelled),
        }
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, TaskError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(outcome)) => Poll::Ready(outcome),
            Poll::Ready(Err(_)) => Poll::Ready(Err(TaskError::Cancelled)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Configuration of a [`Runtime`].
#[derive(Debug, Clone)]
pub struct Builder {
    workers: usize,
    pin: bool,
    ring_entries: u32,
    shutdown_grace: Duration,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// One worker per core, no pinning, [`DEFAULT_RING_ENTRIES`], [`DEFAULT_SHUTDOWN_GRACE`].
    #[must_use]
    pub fn new() -> Self {
        Self {
            workers: 0,
            pin: false,
            ring_entries: DEFAULT_RING_ENTRIES,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }

    /// Number of workers; 0 means one per core (`std::thread::available_parallelism`).
    #[must_use]
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Pin worker `i` to the `i`-th CPU of the process's affinity mask (modulo its size).
    #[must_use]
    pub fn pin(mut self, pin: bool) -> Self {
        self.pin = pin;
        self
    }

    /// Submission-queue entries of each worker's ring (a power of two; the kernel rounds up).
    #[must_use]
    pub fn ring_entries(mut self, entries: u32) -> Self {
        self.ring_entries = entries;
        self
    }

    /// How long a stopping worker waits for its live tasks before dropping them.
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Starts the workers. Fails (and stops the workers already started) if a thread cannot be
    /// spawned, a ring cannot be created or a worker cannot be pinned.
    pub fn build(self) -> io::Result<Runtime> {
        let workers = if self.workers == 0 {
            thread::available_parallelism().map_or(1, NonZeroUsize::get)
        } else {
            self.workers
        };
        let cpus = if self.pin {
            allowed_cpus()?
        } else {
            Vec::new()
        };
        let mut inboxes = Vec::with_capacity(workers);
        let mut threads = Vec::with_capacity(workers);
        let mut first_error = None;
        for index in 0..workers {
            let (tx, rx) = mpsc::unbounded_channel();
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            let config = WorkerConfig {
                index,
                cpu: cpus.get(index % cpus.len().max(1)).copied(),
                ring_entries: self.ring_entries,
                shutdown_grace: self.shutdown_grace,
            };
            let spawned = thread::Builder::new()
                .name(format!("thaw-worker-{index}"))
                .spawn(move || worker_main(config, rx, ready_tx));
            let thread = match spawned {
                Ok(thread) => thread,
                Err(error) => {
                    first_error = Some(error);
                    break;
                }
            };
            let ready = ready_rx.recv().unwrap_or_else(|_| {
                Err(io::Error::other(format!(
                    "worker {index} exited during start-up"
                )))
            });
            inboxes.push(tx);
            threads.push(thread);
            if let Err(error) = ready {
                first_error = Some(error);
                break;
            }
        }
        let runtime = Runtime {
            handle: Handle {
                inboxes: Arc::from(inboxes),
            },
            threads,
        };
        match first_error {
            // Dropping `runtime` stops and joins the workers already started.
            Some(error) => Err(error),
            None => Ok(runtime),
        }
    }
}

/// A cheap, cloneable, `Send + Sync` handle for spawning onto the workers of a [`Runtime`], from
/// any thread (including from tasks on the workers themselves).
#[derive(Clone)]
pub struct Handle {
    inboxes: Arc<[mpsc::UnboundedSender<Msg>]>,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("workers", &self.inboxes.len())
            .finish()
    }
}

impl Handle {
    /// Number of workers.
    #[must_use]
    pub fn workers(&self) -> usize {
        self.inboxes.len()
    }

    /// Runs `f` on worker `core` and spawns the future it returns there as a local task. The
    /// future need not be `Send`. A panic in `f` or in the future fails the handle with
    /// [`TaskError::Panicked`]; the worker survives.
    pub fn spawn_on<F, Fut>(&self, core: usize, f: F) -> Result<JoinHandle<Fut::Output>, TaskError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let inbox = self.inboxes.get(core).ok_or(TaskError::NoSuchWorker {
            core,
            workers: self.inboxes.len(),
        })?;
        let (tx, rx) = oneshot::channel();
        let task: Task = Box::new(move || spawn_local_task(f, tx));
        inbox
            .send(Msg::Run(task))
            .map_err(|_| TaskError::ShutDown)?;
        Ok(JoinHandle { rx })
    }

    /// Spawns `f(i)` on every worker `i`; the handles are in worker order.
    pub fn spawn_all<F, Fut>(&self, f: F) -> Result<Vec<JoinHandle<Fut::Output>>, TaskError>
    where
        F: Fn(usize) -> Fut + Clone + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        (0..self.workers())
            .map(|core| {
                let f = f.clone();
                self.spawn_on(core, move || f(core))
            })
            .collect()
    }

    /// Runs a task on worker `core` and blocks this (non-runtime) thread until it finishes.
    pub fn block_on<F, Fut>(&self, core: usize, f: F) -> Result<Fut::Output, TaskError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        if current_worker().is_some() || tokio::runtime::Handle::try_current().is_ok() {
            return Err(TaskError::WouldBlock);
        }
        self.spawn_on(core, f)?.join()
    }
}

/// The thread-per-core runtime: owns the worker threads. Dropping it shuts down (see
/// [`Runtime::shutdown`]). Spawn through [`Runtime::handle`] or the forwarding methods.
pub struct Runtime {
    handle: Handle,
    threads: Vec<thread::JoinHandle<()>>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("workers", &self.handle.workers())
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// `workers` workers (0 = one per core) with the [`Builder`] defaults.
    pub fn new(workers: usize) -> io::Result<Self> {
        Builder::new().workers(workers).build()
    }

    /// A [`Builder`] for non-default settings.
    #[must_use]
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// A cloneable `Send + Sync` spawning handle.
    #[must_use]
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Number of workers.
    #[must_use]
    pub fn workers(&self) -> usize {
        self.handle.workers()
    }

    /// See [`Handle::spawn_on`].
    pub fn spawn_on<F, Fut>(&self, core: usize, f: F) -> Result<JoinHandle<Fut::Output>, TaskError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        self.handle.spawn_on(core, f)
    }

    /// See [`Handle::spawn_all`].
    pub fn spawn_all<F, Fut>(&self, f: F) -> Result<Vec<JoinHandle<Fut::Output>>, TaskError>
    where
        F: Fn(usize) -> Fut + Clone + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        self.handle.spawn_all(f)
    }

    /// See [`Handle::block_on`].
    pub fn block_on<F, Fut>(&self, core: usize, f: F) -> Result<Fut::Output, TaskError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        self.handle.block_on(core, f)
    }

    /// Graceful shutdown: every inbox is closed (later spawns answer [`TaskError::ShutDown`]),
    /// each worker runs the tasks already queued and waits for its live tasks (up to the
    /// shutdown grace), then the threads are joined. Returns how many worker threads died
    /// abnormally (0 unless tokio-uring itself panicked).
    pub fn shutdown(mut self) -> usize {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> usize {
        for inbox in self.handle.inboxes.iter() {
            // A worker that already exited has dropped its receiver: nothing to stop.
            let _ = inbox.send(Msg::Stop);
        }
        let mut failed = 0;
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                failed += 1;
            }
        }
        failed
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let failed = self.stop_and_join();
        if failed > 0 {
            tracing::error!(failed, "runtime: worker threads died");
        }
    }
}

struct WorkerConfig {
    index: usize,
    cpu: Option<usize>,
    ring_entries: u32,
    shutdown_grace: Duration,
}

/// Live local tasks of one worker, for the graceful-shutdown wait.
#[derive(Default)]
struct Live {
    count: Cell<usize>,
    idle: Notify,
}

thread_local! {
    /// This worker's live-task counter (set while the worker's event loop runs).
    static LIVE: std::cell::RefCell<Option<Rc<Live>>> = const { std::cell::RefCell::new(None) };
}

/// Decrements the live count when a task finishes or is dropped.
struct LiveGuard(Rc<Live>);

impl LiveGuard {
    fn enter() -> Option<Self> {
        let live = LIVE.with(|live| live.borrow().clone())?;
        live.count.set(live.count.get().saturating_add(1));
        Some(Self(live))
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let count = self.0.count.get().saturating_sub(1);
        self.0.count.set(count);
        if count == 0 {
            self.0.idle.notify_one();
        }
    }
}

fn worker_main(
    config: WorkerConfig,
    inbox: mpsc::UnboundedReceiver<Msg>,
    ready: std::sync::mpsc::SyncSender<io::Result<()>>,
) {
    CURRENT_WORKER.with(|w| w.set(Some(config.index)));
    let started = (|| {
        if let Some(cpu) = config.cpu {
            pin_current_thread(cpu)?;
        }
        tokio_uring::Runtime::new(tokio_uring::builder().entries(config.ring_entries))
    })();
    let rt = match started {
        Ok(rt) => rt,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    rt.block_on(event_loop(config.index, inbox, config.shutdown_grace));
    // Dropping `rt` drops any task left after the grace period; tokio-uring's driver waits for
    // the completions of in-flight operations before it frees their buffers.
    drop(rt);
    CURRENT_WORKER.with(|w| w.set(None));
}

async fn event_loop(index: usize, mut inbox: mpsc::UnboundedReceiver<Msg>, grace: Duration) {
    let live = Rc::new(Live::default());
    LIVE.with(|l| *l.borrow_mut() = Some(Rc::clone(&live)));
    while let Some(msg) = inbox.recv().await {
        match msg {
            Msg::Run(task) => task(),
            Msg::Stop => {
                inbox.close();
            }
        }
    }
    // Closed and drained: every queued task has been spawned. Wait for the live ones.
    let wait = async {
        while live.count.get() > 0 {
            live.idle.notified().await;
        }
    };
    if tokio::time::timeout(grace, wait).await.is_err() {
        tracing::warn!(
            worker = index,
            live = live.count.get(),
            "runtime: shutdown grace period over, dropping live tasks"
        );
    }
    LIVE.with(|l| *l.borrow_mut() = None);
}

/// Spawns `f()` as a local task on this worker, sending its outcome to `tx`.
fn spawn_local_task<F, Fut>(f: F, tx: oneshot::Sender<Outcome<Fut::Output>>)
where
    F: FnOnce() -> Fut + 'static,
    Fut: Future + 'static,
{
    let guard = LiveGuard::enter();
    // The JoinHandle of tokio's local task is not needed: the outcome travels over `tx`.
    drop(tokio_uring::spawn(async move {
        let _guard = guard;
        let outcome = CatchUnwind(Box::pin(async move { f().await })).await;
        let outcome = outcome.map_err(|payload| {
            let message = panic_message(payload.as_ref());
            tracing::error!(worker = ?current_worker(), panic = %message, "runtime: task panicked");
            TaskError::Panicked(message)
        });
        // The receiver may be gone (detached task): nothing to report to.
        let _ = tx.send(outcome);
    }));
}

/// Polls the inner future under `catch_unwind`.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// The CPUs in this process's affinity mask, ascending.
fn allowed_cpus() -> io::Result<Vec<usize>> {
    let mut set = empty_cpu_set();
    // SAFETY: `set` is a valid, initialised `cpu_set_t` and its exact size is passed; the kernel
    // writes at most that many bytes into it.
    let rc = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let max = usize::try_from(libc::CPU_SETSIZE).unwrap_or(0);
    let cpus: Vec<usize> = (0..max)
        .filter(|&cpu| {
            // SAFETY: `CPU_ISSET` reads bit `cpu` of `set`; `cpu < CPU_SETSIZE`, the number of
            // bits in a `cpu_set_t`.
            unsafe { libc::CPU_ISSET(cpu, &set) }
        })
        .collect();
    if cpus.is_empty() {
        return Err(io::Error::other("empty CPU affinity mask"));
    }
    Ok(cpus)
}

fn empty_cpu_set() -> libc::cpu_set_t {
    // SAFETY: `cpu_set_t` is a plain bit array, for which all-zeroes is the valid empty set.
    unsafe { std::mem::zeroed() }
}

/// Pins the calling thread to `cpu`.
fn pin_current_thread(cpu: usize) -> io::Result<()> {
    let max = usize::try_from(libc::CPU_SETSIZE).unwrap_or(0);
    if cpu >= max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "CPU index out of range",
        ));
    }
    let mut set = empty_cpu_set();
    // SAFETY: `CPU_SET` writes bit `cpu` of `set`; `cpu < CPU_SETSIZE` was checked above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid, initialised `cpu_set_t` and its exact size is passed; pid 0 is
    // the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
