//! One client connection: the handshake (driving [`ServerHandshake`] under a deadline), then the
//! transmission phase with many requests in flight, each a local task on the connection's
//! worker, answered out of order; each reply is queued whole and the connection's writer task
//! sends everything queued with one `writev`.

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use thaw_codec::nbd::consts::{
    CMD_FLAG_DF, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, REQUEST_LEN, STATE_HOLE,
    STATE_ZERO,
};
use thaw_codec::nbd::reply::{
    encode_block_status, encode_error_reply, none_chunk, offset_data_header, offset_hole_chunk,
    simple_reply,
};
use thaw_codec::nbd::{
    Command, Errno, Extent, Invalid, Negotiated, Progress, Request, ServerHandshake,
};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

use super::io::{OutBuf, Reader, Stream, consume};
use super::overlay::{BaseBlocks, BlockState};
use super::{Export, ExportConnGuard, ExportSet, Shared};
use crate::engine::{LayeredFile, ReadBuf, Segment};

/// How long a connection still in the handshake may keep negotiating once the server shuts
/// down (its options are answered `ERR_SHUTDOWN` meanwhile).
const SHUTDOWN_HANDSHAKE_GRACE: Duration = Duration::from_secs(2);

/// Bytes one in-flight permit stands for.
const PERMIT_BYTES: u64 = 4096;

/// Most extents computed for one BLOCK_STATUS reply (the encoder writes at most 1024).
const MAX_EXTENTS: usize = 1024;

/// Reply header buffers a connection keeps for reuse (each at most [`HEADER_CAP`] bytes).
const HEADER_POOL: usize = 256;

/// Capacity of a pooled reply header buffer (a structured `OFFSET_DATA` header is 28 bytes).
const HEADER_CAP: usize = 32;

/// Cache-hit READs answered in the request loop before it yields to the connection's other
/// tasks (its writer first): bounds how long a client pipelining hits keeps the worker.
const INLINE_HITS_PER_YIELD: u32 = 32;

/// Serves one connection to the end; the socket is shut down before returning. The handshake
/// offers the export set as it is now.
pub(crate) async fn serve(stream: Stream, shared: Arc<Shared>, id: u64) {
    let mut shutdown = shared.shutdown.clone();
    let set = shared.current();
    let (neg, reader) = match handshake(&stream, &shared, &set, &mut shutdown, id).await {
        Ok(Some(x)) => x,
        Ok(None) => {
            stream.shutdown();
            return;
        }
        Err(e) => {
            log_io(id, "handshake", &e);
            stream.shutdown();
            return;
        }
    };
    let Some(export) = set.exports().get(neg.export_index).cloned() else {
        stream.shutdown();
        return;
    };
    drop(set);
    transmit(stream, shared, id, neg, reader, export).await;
}

/// Serves a connection of `export` that starts in the transmission phase, as if a handshake had
/// produced `neg` (kernel attach: the kernel's nbd client was configured over netlink with
/// `neg`'s flags and speaks no handshake). The socket is shut down before returning.
pub(crate) async fn serve_negotiated(
    stream: Stream,
    shared: Arc<Shared>,
    id: u64,
    neg: Negotiated,
    export: Arc<Export>,
) {
    let reader = Reader::new(&[], 16 * 1024);
    transmit(stream, shared, id, neg, reader, export).await;
}

