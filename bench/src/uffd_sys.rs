//! Every `unsafe` of `thaw-bench uffd`: anonymous (and hugetlb) mappings standing in for guest
//! memory, the handshake's SCM_RIGHTS message, and the minimal reference handler's blocking
//! `read()` of a `uffd_msg` and its `UFFDIO_COPY`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// `_IOWR(0xAA, 0x03, struct uffdio_copy)`.
const UFFDIO_COPY: u64 = (3 << 30) | (40 << 16) | (0xAA << 8) | 0x03;
/// `UFFD_EVENT_PAGEFAULT`.
const EVENT_PAGEFAULT: u8 = 0x12;

/// `struct uffdio_copy`.
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

const _: () = assert!(size_of::<UffdioCopy>() == 40);

/// An anonymous private mapping (guest memory or a source buffer), optionally hugetlb-backed.
#[derive(Debug)]
pub struct Mem {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping stays valid until drop; it is only accessed through volatile byte reads,
// and through slices while no fault handler writes it.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    /// `len` bytes (a multiple of the page size), 2 MiB hugetlb pages if `huge`.
    pub fn new(len: usize, huge: bool) -> io::Result<Self> {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if huge {
            flags |= libc::MAP_HUGETLB;
        }
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: p.cast(),
            len,
        })
    }

    pub fn addr(&self) -> u64 {
        self.base as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Reads one byte at `offset` (a first touch: blocks until the page is installed).
    pub fn touch(&self, offset: usize) -> u8 {
        assert!(offset < self.len);
        // SAFETY: inside the live mapping; a missing page blocks in the kernel until installed.
        unsafe { self.base.wrapping_add(offset).read_volatile() }
    }

    /// The whole mapping (every page must be installed, or this faults them in).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the live mapping of `len` bytes; nothing writes it while the slice lives (the
        // handler's copies are done once every page was touched).
        unsafe { std::slice::from_raw_parts(self.base, self.len) }
    }

    /// The whole mapping, writable (source buffers only: never registered with a userfaultfd).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the live mapping of `len` bytes, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.len) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Clears `O_NONBLOCK` on `fd` (the minimal handler blocks in `read()`).
pub fn set_blocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL on an open fd.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on an open fd with an int argument.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `data` with `fd` attached (SCM_RIGHTS), as Firecracker sends its handshake.
pub fn send_with_fd(sock: &UnixStream, data: &[u8], fd: &OwnedFd) -> io::Result<()> {
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: pure size computation.
    let space = unsafe { libc::CMSG_SPACE(4) };
    msg.msg_controllen = space as usize;
    // SAFETY: the 64-byte control buffer holds CMSG_SPACE(4).
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    // SAFETY: `cmsg` points at the start of `control`, live and aligned.
    let hdr = unsafe { &mut *cmsg };
    hdr.cmsg_level = libc::SOL_SOCKET;
    hdr.cmsg_type = libc::SCM_RIGHTS;
    // SAFETY: pure size computation.
    let clen = unsafe { libc::CMSG_LEN(4) };
    hdr.cmsg_len = clen as usize;
    // SAFETY: CMSG_DATA of the header inside `control`.
    let p = unsafe { libc::CMSG_DATA(cmsg) };
    // SAFETY: 4 bytes fit after the header inside `control`.
    unsafe { p.cast::<i32>().write_unaligned(fd.as_raw_fd()) };
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &raw const msg, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Blocking `read()` of one `uffd_msg`: the faulting address of a page fault, `None` for any
/// other event.
pub fn read_fault(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let mut msg = [0u64; 4];
    loop {
        // SAFETY: reads at most 32 bytes (one uffd_msg) into the live 32-byte buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), msg.as_mut_ptr().cast(), 32) };
        if n == 32 {
            break;
        }
        let e = io::Error::last_os_error();
        if n < 0 && e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(if n < 0 {
            e
        } else {
            io::Error::new(io::ErrorKind::UnexpectedEof, "short uffd_msg")
        });
    }
    // uffd_msg: u8 event at 0; pagefault.flags at 8, pagefault.address at 16.
    let event = msg[0].to_ne_bytes()[0];
    Ok((event == EVENT_PAGEFAULT).then_some(msg[2]))
}

/// `UFFDIO_COPY` of `len` bytes from `src` (a live buffer of at least `len` bytes) to `dst` in
/// the registered range, waking the faulting thread.
pub fn copy(fd: BorrowedFd<'_>, dst: u64, src: &[u8]) -> io::Result<()> {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: `c` is a live `struct uffdio_copy`; the kernel reads `src` (a live slice) with
    // copy_from_user and writes only inside the registered range.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY as _, &raw mut c) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
