//! Small OS wrappers the handler needs and std lacks: `recvmsg` with `SCM_RIGHTS`, `SO_PEERCRED`,
//! `poll`, `eventfd`, `kill`, and a read-only zero mapping.
//!
//! # Safety model
//!
//! Each `unsafe` block is one libc call (or one `CMSG_*` pointer step) on fds borrowed for the
//! call's duration and on buffers that live on the caller's stack or heap for the whole call, with
//! lengths taken from those same buffers. Every fd the kernel hands us is wrapped in an [`OwnedFd`]
//! immediately, before anything can fail, so no error path leaks one. The zero mapping is owned by
//! [`ZeroPages`] and unmapped only in its `Drop`.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// The most fds accepted in one message (Firecracker sends 1 or 2; extras are received and closed).
pub(crate) const MAX_FDS: usize = 8;

/// One received message: bytes read, fds (owned), and whether data or control was truncated.
#[derive(Debug)]
pub(crate) struct Received {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    pub data_truncated: bool,
    pub control_truncated: bool,
}

/// `recvmsg(MSG_DONTWAIT | MSG_CMSG_CLOEXEC)` into `buf`, collecting every `SCM_RIGHTS` fd.
pub(crate) fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    // u64 words keep the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 16];
    #[allow(clippy::cast_possible_truncation, reason = "32 bytes")]
    const FD_BYTES: u32 = (MAX_FDS * size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(FD_BYTES) } as usize;
    debug_assert!(space <= size_of::<[u64; 16]>());
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space.min(size_of::<[u64; 16]>()) as _;
    // SAFETY: `msg` points at `iov` (-> `buf`) and `control`, all live and writable for the call.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &raw mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    let len = usize::try_from(n).map_err(|_| errno())?;
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR only reads its control fields.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/CMSG_NXTHDR lies inside `control`.
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a pure size computation.
            let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
            let payload = (hdr.cmsg_len as usize).saturating_sub(header_len);
            // SAFETY: the data of a header inside `control` starts inside `control`.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            for i in 0..payload / size_of::<RawFd>() {
                // SAFETY: `i` indexes one of the `payload / 4` fds the kernel wrote after the
                // header, so the offset stays inside `control`. read_unaligned below because
                // CMSG_DATA has no alignment guarantee for i32.
                let at = unsafe { data.add(i * size_of::<RawFd>()) };
                // SAFETY: `at` points at 4 initialised bytes inside `control` (see above).
                let fd = unsafe { at.cast::<RawFd>().read_unaligned() };
                if fd >= 0 {
                    // SAFETY: SCM_RIGHTS installed this fd in our table for us alone.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        // SAFETY: `cmsg` is a valid header inside `msg`'s control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
    }
    Ok(Received {
        len,
        fds,
        data_truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        control_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// The peer's credentials (`SO_PEERCRED`): pid, uid, gid.
pub(crate) fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<(i32, u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    #[allow(clippy::cast_possible_truncation, reason = "12 bytes")]
    const CRED_LEN: libc::socklen_t = size_of::<libc::ucred>() as libc::socklen_t;
    let mut len = CRED_LEN;
    // SAFETY: `cred` and `len` are live and writable; `len` is `cred`'s size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &raw mut len,
        )
    };
    if rc < 0 {
        return Err(errno());
    }
    Ok((cred.pid, cred.uid, cred.gid))
}

/// `poll` on `fds` (fd, events) for at most `timeout` (`None` = forever); returns revents per fd.
/// EINTR is reported as "nothing ready".
pub(crate) fn poll(
    fds: &[(BorrowedFd<'_>, i16)],
    timeout: Option<Duration>,
) -> io::Result<Vec<i16>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, events)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: *events,
            revents: 0,
        })
        .collect();
    let ms = match timeout {
        None => -1,
        // Round up so a 0.5 ms deadline does not become a busy 0 ms poll.
        Some(t) => i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
    };
    // SAFETY: `pfds` is a live array of `pfds.len()` pollfds.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = errno();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![0; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents).collect())
}

/// A non-blocking, close-on-exec eventfd used to wake the fault thread.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes two ints and returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd (never blocks; a saturated counter is already "readable").
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live 8-byte array.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// Resets an eventfd's counter.
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live 8-byte array.
    let _ = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
}

/// Drains readable bytes from a non-blocking socket; `Ok(true)` when the peer closed it (EOF).
pub(crate) fn socket_closed(sock: BorrowedFd<'_>) -> io::Result<bool> {
    let mut buf = [0u8; 256];
    loop {
        // SAFETY: reads at most `buf.len()` bytes into a live buffer.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => return Ok(true),
            n if n > 0 => continue,
            _ => {
                let e = errno();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(false),
                    Some(libc::ECONNRESET | libc::ENOTCONN | libc::EPIPE) => Ok(true),
                    _ => Err(e),
                };
            }
        }
    }
}