/// The transmission phase, to the end of the connection. It ends early (in-flight requests
/// finish, then the socket closes) when the export's stop signal rises: the export was removed
/// or the server shuts down.
async fn transmit(
    stream: Stream,
    shared: Arc<Shared>,
    id: u64,
    neg: Negotiated,
    mut reader: Reader,
    export: Arc<Export>,
) {
    shared.counters.bump_negotiated();
    let _counted = ExportConnGuard::new(&export);
    let mut shutdown = export.stop.subscribe();
    tracing::debug!(conn = id, export = %neg.export_name, "nbd: transmission");
    let conn = Rc::new(Conn {
        stream,
        neg,
        export,
        shared: Arc::clone(&shared),
        id,
        queue: RefCell::new(Vec::new()),
        held: RefCell::new(Vec::new()),
        headers: RefCell::new(Vec::new()),
        wake: Notify::new(),
        writing: Cell::new(false),
        closed: Cell::new(false),
        broken: Cell::new(false),
    });
    let writer = tokio_uring::spawn(writer(Rc::clone(&conn)));
    let total = u32::try_from((shared.max_inflight_bytes / PERMIT_BYTES).clamp(1, 1 << 24))
        .unwrap_or(1 << 24);
    let sem = Rc::new(Semaphore::new(total as usize));
    if let Err(e) = request_loop(&conn, &mut reader, &mut shutdown, &sem, total).await {
        log_io(id, "transmission", &e);
    }
    // DISC, a violation, end of stream or shutdown: finish what is in flight (permits come
    // back once their replies are written), let the writer empty its queue, then close.
    let _all = sem.acquire_many(total).await;
    conn.closed.set(true);
    conn.wake.notify_one();
    let _ = writer.await;
    conn.stream.shutdown();
}

/// The connection's writer: sends whatever replies are queued, one `writev` per batch. The
/// batch and permit vectors swap with spares and come back for reuse, and written header
/// buffers return to the connection's pool: a batch allocates nothing of ours.
async fn writer(conn: Rc<Conn>) {
    let mut spare = Vec::new();
    let mut spare_held = Vec::new();
    loop {
        let mut batch = std::mem::replace(&mut *conn.queue.borrow_mut(), spare);
        let mut permits = std::mem::replace(&mut *conn.held.borrow_mut(), spare_held);
        if batch.is_empty() {
            permits.clear();
            spare = batch;
            spare_held = permits;
            if conn.closed.get() {
                return;
            }
            conn.wake.notified().await;
            continue;
        }
        if !conn.broken.get() {
            conn.writing.set(true);
            let (res, back) = conn.stream.write_batch(batch).await;
            conn.writing.set(false);
            batch = back;
            if let Err(e) = res {
                log_io(conn.id, "reply", &e);
                conn.broken.set(true);
                // Make the request loop see the end of the connection.
                conn.stream.shutdown();
            }
        }
        conn.recycle(&mut batch);
        // Permits go back only once their replies are written (or the connection broke).
        permits.clear();
        spare = batch;
        spare_held = permits;
    }
}

fn log_io(id: u64, phase: &str, e: &io::Error) {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => {
            tracing::debug!(conn = id, phase, error = %e, "nbd: client went away");
        }
        _ => tracing::info!(conn = id, phase, error = %e, "nbd: connection closed"),
    }
}

/// The handshake: `Ok(Some(..))` to enter transmission, `Ok(None)` to close.
async fn handshake(
    stream: &Stream,
    shared: &Shared,
    set: &ExportSet,
    shutdown: &mut watch::Receiver<bool>,
    id: u64,
) -> io::Result<Option<(Negotiated, Reader)>> {
    let mut hs = ServerHandshake::new(set.handshake.clone()).map_err(io::Error::other)?;
    let mut shutting = *shutdown.borrow();
    if shutting {
        hs.shutdown();
    }
    stream
        .write_all(vec![OutBuf::heap(hs.greeting().to_vec())])
        .await?;
    let mut deadline = Instant::now() + shared.handshake_timeout;
    let mut reader = Reader::new(&[], 16 * 1024);
    loop {
        let n = {
            let mut fill = pin!(reader.fill(stream));
            loop {
                tokio::select! {
                    r = &mut fill => break r?,
                    () = tokio::time::sleep_until(deadline) => {
                        tracing::info!(conn = id, "nbd: handshake deadline passed, closing");
                        shared.counters.bump_handshake_timeout();
                        metrics::counter!("thaw_nbd_handshake_timeouts_total").increment(1);
                        return Ok(None);
                    }
                    _ = shutdown.changed(), if !shutting => {
                        shutting = true;
                        hs.shutdown();
                        deadline = deadline.min(Instant::now() + SHUTDOWN_HANDSHAKE_GRACE);
                    }
                }
            }
        };
        if n == 0 {
            return Ok(None);
        }
        let mut out = Vec::new();
        let step = hs.feed(reader.buffered(), &mut out);
        reader.consume(step.consumed);
        let send = |out: Vec<u8>| async move {
            if out.is_empty() {
                Ok(())
            } else {
                stream.write_all(vec![OutBuf::heap(out)]).await
            }
        };
        match step.progress {
            Progress::Continue => send(out).await?,
            Progress::Go(neg) => {
                send(out).await?;
                return Ok(Some((*neg, reader)));
            }
            Progress::Abort => {
                // The client may already be gone: the ACK is best effort.
                let _ = send(out).await;
                return Ok(None);
            }
            Progress::Reject(why) => {
                let _ = send(out).await;
                tracing::info!(conn = id, reason = why.as_str(), detail = %why,
                    "nbd: handshake rejected, closing");
                shared.counters.bump_rejected();
                metrics::counter!("thaw_nbd_handshake_rejected_total", "reason" => why.as_str())
                    .increment(1);
                return Ok(None);
            }
        }
    }
}

