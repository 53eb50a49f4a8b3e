//! The userfaultfd ABI: message layout, ioctl numbers and thin wrappers.
//!
//! # Safety model
//!
//! Every `unsafe` block here is one `ioctl(2)` or `read(2)` on a userfaultfd the caller owns
//! (borrowed as a [`BorrowedFd`], so it stays open for the call), with a pointer to a `#[repr(C)]`
//! argument struct that lives on the stack for the whole call and whose layout matches
//! `<linux/userfaultfd.h>` (sizes asserted below). The kernel validates every address it is given:
//! a bad `dst` or `src` in `UFFDIO_COPY` is an `EFAULT`/`EINVAL`/`ENOENT` error, never undefined
//! behaviour in this process, because the kernel (not Rust code) reads `src` and writes `dst`.
//!
//! Filling pages (`copy`, `zeropage`) is crate-private: those write into the *peer's* address
//! space; filling a page of this process that Rust code holds a reference to would change memory
//! behind that reference. The public helpers (create, API handshake, register, write-protect) only
//! change how faults are delivered, which can block an access but never changes bytes.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;

/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_EVENT_FORK`.
pub const EVENT_FORK: u8 = 0x13;
/// `UFFD_EVENT_REMAP`.
pub const EVENT_REMAP: u8 = 0x14;
/// `UFFD_EVENT_REMOVE`.
pub const EVENT_REMOVE: u8 = 0x15;
/// `UFFD_EVENT_UNMAP`.
pub const EVENT_UNMAP: u8 = 0x16;

/// `UFFD_PAGEFAULT_FLAG_WRITE`: the fault was a write.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `UFFD_PAGEFAULT_FLAG_WP`: a write hit a write-protected page.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `UFFD_PAGEFAULT_FLAG_MINOR`.
pub const PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_EVENT_REMOVE`.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_MISSING_HUGETLBFS`.
pub const FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// `UFFD_FEATURE_EVENT_UNMAP`.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// `UFFD_FEATURE_THREAD_ID`.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED` (not in linux-libc-dev 6.1's header).
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC` (not in linux-libc-dev 6.1's header).
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// `UFFDIO_REGISTER_MODE_MISSING`.
pub const REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const REGISTER_MODE_WP: u64 = 1 << 1;

/// `UFFDIO_COPY_MODE_DONTWAKE`.
pub const COPY_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_COPY_MODE_WP`.
pub const COPY_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
pub const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

const UFFDIO: u64 = 0xAA;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default)]
struct Zeropage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
struct Writeprotect {
    range: Range,
    mode: u64,
}

const _: () = assert!(size_of::<Range>() == 16);
const _: () = assert!(size_of::<Api>() == 24);
const _: () = assert!(size_of::<Register>() == 32);
const _: () = assert!(size_of::<Copy>() == 40);
const _: () = assert!(size_of::<Zeropage>() == 32);
const _: () = assert!(size_of::<Writeprotect>() == 24);
const _: () = assert!(size_of::<RawMsg>() == 32);

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, size_of::<Api>());
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<Register>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<Range>());
const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<Copy>());
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<Zeropage>());
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<Writeprotect>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;

/// `struct uffd_msg` (packed in the kernel, but its natural layout is identical: the union starts
/// at offset 8 and every member is made of naturally aligned u64/u32 fields).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RawMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

/// A decoded `uffd_msg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A fault at `address` (page-aligned unless EXACT_ADDRESS was requested) with `flags`.
    Pagefault {
        /// `UFFD_PAGEFAULT_FLAG_*`.
        flags: u64,
        /// Faulting address.
        address: u64,
    },
    /// `[start, end)` was zapped (MADV_DONTNEED / MADV_REMOVE, e.g. balloon inflate).
    Remove {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// `len` bytes moved from `from` to `to` (mremap).
    Remap {
        /// Old address.
        from: u64,
        /// New address.
        to: u64,
        /// Length.
        len: u64,
    },
    /// The registered process forked. The new userfaultfd the kernel installed in our fd table
    /// has already been closed by `read_events`; `ufd` is its (now stale) number.
    Fork {
        /// The closed fd number.
        ufd: i32,
    },
    /// An event this code does not know.
    Unknown(u8),
}