/// This process's pid.
pub(crate) fn getpid() -> i32 {
    // SAFETY: getpid(2) has no preconditions.
    unsafe { libc::getpid() }
}

/// SIGKILLs `pid`, refusing pids that would hit more than one process (≤ 1) or this process.
/// Returns whether a signal was sent.
pub fn kill_peer(pid: i32) -> bool {
    if pid <= 1 || pid == getpid() {
        return false;
    }
    // SAFETY: kill(2) with a positive pid other than ours signals exactly that process.
    unsafe { libc::kill(pid, libc::SIGKILL) == 0 }
}

/// Reads `buf.len()` bytes at address `addr` of process `pid` with `process_vm_readv(2)` (the
/// guest memory of a peer that sent no memfd). A short read is continued where it stopped; a read
/// that makes no progress, an unmapped address, or a peer that is gone is an error (`ESRCH` for a
/// dead peer, `EFAULT` for an address it does not map, `EPERM` without ptrace rights over it):
/// never short data.
///
/// # Errors
/// As above; the error names how many bytes were read before it.
pub fn read_process_memory(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("process_vm_readv: invalid pid {pid}"),
        ));
    }
    let mut done = 0usize;
    while done < buf.len() {
        let Some(remote) = usize::try_from(addr).ok().and_then(|a| a.checked_add(done)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("process_vm_readv: address {addr:#x} + {done} overflows"),
            ));
        };
        let rest = &mut buf[done..];
        let local = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        let remote_iov = libc::iovec {
            iov_base: remote as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: one local iovec over `rest`, a live exclusive borrow of exactly `iov_len`
        // bytes that the kernel writes into; the remote iovec is only an address in the other
        // process, checked by the kernel (it is never dereferenced here).
        let n = unsafe {
            libc::process_vm_readv(pid, &raw const local, 1, &raw const remote_iov, 1, 0)
        };
        if n < 0 {
            let e = errno();
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "process_vm_readv of pid {pid} at {:#x} ({} bytes, {done} read before): {e}",
                    addr.saturating_add(done as u64),
                    rest.len()
                ),
            ));
        }
        let n = usize::try_from(n).unwrap_or(0);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "process_vm_readv of pid {pid} at {:#x}: no progress after {done} of {} bytes",
                    addr.saturating_add(done as u64),
                    buf.len()
                ),
            ));
        }
        done += n;
    }
    Ok(())
}

/// A read-only, never-written anonymous mapping: every byte reads as zero, and it costs no memory
/// (all pages map the shared zero page). The source for zero installs of 2 MiB pages and for
/// write-protected zero installs.
#[derive(Debug)]
pub(crate) struct ZeroPages {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned; sharing its address between threads is harmless.
unsafe impl Send for ZeroPages {}
// SAFETY: as above: nothing ever writes through the pointer.
unsafe impl Sync for ZeroPages {}

impl ZeroPages {
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address; touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(errno());
        }
        Ok(Self { ptr, len })
    }

    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.cast_const().cast()
    }
}

impl Drop for ZeroPages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created and still owns.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_peer_refuses_self_and_groups() {
        assert!(!kill_peer(0));
        assert!(!kill_peer(-1));
        assert!(!kill_peer(1));
        assert!(!kill_peer(getpid()));
    }

    #[test]
    fn read_process_memory_reads_exactly_or_fails() {
        let src: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        let mut out = vec![0u8; src.len()];
        read_process_memory(getpid(), src.as_ptr() as u64, &mut out).unwrap();
        assert_eq!(out, src);
        // An address nothing maps: an error, not short data.
        let e = read_process_memory(getpid(), 8, &mut out).unwrap_err();
        assert!(e.to_string().contains("process_vm_readv"), "{e}");
        assert!(
            e.to_string().contains("os error 14"),
            "EFAULT expected: {e}"
        );
        assert!(read_process_memory(0, src.as_ptr() as u64, &mut out).is_err());
    }

    #[test]
    fn eventfd_wakes_poll() {
        let fd = eventfd().unwrap();
        let r = poll(&[(fd.as_fd(), libc::POLLIN)], Some(Duration::ZERO)).unwrap();
        assert_eq!(r[0] & libc::POLLIN, 0);
        eventfd_signal(fd.as_fd());
        let r = poll(&[(fd.as_fd(), libc::POLLIN)], Some(Duration::ZERO)).unwrap();
        assert_ne!(r[0] & libc::POLLIN, 0);
        eventfd_drain(fd.as_fd());
        let r = poll(&[(fd.as_fd(), libc::POLLIN)], Some(Duration::ZERO)).unwrap();
        assert_eq!(r[0] & libc::POLLIN, 0);
    }

    use std::os::fd::AsFd;
}
