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

#[path = "common/gcs.rs"]
mod gcs_common;
#[path = "common/guest.rs"]
mod guest;

use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use thaw_codec::diff::{DiffMetadata, child_header};
use thaw_codec::{CompressionType, FileKind, HUGEPAGE_SIZE, Header, PAGE_SIZE};
use thaw_server::chain::{ChainManifest, ChainSpec, generate};
use thaw_server::engine::{Engine, EngineConfig};
use thaw_server::store::sim::{FaultMode, SimConfig};
use thaw_server::store::{FileStore, SimStore, Store};
use thaw_server::uffd::{DirtyPages, UffdOptions, UffdServer, serve_file, serve_uffd};
use thaw_server::writer::{WriteOptions, store_build_file};
use thaw_uffd::{ErrorKind, Exit, HandlerConfig, PageState, ioctl};

use guest::{Mem, region_json, send_with_fd, send_with_fds};

// ---------------------------------------------------------------------------------------------
// Fixtures

/// What the forked fake Firecracker does once its memory is registered.
struct ChildPlan<'a> {
    socket: &'a Path,
    mem: &'a Mem,
    page_size: u64,
    /// Pages to touch, in order.
    order: &'a [usize],
    /// The memfile: every touched page must equal it.
    expected: &'a [u8],
    /// Report word (MAP_SHARED): the first bad offset + 1, written before exiting 1 or 2.
    report: &'a Mem,
    /// Variations: hugetlb memory, write-protect registration, a dropped range.
    extra: Extra,
}

/// What a [`ChildPlan`] does beyond the plain MISSING registration of anonymous memory.
#[derive(Debug, Clone, Copy, Default)]
struct Extra {
    /// Replace the memory with `MAP_HUGETLB` 2 MiB pages (`MAP_FIXED` at the same address, in
    /// the child, so the child owns the hugetlb reservation) and register it with
    /// `UFFD_FEATURE_MISSING_HUGETLBFS`.
    hugetlb: bool,
    /// Register MISSING+WP; after the pass, write every page with `page % 4 == 3` (it was read
    /// first, so the write is a write-protect fault), again with its expected first byte.
    wp: bool,
    /// After touching (and re-checking) everything, `MADV_DONTNEED` pages `start..end` and check
    /// they read back as zeros (exit 2 with the offset otherwise). Empty: nothing dropped.
    drop: (usize, usize),
}

impl Extra {
    fn dropped(&self) -> usize {
        self.drop.1.saturating_sub(self.drop.0)
    }
}

