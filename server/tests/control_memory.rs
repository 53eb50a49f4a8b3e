//! The UFFD handlers of `thaw uffd --control` (issue 6: `/v1/handlers`, `thaw ctl handler-*`)
//! against a real userfaultfd: a forked fake Firecracker that sends NO memfd (only the region
//! JSON and the uffd, as upstream Firecracker does) writes and reads its guest memory through a
//! handler added at runtime; the memory snapshot reads the dirty pages from the peer's address
//! space (`process_vm_readv`) and a fresh engine reads the new build back exactly as the guest
//! saw it; prefetch prefaults; removal of waiting and serving handlers (409 unless forced, the
//! VM then SIGKILLed); SIGTERM stops everything; `thaw uffd` SIGKILLed at several points of a
//! memory snapshot never leaves a readable but wrong build, and a retry in a fresh process
//! succeeds.
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

#[path = "common/guest.rs"]
mod guest;

use std::io::BufRead;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thaw_codec::{BuildId, CompressionType, FileKind, PAGE_SIZE};
use thaw_server::chain::{ChainManifest, ChainSpec, generate};
use thaw_server::engine::{Engine, EngineConfig};
use thaw_server::store::{FileStore, Store};
use thaw_server::uffd::{DirtyPages, UffdOptions, serve_uffd};
use thaw_server::writer::WriteOptions;
use thaw_uffd::{HandlerConfig, ioctl};

use guest::{Mem, send_with_fd};

const PS: usize = PAGE_SIZE as usize;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// The value the guest writes at byte 8 of page `p` (pages `p % 3 == 0`).
fn written(p: usize) -> u64 {
    (p as u64 + 7).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// The guest memory after the fake Firecracker's first pass over `expected`.
fn model_of(expected: &[u8]) -> Vec<u8> {
    let mut model = expected.to_vec();
    for p in 0..expected.len() / PS {
        if p % 3 == 0 {
            model[p * PS + 8..p * PS + 16].copy_from_slice(&written(p).to_ne_bytes());
        }
    }
    model
}

/// Report words of the fake Firecracker (in a shared page): its progress, and the test's
/// command.
const STATUS: usize = 0;
const COMMAND: usize = 8;
/// `STATUS` values.
const PASS_DONE: u64 = 1;
const MISMATCH: u64 = 2;
const VERIFIED: u64 = 3;
/// `COMMAND` values.
const VERIFY_REST: u64 = 1;
const EXIT: u64 = 2;

/// A forked fake Firecracker (upstream: no memfd). Killed (SIGKILL) and reaped on drop.
struct Vm {
    pid: i32,
    report: Mem,
    _mem: Mem,
    reaped: bool,
}

impl Vm {
    /// Forks the child: registers `size` bytes of private anonymous memory (MISSING) on a new
    /// userfaultfd, connects to `socket` (retrying), sends the region JSON and the uffd only,
    /// then in page order writes `written(p)` at byte 8 of pages `p % 3 == 0` (write faults)
    /// and reads pages `p % 3 == 1` (compared with `expected`), and reports `PASS_DONE`. Then it
    /// waits, "paused", for the test's command: `VERIFY_REST` compares pages `p % 3 == 2` with
    /// `expected` (`VERIFIED` or `MISMATCH`), `EXIT` exits 0.
    fn fork(socket: &Path, expected: &[u8]) -> Self {
        let mem = Mem::new(expected.len(), 4096, false);
        let report = Mem::new(4096, 4096, true);
        // SAFETY: sockaddr_un is plain data; zero is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = socket.as_os_str().as_encoded_bytes();
        assert!(bytes.len() < addr.sun_path.len());
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = s.cast_signed();
        }
        let json = format!(
            r#"[{{"base_host_virt_addr":{},"size":{},"offset":0,"page_size":{PS},"page_size_kib":{PS}}}]"#,
            mem.addr(),
            expected.len()
        )
        .into_bytes();
        // SAFETY: fork(2); the child only makes raw syscalls and byte comparisons, then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let code = vm_main(&mem, &report, &addr, &json, expected);
            // SAFETY: _exit runs no destructors or atexit handlers.
            unsafe { libc::_exit(code) }
        }
        Self {
            pid,
            report,
            _mem: mem,
            reaped: false,
        }
    }

    fn wait_status(&self, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.report.read_u64(STATUS);
            if s == want {
                return;
            }
            assert_ne!(s, MISMATCH, "the guest read a wrong page");
            assert!(
                Instant::now() < deadline,
                "the guest never reported {want} (at {s})"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn command(&self, c: u64) {
        self.report.write_u64(COMMAND, c);
    }

    /// Waits (up to 30 s: a hang is a failure, and drop then kills it) for the child to end;
    /// its raw wait status.
    fn reap(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut status = 0;
            // SAFETY: polls our own child.
            let rc = unsafe { libc::waitpid(self.pid, &raw mut status, libc::WNOHANG) };
            if rc == self.pid {
                self.reaped = true;
                return status;
            }
            assert_eq!(rc, 0, "waitpid");
            assert!(
                Instant::now() < deadline,
                "the fake Firecracker never ended"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: signals our own child (not reaped yet, so the pid is still ours).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let mut status = 0;
            // SAFETY: reaps our own child.
            unsafe { libc::waitpid(self.pid, &raw mut status, 0) };
        }
    }
}

fn killed_by_sigkill(status: i32) -> bool {
    libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL
}

fn nap() {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 2_000_000,
    };
    // SAFETY: nanosleep with a valid timespec.
    unsafe { libc::nanosleep(&raw const ts, std::ptr::null_mut()) };
}

