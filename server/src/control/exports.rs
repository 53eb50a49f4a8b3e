//! `/v1/exports`: the NBD exports of `thaw serve`: list, add, remove, prefetch, snapshot.
//!
//! The export set is the server's dynamic one ([`crate::nbd::Exports`]): an added export is
//! offered to the next handshakes at once; a removed one is offered no more, its connections
//! finish their in-flight requests and close, and its overlay file is deleted. A removal that
//! would drop writes no snapshot stored is refused unless forced.
//!
//! Kernel attach (`attach: "/dev/nbdN"|"auto"`) takes the same path as `thaw serve --attach`
//! ([`crate::nbd::attach`]): the device rules and the nbd driver are checked before the export
//! is opened; the export joins the set, then the kernel is handed its socketpairs; on any error
//! the export leaves the set again and its overlay file is deleted. Removing an attached export
//! (API-attached or `--attach`) sends `NBD_CMD_DISCONNECT` and waits for the kernel to release
//! the device before the connections drain.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use anyhow::bail;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use thaw_codec::{BuildId, FileKind};

use super::bytes_body::Body;
use super::{
    ApiError, ControlContext, MAX_BODY, SnapshotReply, SnapshotRequest, json, not_allowed,
    read_json, reply_of, write_options,
};
use crate::cli::serve::{ExportSpec, open_exports};
use crate::engine::{Engine, PrefetchHandle, load_prefetch_plan, prefetch_offsets};
use crate::export::export_overlay;
use crate::nbd::attach::{AttachError, AttachOptions, AttachedDevices, Device, Target};
use crate::nbd::{AddError, Export, Exports, HeldWrites, KernelConns};
use crate::store::{Store, open_store};

/// Unit of an explicit prefetch: ranges are rounded out to whole units of this many bytes (or
/// of the file's block size when larger).
pub const PREFETCH_UNIT: u64 = 2 << 20;

/// Longest export name (the NBD protocol's limit).
pub const MAX_NAME_LEN: usize = 4096;

/// Most ranges in one prefetch request.
pub const MAX_PREFETCH_RANGES: usize = 4096;

/// What the exports routes work on in `thaw serve` (absent in `thaw uffd`).
#[derive(Debug)]
pub struct ServeExports {
    /// The server's export set.
    pub set: Exports,
    /// The engine exports are opened with.
    pub engine: Arc<Engine>,
    /// Where overlay files of writable exports go.
    pub overlay_dir: PathBuf,
    /// Kernel attach: how exports are attached and which are.
    pub kernel: KernelAttach,
    /// How long a removal waits for the export's connections to close.
    pub drain_timeout: Duration,
    /// Prefetches started over the API, per export.
    prefetches: Mutex<Vec<PrefetchJob>>,
}

#[derive(Debug)]
struct PrefetchJob {
    export: Weak<Export>,
    handle: PrefetchHandle,
}

impl ServeExports {
    /// The control state of a server's exports.
    pub fn new(
        set: Exports,
        engine: Arc<Engine>,
        overlay_dir: PathBuf,
        kernel: KernelAttach,
        drain_timeout: Duration,
    ) -> Self {
        Self {
            set,
            engine,
            overlay_dir,
            kernel,
            drain_timeout,
            prefetches: Mutex::new(Vec::new()),
        }
    }

    fn attached_to(&self, name: &str) -> Option<String> {
        self.kernel
            .devices
            .device_of(name)
            .map(|d| d.display().to_string())
    }

    fn prefetch_info(&self, export: &Arc<Export>) -> PrefetchInfo {
        let jobs = self
            .prefetches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut info = PrefetchInfo::default();
        for j in jobs
            .iter()
            .filter(|j| j.export.ptr_eq(&Arc::downgrade(export)))
        {
            let p = j.handle.progress();
            info.total += p.total.load(Ordering::Relaxed);
            info.done += p.done.load(Ordering::Relaxed);
            info.failed += p.failed.load(Ordering::Relaxed);
        }
        info
    }

    /// Cancels the prefetches of `export` (and forgets those of exports gone).
    fn cancel_prefetches(&self, export: &Arc<Export>) {
        let mut jobs = self
            .prefetches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let me = Arc::downgrade(export);
        jobs.retain(|j| {
            if j.export.ptr_eq(&me) || j.export.strong_count() == 0 {
                j.handle.cancel();
                false
            } else {
                true
            }
        });
    }
}