/// Forks a child that plays Firecracker: creates a userfaultfd, registers `mem` (MISSING),
/// connects to the socket (retrying while it does not exist yet), sends the region JSON and the
/// uffd, touches `order` (every 4th page by a write of its expected first byte, so write faults
/// are covered without changing the image) and compares each page with `expected`. Exit codes:
/// 0 all equal, 1 a mismatch (offset in the report), 2 a dropped page not zero (offset in the
/// report), 10+ setup failures (16: no hugetlb pages, 17: madvise failed). Returns the pid.
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
    let extra = plan.extra;
    if extra.hugetlb {
        // SAFETY: replaces this process's copy of the test mapping (same range) with hugetlb
        // memory; nothing else in the child uses that range.
        let map = unsafe {
            libc::mmap(
                plan.mem.base.cast(),
                plan.mem.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_FIXED
                    | libc::MAP_HUGETLB
                    | (21 << libc::MAP_HUGE_SHIFT),
                -1,
                0,
            )
        };
        if map != plan.mem.base.cast() {
            return 16;
        }
    }
    // SAFETY: userfaultfd(2); returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return 10;
    }
    let fd = fd as RawFd;
    // SAFETY: `fd` is the userfaultfd just created, owned by this process until it exits.
    let ufd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut features = ioctl::FEATURE_EVENT_REMOVE;
    let mut mode = ioctl::REGISTER_MODE_MISSING;
    if extra.hugetlb {
        features |= ioctl::FEATURE_MISSING_HUGETLBFS;
    }
    if extra.wp {
        features |= ioctl::FEATURE_PAGEFAULT_FLAG_WP;
        mode |= ioctl::REGISTER_MODE_WP;
    }
    if ioctl::api(ufd, features).is_err() {
        return 11;
    }
    let len = plan.mem.len as u64;
    if ioctl::register(ufd, plan.mem.addr(), len, mode).is_err() {
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
    let check = |page: usize| -> bool {
        let off = page * ps;
        let want = &plan.expected[off..off + ps];
        if plan.mem.slice(off, ps) == want {
            return true;
        }
        let bad = plan
            .mem
            .slice(off, ps)
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        plan.report.write_u64(0, (off + bad) as u64 + 1);
        false
    };
    for &page in plan.order {
        let off = page * ps;
        if page % 4 == 1 {
            plan.mem.write_byte(off, plan.expected[off]);
        }
        if !check(page) {
            return 1;
        }
    }
    if extra.wp {
        for &page in plan.order {
            if page % 4 == 3 {
                let off = page * ps;
                plan.mem.write_byte(off, plan.expected[off]);
            }
        }
    }
    if extra.wp || extra.dropped() > 0 {
        // Everything again: the writes kept the image, nothing was lost.
        for &page in plan.order {
            if !check(page) {
                return 1;
            }
        }
    }
    if extra.dropped() > 0 {
        let (start, end) = extra.drop;
        // SAFETY: a range inside this process's registered mapping.
        let rc = unsafe {
            libc::madvise(
                plan.mem.base.wrapping_add(start * ps).cast(),
                (end - start) * ps,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return 17;
        }
        for page in start..end {
            let off = page * ps;
            if let Some(bad) = plan.mem.slice(off, ps).iter().position(|&b| b != 0) {
                plan.report.write_u64(0, (off + bad) as u64 + 1);
                return 2;
            }
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
    serve_forked_with(
        engine,
        build,
        expected,
        page_size,
        dir,
        seed,
        Extra::default(),
    )
    .report
}

/// What [`serve_forked_with`] saw in the handler once the child was gone.
struct Served {
    report: thaw_server::uffd::UffdReport,
    /// `dirty_pages()` (file offsets).
    dirty: Vec<u64>,
    /// `zero_or_removed_pages()` (file offsets).
    zero_or_removed: Vec<u64>,
    /// `write_protect_tracking()`.
    wp: Option<bool>,
}

/// [`serve_forked`] with the child's [`Extra`] steps; the install counts include the dropped
/// pages' second (zero) installs.
fn serve_forked_with(
    engine: &Engine,
    build: thaw_codec::BuildId,
    expected: &[u8],
    page_size: u64,
    dir: &Path,
    seed: u64,
    extra: Extra,
) -> Served {
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
        extra,
    });
    let options = UffdOptions {
        handshake_timeout: Duration::from_secs(20),
        ..UffdOptions::default()
    };
    let server = serve_uffd(engine, build, &listener, &options).unwrap();
    assert_eq!(server.peer().pid, pid);
    let status = wait_child(pid);
    // The child is gone: every fault it raised was answered, and page states are set before
    // the ioctl that woke it.
    let handler = server.handler();
    let (dirty, zero_or_removed, wp) = (
        handler.dirty_pages(),
        handler.zero_or_removed_pages(),
        handler.write_protect_tracking(),
    );
    let r = server.join();
    assert!(
        exited_ok(status),
        "child status {status:#x} (exit 1: mismatch, 2: dropped page not zero, 16: no hugetlb \
         page), first bad byte at {:?}; {}",
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
    let dropped = extra.dropped() as u64;
    let m = &r.metrics;
    assert_eq!(m.faults_missing, pages + dropped, "{}", r.summary());
    assert_eq!(
        m.copies + m.zero_installs,
        pages + dropped,
        "{}",
        r.summary()
    );
    assert_eq!(m.fetch_failures, 0);
    Served {
        report: r,
        dirty,
        zero_or_removed,
        wp,
    }
}

/// Raises `vm.nr_hugepages` (root) so `n` free 2 MiB hugetlb pages exist, and puts the old value
/// back when dropped. Panics, saying why, when the kernel cannot provide them: the test is about
/// hugetlb memory and must not quietly fall back to something else. One holder at a time (the
/// tests that use hugetlb pages run one after another: two would count the same free pages).
struct HugePages {
    restore: Option<u64>,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

static HUGE_PAGES_HELD: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn meminfo(key: &str) -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

impl HugePages {
    fn reserve(n: u64) -> Self {
        let held = HUGE_PAGES_HELD
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if meminfo("HugePages_Free:") >= n {
            return Self {
                restore: None,
                _one_at_a_time: held,
            };
        }
        let total = meminfo("HugePages_Total:");
        let wrote = fs::write("/proc/sys/vm/nr_hugepages", (total + n).to_string());
        let this = Self {
            restore: wrote.is_ok().then_some(total),
            _one_at_a_time: held,
        };
        let free = meminfo("HugePages_Free:");
        assert!(
            free >= n,
            "this test needs {n} free 2 MiB hugetlb pages: writing {} to /proc/sys/vm/nr_hugepages \
             gave {free} free ({wrote:?}); run as root on a kernel with hugetlb and enough free \
             memory",
            total + n
        );
        this
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(total) = self.restore {
            let _ = fs::write("/proc/sys/vm/nr_hugepages", total.to_string());
        }
    }
}

/// File offsets of the pages `f` selects, in order.
fn offsets(pages: usize, page_size: u64, f: impl Fn(usize) -> bool) -> Vec<u64> {
    (0..pages)
        .filter(|&p| f(p))
        .map(|p| p as u64 * page_size)
        .collect()
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
        extra: Extra::default(),
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
    // Open the file (headers) first, then fail the store before the handshake: set after it,
    // the child's first fault can win the race and be served (seen on a loaded machine).
    let file = Arc::new(engine.open(top.build_id, FileKind::Memfile).unwrap());
    file.open_all().unwrap();
    sim.set_fault_mode(FaultMode::FailAll);
    let server = serve_file(&engine, file, None, &listener, &options).unwrap();
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
        extra: Extra::default(),
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
        extra: Extra::default(),
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

/// Guest memory in hugetlb 2 MiB pages, as a hugepage Firecracker guest has: every page equals
/// the flattened memfile, written pages are Dirty, and a range dropped with `MADV_DONTNEED`
/// (a REMOVE event) reads back as zeros, installed without fetching the snapshot data again.
#[test]
fn hugetlb_guest_memory_is_served_and_a_dropped_range_reads_zeros() {
    let huge = HugePages::reserve(8 + 1);
    for (codec, seed) in [(CompressionType::Zstd, 71), (CompressionType::None, 72)] {
        let dir = tempfile::tempdir().unwrap();
        let spec = ChainSpec {
            size: 16 * 1024 * 1024,
            ..spec(codec, HUGEPAGE_SIZE, seed)
        };
        let (store, manifest) = chain(dir.path(), &spec);
        let top = manifest.top().unwrap();
        let expected = fs::read(&top.files["memfile"].flat).unwrap();
        let pages = expected.len() / HUGEPAGE_SIZE as usize;
        assert_eq!(pages, 8);
        let drop = (3, 6);
        let ps = HUGEPAGE_SIZE as usize;
        assert!(
            expected[drop.0 * ps..drop.1 * ps].iter().any(|&b| b != 0),
            "the dropped range must hold data for zeros to mean anything"
        );
        let engine = Engine::new(sim_over(Arc::clone(&store), 3), engine_config()).unwrap();
        let s = serve_forked_with(
            &engine,
            top.build_id,
            &expected,
            HUGEPAGE_SIZE,
            dir.path(),
            seed,
            Extra {
                hugetlb: true,
                drop,
                ..Extra::default()
            },
        );
        let r = &s.report;
        let m = &r.metrics;
        assert_eq!(m.remove_events, 1, "{codec:?}: {}", r.summary());
        assert_eq!(m.removed_pages, 3, "{}", r.summary());
        // Each dropped page came back as zeros (not the cached data the engine still holds).
        let dropped = offsets(pages, HUGEPAGE_SIZE, |p| (drop.0..drop.1).contains(&p));
        for off in &dropped {
            assert!(
                s.zero_or_removed.contains(off),
                "{off:#x}: {:?}",
                s.zero_or_removed
            );
        }
        // Written (page % 4 == 1) and not dropped since.
        let want = offsets(pages, HUGEPAGE_SIZE, |p| {
            p % 4 == 1 && !(drop.0..drop.1).contains(&p)
        });
        assert_eq!(s.dirty, want, "{}", r.summary());
        assert!(r.engine.store_requests > 0, "{}", r.summary());
    }
    drop(huge);
}

/// MISSING+WP registration (sync write-protect, as e2b's dirty tracking wants): read faults
/// install write-protected pages, the first write to a page read earlier is a write-protect
/// fault, and every written page ends up Dirty; every byte still equals the flattened memfile,
/// and a dropped range reads back as zeros and is no longer dirty.
#[test]
fn write_protect_registration_serves_every_page_and_tracks_dirty_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 81));
    let top = manifest.top().unwrap();
    let expected = fs::read(&top.files["memfile"].flat).unwrap();
    let pages = expected.len() / 4096;
    let drop = (100, 140);
    assert!(
        expected[drop.0 * 4096..drop.1 * 4096]
            .iter()
            .any(|&b| b != 0)
    );
    let engine = Engine::new(sim_over(Arc::clone(&store), 3), engine_config()).unwrap();
    let s = serve_forked_with(
        &engine,
        top.build_id,
        &expected,
        PAGE_SIZE,
        dir.path(),
        81,
        Extra {
            wp: true,
            drop,
            ..Extra::default()
        },
    );
    let r = &s.report;
    let m = &r.metrics;
    assert_eq!(s.wp, Some(true), "{}", r.summary());
    // Pages % 4 == 1 were written at their first touch (write faults, installed writable);
    // pages % 4 == 3 were read first, so their write is a write-protect fault.
    let written = |p: usize| p % 4 == 1 || p % 4 == 3;
    assert_eq!(
        m.faults_wp,
        (0..pages).filter(|p| p % 4 == 3).count() as u64,
        "{}",
        r.summary()
    );
    assert_eq!(
        m.faults_write,
        (0..pages).filter(|p| p % 4 == 1).count() as u64,
        "{}",
        r.summary()
    );
    let in_drop = |p: usize| (drop.0..drop.1).contains(&p);
    assert_eq!(
        s.dirty,
        offsets(pages, PAGE_SIZE, |p| written(p) && !in_drop(p)),
        "{}",
        r.summary()
    );
    assert_eq!(m.remove_events, 1, "{}", r.summary());
    assert_eq!(m.removed_pages, (drop.1 - drop.0) as u64);
    for off in offsets(pages, PAGE_SIZE, in_drop) {
        assert!(s.zero_or_removed.contains(&off), "{off:#x}");
    }
}

/// FNV-1a over `bytes`.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// U9, the fault storm: a 64 MiB memfile of 4 KiB pages (16,384 pages) faulted by 32 threads
/// at once, every page wanted by two threads' slices and a hot set wanted by all of them, over a
/// store with a TTFB: each page is installed exactly once and every byte checksums against the
/// image.
#[test]
fn a_fault_storm_from_32_threads_installs_each_page_once() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ChainSpec {
        size: 64 * 1024 * 1024,
        ..spec(CompressionType::Zstd, PAGE_SIZE, 91)
    };
    let (store, manifest) = chain(dir.path(), &spec);
    let top = manifest.top().unwrap();
    let expected = Arc::new(fs::read(&top.files["memfile"].flat).unwrap());
    let pages = expected.len() / 4096;
    assert_eq!(pages, 16_384);
    let engine = Engine::new(sim_over(Arc::clone(&store), 2), engine_config()).unwrap();
    let vm = in_process_vm(
        &engine,
        top.build_id,
        expected.len(),
        PAGE_SIZE,
        dir.path(),
        false,
    );
    let threads = 32;
    let slice = 2 * pages / threads;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (mem, expected, barrier) = (
                Arc::clone(&vm.mem),
                Arc::clone(&expected),
                Arc::clone(&barrier),
            );
            std::thread::spawn(move || {
                // First the hot pages (every 128th), which every thread touches, each thread in
                // its own order; then this thread's slice, which overlaps the next thread's by
                // half (every page is in two slices).
                let mut rng = SmallRng::seed_from_u64(t as u64);
                let mut hot: Vec<usize> = (0..pages).step_by(128).collect();
                hot.shuffle(&mut rng);
                let mut mine: Vec<usize> =
                    (0..slice).map(|i| (t * slice / 2 + i) % pages).collect();
                mine.shuffle(&mut rng);
                barrier.wait();
                for page in hot.into_iter().chain(mine) {
                    let off = page * 4096;
                    assert!(
                        mem.slice(off, 4096) == &expected[off..off + 4096],
                        "thread {t}: page {page}"
                    );
                }
            })
        })
        .collect();
    wait_for("the faulting threads", || {
        handles.iter().all(std::thread::JoinHandle::is_finished)
    });
    for h in handles {
        h.join().unwrap();
    }
    let installs = || {
        let m = vm.server.handler().metrics();
        m.copies + m.zero_installs
    };
    // Counters are bumped just after the ioctl that woke the faulting thread: let them settle.
    wait_for("the install counters", || installs() >= pages as u64);
    let m = vm.server.handler().metrics();
    assert_eq!(installs(), pages as u64, "each page installed once: {m:?}");
    assert!(m.faults_missing >= 10_000, "{m:?}");
    assert!(m.faults_missing >= pages as u64, "{m:?}");
    assert_eq!(m.fetch_failures, 0, "{m:?}");
    for p in 0..pages {
        let state = vm.server.handler().page_state(p as u64 * 4096);
        assert!(
            matches!(state, Some(PageState::Clean | PageState::Zero)),
            "page {p}: {state:?}"
        );
    }
    // Every byte, checksummed per page and whole.
    let all = vm.mem.slice(0, expected.len());
    for p in 0..pages {
        let r = p * 4096..(p + 1) * 4096;
        assert_eq!(
            checksum(&all[r.clone()]),
            checksum(&expected[r]),
            "page {p}"
        );
    }
    assert_eq!(checksum(all), checksum(&expected));
    assert!(all == expected.as_slice());
    eprintln!("fault storm: {m:?}");
    vm.server.stop();
    let r = vm.server.join();
    assert_eq!(
        r.result.as_ref().ok(),
        Some(&Exit::Stopped),
        "{}",
        r.summary()
    );
    assert_eq!(r.metrics.copies + r.metrics.zero_installs, pages as u64);
}

