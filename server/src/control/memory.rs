//! `/v1/memory`: the VM memory served by `thaw uffd`.

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
use crate::store::{Store, open_store};

/// `GET /v1/memory`: the UFFD handler of `thaw uffd`.
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
    /// Whether Firecracker sent its memfd (required for a snapshot).
    pub memfd: bool,
    /// `serving` or `finished` (the VM went away).
    pub state: String,
    /// Pages written by the guest.
    pub dirty_pages: u64,
    /// Pages that read as zeros (installed as zeros or removed) and were not written since.
    pub zero_pages: u64,
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
            memory_snapshot(ctx, body)
                .await
                .map(|r| json(StatusCode::OK, &r))
        }
        (_, [] | ["snapshot"]) => Err(not_allowed(&method, &path)),
        _ => Err(super::not_found(&path)),
    }
}

fn memory_server(ctx: &ControlContext) -> Result<&Arc<crate::uffd::UffdServer>, ApiError> {
    ctx.memory.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this process serves no VM memory (the memory API is on `thaw uffd --control`)".into(),
        )
    })
}

fn memory_info(ctx: &ControlContext) -> Result<MemoryInfo, ApiError> {
    let m = memory_server(ctx)?;
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

async fn memory_snapshot(
    ctx: &Arc<ControlContext>,
    req: SnapshotRequest,
) -> Result<SnapshotReply, ApiError> {
    let m = Arc::clone(memory_server(ctx)?);
    if req.writes.is_some() || req.after.is_some() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "writes and after apply to disk exports; pause the VM before a memory snapshot".into(),
        ));
    }
    if m.memfd().is_none() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "Firecracker sent no memfd (use_memfd): the guest memory cannot be read".into(),
        ));
    }
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
        job.export_memory(job_store.as_ref(), new_build, &opts)
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