/// How `thaw serve` attaches exports to kernel nbd devices (its `--connections`,
/// `--nbd-timeout`, `--dead-conn-timeout`), and the devices attached (at start and over the API;
/// `thaw serve` detaches whatever is left at exit).
#[derive(Debug)]
pub struct KernelAttach {
    /// Starts the server's handshake-less connections.
    pub conns: KernelConns,
    /// The attached devices.
    pub devices: Arc<AttachedDevices>,
    /// Connections per device unless the request says.
    pub connections: usize,
    /// The kernel's I/O timeout.
    pub io_timeout: Duration,
    /// How long the kernel waits for a dead connection to come back.
    pub dead_conn_timeout: Duration,
    /// Where sysfs is mounted (`/sys`).
    pub sysfs: PathBuf,
    /// The engine's fetch deadline: the I/O timeout must exceed it (the kernel would fail a read
    /// the engine is still fetching).
    pub fetch_deadline: Duration,
}

/// One export as `GET /v1/exports` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    /// Export name.
    pub name: String,
    /// The served build.
    pub build: BuildId,
    /// `rootfs.ext4` or `memfile`.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether writes are refused (no overlay).
    pub read_only: bool,
    /// `serving`, `snapshotting` (an export holds its writes) or `closed` (writes refused after
    /// a snapshot).
    pub state: String,
    /// Blocks the overlay holds data for.
    pub dirty_blocks: u64,
    /// Blocks zeroed in the overlay.
    pub zero_blocks: u64,
    /// Overlay block size.
    pub block_size: u64,
    /// Whether the overlay holds writes no snapshot stored (removing the export then needs
    /// `force`).
    #[serde(default)]
    pub unsaved_changes: bool,
    /// Connections in transmission on the export.
    #[serde(default)]
    pub connections: u64,
    /// The kernel nbd device the export is attached to (`--attach`, or `attach` when added),
    /// if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<String>,
    /// Progress of the prefetches started over the API (blocks of their units).
    #[serde(default)]
    pub prefetch: PrefetchInfo,
}

/// Progress of an export's prefetches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchInfo {
    /// Blocks queued.
    pub total: u64,
    /// Blocks warmed (fetched, or present already).
    pub done: u64,
    /// Blocks whose fetch failed (reads fetch them again on demand).
    pub failed: u64,
}

/// `POST /v1/exports`: a new export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// Export name (unique, non-empty, at most 4096 bytes).
    pub name: String,
    /// The build to serve.
    pub build: BuildId,
    /// `rootfs.ext4` (default) or `memfile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Refuse writes (no overlay). Default false.
    #[serde(default)]
    pub read_only: bool,
    /// Attach the export to a kernel nbd device too: `/dev/nbdN` (refused while busy) or
    /// `auto` (the lowest free one), as `thaw serve --attach` does. Needs root and the nbd
    /// driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<String>,
    /// Connections (socketpairs) of the attached device (default: `thaw serve --connections`,
    /// 2). Only with `attach`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
}

/// The reply to `DELETE /v1/exports/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveReply {
    /// The export removed.
    pub name: String,
    /// Its build.
    pub build: BuildId,
    /// Whether unsaved overlay changes were discarded (`force`).
    pub discarded_changes: bool,
    /// Connections that were open on it and closed.
    pub connections_closed: u64,
    /// Connections still draining when the wait ended (their sockets close once their
    /// in-flight requests are answered).
    pub connections_left: u64,
    /// Whether an overlay file was deleted.
    pub overlay_deleted: bool,
    /// The kernel nbd device the export was attached to and that was disconnected, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Why that device is still busy after the wait (a mount still holds it open, say):
    /// empty when the kernel released it (no pid file, size 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_busy: Vec<String>,
}

/// `POST /v1/exports/{name}/prefetch`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchRequest {
    /// `[offset, length]` byte ranges to warm (absent: the build's recorded prefetch plan,
    /// memfile exports only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offsets: Option<Vec<(u64, u64)>>,
}

/// The reply to a prefetch: what was queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefetchReply {
    /// The export.
    pub name: String,
    /// `offsets` (the request's ranges) or `plan` (the build's `metadata.json` plan).
    pub source: String,
    /// Blocks queued, in order.
    pub blocks: u64,
    /// Their size in bytes (the last block of the file may be shorter).
    pub block_size: u64,
    /// Bytes queued (blocks clipped to the file).
    pub bytes: u64,
}

/// What to do with the export's writes once the snapshot is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum After {
    /// Open the writes again (the guest goes on).
    #[default]
    Resume,
    /// Refuse every write from now on (the sandbox is paused for good).
    Close,
}