/// The forked child's life (raw syscalls only).
fn vm_main(mem: &Mem, report: &Mem, addr: &libc::sockaddr_un, json: &[u8], expected: &[u8]) -> i32 {
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
    if ioctl::register(
        ufd,
        mem.addr(),
        mem.len as u64,
        ioctl::REGISTER_MODE_MISSING,
    )
    .is_err()
    {
        return 12;
    }
    // SAFETY: socket(2).
    let sock = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return 13;
    }
    let alen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let mut tries = 0;
    // SAFETY: `addr` is a valid sockaddr_un of `alen` bytes.
    while unsafe { libc::connect(sock, std::ptr::from_ref(addr).cast(), alen) } != 0 {
        tries += 1;
        if tries > 10_000 {
            return 14;
        }
        nap();
    }
    if !send_with_fd(sock, json, fd) {
        return 15;
    }
    let pages = mem.len / PS;
    for p in 0..pages {
        let off = p * PS;
        match p % 3 {
            0 => mem.write_u64(off + 8, written(p)),
            1 if mem.slice(off, PS) != &expected[off..off + PS] => {
                report.write_u64(STATUS, MISMATCH);
                return 1;
            }
            _ => {}
        }
    }
    report.write_u64(STATUS, PASS_DONE);
    loop {
        match report.read_u64(COMMAND) {
            VERIFY_REST => {
                for p in (2..pages).step_by(3) {
                    let off = p * PS;
                    if mem.slice(off, PS) != &expected[off..off + PS] {
                        report.write_u64(STATUS, MISMATCH);
                        return 1;
                    }
                }
                report.write_u64(COMMAND, 0);
                report.write_u64(STATUS, VERIFIED);
            }
            EXIT => return 0,
            _ => nap(),
        }
    }
}

/// A two-layer chain of one memfile of `size` bytes in `dir/store`.
fn chain(dir: &Path, size: u64, seed: u64) -> (Arc<FileStore>, ChainManifest) {
    let store = Arc::new(FileStore::new(dir.join("store")));
    let spec = ChainSpec {
        layers: 2,
        size,
        memfile_block_size: PAGE_SIZE,
        files: vec![FileKind::Memfile],
        seed,
        dirty_fraction: 0.2,
        zero_fraction: 0.1,
        write: WriteOptions {
            codec: CompressionType::Zstd,
            level: 1,
            frame_size: 2 * 1024 * 1024,
            header_version: 4,
            workers: 2,
            progress: false,
        },
    };
    let manifest = generate(store.as_ref(), &dir.join("expected"), &spec).unwrap();
    (store, manifest)
}

