//! The UFFD handler over the engine, against a real userfaultfd: layered chains (zstd and
//! uncompressed, 4 KiB and 2 MiB pages) served through a simulated store to a fake Firecracker —
//! a forked child (or threads of this process where the test must look inside the handler) that
//! registers anonymous memory, sends the region JSON and the userfaultfd over the socket with
//! SCM_RIGHTS, touches every page and compares every byte with the flattened memfile.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test images are a few MiB and the tests run on 64-bit Linux"
)]

use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use thaw_codec::diff::{DiffMetadata, child_header};
use thaw_codec::{CompressionType, FileKind, HUGEPAGE_SIZE, Header, PAGE_SIZE};
use thaw_server::chain::{ChainManifest, ChainSpec, generate};
use thaw_server::engine::{Engine, EngineConfig};
use thaw_server::store::sim::{FaultMode, SimConfig};
use thaw_server::store::{FileStore, SimStore, Store};
use thaw_server::uffd::{UffdOptions, UffdServer, serve_uffd};
use thaw_server::writer::{WriteOptions, store_build_file};
use thaw_uffd::{ErrorKind, Exit, HandlerConfig, PageState, ioctl};

// ---------------------------------------------------------------------------------------------
// Fixtures

/// Anonymous memory owned by the test (guest memory of the fake Firecracker).
struct Mem {
    map: *mut libc::c_void,
    map_len: usize,
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping stays valid until drop; the tests access it only through raw pointer reads
// and writes of bytes inside it.
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    fn new(len: usize, align: usize, shared: bool) -> Self {
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

    fn addr(&self) -> u64 {
        self.base as u64
    }

    /// The bytes `offset..offset + len` (faulting them in).
    fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.len);
        // SAFETY: inside the live mapping; the bytes are only read here, and the kernel fills
        // them before the read returns (a fault blocks until the handler installs the page).
        unsafe { std::slice::from_raw_parts(self.base.wrapping_add(offset), len) }
    }

    fn write_byte(&self, offset: usize, v: u8) {
        assert!(offset < self.len);
        // SAFETY: inside the live, writable mapping.
        unsafe { self.base.wrapping_add(offset).write_volatile(v) };
    }

    fn read_u64(&self, offset: usize) -> u64 {
        assert!(offset + 8 <= self.len);
        // SAFETY: inside the live mapping, 8-byte aligned by the callers.
        unsafe { self.base.wrapping_add(offset).cast::<u64>().read_volatile() }
    }

    fn write_u64(&self, offset: usize, v: u64) {
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

fn region_json(base: u64, size: u64, page_size: u64) -> String {
    format!(
        r#"[{{"base_host_virt_addr":{base},"size":{size},"offset":0,"page_size":{page_size},"page_size_kib":{page_size}}}]"#
    )
}

/// `sendmsg` of `data` with `fd` as SCM_RIGHTS, as Firecracker sends its handshake.
/// Allocation-free (a forked child calls it).
fn send_with_fd(sock: RawFd, data: &[u8], fd: RawFd) -> bool {
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
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
    // SAFETY: the 64-byte control buffer holds CMSG_SPACE(4).
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    // SAFETY: `cmsg` points at the start of `control`, live and aligned.
    let hdr = unsafe { &mut *cmsg };
    hdr.cmsg_level = libc::SOL_SOCKET;
    hdr.cmsg_type = libc::SCM_RIGHTS;
    // SAFETY: pure size computation.
    hdr.cmsg_len = unsafe { libc::CMSG_LEN(4) } as usize;
    // SAFETY: CMSG_DATA of the header inside `control`.
    let data = unsafe { libc::CMSG_DATA(cmsg) };
    // SAFETY: 4 bytes fit after the header inside `control`.
    unsafe { data.cast::<RawFd>().write_unaligned(fd) };
    // SAFETY: `msg` points at live buffers for the duration of the call.
    unsafe { libc::sendmsg(sock, &raw const msg, 0) >= 0 }
}

/// What the forked fake Firecracker does once its memory is registered.
struct ChildPlan<'a> {
    socket: &'a Path,
    mem: &'a Mem,
    page_size: u64,
    /// Pages to touch, in order.
    order: &'a [usize],
    /// The memfile: every touched page must equal it.
    expected: &'a [u8],
    /// Report word (MAP_SHARED): the first bad offset + 1, written before exiting 1.
    report: &'a Mem,
}