/// Guest memory backed by a memfd (`MAP_SHARED`), as e2b's Firecracker fork has it, registered
/// (MISSING) on a new userfaultfd of this process.
struct MemfdGuest {
    memfd: OwnedFd,
    mem: Mem,
    uffd: OwnedFd,
}

impl MemfdGuest {
    fn new(size: usize) -> Self {
        Self::with_pages(size, PAGE_SIZE)
    }

    /// Guest memory of `page` pages: 4 KiB (a plain memfd) or 2 MiB (a hugetlbfs memfd, as
    /// Firecracker backs a hugepage VM; the caller reserves the pages).
    fn with_pages(size: usize, page: u64) -> Self {
        Self::with(size, page, false)
    }

    /// With `wp`, the memory is registered MISSING + write-protect (what e2b's Firecracker asks
    /// for with `use_sync_wp`); shmem needs `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` for that.
    fn with(size: usize, page: u64, wp: bool) -> Self {
        let (flags, mut features) = if page == HUGEPAGE_SIZE {
            (
                rustix::fs::MemfdFlags::CLOEXEC
                    | rustix::fs::MemfdFlags::HUGETLB
                    | rustix::fs::MemfdFlags::HUGE_2MB,
                ioctl::FEATURE_EVENT_REMOVE | ioctl::FEATURE_MISSING_HUGETLBFS,
            )
        } else {
            (rustix::fs::MemfdFlags::CLOEXEC, ioctl::FEATURE_EVENT_REMOVE)
        };
        let mut mode = ioctl::REGISTER_MODE_MISSING;
        if wp {
            features |= ioctl::FEATURE_PAGEFAULT_FLAG_WP | ioctl::FEATURE_WP_HUGETLBFS_SHMEM;
            mode |= ioctl::REGISTER_MODE_WP;
        }
        let memfd = rustix::fs::memfd_create("guest", flags).unwrap();
        rustix::fs::ftruncate(&memfd, size as u64).unwrap();
        let mem = Mem::shared_file(memfd.as_raw_fd(), size);
        let uffd = ioctl::create().unwrap();
        ioctl::api(uffd.as_fd(), features).unwrap();
        ioctl::register(uffd.as_fd(), mem.addr(), size as u64, mode).unwrap();
        Self { memfd, mem, uffd }
    }
}