/// State shared by a connection's request tasks and its writer.
struct Conn {
    stream: Stream,
    neg: Negotiated,
    export: Arc<Export>,
    shared: Arc<Shared>,
    id: u64,
    /// Replies waiting for the writer, whole and in completion order.
    queue: RefCell<Vec<OutBuf>>,
    /// In-flight permits of requests whose replies are queued: released once written.
    held: RefCell<Vec<RcPermit>>,
    /// Written reply header buffers, reused by the READ fast path.
    headers: RefCell<Vec<Vec<u8>>>,
    wake: Notify,
    /// The writer task has a batch on the ring: nothing else may write to the socket.
    writing: Cell<bool>,
    closed: Cell<bool>,
    broken: Cell<bool>,
}

impl Conn {
    /// Queues one whole reply; the writer sends everything queued with one `writev` (replies
    /// completed together go out together). Never interleaves replies.
    async fn send(&self, bufs: Vec<OutBuf>) {
        if self.broken.get() {
            return;
        }
        self.queue.borrow_mut().extend(bufs);
        self.wake.notify_one();
    }

    /// Sends the queued replies straight from the request loop, before it waits for the next
    /// request: one non-blocking `sendmsg`, no ring round trip and no writer wake-up (the common
    /// case: a few cache-hit replies and a socket with room). Only when the writer has nothing
    /// on the ring; whatever the socket does not take stays queued for the writer, which the
    /// queueing already woke. Fully sent: the held permits go back.
    fn flush_direct(&self) {
        if self.writing.get() || self.broken.get() {
            return;
        }
        let mut queue = self.queue.borrow_mut();
        if queue.is_empty() {
            return;
        }
        match self.stream.try_send(&queue) {
            Ok(n) => {
                let done = consume(&mut queue, n);
                recycle_into(&mut self.headers.borrow_mut(), queue.drain(..done));
                if queue.is_empty() {
                    self.held.borrow_mut().clear();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log_io(self.id, "reply", &e);
                self.broken.set(true);
                self.stream.shutdown();
            }
        }
    }

    /// Empties a written batch, keeping its small header buffers for reuse.
    fn recycle(&self, batch: &mut Vec<OutBuf>) {
        recycle_into(&mut self.headers.borrow_mut(), batch.drain(..));
    }

    /// The READ fast path: the reply to a READ whose whole range is present in the cache inside
    /// one data mapping and untouched by the overlay: the reply header (from the pool) and the
    /// cache bytes (zero copy), the same bytes the general path sends for one data piece (a
    /// simple reply, or one `OFFSET_DATA` chunk with `DONE`). `None` otherwise: the request
    /// takes the general path.
    fn read_hit(&self, req: &Request) -> Option<[OutBuf; 2]> {
        let len = u64::from(req.length);
        if len == 0 {
            return None;
        }
        if let Some(ov) = self.export.overlay.as_ref()
            && ov.touches(req.offset, len)
        {
            return None;
        }
        let data = OutBuf::cache_data(&self.export.file, req.offset, req.length as usize)?;
        let mut head = self.headers.borrow_mut().pop().unwrap_or_default();
        head.clear();
        if self.neg.structured_replies {
            head.extend_from_slice(
                &offset_data_header(req.cookie, req.offset, req.length, true).ok()?,
            );
        } else {
            head.extend_from_slice(&simple_reply(req.cookie, 0));
        }
        Some([OutBuf::heap(head), data])
    }

    /// Queues a whole reply without waiting (see [`send`](Self::send)).
    fn queue_reply(&self, bufs: [OutBuf; 2]) {
        if self.broken.get() {
            return;
        }
        self.queue.borrow_mut().extend(bufs);
        self.wake.notify_one();
    }

    /// Keeps a request's permit until the replies queued so far are written (backpressure on
    /// clients that do not read their replies).
    fn hold(&self, permit: RcPermit) {
        self.held.borrow_mut().push(permit);
        self.wake.notify_one();
    }

    async fn send_error(&self, req: &Request, errno: Errno, msg: &str) {
        self.shared.counters.bump_error();
        metrics::counter!("thaw_nbd_request_errors_total",
            "cmd" => req.command.as_str(), "errno" => errno.as_str())
        .increment(1);
        let mut out = Vec::new();
        encode_error_reply(&mut out, &self.neg, req, errno.code(), msg);
        self.send(vec![OutBuf::heap(out)]).await;
    }
}

async fn request_loop(
    conn: &Rc<Conn>,
    reader: &mut Reader,
    shutdown: &mut watch::Receiver<bool>,
    sem: &Rc<Semaphore>,
    total: u32,
) -> io::Result<()> {
    let stream = &conn.stream;
    let mut shutting = *shutdown.borrow();
    let mut inline_hits = 0u32;
    loop {
        if shutting {
            tracing::debug!(conn = conn.id, "nbd: shutting down, draining");
            return Ok(());
        }
        if reader.buffered().len() < REQUEST_LEN {
            // About to wait for the client: what is answered goes out now.
            conn.flush_direct();
        }
        {
            let mut need = pin!(reader.need(stream, REQUEST_LEN));
            loop {
                tokio::select! {
                    r = &mut need => { r?; break; }
                    _ = shutdown.changed(), if !shutting => { shutting = true; }
                }
                if shutting {
                    tracing::debug!(conn = conn.id, "nbd: shutting down, draining");
                    return Ok(());
                }
            }
        }
        let mut header = [0u8; REQUEST_LEN];
        header.copy_from_slice(&reader.buffered()[..REQUEST_LEN]);
        reader.consume(REQUEST_LEN);
        let req = match Request::parse(&header) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(conn = conn.id, error = %e, "nbd: bad request, closing");
                return Ok(());
            }
        };
        if req.command == Command::Disc {
            tracing::debug!(conn = conn.id, "nbd: disconnect requested");
            return Ok(());
        }
        match req.validate(&conn.neg) {
            Ok(()) => {}
            Err(Invalid::Reply {
                errno,
                drain,
                reason,
            }) => {
                reader.skip(stream, u64::from(drain)).await?;
                tracing::debug!(conn = conn.id, cookie = req.cookie, cmd = req.command.as_str(),
                    %errno, reason, "nbd: request rejected");
                // The error reply holds a permit too, so a client that floods bad requests
                // without reading the replies is throttled like any other.
                let Some(permit) = acquire(sem, 1).await else {
                    return Ok(());
                };
                conn.send_error(&req, errno, reason).await;
                conn.hold(permit);
                continue;
            }
            Err(Invalid::Disconnect { reason }) => {
                tracing::info!(conn = conn.id, reason, "nbd: closing");
                return Ok(());
            }
        }
        let cost = match req.command {
            Command::Read | Command::Write => u64::from(req.length).div_ceil(PERMIT_BYTES),
            _ => 1,
        };
        let cost = u32::try_from(cost.clamp(1, u64::from(total))).unwrap_or(total);
        let Some(permit) = acquire(sem, cost).await else {
            return Ok(());
        };
        let payload = if req.command == Command::Write {
            Some(reader.read_vec(stream, req.length as usize).await?)
        } else {
            None
        };
        conn.shared
            .counters
            .bump_request(req.command, u64::from(req.length));
        let cmd = req.command.as_str();
        metrics::counter!("thaw_nbd_requests_total", "cmd" => cmd).increment(1);
        if req.command == Command::Write {
            metrics::counter!("thaw_nbd_write_bytes_total").increment(u64::from(req.length));
        }
        let started = crate::metrics::start_timer();
        if req.command == Command::Read
            && let Some(reply) = conn.read_hit(&req)
        {
            // A cache hit is answered here, without a task: same counters, same bytes.
            conn.shared.counters.bump_read_bytes(u64::from(req.length));
            metrics::counter!("thaw_nbd_read_bytes_total").increment(u64::from(req.length));
            conn.queue_reply(reply);
            if let Some(t) = started {
                metrics::histogram!(crate::metrics::REQUEST_DURATION, "cmd" => cmd)
                    .record(t.elapsed().as_secs_f64());
            }
            conn.hold(permit);
            inline_hits += 1;
            if inline_hits >= INLINE_HITS_PER_YIELD {
                inline_hits = 0;
                conn.flush_direct();
                tokio::task::yield_now().await;
            }
            continue;
        }
        let c = Rc::clone(conn);
        tokio_uring::spawn(async move {
            handle(&c, req, payload).await;
            if let Some(t) = started {
                metrics::histogram!(crate::metrics::REQUEST_DURATION, "cmd" => cmd)
                    .record(t.elapsed().as_secs_f64());
            }
            c.hold(permit);
        });
    }
}