/// Forks a child that plays Firecracker: creates a userfaultfd, registers `mem` (MISSING),
/// connects to the socket (retrying while it does not exist yet), sends the region JSON and the
/// uffd, touches `order` (every 4th page by a write of its expected first byte, so write faults
/// are covered without changing the image) and compares each page with `expected`. Exit codes:
/// 0 all equal, 1 a mismatch (offset in the report), 10+ setup failures. Returns the pid.
fn fork_firecracker(plan: &ChildPlan<'_>) -> i32 {
    // Everything the child needs is prepared before fork: it only makes raw syscalls.
    // SAFETY: sockaddr_un is plain data; zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = plan.socket.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < addr.sun_path.len());
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s.cast_signed();
    }
    let json = region_json(plan.mem.addr(), plan.mem.len as u64, plan.page_size).into_bytes();
    // SAFETY: fork(2); the child only makes raw syscalls and byte comparisons, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid > 0 {
        return pid;
    }
    let code = child_main(plan, &addr, &json);
    // SAFETY: _exit runs no destructors or atexit handlers.
    unsafe { libc::_exit(code) }
}

fn child_main(plan: &ChildPlan<'_>, addr: &libc::sockaddr_un, json: &[u8]) -> i32 {
    // SAFETY: userfaultfd(2); returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return 10;
    }
    let fd = fd as RawFd;
    // SAFETY: `fd` is the userfaultfd just created, owned by this process until it exits.
    let ufd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    if ioctl::api(ufd, ioctl::FEATURE_EVENT_REMOVE).is_err() {
        return 11;
    }
    let len = plan.mem.len as u64;
    if ioctl::register(ufd, plan.mem.addr(), len, ioctl::REGISTER_MODE_MISSING).is_err() {
        return 12;
    }
    // SAFETY: socket(2).
    let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return 13;
    }
    let alen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let mut tries = 0;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un of `alen` bytes.
        let rc = unsafe { libc::connect(sock, std::ptr::from_ref(addr).cast(), alen) };
        if rc == 0 {
            break;
        }
        tries += 1;
        if tries > 2000 {
            return 14;
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 10_000_000,
        };
        // SAFETY: nanosleep with a valid timespec.
        unsafe { libc::nanosleep(&raw const ts, std::ptr::null_mut()) };
    }
    if !send_with_fd(sock, json, fd) {
        return 15;
    }
    let ps = plan.page_size as usize;
    for &page in plan.order {
        let off = page * ps;
        let want = &plan.expected[off..off + ps];
        if page % 4 == 1 {
            plan.mem.write_byte(off, want[0]);
        }
        if plan.mem.slice(off, ps) != want {
            let bad = plan
                .mem
                .slice(off, ps)
                .iter()
                .zip(want)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            plan.report.write_u64(0, (off + bad) as u64 + 1);
            return 1;
        }
    }
    // Firecracker never closes the socket while alive: exiting is the hang-up.
    0
}

fn wait_child(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waits for our own child.
    let rc = unsafe { libc::waitpid(pid, &raw mut status, 0) };
    assert_eq!(rc, pid, "waitpid");
    status
}

fn exited_ok(status: i32) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

fn killed_by_sigkill(status: i32) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL
}

fn spec(codec: CompressionType, memfile_block: u64, seed: u64) -> ChainSpec {
    ChainSpec {
        layers: 2,
        size: 6 * 1024 * 1024 + 3 * 4096,
        memfile_block_size: memfile_block,
        files: vec![FileKind::Memfile],
        seed,
        dirty_fraction: 0.2,
        zero_fraction: 0.1,
        write: WriteOptions {
            codec,
            level: 1,
            frame_size: 2 * 1024 * 1024,
            header_version: 4,
            workers: 2,
            progress: false,
        },
    }
}

fn chain(dir: &Path, spec: &ChainSpec) -> (Arc<FileStore>, ChainManifest) {
    let store = Arc::new(FileStore::new(dir.join("store")));
    let manifest = generate(store.as_ref(), &dir.join("expected"), spec).unwrap();
    (store, manifest)
}

