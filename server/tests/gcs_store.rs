//! The GCS store against fake-gcs-server (the real emulator, on an ephemeral loopback port):
//! object operations and their edges, parallel-part uploads with compose, chains uploaded with
//! `thaw compress --to gs://` and read back through the engine, and backend faults (catalogue
//! B1-B5) injected by a proxy between thaw and the emulator.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "test offsets and lengths are small"
)]

mod common;
#[path = "common/gcs.rs"]
mod gcs;
#[path = "common/moto.rs"]
mod moto;
#[path = "common/nbd.rs"]
mod nbd_common;

use std::io::Write as _;
use std::ops::ControlFlow;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gcs::{FakeGcs, Fault, FaultProxy};
use thaw_codec::{CompressionType, FileKind};
use thaw_server::chain::{ChainManifest, ChainSpec, generate};
use thaw_server::engine::{Engine, EngineConfig};
use thaw_server::store::{FileStore, GcsStore, PutOptions, Store, StoreErrorKind, UploadMode};
use thaw_server::writer::WriteOptions;

const BUCKET: &str = "snap";

fn emulator() -> Option<FakeGcs> {
    FakeGcs::with_bucket(BUCKET)
}

fn store(endpoint: &str, params: &str) -> GcsStore {
    GcsStore::open(&format!(
        "gs://{BUCKET}/pre/fix?endpoint={endpoint}{params}"
    ))
    .unwrap()
}

/// Deterministic, poorly compressible bytes.
fn data(seed: u64, len: usize) -> Vec<u8> {
    common::test_data(seed, len)
}

fn read_all(s: &dyn Store, key: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    s.read_range(key, offset, &mut buf).unwrap();
    buf
}

#[test]
fn object_operations_and_edges() {
    let Some(gcs) = emulator() else { return };
    let s = store(&gcs.endpoint(), "");
    let body = data(1, 300_000);

    // put with metadata; stat prefers uncompressed-size; exists; get and its limit.
    s.put(
        "b1/obj",
        &body,
        &PutOptions::with_uncompressed_size(1_234_567),
    )
    .unwrap();
    let info = s.stat("b1/obj").unwrap();
    assert_eq!(info.size, 300_000);
    assert_eq!(info.uncompressed_size, Some(1_234_567));
    assert_eq!(info.logical_size(), 1_234_567);
    assert!(gcs.list(BUCKET).contains(&"pre/fix/b1/obj".to_owned()));
    assert!(s.exists("b1/obj").unwrap());
    assert!(!s.exists("b1/none").unwrap());
    assert_eq!(s.get("b1/obj", 300_000).unwrap(), body);
    let e = s.get("b1/obj", 299_999).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::TooLarge, "{e}");
    let e = s.get("b1/none", 10).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::NotFound, "{e}");
    // The store URL in messages names the endpoint too.
    let head = format!("gs://snap/pre/fix?endpoint={}: b1/none", gcs.endpoint());
    assert!(e.to_string().contains(&head), "{e}");
    let e = s.stat("b1/none").unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::NotFound, "{e}");

    // A plain put has no uncompressed-size: logical size = stored size.
    s.put("b1/plain", &body[..1000], &PutOptions::default())
        .unwrap();
    let info = s.stat("b1/plain").unwrap();
    assert_eq!((info.size, info.uncompressed_size), (1000, None));

    // Range reads at the edges.
    assert_eq!(read_all(&s, "b1/obj", 0, 1), body[..1]);
    assert_eq!(read_all(&s, "b1/obj", 299_999, 1), body[299_999..]);
    assert_eq!(read_all(&s, "b1/obj", 0, 300_000), body);
    assert_eq!(read_all(&s, "b1/obj", 4096, 70_000), body[4096..74_096]);
    let mut buf = vec![0u8; 2];
    let e = s.read_range("b1/obj", 299_999, &mut buf).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Truncated, "{e}");
    assert!(e.to_string().contains("past the end"), "{e}");
    let e = s.read_range("b1/obj", 300_000, &mut buf).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Truncated, "{e}");
    let e = s.read_range("b1/none", 0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::NotFound, "{e}");

    // The empty object.
    s.put("b1/empty", b"", &PutOptions::default()).unwrap();
    assert_eq!(s.stat("b1/empty").unwrap().size, 0);
    assert_eq!(s.get("b1/empty", 0).unwrap(), Vec::<u8>::new());
    s.read_range("b1/empty", 0, &mut []).unwrap();
    let e = s.read_range("b1/empty", 0, &mut buf[..1]).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Truncated, "{e}");

    // Progress is monotone and ends at the length; a stream can stop early.
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 300_000];
    s.read_range_progress("b1/obj", 0, &mut buf, &mut |n| seen.push(n))
        .unwrap();
    assert_eq!(buf, body);
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&300_000));
    let mut got = Vec::new();
    let n = s
        .read_stream("b1/obj", 10, 299_990, &mut |piece| {
            got.extend_from_slice(piece);
            ControlFlow::Break(())
        })
        .unwrap();
    assert_eq!(n as usize, got.len());
    assert!(n > 0 && n < 299_990);
    assert_eq!(got, body[10..10 + got.len()]);

    // Keys are checked before any request.
    for key in ["", "/abs", "a/../b", "a//b"] {
        assert_eq!(
            s.exists(key).unwrap_err().kind(),
            StoreErrorKind::InvalidKey,
            "{key:?}"
        );
    }
}

