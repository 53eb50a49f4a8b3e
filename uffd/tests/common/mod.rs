//! Test fixtures: guest memory registered with a real userfaultfd in this process, a fake
//! Firecracker that sends the handshake exactly as Firecracker does, an in-memory page source
//! with controllable fetches, and a forked "Firecracker" child for the fail-closed tests.
#![allow(
    dead_code,
    reason = "each test file uses a different subset of the fixtures"
)]

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use thaw_uffd::ioctl;
use thaw_uffd::{
    FaultHandler, FetchDone, FetchError, HandlerConfig, HandshakeConfig, Lookup, PageSource,
};

pub const PAGE: u64 = 4096;
pub const HUGE: u64 = 2 * 1024 * 1024;

/// The byte at `offset` of the test memory file: differs between pages and within a page, and
/// is never zero (so a zero-filled page can't pass for data).
pub fn pattern(offset: u64) -> u8 {
    let v = (offset >> 12).wrapping_mul(7) ^ (offset & 0xfff).wrapping_mul(13);
    (v % 255) as u8 + 1
}

/// An anonymous mapping owned by the test.
pub struct Mem {
    base: *mut u8,
    map: *mut libc::c_void,
    map_len: usize,
    pub len: usize,
}

// SAFETY: the test shares the mapping's address between threads; all access is through raw
// pointer reads and writes whose targets stay mapped until `Mem` drops.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    /// `len` bytes of anonymous memory aligned to `align` (over-allocating to align), with extra
    /// mmap `flags` (e.g. MAP_HUGETLB). None if the mmap fails.
    pub fn new(len: usize, align: usize, flags: i32) -> Option<Self> {
        let hugetlb = flags & libc::MAP_HUGETLB != 0;
        let map_len = if hugetlb { len } else { len + align };
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return None;
        }
        let addr = map as usize;
        let base = (addr.next_multiple_of(align)) as *mut u8;
        Some(Self {
            base,
            map,
            map_len,
            len,
        })
    }

    pub fn addr(&self) -> u64 {
        self.base as u64
    }

    pub fn ptr(&self) -> *mut u8 {
        self.base
    }

    /// Copies `len` bytes at `offset` out of the mapping (faulting pages in).
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len);
        let mut out = vec![0u8; len];
        // SAFETY: `offset..offset + len` lies inside the live mapping; `out` has `len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.wrapping_add(offset), out.as_mut_ptr(), len)
        };
        out
    }

    /// Reads one byte (a read fault on a missing page).
    pub fn read_byte(&self, offset: usize) -> u8 {
        assert!(offset < self.len);
        // SAFETY: `offset` lies inside the live mapping.
        unsafe { self.base.wrapping_add(offset).read_volatile() }
    }

    /// Writes one byte (a write fault on a missing or write-protected page).
    pub fn write_byte(&self, offset: usize, v: u8) {
        assert!(offset < self.len);
        // SAFETY: `offset` lies inside the live, writable mapping.
        unsafe { self.base.wrapping_add(offset).write_volatile(v) };
    }

    pub fn madvise(&self, offset: usize, len: usize, advice: i32) -> std::io::Result<()> {
        // SAFETY: the range lies inside the live mapping; madvise does not touch Rust objects.
        let rc = unsafe { libc::madvise(self.base.wrapping_add(offset).cast(), len, advice) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// How [`TestSource::fetch`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchMode {
    /// Completes inside `fetch`, on the calling (fault) thread.
    Immediate,
    /// Completes on another thread after a delay.
    Delayed(Duration),
    /// Completes on another thread once [`TestSource::open_gate`] is called.
    Gated,
    /// The first `n` attempts on each page fail (from another thread); later ones succeed.
    Fail(u32),
    /// `lookup` of a missing page panics.
    PanicOnMissing,
}

/// An in-memory memory file with per-page presence.
pub struct TestSource {
    data: Mem,
    pub page_size: u64,
    present: Arc<[AtomicBool]>,
    zero: Vec<bool>,
    mode: FetchMode,
    fetches: Vec<AtomicU32>,
    pub lookups: AtomicU64,
    /// Answer present pages with an owned staging copy ([`Lookup::Owned`]) instead of a pointer.
    pub owned: AtomicBool,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl TestSource {
    /// `pages` pages of `page_size` holding [`pattern`]; `present` pages are Ready, `zero` pages
    /// are nil (Zero), the rest Missing.
    pub fn new(
        pages: usize,
        page_size: u64,
        present: impl Fn(usize) -> bool,
        zero: impl Fn(usize) -> bool,
        mode: FetchMode,
    ) -> Arc<Self> {
        let len = pages * page_size as usize;
        let data = Mem::new(len, PAGE as usize, 0).expect("mmap the source");
        for (i, b) in (0..len).zip(0..) {
            // SAFETY: `i < len`, inside the source mapping, which nothing else accesses yet.
            unsafe { data.ptr().wrapping_add(i).write(pattern(b)) };
        }
        Arc::new(Self {
            data,
            page_size,
            present: (0..pages).map(|i| AtomicBool::new(present(i))).collect(),
            zero: (0..pages).map(zero).collect(),
            mode,
            fetches: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            lookups: AtomicU64::new(0),
            owned: AtomicBool::new(false),
            gate: Arc::new((Mutex::new(false), Condvar::new())),
        })
    }

    pub fn fetch_count(&self, page: usize) -> u32 {
        self.fetches[page].load(Ordering::SeqCst)
    }

    pub fn total_fetches(&self) -> u32 {
        self.fetches.iter().map(|f| f.load(Ordering::SeqCst)).sum()
    }

    pub fn open_gate(&self) {
        let (m, c) = &*self.gate;
        *m.lock().unwrap() = true;
        c.notify_all();
    }

    /// Expected bytes of page `page`.
    pub fn expected(&self, page: usize) -> Vec<u8> {
        if self.zero[page] {
            return vec![0; self.page_size as usize];
        }
        let start = page as u64 * self.page_size;
        (start..start + self.page_size).map(pattern).collect()
    }
}

impl PageSource for TestSource {
    fn size(&self) -> u64 {
        self.data.len as u64
    }

    fn lookup(&self, offset: u64, len: u64) -> Lookup {
        assert_eq!(len, self.page_size);
        assert_eq!(offset % self.page_size, 0);
        self.lookups.fetch_add(1, Ordering::SeqCst);
        let i = (offset / self.page_size) as usize;
        if self.zero[i] {
            Lookup::Zero
        } else if self.present[i].load(Ordering::SeqCst) && self.owned.load(Ordering::SeqCst) {
            let mut buf = thaw_uffd::PageBuf::zeroed(len as usize);
            buf.as_mut_slice()
                .copy_from_slice(&self.data.read(offset as usize, len as usize));
            Lookup::Owned(buf)
        } else if self.present[i].load(Ordering::SeqCst) {
            // SAFETY: `offset < size`, inside the source mapping.
            Lookup::Ready(self.data.ptr().wrapping_add(offset as usize).cast_const())
        } else if self.mode == FetchMode::PanicOnMissing {
            panic!("test source: lookup of a missing page at {offset:#x}");
        } else {
            Lookup::Missing
        }
    }

    fn fetch(&self, offset: u64, len: u64, done: FetchDone) {
        assert_eq!(len, self.page_size);
        let i = (offset / self.page_size) as usize;
        let attempt = self.fetches[i].fetch_add(1, Ordering::SeqCst) + 1;
        match self.mode {
            FetchMode::Immediate | FetchMode::PanicOnMissing => {
                self.present[i].store(true, Ordering::SeqCst);
                done(Ok(()));
            }
            FetchMode::Delayed(d) => {
                let present = Arc::clone(&self.present);
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    present[i].store(true, Ordering::SeqCst);
                    done(Ok(()));
                });
            }
            FetchMode::Gated => {
                let present = Arc::clone(&self.present);
                let gate = Arc::clone(&self.gate);
                std::thread::spawn(move || {
                    let (m, c) = &*gate;
                    let _open = c.wait_while(m.lock().unwrap(), |open| !*open).unwrap();
                    present[i].store(true, Ordering::SeqCst);
                    done(Ok(()));
                });
            }
            FetchMode::Fail(n) => {
                if attempt <= n {
                    std::thread::spawn(move || {
                        done(Err(FetchError(format!(
                            "injected failure {attempt} of {n} at {offset:#x}"
                        ))))
                    });
                } else {
                    self.present[i].store(true, Ordering::SeqCst);
                    done(Ok(()));
                }
            }
        }
    }
}