fn sim_over(store: Arc<FileStore>, ttfb_ms: u64) -> Arc<SimStore> {
    Arc::new(SimStore::new(
        store,
        SimConfig {
            ttfb: Duration::from_millis(ttfb_ms),
            bandwidth: Some(500_000_000),
            ..SimConfig::default()
        },
    ))
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        fetch_deadline: Duration::from_secs(20),
        ..EngineConfig::default()
    }
}

fn socket_path(dir: &Path) -> PathBuf {
    dir.join("uffd.sock")
}

/// Serves a forked child that touches every page of `expected` (shuffled); asserts every byte
/// and a quiet end. Returns the server's report.
fn serve_forked(
    engine: &Engine,
    build: thaw_codec::BuildId,
    expected: &[u8],
    page_size: u64,
    dir: &Path,
    seed: u64,
) -> thaw_server::uffd::UffdReport {
    let mem = Mem::new(expected.len(), page_size as usize, false);
    let report = Mem::new(4096, 4096, true);
    let mut order: Vec<usize> = (0..expected.len() / page_size as usize).collect();
    order.shuffle(&mut SmallRng::seed_from_u64(seed));
    let socket = socket_path(dir);
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    let pid = fork_firecracker(&ChildPlan {
        socket: &socket,
        mem: &mem,
        page_size,
        order: &order,
        expected,
        report: &report,
    });
    let options = UffdOptions {
        handshake_timeout: Duration::from_secs(20),
        ..UffdOptions::default()
    };
    let server = serve_uffd(engine, build, &listener, &options).unwrap();
    assert_eq!(server.peer().pid, pid);
    let status = wait_child(pid);
    let r = server.join();
    assert!(
        exited_ok(status),
        "child status {status:#x}, first bad byte at {:?}; {}",
        report.read_u64(0).checked_sub(1),
        r.summary()
    );
    assert_eq!(
        r.result.as_ref().ok(),
        Some(&Exit::PeerGone),
        "{}",
        r.summary()
    );
    let pages = order.len() as u64;
    let m = &r.metrics;
    assert_eq!(m.faults_missing, pages, "{}", r.summary());
    assert_eq!(m.copies + m.zero_installs, pages, "{}", r.summary());
    assert_eq!(m.fetch_failures, 0);
    r
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn every_page_matches_the_flat_memfile_for_each_codec_and_page_size() {
    for (codec, page, seed) in [
        (CompressionType::Zstd, PAGE_SIZE, 1),
        (CompressionType::None, PAGE_SIZE, 2),
        (CompressionType::Zstd, HUGEPAGE_SIZE, 3),
        (CompressionType::None, HUGEPAGE_SIZE, 4),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (store, manifest) = chain(dir.path(), &spec(codec, page, seed));
        for layer in [&manifest.layers[0], manifest.top().unwrap()] {
            let expected = fs::read(&layer.files["memfile"].flat).unwrap();
            let engine = Engine::new(sim_over(Arc::clone(&store), 3), engine_config()).unwrap();
            let r = serve_forked(&engine, layer.build_id, &expected, page, dir.path(), seed);
            assert!(
                r.engine.store_requests > 0,
                "{codec:?}/{page}: {}",
                r.summary()
            );
            if page == PAGE_SIZE {
                // (The 2 MiB chains have 3 or 4 pages: too few for a nil run.)
                assert!(r.metrics.zero_installs > 0, "nil pages: {}", r.summary());
            }
            assert!(r.metrics.fetches > 0, "{}", r.summary());
            assert!(r.summary().contains("fetches"), "{}", r.summary());
        }
    }
}

/// A 2 MiB-page memfile whose diff layer was written at 4 KiB granularity (e2b's dedup): most
/// 2 MiB pages are made of many mappings over two builds and nil runs.
#[test]
#[allow(
    clippy::single_range_in_vec_init,
    reason = "one-range block sets are meant"
)]
fn two_mib_pages_over_many_mappings_are_assembled() {
    for codec in [CompressionType::Zstd, CompressionType::None] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FileStore::new(dir.path().join("store")));
        let opts = WriteOptions {
            codec,
            level: 1,
            frame_size: 2 * 1024 * 1024,
            header_version: 4,
            workers: 2,
            progress: false,
        };
        let size = 4 * HUGEPAGE_SIZE;
        let base = uuid::Uuid::new_v4();
        let header = Header::new_base(base, size, HUGEPAGE_SIZE, 4).unwrap();
        let mut model: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
        store_build_file(
            store.as_ref(),
            FileKind::Memfile,
            &header,
            &mut model.as_slice(),
            size,
            &opts,
        )
        .unwrap();
        let stored_base = thaw_server::layout::load_header(store.as_ref(), base, FileKind::Memfile)
            .unwrap()
            .unwrap()
            .header;
        // In 4 KiB blocks: page 0 gets 3 dirty runs and a nil run, page 1 alternating blocks,
        // page 2 untouched (one mapping), page 3 all nil.
        let dirty: Vec<std::ops::Range<u64>> = [1..3, 100..101, 300..512]
            .into_iter()
            .chain((512..1024).step_by(2).map(|b| b..b + 1))
            .collect();
        let empty = vec![5..9, 1536..2048];
        let child = uuid::Uuid::new_v4();
        let diff = DiffMetadata {
            block_size: PAGE_SIZE,
            dirty: dirty.clone(),
            empty: empty.clone(),
        };
        let child_hdr = child_header(&stored_base, child, &diff).unwrap();
        let mut packed = Vec::new();
        for r in &dirty {
            for b in r.clone() {
                let at = (b * PAGE_SIZE) as usize;
                let page: Vec<u8> = (0..PAGE_SIZE)
                    .map(|i| ((b * 31 + i) % 253) as u8 + 2)
                    .collect();
                model[at..at + PAGE_SIZE as usize].copy_from_slice(&page);
                packed.extend_from_slice(&page);
            }
        }
        for r in &empty {
            model[(r.start * PAGE_SIZE) as usize..(r.end * PAGE_SIZE) as usize].fill(0);
        }
        store_build_file(
            store.as_ref(),
            FileKind::Memfile,
            &child_hdr,
            &mut packed.as_slice(),
            packed.len() as u64,
            &opts,
        )
        .unwrap();
        assert!(
            child_hdr.mappings.len() > 256,
            "{}",
            child_hdr.mappings.len()
        );
        let engine = Engine::new(sim_over(Arc::clone(&store), 2), engine_config()).unwrap();
        let r = serve_forked(&engine, child, &model, HUGEPAGE_SIZE, dir.path(), 9);
        // Pages 0 and 1 span many mappings (assembled), page 2 is one mapping (zero copy), page
        // 3 is nil (zeros, no fetch).
        assert_eq!(r.staged_pages, 2, "{codec:?}: {}", r.summary());
        assert_eq!(r.metrics.copies, 3, "{}", r.summary());
        assert_eq!(r.metrics.zero_installs, 1, "{}", r.summary());
    }
}