/// A [`MemfdGuest`] of `size` bytes served `build` by an in-process handler listening on
/// `socket`: the uffd and the memfd go over in one SCM_RIGHTS message, as e2b's Firecracker
/// sends them; the connection is returned (closing it tells the handler the VM went away). The
/// handler does not kill this process on failure.
fn serve_memfd_guest(
    engine: &Engine,
    build: thaw_codec::BuildId,
    size: usize,
    socket: &Path,
) -> (MemfdGuest, UffdServer, UnixStream) {
    serve_memfd_guest_with(engine, build, size, PAGE_SIZE, socket)
}

/// [`serve_memfd_guest`] with guest pages of `page` bytes (4 KiB or 2 MiB hugetlb).
fn serve_memfd_guest_with(
    engine: &Engine,
    build: thaw_codec::BuildId,
    size: usize,
    page: u64,
    socket: &Path,
) -> (MemfdGuest, UffdServer, UnixStream) {
    serve_guest(
        engine,
        build,
        MemfdGuest::with_pages(size, page),
        page,
        socket,
    )
}

/// Serves `guest` (`page`-byte pages) by an in-process handler, as [`serve_memfd_guest`] does.
fn serve_guest(
    engine: &Engine,
    build: thaw_codec::BuildId,
    guest: MemfdGuest,
    page: u64,
    socket: &Path,
) -> (MemfdGuest, UffdServer, UnixStream) {
    let size = guest.mem.len;
    let listener = UnixListener::bind(socket).unwrap();
    let json = region_json(guest.mem.addr(), size as u64, page);
    let (uffd_raw, memfd_raw) = (guest.uffd.as_raw_fd(), guest.memfd.as_raw_fd());
    let path = socket.to_path_buf();
    let client = std::thread::spawn(move || {
        let s = UnixStream::connect(&path).unwrap();
        assert!(send_with_fds(
            s.as_raw_fd(),
            json.as_bytes(),
            &[uffd_raw, memfd_raw]
        ));
        s
    });
    let options = UffdOptions {
        handshake_timeout: Duration::from_secs(20),
        kill_peer_on_handshake_error: false,
        handler: HandlerConfig {
            kill_peer_on_failure: false,
            ..HandlerConfig::default()
        },
        ..UffdOptions::default()
    };
    let server = serve_uffd(engine, build, &listener, &options).unwrap();
    let conn = client.join().unwrap();
    (guest, server, conn)
}