/// Writes `body` through `create` in odd-sized pieces.
fn write_through(s: &GcsStore, key: &str, body: &[u8], opts: &PutOptions) {
    let mut w = s.create(key, opts).unwrap();
    for piece in body.chunks(1_000_003) {
        std::io::Write::write_all(&mut w, piece).unwrap();
    }
    assert_eq!(w.written(), body.len() as u64);
    // Nothing under the name before commit.
    assert!(!s.exists(key).unwrap());
    w.commit().unwrap();
}

#[test]
fn large_upload_in_parallel_parts_reads_back_equal() {
    let Some(gcs) = emulator() else { return };
    let s = store(&gcs.endpoint(), "&upload=compose");
    let len = 50 * 1024 * 1024 + 12_345;
    let body = data(2, len);
    let before = s.http().stats();
    write_through(
        &s,
        "b2/memfile.zstd",
        &body,
        &PutOptions::with_uncompressed_size(99 << 20),
    );
    let after = s.http().stats();
    let parts = len.div_ceil(s.part_size());
    assert_eq!(parts, 4);
    // One list of stale parts + parts + one exists check + one compose + one delete per part.
    assert_eq!(
        after.requests - before.requests,
        (1 + parts + 1 + 1 + parts) as u64
    );
    let info = s.stat("b2/memfile.zstd").unwrap();
    assert_eq!(info.size, len as u64);
    assert_eq!(info.uncompressed_size, Some(99 << 20));
    let mut got = Vec::with_capacity(len);
    s.read_stream("b2/memfile.zstd", 0, len as u64, &mut |p| {
        got.extend_from_slice(p);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert!(got == body, "read back differs");
    // No temporary part objects are left.
    assert_eq!(gcs.list(BUCKET), vec!["pre/fix/b2/memfile.zstd".to_owned()]);
}

#[test]
fn many_parts_compose_in_levels_and_dropped_writers_leave_nothing() {
    let Some(gcs) = emulator() else { return };
    let s = store(
        &gcs.endpoint(),
        "&upload=compose&part-size=256KiB&upload-concurrency=8",
    );
    // 70 parts: three first-level composes (32 + 32 + 6), then the final one.
    let len = 70 * 256 * 1024 - 1000;
    let body = data(3, len);
    write_through(
        &s,
        "b3/rootfs.ext4.lz4",
        &body,
        &PutOptions::with_uncompressed_size(7),
    );
    assert_eq!(read_all(&s, "b3/rootfs.ext4.lz4", 0, len), body);
    assert_eq!(
        s.stat("b3/rootfs.ext4.lz4").unwrap().uncompressed_size,
        Some(7)
    );
    assert_eq!(
        gcs.list(BUCKET),
        vec!["pre/fix/b3/rootfs.ext4.lz4".to_owned()]
    );

    // A writer dropped after several parts: its parts are deleted, nothing is published.
    let mut w = s.create("b3/dropped", &PutOptions::default()).unwrap();
    std::io::Write::write_all(&mut w, &body[..3 * 256 * 1024 + 5]).unwrap();
    drop(w);
    assert_eq!(
        gcs.list(BUCKET),
        vec!["pre/fix/b3/rootfs.ext4.lz4".to_owned()]
    );

    // A small object through create is one upload.
    write_through(&s, "b3/small", &body[..1000], &PutOptions::default());
    assert_eq!(s.get("b3/small", 1000).unwrap(), body[..1000]);
}

fn thaw_cmd(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_thaw"));
    c.args(args).env_remove("STORAGE_EMULATOR_HOST");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn chain_spec(codec: CompressionType, header_version: u16, seed: u64) -> ChainSpec {
    ChainSpec {
        layers: 2,
        size: 4 * 1024 * 1024 + 5 * 4096,
        memfile_block_size: 4096,
        files: FileKind::ALL.to_vec(),
        seed,
        dirty_fraction: 0.2,
        zero_fraction: 0.05,
        write: WriteOptions {
            codec,
            level: 1,
            frame_size: 1024 * 1024,
            header_version,
            workers: 2,
            progress: false,
        },
    }
}

/// Reads every layer's files with `thaw read` from `store_url` and compares them with the
/// flattened images; returns the store requests `thaw read` reported in total.
fn read_back_all(store_url: &str, manifest: &ChainManifest, env: &[(&str, &str)], dir: &Path) {
    for layer in &manifest.layers {
        for file in FileKind::ALL {
            let truth = &layer.files[file.name()];
            let out_path = dir.join(format!("{}-{}", layer.build_id, file.name()));
            let out = thaw_cmd(
                &[
                    "read",
                    "--store",
                    store_url,
                    "--build",
                    &layer.build_id.to_string(),
                    "--file",
                    file.name(),
                    "--output",
                    out_path.to_str().unwrap(),
                ],
                env,
            );
            ok(&out, "thaw read");
            let got = std::fs::read(&out_path).unwrap();
            let want = std::fs::read(&truth.flat).unwrap();
            assert!(
                got == want,
                "{store_url} generation {} {file}: bytes differ from the flattened image",
                layer.generation
            );
        }
    }
}

#[test]
fn chains_upload_with_compress_and_read_back_through_the_engine() {
    let Some(gcs) = emulator() else { return };
    let dir = tempfile::tempdir().unwrap();
    let env = [("STORAGE_EMULATOR_HOST", gcs.endpoint())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // Uncompressed (V3): generated straight into the bucket through the store API.
    let gs = store(&gcs.endpoint(), "");
    let plain = generate(
        &gs,
        &dir.path().join("plain-expected"),
        &chain_spec(CompressionType::None, 3, 11),
    )
    .unwrap();
    read_back_all("gs://snap/pre/fix", &plain, &env, dir.path());

    // zstd (V4) and LZ4 (V5): a plain chain in a directory, compressed to the bucket.
    for (codec, version, prefix) in [("zstd:1", "4", "z"), ("lz4", "5", "l")] {
        let src = FileStore::new(dir.path().join(format!("src-{prefix}")));
        let manifest = generate(
            &src,
            &dir.path().join(format!("expected-{prefix}")),
            &chain_spec(CompressionType::None, 3, 12),
        )
        .unwrap();
        let top = manifest.layers.last().unwrap().build_id.to_string();
        let to = format!("gs://snap/{prefix}");
        let src_url = format!("file://{}", src.root().display());
        let out = thaw_cmd(
            &[
                "compress",
                "--store",
                &src_url,
                "--build",
                &top,
                "--recursive",
                "--codec",
                codec,
                "--header-version",
                version,
                "--to",
                &to,
                "--no-progress",
            ],
            &env,
        );
        ok(&out, "thaw compress --to gs://");
        read_back_all(&to, &manifest, &env, dir.path());
        // Every compressed object carries uncompressed-size = the plain object's size.
        let dst = GcsStore::open(&format!("{to}?endpoint={}", gcs.endpoint())).unwrap();
        let suffix = if codec == "lz4" { "lz4" } else { "zstd" };
        for layer in &manifest.layers {
            for file in FileKind::ALL {
                let plain_key = format!("{}/{}", layer.build_id, file.name());
                let Ok(plain_info) = src.stat(&plain_key) else {
                    continue; // a layer without data of this file
                };
                let info = dst.stat(&format!("{plain_key}.{suffix}")).unwrap();
                assert_eq!(info.uncompressed_size, Some(plain_info.size), "{plain_key}");
                assert_eq!(info.logical_size(), plain_info.size);
            }
        }
    }
}

#[test]
fn a_failed_upload_never_leaves_a_header_behind() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    let dir = tempfile::tempdir().unwrap();
    let src = FileStore::new(dir.path().join("src"));
    let manifest = generate(
        &src,
        &dir.path().join("expected"),
        &chain_spec(CompressionType::None, 3, 13),
    )
    .unwrap();
    let top = manifest.layers.last().unwrap().build_id.to_string();
    // Parts of 256 KiB: every data object is composed; every compose fails (400).
    proxy.inject("/compose", &vec![Fault::Status(400); 1000]);
    let to = format!(
        "gs://snap/h?endpoint={}&upload=compose&part-size=256KiB",
        proxy.endpoint()
    );
    let src_url = format!("file://{}", src.root().display());
    let out = thaw_cmd(
        &[
            "compress",
            "--store",
            &src_url,
            "--build",
            &top,
            "--recursive",
            "--codec",
            "zstd",
            "--to",
            &to,
            "--no-progress",
        ],
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("gs://snap/h") && stderr.contains("400"),
        "{stderr}"
    );
    assert!(proxy.matched() >= 1);
    let names = gcs.list(BUCKET);
    assert!(
        names
            .iter()
            .all(|n| !n.ends_with(".header") && !n.contains("thaw-part")),
        "left behind: {names:?}"
    );
}

// ---- faults (catalogue B1-B5) through the proxy ----

/// A 1 MiB object uploaded directly, and a store that reads it through `proxy`.
fn fault_setup(gcs: &FakeGcs, proxy: &FaultProxy, params: &str) -> (GcsStore, Vec<u8>) {
    let direct = store(&gcs.endpoint(), "");
    let body = data(4, 1 << 20);
    direct.put("f/obj", &body, &PutOptions::default()).unwrap();
    let s = store(
        &proxy.endpoint(),
        &format!("&backoff-base=10ms&backoff-max=50ms{params}"),
    );
    (s, body)
}

/// The start of each logged request's range.
fn range_starts(proxy: &FaultProxy) -> Vec<u64> {
    proxy
        .log()
        .iter()
        .filter_map(|l| l.split("range=bytes=").nth(1))
        .map(|r| r.split('-').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn b1_503_and_429_are_retried_within_the_budget() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    let (s, body) = fault_setup(&gcs, &proxy, "&attempts=4");
    proxy.inject(
        "alt=media",
        &[Fault::Status(503), Fault::Status(429), Fault::Status(503)],
    );
    assert_eq!(read_all(&s, "f/obj", 0, body.len()), body);
    assert_eq!(proxy.matched(), 4);
    assert_eq!(s.http().stats().retries, 3);

    // Past the attempts: an error naming the store, key, operation, status and attempts.
    proxy.reset_counts();
    proxy.inject("alt=media", &vec![Fault::Status(503); 50]);
    let mut buf = vec![0u8; 4096];
    let e = s.read_range("f/obj", 8192, &mut buf).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Io);
    let msg = e.to_string();
    for part in [
        "gs://snap/pre/fix",
        "f/obj",
        "read [8192, 12288)",
        "503",
        "4 attempts",
    ] {
        assert!(msg.contains(part), "{part:?} missing in {msg}");
    }
    assert_eq!(proxy.matched(), 4);

    // Within the budget: many attempts allowed, but the budget (1 s) ends the operation.
    let s = store(
        &proxy.endpoint(),
        "&attempts=1000&budget=1s&backoff-base=100ms&backoff-max=200ms",
    );
    proxy.reset_counts();
    proxy.inject("alt=media", &vec![Fault::Status(429); 1000]);
    let t = Instant::now();
    let e = s.read_range("f/obj", 0, &mut buf).unwrap_err();
    let took = t.elapsed();
    // Upper bound only (the machine may be loaded): far below 1000 attempts of up to 200 ms.
    assert!(took < Duration::from_secs(3), "{took:?}: {e}");
    assert!(e.to_string().contains("429"), "{e}");
    assert!(
        proxy.matched() >= 2 && proxy.matched() < 40,
        "{}",
        proxy.matched()
    );
}

#[test]
fn b2_not_found_is_never_retried() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    let (s, _) = fault_setup(&gcs, &proxy, "");
    let mut buf = vec![0u8; 10];
    let e = s.read_range("f/missing", 0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::NotFound, "{e}");
    assert_eq!(proxy.matched(), 1);
    proxy.reset_counts();
    proxy.inject("alt=media", &[Fault::Status(404), Fault::Status(404)]);
    let e = s.read_range("f/obj", 0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("1 attempt "), "{e}");
    assert_eq!(proxy.matched(), 1);
    // Other 4xx are not retried either.
    proxy.reset_counts();
    proxy.inject("alt=media", &[Fault::Status(403), Fault::Status(403)]);
    let e = s.read_range("f/obj", 0, &mut buf).unwrap_err();
    assert!(e.to_string().contains("403"), "{e}");
    assert_eq!(proxy.matched(), 1);
}

#[test]
fn b3_b5_stalls_hit_the_deadlines_and_reads_resume() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    let (s, body) = fault_setup(
        &gcs,
        &proxy,
        "&idle-timeout=300ms&first-byte-timeout=300ms&budget=5s",
    );
    // B3: no response headers (first-byte deadline), then a slow body (B5: idle deadline)
    // after 100,000 bytes: retried, resumed at the byte where the body stalled.
    proxy.inject(
        "alt=media",
        &[
            Fault::Hang(Duration::from_secs(6)),
            Fault::Slow {
                bytes: 100_000,
                stall: Duration::from_secs(6),
            },
        ],
    );
    let t = Instant::now();
    assert_eq!(read_all(&s, "f/obj", 0, body.len()), body);
    // Neither stall was waited out (upper bound only).
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(range_starts(&proxy), vec![0, 0, 100_000]);

    // Every attempt stalls: the budget ends the read with an error naming the deadline.
    let s = store(
        &proxy.endpoint(),
        "&idle-timeout=200ms&first-byte-timeout=200ms&budget=1s&attempts=100",
    );
    proxy.reset_counts();
    proxy.inject("alt=media", &vec![Fault::Hang(Duration::from_secs(6)); 100]);
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    let e = s.read_range("f/obj", 0, &mut buf).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    let msg = e.to_string();
    assert!(msg.contains("deadline") || msg.contains("budget"), "{msg}");
}

#[test]
fn b4_truncated_and_reset_bodies_are_retried_never_served() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    let (s, body) = fault_setup(&gcs, &proxy, "&attempts=5");
    proxy.inject(
        "alt=media",
        &[
            Fault::Truncate { bytes: 200_000 },
            Fault::Reset { bytes: 300_000 },
        ],
    );
    assert_eq!(read_all(&s, "f/obj", 4096, body.len() - 4096), body[4096..]);
    let starts = range_starts(&proxy);
    assert_eq!(starts.len(), 3, "{starts:?}");
    assert_eq!(starts[..2], [4096, 4096 + 200_000]);
    assert!(
        starts[2] >= 4096 + 200_000 && starts[2] <= 4096 + 500_000,
        "{starts:?}"
    );

    // Buffered gets are retried too.
    proxy.inject("alt=media", &[Fault::Truncate { bytes: 10 }]);
    assert_eq!(s.get("f/obj", 1 << 20).unwrap(), body);

    // Always truncated: an error, and the sink got only real bytes of the object.
    proxy.reset_counts();
    proxy.inject("alt=media", &vec![Fault::Truncate { bytes: 1000 }; 100]);
    let mut got = Vec::new();
    let e = s
        .read_stream("f/obj", 0, 1 << 20, &mut |p| {
            got.extend_from_slice(p);
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(e.to_string().contains("5 attempts"), "{e}");
    assert_eq!(e.kind(), StoreErrorKind::Truncated, "{e}");
    assert_eq!(got, body[..got.len()]);
    assert_eq!(proxy.matched(), 5);

    // A wrong range or a 200 whole-object answer to a ranged read is refused, not retried.
    proxy.reset_counts();
    proxy.inject("alt=media", &[Fault::WrongRange, Fault::IgnoreRange]);
    let mut buf = vec![0u8; 4096];
    let e = s.read_range("f/obj", 4096, &mut buf).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e}");
    let e = s.read_range("f/obj", 4096, &mut buf).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("HTTP 200"), "{e}");
    assert_eq!(proxy.matched(), 2);
    // ... unless the whole object is exactly the range asked for.
    proxy.inject("alt=media", &[Fault::IgnoreRange]);
    assert_eq!(read_all(&s, "f/obj", 0, body.len()), body);
}