/// Keeps the small header buffers of written replies in `pool` for reuse.
fn recycle_into(pool: &mut Vec<Vec<u8>>, written: impl Iterator<Item = OutBuf>) {
    for b in written {
        if pool.len() < HEADER_POOL
            && let Some(v) = b.into_small_heap(HEADER_CAP)
        {
            pool.push(v);
        }
    }
}

/// Permits held by an in-flight request (released on drop).
struct RcPermit {
    sem: Rc<Semaphore>,
    n: u32,
}

impl Drop for RcPermit {
    fn drop(&mut self) {
        self.sem.add_permits(self.n as usize);
    }
}

async fn acquire(sem: &Rc<Semaphore>, n: u32) -> Option<RcPermit> {
    sem.acquire_many(n).await.ok()?.forget();
    Some(RcPermit {
        sem: Rc::clone(sem),
        n,
    })
}

/// Maps an I/O error of the overlay to the wire.
fn io_errno(e: &io::Error, flags: u16) -> Errno {
    Errno::from_linux(e.raw_os_error().unwrap_or(libc::EIO), flags)
}

async fn handle(conn: &Conn, req: Request, payload: Option<Vec<u8>>) {
    let result = match req.command {
        Command::Read => return read_reply(conn, &req).await,
        Command::BlockStatus => return block_status_reply(conn, &req).await,
        Command::Write => write(conn, &req, payload.unwrap_or_default()).await,
        Command::WriteZeroes => write_zeroes(conn, &req).await,
        Command::Trim => trim(conn, &req).await,
        Command::Flush => flush(conn)
            .await
            .map_err(|e| (io_errno(&e, 0), e.to_string())),
        Command::Cache => cache(conn, &req).await,
        Command::Disc | Command::Unknown(_) => Err((Errno::Inval, "unexpected command".into())),
    };
    match result {
        Ok(()) => {
            conn.send(vec![OutBuf::heap(simple_reply(req.cookie, 0).to_vec())])
                .await;
        }
        Err((errno, msg)) => {
            tracing::info!(conn = conn.id, cookie = req.cookie, cmd = req.command.as_str(),
                offset = req.offset, len = req.length, %errno, error = %msg, "nbd: request failed");
            conn.send_error(&req, errno, &msg).await;
        }
    }
}