/// The memfile of `build` as a fresh engine reads it.
fn read_memfile(store: &Arc<FileStore>, build: BuildId, size: usize) -> anyhow::Result<Vec<u8>> {
    let engine = Engine::new(Arc::clone(store) as Arc<dyn Store>, EngineConfig::default())?;
    let f = engine.open(build, FileKind::Memfile)?;
    let mut all = vec![0u8; size];
    f.read_at(0, &mut all)?;
    Ok(all)
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: differs from the guest memory at byte {i}");
    }
}

fn inspect_verify(store_dir: &Path, build: BuildId) {
    let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args([
            "inspect",
            "--store",
            &format!("file://{}", store_dir.display()),
        ])
        .args(["--build", &build.to_string(), "--verify"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "thaw inspect --verify {build}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `thaw uffd --control` without --build. Killed on drop.
struct Uffd {
    child: Child,
    control: PathBuf,
}

impl Uffd {
    fn start(store_dir: &Path, control: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args([
                "uffd",
                "--store",
                &format!("file://{}", store_dir.display()),
            ])
            .args(["--control", control.to_str().unwrap()])
            .args(["--handshake-timeout", "20s"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), format!("control unix:{}", control.display()));
        Self {
            child,
            control: control.to_path_buf(),
        }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args(["ctl", "--control", self.control.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "thaw ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A request that must fail with `status`; returns the message.
    fn fails(&self, args: &[&str], status: u16) -> String {
        let out = self.ctl(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "thaw ctl {args:?} succeeded");
        assert!(
            err.contains(&format!("answered {status}")),
            "thaw ctl {args:?}: expected {status}: {err}"
        );
        err
    }

    fn add(&self, name: &str, build: BuildId, socket: &Path) -> serde_json::Value {
        self.ok(&[
            "handler-add",
            name,
            "--build",
            &build.to_string(),
            "--socket",
            socket.to_str().unwrap(),
        ])
    }

    fn info(&self, name: &str) -> serde_json::Value {
        let all = self.ok(&["handlers"]);
        all.as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no handler {name} in {all}"))
    }
}

impl Drop for Uffd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sigterm(child: &Child) {
    // SAFETY: signals our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

// ---------------------------------------------------------------------------------------------
// Tests

/// A handler added at runtime serves a fake Firecracker that sent no memfd; `handlers` shows it
/// waiting, then serving with its peer and dirty pages; a prefetch of every page prefaults the
/// untouched ones (the guest then reads them with no fault, and they are right); the snapshot
/// reads the dirty pages from the peer's address space and the new build reads back exactly as
/// the guest memory is; removal is refused while the VM runs and `--force` kills it.
#[test]
fn a_runtime_handler_serves_prefetches_snapshots_from_the_peer_and_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), 6 * 1024 * 1024 + 3 * 4096, 91);
    let top = manifest.top().unwrap();
    let expected = std::fs::read(&top.files["memfile"].flat).unwrap();
    let size = expected.len();
    let pages = size / PS;
    let store_dir = dir.path().join("store");
    let uffd = Uffd::start(&store_dir, &dir.path().join("control.sock"));
    assert_eq!(uffd.ok(&["handlers"]), serde_json::json!([]));
    // Not started with --build: no /v1/memory.
    uffd.fails(&["memory"], 404);

    let socket = dir.path().join("vm1.sock");
    let added = uffd.add("vm1", top.build_id, &socket);
    assert_eq!(added["state"], "waiting", "{added}");
    assert_eq!(added["build"], top.build_id.to_string());
    assert!(socket.exists(), "the socket is bound before the reply");

    let mut vm = Vm::fork(&socket, &expected);
    vm.wait_status(PASS_DONE);
    let info = uffd.info("vm1");
    assert_eq!(info["state"], "serving", "{info}");
    assert_eq!(info["peer_pid"], vm.pid, "{info}");
    assert_eq!(info["memfd"], false, "{info}");
    assert_eq!(info["dirty_pages"], pages.div_ceil(3) as u64, "{info}");
    assert!(
        !socket.exists(),
        "the socket is removed after the handshake"
    );

    // Prefetch every page: the untouched third is installed before the guest touches it.
    let reply = uffd.ok(&["handler-prefetch", "vm1", "--range", &format!("0:{size}")]);
    assert_eq!(reply["pages"], pages as u64, "{reply}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let info = loop {
        let info = uffd.info("vm1");
        let p = &info["prefetch"];
        let settled = p["prefaulted"].as_u64().unwrap()
            + p["skipped"].as_u64().unwrap()
            + p["failed"].as_u64().unwrap();
        if settled == pages as u64 {
            break info;
        }
        assert!(Instant::now() < deadline, "prefetch never settled: {info}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(info["prefetch"]["failed"], 0, "{info}");
    assert_eq!(
        info["prefetch"]["prefaulted"],
        (pages / 3) as u64,
        "the untouched pages are prefaulted: {info}"
    );
    let faults = info["counters"]["faults"].as_u64().unwrap();
    vm.command(VERIFY_REST);
    vm.wait_status(VERIFIED);
    let info = uffd.info("vm1");
    assert_eq!(
        info["counters"]["faults"].as_u64().unwrap(),
        faults,
        "prefaulted pages fault no more: {info}"
    );

    // The snapshot, from the peer's address space (no memfd).
    let model = model_of(&expected);
    let new = uuid::Uuid::new_v4();
    let snap = uffd.ok(&[
        "handler-snapshot",
        "--dirty-from-handler",
        "vm1",
        "--new-build",
        &new.to_string(),
        "--codec",
        "zstd:1",
        "--frame-size",
        "1MiB",
    ]);
    assert_eq!(snap["already_stored"], false, "{snap}");
    assert_eq!(snap["parent"], top.build_id.to_string());
    assert_eq!(
        snap["diff_bytes"],
        pages.div_ceil(3) as u64 * PAGE_SIZE,
        "{snap}"
    );
    assert_same(
        &read_memfile(&store, new, size).unwrap(),
        &model,
        "the snapshot",
    );
    inspect_verify(&store_dir, new);

    // Removal: refused while the VM runs, forced kills it.
    let msg = uffd.fails(&["handler-remove", "vm1"], 409);
    assert!(msg.contains("force"), "{msg}");
    assert_eq!(uffd.info("vm1")["state"], "serving");
    let removed = uffd.ok(&["handler-remove", "vm1", "--force"]);
    assert_eq!(removed["name"], "vm1");
    assert!(killed_by_sigkill(vm.reap()), "the VM was killed");
    assert_eq!(uffd.ok(&["handlers"]), serde_json::json!([]));
    uffd.fails(
        &[
            "handler-snapshot",
            "--dirty-from-handler",
            "vm1",
            "--new-build",
            &new.to_string(),
        ],
        404,
    );
}

/// Bad requests: a duplicate name and a busy socket are 409, an unknown build 404; a waiting
/// handler is removed (its socket with it); a handler whose VM exited is `finished` and can be
/// removed without force, but not snapshotted; SIGTERM stops the process, killing the VM of a
/// serving handler and removing a waiting handler's socket.
#[test]
fn waiting_and_finished_handlers_are_removed_and_sigterm_stops_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, manifest) = chain(dir.path(), 2 * 1024 * 1024, 92);
    let top = manifest.top().unwrap();
    let expected = std::fs::read(&top.files["memfile"].flat).unwrap();
    let store_dir = dir.path().join("store");
    let control = dir.path().join("control.sock");
    let mut uffd = Uffd::start(&store_dir, &control);

    let s1 = dir.path().join("w1.sock");
    uffd.add("w1", top.build_id, &s1);
    let dup = uffd.fails(
        &[
            "handler-add",
            "w1",
            "--build",
            &top.build_id.to_string(),
            "--socket",
            dir.path().join("other.sock").to_str().unwrap(),
        ],
        409,
    );
    assert!(dup.contains("w1"), "{dup}");
    let busy = uffd.fails(
        &[
            "handler-add",
            "w2",
            "--build",
            &top.build_id.to_string(),
            "--socket",
            s1.to_str().unwrap(),
        ],
        409,
    );
    assert!(busy.contains("socket"), "{busy}");
    let unknown = uuid::Uuid::new_v4().to_string();
    uffd.fails(
        &[
            "handler-add",
            "w3",
            "--build",
            &unknown,
            "--socket",
            dir.path().join("w3.sock").to_str().unwrap(),
        ],
        404,
    );
    assert!(!dir.path().join("w3.sock").exists());
    uffd.fails(&["handler-remove", "nope"], 404);

    // A waiting handler stops listening.
    assert!(s1.exists());
    let removed = uffd.ok(&["handler-remove", "w1"]);
    assert_eq!(removed["state"], "finished", "{removed}");
    assert!(!s1.exists(), "the waiting handler's socket is removed");
    assert_eq!(uffd.ok(&["handlers"]), serde_json::json!([]));
    // Its name and socket are free again.
    uffd.add("w1", top.build_id, &s1);
    uffd.ok(&["handler-remove", "w1"]);

    // A VM that exits: the handler is finished; removal needs no force.
    let s2 = dir.path().join("v2.sock");
    uffd.add("v2", top.build_id, &s2);
    let mut vm = Vm::fork(&s2, &expected);
    vm.wait_status(PASS_DONE);
    vm.command(EXIT);
    let status = vm.reap();
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while uffd.info("v2")["state"] != "finished" {
        assert!(Instant::now() < deadline, "{}", uffd.info("v2"));
        std::thread::sleep(Duration::from_millis(10));
    }
    let finished = uffd.info("v2");
    assert_eq!(
        finished["dirty_pages"],
        (expected.len() / PS).div_ceil(3) as u64
    );
    let gone = uffd.fails(
        &[
            "handler-snapshot",
            "--dirty-from-handler",
            "v2",
            "--new-build",
            &unknown,
        ],
        409,
    );
    assert!(gone.contains("finished"), "{gone}");
    uffd.ok(&["handler-remove", "v2"]);

    // SIGTERM: a serving handler's VM is killed, a waiting handler's socket removed.
    let s3 = dir.path().join("v3.sock");
    let s4 = dir.path().join("w4.sock");
    uffd.add("v3", top.build_id, &s3);
    uffd.add("w4", top.build_id, &s4);
    let mut vm = Vm::fork(&s3, &expected);
    vm.wait_status(PASS_DONE);
    assert_eq!(uffd.info("v3")["state"], "serving");
    sigterm(&uffd.child);
    let status = uffd.child.wait().unwrap();
    assert!(status.success(), "thaw uffd after SIGTERM: {status}");
    assert!(killed_by_sigkill(vm.reap()), "the served VM was killed");
    assert!(!s4.exists(), "the waiting handler's socket is removed");
    assert!(!control.exists(), "the control socket is removed");
}

/// Without a memfd, a peer that went away cannot be read: the export fails with a clear error
/// and stores nothing (no header of the new build).
#[test]
fn a_memory_export_without_memfd_fails_clearly_once_the_peer_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), 2 * 1024 * 1024, 93);
    let top = manifest.top().unwrap();
    let expected = std::fs::read(&top.files["memfile"].flat).unwrap();
    let engine = Engine::new(
        Arc::clone(&store) as Arc<dyn Store>,
        EngineConfig::default(),
    )
    .unwrap();
    let socket = dir.path().join("uffd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut vm = Vm::fork(&socket, &expected);
    let options = UffdOptions {
        handshake_timeout: Duration::from_secs(20),
        handler: HandlerConfig {
            kill_peer_on_failure: false,
            ..HandlerConfig::default()
        },
        ..UffdOptions::default()
    };
    let server = serve_uffd(&engine, top.build_id, &listener, &options).unwrap();
    assert!(server.memfd().is_none());
    vm.wait_status(PASS_DONE);
    let opts = WriteOptions {
        codec: CompressionType::Lz4,
        level: 0,
        frame_size: 1024 * 1024,
        header_version: 4,
        workers: 2,
        progress: false,
    };
    // While it runs: exported from its address space.
    let live = uuid::Uuid::new_v4();
    server
        .export_memory(store.as_ref(), live, &opts, &DirtyPages::Handler)
        .unwrap();
    assert_same(
        &read_memfile(&store, live, expected.len()).unwrap(),
        &model_of(&expected),
        "the live export",
    );
    vm.command(EXIT);
    vm.reap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the handler never saw the peer go"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let dead = uuid::Uuid::new_v4();
    let err = server
        .export_memory(store.as_ref(), dead, &opts, &DirtyPages::Handler)
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("gone"), "{msg}");
    assert!(
        !dir.path()
            .join("store")
            .join(dead.to_string())
            .join("memfile.header")
            .exists()
    );
    assert!(read_memfile(&store, dead, expected.len()).is_err());
    drop(server.join());
}

/// `thaw uffd --control` SIGKILLed at several points of a memory snapshot (read from the peer's
/// address space): either the new build is complete and reads back exactly as the guest memory
/// was, or it cannot be read at all; the parent build is untouched; the same snapshot in a
/// fresh process (a fresh VM doing the same writes) succeeds.
#[test]
fn a_memory_snapshot_killed_at_any_point_leaves_no_wrong_build_and_the_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), 24 * 1024 * 1024, 94);
    let top = manifest.top().unwrap();
    let expected = std::fs::read(&top.files["memfile"].flat).unwrap();
    let size = expected.len();
    let model = model_of(&expected);
    let store_dir = dir.path().join("store");
    let mut outcomes = (0, 0);
    for (round, delay_ms) in [0u64, 5, 15, 40, 100, 250].into_iter().enumerate() {
        let new = uuid::Uuid::new_v4();
        let new_s = new.to_string();
        let socket = dir.path().join(format!("vm-{round}.sock"));
        let mut uffd = Uffd::start(&store_dir, &dir.path().join(format!("kill-{round}.sock")));
        uffd.add("vm", top.build_id, &socket);
        let vm = Vm::fork(&socket, &expected);
        vm.wait_status(PASS_DONE);
        let mut snap = Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args(["ctl", "--control", uffd.control.to_str().unwrap()])
            .args([
                "handler-snapshot",
                "--dirty-from-handler",
                "vm",
                "--new-build",
                &new_s,
            ])
            .args(["--codec", "zstd:3", "--frame-size", "1MiB"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        uffd.child.kill().unwrap();
        uffd.child.wait().unwrap();
        let _ = snap.wait();
        drop(vm);
        let header = store_dir.join(&new_s).join("memfile.header");
        if header.exists() {
            outcomes.1 += 1;
            assert_same(
                &read_memfile(&store, new, size).unwrap(),
                &model,
                &format!("round {round}: a complete build"),
            );
            inspect_verify(&store_dir, new);
        } else {
            outcomes.0 += 1;
            assert!(
                read_memfile(&store, new, size).is_err(),
                "round {round}: a build without a header was readable"
            );
        }
        assert_same(
            &read_memfile(&store, top.build_id, size).unwrap(),
            &expected,
            &format!("round {round}: the parent"),
        );

        // The retry, in a fresh process with a fresh VM doing the same writes.
        let socket = dir.path().join(format!("retry-{round}.sock"));
        let retry = Uffd::start(&store_dir, &dir.path().join(format!("retry-{round}.ctl")));
        retry.add("vm", top.build_id, &socket);
        let vm = Vm::fork(&socket, &expected);
        vm.wait_status(PASS_DONE);
        retry.ok(&[
            "handler-snapshot",
            "--dirty-from-handler",
            "vm",
            "--new-build",
            &new_s,
            "--codec",
            "zstd:3",
            "--frame-size",
            "1MiB",
        ]);
        drop(vm);
        drop(retry);
        assert_same(
            &read_memfile(&store, new, size).unwrap(),
            &model,
            &format!("round {round}: the retried snapshot"),
        );
        inspect_verify(&store_dir, new);
    }
    eprintln!(
        "killed before the header: {}, completed before the kill: {}",
        outcomes.0, outcomes.1
    );
}
