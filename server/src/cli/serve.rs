//! `thaw serve`: NBD exports of layered build files, with a copy-on-write overlay for writes.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use thaw_codec::{BuildId, FileKind};

use super::engine_args::{EngineArgs, parse_duration};
use super::parse_size;
use crate::engine::Engine;
use crate::nbd::attach::{self, AttachOptions, AttachedDevices, Device};
use crate::nbd::{Export, ListenAddr, Overlay, ServeOptions, Server};

/// Help text.
pub const LONG_ABOUT: &str = "Serve build files over NBD (unix sockets and TCP) to any NBD client \
(qemu, nbdcopy, nbdinfo, fio, the kernel's nbd-client). Reads go through the engine (lazy, \
cached, layered; zero-copy from the cache); writes land in a local copy-on-write overlay unless \
--read-only. SIGTERM/SIGINT: stop accepting, answer handshakes ERR_SHUTDOWN, finish in-flight \
requests, exit.\n\nKernel attach (--attach, root, the nbd module loaded): thaw configures a kernel nbd \
device itself over generic netlink (NBD_CMD_CONNECT with --connections socketpairs, the export's \
size, block size and transmission flags, --nbd-timeout and --dead-conn-timeout); the kernel \
speaks the transmission phase directly (no handshake, simple replies). A device is free only \
when /sys/block/nbdN has no pid file, size 0, inflight \"0 0\" and no holders; a busy \
/dev/nbdN is refused, auto takes the lowest free one. `attached \"NAME\" /dev/nbdN` is printed \
before `ready`. With --control, exports are also attached at run time (`thaw ctl add NAME --build \
UUID --attach /dev/nbdN|auto`, same rules; `thaw ctl remove NAME` disconnects the device and \
waits for the kernel to release it, `--attach` ones included). SIGTERM/SIGINT (and a failed \
start) send NBD_CMD_DISCONNECT to every attached device first. After \
SIGKILL the device stays configured with dead connections (I/O fails after the timeouts) until \
`nbd-client -d /dev/nbdN`; a restarted thaw refuses it as busy until then.";

/// Examples.
pub const AFTER_HELP: &str = "Examples:\n  thaw serve --store file:///srv/builds --build UUID \
--listen unix:/run/thaw.sock\n  thaw serve --store DIR --export disk=UUID:rootfs.ext4 --export \
mem=UUID:memfile --listen tcp:127.0.0.1:10809 --read-only\n  nbdinfo --list nbd://127.0.0.1:10809\n  \
thaw serve --store DIR --build UUID --attach /dev/nbd0 --connections 2 --nbd-timeout 90s\n  \
thaw serve --store DIR --export disk=UUID --export mem=UUID:memfile --attach disk=auto \
--listen unix:/run/thaw.sock";

/// `[NAME=]DEVICE` of `--attach`: DEVICE is `/dev/nbdN` or `auto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    /// The export (`None`: the only one).
    pub export: Option<String>,
    /// The device.
    pub device: Device,
}

impl std::str::FromStr for AttachSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (export, dev) = match s.rsplit_once('=') {
            Some((n, d)) => (Some(n.to_string()), d),
            None => (None, s),
        };
        Ok(Self {
            export,
            device: dev.parse()?,
        })
    }
}

/// `NAME=BUILD[:FILE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// Export name.
    pub name: String,
    /// Build id.
    pub build: BuildId,
    /// File (default rootfs.ext4).
    pub file: FileKind,
}

impl std::str::FromStr for ExportSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=BUILD[:FILE]"))?;
        let (build, file) = match rest.split_once(':') {
            Some((b, f)) => (b, Some(f)),
            None => (rest, None),
        };
        let build: BuildId = build
            .parse()
            .map_err(|e| format!("{s:?}: build id {build:?}: {e}"))?;
        let file = match file {
            Some(f) => f
                .parse::<FileKind>()
                .map_err(|_| format!("{s:?}: {f:?} is not rootfs.ext4 or memfile"))?,
            None => FileKind::Rootfs,
        };
        Ok(Self {
            name: name.to_string(),
            build,
            file,
        })
    }
}