/// Files under `dir` whose name ends with `suffix`.
fn count_files(dir: &Path, suffix: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p, suffix)
            } else {
                usize::from(p.to_string_lossy().ends_with(suffix))
            }
        })
        .sum()
}

#[test]
fn engine_through_faults_serves_and_caches_only_verified_bytes() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    let dir = tempfile::tempdir().unwrap();
    let gs = store(&gcs.endpoint(), "");
    let manifest = generate(
        &gs,
        &dir.path().join("expected"),
        &chain_spec(CompressionType::Zstd, 4, 21),
    )
    .unwrap();
    let top = manifest.layers.last().unwrap();
    let flat = std::fs::read(&top.files["rootfs.ext4"].flat).unwrap();
    let url = format!(
        "gs://snap/pre/fix?endpoint={}&idle-timeout=300ms&first-byte-timeout=300ms&budget=10s\
         &backoff-base=10ms&backoff-max=50ms&attempts=3",
        proxy.endpoint()
    );
    let read = |cache: &Path, out: &Path| {
        thaw_cmd(
            &[
                "read",
                "--store",
                &url,
                "--cache-dir",
                cache.to_str().unwrap(),
                "--build",
                &top.build_id.to_string(),
                "--file",
                "rootfs.ext4",
                "--fetch-retries",
                "1",
                "--output",
                out.to_str().unwrap(),
            ],
            &[],
        )
    };

    // Every frame GET fails (truncated): the read fails naming what failed; nothing cached.
    let frames = "ext4.zstd?alt=media";
    proxy.inject(frames, &vec![Fault::Truncate { bytes: 100 }; 10_000]);
    let cache = dir.path().join("cache1");
    let out = read(&cache, &dir.path().join("out1"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("gs://snap/pre/fix") && stderr.contains("attempts"),
        "{stderr}"
    );
    assert_eq!(count_files(&cache, ".frm"), 0);

    // Mixed faults on the first frames: served equal, then cached; a second process reads the
    // cache without touching the store.
    proxy.inject(
        frames,
        &[
            Fault::Status(503),
            Fault::Truncate { bytes: 1000 },
            Fault::Reset { bytes: 5000 },
            Fault::Slow {
                bytes: 7000,
                stall: Duration::from_secs(2),
            },
            Fault::Status(429),
            Fault::Hang(Duration::from_secs(2)),
        ],
    );
    let out_path = dir.path().join("out2");
    let out = read(&cache, &out_path);
    ok(&out, "thaw read through faults");
    assert_eq!(proxy.pending(), 0);
    assert!(
        std::fs::read(&out_path).unwrap() == flat,
        "served bytes differ"
    );
    assert!(count_files(&cache, ".frm") > 0);
    proxy.reset_counts();
    proxy.inject(frames, &vec![Fault::Status(500); 10_000]);
    let out_path = dir.path().join("out3");
    let out = read(&cache, &out_path);
    ok(&out, "thaw read from the cache");
    assert!(
        std::fs::read(&out_path).unwrap() == flat,
        "cached bytes differ"
    );
    assert_eq!(proxy.matched(), 0, "{:?}", proxy.log());
}