type ReqResult<T> = Result<T, (Errno, String)>;

fn read_err(e: &crate::engine::ReadError, flags: u16) -> (Errno, String) {
    (Errno::from_linux(e.errno(), flags), e.to_string())
}

/// Passes the export's write gate (see [`super::gate`]): refused writes get `ESHUTDOWN`.
async fn pass_gate(export: &Export) -> ReqResult<tokio::sync::RwLockReadGuard<'_, ()>> {
    export
        .gate
        .enter()
        .await
        .map_err(|why| (Errno::Shutdown, why.to_string()))
}

/// The base bytes of the blocks a write covers partially.
async fn base_blocks(export: &Export, offset: u64, len: u64, flags: u16) -> ReqResult<BaseBlocks> {
    let Some(ov) = export.overlay.as_ref() else {
        return Ok(Vec::new());
    };
    let bs = ov.block_size();
    let mut out = Vec::new();
    for b in ov.partial_base_blocks(offset, len) {
        let start = b * bs;
        let n = bs.min(export.file.size().saturating_sub(start));
        let mut buf = vec![0u8; usize::try_from(n).unwrap_or(0)];
        export
            .file
            .read(start, &mut buf)
            .await
            .map_err(|e| read_err(&e, flags))?;
        out.push((b, buf));
    }
    Ok(out)
}

