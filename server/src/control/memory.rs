//! `/v1/handlers` and `/v1/memory`: the UFFD handlers of `thaw uffd --control`.
//!
//! - `GET /v1/handlers`, `GET /v1/handlers/{name}`: state and counters
//!   ([`crate::handlers::HandlerInfo`]).
//! - `POST /v1/handlers` `{name, build, file?, socket, prefetch?}`: binds the socket and waits for
//!   Firecracker in the background (201; 409 for a duplicate name or a busy socket, 404 for an
//!   unknown build).
//! - `DELETE /v1/handlers/{name}[?force=true]`: stops a waiting handler; a serving one only
//!   when its VM is gone, or with `force` (the VM is killed).
//! - `POST /v1/handlers/{name}/snapshot`: the guest memory's changes as a new memfile layer.
//! - `POST /v1/handlers/{name}/prefetch` `{offsets?: [[offset, len], ...]}`: warm and prefault
//!   those ranges, or the build's recorded plan (202).
//! - `GET /v1/memory`, `POST /v1/memory/snapshot`: the handler `thaw uffd --build` started.

use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use thaw_codec::BuildId;

use super::bytes_body::Body;
use super::{
    ApiError, ControlContext, SnapshotReply, SnapshotRequest, json, not_allowed, read_json,
    reply_of, write_options,
};
use crate::handlers::{Handler, HandlerError, HandlerSpec, Handlers};
use crate::store::{Store, open_store};
use crate::uffd::UffdServer;

/// `GET /v1/memory`: the UFFD handler of `thaw uffd --build`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// The served build.
    pub build: BuildId,
    /// Memfile size in bytes.
    pub size: u64,
    /// Guest page size.
    pub page_size: u64,
    /// Firecracker's pid.
    pub peer_pid: i32,
    /// Whether the memory is registered for write-protect tracking (dirty pages exact).
    pub write_protect: Option<bool>,
    /// Whether Firecracker sent its memfd (otherwise a snapshot reads the peer's memory with
    /// `process_vm_readv`).
    pub memfd: bool,
    /// `serving` or `finished` (the VM went away).
    pub state: String,
    /// Pages written by the guest.
    pub dirty_pages: u64,
    /// Pages that read as zeros (installed as zeros or removed) and were not written since.
    pub zero_pages: u64,
}

/// `POST /v1/handlers/{name}/prefetch`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerPrefetchRequest {
    /// `[offset, len]` ranges of the file (absent: the build's recorded prefetch plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offsets: Option<Vec<(u64, u64)>>,
}

/// The reply to a prefetch request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandlerPrefetchReply {
    /// The handler.
    pub name: String,
    /// Pages queued (deduplicated); progress is in the handler's `prefetch` counters.
    pub pages: u64,
}

/// Routes `/v1/memory/...` (`rest`: the decoded segments after `memory`).
pub(super) async fn route(
    ctx: &Arc<ControlContext>,
    req: Request<Incoming>,
    rest: &[&str],
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    match (&method, rest) {
        (&Method::GET, []) => memory_info(ctx).map(|m| json(StatusCode::OK, &m)),
        (&Method::POST, ["snapshot"]) => {
            let body = read_json::<SnapshotRequest>(req).await?;
            let h = fixed_handler(ctx)?;
            snapshot(ctx, &h, body)
                .await
                .map(|r| json(StatusCode::OK, &r))
        }
        (_, [] | ["snapshot"]) => Err(not_allowed(&method, &path)),
        _ => Err(super::not_found(&path)),
    }
}

/// Routes `/v1/handlers/...` (`rest`: the decoded segments after `handlers`).
pub(super) async fn route_handlers(
    ctx: &Arc<ControlContext>,
    req: Request<Incoming>,
    rest: &[&str],
) -> Result<Response<Body>, ApiError> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let handlers = Arc::clone(registry(ctx)?);
    match (&method, rest) {
        (&Method::GET, []) => {
            let all: Vec<_> = handlers.list().iter().map(|h| h.info()).collect();
            Ok(json(StatusCode::OK, &all))
        }
        (&Method::POST, []) => {
            let spec = read_json::<HandlerSpec>(req).await?;
            let h = blocking(move || handlers.add(spec)).await?;
            Ok(json(StatusCode::CREATED, &h.info()))
        }
        (&Method::GET, [name]) => {
            let h = handler(&handlers, name)?;
            Ok(json(StatusCode::OK, &h.info()))
        }
        (&Method::DELETE, [name]) => {
            let force = force_query(req.uri().query())?;
            let name = (*name).to_string();
            let info = blocking(move || handlers.remove(&name, force)).await?;
            Ok(json(StatusCode::OK, &info))
        }
        (&Method::POST, [name, "snapshot"]) => {
            let h = handler(&handlers, name)?;
            let body = read_json::<SnapshotRequest>(req).await?;
            snapshot(ctx, &h, body)
                .await
                .map(|r| json(StatusCode::OK, &r))
        }
        (&Method::POST, [name, "prefetch"]) => {
            let name = (*name).to_string();
            handler(&handlers, &name)?;
            let body = read_json::<HandlerPrefetchRequest>(req).await?;
            let n = name.clone();
            let pages = blocking(move || handlers.prefetch(&n, body.offsets.as_deref())).await?;
            Ok(json(
                StatusCode::ACCEPTED,
                &HandlerPrefetchReply { name, pages },
            ))
        }
        (_, [] | [_] | [_, "snapshot" | "prefetch"]) => Err(not_allowed(&method, &path)),
        _ => Err(super::not_found(&path)),
    }
}