#[test]
fn thaw_serve_exports_a_gs_build_over_nbd_with_store_metrics() {
    let Some(gcs) = emulator() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gs = store(&gcs.endpoint(), "");
    let manifest = generate(
        &gs,
        &dir.path().join("expected"),
        &chain_spec(CompressionType::Zstd, 4, 31),
    )
    .unwrap();
    let top = manifest.layers.last().unwrap();
    let flat = std::fs::read(&top.files["rootfs.ext4"].flat).unwrap();
    let url = format!("gs://snap/pre/fix?endpoint={}", gcs.endpoint());
    let serve = nbd_common::Serve::start_with(
        &url,
        &[("disk".to_owned(), top.build_id)],
        &["--metrics", "tcp:127.0.0.1:0"],
    );
    let got = nbd_common::nbdcopy_to_vec(&serve.unix_uri("disk"), dir.path(), &[]);
    assert!(
        got == flat,
        "bytes served over NBD from gs:// differ from the flattened image"
    );
    let scrape = serve.scrape();
    let requests = nbd_common::Serve::metric(
        &scrape,
        "thaw_store_requests_total{scheme=\"gs\",op=\"read\"}",
    )
    .unwrap_or_else(|| panic!("no store metrics in\n{scrape}"));
    assert!(requests >= 1.0, "{requests}");
    assert!(scrape.contains("thaw_store_first_byte_seconds_bucket{scheme=\"gs\",op=\"read\""));
}