/// Firecracker's region JSON for one region.
pub fn region_json(base: u64, size: u64, page_size: u64) -> String {
    format!(
        r#"[{{"base_host_virt_addr":{base},"size":{size},"offset":0,"page_size":{page_size},"page_size_kib":{page_size}}}]"#
    )
}

/// `sendmsg` of `data` with `fds` as SCM_RIGHTS, exactly as Firecracker sends its handshake.
/// Allocation-free, so a forked child may call it.
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    assert!(fds.len() <= 4);
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = (fds.len() * 4) as u32;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: pure size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes) } as usize;
        // SAFETY: the control buffer (64 bytes) holds CMSG_SPACE(16) = 32 bytes.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
        // SAFETY: `cmsg` points at the start of `control`, which is live and aligned.
        let hdr = unsafe { &mut *cmsg };
        hdr.cmsg_level = libc::SOL_SOCKET;
        hdr.cmsg_type = libc::SCM_RIGHTS;
        // SAFETY: pure size computation.
        hdr.cmsg_len = unsafe { libc::CMSG_LEN(bytes) } as usize;
        // SAFETY: CMSG_DATA of a header inside `control`.
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        // SAFETY: `bytes` bytes fit after the header inside `control`.
        unsafe { std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), data, bytes as usize) };
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock, &raw const msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A fake Firecracker on another thread: connect to `path` and send `json` + `fds`.
pub fn fake_firecracker(
    path: &Path,
    json: String,
    fds: Vec<RawFd>,
) -> std::thread::JoinHandle<UnixStream> {
    let path = path.to_owned();
    std::thread::spawn(move || {
        let s = UnixStream::connect(&path).expect("connect to the handler");
        send_with_fds(s.as_raw_fd(), json.as_bytes(), &fds).expect("sendmsg");
        s
    })
}

