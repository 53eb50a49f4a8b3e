#![allow(clippy::tests_outside_test_module, reason = "integration test crate")]
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "test sizes are small; the tests run on 64-bit Linux"
)]
//! The handshake against a fake Firecracker: good and bad messages, and no fd leaked on any path.
//! One test function on purpose: it counts this process's open fds, which parallel tests would
//! disturb.

mod common;

use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use common::*;
use thaw_uffd::{ErrorKind, HandshakeConfig, Result, handshake, ioctl};

const SIZE: u64 = 16 * PAGE;

/// What the fake Firecracker does.
enum Peer {
    /// Never connects.
    Absent,
    /// Connects and sends nothing (keeps the socket open).
    Silent,
    /// Connects and shuts the socket down without sending (empty reads).
    Closes,
    /// Connects and sends this JSON with the fds.
    Sends(String),
}

/// Runs one handshake against `peer`.
fn run(peer: Peer, fds: &[RawFd]) -> Result<handshake::Handshake> {
    let (_dir, path) = socket_path();
    let listener = UnixListener::bind(&path).unwrap();
    let client = match peer {
        Peer::Absent => None,
        Peer::Sends(json) => Some(fake_firecracker(&path, json, fds.to_vec())),
        Peer::Silent | Peer::Closes => {
            let path = path.clone();
            let close = matches!(peer, Peer::Closes);
            Some(std::thread::spawn(move || {
                let s = UnixStream::connect(path).unwrap();
                if close {
                    s.shutdown(Shutdown::Both).unwrap();
                }
                s
            }))
        }
    };
    let mut cfg = HandshakeConfig::new(SIZE);
    cfg.timeout = Duration::from_millis(300);
    cfg.kill_peer_on_error = false;
    let r = handshake::accept(&listener, &cfg);
    if let Some(c) = client {
        drop(c.join().unwrap());
    }
    r
}

fn a_uffd() -> OwnedFd {
    let fd = ioctl::create().unwrap();
    ioctl::api(fd.as_fd(), ioctl::FEATURE_EVENT_REMOVE).unwrap();
    fd
}

/// Runs `case` and checks this process has as many fds afterwards as before.
fn no_leak(name: &str, case: impl FnOnce()) {
    let before = open_fds();
    case();
    assert_eq!(open_fds(), before, "{name}: fds leaked");
}

fn expect_err(
    name: &str,
    json: Peer,
    fds: impl FnOnce() -> Vec<OwnedFd>,
    kind: ErrorKind,
    needle: &str,
) {
    no_leak(name, || {
        let fds = fds();
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let err = run(json, &raw).expect_err(name);
        assert_eq!(err.kind(), kind, "{name}: {err}");
        assert!(err.to_string().contains(needle), "{name}: {err}");
        assert!(!err.peer_killed());
        drop(fds);
    });
}

#[test]
fn handshake_cases_and_no_leaked_fds() {
    let good = region_json(0x7f00_0000_0000, SIZE, PAGE);

    no_leak("valid", || {
        let uffd = a_uffd();
        let hs = run(Peer::Sends(good.clone()), &[uffd.as_raw_fd()]).unwrap();
        assert_eq!(hs.regions.page_size(), PAGE);
        assert_eq!(hs.regions.total_size(), SIZE);
        assert_eq!(hs.peer.pid, std::process::id() as i32);
        assert!(hs.memfd.is_none());
    });

    no_leak("only page_size_kib, plus a memfd", || {
        let uffd = a_uffd();
        let memfd = tempfile::tempfile().unwrap();
        let json = format!(
            r#"[{{"base_host_virt_addr":{},"size":{SIZE},"offset":0,"page_size_kib":4096}}]"#,
            0x7f00_0000_0000u64
        );
        let hs = run(Peer::Sends(json), &[uffd.as_raw_fd(), memfd.as_raw_fd()]).unwrap();
        assert!(hs.memfd.is_some());
        assert_eq!(hs.regions.page_size(), PAGE);
    });

    expect_err(
        "malformed JSON",
        Peer::Sends("[{\"base_host".into()),
        || vec![a_uffd()],
        ErrorKind::Regions,
        "malformed JSON",
    );
    expect_err(
        "bad page size",
        Peer::Sends(region_json(0x7f00_0000_0000, SIZE, 8192)),
        || vec![a_uffd()],
        ErrorKind::Regions,
        "neither 4096 nor 2097152",
    );
    let overlapping = format!(
        "[{},{}]",
        region_json(0x10_0000, 8 * PAGE, PAGE).trim_matches(['[', ']']),
        region_json(0x10_4000, 8 * PAGE, PAGE)
            .trim_matches(['[', ']'])
            .replace("\"offset\":0", &format!("\"offset\":{}", 8 * PAGE))
    );
    expect_err(
        "overlapping regions",
        Peer::Sends(overlapping),
        || vec![a_uffd()],
        ErrorKind::Regions,
        "overlap in host memory",
    );
    expect_err(
        "regions short of the memory file",
        Peer::Sends(region_json(0x7f00_0000_0000, SIZE / 2, PAGE)),
        || vec![a_uffd()],
        ErrorKind::Regions,
        "cover",
    );
    expect_err(
        "no fd",
        Peer::Sends(good.clone()),
        Vec::new,
        ErrorKind::Handshake,
        "carried no userfaultfd",
    );
    expect_err(
        "three fds",
        Peer::Sends(good.clone()),
        || vec![a_uffd(), a_uffd(), a_uffd()],
        ErrorKind::Handshake,
        "3 fds",
    );
    expect_err(
        "not a userfaultfd",
        Peer::Sends(good.clone()),
        || vec![tempfile::tempfile().unwrap().into()],
        ErrorKind::Handshake,
        "not a userfaultfd",
    );
    expect_err(
        "connect and close",
        Peer::Closes,
        Vec::new,
        ErrorKind::Handshake,
        "sent no message before the deadline",
    );
    expect_err(
        "silent peer",
        Peer::Silent,
        Vec::new,
        ErrorKind::Timeout,
        "sent no message within",
    );
    no_leak("nobody connects", || {
        let err = run(Peer::Absent, &[]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    });
}
