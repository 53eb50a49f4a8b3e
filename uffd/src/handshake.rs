//! Firecracker's UFFD handshake: one connection on a unix socket, one message carrying the region
//! JSON and the userfaultfd (plus, in e2b's fork, an optional memfd) via `SCM_RIGHTS`.
//!
//! Firecracker never sends anything else and never closes its end while it lives (it `forget`s the
//! socket), so the connection is kept: its hang-up is how the fault loop learns the VM is gone.
//! Every received fd is owned from the moment it arrives; on any error they are all closed, and
//! the peer (known from `SO_PEERCRED`) is SIGKILLed when [`HandshakeConfig::kill_peer_on_error`]
//! is set, because a Firecracker left without a handler hangs forever on its first fault.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use thaw_codec::RegionMap;
use thaw_codec::uffd::MAX_JSON_LEN;

use crate::error::{ErrorKind, Result, UffdError};
use crate::os;

/// How long to wait between reads that returned nothing (Firecracker #5097: empty messages).
const EMPTY_READ_BACKOFF: Duration = Duration::from_millis(20);

/// Handshake parameters.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// Size of the memory file the regions must cover exactly.
    pub memfile_size: u64,
    /// Deadline for the peer to connect *and* send its message.
    pub timeout: Duration,
    /// SIGKILL the peer when the handshake fails after it connected.
    pub kill_peer_on_error: bool,
}

impl HandshakeConfig {
    /// A config with a 10 s deadline (e2b's accept deadline) that kills the peer on error.
    pub fn new(memfile_size: u64) -> Self {
        Self {
            memfile_size,
            timeout: Duration::from_secs(10),
            kill_peer_on_error: true,
        }
    }
}

/// The peer's credentials from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id (Firecracker's pid: the process to kill when failing closed).
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// A completed handshake.
#[derive(Debug)]
pub struct Handshake {
    /// The validated regions.
    pub regions: RegionMap,
    /// The userfaultfd (already through `UFFDIO_API` and registered by the peer).
    pub uffd: OwnedFd,
    /// The optional second fd (e2b's fork: a memfd backing guest memory).
    pub memfd: Option<OwnedFd>,
    /// The peer.
    pub peer: PeerCred,
    /// The connection, kept open: its hang-up means the peer exited.
    pub stream: UnixStream,
}

/// Waits (up to `cfg.timeout`) for one peer on `listener` and receives its handshake.
pub fn accept(listener: &UnixListener, cfg: &HandshakeConfig) -> Result<Handshake> {
    let deadline = Instant::now() + cfg.timeout;
    listener
        .set_nonblocking(true)
        .map_err(|e| UffdError::io(ErrorKind::Io, "set the listener non-blocking", e))?;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(UffdError::new(
                        ErrorKind::Timeout,
                        format!("no peer connected within {:?}", cfg.timeout),
                    ));
                }
                os::poll(&[(listener.as_fd(), libc::POLLIN)], Some(left))
                    .map_err(|e| UffdError::io(ErrorKind::Io, "poll the listener", e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(UffdError::io(ErrorKind::Io, "accept a peer", e)),
        }
    };
    receive(stream, deadline, cfg)
}

/// Receives the handshake on an already accepted connection (the rest of [`accept`]).
pub fn receive(stream: UnixStream, deadline: Instant, cfg: &HandshakeConfig) -> Result<Handshake> {
    let peer = os::peer_cred(stream.as_fd())
        .ok()
        .map(|(pid, uid, gid)| PeerCred { pid, uid, gid });
    receive_inner(stream, deadline, cfg, peer).map_err(|e| {
        let killed = cfg.kill_peer_on_error && peer.is_some_and(|p| os::kill_peer(p.pid));
        if killed {
            tracing::error!(error = %e, pid = peer.map(|p| p.pid), "UFFD handshake failed; killed the peer");
        }
        e.with_peer_killed(killed)
    })
}

fn receive_inner(
    stream: UnixStream,
    deadline: Instant,
    cfg: &HandshakeConfig,
    peer: Option<PeerCred>,
) -> Result<Handshake> {
    let peer = peer.ok_or_else(|| UffdError::new(ErrorKind::Io, "SO_PEERCRED failed"))?;
    stream
        .set_nonblocking(true)
        .map_err(|e| UffdError::io(ErrorKind::Io, "set the connection non-blocking", e))?;
    let mut buf = vec![0u8; MAX_JSON_LEN];
    let mut empty_reads = 0u32;
    let received = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match os::recv_with_fds(stream.as_fd(), &mut buf) {
            Ok(r) if r.len == 0 && r.fds.is_empty() => {
                // Empty read: EOF, or Firecracker's socket race. Retry until the deadline.
                empty_reads += 1;
                if left.is_zero() {
                    return Err(UffdError::new(
                        ErrorKind::Handshake,
                        format!(
                            "peer pid {} sent no message before the deadline ({empty_reads} empty reads)",
                            peer.pid
                        ),
                    ));
                }
                std::thread::sleep(EMPTY_READ_BACKOFF.min(left));
            }
            Ok(r) => break r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if left.is_zero() {
                    return Err(UffdError::new(
                        ErrorKind::Timeout,
                        format!(
                            "peer pid {} sent no message within {:?}",
                            peer.pid, cfg.timeout
                        ),
                    ));
                }
                os::poll(&[(stream.as_fd(), libc::POLLIN)], Some(left))
                    .map_err(|e| UffdError::io(ErrorKind::Io, "poll the connection", e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(UffdError::io(ErrorKind::Io, "recvmsg on the connection", e)),
        }
    };
    // From here on every fd is owned by `received.fds`: any early return closes them all.
    let json = &buf[..received.len];
    let fail = |detail: String| {
        Err(UffdError::new(
            ErrorKind::Handshake,
            format!("peer pid {}: {detail}", peer.pid),
        ))
    };
    if received.control_truncated {
        return fail(format!(
            "control data truncated (more than {} fds sent)",
            os::MAX_FDS
        ));
    }
    if received.data_truncated {
        return fail("message truncated".into());
    }
    match received.fds.len() {
        0 => {
            return fail(format!(
                "message of {} bytes carried no userfaultfd",
                json.len()
            ));
        }
        1 | 2 => {}
        n => {
            return fail(format!(
                "message carried {n} fds (expected the uffd and at most a memfd)"
            ));
        }
    }
    if json.is_empty() {
        return fail("message carried fds but no region JSON".into());
    }
    let regions = RegionMap::parse(json, cfg.memfile_size).map_err(UffdError::from)?;
    let mut fds = received.fds.into_iter();
    let (Some(uffd), memfd) = (fds.next(), fds.next()) else {
        return fail("no userfaultfd".into());
    };
    if !is_userfaultfd(&uffd) {
        return fail("the first fd is not a userfaultfd".into());
    }
    Ok(Handshake {
        regions,
        uffd,
        memfd,
        peer,
        stream,
    })
}

/// Whether `fd` is a userfaultfd (`anon_inode:[userfaultfd]` in `/proc/self/fd`).
fn is_userfaultfd(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy().contains("userfaultfd"))
        // Without /proc there is nothing to check against: let the first ioctl decide.
        .unwrap_or(true)
}