/// `thaw serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,

    /// Listen on unix:PATH or tcp:HOST:PORT (repeatable; port 0 picks a free port, printed at
    /// start). Optional with --attach or --control.
    #[arg(
        long = "listen",
        value_name = "ADDR",
        required_unless_present_any = ["attach", "control"]
    )]
    pub listen: Vec<ListenAddr>,

    /// Attach an export to a kernel nbd device, [NAME=]/dev/nbdN or [NAME=]auto (the lowest
    /// free device), over generic netlink (root; modprobe nbd). NAME is needed with several
    /// exports; repeatable (one device per attach). Refuses a busy device. See --help.
    #[arg(long = "attach", value_name = "[NAME=]DEVICE")]
    pub attach: Vec<AttachSpec>,

    /// Connections (socketpairs) per attached device (--attach, and the default of attaches
    /// over the control API).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub connections: usize,

    /// The kernel's I/O timeout of an attached device (whole seconds; --attach and attaches
    /// over the control API); must exceed --fetch-deadline, so a slow fetch is answered before
    /// the kernel gives up.
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = parse_duration)]
    pub nbd_timeout: Duration,

    /// How long the kernel waits for a dead connection of an attached device to come back
    /// before failing its I/O (whole seconds; --attach and attaches over the control API).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub dead_conn_timeout: Duration,

    /// An export NAME=BUILD[:FILE] (repeatable; FILE defaults to rootfs.ext4). The first is the
    /// default export (what an empty export name selects).
    #[allow(rustdoc::broken_intra_doc_links, reason = "clap help text, not a link")]
    #[arg(long = "export", value_name = "NAME=BUILD[:FILE]")]
    pub exports: Vec<ExportSpec>,

    /// One export of this build (named by --name), instead of --export.
    #[arg(long, conflicts_with = "exports")]
    pub build: Option<BuildId>,

    /// The file of --build.
    #[arg(long, default_value = "rootfs.ext4", requires = "build")]
    pub file: FileKind,

    /// The export name of --build.
    #[arg(long, default_value = "", requires = "build")]
    pub name: String,

    /// Refuse writes (EPERM); no overlay.
    #[arg(long)]
    pub read_only: bool,

    /// Where the overlay files of writable exports go (default: a temporary directory removed
    /// at exit).
    #[arg(long, value_name = "DIR")]
    pub overlay_dir: Option<PathBuf>,

    /// Deadline of the handshake per connection.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// How long SIGTERM waits for in-flight requests before exiting.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Most open connections (handshakes included); more are closed at once.
    #[arg(long, value_name = "N", default_value_t = crate::nbd::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Runtime workers (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,

    /// Serve Prometheus metrics (GET /metrics) on tcp:HOST:PORT (port 0 = any free port,
    /// printed at start).
    #[arg(long, value_name = "tcp:HOST:PORT")]
    pub metrics: Option<String>,

    /// READ/WRITE payload bytes in flight per connection (backpressure above it).
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub max_inflight: u64,

    /// Serve the control API (HTTP/1.1 + JSON, docs/control-api.yaml) on this unix socket:
    /// list, add, remove and prefetch exports, snapshot a writable export's changes into a new
    /// layer (`thaw ctl`). With it the server may start with no export.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

/// The overlay directory: the given one, or a temporary one removed when dropped.
#[derive(Debug)]
pub enum OverlayDir {
    /// Given by the user (kept).
    Given(PathBuf),
    /// Temporary (removed on drop).
    Temp(tempfile::TempDir),
}

impl OverlayDir {
    /// Opens (creates) the directory.
    ///
    /// # Errors
    /// It cannot be created.
    pub fn new(dir: Option<&PathBuf>) -> anyhow::Result<Self> {
        Ok(match dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                Self::Given(d.clone())
            }
            None => Self::Temp(
                tempfile::Builder::new()
                    .prefix("thaw-overlay-")
                    .tempdir()
                    .context("creating a temporary overlay directory")?,
            ),
        })
    }

    /// The path.
    pub fn path(&self) -> &std::path::Path {
        match self {
            Self::Given(p) => p,
            Self::Temp(t) => t.path(),
        }
    }
}

/// Opens the exports `specs` (writable ones with an overlay in `overlay_dir`).
///
/// # Errors
/// A build that cannot be opened; an overlay that cannot be created.
pub fn open_exports(
    engine: &Engine,
    specs: &[ExportSpec],
    read_only: bool,
    overlay_dir: &std::path::Path,
) -> anyhow::Result<Vec<Export>> {
    let mut out = Vec::new();
    for s in specs {
        let file = Arc::new(
            engine
                .open(s.build, s.file)
                .with_context(|| format!("opening build {} ({})", s.build, s.file))?,
        );
        let overlay = if read_only {
            None
        } else {
            let block = file.block_size().clamp(512, 2 << 20);
            let block = if block.is_power_of_two() { block } else { 4096 };
            Some(Arc::new(
                Overlay::create(overlay_dir, &s.name, file.size(), block)
                    .with_context(|| format!("creating the overlay of export {:?}", s.name))?,
            ))
        };
        out.push(Export::new(&s.name, file, overlay)?);
    }
    Ok(out)
}

