//! `thaw serve` against real NBD clients (nbdinfo, nbdcopy, qemu-img, qemu-io from libnbd-bin and
//! qemu-utils; `ci/install.sh` installs them) and a raw-socket client for protocol edge cases
//! (catalogue H and T cases, docs/nbd-server.md). Every test runs the built `thaw` binary on a
//! unix socket and an ephemeral loopback TCP port, over a generated zstd chain whose flattened
//! images are the truth.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "test offsets and lengths are small (an 8 MiB device)"
)]

#[path = "common/nbd.rs"]
mod nbd_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nbd_common::{Chain, Raw, Serve, nbdcopy_to_vec, run};
use thaw_codec::nbd::consts::*;
use thaw_codec::nbd::reply::encode_option;
use thaw_codec::nbd::{Command as NbdCmd, Request};

const SIZE: u64 = 8 * 1024 * 1024 + 3 * 4096;

/// A 3-layer zstd chain with holes (nil mappings), generated once per test run.
fn fixture() -> &'static Chain {
    static F: OnceLock<Chain> = OnceLock::new();
    F.get_or_init(|| Chain::generate(2, SIZE, 7, 0.05, 2 * 1024 * 1024))
}

fn flat(layer: usize) -> Vec<u8> {
    fixture().flat(layer)
}

impl Serve {
    /// Serves every layer of the fixture as export `lN` (plus `extra` arguments).
    fn start(extra: &[&str]) -> Self {
        let f = fixture();
        Self::start_with(&f.store_url(), &f.exports(), extra)
    }
}

#[test]
fn nbdinfo_lists_every_export_with_its_flags() {
    let s = Serve::start(&["--read-only"]);
    let out = run("nbdinfo", &["--list", &s.unix_uri("")]);
    for i in 0..fixture().manifest.layers.len() {
        assert!(out.contains(&format!("export=\"l{i}\"")), "{out}");
    }
    assert!(out.contains("using structured packets"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");
    assert!(out.contains("is_read_only: true"), "{out}");
    assert!(!out.contains("is_read_only: false"), "{out}");
    assert!(out.contains(&format!("export-size: {SIZE}")), "{out}");
    let rw = Serve::start(&[]);
    let out = run("nbdinfo", &[&rw.tcp_uri("l0")]);
    for flag in [
        "is_read_only: false",
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_cache: true",
        "can_multi_conn: true",
    ] {
        assert!(out.contains(flag), "{flag} missing:\n{out}");
    }
}

#[test]
fn nbdcopy_every_layer_unix_and_tcp_is_byte_identical() {
    let s = Serve::start(&["--read-only"]);
    for layer in 0..fixture().manifest.layers.len() {
        let want = flat(layer);
        let name = format!("l{layer}");
        let got = nbdcopy_to_vec(&s.unix_uri(&name), s.dir.path(), &[]);
        assert!(got == want, "layer {layer} over unix differs");
        let got = nbdcopy_to_vec(
            &s.tcp_uri(&name),
            s.dir.path(),
            &["--connections=4", "--requests=32", "--request-size=65536"],
        );
        assert!(got == want, "layer {layer} over tcp differs");
    }
}

#[test]
fn qemu_img_compare_and_map() {
    let s = Serve::start(&["--read-only"]);
    let top = fixture().manifest.layers.len() - 1;
    let truth = &fixture().manifest.layers[top].files["rootfs.ext4"].flat;
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &truth.display().to_string(),
            &s.tcp_uri(&format!("l{top}")),
        ],
    );
    assert!(out.contains("identical"), "{out}");
    // Every extent the server calls a hole reads as zeros, and the map covers the device.
    let want = flat(top);
    let map = run("nbdinfo", &["--map", &s.unix_uri(&format!("l{top}"))]);
    let mut covered = 0u64;
    let mut holes = 0u64;
    for line in map.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, ty): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        assert_eq!(off, covered, "{map}");
        covered += len;
        if ty & 1 != 0 {
            holes += len;
            let r = &want[off as usize..(off + len) as usize];
            assert!(r.iter().all(|&b| b == 0), "hole at {off} is not zero");
        }
    }
    assert_eq!(covered, SIZE);
    assert!(
        holes > 0,
        "the chain has nil mappings: expected holes\n{map}"
    );
}