/// A unix socket path in a fresh temporary directory (kept alive by the returned guard).
pub fn socket_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("uffd.sock");
    (dir, p)
}

/// A userfaultfd in this process with `features` enabled, registering `mem` with `mode`.
pub fn uffd_for(mem: &Mem, features: u64, mode: u64) -> std::io::Result<OwnedFd> {
    let fd = ioctl::create()?;
    ioctl::api(fd.as_fd(), features)?;
    ioctl::register(fd.as_fd(), mem.addr(), mem.len as u64, mode)?;
    Ok(fd)
}

/// Options for [`start`].
pub struct Opts {
    pub page_size: u64,
    pub features: u64,
    pub mode: u64,
    pub mmap_flags: i32,
    pub config: HandlerConfig,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            page_size: PAGE,
            features: ioctl::FEATURE_EVENT_REMOVE,
            mode: ioctl::REGISTER_MODE_MISSING,
            mmap_flags: 0,
            config: HandlerConfig {
                // The peer is this process: never kill it (kill_peer refuses our own pid anyway).
                kill_peer_on_failure: false,
                ..HandlerConfig::default()
            },
        }
    }
}

/// A "VM" in this process: guest memory, the fake Firecracker's connection, a running handler.
pub struct Vm {
    pub handler: FaultHandler<TestSource>,
    pub source: Arc<TestSource>,
    pub client: UnixStream,
    pub uffd: OwnedFd,
    pub mem: Arc<Mem>,
    _dir: tempfile::TempDir,
}

