//! `thaw ctl`: the command-line client of a running `thaw serve --control PATH` or
//! `thaw uffd --control PATH`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use thaw_codec::BuildId;

use crate::control::{AddRequest, After, PrefetchRequest, SnapshotRequest, call};
use crate::nbd::HeldWrites;

use super::parse_size;

/// Long help of `thaw ctl`.
pub const LONG_ABOUT: &str = "Talk to a running `thaw serve --control PATH` or `thaw uffd --control \
PATH` (HTTP/1.1 + JSON on a unix socket; the API is in docs/control-api.yaml). Prints the JSON reply; exits non-zero with the \
server's error message when the request fails.";

/// `thaw ctl` arguments.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The control socket of the server (`thaw serve|uffd --control PATH`).
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub action: CtlAction,
}

/// `thaw ctl` actions.
#[derive(Debug, Subcommand)]
pub enum CtlAction {
    /// List the exports: build, size, state, overlay counters.
    Exports,
    /// Store a writable export's changes as a new layer over the served build (pause). Writes
    /// are held back meanwhile; the reply describes the stored layer. Repeating the request with
    /// the same --new-build is idempotent.
    Snapshot(SnapshotArgs),
    /// Add an export of a build while the server runs (replies with the export, as listed);
    /// with --attach it is attached to a kernel nbd device too.
    Add(AddArgs),
    /// Remove an export: new connections no longer see it, open ones finish their requests
    /// and close, its overlay file is deleted; a kernel nbd device it is attached to is
    /// disconnected first and released (the reply's `device_busy` says why not, if not).
    /// Refused while it holds writes no snapshot stored, unless --force.
    Remove(RemoveArgs),
    /// Warm byte ranges of an export's cache in the background (without --range: a memfile
    /// build's recorded prefetch plan). Replies with what was queued; `exports` shows progress.
    Prefetch(PrefetchArgs),
    /// `thaw uffd --control`: the VM memory's handler state and change counters.
    Memory,
    /// `thaw uffd --control`: store the guest's changed pages as a new memfile layer over the
    /// served build (pause the VM first). Idempotent by --new-build.
    MemorySnapshot(MemorySnapshotArgs),
    /// `thaw uffd --control`: list the UFFD handlers: state, peer, counters, dirty/zero pages.
    Handlers,
    /// `thaw uffd --control`: start a handler: bind SOCKET and wait for Firecracker's handshake
    /// in the background.
    HandlerAdd(HandlerAddArgs),
    /// `thaw uffd --control`: stop a handler (a serving one only once its VM is gone, or with
    /// --force, which kills the VM).
    HandlerRemove(HandlerRemoveArgs),
    /// `thaw uffd --control`: store a handler's guest memory changes as a new memfile layer
    /// (pause the VM first). Idempotent by --new-build.
    HandlerSnapshot(HandlerSnapshotArgs),
    /// `thaw uffd --control`: warm and prefault ranges of a serving handler's file, or the
    /// build's recorded prefetch plan.
    HandlerPrefetch(HandlerPrefetchArgs),
}

/// `thaw ctl handler-add` arguments.
#[derive(Debug, Args)]
pub struct HandlerAddArgs {
    /// The handler's name.
    pub name: String,
    /// The build to serve.
    #[arg(long, value_name = "UUID")]
    pub build: BuildId,
    /// The unix socket Firecracker connects to.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The file to serve.
    #[arg(long, default_value = "memfile")]
    pub file: thaw_codec::FileKind,
    /// Warm and prefault the build's recorded prefetch plan.
    #[arg(long)]
    pub prefetch: bool,
}

/// `thaw ctl handler-remove` arguments.
#[derive(Debug, Args)]
pub struct HandlerRemoveArgs {
    /// The handler's name.
    pub name: String,
    /// Stop a handler whose VM still runs: the VM is killed.
    #[arg(long)]
    pub force: bool,
}

/// `thaw ctl handler-snapshot` arguments.
#[derive(Debug, Args)]
pub struct HandlerSnapshotArgs {
    /// The handler's name.
    pub name: String,
    /// The new layer.
    #[command(flatten)]
    pub layer: LayerArgs,
    /// The dirty pages.
    #[command(flatten)]
    pub dirty: DirtyArgs,
}

/// `thaw ctl handler-prefetch` arguments.
#[derive(Debug, Args)]
pub struct HandlerPrefetchArgs {
    /// The handler's name.
    pub name: String,
    /// OFFSET:LENGTH of the file (sizes like 2MiB allowed); repeatable. None: the build's recorded
    /// prefetch plan.
    #[arg(long = "range", value_name = "OFFSET:LENGTH", value_parser = parse_range)]
    pub ranges: Vec<(u64, u64)>,
}