async fn write(conn: &Conn, req: &Request, data: Vec<u8>) -> ReqResult<()> {
    let export = &conn.export;
    let Some(ov) = export.overlay.as_ref() else {
        return Err((Errno::Perm, "read-only export".into()));
    };
    let _pass = pass_gate(export).await?;
    let base = base_blocks(export, req.offset, data.len() as u64, req.flags).await?;
    ov.write(req.offset, &data, &base)
        .map_err(|e| (io_errno(&e, req.flags), e.to_string()))?;
    if req.has_flag(CMD_FLAG_FUA) {
        flush(conn)
            .await
            .map_err(|e| (io_errno(&e, req.flags), e.to_string()))?;
    }
    Ok(())
}

async fn write_zeroes(conn: &Conn, req: &Request) -> ReqResult<()> {
    let export = &conn.export;
    let Some(ov) = export.overlay.as_ref() else {
        return Err((Errno::Perm, "read-only export".into()));
    };
    let len = u64::from(req.length);
    let _pass = pass_gate(export).await?;
    let base = base_blocks(export, req.offset, len, req.flags).await?;
    ov.write_zeroes(req.offset, len, req.has_flag(CMD_FLAG_NO_HOLE), &base)
        .map_err(|e| (io_errno(&e, req.flags), e.to_string()))?;
    if req.has_flag(CMD_FLAG_FUA) {
        flush(conn)
            .await
            .map_err(|e| (io_errno(&e, req.flags), e.to_string()))?;
    }
    Ok(())
}

async fn trim(conn: &Conn, req: &Request) -> ReqResult<()> {
    let Some(ov) = conn.export.overlay.as_ref() else {
        return Err((Errno::Perm, "read-only export".into()));
    };
    let _pass = pass_gate(&conn.export).await?;
    ov.trim(req.offset, u64::from(req.length))
        .map_err(|e| (io_errno(&e, req.flags), e.to_string()))
}

/// `fdatasync` of the overlay on the blocking pool (the worker keeps serving).
async fn flush(conn: &Conn) -> io::Result<()> {
    let Some(ov) = conn.export.overlay.clone() else {
        return Ok(());
    };
    match tokio::task::spawn_blocking(move || ov.flush()).await {
        Ok(r) => r,
        Err(e) => Err(io::Error::other(e)),
    }
}

async fn cache(conn: &Conn, req: &Request) -> ReqResult<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    conn.export
        .file
        .request(req.offset, u64::from(req.length), move |r| {
            let _ = tx.send(r);
        });
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(read_err(&e, req.flags)),
        Err(_) => Err((Errno::Io, "prefetch dropped".into())),
    }
}

/// A piece of a READ reply: a hole (reads as zeros) or bytes.
struct Piece {
    offset: u64,
    len: u64,
    data: Option<Vec<OutBuf>>,
}