#[test]
fn configuration_errors_are_clear_and_settings_apply() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    let (s, _) = fault_setup(&gcs, &proxy, "");
    drop(s);
    let id = uuid::Uuid::new_v4().to_string();
    let inspect = |url: &str, env: &[(&str, &str)]| {
        let out = thaw_cmd(&["inspect", "--store", url, "--build", &id], env);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = inspect("gs://snap?colour=blue", &[]);
    assert!(e.contains("unknown parameter \"colour\""), "{e}");
    let e = inspect("gs://snap?budget=soon", &[]);
    assert!(e.contains("budget"), "{e}");
    let e = inspect("gs://Not_A_Bucket", &[]);
    assert!(e.contains("bucket name"), "{e}");
    let e = inspect("gs://snap", &[("THAW_HTTP_BUDGET", "never")]);
    assert!(e.contains("THAW_HTTP_BUDGET"), "{e}");
    // THAW_HTTP_ATTEMPTS applies; the URL parameter overrides it.
    let url = format!(
        "gs://snap/pre/fix?endpoint={}&backoff-base=1ms",
        proxy.endpoint()
    );
    proxy.inject("", &vec![Fault::Status(503); 1000]);
    let e = inspect(&url, &[("THAW_HTTP_ATTEMPTS", "2")]);
    assert!(e.contains("503") && e.contains("2 attempts"), "{e}");
    let e = inspect(&format!("{url}&attempts=3"), &[("THAW_HTTP_ATTEMPTS", "2")]);
    assert!(e.contains("3 attempts"), "{e}");
    // STORAGE_EMULATOR_HOST names the endpoint (host:port without a scheme works too).
    proxy.inject("", &[]);
    let hostport = format!("127.0.0.1:{}", gcs.port);
    let e = inspect("gs://snap/pre/fix", &[("STORAGE_EMULATOR_HOST", &hostport)]);
    assert!(
        e.contains(&id) || e.contains("not found") || e.contains("no "),
        "{e}"
    );
    assert!(!e.contains("credentials"), "{e}");
}