#[test]
fn qemu_io_writes_land_in_the_overlay_and_read_back() {
    let s = Serve::start(&[]);
    let uri = s.tcp_uri("l1");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4095 10000",
            "-c",
            "read -P 0xab 4095 10000",
            "-c",
            "write -z -u 65536 65536",
            "-c",
            "read -P 0 65536 65536",
            "-c",
            "write -P 0x11 100 1",
            "-c",
            "flush",
            "-c",
            "write -f -P 0x22 1048576 4096",
            &uri,
        ],
    );
    let mut want = flat(1);
    want[4095..4095 + 10000].fill(0xab);
    want[65536..131072].fill(0);
    want[100] = 0x11;
    want[1048576..1048576 + 4096].fill(0x22);
    let got = nbdcopy_to_vec(&s.unix_uri("l1"), s.dir.path(), &[]);
    assert!(got == want, "writes did not read back");
    // The zeroed range is reported as a hole, the written ranges as data.
    let map = run("nbdinfo", &["--map", &s.unix_uri("l1")]);
    assert!(
        map.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
            off <= 65536 && off + len >= 131072 && f[2] == "3"
        }),
        "zeroed range not a hole:\n{map}"
    );
    // Other exports are untouched (one overlay per export).
    let other = nbdcopy_to_vec(&s.unix_uri("l0"), s.dir.path(), &[]);
    assert!(other == flat(0));
}

#[test]
fn several_connections_at_once() {
    let s = Serve::start(&["--read-only"]);
    let want = flat(2);
    let uris: Vec<String> = (0..4)
        .map(|i| {
            if i % 2 == 0 {
                s.unix_uri("l2")
            } else {
                s.tcp_uri("l2")
            }
        })
        .collect();
    let dir = s.dir.path().to_path_buf();
    let handles: Vec<_> = uris
        .into_iter()
        .map(|u| {
            let d = dir.clone();
            std::thread::spawn(move || nbdcopy_to_vec(&u, &d, &["--connections=2"]))
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap() == want);
    }
}

#[test]
fn raw_handshake_violations_close_and_unknown_options_are_skipped() {
    let s = Serve::start(&["--read-only"]);
    // H2: wrong option magic: closed.
    let mut c = Raw::connect(&s.sock);
    let mut bad = Vec::new();
    encode_option(&mut bad, OPT_GO, &[]).unwrap();
    bad[0] ^= 0xff;
    c.s.write_all(&bad).unwrap();
    assert!(c.closed(), "H2: bad option magic must close");
    // H3: option length far above the cap: closed before anything is read.
    let mut c = Raw::connect(&s.sock);
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&0xffff_ffffu32.to_be_bytes());
    c.s.write_all(&h).unwrap();
    assert!(c.closed(), "H3: oversized option must close");
    // H1: unknown client flag: closed.
    let mut raw = UnixStream::connect(&s.sock).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    raw.read_exact(&mut g).unwrap();
    raw.write_all(&(CLIENT_FIXED_NEWSTYLE | 0x100).to_be_bytes())
        .unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(raw.read(&mut b), Ok(0) | Err(_)), "H1");
    // H5: unknown option 42 with 100 bytes: ERR_UNSUP, payload skipped, next option fine.
    let mut c = Raw::connect(&s.sock);
    c.option(42, &[0x55; 100]);
    let (opt, ty, _) = c.reply();
    assert_eq!((opt, ty), (42, REP_ERR_UNSUP));
    // H7: GO for an unknown export: ERR_UNKNOWN, then a valid GO works.
    let mut d = Vec::new();
    d.extend_from_slice(&4u32.to_be_bytes());
    d.extend_from_slice(b"nope");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(OPT_GO, &d);
    let (_, ty, _) = c.reply();
    assert_eq!(ty, REP_ERR_UNKNOWN);
    let (size, flags) = c.go("l1");
    assert_eq!(size, SIZE);
    assert!(flags & TFLAG_READ_ONLY != 0);
    // And the connection serves.
    c.request(NbdCmd::Read, 9, 4096, 4096, &[]);
    let (err, cookie, data) = c.simple(4096);
    assert_eq!((err, cookie), (0, 9));
    assert!(data == flat(1)[4096..8192]);
}

