#![allow(clippy::tests_outside_test_module, reason = "integration test crate")]
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "test sizes are small; the tests run on 64-bit Linux"
)]
//! Failing closed against a real peer process: a forked child plays Firecracker (creates the
//! userfaultfd, registers its memory, sends the handshake, touches a page), so that the handler's
//! SIGKILL is observable with waitpid.

mod common;

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use thaw_uffd::{ErrorKind, Exit, FaultHandler, HandlerConfig, HandshakeConfig};

struct Child {
    pid: i32,
    handler: FaultHandler<TestSource>,
    _mem: Mem,
    _dir: tempfile::TempDir,
}

/// Forks a child that registers `reg_pages` pages but describes only `json_pages` of them to the
/// handler, then touches `touch_page`; returns it with a running handler over `source`.
fn child_vm(source: Arc<TestSource>, reg_pages: u64, json_pages: u64, touch_page: u64) -> Child {
    let mem = Mem::new((reg_pages * PAGE) as usize, PAGE as usize, 0).unwrap();
    let (dir, path) = socket_path();
    let listener = UnixListener::bind(&path).unwrap();
    let json = region_json(mem.addr(), json_pages * PAGE, PAGE);
    let pid = fork_firecracker(
        &mem,
        reg_pages * PAGE,
        &path,
        &json,
        (touch_page * PAGE) as usize,
    );
    let mut cfg = HandshakeConfig::new(json_pages * PAGE);
    cfg.timeout = Duration::from_secs(20);
    let hs = thaw_uffd::handshake::accept(&listener, &cfg).expect("handshake with the child");
    assert_eq!(hs.peer.pid, pid, "SO_PEERCRED names the child");
    let config = HandlerConfig {
        fetch_attempts: 2,
        fetch_backoff: Duration::from_millis(1),
        kill_peer_on_failure: true,
        ..HandlerConfig::default()
    };
    let handler = FaultHandler::spawn(hs, source, config).unwrap();
    Child {
        pid,
        handler,
        _mem: mem,
        _dir: dir,
    }
}

#[test]
fn a_failing_source_kills_the_peer_and_names_the_page() {
    let source = TestSource::new(4, PAGE, |_| false, |_| false, FetchMode::Fail(u32::MAX));
    let child = child_vm(Arc::clone(&source), 4, 4, 2);
    let err = child
        .handler
        .join()
        .expect_err("the handler must fail closed");
    assert_eq!(err.kind(), ErrorKind::Source, "{err}");
    assert!(err.peer_killed());
    let text = err.to_string();
    assert!(text.contains("file offset 0x2000"), "{text}");
    assert!(text.contains("after 2 attempt(s)"), "{text}");
    assert!(text.contains("injected failure 2"), "{text}");
    assert!(
        killed_by_sigkill(wait_child(child.pid)),
        "the peer was not SIGKILLed"
    );
    // Retried within the budget, and never installed anything.
    assert_eq!(source.fetch_count(2), 2);
}

#[test]
fn a_fault_outside_every_region_kills_the_peer() {
    // The child registers 8 pages but the JSON (and memory file) describe only 4.
    let source = TestSource::new(4, PAGE, |_| true, |_| false, FetchMode::Immediate);
    let child = child_vm(source, 8, 4, 6);
    let err = child
        .handler
        .join()
        .expect_err("the handler must fail closed");
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert!(err.peer_killed());
    assert!(
        err.to_string().contains("outside every region; mapping ["),
        "{err}"
    );
    assert!(killed_by_sigkill(wait_child(child.pid)));
}

#[test]
fn a_served_peer_runs_to_completion() {
    // Control for the two tests above: the same child, served, exits 0 by itself.
    let source = TestSource::new(4, PAGE, |_| false, |_| false, FetchMode::Immediate);
    let child = child_vm(source, 4, 4, 3);
    let status = wait_child(child.pid);
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0);
    // The child exited: its end of the socket closed, so the handler ends quietly.
    assert_eq!(child.handler.join().unwrap(), Exit::PeerGone);
}

#[test]
fn a_peer_that_dies_mid_fault_ends_the_handler_quietly() {
    // The fetch never completes; the peer is killed from outside while its fault is pending.
    let source = TestSource::new(4, PAGE, |_| false, |_| false, FetchMode::Gated);
    let child = child_vm(Arc::clone(&source), 4, 4, 1);
    while source.fetch_count(1) == 0 {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(thaw_uffd::kill_peer(child.pid));
    assert!(killed_by_sigkill(wait_child(child.pid)));
    assert_eq!(child.handler.join().unwrap(), Exit::PeerGone);
    // The late completion finds the address space gone (ESRCH) and does nothing harmful.
    source.open_gate();
}
