//! `/v1/exports`: the NBD exports of `thaw serve`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use thaw_codec::BuildId;

use super::bytes_body::Body;
use super::{
    ApiError, ControlContext, SnapshotReply, SnapshotRequest, json, not_allowed, read_json,
    reply_of, write_options,
};
use crate::export::export_overlay;
use crate::nbd::{Export, HeldWrites};
use crate::store::{Store, open_store};

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
        (&Method::GET, []) => Ok(json(StatusCode::OK, &list(ctx))),
        (&Method::POST, [name, "snapshot"]) => {
            let body = read_json::<SnapshotRequest>(req).await?;
            snapshot(ctx, name, body)
                .await
                .map(|r| json(StatusCode::OK, &r))
        }
        (_, [] | [_, "snapshot"]) => Err(not_allowed(&method, &path)),
        _ => Err(super::not_found(&path)),
    }
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

fn list(ctx: &ControlContext) -> Vec<ExportInfo> {
    ctx.exports
        .iter()
        .map(|e| {
            let (dirty, zero, bs) = e.overlay.as_ref().map_or((0, 0, 0), |ov| {
                let count =
                    |runs: Vec<std::ops::Range<u64>>| runs.iter().map(|r| r.end - r.start).sum();
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
            }
        })
        .collect()
}

async fn snapshot(
    ctx: &Arc<ControlContext>,
    name: &str,
    req: SnapshotRequest,
) -> Result<SnapshotReply, ApiError> {
    let export = ctx
        .exports
        .iter()
        .find(|e| e.config.name == name)
        .cloned()
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no export named {name:?}")))?;
    if export.overlay.is_none() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("export {name:?} is read-only: it has no changes to snapshot"),
        ));
    }
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
