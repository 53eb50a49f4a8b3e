//! The control API of a running `thaw serve`: HTTP/1.1 with JSON bodies on a unix socket
//! (`--control PATH`), so an orchestrator in any language can list the exports and snapshot one
//! into a new layer (pause). `thaw ctl` is its command-line client. The document is
//! `docs/control-api.yaml` (OpenAPI 3).
//!
//! - `GET /v1/exports`: every export with its build, size, state (`serving`, `snapshotting`,
//!   `closed`), overlay counters, connections and prefetch progress.
//! - `POST /v1/exports` with `{name, build, file?, read_only?, attach?, connections?}`: adds an
//!   export (201); with `attach` (`/dev/nbdN` or `auto`) it is attached to a kernel nbd device
//!   too, as `thaw serve --attach` does.
//! - `DELETE /v1/exports/{name}[?force=true]`: removes one (its connections drain and close,
//!   its overlay file is deleted; an attached device is disconnected and released first);
//!   refused (409) while it holds writes no snapshot stored, unless forced.
//! - `POST /v1/exports/{name}/prefetch` with `{offsets?}`: warms byte ranges (or a memfile's
//!   recorded plan) in the background (202).
//! - `POST /v1/exports/{name}/snapshot` with `{new_build_id, to?, codec?, frame_size?,
//!   header_version?, writes?, after?}`: holds the export's writes back (`writes`: `wait`, the
//!   default, or `refuse`), exports the overlay over the served build as `new_build_id`
//!   ([`crate::export::export_overlay`]: packed diff, e2b merge rules, data first, header last,
//!   idempotent), then opens the writes again (`after`: `resume`, the default) or refuses them for
//!   good (`close`). The reply describes the stored layer.
//!
//! The server runs on a thread of its own with a current-thread tokio runtime; the export itself
//! (store I/O, compression) runs on tokio's blocking pool while the gate is held.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes_body::{Body, full};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use thaw_codec::BuildId;
use tokio::sync::oneshot;

use crate::export::Exported;
use crate::nbd::HeldWrites;
use crate::store::Store;
use crate::writer::WriteOptions;

mod exports;
mod memory;

pub use exports::{
    AddRequest, After, ExportInfo, KernelAttach, PrefetchInfo, PrefetchReply, PrefetchRequest,
    RemoveReply, ServeExports,
};
pub use memory::{HandlerPrefetchReply, HandlerPrefetchRequest, MemoryInfo};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

/// What the control API works on.
#[derive(Debug)]
pub struct ControlContext {
    /// The NBD exports of `thaw serve` (`None` in `thaw uffd`).
    pub exports: Option<ServeExports>,
    /// The store the exports are served from: the default destination of snapshots.
    pub store: Arc<dyn Store>,
    /// The UFFD handlers of `thaw uffd`, if this is that process (`/v1/handlers`; `/v1/memory`
    /// is the one `--build` started).
    pub memory: Option<Arc<crate::handlers::Handlers>>,
}

/// `POST /v1/exports/{name}/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Build id of the new layer.
    pub new_build_id: BuildId,
    /// Destination store URL (default: the store the export is served from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// `zstd:LEVEL`, `lz4` or `none` (default `zstd:2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<String>,
    /// Uncompressed bytes per frame (default 2 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_size: Option<u64>,
    /// Header version 4 or 5 (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_version: Option<u16>,
    /// New writes during the snapshot: `wait` (default) or `refuse` (`ESHUTDOWN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writes: Option<HeldWrites>,
    /// Then: `resume` (default) or `close`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<After>,
    /// Memory only: Firecracker's dirty page bitmap (`GET /memory/dirty` of the paused VM, its
    /// `bitmap` words: bit `i` of word `j` is page `64 j + i`), united with the handler's own
    /// dirty pages. A memory snapshot needs this or `dirty_from_handler`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bitmap: Option<Vec<u64>>,
    /// Memory only: the handler's own dirty tracking is exact (Firecracker resolves
    /// write-protect faults through it, `use_sync_wp`), so no bitmap is needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_from_handler: Option<bool>,
}