/// A fake Firecracker made of threads of this process (so the test can look inside the handler):
/// the memory is registered on a userfaultfd here, and a thread sends the handshake.
struct InProcessVm {
    server: UffdServer,
    mem: Arc<Mem>,
    _uffd: OwnedFd,
    _client: UnixStream,
}

fn in_process_vm(
    engine: &Engine,
    build: thaw_codec::BuildId,
    size: usize,
    page_size: u64,
    dir: &Path,
    prefetch: bool,
) -> InProcessVm {
    let mem = Arc::new(Mem::new(size, page_size as usize, false));
    let uffd = ioctl::create().unwrap();
    ioctl::api(uffd.as_fd(), ioctl::FEATURE_EVENT_REMOVE).unwrap();
    ioctl::register(
        uffd.as_fd(),
        mem.addr(),
        size as u64,
        ioctl::REGISTER_MODE_MISSING,
    )
    .unwrap();
    let socket = socket_path(dir);
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    let json = region_json(mem.addr(), size as u64, page_size);
    let raw = uffd.as_raw_fd();
    let client = std::thread::spawn(move || {
        let s = UnixStream::connect(&socket).unwrap();
        assert!(send_with_fd(s.as_raw_fd(), json.as_bytes(), raw));
        s
    });
    let options = UffdOptions {
        handshake_timeout: Duration::from_secs(20),
        kill_peer_on_handshake_error: false,
        handler: HandlerConfig {
            // The peer is this process.
            kill_peer_on_failure: false,
            ..HandlerConfig::default()
        },
        prefetch,
        prefetch_concurrency: 4,
        ..UffdOptions::default()
    };
    let server = serve_uffd(engine, build, &listener, &options).unwrap();
    InProcessVm {
        server,
        mem,
        _uffd: uffd,
        _client: client.join().unwrap(),
    }
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn concurrent_faults_on_one_cold_frame_make_one_store_request() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 21));
    let base = &manifest.layers[0];
    let expected = Arc::new(fs::read(&base.files["memfile"].flat).unwrap());
    let sim = sim_over(Arc::clone(&store), 30);
    let engine = Engine::new(sim.clone(), engine_config()).unwrap();
    let vm = in_process_vm(
        &engine,
        base.build_id,
        expected.len(),
        PAGE_SIZE,
        dir.path(),
        false,
    );
    // Opening read the header and described the data: count data reads from here.
    sim.reset_stats();
    let threads = 24;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (mem, expected, barrier) = (
                Arc::clone(&vm.mem),
                Arc::clone(&expected),
                Arc::clone(&barrier),
            );
            std::thread::spawn(move || {
                // All inside frame 1 (2..4 MiB); threads 16.. share pages with 0..8.
                let page = 512 + (i % 16) * 29;
                let off = page * 4096;
                barrier.wait();
                assert!(
                    mem.slice(off, 4096) == &expected[off..off + 4096],
                    "page {page}"
                );
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(sim.stats().reads, 1, "{:?}", sim.stats());
    assert_eq!(engine.stats().sessions, 1, "{:?}", engine.stats());
    let m = vm.server.handler().metrics();
    assert!(m.fetches <= 16, "one handler fetch per page at most: {m:?}");
    vm.server.stop();
    let r = vm.server.join();
    assert_eq!(r.result.unwrap(), Exit::Stopped);
}

#[test]
fn a_store_failing_past_the_budget_kills_the_peer_and_names_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 31));
    let top = manifest.top().unwrap();
    let expected = fs::read(&top.files["memfile"].flat).unwrap();
    let sim = sim_over(Arc::clone(&store), 1);
    let engine = Engine::new(
        sim.clone(),
        EngineConfig {
            retries: 1,
            retry_base: Duration::from_millis(1),
            ..engine_config()
        },
    )
    .unwrap();
    // The first data page of the top layer.
    let hdr = thaw_server::layout::load_header(store.as_ref(), top.build_id, FileKind::Memfile)
        .unwrap()
        .unwrap()
        .header;
    let target = hdr.mappings.iter().find(|m| !m.is_nil()).unwrap().offset;
    let page = (target / PAGE_SIZE) as usize;
    let mem = Mem::new(expected.len(), 4096, false);
    let report = Mem::new(4096, 4096, true);
    let socket = socket_path(dir.path());
    let listener = UnixListener::bind(&socket).unwrap();
    let order = [page, page + 1];
    let pid = fork_firecracker(&ChildPlan {
        socket: &socket,
        mem: &mem,
        page_size: PAGE_SIZE,
        order: &order,
        expected: &expected,
        report: &report,
    });
    let options = UffdOptions {
        handshake_timeout: Duration::from_secs(20),
        handler: HandlerConfig {
            fetch_attempts: 2,
            fetch_backoff: Duration::from_millis(1),
            ..HandlerConfig::default()
        },
        ..UffdOptions::default()
    };
    let server = serve_uffd(&engine, top.build_id, &listener, &options).unwrap();
    sim.set_fault_mode(FaultMode::FailAll);
    let r = server.join();
    let status = wait_child(pid);
    assert!(killed_by_sigkill(status), "status {status:#x}");
    let err = r.result.as_ref().expect_err("must fail closed");
    assert_eq!(err.kind(), ErrorKind::Source, "{err}");
    assert!(err.peer_killed());
    let text = err.to_string();
    assert!(text.contains(&format!("file offset {target:#x}")), "{text}");
    assert!(text.contains("after 2 attempt(s)"), "{text}");
    assert!(text.contains("frame"), "the cause names the frame: {text}");
    // Nothing was installed: no unknown data reached the guest.
    assert_eq!(r.metrics.copies, 0, "{}", r.summary());
    assert_eq!(r.metrics.zero_installs, 0, "{}", r.summary());
    assert_eq!(report.read_u64(0), 0);
}