/// Prints one line per listener (`listen URI`, the URI without an export name) and one per
/// export and listener (`export NAME URI`), then `ready`.
pub fn print_uris(server: &Server) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for a in server.addresses() {
        let base = match a {
            crate::nbd::BoundAddr::Tcp(t) => format!("nbd://{t}"),
            crate::nbd::BoundAddr::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
        };
        writeln!(out, "listen {base}")?;
    }
    for e in server.exports() {
        for a in server.addresses() {
            writeln!(out, "export {:?} {}", e.config.name, a.uri(&e.config.name))?;
        }
    }
    writeln!(out, "ready")?;
    out.flush()?;
    Ok(())
}

/// The export index and device of each `--attach`.
///
/// # Errors
/// No or an unknown export name where one is needed; a device given twice.
pub fn attach_targets(
    attach: &[AttachSpec],
    specs: &[ExportSpec],
) -> anyhow::Result<Vec<(usize, Device)>> {
    let mut out: Vec<(usize, Device)> = Vec::new();
    for a in attach {
        let i = match &a.export {
            Some(n) => specs
                .iter()
                .position(|s| &s.name == n)
                .with_context(|| format!("--attach {n}=...: no export named {n:?}"))?,
            None if specs.len() == 1 => 0,
            None => bail!(
                "--attach: {} exports, say which one (--attach NAME=/dev/nbdN or NAME=auto)",
                specs.len()
            ),
        };
        if let Device::Index(d) = a.device
            && out.iter().any(|(_, x)| *x == a.device)
        {
            bail!("--attach: /dev/nbd{d} given twice");
        }
        out.push((i, a.device));
    }
    Ok(out)
}

