//! The control API of `thaw serve --control` and `thaw ctl` (server/src/control.rs): a writable
//! export written through NBD is snapshotted into a new layer, which a fresh `thaw serve` reads
//! back exactly as the client saw it (nbdcopy); repeated requests are idempotent; `close`
//! refuses later writes with ESHUTDOWN; bad requests get clear errors; `thaw inspect --verify`
//! passes on every snapshot.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "test images are a few MiB: offsets fit in usize"
)]

#[path = "common/gcs.rs"]
mod gcs_common;
#[path = "common/nbd.rs"]
mod nbd_common;

use std::path::Path;
use std::process::Command;

use nbd_common::{Chain, NbdCmd, Raw, Serve, ctl, ctl_json, nbdcopy_to_vec};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thaw_codec::BuildId;

const SIZE: u64 = 8 * 1024 * 1024;

/// Random writes, zero writes and trims through a raw NBD connection, mirrored in `model`.
fn write_session(sock: &Path, name: &str, model: &mut [u8], rng: &mut SmallRng) {
    let mut c = Raw::connect(sock);
    c.go(name);
    for cookie in 0..40u64 {
        let off = rng.random_range(0..SIZE - 70_000);
        let len = rng.random_range(1..65_536u32);
        match cookie % 5 {
            0..=2 => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data[..]);
                c.request(NbdCmd::Write, cookie, off, len, &data);
                model[off as usize..off as usize + len as usize].copy_from_slice(&data);
            }
            3 => {
                c.request(NbdCmd::WriteZeroes, cookie, off, len, &[]);
                model[off as usize..off as usize + len as usize].fill(0);
            }
            _ => {
                // TRIM may discard: the spec lets reads return anything there afterwards, and
                // thaw's reads return zeros, so the model says zeros. Whole blocks only.
                let off = off / 4096 * 4096;
                let len = len.div_ceil(4096) * 4096;
                c.request(NbdCmd::Trim, cookie, off, len, &[]);
                model[off as usize..off as usize + len as usize].fill(0);
            }
        }
        let (err, got, _) = c.simple(0);
        assert_eq!((err, got), (0, cookie));
    }
    c.request(NbdCmd::Flush, 999, 0, 0, &[]);
    assert_eq!(c.simple(0).0, 0);
}

fn read_build(chain: &Chain, build: BuildId, dir: &Path) -> Vec<u8> {
    let serve = Serve::start_with(
        &chain.store_url(),
        &[("x".to_string(), build)],
        &["--read-only"],
    );
    nbdcopy_to_vec(&serve.unix_uri("x"), dir, &[])
}