impl SnapshotRequest {
    /// The dirty-page source a memory snapshot asked for.
    ///
    /// # Errors
    /// Neither or both given (400).
    fn dirty_pages(&self) -> Result<crate::uffd::DirtyPages, ApiError> {
        match (&self.dirty_bitmap, self.dirty_from_handler.unwrap_or(false)) {
            (Some(words), false) => Ok(crate::uffd::DirtyPages::Bitmap(words.clone())),
            (None, true) => Ok(crate::uffd::DirtyPages::Handler),
            (Some(_), true) => Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give dirty_bitmap or dirty_from_handler, not both".into(),
            )),
            (None, false) => Err(ApiError(
                StatusCode::BAD_REQUEST,
                "a memory snapshot needs the guest's dirty pages: dirty_bitmap (Firecracker's \
                 GET /memory/dirty of the paused VM) or dirty_from_handler: true when \
                 Firecracker resolves write-protect faults through this handler (use_sync_wp); \
                 otherwise a write to a page the handler already installed never reaches it"
                    .into(),
            )),
        }
    }

    /// Refuses the memory-only fields on a disk snapshot.
    fn no_memory_fields(&self) -> Result<(), ApiError> {
        if self.dirty_bitmap.is_some() || self.dirty_from_handler.is_some() {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "dirty_bitmap and dirty_from_handler apply to memory snapshots; a disk export's \
                 changes are its overlay's"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The reply to a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReply {
    /// The new build.
    pub build: BuildId,
    /// Its parent (the served build).
    pub parent: BuildId,
    /// `rootfs.ext4` or `memfile`.
    pub file: String,
    /// Where it was stored.
    pub store: String,
    /// True when the store already held exactly this layer (a repeated request).
    pub already_stored: bool,
    /// Header version stored.
    pub header_version: u64,
    /// Mappings in the new header.
    pub mappings: usize,
    /// Bytes of the packed diff (uncompressed).
    pub diff_bytes: u64,
    /// Bytes of the stored data object (0 when already stored).
    pub stored_bytes: u64,
    /// Frames of the data object (0 when plain or already stored).
    pub frames: usize,
    /// Time the gate was held, in milliseconds.
    pub held_ms: u64,
}

/// A running control server; dropping it stops the server and removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `path` (a stale socket file nobody answers on is replaced; a live one is an
    /// error) and serves the API on a thread of its own.
    ///
    /// # Errors
    /// The socket cannot be bound; another process answers on it.
    pub fn start(path: &Path, ctx: Arc<ControlContext>) -> anyhow::Result<Self> {
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "--control {}: another process answers on it",
                    path.display()
                );
            }
            std::fs::remove_file(path).with_context(|| {
                format!("--control {}: removing the stale socket", path.display())
            })?;
        }
        let listener = std::os::unix::net::UnixListener::bind(path)
            .with_context(|| format!("--control {}: binding", path.display()))?;
        listener.set_nonblocking(true)?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("thaw-control".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "control: starting the runtime");
                        return;
                    }
                };
                rt.block_on(serve(listener, ctx, stop_rx));
            })
            .context("starting the control thread")?;
        Ok(Self {
            path: path.to_path_buf(),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve(
    listener: std::os::unix::net::UnixListener,
    ctx: Arc<ControlContext>,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "control: registering the listener");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "control: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let ctx = Arc::clone(&ctx);
                        async move { Ok::<_, std::convert::Infallible>(route(&ctx, req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                    {
                        tracing::debug!(error = %e, "control: connection ended");
                    }
                });
            }
        }
    }
}