fn push_hole(pieces: &mut Vec<Piece>, offset: u64, len: u64) {
    if let Some(last) = pieces.last_mut()
        && last.data.is_none()
        && last.offset + last.len == offset
    {
        last.len += len;
        return;
    }
    pieces.push(Piece {
        offset,
        len,
        data: None,
    });
}

/// Bytes of a base range inside one mapping: straight from the cache when present (zero copy),
/// else after fetching.
async fn read_base(
    file: &Arc<LayeredFile>,
    offset: u64,
    len: u64,
    flags: u16,
) -> ReqResult<Vec<OutBuf>> {
    let n = usize::try_from(len).map_err(|_| (Errno::Inval, "length".to_string()))?;
    if let Some(b) = OutBuf::cache(file, offset, n) {
        return Ok(b);
    }
    let owned = match file
        .read_ref(offset, n)
        .await
        .map_err(|e| read_err(&e, flags))?
    {
        ReadBuf::Owned(v) => Some(v),
        ReadBuf::Cache(_) | ReadBuf::Zeros(_) => None,
    };
    if let Some(v) = owned {
        return Ok(vec![OutBuf::heap(v)]);
    }
    if let Some(b) = OutBuf::cache(file, offset, n) {
        return Ok(b);
    }
    let mut v = vec![0u8; n];
    file.read(offset, &mut v)
        .await
        .map_err(|e| read_err(&e, flags))?;
    Ok(vec![OutBuf::heap(v)])
}

/// Everything a READ returns, fetched before any byte of the reply is sent.
async fn gather(export: &Export, offset: u64, len: u64, flags: u16) -> ReqResult<Vec<Piece>> {
    let mut pieces = Vec::new();
    if len == 0 {
        return Ok(pieces);
    }
    let runs = match export.overlay.as_ref() {
        Some(ov) if ov.touches(offset, len) => ov.runs(offset, len),
        _ => vec![(offset..offset + len, BlockState::Base)],
    };
    for (r, state) in runs {
        let rlen = r.end - r.start;
        match state {
            BlockState::Zero => push_hole(&mut pieces, r.start, rlen),
            BlockState::Data => {
                let ov = export
                    .overlay
                    .as_ref()
                    .ok_or((Errno::Io, "no overlay".to_string()))?;
                let mut v = vec![0u8; usize::try_from(rlen).unwrap_or(0)];
                ov.read_at(r.start, &mut v)
                    .map_err(|e| (io_errno(&e, flags), e.to_string()))?;
                pieces.push(Piece {
                    offset: r.start,
                    len: rlen,
                    data: Some(vec![OutBuf::heap(v)]),
                });
            }
            BlockState::Base => {
                let segs = export
                    .file
                    .segments(r.start, rlen)
                    .map_err(|e| read_err(&e, flags))?;
                for s in segs {
                    match s {
                        Segment::Zeros { offset, len } => push_hole(&mut pieces, offset, len),
                        Segment::Data { offset, len, .. } => {
                            let data = read_base(&export.file, offset, len, flags).await?;
                            pieces.push(Piece {
                                offset,
                                len,
                                data: Some(data),
                            });
                        }
                    }
                }
            }
        }
    }
    Ok(pieces)
}

fn u32_len(len: u64) -> u32 {
    // READ lengths are u32 on the wire, and pieces lie inside the request.
    u32::try_from(len).unwrap_or(u32::MAX)
}

