//! GCS resumable uploads (`upload=resumable`, the default with an emulator endpoint) against
//! fake-gcs-server: a large object streamed in chunks and read back exactly with its metadata;
//! chunk `PUT`s failed by the fault proxy (a 503 before the emulator sees the chunk, a reset after
//! it stored it, on a middle and on the last chunk) still give the exact object; abandoned,
//! failed and crashed uploads leave no object under the name.
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

use std::io::Write as _;
use std::ops::ControlFlow;
use std::process::Command;

use gcs::{FakeGcs, Fault, FaultProxy};
use thaw_codec::{CompressionType, FileKind};
use thaw_server::chain::{ChainSpec, generate};
use thaw_server::store::{FileStore, GcsStore, PutOptions, Store, UploadMode};
use thaw_server::writer::WriteOptions;

const BUCKET: &str = "snap";

/// Matches every chunk `PUT` and status query of a session (not its start, a `POST`).
const CHUNK_PUTS: &str = "PUT /upload/";

fn emulator() -> Option<FakeGcs> {
    FakeGcs::with_bucket(BUCKET)
}

fn store(endpoint: &str, params: &str) -> GcsStore {
    GcsStore::open(&format!(
        "gs://{BUCKET}/pre/fix?endpoint={endpoint}&backoff-base=10ms&backoff-max=50ms{params}"
    ))
    .unwrap()
}

fn read_back(s: &GcsStore, key: &str, len: usize) -> Vec<u8> {
    assert_eq!(s.stat(key).unwrap().size, len as u64, "{key}: size");
    let mut got = Vec::with_capacity(len);
    s.read_stream(key, 0, len as u64, &mut |p| {
        got.extend_from_slice(p);
        ControlFlow::Continue(())
    })
    .unwrap();
    got
}

/// Streams `body` into `key` in odd-sized writes; nothing is visible before commit.
fn write_through(s: &GcsStore, key: &str, body: &[u8], opts: &PutOptions) {
    let mut w = s.create(key, opts).unwrap();
    for piece in body.chunks(1_000_003) {
        w.write_all(piece).unwrap();
    }
    assert_eq!(w.written(), body.len() as u64);
    assert!(!s.exists(key).unwrap(), "{key} visible before commit");
    w.commit().unwrap();
}

/// (request line, Content-Range) of every request the proxy saw.
fn requests(proxy: &FaultProxy) -> Vec<(String, String)> {
    proxy
        .heads()
        .iter()
        .map(|h| {
            let line = h[0].1.clone();
            let range = h
                .iter()
                .skip(1)
                .find(|(k, _)| k == "content-range")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            (line, range)
        })
        .collect()
}

/// Content-Range values of the chunk `PUT`s that carried bytes (not status queries).
fn chunk_ranges(proxy: &FaultProxy, from: usize) -> Vec<String> {
    requests(proxy)
        .into_iter()
        .skip(from)
        .filter(|(line, range)| line.starts_with(CHUNK_PUTS) && is_data_range(range))
        .map(|(_, range)| range)
        .collect()
}

/// `bytes A-B/T` with A <= B (a chunk with bytes), not a status query (`*/*`, or the
/// emulator's empty `A-(A-1)/*`).
fn is_data_range(range: &str) -> bool {
    let Some(rest) = range.strip_prefix("bytes ") else {
        return false;
    };
    let Some((span, _)) = rest.split_once('/') else {
        return false;
    };
    match span.split_once('-') {
        Some((a, b)) => matches!((a.parse::<u64>(), b.parse::<u64>()), (Ok(a), Ok(b)) if a <= b),
        None => false,
    }
}

