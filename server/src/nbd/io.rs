//! Socket I/O of the NBD server on a runtime worker: [`Stream`] (TCP or unix, tokio-uring),
//! [`Reader`] (buffered reads that never lose bytes across requests) and [`OutBuf`], the owned
//! buffers a reply is written from with one `writev`, including [`OutBuf::cache`]: a window of
//! a build's cache memory, written to the socket without a copy.
//!
//! # Safety model
//!
//! The `unsafe` contract here is `IoBuf` for [`OutBuf`] (tokio-uring reads the bytes at
//! `stable_ptr()..+bytes_init()` while the operation runs, and holds the buffer until the
//! completion is reaped, even when the future is dropped); [`Stream::try_send`] hands the same
//! bytes to one synchronous `sendmsg`, under a borrow of the buffers. Every variant keeps its bytes alive
//! and unmoved for as long as the `OutBuf` lives:
//!
//! - `Heap`: a `Vec<u8>` that is never resized after construction (heap storage does not move
//!   when the `Vec` header moves); [`OutBuf::into_small_heap`] gives it back only by value,
//!   once the `OutBuf` is consumed (the reply writer reuses written header buffers);
//! - `Zeros`: a window of a `static` zeroed array;
//! - `Cache`: a window of a build's chunk-cache mapping, taken from [`LayeredFile::try_get`]
//!   (or `try_get_data`) on an `Arc<LayeredFile>` that the `OutBuf` keeps. The mapping
//!   belongs to a `BuildFile` the `LayeredFile` holds (set once, never replaced), so it stays
//!   mapped while the `Arc` lives; the bytes were present when borrowed, and present bytes are
//!   never written again except by `ChunkCache::reset`, which needs `&mut` and so cannot run
//!   while the build file is shared (see `server/src/cache/memory.rs`, invariant 1).
//!
//! `start..end` is bounds-checked against the variant's length at construction and only ever
//! narrows ([`OutBuf::advance`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tokio_uring::BufResult;
use tokio_uring::buf::{BoundedBuf, BoundedBufMut, IoBuf};
use tokio_uring::net::{TcpStream, UnixStream};

use crate::engine::LayeredFile;

/// Bytes of the static zero page that hole bytes are written from.
const ZERO_LEN: usize = 256 * 1024;
static ZERO: [u8; ZERO_LEN] = [0; ZERO_LEN];

/// Largest number of buffers handed to one `writev` (below `IOV_MAX`).
const MAX_IOVECS: usize = 512;

/// Largest number of buffers one [`Stream::try_send`] hands to `sendmsg` (an iovec array on
/// the stack); the rest waits for the next call.
const DIRECT_IOVECS: usize = 64;

/// A connected client socket.
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain socket.
    Unix(UnixStream),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp(_) => "Stream::Tcp",
            Self::Unix(_) => "Stream::Unix",
        })
    }
}

impl Stream {
    /// Reads into `buf`'s uninitialised tail (see tokio-uring's `read`).
    pub async fn read<T: BoundedBufMut>(&self, buf: T) -> BufResult<usize, T> {
        match self {
            Self::Tcp(s) => s.read(buf).await,
            Self::Unix(s) => s.read(buf).await,
        }
    }

    async fn writev_once(&self, bufs: Vec<OutBuf>) -> BufResult<usize, Vec<OutBuf>> {
        match self {
            Self::Tcp(s) => s.writev(bufs).await,
            Self::Unix(s) => s.writev(bufs).await,
        }
    }