fn inspect_verify(chain: &Chain, build: BuildId) {
    let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args([
            "inspect",
            "--store",
            &chain.store_url(),
            "--build",
            &build.to_string(),
            "--verify",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "thaw inspect --verify {build}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn snapshots_through_the_control_api_read_back_exactly() {
    let chain = Chain::generate(1, SIZE, 31, 0.05, 1024 * 1024);
    let scratch = tempfile::tempdir().unwrap();
    let mut model = chain.flat(1);
    let mut build = chain.build(1);
    let mut rng = SmallRng::seed_from_u64(32);
    for (cycle, codec) in ["zstd:1", "lz4", "none", "zstd:3"].into_iter().enumerate() {
        let control = scratch.path().join(format!("control-{cycle}.sock"));
        let control_s = control.display().to_string();
        let serve = Serve::start_with(
            &chain.store_url(),
            &[("disk".to_string(), build)],
            &["--control", &control_s],
        );
        write_session(&serve.sock, "disk", &mut model, &mut rng);

        let listed = ctl_json(&control, &["exports"]);
        let disk = &listed[0];
        assert_eq!(disk["name"], "disk");
        assert_eq!(disk["build"], build.to_string());
        assert_eq!(disk["state"], "serving");
        assert!(disk["dirty_blocks"].as_u64().unwrap() > 0, "{listed}");

        let new = uuid::Uuid::new_v4();
        let new_s = new.to_string();
        let args = [
            "snapshot",
            "disk",
            "--new-build",
            &new_s,
            "--codec",
            codec,
            "--frame-size",
            "1MiB",
        ];
        let reply = ctl_json(&control, &args);
        assert_eq!(reply["build"], new_s);
        assert_eq!(reply["parent"], build.to_string());
        assert_eq!(reply["already_stored"], false);
        assert_eq!(
            reply["diff_bytes"].as_u64().unwrap(),
            disk["dirty_blocks"].as_u64().unwrap() * 4096,
            "{reply}"
        );
        // The same request again: idempotent, nothing rewritten.
        let again = ctl_json(&control, &args);
        assert_eq!(again["already_stored"], true, "{again}");
        assert_eq!(again["mappings"], reply["mappings"]);

        let got = read_build(&chain, new, scratch.path());
        assert!(
            got == model,
            "cycle {cycle} ({codec}): the snapshot differs from what the client saw"
        );
        inspect_verify(&chain, new);
        build = new;
    }
}

#[test]
fn close_refuses_later_writes_and_bad_requests_are_explained() {
    let chain = Chain::generate(1, SIZE, 41, 0.05, 1024 * 1024);
    let scratch = tempfile::tempdir().unwrap();
    let control = scratch.path().join("control.sock");
    let control_s = control.display().to_string();
    let serve = Serve::start_with(
        &chain.store_url(),
        &[
            ("rw".to_string(), chain.build(1)),
            ("base".to_string(), chain.build(0)),
        ],
        &["--control", &control_s],
    );
    let mut model = chain.flat(1);
    let mut rng = SmallRng::seed_from_u64(42);
    write_session(&serve.sock, "rw", &mut model, &mut rng);

    // A second server on the same control socket is refused while the first answers.
    let taken = Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args([
            "serve",
            "--store",
            &chain.store_url(),
            "--build",
            &chain.build(1).to_string(),
        ])
        .args([
            "--listen",
            &format!("unix:{}", scratch.path().join("other.sock").display()),
        ])
        .args(["--control", &control_s])
        .output()
        .unwrap();
    assert!(!taken.status.success());
    assert!(String::from_utf8_lossy(&taken.stderr).contains("another process answers on it"));

    let new = uuid::Uuid::new_v4().to_string();
    let unknown = ctl(&control, &["snapshot", "nope", "--new-build", &new]);
    assert!(!unknown.status.success());
    let msg = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        msg.contains("404") && msg.contains("no export named \"nope\""),
        "{msg}"
    );
    let bad_codec = ctl(
        &control,
        &["snapshot", "rw", "--new-build", &new, "--codec", "brotli"],
    );
    assert!(
        String::from_utf8_lossy(&bad_codec.stderr).contains("400"),
        "{bad_codec:?}"
    );
    // Reusing a build id of the chain for other contents is refused.
    let reused = ctl(
        &control,
        &["snapshot", "rw", "--new-build", &chain.build(0).to_string()],
    );
    assert!(!reused.status.success());

    let reply = ctl_json(
        &control,
        &[
            "snapshot",
            "rw",
            "--new-build",
            &new,
            "--after",
            "close",
            "--writes",
            "refuse",
        ],
    );
    assert_eq!(reply["already_stored"], false);
    let listed = ctl_json(&control, &["exports"]);
    let rw = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "rw")
        .unwrap();
    assert_eq!(rw["state"], "closed", "{listed}");

    // Writes are refused with ESHUTDOWN (108) now; reads still work.
    let mut c = Raw::connect(&serve.sock);
    c.go("rw");
    c.request(NbdCmd::Write, 1, 0, 4096, &[7u8; 4096]);
    assert_eq!(c.simple(0).0, 108);
    c.request(NbdCmd::Read, 2, 0, 4096, &[]);
    let (err, _, data) = c.simple(4096);
    assert_eq!(err, 0);
    assert!(data == model[..4096]);

    let got = read_build(&chain, new.parse().unwrap(), scratch.path());
    assert!(
        got == model,
        "the closed snapshot differs from what the client saw"
    );

    // An export nobody wrote to: an empty diff, the new build reads as its parent.
    let empty = uuid::Uuid::new_v4();
    let reply = ctl_json(
        &control,
        &["snapshot", "base", "--new-build", &empty.to_string()],
    );
    assert_eq!(reply["diff_bytes"], 0, "{reply}");
    assert!(read_build(&chain, empty, scratch.path()) == chain.flat(0));
    drop(serve);

    // A read-only server has nothing to snapshot: 409 with the reason.
    let control_ro = scratch.path().join("control-ro.sock");
    let _ro = Serve::start_with(
        &chain.store_url(),
        &[("ro".to_string(), chain.build(1))],
        &[
            "--read-only",
            "--control",
            &control_ro.display().to_string(),
        ],
    );
    let out = ctl(
        &control_ro,
        &[
            "snapshot",
            "ro",
            "--new-build",
            &uuid::Uuid::new_v4().to_string(),
        ],
    );
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && msg.contains("409") && msg.contains("read-only"),
        "{msg}"
    );
}