// ---- the XML multipart upload (upload=xml), against moto's S3-compatible XML API ----

/// The port of an `http://127.0.0.1:PORT` endpoint.
fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

fn head_value<'a>(head: &'a [(String, String)], name: &str) -> Option<&'a str> {
    head.iter()
        .skip(1)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn xml_multipart_upload_round_trips_through_an_s3_compatible_server() {
    let Some(moto) = moto::Moto::start(false) else {
        return;
    };
    // The bucket, made through the S3 store; the GCS store talks to moto through a recording
    // proxy. moto keeps custom metadata sent as x-amz-meta-*: the proxy renames the
    // x-goog-meta-* headers on the way (it records what thaw sent).
    moto.store("gcsxml", "");
    let proxy = FaultProxy::start(port_of(&moto.endpoint));
    proxy.rewrite_header_prefix("x-goog-meta-", "x-amz-meta-");
    let url = format!(
        "gs://gcsxml/pre?endpoint={0}&upload=xml&xml-endpoint={0}&part-size=5MiB&\
         upload-concurrency=3",
        proxy.endpoint()
    );
    let gs = GcsStore::open_with_env(&url, &|name| {
        (name == "THAW_GCS_TOKEN").then(|| "tok-123".to_owned())
    })
    .unwrap();
    assert_eq!(gs.upload_mode(), UploadMode::Xml);
    let s3 = moto.store_as(
        &moto.url("gcsxml/pre", ""),
        Some((moto::ACCESS_KEY, moto::SECRET_KEY)),
    );

    // Three parts of 5 MiB (the last shorter), with e2b's metadata names.
    let part = 5 << 20;
    let body = data(31, 2 * part + 1_000_001);
    let mut opts = PutOptions::with_uncompressed_size(123_456_789);
    for (k, v) in [
        ("team_id", "team-1"),
        ("template_id", "tpl-2"),
        ("build_origin", "pause"),
    ] {
        opts.metadata.insert(k.to_owned(), v.to_owned());
    }
    let key = "b/memfile.zstd";
    let mut w = gs.create(key, &opts).unwrap();
    for piece in body.chunks(777_777) {
        w.write_all(piece).unwrap();
    }
    assert!(!s3.exists(key).unwrap(), "visible before commit");
    w.commit().unwrap();

    // Read back through the S3 store: bytes and metadata.
    let got = s3.get(key, body.len() as u64).unwrap();
    assert!(got == body, "bytes differ after the XML multipart upload");
    let info = s3.stat(key).unwrap();
    assert_eq!(info.size, body.len() as u64);
    assert_eq!(info.uncompressed_size, Some(123_456_789));
    let (status, headers, _) = gcs::http(
        port_of(&moto.endpoint),
        "GET",
        "/gcsxml/pre/b/memfile.zstd",
        &[("Range", "bytes=0-0")],
        b"",
    )
    .unwrap();
    assert_eq!(status, 206);
    for (k, v) in [
        ("team_id", "team-1"),
        ("template_id", "tpl-2"),
        ("build_origin", "pause"),
    ] {
        let name = format!("x-amz-meta-{k}");
        assert_eq!(
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str()),
            Some(v),
            "{name}: {headers:?}"
        );
    }

    // What thaw sent: the XML API's requests, every one with the bearer token, metadata as
    // x-goog-meta-* on the initiate request, Content-MD5 on each part.
    let heads = proxy.heads();
    let lines: Vec<&str> = heads.iter().map(|h| h[0].1.as_str()).collect();
    let object = "/gcsxml/pre/b/memfile.zstd";
    let initiate: Vec<_> = heads
        .iter()
        .filter(|h| h[0].1.starts_with(&format!("POST {object}?uploads ")))
        .collect();
    assert_eq!(initiate.len(), 1, "{lines:?}");
    assert_eq!(
        head_value(initiate[0], "x-goog-meta-uncompressed-size"),
        Some("123456789")
    );
    assert_eq!(
        head_value(initiate[0], "x-goog-meta-team_id"),
        Some("team-1")
    );
    let mut part_md5s: Vec<(u32, String)> = heads
        .iter()
        .filter(|h| h[0].1.starts_with(&format!("PUT {object}?partNumber=")))
        .map(|h| {
            let line = &h[0].1;
            let n = line
                .split("partNumber=")
                .nth(1)
                .unwrap()
                .split(['&', ' '])
                .next()
                .unwrap()
                .parse()
                .unwrap();
            (n, head_value(h, "content-md5").unwrap().to_owned())
        })
        .collect();
    part_md5s.sort();
    let want: Vec<(u32, String)> = body
        .chunks(part)
        .zip(1..)
        .map(|(c, n)| (n, thaw_server::store::multipart::content_md5(c)))
        .collect();
    assert_eq!(part_md5s, want);
    assert_eq!(
        heads
            .iter()
            .filter(|h| h[0].1.starts_with(&format!("POST {object}?uploadId=")))
            .count(),
        1,
        "{lines:?}"
    );
    assert_eq!(heads.len(), 5, "{lines:?}");
    for h in &heads {
        assert_eq!(
            head_value(h, "authorization"),
            Some("Bearer tok-123"),
            "{}",
            h[0].1
        );
    }

    // A small object is one XML PUT with Content-MD5; a writer dropped after a part aborts
    // its upload (nothing published, no upload left).
    proxy.reset_counts();
    gs.put("b/small", b"hello xml", &PutOptions::default())
        .unwrap();
    assert_eq!(s3.get("b/small", 100).unwrap(), b"hello xml");
    let mut w = gs.create("b/dropped", &PutOptions::default()).unwrap();
    w.write_all(&body[..part + 10]).unwrap();
    drop(w);
    assert!(!s3.exists("b/dropped").unwrap());
    assert_eq!(s3.list_multipart_uploads().unwrap(), Vec::<String>::new());
    let log = proxy.log();
    assert!(log[0].starts_with("PUT /gcsxml/pre/b/small "), "{log:?}");
    assert!(
        log.iter()
            .any(|l| l.starts_with("DELETE /gcsxml/pre/b/dropped?uploadId=")),
        "{log:?}"
    );
}