    /// Writes every byte of `bufs`, in order (several `writev`s when the socket takes less).
    pub async fn write_all(&self, mut bufs: Vec<OutBuf>) -> io::Result<()> {
        bufs.retain(|b| !b.is_empty());
        while !bufs.is_empty() {
            let rest = if bufs.len() > MAX_IOVECS {
                bufs.split_off(MAX_IOVECS)
            } else {
                Vec::new()
            };
            while !bufs.is_empty() {
                let (res, back) = self.writev_once(bufs).await;
                bufs = back;
                let n = res?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "socket accepted no bytes",
                    ));
                }
                let done = consume(&mut bufs, n);
                bufs.drain(..done);
            }
            bufs = rest;
        }
        Ok(())
    }

    /// Writes every byte of `bufs`, in order, and hands the vector back for reuse: its buffers
    /// were all written (the reply writer recycles the vector and the small header buffers in
    /// it, so a batch costs no allocation of ours). One `writev` in the usual case; after a
    /// partial write the rest goes through [`write_all`](Self::write_all).
    pub async fn write_batch(&self, bufs: Vec<OutBuf>) -> (io::Result<()>, Vec<OutBuf>) {
        let total: usize = bufs.iter().map(OutBuf::len).sum();
        if total == 0 {
            return (Ok(()), bufs);
        }
        if bufs.len() > MAX_IOVECS {
            return (self.write_all(bufs).await, Vec::new());
        }
        let (res, mut bufs) = self.writev_once(bufs).await;
        let n = match res {
            Ok(0) => {
                let e = io::Error::new(io::ErrorKind::WriteZero, "socket accepted no bytes");
                return (Err(e), bufs);
            }
            Ok(n) => n,
            Err(e) => return (Err(e), bufs),
        };
        if n >= total {
            return (Ok(()), bufs);
        }
        let done = consume(&mut bufs, n);
        let rest = bufs.split_off(done);
        (self.write_all(rest).await, bufs)
    }

    /// Sends what the socket takes right now, without waiting: one `sendmsg(MSG_DONTWAIT)` of the
    /// first buffers of `bufs`, in order. Returns the bytes sent (0 when `bufs` is empty);
    /// `WouldBlock` when the socket buffer is full. The reply writer uses it to answer without a
    /// ring round trip when nothing is queued ahead (see `conn.rs`).
    pub fn try_send(&self, bufs: &[OutBuf]) -> io::Result<usize> {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; DIRECT_IOVECS];
        let mut n = 0;
        for (v, b) in iov.iter_mut().zip(bufs.iter().filter(|b| !b.is_empty())) {
            v.iov_base = IoBuf::stable_ptr(b).cast_mut().cast();
            v.iov_len = b.len();
            n += 1;
        }
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: `msghdr` is plain data (pointers and integers); all zeroes is a valid value
        // (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = n;
        let fd = self.raw_fd();
        // SAFETY: `fd` is this stream's open socket (borrowed for the call). The first `n`
        // iovecs point at `len()` readable bytes of buffers in `bufs`, which the caller's
        // borrow keeps alive and unmoved for the whole call (module safety model); the kernel
        // only reads them, and `msg` points at `iov`, which outlives the call.
        let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        usize::try_from(r).map_err(|_| io::Error::last_os_error())
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
        }
    }

    /// Shuts both directions down (a plain syscall: it also completes a pending io_uring read,
    /// which otherwise keeps the fd open).
    pub fn shutdown(&self) {
        let r = match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
        if let Err(e) = r {
            tracing::trace!(error = %e, "nbd: socket shutdown");
        }
    }
}

/// Marks the first `n` bytes of `bufs` written: returns how many leading buffers are done
/// (the next one, if `n` ends inside it, is advanced).
pub(crate) fn consume(bufs: &mut [OutBuf], mut n: usize) -> usize {
    let mut done = 0;
    for b in bufs.iter_mut() {
        let len = b.len();
        if n >= len {
            n -= len;
            done += 1;
        } else {
            b.advance(n);
            break;
        }
    }
    done
}

/// Buffered reader over a [`Stream`]: bytes read past what was asked stay in the buffer.
#[derive(Debug)]
pub struct Reader {
    buf: Vec<u8>,
    pos: usize,
}