async fn read_reply(conn: &Conn, req: &Request) {
    let pieces = match gather(&conn.export, req.offset, u64::from(req.length), req.flags).await {
        Ok(p) => p,
        Err((errno, msg)) => {
            tracing::info!(conn = conn.id, cookie = req.cookie, offset = req.offset,
                len = req.length, %errno, error = %msg, "nbd: read failed");
            conn.send_error(req, errno, &msg).await;
            return;
        }
    };
    conn.shared.counters.bump_read_bytes(u64::from(req.length));
    metrics::counter!("thaw_nbd_read_bytes_total").increment(u64::from(req.length));
    let mut bufs = Vec::with_capacity(pieces.len() * 2 + 1);
    let contiguous = |bufs: &mut Vec<OutBuf>, pieces: Vec<Piece>| {
        for p in pieces {
            match p.data {
                Some(d) => bufs.extend(d),
                None => OutBuf::push_zeros(bufs, usize::try_from(p.len).unwrap_or(0)),
            }
        }
    };
    if !conn.neg.structured_replies {
        bufs.push(OutBuf::heap(simple_reply(req.cookie, 0).to_vec()));
        contiguous(&mut bufs, pieces);
    } else if pieces.is_empty() {
        bufs.push(OutBuf::heap(none_chunk(req.cookie).to_vec()));
    } else if req.has_flag(CMD_FLAG_DF) {
        match offset_data_header(req.cookie, req.offset, req.length, true) {
            Ok(h) => bufs.push(OutBuf::heap(h.to_vec())),
            Err(e) => return conn.send_error(req, Errno::Inval, &e.to_string()).await,
        }
        contiguous(&mut bufs, pieces);
    } else {
        let last = pieces.len() - 1;
        for (i, p) in pieces.into_iter().enumerate() {
            let done = i == last;
            let head = match &p.data {
                None => offset_hole_chunk(req.cookie, p.offset, u32_len(p.len), done)
                    .map(|h| h.to_vec()),
                Some(_) => offset_data_header(req.cookie, p.offset, u32_len(p.len), done)
                    .map(|h| h.to_vec()),
            };
            match head {
                Ok(h) => bufs.push(OutBuf::heap(h)),
                Err(e) => return conn.send_error(req, Errno::Io, &e.to_string()).await,
            }
            if let Some(d) = p.data {
                bufs.extend(d);
            }
        }
    }
    conn.send(bufs).await;
}

/// `base:allocation` extents of the range: overlay zero blocks and nil mappings are
/// `HOLE | ZERO`, everything else allocated data.
fn extents(
    export: &Export,
    offset: u64,
    len: u64,
) -> Result<Vec<Extent>, crate::engine::ReadError> {
    let mut out: Vec<Extent> = Vec::new();
    let push = |out: &mut Vec<Extent>, length: u64, flags: u32| -> bool {
        match out.last_mut() {
            Some(e) if e.flags == flags => e.length += length,
            _ => {
                if out.len() >= MAX_EXTENTS {
                    return false;
                }
                out.push(Extent { length, flags });
            }
        }
        true
    };
    let runs = match export.overlay.as_ref() {
        Some(ov) if ov.touches(offset, len) => ov.runs(offset, len),
        _ => vec![(offset..offset + len, BlockState::Base)],
    };
    'outer: for (r, state) in runs {
        let rlen = r.end - r.start;
        match state {
            BlockState::Zero => {
                if !push(&mut out, rlen, STATE_HOLE | STATE_ZERO) {
                    break;
                }
            }
            BlockState::Data => {
                if !push(&mut out, rlen, 0) {
                    break;
                }
            }
            BlockState::Base => {
                for s in export.file.segments(r.start, rlen)? {
                    let ok = match s {
                        Segment::Zeros { len, .. } => push(&mut out, len, STATE_HOLE | STATE_ZERO),
                        Segment::Data { len, .. } => push(&mut out, len, 0),
                    };
                    if !ok {
                        break 'outer;
                    }
                }
            }
        }
    }
    Ok(out)
}

async fn block_status_reply(conn: &Conn, req: &Request) {
    let Some(ctx) = conn.neg.base_allocation else {
        return conn
            .send_error(req, Errno::Inval, "no metadata context selected")
            .await;
    };
    let ext = match extents(&conn.export, req.offset, u64::from(req.length)) {
        Ok(e) => e,
        Err(e) => {
            let (errno, msg) = read_err(&e, req.flags);
            return conn.send_error(req, errno, &msg).await;
        }
    };
    let mut out = Vec::new();
    match encode_block_status(
        &mut out,
        req.cookie,
        ctx,
        req.length,
        &ext,
        req.has_flag(CMD_FLAG_REQ_ONE),
        true,
    ) {
        Ok(_) => conn.send(vec![OutBuf::heap(out)]).await,
        Err(e) => conn.send_error(req, Errno::Io, &e.to_string()).await,
    }
}