#[test]
fn a_large_object_streams_in_chunks_and_reads_back_with_its_metadata() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    // The emulator default: resumable, 64 MiB chunks; 16 MiB here to make four of 50 MiB.
    let d = store(&proxy.endpoint(), "");
    assert_eq!(d.upload_mode(), UploadMode::Resumable);
    assert_eq!(d.part_size(), 64 << 20);
    let s = store(&proxy.endpoint(), "&part-size=16MiB");
    let len = 50 * 1024 * 1024 + 12_345;
    let body = common::test_data(61, len);
    write_through(
        &s,
        "r1/memfile.zstd",
        &body,
        &PutOptions::with_uncompressed_size(99 << 20),
    );
    // One session, then 16 MiB chunks with an open total and the last with the total.
    let reqs = requests(&proxy);
    let starts: Vec<&(String, String)> = reqs
        .iter()
        .filter(|(l, _)| l.starts_with("POST /upload/") && l.contains("uploadType=resumable"))
        .collect();
    assert_eq!(starts.len(), 1, "{reqs:?}");
    let m = 16u64 << 20;
    assert_eq!(
        chunk_ranges(&proxy, 0),
        vec![
            format!("bytes 0-{}/*", m - 1),
            format!("bytes {m}-{}/*", 2 * m - 1),
            format!("bytes {}-{}/*", 2 * m, 3 * m - 1),
            format!("bytes {}-{}/{len}", 3 * m, len - 1),
        ]
    );
    let info = s.stat("r1/memfile.zstd").unwrap();
    assert_eq!(info.size, len as u64);
    assert_eq!(info.uncompressed_size, Some(99 << 20));
    assert!(
        read_back(&s, "r1/memfile.zstd", len) == body,
        "read back differs"
    );

    // `put` of more than one chunk goes the same way; an object of one chunk or less (an exact
    // chunk included) is one upload without a session.
    let s = store(&gcs.endpoint(), "&part-size=256KiB");
    let mid = &body[..5 * 256 * 1024 + 77];
    s.put("r1/put", mid, &PutOptions::with_uncompressed_size(5))
        .unwrap();
    assert_eq!(read_back(&s, "r1/put", mid.len()), mid);
    assert_eq!(s.stat("r1/put").unwrap().uncompressed_size, Some(5));
    for n in [0, 1000, 256 * 1024] {
        let key = format!("r1/small-{n}");
        write_through(&s, &key, &body[..n], &PutOptions::default());
        assert_eq!(s.get(&key, n as u64).unwrap(), &body[..n]);
    }
    // Exactly two chunks: the second is the last (the writer holds a full chunk until it knows).
    let two = &body[..2 * 256 * 1024];
    write_through(&s, "r1/two", two, &PutOptions::default());
    assert_eq!(read_back(&s, "r1/two", two.len()), two);
    let mut names = gcs.list(BUCKET);
    names.sort();
    assert_eq!(
        names,
        [
            "pre/fix/r1/memfile.zstd",
            "pre/fix/r1/put",
            "pre/fix/r1/small-0",
            "pre/fix/r1/small-1000",
            "pre/fix/r1/small-262144",
            "pre/fix/r1/two",
        ]
    );
}

#[test]
fn failed_chunks_resume_from_what_the_session_kept() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    let s = store(&proxy.endpoint(), "&part-size=256KiB");
    let q = 256 * 1024;
    let len = 5 * q + 4321; // 6 chunks
    let body = common::test_data(62, len);

    // (faults on the chunk PUTs and status queries in order, what they do)
    let cases: Vec<(Vec<Fault>, &str)> = vec![
        // The first chunk refused before the emulator saw it: resent whole.
        (vec![Fault::Status(503)], "503 on the first chunk"),
        // The third chunk stored by the emulator, its answer reset: the status query says it
        // is kept, so it is not sent again (a resend would double it).
        (
            vec![Fault::Pass, Fault::Pass, Fault::Reset { bytes: 0 }],
            "reset after the emulator stored chunk 3",
        ),
        // The last chunk finalized the object, its answer reset: the object tells.
        (
            vec![
                Fault::Pass,
                Fault::Pass,
                Fault::Pass,
                Fault::Pass,
                Fault::Pass,
                Fault::Reset { bytes: 0 },
            ],
            "reset after the emulator finalized the object",
        ),
        // A 503 on a middle chunk and then on the status query too, and a truncated answer.
        (
            vec![
                Fault::Pass,
                Fault::Status(503),
                Fault::Status(503),
                Fault::Pass,
                Fault::Truncate { bytes: 3 },
            ],
            "503 on a chunk and its status query, then a truncated answer",
        ),
    ];
    for (i, (faults, what)) in cases.into_iter().enumerate() {
        let key = format!("r2/obj-{i}");
        let heads_before = proxy.heads().len();
        proxy.inject(CHUNK_PUTS, &faults);
        write_through(&s, &key, &body, &PutOptions::with_uncompressed_size(3));
        assert_eq!(proxy.pending(), 0, "{what}: faults left");
        // Every failure was followed by a status query (an empty range: nothing appended).
        let seen = &requests(&proxy)[heads_before..];
        assert!(
            seen.iter()
                .any(|(l, r)| l.starts_with(CHUNK_PUTS) && !r.is_empty() && !is_data_range(r)),
            "{what}: no status query: {seen:?}"
        );
        assert!(
            read_back(&s, &key, len) == body,
            "{what}: read back differs"
        );
        assert_eq!(s.stat(&key).unwrap().uncompressed_size, Some(3), "{what}");
        // Every chunk's bytes reached the emulator exactly once, in order: no overlap, no gap.
        let ranges = chunk_ranges(&proxy, heads_before);
        let mut next = 0u64;
        let mut resent = 0;
        for r in &ranges {
            let span = r.strip_prefix("bytes ").unwrap().split('/').next().unwrap();
            let (a, b) = span.split_once('-').unwrap();
            let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
            if a < next {
                resent += 1; // a resend after a failure that kept nothing
            } else {
                assert_eq!(a, next, "{what}: gap before {r} in {ranges:?}");
            }
            next = b + 1;
        }
        assert_eq!(next, len as u64, "{what}: {ranges:?}");
        let expect_resent = usize::from(i == 0 || i == 3);
        assert_eq!(resent, expect_resent, "{what}: {ranges:?}");
    }
}