impl Reader {
    /// A reader holding `initial` (bytes already received) with room for `capacity` more.
    pub fn new(initial: &[u8], capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(initial.len()).max(4096));
        buf.extend_from_slice(initial);
        Self { buf, pos: 0 }
    }

    /// Bytes buffered and not consumed.
    pub fn buffered(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    /// Marks `n` buffered bytes consumed.
    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }

    /// Moves the unconsumed bytes to the front and makes room for more.
    fn compact(&mut self) {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.len() == self.buf.capacity() {
            self.buf.reserve(4096);
        }
    }

    /// Reads more bytes from the socket into the buffer; `Ok(0)` at end of stream.
    pub async fn fill(&mut self, stream: &Stream) -> io::Result<usize> {
        self.compact();
        let len = self.buf.len();
        let cap = self.buf.capacity();
        let buf = std::mem::take(&mut self.buf);
        let (res, slice) = stream.read(buf.slice(len..cap)).await;
        self.buf = slice.into_inner();
        res
    }

    /// Makes at least `n` bytes buffered; `UnexpectedEof` if the peer closes first.
    pub async fn need(&mut self, stream: &Stream, n: usize) -> io::Result<()> {
        while self.buffered().len() < n {
            if self.fill(stream).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// Reads exactly `n` bytes into a new vector (buffered bytes first, then straight from the
    /// socket into the vector).
    pub async fn read_vec(&mut self, stream: &Stream, n: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        let take = self.buffered().len().min(n);
        out.extend_from_slice(&self.buffered()[..take]);
        self.consume(take);
        while out.len() < n {
            let len = out.len();
            let (res, slice) = stream.read(out.slice(len..n)).await;
            out = slice.into_inner();
            if res? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(out)
    }

    /// Reads and discards `n` bytes.
    pub async fn skip(&mut self, stream: &Stream, mut n: u64) -> io::Result<()> {
        loop {
            let have = self.buffered().len() as u64;
            let take = have.min(n);
            self.consume(usize::try_from(take).unwrap_or(usize::MAX));
            n -= take;
            if n == 0 {
                return Ok(());
            }
            if self.fill(stream).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// What an [`OutBuf`] points at.
enum Src {
    Heap(Vec<u8>),
    Zeros,
    Cache {
        // Keeps the cache mapping alive (see the safety model).
        _file: Arc<LayeredFile>,
        ptr: *const u8,
    },
}

/// An owned buffer of a reply, written with `writev`. See the module's safety model.
pub struct OutBuf {
    src: Src,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for OutBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.src {
            Src::Heap(_) => "heap",
            Src::Zeros => "zeros",
            Src::Cache { .. } => "cache",
        };
        f.debug_struct("OutBuf")
            .field("kind", &kind)
            .field("len", &self.len())
            .finish()
    }
}

impl OutBuf {
    /// Bytes owned on the heap.
    pub fn heap(v: Vec<u8>) -> Self {
        let end = v.len();
        Self {
            src: Src::Heap(v),
            start: 0,
            end,
        }
    }

    /// `len` zero bytes, as buffers of at most 256 KiB each, appended to `out`.
    pub fn push_zeros(out: &mut Vec<OutBuf>, mut len: usize) {
        while len > 0 {
            let n = len.min(ZERO_LEN);
            out.push(Self {
                src: Src::Zeros,
                start: 0,
                end: n,
            });
            len -= n;
        }
    }

    /// The bytes `offset..offset + len` of `file`, straight from its cache memory, if they lie
    /// inside one mapping and are present ([`LayeredFile::try_get`]); `None` otherwise. Nil
    /// mappings come back as zeros.
    pub fn cache(file: &Arc<LayeredFile>, offset: u64, len: usize) -> Option<Vec<OutBuf>> {
        Some(vec![Self::from_cache(file, file.try_get(offset, len)?)])
    }

    /// Like [`cache`](Self::cache), but only for bytes of one *data* mapping
    /// ([`LayeredFile::try_get_data`]: a nil mapping is `None`), and as one buffer.
    pub fn cache_data(file: &Arc<LayeredFile>, offset: u64, len: usize) -> Option<OutBuf> {
        Some(Self::from_cache(file, file.try_get_data(offset, len)?))
    }

    /// `bytes` must come from `file`'s `try_get`/`try_get_data` (module safety model).
    fn from_cache(file: &Arc<LayeredFile>, bytes: &[u8]) -> Self {
        Self {
            src: Src::Cache {
                _file: Arc::clone(file),
                ptr: bytes.as_ptr(),
            },
            start: 0,
            end: bytes.len(),
        }
    }

    /// The heap vector of a `heap` buffer of at most `max_capacity` bytes of capacity, for
    /// reuse once it has been written; `None` for any other buffer.
    pub fn into_small_heap(self, max_capacity: usize) -> Option<Vec<u8>> {
        match self.src {
            Src::Heap(v) if v.capacity() <= max_capacity => Some(v),
            _ => None,
        }
    }

    /// Remaining length.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether nothing remains.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the first `n` bytes (after a partial write).
    pub fn advance(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
    }

    fn base(&self) -> *const u8 {
        match &self.src {
            Src::Heap(v) => v.as_ptr(),
            Src::Zeros => ZERO.as_ptr(),
            Src::Cache { ptr, .. } => *ptr,
        }
    }
}

// SAFETY: `base() + start` is valid for `end - start` bytes and stays valid and unmoved while
// `self` lives (module safety model: a never-resized Vec, a static, or cache memory kept mapped
// and unchanged by the `Arc<LayeredFile>` in `self`); `bytes_init() == bytes_total()`.
unsafe impl IoBuf for OutBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.base().wrapping_add(self.start)
    }

    fn bytes_init(&self) -> usize {
        self.len()
    }

    fn bytes_total(&self) -> usize {
        self.len()
    }
}
