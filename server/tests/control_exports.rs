//! The runtime export set of `thaw serve --control` (server/src/control/exports.rs,
//! server/src/nbd/mod.rs): a server started with no export gets exports added over the control
//! API and read back exactly (nbdinfo, nbdcopy); an export removed while clients read it ends
//! their connections without a wrong byte while the other export keeps serving; an export holding
//! unsaved writes is only removed with force (which deletes its overlay file); a name is reused;
//! a prefetch warms the cache so the reads after it fetch nothing; every bad request gets a clear
//! error; kernel attach on this host (no nbd driver) fails cleanly (the guest test
//! ci/nbd-kernel-guest.sh attaches for real).
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "test images are a few MiB: offsets fit in usize"
)]

#[path = "common/nbd.rs"]
mod nbd_common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nbd_common::{Chain, NbdCmd, Raw, Serve, ctl, ctl_json, nbdcopy_to_vec, request_bytes, run};
use thaw_codec::nbd::consts::{SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC};

const SIZE: u64 = 8 * 1024 * 1024;

/// One request to the control socket: (status, JSON body).
fn api(control: &Path, method: &str, uri: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let (status, bytes) =
        thaw_server::control::call(control, method, uri, body.map(|b| b.as_bytes().to_vec()))
            .unwrap();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{method} {uri}: not JSON ({e}): {bytes:?}"));
    (status, v)
}

/// Asserts an error answer: the status, and a message containing `needle`.
fn api_err(control: &Path, method: &str, uri: &str, body: Option<&str>, status: u16, needle: &str) {
    let (got, v) = api(control, method, uri, body);
    let msg = v["error"].as_str().unwrap_or_default();
    assert_eq!(got, status, "{method} {uri} {body:?}: {v}");
    assert!(
        msg.contains(needle),
        "{method} {uri} {body:?}: {msg:?} lacks {needle:?}"
    );
}