/// Memory export at pause (issue 6): a VM whose guest memory is a memfd (e2b's `use_memfd`)
/// writes some pages at their first touch and only reads others; the handler's change set
/// (dirty = written, zero = installed as zeros) is exported as a new memfile layer read from the
/// memfd, and a fresh engine reads the new build back exactly as the guest memory was.
#[test]
fn the_guest_memory_exports_as_a_new_layer_from_the_memfd() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 61));
    let top = manifest.top().unwrap();
    let expected = fs::read(&top.files["memfile"].flat).unwrap();
    let size = expected.len();
    let pages = size / PAGE_SIZE as usize;
    let engine = Engine::new(sim_over(Arc::clone(&store), 1), engine_config()).unwrap();

    let socket = socket_path(dir.path());
    let _ = fs::remove_file(&socket);
    let (guest, server, _conn) = serve_memfd_guest(&engine, top.build_id, size, &socket);
    let mem = &guest.mem;
    assert!(server.memfd().is_some());

    // The guest: pages % 3 == 0 written at their first touch (a write fault: Dirty), pages
    // % 3 == 1 read (Clean, or Zero where the build has a nil mapping), the rest untouched.
    let mut model = expected.clone();
    for p in 0..pages {
        let off = p * PAGE_SIZE as usize;
        match p % 3 {
            0 => {
                let v = (p as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                mem.write_u64(off + 8, v);
                model[off + 8..off + 16].copy_from_slice(&v.to_ne_bytes());
            }
            1 => assert!(
                *mem.slice(off, PAGE_SIZE as usize) == expected[off..off + PAGE_SIZE as usize]
            ),
            _ => {}
        }
    }
    let changes = server.memory_changes();
    assert_eq!(changes.dirty_blocks(), pages.div_ceil(3) as u64);

    let new = uuid::Uuid::new_v4();
    let opts = WriteOptions {
        codec: CompressionType::Zstd,
        level: 1,
        frame_size: 1024 * 1024,
        header_version: 4,
        workers: 2,
        progress: false,
    };
    let out = server
        .export_memory(store.as_ref(), new, &opts, &DirtyPages::Handler)
        .unwrap();
    assert!(
        matches!(out, thaw_server::export::Exported::Stored(_)),
        "{out:?}"
    );
    // Idempotent.
    let again = server
        .export_memory(store.as_ref(), new, &opts, &DirtyPages::Handler)
        .unwrap();
    assert!(
        matches!(again, thaw_server::export::Exported::AlreadyStored(_)),
        "{again:?}"
    );
    server.stop();
    drop(server.join());

    let fresh = Engine::new(Arc::clone(&store) as Arc<dyn Store>, engine_config()).unwrap();
    let f = fresh.open(new, FileKind::Memfile).unwrap();
    let mut all = vec![0u8; size];
    f.read_at(0, &mut all).unwrap();
    if let Some(i) = all.iter().zip(&model).position(|(a, b)| a != b) {
        panic!("the exported memory differs from the guest's at byte {i}");
    }
    drop(guest);
}

