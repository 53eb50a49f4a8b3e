//! The fake Firecracker's guest memory and handshake, shared by the UFFD tests: anonymous or
//! memfd-backed memory the test owns (optionally aligned for 2 MiB pages), the region JSON, and
//! the SCM_RIGHTS `sendmsg` of the userfaultfd (and memfd) as Firecracker sends them.
#![allow(dead_code)]
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test mappings are a few MiB and the tests run on 64-bit Linux"
)]

use std::os::fd::RawFd;

/// Anonymous memory owned by the test (guest memory of the fake Firecracker).
pub struct Mem {
    map: *mut libc::c_void,
    map_len: usize,
    /// Start of the usable (aligned) part.
    pub base: *mut u8,
    /// Usable length in bytes.
    pub len: usize,
}

// SAFETY: the mapping stays valid until drop; the tests access it only through raw pointer reads
// and writes of bytes inside it.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    pub fn new(len: usize, align: usize, shared: bool) -> Self {
        let map_len = len + align;
        let flags = if shared {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "mmap");
        let base = (map as usize).next_multiple_of(align) as *mut u8;
        Self {
            map,
            map_len,
            base,
            len,
        }
    }

    /// `len` bytes of `fd` (a memfd), `MAP_SHARED`: guest memory backed by a memfd, as e2b's
    /// Firecracker fork has it.
    pub fn shared_file(fd: RawFd, len: usize) -> Self {
        // SAFETY: a fresh shared mapping of `len` bytes of a file the caller sized to `len`.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED, "mmap of the memfd");
        Self {
            map,
            map_len: len,
            base: map.cast(),
            len,
        }
    }

    pub fn addr(&self) -> u64 {
        self.base as u64
    }

    /// The bytes `offset..offset + len` (faulting them in).
    pub fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.len);
        // SAFETY: inside the live mapping; the bytes are only read here, and the kernel fills
        // them before the read returns (a fault blocks until the handler installs the page).
        unsafe { std::slice::from_raw_parts(self.base.wrapping_add(offset), len) }
    }

    pub fn write_byte(&self, offset: usize, v: u8) {
        assert!(offset < self.len);
        // SAFETY: inside the live, writable mapping.
        unsafe { self.base.wrapping_add(offset).write_volatile(v) };
    }

    pub fn read_u64(&self, offset: usize) -> u64 {
        assert!(offset + 8 <= self.len);
        // SAFETY: inside the live mapping, 8-byte aligned by the callers.
        unsafe { self.base.wrapping_add(offset).cast::<u64>().read_volatile() }
    }

    pub fn write_u64(&self, offset: usize, v: u64) {
        assert!(offset + 8 <= self.len);
        // SAFETY: inside the live mapping, 8-byte aligned by the callers.
        unsafe {
            self.base
                .wrapping_add(offset)
                .cast::<u64>()
                .write_volatile(v)
        };
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

pub fn region_json(base: u64, size: u64, page_size: u64) -> String {
    format!(
        r#"[{{"base_host_virt_addr":{base},"size":{size},"offset":0,"page_size":{page_size},"page_size_kib":{page_size}}}]"#
    )
}

/// `sendmsg` of `data` with `fd` as SCM_RIGHTS, as Firecracker sends its handshake.
/// Allocation-free (a forked child calls it).
pub fn send_with_fd(sock: RawFd, data: &[u8], fd: RawFd) -> bool {
    send_with_fds(sock, data, &[fd])
}

/// `sendmsg` of `data` with up to 8 `fds` as one SCM_RIGHTS message (e2b's fork sends the uffd
/// and a memfd). Allocation-free.
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> bool {
    assert!(!fds.is_empty() && fds.len() <= 8);
    let bytes = (4 * fds.len()) as u32;
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
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes) } as usize;
    // SAFETY: the 64-byte control buffer holds CMSG_SPACE(32).
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    // SAFETY: `cmsg` points at the start of `control`, live and aligned.
    let hdr = unsafe { &mut *cmsg };
    hdr.cmsg_level = libc::SOL_SOCKET;
    hdr.cmsg_type = libc::SCM_RIGHTS;
    // SAFETY: pure size computation.
    hdr.cmsg_len = unsafe { libc::CMSG_LEN(bytes) } as usize;
    // SAFETY: CMSG_DATA of the header inside `control`.
    let out = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
    for (i, &fd) in fds.iter().enumerate() {
        let at = out.wrapping_add(i);
        // SAFETY: at most 8 fds (32 bytes) fit after the header inside `control`.
        unsafe { at.write_unaligned(fd) };
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    unsafe { libc::sendmsg(sock, &raw const msg, 0) >= 0 }
}