/// Runs `thaw serve`.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let specs: Vec<ExportSpec> = match args.build {
        Some(build) => vec![ExportSpec {
            name: args.name.clone(),
            build,
            file: args.file,
        }],
        None => args.exports.clone(),
    };
    if specs.is_empty() && args.control.is_none() {
        bail!(
            "nothing to serve: give --build ID or --export NAME=BUILD[:FILE] (or --control PATH \
             to add exports at runtime)"
        );
    }
    let attach_to = attach_targets(&args.attach, &specs)?;
    if !attach_to.is_empty() && args.nbd_timeout <= args.engine.fetch_deadline {
        bail!(
            "--nbd-timeout {:?} must exceed --fetch-deadline {:?}: the kernel would fail a read \
             the engine is still fetching (EIO in the guest)",
            args.nbd_timeout,
            args.engine.fetch_deadline
        );
    }
    let engine = Arc::new(args.engine.engine()?);
    let metrics = match args.metrics.as_deref() {
        Some(m) => {
            let addr = m
                .strip_prefix("tcp:")
                .with_context(|| format!("--metrics {m:?}: expected tcp:HOST:PORT"))?;
            Some(crate::metrics::MetricsServer::start(
                addr,
                Some(Arc::clone(&engine)),
            )?)
        }
        None => None,
    };
    let overlay_dir = OverlayDir::new(args.overlay_dir.as_ref())?;
    let exports = open_exports(&engine, &specs, args.read_only, overlay_dir.path())?;
    let opts = ServeOptions {
        listen: args.listen.clone(),
        workers: args.workers,
        handshake_timeout: args.handshake_timeout,
        max_inflight_bytes: args.max_inflight,
        max_connections: args.max_connections,
    };
    // Handlers first, so a signal that arrives while we start is not the default (kill).
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing signal handlers")?;
    let server = Server::start(exports, &opts)?;
    // Declared after the server: on an early return they are dropped (disconnected) first.
    let attached = Arc::new(AttachedDevices::default());
    for (export, device) in attach_to {
        let a = attach::attach(
            &server,
            export,
            &AttachOptions {
                device,
                connections: args.connections,
                io_timeout: args.nbd_timeout,
                dead_conn_timeout: args.dead_conn_timeout,
                sysfs: PathBuf::from("/sys"),
            },
        )
        .with_context(|| format!("attaching export {:?}", specs[export].name))?;
        println!("attached {:?} {}", a.export(), a.device().display());
        attached.push(a);
    }
    let sysfs = PathBuf::from("/sys");
    let control = match &args.control {
        Some(path) => Some(crate::control::ControlServer::start(
            path,
            Arc::new(crate::control::ControlContext {
                exports: Some(crate::control::ServeExports::new(
                    server.export_set(),
                    Arc::clone(&engine),
                    overlay_dir.path().to_path_buf(),
                    crate::control::KernelAttach {
                        conns: server.kernel_conns()?,
                        devices: Arc::clone(&attached),
                        connections: args.connections,
                        io_timeout: args.nbd_timeout,
                        dead_conn_timeout: args.dead_conn_timeout,
                        sysfs,
                        fetch_deadline: args.engine.fetch_deadline,
                    },
                    args.drain_timeout,
                )),
                store: Arc::clone(engine.store()),
                memory: None,
            }),
        )?),
        None => None,
    };
    if let Some(m) = &metrics {
        println!("metrics http://{}/metrics", m.addr());
    }
    if let Some(c) = &control {
        println!("control unix:{}", c.path().display());
    }
    print_uris(&server)?;
    let sig = signals
        .forever()
        .next()
        .unwrap_or(signal_hook::consts::SIGTERM);
    tracing::info!(signal = sig, "nbd: shutting down");
    eprintln!("thaw serve: signal {sig}, draining");
    // Kernel devices first: the kernel sends NBD_CMD_DISC on each connection and shuts them
    // down, then the server drains whatever is left.
    for a in attached.take_all() {
        let dev = a.device();
        match a.detach(Duration::from_secs(2)) {
            Ok(busy) if busy.is_empty() => eprintln!("thaw serve: {} disconnected", dev.display()),
            Ok(busy) => {
                let why: Vec<String> = busy.iter().map(ToString::to_string).collect();
                eprintln!(
                    "thaw serve: {} disconnected but still busy ({}): the kernel keeps it until \
                     its last opener (a mount?) closes it",
                    dev.display(),
                    why.join("; ")
                );
            }
            Err(e) => eprintln!("thaw serve: {e:#}"),
        }
    }
    let left = server.shutdown(args.drain_timeout);
    if left > 0 {
        eprintln!("thaw serve: {left} connections still open at the drain deadline");
    }
    drop(control);
    drop(overlay_dir);
    drop(metrics);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_specs() {
        let id = "4f1c2b9e-8a8e-4b7e-9a53-0c1d2e3f4a5b";
        let s: ExportSpec = format!("disk={id}").parse().unwrap();
        assert_eq!(s.name, "disk");
        assert_eq!(s.file, FileKind::Rootfs);
        let s: ExportSpec = format!("m={id}:memfile").parse().unwrap();
        assert_eq!(s.file, FileKind::Memfile);
        assert!("nope".parse::<ExportSpec>().is_err());
        assert!(format!("a={id}:disk").parse::<ExportSpec>().is_err());
        assert!("a=notauuid".parse::<ExportSpec>().is_err());
        assert_eq!(
            "unix:/tmp/x".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/tmp/x".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:0".parse::<ListenAddr>(),
            Ok(ListenAddr::Tcp("127.0.0.1:0".into()))
        );
        assert!("tcp:127.0.0.1".parse::<ListenAddr>().is_err());
        assert!("udp:x:1".parse::<ListenAddr>().is_err());
    }

    #[test]
    fn attach_specs_name_the_export() {
        let id: BuildId = "4f1c2b9e-8a8e-4b7e-9a53-0c1d2e3f4a5b".parse().unwrap();
        let spec = |name: &str| ExportSpec {
            name: name.into(),
            build: id,
            file: FileKind::Rootfs,
        };
        let a = |s: &str| s.parse::<AttachSpec>().unwrap();
        assert_eq!(
            a("/dev/nbd3"),
            AttachSpec {
                export: None,
                device: Device::Index(3)
            }
        );
        assert_eq!(a("disk=auto").export.as_deref(), Some("disk"));
        assert!("disk=/dev/sda".parse::<AttachSpec>().is_err());
        assert!("nbd0".parse::<AttachSpec>().is_err());
        let one = [spec("")];
        let two = [spec("disk"), spec("mem")];
        assert_eq!(
            attach_targets(&[a("auto")], &one).unwrap(),
            vec![(0, Device::Auto)]
        );
        let err = attach_targets(&[a("/dev/nbd0")], &two).unwrap_err();
        assert!(err.to_string().contains("say which one"), "{err}");
        assert_eq!(
            attach_targets(&[a("mem=/dev/nbd1"), a("disk=auto")], &two).unwrap(),
            vec![(1, Device::Index(1)), (0, Device::Auto)]
        );
        assert!(attach_targets(&[a("nope=auto")], &two).is_err());
        assert!(attach_targets(&[a("disk=/dev/nbd1"), a("mem=/dev/nbd1")], &two).is_err());
    }
}