// ---- transport and upload fixes ----

#[test]
fn a_slow_upload_body_does_not_count_against_the_first_byte_deadline() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    // One attempt, a 1 s first-byte deadline; the proxy takes the 24 MiB body at ~5 MiB/s
    // (several seconds, more than the socket buffers hold).
    let s = store(
        &proxy.endpoint(),
        "&first-byte-timeout=1s&idle-timeout=2s&attempts=1",
    );
    let body = data(41, 24 << 20);
    proxy.inject(
        "uploadType=multipart",
        &[Fault::SlowRequestBody {
            piece: 256 << 10,
            pause: Duration::from_millis(50),
        }],
    );
    s.put("slow/obj", &body, &PutOptions::default()).unwrap();
    assert_eq!(proxy.matched(), 1);
    assert!(s.get("slow/obj", body.len() as u64).unwrap() == body);

    // A body that stops moving still fails, on the idle deadline, saying so.
    proxy.reset_counts();
    proxy.inject(
        "uploadType=multipart",
        &[Fault::SlowRequestBody {
            piece: 1 << 20,
            pause: Duration::from_secs(30),
        }],
    );
    let t = Instant::now();
    let e = s
        .put("slow/stalled", &body, &PutOptions::default())
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(e.to_string().contains("request body stalled"), "{e}");
    assert!(!s.exists("slow/stalled").unwrap());
}