/// Routes `/v1/exports/...` (`rest`: the decoded segments after `exports`).
pub(super) async fn route(
    ctx: &Arc<ControlContext>,
    req: Request<Incoming>,
    rest: &[&str],
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match (&method, rest) {
        (&Method::GET, []) => Ok(json(StatusCode::OK, &list(serving(ctx)?))),
        (&Method::POST, []) => {
            let body = read_json::<AddRequest>(req).await?;
            add(serving(ctx)?, body)
                .await
                .map(|r| json(StatusCode::CREATED, &r))
        }
        (&Method::DELETE, [name]) => {
            let force = force_param(req.uri().query())?;
            remove(serving(ctx)?, name, force)
                .await
                .map(|r| json(StatusCode::OK, &r))
        }
        (&Method::POST, [name, "prefetch"]) => {
            let body = read_json_or_default::<PrefetchRequest>(req).await?;
            prefetch(serving(ctx)?, name, body)
                .await
                .map(|r| json(StatusCode::ACCEPTED, &r))
        }
        (&Method::POST, [name, "snapshot"]) => {
            let body = read_json::<SnapshotRequest>(req).await?;
            snapshot(ctx, name, body)
                .await
                .map(|r| json(StatusCode::OK, &r))
        }
        (_, [] | [_] | [_, "snapshot" | "prefetch"]) => Err(not_allowed(&method, &path)),
        _ => Err(super::not_found(&path)),
    }
}

/// The exports of `thaw serve` (404 in a process that serves none).
fn serving(ctx: &ControlContext) -> Result<&ServeExports, ApiError> {
    ctx.exports.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this process serves no NBD exports (thaw uffd: see /v1/memory)".into(),
        )
    })
}

/// `?force=true|false` (absent: false); any other query is a 400.
fn force_param(query: Option<&str>) -> Result<bool, ApiError> {
    let mut force = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        force = match pair {
            "force" | "force=true" | "force=1" => true,
            "force=false" | "force=0" => false,
            _ => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("query {pair:?}: expected force=true or force=false"),
                ));
            }
        };
    }
    Ok(force)
}

/// A JSON body, or `T::default()` when the body is empty.
async fn read_json_or_default<T: for<'de> Deserialize<'de> + Default>(
    req: Request<Incoming>,
) -> Result<T, ApiError> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = body
        .collect()
        .await
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

fn no_export(name: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no export named {name:?}"))
}

/// The export named `name` in the current set (404 otherwise).
fn find(set: &Exports, name: &str) -> Result<Arc<Export>, ApiError> {
    set.current()
        .get(name)
        .cloned()
        .ok_or_else(|| no_export(name))
}

fn export_state(e: &Export) -> &'static str {
    if e.gate.is_closed() {
        "closed"
    } else if e.gate.is_held() {
        "snapshotting"
    } else {
        "serving"
    }
}

fn info(sx: &ServeExports, e: &Arc<Export>) -> ExportInfo {
    let (dirty, zero, bs) = e.overlay.as_ref().map_or((0, 0, 0), |ov| {
        let count = |runs: Vec<std::ops::Range<u64>>| runs.iter().map(|r| r.end - r.start).sum();
        (
            count(ov.dirty_blocks()),
            count(ov.zero_blocks()),
            ov.block_size(),
        )
    });
    ExportInfo {
        name: e.config.name.clone(),
        build: e.file.header().metadata.build_id,
        file: e.file.file().name().to_string(),
        size: e.file.size(),
        read_only: e.overlay.is_none(),
        state: export_state(e).to_string(),
        dirty_blocks: dirty,
        zero_blocks: zero,
        block_size: bs,
        unsaved_changes: e.has_unsaved_changes(),
        connections: e.connections() as u64,
        attach: sx.attached_to(&e.config.name),
        prefetch: sx.prefetch_info(e),
    }
}

fn list(sx: &ServeExports) -> Vec<ExportInfo> {
    sx.set
        .current()
        .exports()
        .iter()
        .map(|e| info(sx, e))
        .collect()
}