/// Sets up guest memory for `source`, the uffd, the handshake (through a real socket) and the
/// handler. None when the memory can't be mapped (hugetlb without huge pages).
pub fn start(source: Arc<TestSource>, opts: Opts) -> Option<Vm> {
    let len = source.size() as usize;
    let mem = Arc::new(Mem::new(len, opts.page_size as usize, opts.mmap_flags)?);
    let uffd = uffd_for(&mem, opts.features, opts.mode).expect("userfaultfd setup");
    let (dir, path) = socket_path();
    let listener = UnixListener::bind(&path).expect("bind");
    let json = region_json(mem.addr(), len as u64, opts.page_size);
    let client = fake_firecracker(&path, json, vec![uffd.as_raw_fd()]);
    let mut cfg = HandshakeConfig::new(source.size());
    cfg.timeout = Duration::from_secs(10);
    cfg.kill_peer_on_error = false;
    let hs = thaw_uffd::handshake::accept(&listener, &cfg).expect("handshake");
    let client = client.join().expect("fake firecracker");
    let handler =
        FaultHandler::spawn(hs, Arc::clone(&source), opts.config).expect("spawn the handler");
    Some(Vm {
        handler,
        source,
        client,
        uffd,
        mem,
        _dir: dir,
    })
}

/// Number of open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// A forked child acting as Firecracker: registers `len` bytes at `mem` (inherited mapping) with
/// a new userfaultfd, connects to `path`, sends `json` + the uffd, then touches `touch_offset`
/// (a fault the handler must answer) and exits 0 if the touch returned. Returns the child's pid.
/// The child only makes raw syscalls (no allocation after fork).
pub fn fork_firecracker(
    mem: &Mem,
    reg_len: u64,
    path: &Path,
    json: &str,
    touch_offset: usize,
) -> i32 {
    // Everything the child needs is prepared before fork.
    let mut addr: libc::sockaddr_un = unsafe_zeroed_sockaddr();
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s.cast_signed();
    }
    let json = json.as_bytes().to_vec();
    let base = mem.addr();
    let touch = mem.ptr() as usize + touch_offset;
    // SAFETY: fork(2); the child below only makes async-signal-safe raw syscalls and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid > 0 {
        return pid;
    }
    // ---- child ----
    let code = child_main(&addr, &json, base, reg_len, touch);
    // SAFETY: _exit never returns and runs no destructors or atexit handlers.
    unsafe { libc::_exit(code) }
}

fn unsafe_zeroed_sockaddr() -> libc::sockaddr_un {
    // SAFETY: sockaddr_un is plain data; zero is valid.
    unsafe { std::mem::zeroed() }
}

fn child_main(addr: &libc::sockaddr_un, json: &[u8], base: u64, len: u64, touch: usize) -> i32 {
    // SAFETY: userfaultfd(2) with flags; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return 10;
    }
    let fd = fd as RawFd;
    // SAFETY: `fd` is the userfaultfd just created and owned by this child.
    let ufd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    if ioctl::api(ufd, ioctl::FEATURE_EVENT_REMOVE).is_err() {
        return 11;
    }
    if ioctl::register(ufd, base, len, ioctl::REGISTER_MODE_MISSING).is_err() {
        return 12;
    }
    // SAFETY: socket(2).
    let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return 13;
    }
    let alen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `alen` bytes.
    let rc = unsafe { libc::connect(sock, (addr as *const libc::sockaddr_un).cast(), alen) };
    if rc < 0 {
        return 14;
    }
    if send_with_fds(sock, json, &[fd]).is_err() {
        return 15;
    }
    // Firecracker never closes the socket; the fault below blocks until the handler answers.
    // SAFETY: `touch` lies inside the mapping inherited from the parent.
    let _ = unsafe { (touch as *const u8).read_volatile() };
    0
}

/// Waits for `pid`; returns the raw wait status.
pub fn wait_child(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waits for our own child.
    let rc = unsafe { libc::waitpid(pid, &raw mut status, 0) };
    assert_eq!(rc, pid, "waitpid");
    status
}

pub fn killed_by_sigkill(status: i32) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL
}
