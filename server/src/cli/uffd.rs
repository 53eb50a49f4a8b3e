//! `thaw uffd`: serve a VM's memory (Firecracker's UFFD snapshot backend) from a build's memfile
//! through the engine.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use thaw_codec::{BuildId, FileKind};
use thaw_uffd::HandlerConfig;

use super::engine_args::{EngineArgs, parse_duration};
use crate::handlers::{HandlerSpec, Handlers};
use crate::uffd::{UffdOptions, serve_uffd};

/// Help text.
pub const LONG_ABOUT: &str = "Serve a VM's memory to Firecracker (mem_backend \
{backend_type: \"Uffd\", backend_path: SOCKET}) from a build's memfile through the engine: \
listen on SOCKET, accept Firecracker's handshake (region JSON + userfaultfd), then answer every \
page fault from the layered store (a cache hit is one UFFDIO_COPY straight from the cache \
memory; a miss fetches the frame once). Exits 0 when the VM goes away. If a page cannot be \
produced (after the retries), Firecracker is SIGKILLed and the command exits non-zero naming the \
page and the cause: a VM is never given unknown data. With --prefetch, the build's recorded \
first-touch order (metadata.json prefetch.memory) is fetched in the background at low priority \
and installed before the guest touches it. A summary goes to stderr at exit. With --control PATH \
and no --build/--socket, the command serves only the control API: handlers are started, listed, \
prefetched, snapshotted and stopped at runtime (/v1/handlers, `thaw ctl handler-*`) until \
SIGTERM, which stops them (killing the VMs still served).";

/// `thaw uffd` options.
#[derive(Debug, Args)]
pub struct UffdArgs {
    #[command(flatten)]
    pub engine: EngineArgs,

    /// The build id (a UUID) to resume. Optional with --control: handlers are then added at
    /// runtime (`POST /v1/handlers`) and the command runs until SIGTERM.
    #[arg(long, requires = "socket", required_unless_present = "control")]
    pub build: Option<BuildId>,

    /// The unix socket to listen on (Firecracker's mem_backend.backend_path). A stale socket
    /// file is replaced; any other existing file is an error.
    #[arg(long, value_name = "PATH", requires = "build")]
    pub socket: Option<PathBuf>,

    /// The file to serve.
    #[arg(long, default_value = "memfile")]
    pub file: FileKind,

    /// Warm and prefault the build's recorded prefetch plan in the background.
    #[arg(long)]
    pub prefetch: bool,

    /// Prefetch worker threads.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub prefetch_threads: usize,

    /// How long to wait for Firecracker to connect and send its handshake.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Fetch attempts of one page before failing closed (each attempt is itself retried by the
    /// engine --fetch-retries times).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub page_attempts: u32,

    /// Serve the control API on this unix socket (HTTP/1.1 + JSON, docs/control-api.yaml):
    /// `/v1/handlers` starts, lists and stops handlers, prefetches, and stores a guest's changed
    /// pages as a new memfile layer (pause the VM first); `GET /v1/memory` and
    /// `POST /v1/memory/snapshot` are the --build handler's.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// The name of the handler `--build` starts, in `/v1/handlers`.
pub const BUILD_HANDLER: &str = "memory";

/// Runs `thaw uffd`.
pub fn run(args: &UffdArgs) -> anyhow::Result<()> {
    let engine = args.engine.engine()?;
    let options = UffdOptions {
        file: args.file,
        handshake_timeout: args.handshake_timeout,
        kill_peer_on_handshake_error: true,
        handler: HandlerConfig {
            fetch_attempts: args.page_attempts.max(1),
            ..HandlerConfig::default()
        },
        prefetch: args.prefetch,
        prefetch_concurrency: args.prefetch_threads.max(1),
    };
    let (Some(build), Some(socket)) = (args.build, args.socket.as_deref()) else {
        let control = args
            .control
            .as_deref()
            .context("--build and --socket, or --control, are required")?;
        return run_handlers(&engine, control, options);
    };
    let listener = bind(socket)?;
    let _cleanup = RemoveOnDrop(socket);
    let server = Arc::new(serve_uffd(&engine, build, &listener, &options)?);
    drop(listener);
    tracing::info!(peer = server.peer().pid, %build, "UFFD handshake done; serving");
    let control = match &args.control {
        Some(path) => {
            let handlers = Arc::new(Handlers::new(engine.clone(), options.clone()));
            handlers
                .insert_fixed(
                    HandlerSpec {
                        name: BUILD_HANDLER.into(),
                        build,
                        file: args.file,
                        socket: socket.to_path_buf(),
                        prefetch: args.prefetch,
                    },
                    Arc::clone(&server),
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let c = start_control(path, &engine, &handlers)?;
            Some((c, handlers))
        }
        None => None,
    };
    let report = match control {
        None => join(server)?,
        Some((control, handlers)) => {
            // The control API shares the server until the VM goes away.
            while !server.is_finished() {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            drop(control);
            // Handlers added at runtime end with the process.
            handlers.shutdown();
            drop(handlers);
            join(server)?
        }
    };
    eprintln!("{}", report.summary());
    match report.result {
        Ok(_) => Ok(()),
        Err(e) => {
            let killed = if e.peer_killed() {
                format!("; Firecracker (pid {}) was killed", report.peer.pid)
            } else {
                String::new()
            };
            Err(anyhow::Error::new(e).context(format!(
                "serving the memory of build {build} ({}){killed}",
                args.file
            )))
        }
    }
}

/// `thaw uffd --control` without --build: serve the control API until SIGTERM/SIGINT, then stop
/// every handler (killing the VMs still served: they would hang on a handler that is gone).
fn run_handlers(
    engine: &crate::engine::Engine,
    control: &Path,
    options: UffdOptions,
) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing the signal handlers")?;
    let handlers = Arc::new(Handlers::new(engine.clone(), options));
    let c = start_control(control, engine, &handlers)?;
    let signal = signals.forever().next();
    tracing::info!(?signal, "stopping the UFFD handlers");
    drop(c);
    let n = handlers.list().len();
    handlers.shutdown();
    eprintln!("uffd: stopped {n} handler(s)");
    Ok(())
}

/// The control API of `thaw uffd` on `path` (handlers only, no exports); prints where it listens.
fn start_control(
    path: &Path,
    engine: &crate::engine::Engine,
    handlers: &Arc<Handlers>,
) -> anyhow::Result<crate::control::ControlServer> {
    let c = crate::control::ControlServer::start(
        path,
        Arc::new(crate::control::ControlContext {
            exports: None,
            store: Arc::clone(engine.store()),
            memory: Some(Arc::clone(handlers)),
        }),
    )?;
    println!("control unix:{}", c.path().display());
    Ok(c)
}

/// Waits for the fault loop to end and reports. The control server, the only other holder of
/// `server`, is dropped before (its runtime waits for its blocking export tasks), so the wait
/// for the last reference is a formality with a deadline.
fn join(server: Arc<crate::uffd::UffdServer>) -> anyhow::Result<crate::uffd::UffdReport> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut server = server;
    loop {
        match Arc::try_unwrap(server) {
            Ok(s) => return Ok(s.join()),
            Err(shared) if std::time::Instant::now() < deadline => {
                server = shared;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(_) => anyhow::bail!("the UFFD server is still in use by the control API"),
        }
    }
}

/// Binds `path`, replacing a stale socket file (never another kind of file).
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!("{} exists and is not a socket", path.display());
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("{} is in use by another handler", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

/// Removes the socket file when the command ends.
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}