/// Large writes: most of the device, so that the snapshot takes long enough to be cut.
fn write_bulk(sock: &Path, name: &str, model: &mut [u8], seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut c = Raw::connect(sock);
    c.go(name);
    let chunk = 1u32 << 20;
    for (i, off) in (0..model.len() as u64).step_by(chunk as usize).enumerate() {
        if i % 4 == 3 {
            continue; // leave some blocks to the parent
        }
        let mut data = vec![0u8; chunk as usize];
        rng.fill(&mut data[..]);
        c.request(NbdCmd::Write, i as u64, off, chunk, &data);
        model[off as usize..off as usize + chunk as usize].copy_from_slice(&data);
        assert_eq!(c.simple(0).0, 0);
    }
}

#[test]
fn a_snapshot_killed_at_any_point_leaves_no_wrong_build_and_the_next_one_succeeds() {
    let size = 24 * 1024 * 1024;
    let chain = Chain::generate(1, size, 51, 0.05, 1024 * 1024);
    let scratch = tempfile::tempdir().unwrap();
    let mut outcomes = (0, 0);
    for (round, delay_ms) in [0u64, 3, 10, 25, 60, 150].into_iter().enumerate() {
        let new = uuid::Uuid::new_v4();
        let new_s = new.to_string();
        let control = scratch.path().join(format!("kill-{round}.sock"));
        let control_s = control.display().to_string();
        let mut model = chain.flat(1);
        let mut serve = Serve::start_with(
            &chain.store_url(),
            &[("disk".to_string(), chain.build(1))],
            &["--control", &control_s, "--workers", "1"],
        );
        write_bulk(&serve.sock, "disk", &mut model, round as u64);
        let mut snap = Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args([
                "ctl",
                "--control",
                &control_s,
                "snapshot",
                "disk",
                "--new-build",
                &new_s,
            ])
            .args(["--codec", "zstd:3", "--frame-size", "1MiB"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        serve.child.kill().unwrap();
        serve.child.wait().unwrap();
        let _ = snap.wait();
        let header = chain.store.join(&new_s).join("rootfs.ext4.header");
        if header.exists() {
            // Completed before the kill: it must be exactly right.
            outcomes.1 += 1;
            assert!(
                read_build(&chain, new, scratch.path()) == model,
                "round {round}: a complete but wrong build"
            );
            inspect_verify(&chain, new);
        } else {
            outcomes.0 += 1;
            // Whatever else is there (a data object, temporary files) opens nothing.
            let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
                .args([
                    "read",
                    "--store",
                    &chain.store_url(),
                    "--build",
                    &new_s,
                    "--length",
                    "4096",
                    "-o",
                    "-",
                ])
                .output()
                .unwrap();
            assert!(
                !out.status.success(),
                "round {round}: a build without a header was readable"
            );
        }
        // The parent is untouched, and the next snapshot under the same id succeeds.
        assert!(read_build(&chain, chain.build(1), scratch.path()) == chain.flat(1));
        let control2 = scratch.path().join(format!("retry-{round}.sock"));
        let control2_s = control2.display().to_string();
        let serve2 = Serve::start_with(
            &chain.store_url(),
            &[("disk".to_string(), chain.build(1))],
            &["--control", &control2_s],
        );
        let mut again = chain.flat(1);
        write_bulk(&serve2.sock, "disk", &mut again, round as u64);
        assert!(again == model);
        ctl_json(
            &control2,
            &[
                "snapshot",
                "disk",
                "--new-build",
                &new_s,
                "--codec",
                "zstd:3",
                "--frame-size",
                "1MiB",
            ],
        );
        drop(serve2);
        assert!(
            read_build(&chain, new, scratch.path()) == model,
            "round {round}: the retried snapshot"
        );
        inspect_verify(&chain, new);
    }
    eprintln!(
        "killed before the header: {}, completed before the kill: {}",
        outcomes.0, outcomes.1
    );
}

/// The same round trip with the build and its snapshots in fake-gcs-server: `thaw serve --store
/// gs://…` writes through NBD, snapshots go to the same bucket (data object, then header), and a
/// fresh server reads each new build from the emulator exactly as the client saw it, for zstd
/// and LZ4, two successive pause/resume cycles.
#[test]
fn snapshots_round_trip_through_fake_gcs() {
    let Some(gcs) = gcs_common::FakeGcs::with_bucket("snap") else {
        return;
    };
    let url = format!("gs://snap/builds?endpoint={}", gcs.endpoint());
    let gs = thaw_server::store::open_store(&url).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let spec = thaw_server::chain::ChainSpec {
        layers: 1,
        size: SIZE,
        memfile_block_size: 4096,
        files: vec![thaw_codec::FileKind::Rootfs],
        seed: 61,
        dirty_fraction: 0.15,
        zero_fraction: 0.05,
        write: thaw_server::writer::WriteOptions {
            codec: thaw_codec::CompressionType::Zstd,
            level: 1,
            frame_size: 1024 * 1024,
            header_version: 4,
            workers: 2,
            progress: false,
        },
    };
    let manifest =
        thaw_server::chain::generate(gs.as_ref(), &scratch.path().join("expected"), &spec).unwrap();
    let top = manifest.top().unwrap();
    let mut model = std::fs::read(&top.files["rootfs.ext4"].flat).unwrap();
    let mut build = top.build_id;
    let mut rng = SmallRng::seed_from_u64(62);
    for (cycle, codec) in ["zstd:2", "lz4", "none"].into_iter().enumerate() {
        let control = scratch.path().join(format!("gcs-{cycle}.sock"));
        let control_s = control.display().to_string();
        let serve = Serve::start_with(
            &url,
            &[("disk".to_string(), build)],
            &["--control", &control_s],
        );
        write_session(&serve.sock, "disk", &mut model, &mut rng);
        let new = uuid::Uuid::new_v4();
        let new_s = new.to_string();
        let reply = ctl_json(
            &control,
            &["snapshot", "disk", "--new-build", &new_s, "--codec", codec],
        );
        assert!(
            reply["store"]
                .as_str()
                .unwrap()
                .starts_with("gs://snap/builds"),
            "{reply}"
        );
        drop(serve);
        let check = Serve::start_with(&url, &[("x".to_string(), new)], &["--read-only"]);
        let got = nbdcopy_to_vec(&check.unix_uri("x"), scratch.path(), &[]);
        assert!(
            got == model,
            "cycle {cycle} ({codec}): the snapshot read from fake-gcs-server differs"
        );
        let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
            .args(["inspect", "--store", &url, "--build", &new_s, "--verify"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "inspect --verify: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        build = new;
    }
}