/// `force=true|false` of a DELETE (other parameters are refused).
fn force_query(query: Option<&str>) -> Result<bool, ApiError> {
    let mut force = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair {
            "force=true" | "force=1" | "force" => force = true,
            "force=false" | "force=0" => force = false,
            _ => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter {pair:?} (expected force=true|false)"),
                ));
            }
        }
    }
    Ok(force)
}

/// Runs a blocking registry operation off the runtime and maps its error to a status.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HandlerError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| api_error(&e)),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the handler task failed: {e}"),
        )),
    }
}

fn api_error(e: &HandlerError) -> ApiError {
    let status = match e {
        HandlerError::Duplicate(_) | HandlerError::Busy(_) | HandlerError::Conflict(_) => {
            StatusCode::CONFLICT
        }
        HandlerError::UnknownBuild(_) | HandlerError::NotFound(_) => StatusCode::NOT_FOUND,
        HandlerError::Invalid(_) => StatusCode::BAD_REQUEST,
        HandlerError::Other(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, e.to_string())
}

fn registry(ctx: &ControlContext) -> Result<&Arc<Handlers>, ApiError> {
    ctx.memory.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this process serves no VM memory (the memory API is on `thaw uffd --control`)".into(),
        )
    })
}

fn handler(handlers: &Handlers, name: &str) -> Result<Arc<Handler>, ApiError> {
    handlers
        .get(name)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no handler named {name:?}")))
}

/// The handler `thaw uffd --build` started (what `/v1/memory` is an alias of).
fn fixed_handler(ctx: &ControlContext) -> Result<Arc<Handler>, ApiError> {
    registry(ctx)?
        .list()
        .into_iter()
        .find(|h| h.is_fixed())
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                "no VM memory was given with --build: see /v1/handlers".into(),
            )
        })
}

fn serving(h: &Handler) -> Result<Arc<UffdServer>, ApiError> {
    h.server().ok_or_else(|| {
        ApiError(
            StatusCode::CONFLICT,
            format!(
                "handler {:?} is {}: no guest memory to read",
                h.name(),
                h.info().state
            ),
        )
    })
}

fn memory_info(ctx: &ControlContext) -> Result<MemoryInfo, ApiError> {
    let h = fixed_handler(ctx)?;
    let m = serving(&h)?;
    let changes = m.memory_changes();
    let count = |runs: &[std::ops::Range<u64>]| runs.iter().map(|r| r.end - r.start).sum();
    let file = m.source().file();
    Ok(MemoryInfo {
        build: file.header().metadata.build_id,
        size: file.size(),
        page_size: m.handler().page_size(),
        peer_pid: m.peer().pid,
        write_protect: m.handler().write_protect_tracking(),
        memfd: m.memfd().is_some(),
        state: if m.is_finished() {
            "finished"
        } else {
            "serving"
        }
        .to_string(),
        dirty_pages: count(&changes.dirty),
        zero_pages: count(&changes.zero),
    })
}

async fn snapshot(
    ctx: &Arc<ControlContext>,
    h: &Handler,
    req: SnapshotRequest,
) -> Result<SnapshotReply, ApiError> {
    if req.writes.is_some() || req.after.is_some() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "writes and after apply to disk exports; pause the VM before a memory snapshot".into(),
        ));
    }
    let m = serving(h)?;
    if m.is_finished() && m.memfd().is_none() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "handler {:?} is finished: its VM is gone and sent no memfd, so its memory \
                 cannot be read",
                h.name()
            ),
        ));
    }
    let dirty = req.dirty_pages()?;
    // A bitmap that does not fit the memfile is the caller's mistake (400), found before any
    // work.
    m.memory_changes_with(&dirty)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let opts = write_options(&req)?;
    let store: Arc<dyn Store> = match &req.to {
        Some(url) => {
            open_store(url).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("to: {e}")))?
        }
        None => Arc::clone(&ctx.store),
    };
    let new_build = req.new_build_id;
    let started = Instant::now();
    let job_store = Arc::clone(&store);
    let job = Arc::clone(&m);
    let result = tokio::task::spawn_blocking(move || {
        job.export_memory(job_store.as_ref(), new_build, &opts, &dirty)
    })
    .await;
    let held_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let exported = match result {
        Ok(Ok(e)) => e,
        Ok(Err(e)) => {
            tracing::warn!(build = %new_build, error = %format!("{e:#}"), "control: memory snapshot failed");
            return Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{e:#}"),
            ));
        }
        Err(e) => {
            return Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the export task failed: {e}"),
            ));
        }
    };
    Ok(reply_of(
        &exported,
        new_build,
        m.source().file().header().metadata.build_id,
        thaw_codec::FileKind::Memfile,
        &store,
        held_ms,
    ))
}