/// `thaw uffd --control` and `thaw ctl memory` / `memory-snapshot`: this process plays a
/// Firecracker whose guest memory is a memfd (sent with the uffd), writes and reads pages served
/// by the `thaw uffd` child, then asks it over the control socket to store the changed pages as a
/// new memfile layer; the new build reads back as the guest memory was, and a repeated request is
/// idempotent.
#[test]
fn thaw_uffd_control_snapshots_the_guest_memory() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Lz4, PAGE_SIZE, 71));
    let store_dir = dir.path().join("store");
    let top = manifest.top().unwrap();
    let expected = fs::read(&top.files["memfile"].flat).unwrap();
    let size = expected.len();
    let pages = size / PAGE_SIZE as usize;
    let socket = socket_path(dir.path());
    let control = dir.path().join("control.sock");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args([
            "uffd",
            "--store",
            &format!("file://{}", store_dir.display()),
        ])
        .args([
            "--build",
            &top.build_id.to_string(),
            "--socket",
            socket.to_str().unwrap(),
        ])
        .args([
            "--control",
            control.to_str().unwrap(),
            "--handshake-timeout",
            "20s",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    let MemfdGuest { memfd, mem, uffd } = MemfdGuest::new(size);
    let conn = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("thaw uffd never listened: {e}"),
            }
        }
    };
    let json = region_json(mem.addr(), size as u64, PAGE_SIZE);
    assert!(send_with_fds(
        conn.as_raw_fd(),
        json.as_bytes(),
        &[uffd.as_raw_fd(), memfd.as_raw_fd()]
    ));
    // The control socket is announced once the handshake is done.
    let mut stdout = std::io::BufReader::new(cmd.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("control unix:{}", control.display()));

    let mut model = expected.clone();
    for p in 0..pages {
        let off = p * PAGE_SIZE as usize;
        match p % 4 {
            0 => {
                let v = (p as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
                mem.write_u64(off, v);
                model[off..off + 8].copy_from_slice(&v.to_ne_bytes());
            }
            1 | 2 => assert!(
                *mem.slice(off, PAGE_SIZE as usize) == expected[off..off + PAGE_SIZE as usize]
            ),
            _ => {}
        }
    }
    let ctl = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args(["ctl", "--control", control.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "thaw ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let info = ctl(&["memory"]);
    assert_eq!(info["build"], top.build_id.to_string());
    assert_eq!(info["memfd"], true);
    assert_eq!(info["state"], "serving");
    assert_eq!(info["dirty_pages"], pages.div_ceil(4) as u64, "{info}");
    // Where the dirty pages come from must be said; a bitmap must fit the memfile.
    let new = uuid::Uuid::new_v4().to_string();
    let post = |body: serde_json::Value| {
        thaw_server::control::call(
            &control,
            "POST",
            "/v1/memory/snapshot",
            Some(serde_json::to_vec(&body).unwrap()),
        )
        .unwrap()
    };
    let (status, body) = post(serde_json::json!({ "new_build_id": new }));
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("dirty_bitmap"), "{body}");
    let (status, body) = post(serde_json::json!({ "new_build_id": new, "dirty_bitmap": [1, 2] }));
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("words"), "{body}");
    let reply = ctl(&[
        "memory-snapshot",
        "--dirty-from-handler",
        "--new-build",
        &new,
        "--codec",
        "zstd:1",
        "--frame-size",
        "1MiB",
    ]);
    assert_eq!(reply["file"], "memfile");
    assert_eq!(reply["already_stored"], false);
    assert_eq!(
        reply["diff_bytes"],
        pages.div_ceil(4) as u64 * PAGE_SIZE,
        "{reply}"
    );
    let again = ctl(&[
        "memory-snapshot",
        "--dirty-from-handler",
        "--new-build",
        &new,
        "--codec",
        "zstd:1",
        "--frame-size",
        "1MiB",
    ]);
    assert_eq!(again["already_stored"], true, "{again}");

    // Firecracker goes away: thaw uffd ends cleanly.
    drop(conn);
    assert!(cmd.wait().unwrap().success());
    drop(mem);

    let fresh = Engine::new(Arc::clone(&store) as Arc<dyn Store>, engine_config()).unwrap();
    let f = fresh.open(new.parse().unwrap(), FileKind::Memfile).unwrap();
    let mut all = vec![0u8; size];
    f.read_at(0, &mut all).unwrap();
    if let Some(i) = all.iter().zip(&model).position(|(a, b)| a != b) {
        panic!("the snapshot differs from the guest memory at byte {i}");
    }
}