async fn add(sx: &ServeExports, req: AddRequest) -> Result<ExportInfo, ApiError> {
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    if req.name.is_empty() {
        return Err(bad(
            "name: an export added over the API needs a non-empty name".into(),
        ));
    }
    if req.name.len() > MAX_NAME_LEN {
        return Err(bad(format!(
            "name: {} bytes, an NBD export name has at most {MAX_NAME_LEN}",
            req.name.len()
        )));
    }
    let device = match req.attach.as_deref() {
        Some(a) => Some(
            a.parse::<Device>()
                .map_err(|e| bad(format!("attach: {e}")))?,
        ),
        None => None,
    };
    if req.connections.is_some() && device.is_none() {
        return Err(bad(
            "connections: only with attach (a listener's clients open their own)".into(),
        ));
    }
    let file = match req.file.as_deref() {
        None => FileKind::Rootfs,
        Some(f) => f
            .parse::<FileKind>()
            .map_err(|_| bad(format!("file {f:?}: expected rootfs.ext4 or memfile")))?,
    };
    if sx.set.current().get(&req.name).is_some() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            AddError::Duplicate(req.name.clone()).to_string(),
        ));
    }
    // The device and the driver first: a refusal leaves nothing to undo.
    let target = match device {
        Some(_) if sx.kernel.io_timeout <= sx.kernel.fetch_deadline => {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "attach: thaw serve's --nbd-timeout {:?} must exceed its --fetch-deadline \
                     {:?} (the kernel would fail a read the engine is still fetching); restart \
                     it with a longer --nbd-timeout",
                    sx.kernel.io_timeout, sx.kernel.fetch_deadline
                ),
            ));
        }
        Some(device) => {
            let opts = AttachOptions {
                device,
                connections: req.connections.unwrap_or(sx.kernel.connections),
                io_timeout: sx.kernel.io_timeout,
                dead_conn_timeout: sx.kernel.dead_conn_timeout,
                sysfs: sx.kernel.sysfs.clone(),
            };
            Some(blocking(move || Target::resolve(&opts).map_err(attach_error)).await?)
        }
        None => None,
    };
    let engine = Arc::clone(&sx.engine);
    let dir = sx.overlay_dir.clone();
    let spec = ExportSpec {
        name: req.name.clone(),
        build: req.build,
        file,
    };
    let read_only = req.read_only;
    // Opening reads the header from the store: off the control runtime's thread.
    let opened = tokio::task::spawn_blocking(move || {
        open_exports(&engine, std::slice::from_ref(&spec), read_only, &dir).map_err(|e| {
            match crate::layout::load_header(engine.meta_store().as_ref(), spec.build, file) {
                Ok(None) => ApiError(
                    StatusCode::NOT_FOUND,
                    format!(
                        "build {} has no {file} in {}",
                        spec.build,
                        engine.store().url()
                    ),
                ),
                _ => ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
            }
        })
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the open task failed: {e}"),
        )
    })??;
    let Some(export) = opened.into_iter().next() else {
        return Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no export opened".into(),
        ));
    };
    let overlay = export.overlay.as_ref().map(|ov| ov.path().to_path_buf());
    let export = sx.set.add(export).map_err(|e| {
        // Not served: its overlay file goes (a name taken meanwhile, say).
        if let Some(p) = &overlay {
            let _ = std::fs::remove_file(p);
        }
        let status = match e {
            AddError::Duplicate(_) => StatusCode::CONFLICT,
            AddError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
            AddError::Invalid(_) => StatusCode::BAD_REQUEST,
        };
        ApiError(status, e.to_string())
    })?;
    if let Some(target) = target {
        let conns = sx.kernel.conns.clone();
        let index = sx
            .set
            .current()
            .exports()
            .iter()
            .position(|e| Arc::ptr_eq(e, &export))
            .unwrap_or(0);
        // On this thread, not the blocking pool: the kernel's pid file (/sys/block/nbdN/pid)
        // names the thread that sent NBD_CMD_CONNECT, and the control API's thread lives as long
        // as the server (a pool thread exits when idle, and the device would then look owned by
        // a dead process). The request returns at once (no I/O is waited for).
        let attached = target.connect(&conns, index, &export).map_err(attach_error);
        match attached {
            Ok(a) => {
                tracing::info!(export = %req.name, device = %a.device().display(),
                    "control: export attached");
                sx.kernel.devices.push(a);
            }
            Err(e) => {
                // Undo: out of the set (its connections, whose kernel ends are closed, end),
                // overlay deleted.
                if let Some(gone) = sx.set.remove(&req.name)
                    && Arc::ptr_eq(&gone, &export)
                {
                    drain(&export, sx.drain_timeout).await;
                    delete_overlay(&export);
                }
                tracing::warn!(export = %req.name, error = %e.1, "control: attach failed");
                return Err(e);
            }
        }
    }
    Ok(info(sx, &export))
}