#[test]
fn raw_transmission_errors_keep_the_stream_in_sync() {
    let s = Serve::start(&["--read-only"]);
    let mut c = Raw::connect(&s.sock);
    c.go("l2");
    let want = flat(2);
    // T4: read past the end, and offset + length overflowing: EINVAL.
    c.request(NbdCmd::Read, 1, SIZE - 4096, 8192, &[]);
    assert_eq!(c.simple(0).0, NBD_EINVAL);
    c.request(NbdCmd::Read, 2, u64::MAX - 10, 4096, &[]);
    assert_eq!(c.simple(0).0, NBD_EINVAL);
    // T8: write on a read-only export: EPERM, and the payload is skipped.
    let payload = vec![0x5a; 65536];
    c.request(NbdCmd::Write, 3, 0, 65536, &payload);
    let (err, cookie, _) = c.simple(0);
    assert_eq!((err, cookie), (NBD_EPERM, 3));
    // T2: unknown command: EINVAL.
    c.request(NbdCmd::Unknown(77), 4, 0, 0, &[]);
    assert_eq!(c.simple(0).0, NBD_EINVAL);
    // Still in sync: unaligned reads return the right bytes.
    c.request(NbdCmd::Read, 5, 12345, 777, &[]);
    let (err, cookie, data) = c.simple(777);
    assert_eq!((err, cookie), (0, 5));
    assert!(data == want[12345..12345 + 777]);
    // T15: pipelined requests, all answered (in any order), cookies echoed.
    for i in 0..200u64 {
        c.request(NbdCmd::Read, 1000 + i, i * 4096 % (SIZE - 4096), 4096, &[]);
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let (err, cookie, data) = c.simple(4096);
        assert_eq!(err, 0);
        let i = cookie - 1000;
        let off = (i * 4096 % (SIZE - 4096)) as usize;
        assert!(data == want[off..off + 4096], "cookie {cookie}");
        assert!(seen.insert(cookie));
    }
    // T1: bad request magic: closed.
    c.s.write_all(&[0u8; 28]).unwrap();
    assert!(c.closed(), "T1: bad request magic must close");
}