#[test]
fn abandoned_failed_and_crashed_uploads_leave_no_object() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    let s = store(&proxy.endpoint(), "&part-size=256KiB&attempts=3");
    let body = common::test_data(63, 4 * 256 * 1024 + 99);

    // Dropped after three chunks went up: the session is cancelled, nothing is visible.
    let mut w = s.create("r3/dropped", &PutOptions::default()).unwrap();
    w.write_all(&body).unwrap();
    drop(w);
    assert!(
        requests(&proxy)
            .iter()
            .any(|(l, _)| l.starts_with("DELETE /upload/")),
        "no cancel: {:?}",
        requests(&proxy)
    );
    assert!(!s.exists("r3/dropped").unwrap());

    // A process that dies mid-upload (the writer never committed nor dropped): nothing visible.
    let mut w = s.create("r3/crashed", &PutOptions::default()).unwrap();
    w.write_all(&body).unwrap();
    std::mem::forget(w);
    assert!(!s.exists("r3/crashed").unwrap());

    // Every attempt of a middle chunk fails: the commit fails naming the status; no object.
    proxy.inject(
        CHUNK_PUTS,
        &[vec![Fault::Pass], vec![Fault::Status(503); 50]].concat(),
    );
    let mut w = s.create("r3/failed", &PutOptions::default()).unwrap();
    let e = match w.write_all(&body) {
        Ok(()) => w.commit().unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("503"), "{e}");
    assert!(!s.exists("r3/failed").unwrap());

    // A 4xx on a chunk is not retried: the error names it at once.
    proxy.inject(CHUNK_PUTS, &[Fault::Status(400)]);
    let mut w = s.create("r3/refused", &PutOptions::default()).unwrap();
    let e = match w.write_all(&body) {
        Ok(()) => w.commit().unwrap_err().to_string(),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("400") && e.contains("r3/refused"), "{e}");
    assert!(!s.exists("r3/refused").unwrap());

    let names = gcs.list(BUCKET);
    assert!(names.is_empty(), "left behind: {names:?}");
}

fn compress_to(src: &FileStore, top: &str, to: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args([
            "compress",
            "--store",
            &format!("file://{}", src.root().display()),
            "--build",
            top,
            "--recursive",
            "--codec",
            "zstd",
            "--to",
            to,
            "--no-progress",
        ])
        .env_remove("STORAGE_EMULATOR_HOST")
        .output()
        .unwrap()
}

#[test]
fn thaw_compress_through_failing_chunks_never_leaves_a_header() {
    let Some(gcs) = emulator() else { return };
    let proxy = FaultProxy::start(gcs.port);
    let dir = tempfile::tempdir().unwrap();
    let src = FileStore::new(dir.path().join("src"));
    let spec = ChainSpec {
        layers: 2,
        size: 4 * 1024 * 1024,
        memfile_block_size: 4096,
        files: FileKind::ALL.to_vec(),
        seed: 64,
        dirty_fraction: 0.3,
        zero_fraction: 0.05,
        write: WriteOptions {
            codec: CompressionType::None,
            level: 1,
            frame_size: 1024 * 1024,
            header_version: 3,
            workers: 2,
            progress: false,
        },
    };
    let manifest = generate(&src, &dir.path().join("expected"), &spec).unwrap();
    let top = manifest.layers.last().unwrap().build_id.to_string();
    // Chunks of 256 KiB: every data object above that is a session; every chunk PUT fails.
    proxy.inject(CHUNK_PUTS, &vec![Fault::Status(400); 1000]);
    let to = format!("gs://snap/h?endpoint={}&part-size=256KiB", proxy.endpoint());
    let out = compress_to(&src, &top, &to);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("gs://snap/h") && stderr.contains("400"),
        "{stderr}"
    );
    let names = gcs.list(BUCKET);
    assert!(
        names.iter().all(|n| !n.ends_with(".header")),
        "left behind: {names:?}"
    );

    // Without faults the chain uploads through sessions and reads back as the flat images.
    proxy.inject(CHUNK_PUTS, &[]);
    let heads = proxy.heads().len();
    let out = compress_to(&src, &top, &to);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        chunk_ranges(&proxy, heads).len() >= 2,
        "no resumable session was used"
    );
    for layer in &manifest.layers {
        for file in FileKind::ALL {
            let out_path = dir
                .path()
                .join(format!("{}-{}", layer.build_id, file.name()));
            let out = Command::new(env!("CARGO_BIN_EXE_thaw"))
                .args([
                    "read",
                    "--store",
                    &format!("gs://snap/h?endpoint={}", gcs.endpoint()),
                    "--build",
                    &layer.build_id.to_string(),
                    "--file",
                    file.name(),
                    "--output",
                    out_path.to_str().unwrap(),
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let want = std::fs::read(&layer.files[file.name()].flat).unwrap();
            assert!(
                std::fs::read(&out_path).unwrap() == want,
                "generation {} {file}: bytes differ",
                layer.generation
            );
        }
    }
}