/// Memory export at pause, ten pause/resume cycles with every codec, into `file://` and into
/// fake-gcs-server (issue 6's round trip): each cycle serves the previous cycle's build to a
/// guest whose memory is a memfd (e2b's `use_memfd`), the guest writes some pages, the handler's
/// change set is stored as a new memfile layer (zstd, LZ4 and none in turn), and a fresh engine
/// over the same store reads the new build back equal to the guest memory; the header stays
/// compact (no two adjacent mappings that could merge).
#[test]
fn memory_exports_with_every_codec_into_file_and_fake_gcs() {
    let dir = tempfile::tempdir().unwrap();
    let file_store: Arc<dyn Store> = Arc::new(FileStore::new(dir.path().join("store")));
    let mut stores = vec![("file", file_store)];
    let gcs = gcs_common::FakeGcs::start();
    if let Some(gcs) = &gcs {
        gcs.create_bucket("mem");
        let url = format!("gs://mem/builds?endpoint={}", gcs.endpoint());
        stores.push(("gcs", thaw_server::store::open_store(&url).unwrap()));
    }
    let codecs = [
        (CompressionType::Zstd, 2),
        (CompressionType::Lz4, 0),
        (CompressionType::None, 0),
    ];
    let mut rng = SmallRng::seed_from_u64(68);
    for (name, store) in stores {
        let manifest = generate(
            store.as_ref(),
            &dir.path().join(format!("expected-{name}")),
            &spec(CompressionType::Zstd, PAGE_SIZE, 67),
        )
        .unwrap();
        let top = manifest.top().unwrap();
        let mut model = fs::read(&top.files["memfile"].flat).unwrap();
        let mut build = top.build_id;
        let size = model.len();
        let pages = size / PAGE_SIZE as usize;
        for cycle in 0..10 {
            let (codec, level) = codecs[cycle % codecs.len()];
            let what = format!("{name} cycle {cycle} {codec:?}");
            let engine = Engine::new(Arc::clone(&store), engine_config()).unwrap();
            let socket = dir.path().join(format!("{name}-{cycle}.sock"));
            let (guest, server, _conn) = serve_memfd_guest(&engine, build, size, &socket);
            let mem = &guest.mem;

            // A run of pages and a few scattered ones, each written at a random place.
            let run = rng.random_range(0..pages - 8);
            let mut touched: Vec<usize> = (run..run + 8).collect();
            touched.extend((0..6).map(|_| rng.random_range(0..pages)));
            for &p in &touched {
                let off = p * PAGE_SIZE as usize + rng.random_range(0..PAGE_SIZE as usize / 8) * 8;
                let v = rng.random::<u64>() | 1;
                mem.write_u64(off, v);
                model[off..off + 8].copy_from_slice(&v.to_ne_bytes());
            }
            // A page read first (installed by a read fault), then written: with MISSING-only
            // registration the write never reaches the handler, so only Firecracker's dirty
            // bitmap knows it (the case `DirtyPages::Bitmap` exists for).
            let rw = (0..pages)
                .map(|_| rng.random_range(0..pages))
                .find(|p| !touched.contains(p))
                .unwrap();
            let off = rw * PAGE_SIZE as usize;
            assert!(
                *mem.slice(off, 8) == model[off..off + 8],
                "{what}: page {rw}"
            );
            let v = rng.random::<u64>() | 1;
            mem.write_u64(off, v);
            model[off..off + 8].copy_from_slice(&v.to_ne_bytes());
            let handler_dirty = server.memory_changes().dirty;
            assert!(
                !handler_dirty.iter().any(|r| r.contains(&(rw as u64))),
                "{what}: the handler saw a write to a page it had installed"
            );
            touched.push(rw);
            let mut bitmap = vec![0u64; pages.div_ceil(64)];
            for &p in &touched {
                bitmap[p / 64] |= 1 << (p % 64);
            }
            let snap = Snapshot {
                codec,
                level,
                frame_size: 1024 * 1024,
            };
            let (new, _) = snap.export_and_check(
                (server, guest),
                &store,
                &DirtyPages::Bitmap(bitmap),
                &model,
                &what,
            );
            build = new;
        }
    }
}

/// Memory snapshots of a hugepage VM: guest memory is a hugetlbfs memfd of 2 MiB pages, the
/// memfile's block size is 2 MiB (e2b's hugepage templates), the handler installs whole 2 MiB
/// pages and Firecracker's dirty bitmap counts 2 MiB pages. Three pause/resume cycles (zstd, LZ4,
/// none): pages written at their first touch, a page read first and written later (known only
/// to the bitmap), each snapshot read back by a fresh engine equal to the test's model of the
/// guest memory, with 2 MiB blocks and merged mappings in its header.
#[test]
fn hugepage_memory_snapshots_round_trip_with_every_codec() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(FileStore::new(dir.path().join("store")));
    let spec = ChainSpec {
        size: 16 * 1024 * 1024,
        ..spec(CompressionType::Zstd, HUGEPAGE_SIZE, 91)
    };
    let manifest = generate(store.as_ref(), &dir.path().join("expected"), &spec).unwrap();
    let top = manifest.top().unwrap();
    let mut model = fs::read(&top.files["memfile"].flat).unwrap();
    let size = model.len();
    let ps = HUGEPAGE_SIZE as usize;
    let pages = size / ps;
    assert_eq!(pages, 8);
    // One guest at a time, each of `pages` huge pages.
    let huge = HugePages::reserve(pages as u64);
    let mut build = top.build_id;
    let mut rng = SmallRng::seed_from_u64(92);
    let codecs = [
        (CompressionType::Zstd, 1),
        (CompressionType::Lz4, 0),
        (CompressionType::None, 0),
    ];
    for (cycle, (codec, level)) in codecs.into_iter().enumerate() {
        let what = format!("cycle {cycle} {codec:?}");
        let engine = Engine::new(Arc::clone(&store), engine_config()).unwrap();
        let socket = dir.path().join(format!("huge-{cycle}.sock"));
        let (guest, server, _conn) =
            serve_memfd_guest_with(&engine, build, size, HUGEPAGE_SIZE, &socket);
        let mem = &guest.mem;
        // Two pages written at their first touch (write faults), a few words each.
        let first = rng.random_range(0..pages);
        let second = (first + 1 + rng.random_range(0..pages - 1)) % pages;
        let mut touched = vec![first, second];
        for &p in &touched {
            for _ in 0..4 {
                let off = p * ps + rng.random_range(0..ps / 8) * 8;
                let v = rng.random::<u64>() | 1;
                mem.write_u64(off, v);
                model[off..off + 8].copy_from_slice(&v.to_ne_bytes());
            }
        }
        // A page read first (installed by a read fault), then written: only the bitmap knows.
        let rw = (0..pages).find(|p| !touched.contains(p)).unwrap();
        let off = rw * ps + rng.random_range(0..ps / 8) * 8;
        assert!(
            *mem.slice(off, 8) == model[off..off + 8],
            "{what}: page {rw}"
        );
        let v = rng.random::<u64>() | 1;
        mem.write_u64(off, v);
        model[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        // Every byte the guest sees equals the model (pages never touched fault in now).
        if let Some(i) = mem
            .slice(0, size)
            .iter()
            .zip(&model)
            .position(|(a, b)| a != b)
        {
            panic!("{what}: guest memory differs from the model at byte {i}");
        }
        touched.push(rw);
        let mut bitmap = vec![0u64; pages.div_ceil(64)];
        for &p in &touched {
            bitmap[p / 64] |= 1 << (p % 64);
        }
        let snap = Snapshot {
            codec,
            level,
            frame_size: 2 * 1024 * 1024,
        };
        let (new, header) = snap.export_and_check(
            (server, guest),
            &store,
            &DirtyPages::Bitmap(bitmap),
            &model,
            &what,
        );
        assert_eq!(header.metadata.block_size, HUGEPAGE_SIZE, "{what}");
        for m in &header.mappings {
            assert_eq!(m.offset % HUGEPAGE_SIZE, 0, "{what}: {m:?}");
            assert_eq!(m.length % HUGEPAGE_SIZE, 0, "{what}: {m:?}");
        }
        build = new;
    }
    drop(huge);
}