/// `thaw ctl add` arguments.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The export name (unique, non-empty).
    pub name: String,
    /// The build to serve.
    #[arg(long, value_name = "UUID")]
    pub build: BuildId,
    /// rootfs.ext4 or memfile.
    #[arg(long, default_value = "rootfs.ext4")]
    pub file: String,
    /// Refuse writes (no overlay).
    #[arg(long)]
    pub read_only: bool,
    /// Attach the export to a kernel nbd device too: /dev/nbdN (refused while busy) or auto
    /// (the lowest free one), as `thaw serve --attach` does (root, the nbd driver loaded). The
    /// reply's `attach` names the device.
    #[arg(long, value_name = "DEVICE")]
    pub attach: Option<String>,
    /// Connections (socketpairs) of the attached device (default: the server's --connections).
    #[arg(long, value_name = "N", requires = "attach")]
    pub connections: Option<usize>,
}

/// `thaw ctl remove` arguments.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The export name.
    pub name: String,
    /// Remove it even if its overlay holds writes no snapshot stored (they are lost).
    #[arg(long)]
    pub force: bool,
}

/// `thaw ctl prefetch` arguments.
#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// The export name.
    pub name: String,
    /// A byte range OFFSET:LENGTH to warm (sizes like 4MiB accepted; repeatable).
    #[arg(long = "range", value_name = "OFFSET:LENGTH", value_parser = parse_range)]
    pub ranges: Vec<(u64, u64)>,
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (o, l) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected OFFSET:LENGTH"))?;
    Ok((parse_size(o)?, parse_size(l)?))
}

/// What every snapshot request says about the new layer.
#[derive(Debug, Args)]
pub struct LayerArgs {
    /// Build id of the new layer.
    #[arg(long, value_name = "UUID")]
    pub new_build: BuildId,
    /// Destination store URL (default: the store the export or memory is served from).
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    /// zstd:LEVEL, lz4 or none.
    #[arg(long, default_value = "zstd:2")]
    pub codec: String,
    /// Uncompressed bytes per frame.
    #[arg(long, default_value = "2MiB", value_parser = parse_size)]
    pub frame_size: u64,
    /// Header version (4 or 5).
    #[arg(long, default_value_t = 4)]
    pub header_version: u16,
}

impl LayerArgs {
    /// The request body, with `writes` and `after` for disk exports.
    fn request(&self, writes: Option<HeldWrites>, after: Option<After>) -> SnapshotRequest {
        SnapshotRequest {
            new_build_id: self.new_build,
            to: self.to.clone(),
            codec: Some(self.codec.clone()),
            frame_size: Some(self.frame_size),
            header_version: Some(self.header_version),
            writes,
            after,
            dirty_bitmap: None,
            dirty_from_handler: None,
        }
    }
}

/// Where a memory snapshot's dirty pages come from (one of the two is required).
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct DirtyArgs {
    /// Firecracker's dirty page bitmap of the paused VM: a JSON file holding the reply of its
    /// `GET /memory/dirty` (`{"bitmap": [u64, ...]}`) or the bare array; `-` reads stdin.
    #[arg(long, value_name = "FILE")]
    pub dirty_bitmap: Option<PathBuf>,
    /// The handler's own dirty tracking is exact: Firecracker resolves write-protect faults
    /// through it (`use_sync_wp`). Without that, writes to pages the handler already installed
    /// never reach it.
    #[arg(long)]
    pub dirty_from_handler: bool,
}

impl DirtyArgs {
    /// `req` with the dirty-page source set.
    fn apply(&self, mut req: SnapshotRequest) -> anyhow::Result<SnapshotRequest> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Bitmap {
            Reply { bitmap: Vec<u64> },
            Words(Vec<u64>),
        }
        if let Some(path) = &self.dirty_bitmap {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
                    .context("reading the bitmap from stdin")?
            } else {
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the dirty bitmap {}", path.display()))?
            };
            let words = match serde_json::from_str::<Bitmap>(&text).with_context(|| {
                format!(
                    "--dirty-bitmap {}: expected {{\"bitmap\": [u64, ...]}} or [u64, ...]",
                    path.display()
                )
            })? {
                Bitmap::Reply { bitmap } | Bitmap::Words(bitmap) => bitmap,
            };
            req.dirty_bitmap = Some(words);
        } else if self.dirty_from_handler {
            req.dirty_from_handler = Some(true);
        }
        Ok(req)
    }
}

/// `thaw ctl memory-snapshot` arguments.
#[derive(Debug, Args)]
pub struct MemorySnapshotArgs {
    /// The new layer.
    #[command(flatten)]
    pub layer: LayerArgs,
    /// The dirty pages.
    #[command(flatten)]
    pub dirty: DirtyArgs,
}