/// The status of an attach error.
fn attach_error(e: AttachError) -> ApiError {
    let status = match &e {
        AttachError::Invalid(_) => StatusCode::BAD_REQUEST,
        AttachError::Busy(_) => StatusCode::CONFLICT,
        AttachError::NoDriver | AttachError::NoFreeDevice(_) => StatusCode::SERVICE_UNAVAILABLE,
        AttachError::Other(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, format!("attach: {e}"))
}

/// Runs `f` on tokio's blocking pool (netlink, sysfs, the store).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the blocking task failed: {e}"),
        )
    })?
}

/// Waits up to `timeout` for `export`'s connections to close; returns how many are left.
async fn drain(export: &Export, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    while export.connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    export.connections() as u64
}

/// Deletes `export`'s overlay file; whether there was one.
fn delete_overlay(export: &Export) -> bool {
    let Some(ov) = export.overlay.as_ref() else {
        return false;
    };
    match std::fs::remove_file(ov.path()) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!(export = %export.config.name, path = %ov.path().display(), error = %e,
                "control: deleting the overlay file");
            false
        }
    }
}

async fn remove(sx: &ServeExports, name: &str, force: bool) -> Result<RemoveReply, ApiError> {
    let export = find(&sx.set, name)?;
    let mut discarded = false;
    // Writes in progress finish first (they are acknowledged, so they count); new ones wait,
    // then are refused for good once the export is gone.
    let hold = if export.overlay.is_some() {
        Some(export.gate.hold(HeldWrites::Wait).await)
    } else {
        None
    };
    if export.has_unsaved_changes() {
        if !force {
            drop(hold);
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "export {name:?} holds writes no snapshot stored: snapshot it first \
                     (POST /v1/exports/{{name}}/snapshot), or remove it with force=true \
                     to discard them"
                ),
            ));
        }
        discarded = true;
    }
    // A kernel device first: NBD_CMD_DISCONNECT (the kernel sends NBD_CMD_DISC and shuts its
    // sockets down; what it still had queued fails there), then the kernel releases it.
    let mut device = None;
    let mut device_busy = Vec::new();
    if let Some(mut a) = sx.kernel.devices.take(name) {
        let wait = sx.drain_timeout;
        let (a, r) = tokio::task::spawn_blocking(move || {
            let r = a.disconnect().map(|()| a.wait_free(wait));
            (a, r)
        })
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the detach task failed: {e}"),
            )
        })?;
        match r {
            Ok(busy) => {
                device = Some(a.device().display().to_string());
                device_busy = busy.iter().map(ToString::to_string).collect();
            }
            Err(e) => {
                // Still attached: the export stays as it was.
                sx.kernel.devices.push(a);
                drop(hold);
                return Err(ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{e:#}"),
                ));
            }
        }
    }
    if sx.set.remove(name).is_none() {
        drop(hold);
        return Err(no_export(name));
    }
    if let Some(h) = hold {
        h.close();
    }
    sx.cancel_prefetches(&export);
    let open = export.connections() as u64;
    let left = drain(&export, sx.drain_timeout).await;
    let overlay_deleted = delete_overlay(&export);
    tracing::info!(
        export = name,
        discarded,
        connections = open,
        left,
        device = device.as_deref().unwrap_or("-"),
        "control: export removed"
    );
    Ok(RemoveReply {
        name: name.to_string(),
        build: export.file.header().metadata.build_id,
        discarded_changes: discarded,
        connections_closed: open.saturating_sub(left),
        connections_left: left,
        overlay_deleted,
        device,
        device_busy,
    })
}