fn write_plan(store: &FileStore, build: thaw_codec::BuildId, indices: &[u64], block: u64) {
    let doc = serde_json::json!({
        "version": 2,
        "prefetch": {"memory": {
            "indices": indices,
            "access_types": indices.iter().map(|_| "read").collect::<Vec<_>>(),
            "block_size": block,
        }},
    });
    let key = format!("{build}/metadata.json");
    let mut w = store
        .create(&key, &thaw_server::store::PutOptions::default())
        .unwrap();
    std::io::Write::write_all(&mut w, doc.to_string().as_bytes()).unwrap();
    w.commit().unwrap();
}

#[test]
fn prefetch_prefaults_the_recorded_plan_and_demand_faults_still_work() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 41));
    let top = manifest.top().unwrap();
    let expected = Arc::new(fs::read(&top.files["memfile"].flat).unwrap());
    let pages = expected.len() / 4096;
    // Every third page, last first (a recorded order that is not file order), plus one past
    // the end (ignored) and a duplicate.
    let mut plan: Vec<u64> = (0..pages as u64).filter(|p| p % 3 == 0).rev().collect();
    plan.push(pages as u64 + 10);
    plan.push(0);
    write_plan(&store, top.build_id, &plan, PAGE_SIZE);
    let planned = (0..pages).filter(|p| p % 3 == 0).count() as u64;
    let engine = Engine::new(sim_over(Arc::clone(&store), 3), engine_config()).unwrap();
    let vm = in_process_vm(
        &engine,
        top.build_id,
        expected.len(),
        PAGE_SIZE,
        dir.path(),
        true,
    );
    wait_for("the prefetch", || vm.server.prefetch_done());
    let p = vm.server.prefetch_progress().unwrap();
    assert_eq!(p.total, planned, "{p:?}");
    assert_eq!(
        (p.warmed, p.prefaulted, p.failed),
        (planned, planned, 0),
        "{p:?}"
    );
    for page in (0..pages).filter(|p| p % 3 == 0) {
        let state = vm.server.handler().page_state(page as u64 * 4096);
        assert!(
            matches!(state, Some(PageState::Clean | PageState::Zero)),
            "page {page}: {state:?}"
        );
    }
    assert_eq!(vm.server.handler().metrics().faults_missing, 0);
    // Now the guest runs: every byte, from four threads.
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let (mem, expected) = (Arc::clone(&vm.mem), Arc::clone(&expected));
            std::thread::spawn(move || {
                for page in (t..pages).step_by(4) {
                    let off = page * 4096;
                    assert!(
                        mem.slice(off, 4096) == &expected[off..off + 4096],
                        "page {page}"
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let m = vm.server.handler().metrics();
    // Prefaulted pages never faulted.
    assert_eq!(m.faults_missing, pages as u64 - planned, "{m:?}");
    assert_eq!(m.prefaults, planned);
    vm.server.stop();
    let r = vm.server.join();
    assert!(
        r.summary()
            .contains(&format!("prefetch {planned}/{planned} pages warmed")),
        "{}",
        r.summary()
    );
}

#[test]
fn prefetch_racing_demand_faults_installs_each_page_once() {
    for page_size in [PAGE_SIZE, HUGEPAGE_SIZE] {
        let dir = tempfile::tempdir().unwrap();
        let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, page_size, 51));
        let top = manifest.top().unwrap();
        let expected = Arc::new(fs::read(&top.files["memfile"].flat).unwrap());
        let ps = page_size as usize;
        let pages = expected.len() / ps;
        // The whole file, in 4 KiB plan blocks (converted to the guest's pages).
        let plan: Vec<u64> = (0..(expected.len() / 4096) as u64).collect();
        write_plan(&store, top.build_id, &plan, 4096);
        let engine = Engine::new(sim_over(Arc::clone(&store), 3), engine_config()).unwrap();
        let vm = in_process_vm(
            &engine,
            top.build_id,
            expected.len(),
            page_size,
            dir.path(),
            true,
        );
        let handles: Vec<_> = (0..3)
            .map(|t| {
                let (mem, expected) = (Arc::clone(&vm.mem), Arc::clone(&expected));
                std::thread::spawn(move || {
                    let order: Vec<usize> = if t % 2 == 0 {
                        (0..pages).rev().collect()
                    } else {
                        (0..pages).collect()
                    };
                    for page in order {
                        let off = page * ps;
                        assert!(
                            mem.slice(off, ps) == &expected[off..off + ps],
                            "page {page}"
                        );
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        wait_for("the prefetch", || vm.server.prefetch_done());
        let installs = || {
            let m = vm.server.handler().metrics();
            m.copies + m.zero_installs + m.prefaults
        };
        wait_for("the installs", || installs() == pages as u64);
        let m = vm.server.handler().metrics();
        assert_eq!(installs(), pages as u64, "each page written once: {m:?}");
        let p = vm.server.prefetch_progress().unwrap();
        assert_eq!(p.total, pages as u64);
        assert_eq!(p.prefaulted + p.skipped + p.failed, p.warmed, "{p:?}");
        assert_eq!(p.failed, 0, "{p:?}");
        vm.server.stop();
        assert_eq!(vm.server.join().result.unwrap(), Exit::Stopped);
    }
}

fn thaw_uffd_cmd(
    store_dir: &Path,
    build: thaw_codec::BuildId,
    socket: &Path,
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args([
            "uffd",
            "--store",
            &format!("sim:ttfb=2ms,inner=file://{}", store_dir.display()),
            "--build",
            &build.to_string(),
            "--socket",
            socket.to_str().unwrap(),
            "--handshake-timeout",
            "20s",
            "--page-attempts",
            "2",
            "--fetch-retries",
            "1",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn the_thaw_uffd_command_serves_a_forked_firecracker_and_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 61));
    let store_dir = dir.path().join("store");
    let top = manifest.top().unwrap();
    let expected = fs::read(&top.files["memfile"].flat).unwrap();
    let socket = socket_path(dir.path());

    // Served: the child touches every page; the command exits 0 when the child exits.
    let cmd = thaw_uffd_cmd(&store_dir, top.build_id, &socket);
    let mem = Mem::new(expected.len(), 4096, false);
    let report = Mem::new(4096, 4096, true);
    let order: Vec<usize> = (0..expected.len() / 4096).collect();
    let pid = fork_firecracker(&ChildPlan {
        socket: &socket,
        mem: &mem,
        page_size: PAGE_SIZE,
        order: &order,
        expected: &expected,
        report: &report,
    });
    let status = wait_child(pid);
    let out = cmd.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(exited_ok(status), "child {status:#x}: {stderr}");
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("uffd: peer pid {pid}")),
        "{stderr}"
    );
    assert!(stderr.contains("peer gone"), "{stderr}");
    assert!(!socket.exists(), "the socket file is removed at exit");

    // Fail closed: the top layer's data object is gone, the header still names it.
    let build_dir = store_dir.join(top.build_id.to_string());
    for e in fs::read_dir(&build_dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name.starts_with("memfile") && !name.ends_with(".header") {
            fs::remove_file(build_dir.join(name)).unwrap();
        }
    }
    let hdr = thaw_server::layout::load_header(
        &FileStore::new(store_dir.clone()),
        top.build_id,
        FileKind::Memfile,
    )
    .unwrap()
    .unwrap()
    .header;
    let target = hdr
        .mappings
        .iter()
        .find(|m| m.build_id == top.build_id)
        .unwrap()
        .offset;
    let cmd = thaw_uffd_cmd(&store_dir, top.build_id, &socket);
    let mem = Mem::new(expected.len(), 4096, false);
    let order = [(target / PAGE_SIZE) as usize];
    let pid = fork_firecracker(&ChildPlan {
        socket: &socket,
        mem: &mem,
        page_size: PAGE_SIZE,
        order: &order,
        expected: &expected,
        report: &report,
    });
    let status = wait_child(pid);
    let out = cmd.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(killed_by_sigkill(status), "child {status:#x}: {stderr}");
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("file offset {target:#x}")),
        "{stderr}"
    );
    assert!(stderr.contains("was killed"), "{stderr}");
    assert!(stderr.contains(&top.build_id.to_string()), "{stderr}");
}