/// An error answer: status and message (sent as `{"error": message}`).
pub(crate) struct ApiError(StatusCode, String);

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    match serde_json::to_vec_pretty(body) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            let mut r = Response::new(full(bytes));
            *r.status_mut() = status;
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => error_response(&ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn error_response(e: &ApiError) -> Response<Body> {
    #[derive(Serialize)]
    struct E<'a> {
        error: &'a str,
    }
    let mut bytes = serde_json::to_vec(&E { error: &e.1 }).unwrap_or_default();
    bytes.push(b'\n');
    let mut r = Response::new(full(bytes));
    *r.status_mut() = e.0;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn route(ctx: &Arc<ControlContext>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let result = match segments.as_slice() {
        ["v1", "exports", rest @ ..] => exports::route(ctx, req, rest).await,
        ["v1", "memory", rest @ ..] => memory::route(ctx, req, rest).await,
        ["v1", "handlers", rest @ ..] => memory::route_handlers(ctx, req, rest).await,
        _ => Err(not_found(&path)),
    };
    let response = result.unwrap_or_else(|e| error_response(&e));
    tracing::info!(%method, %path, status = response.status().as_u16(), "control: request");
    response
}

/// 404 for a path no route knows.
fn not_found(path: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no such resource: {path}"))
}

/// 405 for a known path and a method it does not take.
fn not_allowed(method: &Method, path: &str) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {path}"),
    )
}

/// Decodes `%XX` escapes of a path segment (invalid escapes are kept as they are).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_json<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = body
        .collect()
        .await
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

fn write_options(req: &SnapshotRequest) -> Result<WriteOptions, ApiError> {
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let codec = crate::cli::parse_codec(req.codec.as_deref().unwrap_or("zstd:2"))
        .map_err(|e| bad(format!("codec: {e}")))?;
    let header_version = req.header_version.unwrap_or(4);
    if !matches!(header_version, 4 | 5) {
        return Err(bad(format!(
            "header_version {header_version}: a snapshot is stored with a V4 or V5 header"
        )));
    }
    Ok(WriteOptions {
        codec: codec.codec,
        level: codec.level,
        frame_size: req.frame_size.unwrap_or(thaw_codec::DEFAULT_FRAME_SIZE),
        header_version,
        workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        progress: false,
    })
}

/// The reply describing `exported`.
fn reply_of(
    exported: &Exported,
    build: BuildId,
    parent: BuildId,
    file: thaw_codec::FileKind,
    store: &Arc<dyn Store>,
    held_ms: u64,
) -> SnapshotReply {
    let header = exported.header();
    let (already, stored_bytes, frames, diff_bytes) = match exported {
        Exported::Stored(s) => (false, s.stored_size, s.frames, s.uncompressed_size),
        Exported::AlreadyStored(h) => (
            true,
            0,
            0,
            crate::layout::self_entry(h).map_or(0, |b| b.size),
        ),
    };
    SnapshotReply {
        build,
        parent,
        file: file.name().to_string(),
        store: store.url(),
        already_stored: already,
        header_version: header.metadata.version,
        mappings: header.mappings.len(),
        diff_bytes,
        stored_bytes,
        frames,
        held_ms,
    }
}

/// The response body type (one buffer).
mod bytes_body {
    /// A whole response body.
    pub type Body = http_body_util::Full<hyper::body::Bytes>;

    /// `bytes` as a body.
    pub fn full(bytes: Vec<u8>) -> Body {
        http_body_util::Full::new(hyper::body::Bytes::from(bytes))
    }
}

/// A client of the control API (what `thaw ctl` uses): one HTTP/1.1 request on a new connection
/// to the unix socket at `path`. Returns the status and the body.
///
/// # Errors
/// The socket does not answer; the exchange fails.
pub fn call(
    path: &Path,
    method: &str,
    uri: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .with_context(|| format!("connecting to the control socket {}", path.display()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .context("HTTP handshake on the control socket")?;
        let driver = tokio::spawn(conn);
        let method = Method::from_bytes(method.as_bytes()).context("HTTP method")?;
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, "thaw")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(full(body.unwrap_or_default()))
            .context("building the request")?;
        let resp = sender
            .send_request(req)
            .await
            .context("sending the request")?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .context("reading the reply")?
            .to_bytes()
            .to_vec();
        driver.abort();
        Ok((status, bytes))
    })
}