async fn prefetch(
    sx: &ServeExports,
    name: &str,
    req: PrefetchRequest,
) -> Result<PrefetchReply, ApiError> {
    let export = find(&sx.set, name)?;
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let size = export.file.size();
    let (source, indices, unit) = match req.offsets {
        Some(ranges) => {
            if ranges.is_empty() {
                return Err(bad("offsets: empty (omit it for the build's plan)".into()));
            }
            if ranges.len() > MAX_PREFETCH_RANGES {
                return Err(bad(format!(
                    "offsets: {} ranges, at most {MAX_PREFETCH_RANGES}",
                    ranges.len()
                )));
            }
            let unit = PREFETCH_UNIT.max(export.file.block_size());
            let mut seen = std::collections::HashSet::new();
            let mut indices = Vec::new();
            for &(offset, len) in &ranges {
                let end = offset
                    .checked_add(len)
                    .filter(|&e| len > 0 && e <= size)
                    .ok_or_else(|| {
                        bad(format!(
                            "offsets: [{offset}, {len}] is empty or ends past the export's \
                             {size} bytes"
                        ))
                    })?;
                for b in offset / unit..end.div_ceil(unit) {
                    if seen.insert(b) {
                        indices.push(b);
                    }
                }
            }
            ("offsets", indices, unit)
        }
        None => {
            let file = export.file.file();
            if file != FileKind::Memfile {
                return Err(ApiError(
                    StatusCode::CONFLICT,
                    format!(
                        "export {name:?} serves {file}: a recorded prefetch plan \
                         (metadata.json prefetch.memory) is for memfiles; give offsets"
                    ),
                ));
            }
            let build = export.file.header().metadata.build_id;
            let meta = Arc::clone(sx.engine.meta_store());
            let plan =
                tokio::task::spawn_blocking(move || load_prefetch_plan(meta.as_ref(), build))
                    .await
                    .map_err(|e| {
                        ApiError(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("the plan task failed: {e}"),
                        )
                    })?
                    .map_err(|e| {
                        ApiError(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("reading the prefetch plan of build {build}: {e:#}"),
                        )
                    })?
                    .ok_or_else(|| {
                        ApiError(
                            StatusCode::CONFLICT,
                            format!(
                                "build {build} has no recorded prefetch plan (metadata.json \
                             prefetch.memory); give offsets"
                            ),
                        )
                    })?;
            ("plan", plan.indices, plan.block_size)
        }
    };
    let bytes: u64 = indices
        .iter()
        .map(|b| unit.min(size.saturating_sub(b.saturating_mul(unit))))
        .sum();
    let blocks = indices.len() as u64;
    let handle = prefetch_offsets(
        Arc::clone(&export.file),
        indices,
        unit,
        sx.engine.config().prefetch_concurrency,
    );
    sx.prefetches
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(PrefetchJob {
            export: Arc::downgrade(&export),
            handle,
        });
    tracing::info!(
        export = name,
        source,
        blocks,
        bytes,
        "control: prefetch queued"
    );
    Ok(PrefetchReply {
        name: name.to_string(),
        source: source.to_string(),
        blocks,
        block_size: unit,
        bytes,
    })
}

async fn snapshot(
    ctx: &Arc<ControlContext>,
    name: &str,
    req: SnapshotRequest,
) -> Result<SnapshotReply, ApiError> {
    let export = find(&serving(ctx)?.set, name)?;
    if export.overlay.is_none() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("export {name:?} is read-only: it has no changes to snapshot"),
        ));
    }
    req.no_memory_fields()?;
    let opts = write_options(&req)?;
    let store: Arc<dyn Store> = match &req.to {
        Some(url) => {
            open_store(url).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("to: {e}")))?
        }
        None => Arc::clone(&ctx.store),
    };
    let held = req.writes.unwrap_or(HeldWrites::Wait);
    let hold = export.gate.hold(held).await;
    let started = Instant::now();
    let parent = export.file.header().clone();
    let file = export.file.file();
    let new_build = req.new_build_id;
    let job_export = Arc::clone(&export);
    let job_store = Arc::clone(&store);
    let result = tokio::task::spawn_blocking(move || {
        let Some(ov) = job_export.overlay.as_ref() else {
            bail!("the export has no overlay");
        };
        export_overlay(job_store.as_ref(), file, &parent, new_build, ov, &opts)
    })
    .await;
    let held_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let exported = match result {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            drop(hold);
            tracing::warn!(export = name, build = %new_build, error = %format!("{e:#}"), "control: snapshot failed");
            return Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{e:#}"),
            ));
        }
        Err(e) => {
            drop(hold);
            return Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the export task failed: {e}"),
            ));
        }
    };
    // Stored: the overlay as of now (the gate is held, no write moves it) is saved.
    if let Some(ov) = export.overlay.as_ref() {
        export.mark_saved(ov.settled_generation());
    }
    match req.after.unwrap_or_default() {
        After::Resume => drop(hold),
        After::Close => hold.close(),
    }
    let reply = reply_of(
        &exported,
        new_build,
        export.file.header().metadata.build_id,
        file,
        &store,
        held_ms,
    );
    tracing::info!(export = name, build = %new_build, already = reply.already_stored, diff_bytes = reply.diff_bytes, stored_bytes = reply.stored_bytes, held_ms, "control: snapshot stored");
    Ok(reply)
}