/// e2b's `use_sync_wp` on a memfd guest: shared memory registered MISSING + write-protect. A read
/// fault installs the page write-protected; the guest's later write is a write-protect fault the
/// handler resolves, so the handler's own tracking (`DirtyPages::Handler`) is exact and a
/// snapshot taken from it alone holds every write: pages written at first touch and pages read
/// first and written later, read back by a fresh engine equal to the guest's memory.
#[test]
fn write_protected_shmem_guest_snapshots_from_the_handlers_tracking() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 95));
    let top = manifest.top().unwrap();
    let mut model = fs::read(&top.files["memfile"].flat).unwrap();
    let size = model.len();
    let pages = size / PAGE_SIZE as usize;
    let ps = PAGE_SIZE as usize;
    let engine = Engine::new(Arc::clone(&store) as Arc<dyn Store>, engine_config()).unwrap();
    let socket = socket_path(dir.path());
    let _ = fs::remove_file(&socket);
    let guest = MemfdGuest::with(size, PAGE_SIZE, true);
    let (guest, server, _conn) = serve_guest(&engine, top.build_id, guest, PAGE_SIZE, &socket);
    let mem = &guest.mem;
    let mut rng = SmallRng::seed_from_u64(96);
    // Pages % 5 == 0: written at first touch; % 5 == 2: read, then written (WP faults);
    // % 5 == 4: only read.
    for p in 0..pages {
        let off = p * ps + rng.random_range(0..ps / 8) * 8;
        match p % 5 {
            0 => {}
            2 | 4 => assert!(*mem.slice(off, 8) == model[off..off + 8], "page {p}"),
            _ => continue,
        }
        if p % 5 == 4 {
            continue;
        }
        let v = rng.random::<u64>() | 1;
        mem.write_u64(off, v);
        model[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }
    let m = server.handler().metrics();
    assert_eq!(
        m.faults_wp,
        (0..pages).filter(|p| p % 5 == 2).count() as u64,
        "write-protect faults"
    );
    let dirty = server.memory_changes().dirty;
    let dirty_pages: Vec<u64> = dirty.iter().flat_map(|r| r.clone()).collect();
    let written: Vec<u64> = (0..pages as u64)
        .filter(|p| p % 5 == 0 || p % 5 == 2)
        .collect();
    assert_eq!(dirty_pages, written, "the handler's dirty pages");

    let snap = Snapshot {
        codec: CompressionType::Zstd,
        level: 1,
        frame_size: 2 * 1024 * 1024,
    };
    let store: Arc<dyn Store> = store;
    snap.export_and_check(
        (server, guest),
        &store,
        &DirtyPages::Handler,
        &model,
        "sync write-protect",
    );
}

/// How a test exports guest memory as a new memfile layer.
struct Snapshot {
    codec: CompressionType,
    level: i32,
    frame_size: u64,
}

impl Snapshot {
    /// Exports the memory of the guest `served` into `store` as a new build (dirty pages from
    /// `dirty`), stops the handler, and checks the new memfile with a fresh engine: every byte
    /// equals `model`, and no two adjacent mappings could have been merged. Returns the new
    /// build and its header.
    fn export_and_check(
        &self,
        served: (UffdServer, MemfdGuest),
        store: &Arc<dyn Store>,
        dirty: &DirtyPages,
        model: &[u8],
        what: &str,
    ) -> (thaw_codec::BuildId, Header) {
        let (server, guest) = served;
        let new = uuid::Uuid::new_v4();
        let opts = WriteOptions {
            codec: self.codec,
            level: self.level,
            frame_size: self.frame_size,
            header_version: 4,
            workers: 2,
            progress: false,
        };
        let out = server
            .export_memory(store.as_ref(), new, &opts, dirty)
            .unwrap();
        assert!(
            matches!(out, thaw_server::export::Exported::Stored(_)),
            "{what}: {out:?}"
        );
        server.stop();
        drop(server.join());
        drop(guest);

        let fresh = Engine::new(Arc::clone(store), engine_config()).unwrap();
        let f = fresh.open(new, FileKind::Memfile).unwrap();
        let mut all = vec![0u8; model.len()];
        f.read_at(0, &mut all).unwrap();
        if let Some(i) = all.iter().zip(model).position(|(a, b)| a != b) {
            panic!("{what}: the exported memory differs from the guest's at byte {i}");
        }
        let header = f.header().clone();
        for w in header.mappings.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            let mergeable = a.build_id == b.build_id
                && (a.is_nil() || a.build_storage_offset + a.length == b.build_storage_offset);
            assert!(!mergeable, "{what}: unmerged adjacent mappings {a:?} {b:?}");
        }
        (new, header)
    }
}