/// `thaw ctl snapshot` arguments.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The export name.
    pub export: String,
    /// The new layer.
    #[command(flatten)]
    pub layer: LayerArgs,
    /// New writes meanwhile: wait (held until the snapshot is stored) or refuse (ESHUTDOWN).
    #[arg(long, default_value = "wait", value_parser = parse_held)]
    pub writes: HeldWrites,
    /// Then: resume (writes go on) or close (writes refused from now on).
    #[arg(long, default_value = "resume", value_parser = parse_after)]
    pub after: After,
}

fn parse_held(s: &str) -> Result<HeldWrites, String> {
    match s {
        "wait" => Ok(HeldWrites::Wait),
        "refuse" => Ok(HeldWrites::Refuse),
        _ => Err(format!("{s:?}: expected wait or refuse")),
    }
}

fn parse_after(s: &str) -> Result<After, String> {
    match s {
        "resume" => Ok(After::Resume),
        "close" => Ok(After::Close),
        _ => Err(format!("{s:?}: expected resume or close")),
    }
}

/// Runs `thaw ctl`.
pub fn run(args: &CtlArgs) -> anyhow::Result<()> {
    let (status, body) = match &args.action {
        CtlAction::Exports => call(&args.control, "GET", "/v1/exports", None)?,
        CtlAction::Add(a) => {
            let req = AddRequest {
                name: a.name.clone(),
                build: a.build,
                file: Some(a.file.clone()),
                read_only: a.read_only,
                attach: a.attach.clone(),
                connections: a.connections,
            };
            call(
                &args.control,
                "POST",
                "/v1/exports",
                Some(serde_json::to_vec(&req).context("encoding the request")?),
            )?
        }
        CtlAction::Remove(r) => {
            let mut uri = format!("/v1/exports/{}", percent_path(&r.name));
            if r.force {
                uri.push_str("?force=true");
            }
            call(&args.control, "DELETE", &uri, None)?
        }
        CtlAction::Prefetch(p) => {
            let req = PrefetchRequest {
                offsets: (!p.ranges.is_empty()).then(|| p.ranges.clone()),
            };
            let uri = format!("/v1/exports/{}/prefetch", percent_path(&p.name));
            call(
                &args.control,
                "POST",
                &uri,
                Some(serde_json::to_vec(&req).context("encoding the request")?),
            )?
        }
        CtlAction::Memory => call(&args.control, "GET", "/v1/memory", None)?,
        CtlAction::MemorySnapshot(s) => {
            let req = s.dirty.apply(s.layer.request(None, None))?;
            call(
                &args.control,
                "POST",
                "/v1/memory/snapshot",
                Some(serde_json::to_vec(&req).context("encoding the request")?),
            )?
        }
        CtlAction::Handlers => call(&args.control, "GET", "/v1/handlers", None)?,
        CtlAction::HandlerAdd(a) => {
            let spec = crate::handlers::HandlerSpec {
                name: a.name.clone(),
                build: a.build,
                file: a.file,
                socket: a.socket.clone(),
                prefetch: a.prefetch,
            };
            call(
                &args.control,
                "POST",
                "/v1/handlers",
                Some(serde_json::to_vec(&spec).context("encoding the request")?),
            )?
        }
        CtlAction::HandlerRemove(a) => {
            let uri = format!(
                "/v1/handlers/{}{}",
                percent_path(&a.name),
                if a.force { "?force=true" } else { "" }
            );
            call(&args.control, "DELETE", &uri, None)?
        }
        CtlAction::HandlerSnapshot(a) => {
            let req = a.dirty.apply(a.layer.request(None, None))?;
            let uri = format!("/v1/handlers/{}/snapshot", percent_path(&a.name));
            call(
                &args.control,
                "POST",
                &uri,
                Some(serde_json::to_vec(&req).context("encoding the request")?),
            )?
        }
        CtlAction::HandlerPrefetch(a) => {
            let req = crate::control::HandlerPrefetchRequest {
                offsets: (!a.ranges.is_empty()).then(|| a.ranges.clone()),
            };
            let uri = format!("/v1/handlers/{}/prefetch", percent_path(&a.name));
            call(
                &args.control,
                "POST",
                &uri,
                Some(serde_json::to_vec(&req).context("encoding the request")?),
            )?
        }
        CtlAction::Snapshot(s) => {
            let req = s.layer.request(Some(s.writes), Some(s.after));
            let uri = format!("/v1/exports/{}/snapshot", percent_path(&s.export));
            call(
                &args.control,
                "POST",
                &uri,
                Some(serde_json::to_vec(&req).context("encoding the request")?),
            )?
        }
    };
    if (200..300).contains(&status) {
        print!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let msg = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    bail!("control API answered {status}: {msg}")
}

/// Escapes an export name for a path segment (names are free-form strings).
fn percent_path(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