impl RawMsg {
    fn decode(&self) -> Event {
        match self.event {
            EVENT_PAGEFAULT => Event::Pagefault {
                flags: self.arg[0],
                address: self.arg[1],
            },
            EVENT_REMOVE => Event::Remove {
                start: self.arg[0],
                end: self.arg[1],
            },
            EVENT_UNMAP => Event::Unmap {
                start: self.arg[0],
                end: self.arg[1],
            },
            EVENT_REMAP => Event::Remap {
                from: self.arg[0],
                to: self.arg[1],
                len: self.arg[2],
            },
            // `struct { __u32 ufd; } fork` at the start of the union: the low half on little
            // endian, the high half on big endian.
            EVENT_FORK => Event::Fork {
                ufd: i32::from_ne_bytes(
                    self.arg[0].to_ne_bytes()[..4]
                        .try_into()
                        .unwrap_or([0xff; 4]),
                ),
            },
            other => Event::Unknown(other),
        }
    }
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// Creates a userfaultfd (O_CLOEXEC | O_NONBLOCK, as Firecracker does): through `/dev/userfaultfd`
/// when it exists, the `userfaultfd(2)` syscall otherwise. `UFFDIO_API` is not called yet.
pub fn create() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    if let Ok(dev) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        // SAFETY: `dev` is an open /dev/userfaultfd; USERFAULTFD_IOC_NEW takes an int argument.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
        if fd >= 0 {
            // SAFETY: the ioctl returned a new fd that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    // SAFETY: userfaultfd(2) takes one int flags argument and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(errno());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `UFFDIO_API`: enables `features`; returns (available features, supported ioctls bitmask).
pub fn api(fd: BorrowedFd<'_>, features: u64) -> io::Result<(u64, u64)> {
    let mut a = Api {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: see the module's safety model; `a` is a live `struct uffdio_api`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &raw mut a) };
    if r < 0 {
        return Err(errno());
    }
    Ok((a.features, a.ioctls))
}

/// `UFFDIO_REGISTER` of `[start, start + len)` with `mode` (`REGISTER_MODE_*`); returns the bitmask
/// of ioctls usable on the range.
pub fn register(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<u64> {
    let mut r = Register {
        range: Range { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: see the module's safety model; `r` is a live `struct uffdio_register`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, &raw mut r) };
    if rc < 0 {
        return Err(errno());
    }
    Ok(r.ioctls)
}

/// `UFFDIO_WRITEPROTECT`: protect (`protect = true`) or unprotect-and-wake `[start, start + len)`.
pub fn write_protect(fd: BorrowedFd<'_>, start: u64, len: u64, protect: bool) -> io::Result<()> {
    let mut w = Writeprotect {
        range: Range { start, len },
        mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
    };
    // SAFETY: see the module's safety model; `w` is a live `struct uffdio_writeprotect`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &raw mut w) };
    if rc < 0 {
        return Err(errno());
    }
    Ok(())
}

/// `UFFDIO_WAKE` of `[start, start + len)`.
pub(crate) fn wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut r = Range { start, len };
    // SAFETY: see the module's safety model; `r` is a live `struct uffdio_range`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WAKE as _, &raw mut r) };
    if rc < 0 {
        return Err(errno());
    }
    Ok(())
}

/// `UFFDIO_COPY` of `len` bytes from `src` (in this process) to `dst` (in the registered process).
/// The kernel reads `src`; the caller guarantees it points at `len` readable bytes, or the kernel
/// fails with EFAULT. A partial copy is reported as an error (EAGAIN with bytes copied > 0 is
/// returned as EAGAIN: the caller retries the whole page, which then yields EEXIST or succeeds).
pub(crate) fn copy(
    fd: BorrowedFd<'_>,
    dst: u64,
    src: *const u8,
    len: u64,
    mode: u64,
) -> io::Result<()> {
    let mut c = Copy {
        dst,
        src: src as u64,
        len,
        mode,
        copy: 0,
    };
    // SAFETY: see the module's safety model; `c` is a live `struct uffdio_copy`. The kernel reads
    // `src` with copy_from_user, so an invalid `src` is an error, not undefined behaviour.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY as _, &raw mut c) };
    if rc < 0 {
        return Err(errno());
    }
    if u64::try_from(c.copy).ok() != Some(len) {
        return Err(io::Error::from_raw_os_error(libc::EAGAIN));
    }
    Ok(())
}

/// `UFFDIO_ZEROPAGE` of `[dst, dst + len)` (not usable on hugetlbfs).
pub(crate) fn zeropage(fd: BorrowedFd<'_>, dst: u64, len: u64) -> io::Result<()> {
    let mut z = Zeropage {
        range: Range { start: dst, len },
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: see the module's safety model; `z` is a live `struct uffdio_zeropage`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &raw mut z) };
    if rc < 0 {
        return Err(errno());
    }
    if u64::try_from(z.zeropage).ok() != Some(len) {
        return Err(io::Error::from_raw_os_error(libc::EAGAIN));
    }
    Ok(())
}

/// The most messages one `read` returns.
pub(crate) const MSG_BATCH: usize = 64;

/// Reads up to [`MSG_BATCH`] messages (non-blocking fd: `WouldBlock` when there are none).
/// `Ok(0)` means end of file.
pub(crate) fn read_events(fd: BorrowedFd<'_>, out: &mut Vec<Event>) -> io::Result<usize> {
    let mut buf = [RawMsg::default(); MSG_BATCH];
    // SAFETY: `buf` is a live, writable array of `MSG_BATCH` 32-byte `uffd_msg`s; read(2) writes
    // at most `size_of_val(&buf)` bytes into it.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            std::mem::size_of_val(&buf),
        )
    };
    let n = usize::try_from(n).map_err(|_| errno())?;
    let count = n / size_of::<RawMsg>();
    for m in &buf[..count] {
        let ev = m.decode();
        if let Event::Fork { ufd } = ev
            && ufd >= 0
        {
            // SAFETY: a fork event installs a new userfaultfd in our fd table that nothing else
            // owns; wrapping it closes it (the handler serves only the original process).
            drop(unsafe { OwnedFd::from_raw_fd(ufd) });
        }
        out.push(ev);
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // Values from <linux/userfaultfd.h> (linux-libc-dev 6.1, x86_64), printed by a C program.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    }

    #[test]
    fn decodes_messages() {
        let m = RawMsg {
            event: EVENT_PAGEFAULT,
            arg: [PAGEFAULT_FLAG_WRITE, 0x7000_1000, 42],
            ..RawMsg::default()
        };
        assert_eq!(
            m.decode(),
            Event::Pagefault {
                flags: 1,
                address: 0x7000_1000
            }
        );
        let m = RawMsg {
            event: EVENT_REMOVE,
            arg: [0x1000, 0x3000, 0],
            ..RawMsg::default()
        };
        assert_eq!(
            m.decode(),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        let m = RawMsg {
            event: EVENT_FORK,
            arg: [u64::from_ne_bytes([7, 0, 0, 0, 0, 0, 0, 0]), 0, 0],
            ..RawMsg::default()
        };
        assert_eq!(m.decode(), Event::Fork { ufd: 7 });
        let m = RawMsg {
            event: 0x99,
            ..RawMsg::default()
        };
        assert_eq!(m.decode(), Event::Unknown(0x99));
    }
}