#[test]
fn handshake_deadline_closes_silent_clients() {
    let s = Serve::start(&["--read-only", "--handshake-timeout", "300ms"]);
    let mut c = Raw::connect(&s.sock);
    let t = Instant::now();
    assert!(c.closed(), "H14: silent client must be closed");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn sigterm_drains_and_refuses_new_options() {
    let mut s = Serve::start(&[]);
    // A client in transmission with a write acknowledged, one in the handshake.
    let mut t = Raw::connect(&s.sock);
    t.go("l0");
    t.request(NbdCmd::Write, 1, 0, 4096, &[7u8; 4096]);
    assert_eq!(t.simple(0).0, 0);
    let mut h = Raw::connect(&s.sock);
    s.sigterm();
    std::thread::sleep(Duration::from_millis(200));
    // D3: the handshake client's next option gets ERR_SHUTDOWN.
    h.option(OPT_LIST, &[]);
    let (_, ty, _) = h.reply();
    assert_eq!(ty, REP_ERR_SHUTDOWN);
    // The transmission client is disconnected after its in-flight work.
    assert!(t.closed());
    drop(h);
    let st = s.wait_exit(Duration::from_secs(10));
    assert!(st.success(), "{st}");
    assert!(!s.sock.exists(), "socket file left behind");
}

#[test]
fn thaw_demo_builds_and_serves_the_layered_ext4_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["demo", "--dir"])
        .arg(dir.path())
        .args(["--size", "16MiB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut tcp = String::new();
    for line in BufReader::new(out).lines() {
        let line = line.unwrap();
        if let Some(i) = line.find("nbd://") {
            tcp = line[i..].to_string();
        }
        if line == "ready" {
            break;
        }
    }
    assert!(tcp.ends_with("/demo") || tcp.ends_with("/base"), "{tcp}");
    let uri = format!(
        "nbd+unix:///demo?socket={}",
        dir.path().join("nbd.sock").display()
    );
    let got = nbdcopy_to_vec(&uri, dir.path(), &[]);
    let want = std::fs::read(dir.path().join("top.ext4")).unwrap();
    assert!(got == want, "demo export differs from top.ext4");
    let base = std::fs::read(dir.path().join("base.ext4")).unwrap();
    assert!(got != base, "the diff layer changed nothing");
    let st = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("thaw demo did not exit on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn libnbd_structured_replies_block_status_and_writes() {
    // server/tests/nbd/libnbd_checks.py: OFFSET_HOLE chunks for nil mappings tiling each read,
    // DF = one chunk, BLOCK_STATUS tiling + REQ_ONE, CACHE, FAST_ZERO, FUA, trim, flush, and
    // server-side EINVAL/ENOSPC with libnbd's strict mode off.
    let s = Serve::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nbd/libnbd_checks.py");
    let top = fixture().manifest.layers.len() - 1;
    let truth = &fixture().manifest.layers[top].files["rootfs.ext4"].flat;
    for uri in [s.unix_uri(&format!("l{top}")), s.tcp_uri("l0")] {
        let flat_path = if uri.contains("/l0") {
            fixture().manifest.layers[0].files["rootfs.ext4"]
                .flat
                .clone()
        } else {
            truth.clone()
        };
        let out = run(
            "/usr/bin/python3",
            &[script, &uri, &flat_path.display().to_string()],
        );
        assert_eq!(out.trim(), "OK", "{out}");
    }
}

#[test]
fn prometheus_metrics_count_requests_errors_and_latency() {
    let s = Serve::start(&["--read-only", "--metrics", "tcp:127.0.0.1:0"]);
    let addr = s.metrics.clone().expect("no metrics address printed");
    nbdcopy_to_vec(&s.unix_uri("l1"), s.dir.path(), &[]);
    let mut c = Raw::connect(&s.sock);
    c.go("l1");
    c.request(NbdCmd::Write, 5, 0, 512, &[1u8; 512]);
    assert_eq!(c.simple(0).0, NBD_EPERM);
    c.request(NbdCmd::Disc, 0, 0, 0, &[]);
    assert!(c.closed());
    let mut http = std::net::TcpStream::connect(&addr).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    http.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    let value = |prefix: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{prefix} missing:\n{body}"))
    };
    // nbdcopy reads the whole device (plus whatever it asks besides).
    assert!(value("thaw_nbd_requests_total{cmd=\"read\"}") >= 1.0);
    assert!(value("thaw_nbd_read_bytes_total") >= SIZE as f64);
    assert!(value("thaw_nbd_request_errors_total{cmd=\"write\",errno=\"eperm\"}") >= 1.0);
    assert!(value("thaw_nbd_request_duration_seconds_count{cmd=\"read\"}") >= 1.0);
    assert!(value("thaw_nbd_connections_total") >= 2.0);
    assert!(body.contains("thaw_engine_store_requests_total"), "{body}");
}

#[test]
fn a_client_that_never_reads_replies_is_throttled() {
    let s = Serve::start(&["--read-only", "--max-inflight", "4MiB"]);
    let mut c = Raw::connect(&s.sock);
    c.go("l0");
    c.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // 200k rejected requests (5.6 MB) without reading a single reply: the server must stop
    // reading once its in-flight budget is used up, so our writes stall.
    let req = Request {
        flags: 0,
        command: NbdCmd::Unknown(77),
        cookie: 1,
        offset: 0,
        length: 0,
    }
    .to_bytes();
    let burst: Vec<u8> = req.iter().copied().cycle().take(28 * 1000).collect();
    let mut stalled = false;
    for _ in 0..200 {
        if c.s.write_all(&burst).is_err() {
            stalled = true;
            break;
        }
    }
    assert!(
        stalled,
        "the server buffered 200k replies for a client that reads none"
    );
    // Other clients are unaffected.
    let mut d = Raw::connect(&s.sock);
    d.go("l0");
    d.request(NbdCmd::Read, 3, 0, 4096, &[]);
    let (err, cookie, data) = d.simple(4096);
    assert_eq!((err, cookie), (0, 3));
    assert!(data == flat(0)[..4096]);
}

#[test]
fn a_listener_that_cannot_bind_fails_the_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(["serve", "--store"])
        .arg(&fixture().store)
        .args([
            "--build",
            &fixture().manifest.layers[0].build_id.to_string(),
        ])
        .args(["--listen", "tcp:127.0.0.1:0"])
        .args(["--listen", "unix:/nonexistent-dir/x/nbd.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("binding unix:/nonexistent-dir/x/nbd.sock"),
        "{err}"
    );
}

#[test]
fn connections_over_the_limit_are_closed_at_once() {
    let s = Serve::start(&["--read-only", "--max-connections", "2"]);
    let mut a = Raw::connect(&s.sock);
    a.go("l0");
    let _b = Raw::connect(&s.sock);
    // The third gets EOF instead of a greeting.
    let mut c = UnixStream::connect(&s.sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    assert!(
        c.read_exact(&mut g).is_err(),
        "a third connection was served"
    );
    // Once one closes, a new one is accepted.
    a.request(NbdCmd::Disc, 0, 0, 0, &[]);
    assert!(a.closed());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut d = UnixStream::connect(&s.sock).unwrap();
        d.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if d.read_exact(&mut g).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection accepted after one closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