#[test]
fn access_denied_is_permanent_for_the_engine_too() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    let dir = tempfile::tempdir().unwrap();
    let direct = store(&gcs.endpoint(), "");
    let spec = ChainSpec {
        layers: 1,
        zero_fraction: 0.0,
        ..chain_spec(CompressionType::None, 3, 21)
    };
    let manifest = generate(&direct, &dir.path().join("expected"), &spec).unwrap();
    let via_proxy: Arc<dyn Store> = Arc::new(store(&proxy.endpoint(), ""));
    let engine = Engine::new(
        via_proxy,
        EngineConfig {
            readahead_units: 0,
            cache_dir: None,
            shared_cache: None,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let file = engine
        .open(manifest.layers[0].build_id, FileKind::Rootfs)
        .unwrap();
    // The header and the first chunk load fine; the last chunk is refused.
    let mut buf = vec![0u8; 4096];
    file.read_at(0, &mut buf).unwrap();
    proxy.reset_counts();
    proxy.inject("alt=media", &vec![Fault::Status(403); 50]);
    let e = file
        .read_at(file.size() - 4096, &mut buf)
        .unwrap_err()
        .to_string();
    assert!(e.contains("403") && e.contains("access denied"), "{e}");
    // One request: neither the transport nor the engine retried it.
    assert_eq!(proxy.matched(), 1, "{:?}", proxy.log());
    assert_eq!(engine.stats().retries, 0);
}

#[test]
fn stale_parts_of_a_crashed_compose_upload_are_swept() {
    let Some(gcs) = emulator() else { return };
    let s = store(&gcs.endpoint(), "&upload=compose&part-size=256KiB");
    // What a crashed upload of b5/obj left, and neighbours that are not its parts.
    for name in [
        "b5/obj.thaw-part-0123abcd-00000",
        "b5/obj.thaw-part-0123abcd-00001",
        "b5/obj.thaw-partial",
        "b5/obj2.thaw-part-0123abcd-00000",
    ] {
        s.put(name, b"left", &PutOptions::default()).unwrap();
    }
    assert_eq!(
        s.stale_parts("b5/obj").unwrap(),
        vec![
            "pre/fix/b5/obj.thaw-part-0123abcd-00000".to_owned(),
            "pre/fix/b5/obj.thaw-part-0123abcd-00001".to_owned(),
        ]
    );
    let body = data(51, 3 * 256 * 1024 + 10);
    write_through(&s, "b5/obj", &body, &PutOptions::default());
    assert_eq!(s.get("b5/obj", body.len() as u64).unwrap(), body);
    assert_eq!(
        gcs.list(BUCKET),
        vec![
            "pre/fix/b5/obj".to_owned(),
            "pre/fix/b5/obj.thaw-partial".to_owned(),
            "pre/fix/b5/obj2.thaw-part-0123abcd-00000".to_owned(),
        ]
    );
}
