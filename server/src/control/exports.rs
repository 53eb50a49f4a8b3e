//! `/v1/exports`: the NBD exports of `thaw serve`: list, add, remove, prefetch, snapshot.
//!
//! The export set is the server's dynamic one ([`crate::nbd::Exports`]): an added export is
//! offered to the next handshakes at once; a removed one is offered no more, its connections
//! finish their in-flight requests and close, and its overlay file is deleted. A removal that
//! would drop writes no snapshot stored is refused unless forced.

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
use crate::nbd::{AddError, Export, Exports, HeldWrites};
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
    /// Exports attached to a kernel nbd device at start (`--attach`): name and device. They
    /// cannot be removed over the API (the device is detached at exit).
    pub attached: Vec<(String, PathBuf)>,
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
        attached: Vec<(String, PathBuf)>,
        drain_timeout: Duration,
    ) -> Self {
        Self {
            set,
            engine,
            overlay_dir,
            attached,
            drain_timeout,
            prefetches: Mutex::new(Vec::new()),
        }
    }

    fn attached_to(&self, name: &str) -> Option<String> {
        self.attached
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.display().to_string())
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
    /// The kernel nbd device the export is attached to (`--attach`), if any.
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
    /// Kernel attach: not offered over the API (`thaw serve --attach` at start); a request that
    /// gives it is refused with 501.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<String>,
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
    if let Some(a) = &req.attach {
        return Err(ApiError(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "attach {a:?}: kernel attach is not offered over the control API; serve the \
                 export over a listener, or start thaw serve with --attach"
            ),
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
    let export = sx.set.add(export).map_err(|e| {
        let status = match e {
            AddError::Duplicate(_) => StatusCode::CONFLICT,
            AddError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
            AddError::Invalid(_) => StatusCode::BAD_REQUEST,
        };
        ApiError(status, e.to_string())
    })?;
    Ok(info(sx, &export))
}

async fn remove(sx: &ServeExports, name: &str, force: bool) -> Result<RemoveReply, ApiError> {
    let export = sx
        .set
        .current()
        .get(name)
        .cloned()
        .ok_or_else(|| no_export(name))?;
    if let Some(dev) = sx.attached_to(name) {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "export {name:?} is attached to {dev} (--attach): it is detached when thaw \
                 serve exits, not over the API"
            ),
        ));
    }
    let mut discarded = false;
    if export.overlay.is_some() {
        // Writes in progress finish first (they are acknowledged, so they count); new ones
        // wait, then are refused for good once the export is gone.
        let hold = export.gate.hold(HeldWrites::Wait).await;
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
        if sx.set.remove(name).is_none() {
            drop(hold);
            return Err(no_export(name));
        }
        hold.close();
    } else if sx.set.remove(name).is_none() {
        return Err(no_export(name));
    }
    sx.cancel_prefetches(&export);
    let open = export.connections() as u64;
    let deadline = Instant::now() + sx.drain_timeout;
    while export.connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = export.connections() as u64;
    let overlay_deleted = match export.overlay.as_ref() {
        Some(ov) => match std::fs::remove_file(ov.path()) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::warn!(export = name, path = %ov.path().display(), error = %e,
                    "control: deleting the overlay file");
                false
            }
        },
        None => false,
    };
    tracing::info!(
        export = name,
        discarded,
        connections = open,
        left,
        "control: export removed"
    );
    Ok(RemoveReply {
        name: name.to_string(),
        build: export.file.header().metadata.build_id,
        discarded_changes: discarded,
        connections_closed: open.saturating_sub(left),
        connections_left: left,
        overlay_deleted,
    })
}

async fn prefetch(
    sx: &ServeExports,
    name: &str,
    req: PrefetchRequest,
) -> Result<PrefetchReply, ApiError> {
    let export = sx
        .set
        .current()
        .get(name)
        .cloned()
        .ok_or_else(|| no_export(name))?;
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
    let export = serving(ctx)?
        .set
        .current()
        .get(name)
        .cloned()
        .ok_or_else(|| no_export(name))?;
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
