#![allow(clippy::tests_outside_test_module, reason = "integration test crate")]
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "test sizes are small; the tests run on 64-bit Linux"
)]
//! The panic hook: a panic in the fault thread SIGKILLs the peer (its own file: the hook is
//! process-wide).

mod common;

use std::os::unix::net::UnixListener;
use std::time::Duration;

use common::*;
use thaw_uffd::{ErrorKind, FaultHandler, HandlerConfig, HandshakeConfig, panic_hook};

#[test]
fn a_panicking_handler_kills_its_peer() {
    let source = TestSource::new(4, PAGE, |_| false, |_| false, FetchMode::PanicOnMissing);
    let mem = Mem::new((4 * PAGE) as usize, PAGE as usize, 0).unwrap();
    let (_dir, path) = socket_path();
    let listener = UnixListener::bind(&path).unwrap();
    let json = region_json(mem.addr(), 4 * PAGE, PAGE);
    let pid = fork_firecracker(&mem, 4 * PAGE, &path, &json, 0);
    let mut cfg = HandshakeConfig::new(4 * PAGE);
    cfg.timeout = Duration::from_secs(20);
    let hs = thaw_uffd::handshake::accept(&listener, &cfg).unwrap();
    let config = HandlerConfig {
        kill_peer_on_failure: true,
        ..HandlerConfig::default()
    };
    let handler = FaultHandler::spawn(hs, source, config).unwrap();
    let err = handler.join().expect_err("the fault thread panicked");
    assert_eq!(err.kind(), ErrorKind::Panicked);
    assert!(
        killed_by_sigkill(wait_child(pid)),
        "the panic hook did not kill the peer"
    );
    assert!(panic_hook::registered_peers().is_empty());
}