fn listed(control: &Path) -> HashMap<String, serde_json::Value> {
    let (st, v) = api(control, "GET", "/v1/exports", None);
    assert_eq!(st, 200, "{v}");
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

/// The export names `nbdinfo --list` sees on the unix socket.
fn nbd_list(serve: &Serve) -> Vec<String> {
    let out = run(
        "nbdinfo",
        &[
            "--list",
            "--json",
            &format!("nbd+unix:///?socket={}", serve.sock.display()),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut names: Vec<String> = v["exports"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["export-name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The overlay files under the server's `--overlay-dir` for export `name`.
fn overlay_files(serve: &Serve, name: &str) -> Vec<PathBuf> {
    let dir = serve.dir.path().join("overlay");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    rd.map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("overlay-{name}-")))
        })
        .collect()
}

/// A `thaw serve --control` with no export; the control socket lives in `dir`.
fn start(chain: &Chain, dir: &Path, extra: &[&str]) -> (Serve, PathBuf) {
    let control = dir.join("control.sock");
    let control_s = control.display().to_string();
    let mut args = vec!["--control", control_s.as_str()];
    args.extend_from_slice(extra);
    let serve = Serve::start_with(&chain.store_url(), &[], &args);
    (serve, control)
}

fn add_body(name: &str, build: &str, read_only: bool) -> String {
    format!(r#"{{"name":"{name}","build":"{build}","read_only":{read_only}}}"#)
}

/// A few writes through a raw connection, mirrored in `model`.
fn write_some(sock: &Path, name: &str, model: &mut [u8]) {
    let mut c = Raw::connect(sock);
    c.go(name);
    for (cookie, off) in [(1u64, 4096u64), (2, 1_000_000), (3, SIZE - 8192)] {
        let data: Vec<u8> = (0..8192u32).map(|i| (i as u8) ^ (cookie as u8)).collect();
        c.request(NbdCmd::Write, cookie, off, 8192, &data);
        model[off as usize..off as usize + 8192].copy_from_slice(&data);
        assert_eq!(c.simple(0), (0, cookie, Vec::new()));
    }
    c.request(NbdCmd::Flush, 9, 0, 0, &[]);
    assert_eq!(c.simple(0).0, 0);
}

#[test]
fn exports_are_added_read_removed_and_re_added_at_runtime() {
    let chain = Chain::generate(2, SIZE, 61, 0.05, 1024 * 1024);
    let scratch = tempfile::tempdir().unwrap();
    let (serve, control) = start(&chain, scratch.path(), &[]);
    let (b0, b1, b2) = (
        chain.build(0).to_string(),
        chain.build(1).to_string(),
        chain.build(2).to_string(),
    );
    assert!(listed(&control).is_empty());
    assert!(nbd_list(&serve).is_empty());

    // Two exports: one read-only over the API, one writable through `thaw ctl add`.
    let (st, ro) = api(
        &control,
        "POST",
        "/v1/exports",
        Some(&add_body("ro", &b1, true)),
    );
    assert_eq!(st, 201, "{ro}");
    assert_eq!(ro["build"], b1);
    assert_eq!(ro["read_only"], true);
    assert_eq!(ro["size"], SIZE);
    let rw = ctl_json(&control, &["add", "rw", "--build", &b0]);
    assert_eq!(rw["read_only"], false);
    assert_eq!(rw["unsaved_changes"], false);
    assert_eq!(overlay_files(&serve, "rw").len(), 1);
    assert_eq!(nbd_list(&serve), ["ro", "rw"]);
    assert!(nbdcopy_to_vec(&serve.unix_uri("ro"), scratch.path(), &[]) == chain.flat(1));
    assert!(nbdcopy_to_vec(&serve.tcp_uri("rw"), scratch.path(), &[]) == chain.flat(0));

    // Writes make the export dirty: removing it is refused, and it keeps serving them.
    let mut model = chain.flat(0);
    write_some(&serve.sock, "rw", &mut model);
    assert_eq!(listed(&control)["rw"]["unsaved_changes"], true);
    api_err(
        &control,
        "DELETE",
        "/v1/exports/rw",
        None,
        409,
        "no snapshot stored",
    );
    let out = ctl(&control, &["remove", "rw"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("409"));
    assert!(nbdcopy_to_vec(&serve.unix_uri("rw"), scratch.path(), &[]) == model);

    // A snapshot stores them: the export is clean and goes without force.
    let new = uuid::Uuid::new_v4().to_string();
    let snap = ctl_json(&control, &["snapshot", "rw", "--new-build", &new]);
    assert_eq!(snap["already_stored"], false, "{snap}");
    assert_eq!(listed(&control)["rw"]["unsaved_changes"], false);
    let gone = ctl_json(&control, &["remove", "rw"]);
    assert_eq!(gone["discarded_changes"], false, "{gone}");
    assert_eq!(gone["overlay_deleted"], true, "{gone}");
    assert!(overlay_files(&serve, "rw").is_empty());
    assert_eq!(nbd_list(&serve), ["ro"]);
    let refused = Command::new("nbdinfo")
        .arg(serve.unix_uri("rw"))
        .output()
        .unwrap();
    assert!(!refused.status.success(), "nbdinfo of a removed export");

    // Re-added under the same name, from the snapshot: the writes are there.
    let again = ctl_json(&control, &["add", "rw", "--build", &new]);
    assert_eq!(again["build"], new);
    assert!(nbdcopy_to_vec(&serve.unix_uri("rw"), scratch.path(), &[]) == model);

    // Dirty again: force removes it anyway and deletes the overlay file.
    let mut model2 = model.clone();
    write_some(&serve.sock, "rw", &mut model2);
    let files = overlay_files(&serve, "rw");
    assert_eq!(files.len(), 1);
    let forced = ctl_json(&control, &["remove", "rw", "--force"]);
    assert_eq!(forced["discarded_changes"], true, "{forced}");
    assert_eq!(forced["overlay_deleted"], true, "{forced}");
    assert!(!files[0].exists(), "{} left behind", files[0].display());

    // Re-added from another build: its bytes, not the old ones.
    let (st, v) = api(
        &control,
        "POST",
        "/v1/exports",
        Some(&add_body("rw", &b2, false)),
    );
    assert_eq!(st, 201, "{v}");
    assert!(nbdcopy_to_vec(&serve.unix_uri("rw"), scratch.path(), &[]) == chain.flat(2));
    assert!(nbdcopy_to_vec(&serve.unix_uri("ro"), scratch.path(), &[]) == chain.flat(1));
    assert_eq!(listed(&control).len(), 2);
}

#[test]
fn bad_requests_get_clear_errors() {
    let chain = Chain::generate(0, SIZE, 71, 0.05, 1024 * 1024);
    let scratch = tempfile::tempdir().unwrap();
    let (mut serve, control) = start(&chain, scratch.path(), &[]);
    let b0 = chain.build(0).to_string();
    let (st, _) = api(
        &control,
        "POST",
        "/v1/exports",
        Some(&add_body("a", &b0, true)),
    );
    assert_eq!(st, 201);
    let post = |body: &str, status: u16, needle: &str| {
        api_err(&control, "POST", "/v1/exports", Some(body), status, needle);
    };
    post(&add_body("a", &b0, false), 409, "already served");
    let unknown = uuid::Uuid::new_v4().to_string();
    post(&add_body("b", &unknown, true), 404, "has no rootfs.ext4");
    post(
        &format!(r#"{{"name":"b","build":"{b0}","file":"memfile"}}"#),
        404,
        "has no memfile",
    );
    post(
        &format!(r#"{{"name":"b","build":"{b0}","file":"disk.img"}}"#),
        400,
        "expected rootfs.ext4 or memfile",
    );
    post(&add_body("", &b0, true), 400, "non-empty name");
    post(&add_body("b", "not-a-uuid", true), 400, "invalid JSON body");
    post(r#"{"name":"b"}"#, 400, "missing field `build`");
    post(
        &format!(r#"{{"name":"b","build":"{b0}","colour":"red"}}"#),
        400,
        "unknown field",
    );
    post("{", 400, "invalid JSON body");
    post(
        &format!(r#"{{"name":"b","build":"{b0}","attach":"/dev/sda"}}"#),
        400,
        "expected /dev/nbdN or auto",
    );
    post(
        &format!(r#"{{"name":"b","build":"{b0}","connections":2}}"#),
        400,
        "connections: only with attach",
    );
    post(
        &format!(r#"{{"name":"b","build":"{b0}","attach":"auto","connections":0}}"#),
        400,
        "connections 0: expected 1..=64",
    );
    post(
        &format!(r#"{{"name":"{}","build":"{b0}"}}"#, "n".repeat(5000)),
        400,
        "name",
    );
    api_err(
        &control,
        "DELETE",
        "/v1/exports/nope",
        None,
        404,
        "no export named \"nope\"",
    );
    api_err(
        &control,
        "DELETE",
        "/v1/exports/a?force=maybe",
        None,
        400,
        "force=true",
    );
    api_err(
        &control,
        "PUT",
        "/v1/exports",
        None,
        405,
        "PUT is not allowed",
    );
    api_err(
        &control,
        "GET",
        "/v1/exports/a/prefetch",
        None,
        405,
        "GET is not allowed",
    );
    api_err(
        &control,
        "POST",
        "/v1/exports/nope/prefetch",
        None,
        404,
        "no export named",
    );
    let prefetch = |body: &str, status: u16, needle: &str| {
        api_err(
            &control,
            "POST",
            "/v1/exports/a/prefetch",
            Some(body),
            status,
            needle,
        );
    };
    prefetch(
        &format!(r#"{{"offsets":[[0,{}]]}}"#, SIZE + 1),
        400,
        "ends past",
    );
    prefetch(r#"{"offsets":[[4096,0]]}"#, 400, "is empty");
    prefetch(
        r#"{"offsets":[[18446744073709551615,2]]}"#,
        400,
        "ends past",
    );
    prefetch(r#"{"offsets":[]}"#, 400, "empty");
    prefetch(r#"{"offsets":[[1,2,3]]}"#, 400, "invalid JSON body");
    prefetch("", 409, "give offsets");
    api_err(
        &control,
        "POST",
        "/v1/exports/a/nope",
        None,
        404,
        "no such resource",
    );
    // Nothing above changed the set or hurt the server.
    assert_eq!(listed(&control).len(), 1);
    serve.assert_alive();
    // Without --control, an export is still required.
    let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args([
            "serve",
            "--store",
            &chain.store_url(),
            "--listen",
            "tcp:127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to serve"));
}

/// Reads `name` over and over with `depth` requests in flight, checking every reply against
/// `flat`, until the server closes the connection. Returns the replies read. Panics on a wrong
/// byte, an error reply or a torn reply.
fn read_until_closed(sock: &Path, name: &str, flat: &[u8], depth: usize, count: &AtomicU64) {
    let mut c = Raw::connect(sock);
    c.go(name);
    let mut s: UnixStream = c.s;
    const LEN: u32 = 64 * 1024;
    let blocks = flat.len() as u64 / u64::from(LEN);
    let mut next = 0u64;
    let mut outstanding: HashMap<u64, u64> = HashMap::new();
    let mut cookie = 0u64;
    loop {
        while outstanding.len() < depth {
            cookie += 1;
            let off = (next % blocks) * u64::from(LEN);
            next += 7;
            if s.write_all(&request_bytes(0, NbdCmd::Read, cookie, off, LEN))
                .is_err()
            {
                break;
            }
            outstanding.insert(cookie, off);
        }
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        let mut got = 0;
        while got < h.len() {
            match s.read(&mut h[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("reading a reply: {e}"),
            }
        }
        if got == 0 {
            return; // closed between replies
        }
        assert_eq!(got, h.len(), "torn reply header");
        assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let ck = u64::from_be_bytes(h[8..16].try_into().unwrap());
        assert_eq!(err, 0, "error reply {err} to a READ");
        let off = outstanding.remove(&ck).expect("reply to an unknown cookie");
        let mut data = vec![0u8; LEN as usize];
        s.read_exact(&mut data).expect("torn READ payload");
        assert!(
            data[..] == flat[off as usize..off as usize + LEN as usize],
            "wrong bytes at {off}"
        );
        count.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn removing_an_export_under_readers_ends_them_cleanly() {
    let chain = Chain::generate(1, SIZE, 81, 0.05, 1024 * 1024);
    let scratch = tempfile::tempdir().unwrap();
    let (mut serve, control) = start(&chain, scratch.path(), &[]);
    let (b0, b1) = (chain.build(0).to_string(), chain.build(1).to_string());
    assert_eq!(
        api(
            &control,
            "POST",
            "/v1/exports",
            Some(&add_body("gone", &b1, false))
        )
        .0,
        201
    );
    assert_eq!(
        api(
            &control,
            "POST",
            "/v1/exports",
            Some(&add_body("kept", &b0, true))
        )
        .0,
        201
    );
    let flat1 = Arc::new(chain.flat(1));
    let flat0 = Arc::new(chain.flat(0));

    let counts: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let readers: Vec<_> = counts
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (sock, n) = (serve.sock.clone(), Arc::clone(n));
            let flat = Arc::clone(&flat1);
            std::thread::spawn(move || read_until_closed(&sock, "gone", &flat, 1 + i * 4, &n))
        })
        .collect();
    // nbdcopy too, one small request at a time: it completes with the right bytes or fails.
    let out = scratch.path().join("copy.raw");
    let mut copy = Command::new("nbdcopy")
        .args(["--connections=1", "--requests=1", "--request-size=4096"])
        .arg(serve.unix_uri("gone"))
        .arg(&out)
        .spawn()
        .expect("nbdcopy is required (ci/install.sh installs it)");
    // Every reader is going before the removal.
    let deadline = Instant::now() + Duration::from_secs(20);
    while counts.iter().any(|c| c.load(Ordering::Relaxed) < 20) {
        assert!(Instant::now() < deadline, "readers did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(listed(&control)["gone"]["connections"].as_u64().unwrap() >= 3);

    let (st, reply) = api(&control, "DELETE", "/v1/exports/gone", None);
    assert_eq!(st, 200, "{reply}");
    assert_eq!(reply["connections_left"], 0, "{reply}");
    assert!(
        reply["connections_closed"].as_u64().unwrap() >= 3,
        "{reply}"
    );
    for r in readers {
        r.join().expect("a reader got a wrong or torn reply");
    }
    let st = copy.wait().unwrap();
    if st.success() {
        assert!(
            std::fs::read(&out).unwrap() == *flat1,
            "nbdcopy completed with wrong bytes"
        );
    }
    // The other export never noticed; the removed one is gone for new clients.
    assert!(nbdcopy_to_vec(&serve.unix_uri("kept"), scratch.path(), &[]) == *flat0);
    assert_eq!(nbd_list(&serve), ["kept"]);
    let mut late = Raw::connect(&serve.sock);
    let replies = late.go_replies(thaw_codec::nbd::consts::OPT_GO, "gone", &[]);
    assert_eq!(
        replies.last().unwrap().0,
        thaw_codec::nbd::consts::REP_ERR_UNKNOWN,
        "GO of a removed export"
    );
    serve.assert_alive();
}

#[test]
fn prefetch_warms_the_cache_before_reads() {
    let chain = Chain::generate(1, SIZE, 91, 0.05, 1024 * 1024);
    let scratch = tempfile::tempdir().unwrap();
    let (serve, control) = start(&chain, scratch.path(), &["--metrics", "tcp:127.0.0.1:0"]);
    let b1 = chain.build(1).to_string();
    assert_eq!(
        api(
            &control,
            "POST",
            "/v1/exports",
            Some(&add_body("p", &b1, true))
        )
        .0,
        201
    );
    let requests =
        || Serve::metric(&serve.scrape(), "thaw_engine_store_requests_total").unwrap_or(0.0);
    let misses = || Serve::metric(&serve.scrape(), "thaw_engine_misses_total").unwrap_or(0.0);
    let before = requests();

    // Two ranges (overlapping units are queued once), through `thaw ctl`.
    let reply = ctl_json(
        &control,
        &["prefetch", "p", "--range", "0:5MiB", "--range", "4MiB:4MiB"],
    );
    assert_eq!(reply["source"], "offsets");
    assert_eq!(reply["block_size"], 2 << 20);
    assert_eq!(reply["blocks"], 4, "{reply}");
    assert_eq!(reply["bytes"], SIZE, "{reply}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = listed(&control)["p"]["prefetch"].clone();
        assert_eq!(p["failed"], 0, "{p}");
        if p["total"] == 4 && p["done"] == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "prefetch did not finish: {p}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let warmed = requests();
    assert!(
        warmed > before,
        "the prefetch fetched nothing ({before} -> {warmed})"
    );

    // Every byte is now cached: the reads fetch nothing more and miss nowhere.
    let misses_before = misses();
    let got = nbdcopy_to_vec(&serve.unix_uri("p"), scratch.path(), &[]);
    assert!(got == chain.flat(1), "bytes after prefetch differ");
    assert_eq!(
        requests(),
        warmed,
        "reads after a full prefetch went to the store"
    );
    assert_eq!(
        misses(),
        misses_before,
        "reads after a full prefetch missed"
    );
}

/// Kernel attach over the API on a host without the nbd driver (this one; ci/nbd-kernel-guest.sh
/// attaches for real in a guest): a 503 naming the missing driver, for `auto` and a named
/// device, over the API and through `thaw ctl add --attach`; nothing is left behind: the export
/// list, what NBD clients see and the overlay files are unchanged, and no fd leaked (netlink
/// socket, socketpairs, overlay).
#[test]
fn attach_without_an_nbd_driver_fails_cleanly() {
    if Path::new("/sys/module/nbd").exists() {
        eprintln!(
            "skipped: this kernel has the nbd driver (ci/nbd-kernel-guest.sh tests attach there)"
        );
        return;
    }
    let chain = Chain::generate(0, SIZE, 73, 0.05, 1024 * 1024);
    let scratch = tempfile::tempdir().unwrap();
    let (mut serve, control) = start(&chain, scratch.path(), &[]);
    let b0 = chain.build(0).to_string();
    let (st, v) = api(
        &control,
        "POST",
        "/v1/exports",
        Some(&add_body("a", &b0, false)),
    );
    assert_eq!(st, 201, "{v}");
    let before = listed(&control);
    assert_eq!(nbd_list(&serve), vec!["a".to_string()]);
    let fds = serve.fd_count();
    for body in [
        format!(r#"{{"name":"k","build":"{b0}","attach":"auto"}}"#),
        format!(r#"{{"name":"k","build":"{b0}","attach":"/dev/nbd3","connections":4}}"#),
        format!(r#"{{"name":"k","build":"{b0}","attach":"auto","read_only":true}}"#),
    ] {
        api_err(
            &control,
            "POST",
            "/v1/exports",
            Some(&body),
            503,
            "the kernel has no nbd driver loaded (generic netlink family \"nbd\" not found",
        );
    }
    let out = nbd_common::ctl(&control, &["add", "k", "--build", &b0, "--attach", "auto"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("answered 503") && err.contains("no nbd driver loaded"),
        "{err}"
    );
    assert_eq!(listed(&control), before);
    assert_eq!(nbd_list(&serve), vec!["a".to_string()]);
    assert!(overlay_files(&serve, "k").is_empty());
    assert_eq!(overlay_files(&serve, "a").len(), 1);
    serve.wait_fds(fds, "failed attaches");
    // The listener export still serves and is removed as before (no device to disconnect).
    let flat = chain.flat(0);
    assert_eq!(
        nbdcopy_to_vec(&serve.unix_uri("a"), scratch.path(), &[]),
        flat
    );
    let gone = ctl_json(&control, &["remove", "a"]);
    assert_eq!(gone["overlay_deleted"], true, "{gone}");
    assert!(gone.get("device").is_none(), "{gone}");
    serve.assert_alive();
}
