//! The S3 store against moto's S3 server (a real S3 implementation, on loopback): chains uploaded
//! with `thaw compress --to s3://…` read back through the engine (`thaw read`) equal to their
//! flattened images; multipart uploads; aborted and failed writers leave nothing; range reads at
//! object edges; metadata; `get` limits; `exists`/NotFound; wrong credentials.
//!
//! moto is slow (tens of ms per request, growing with object size): objects stay small.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]

#[path = "common/moto.rs"]
mod moto;
// The fault-injecting HTTP/1.1 proxy (shared with the GCS tests).
#[path = "common/gcs.rs"]
mod gcs;

use std::fs;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use gcs::{Fault, FaultProxy};
use moto::Moto;
use rand::{Rng, SeedableRng};
use thaw_codec::names::data_object;
use thaw_codec::{CompressionType, FileKind, PAGE_SIZE};
use thaw_server::chain::{ChainManifest, ChainSpec, generate};
use thaw_server::store::{FileStore, ObjectWriter, PutOptions, Store, StoreErrorKind};
use thaw_server::writer::WriteOptions;

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(v.as_mut_slice());
    v
}

fn ok(what: &str, o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{what} failed: {err}");
    err
}

/// A small plain (V3, uncompressed) 3-build chain in a local directory store.
fn plain_chain(dir: &Path, seed: u64) -> ChainManifest {
    let store = FileStore::new(dir.join("store"));
    let spec = ChainSpec {
        layers: 2,
        size: 2 * 1024 * 1024 + 5 * PAGE_SIZE,
        memfile_block_size: PAGE_SIZE,
        files: FileKind::ALL.to_vec(),
        seed,
        dirty_fraction: 0.2,
        zero_fraction: 0.05,
        write: WriteOptions {
            codec: CompressionType::None,
            level: 0,
            frame_size: 2 * 1024 * 1024,
            header_version: 3,
            workers: 2,
            progress: false,
        },
    };
    generate(&store, &dir.join("expected"), &spec).unwrap()
}

#[test]
fn chains_uploaded_by_thaw_compress_read_back_through_the_engine() {
    let Some(moto) = Moto::start(false) else {
        return;
    };
    let bucket = moto.store("chains", "");
    for (codec, name, compression, header_version) in [
        ("zstd:1", "zstd", CompressionType::Zstd, "4"),
        ("lz4", "lz4", CompressionType::Lz4, "5"),
        ("none", "none", CompressionType::None, "4"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let manifest = plain_chain(dir.path(), 7);
        let top = manifest.top().unwrap().build_id.to_string();
        let src = format!("file://{}", dir.path().join("store").display());
        let to = moto.url(&format!("chains/{name}/builds"), "part-size=5MiB");
        let out = moto
            .thaw()
            .args(["compress", "--store", &src, "--build", &top, "--recursive"])
            .args([
                "--codec",
                codec,
                "--frame-size",
                "1MiB",
                "--no-progress",
                "--to",
                &to,
                "--header-version",
                header_version,
            ])
            .output()
            .unwrap();
        ok("thaw compress --to s3://", &out);

        let s3 = moto.store(&format!("chains/{name}/builds"), "");
        for layer in &manifest.layers {
            let build = layer.build_id.to_string();
            for file in FileKind::ALL {
                let truth = &layer.files[file.name()];
                let want = fs::read(&truth.flat).unwrap();
                let got_path = dir.path().join(format!("got-{build}-{file}"));
                let out = moto
                    .thaw()
                    .args(["read", "--store", &to, "--build", &build])
                    .args(["--file", file.name(), "--output"])
                    .arg(&got_path)
                    .output()
                    .unwrap();
                ok("thaw read --store s3://", &out);
                let got = fs::read(&got_path).unwrap();
                assert!(
                    got == want,
                    "{name}: build {build} {file} read from S3 differs from its flattened image"
                );
                // Every data object carries e2b's uncompressed-size metadata (plain ones too:
                // it tells them from legacy headerless builds).
                let info = s3
                    .stat(&data_object(layer.build_id, file, compression))
                    .unwrap();
                if compression == CompressionType::None {
                    assert_eq!(info.uncompressed_size, Some(truth.diff_bytes));
                    assert_eq!(info.size, truth.diff_bytes);
                } else {
                    assert_eq!(info.uncompressed_size, Some(truth.diff_bytes));
                    assert!(info.size < truth.diff_bytes || truth.diff_bytes == 0);
                }
            }
            let out = moto
                .thaw()
                .args(["inspect", "--store", &to, "--build", &build, "--verify"])
                .output()
                .unwrap();
            ok("thaw inspect --verify --store s3://", &out);
        }
        assert_eq!(s3.list_multipart_uploads().unwrap(), Vec::<String>::new());
    }
    drop(bucket);
}

#[test]
fn multipart_uploads_read_back_and_failed_ones_leave_nothing() {
    let Some(moto) = Moto::start(false) else {
        return;
    };
    let store = moto.store("multipart/prefix", "part-size=5MiB&upload-concurrency=3");
    let data = random(12 << 20, 1);

    // 12 MiB in 5 MiB parts: three parts, invisible until committed.
    let mut w = store
        .multipart_writer("big/object", &PutOptions::with_uncompressed_size(99))
        .unwrap();
    for piece in data.chunks(1 << 20) {
        w.write_all(piece).unwrap();
    }
    assert!(w.upload_id().is_some(), "a multipart upload is under way");
    assert!(
        !store.exists("big/object").unwrap(),
        "visible before commit"
    );
    assert_eq!(store.list_multipart_uploads().unwrap(), vec!["big/object"]);
    Box::new(w).commit().unwrap();
    let info = store.stat("big/object").unwrap();
    assert_eq!(info.size, 12 << 20);
    assert_eq!(info.uncompressed_size, Some(99));
    assert_eq!(info.logical_size(), 99);
    let mut back = vec![0u8; data.len()];
    store.read_range("big/object", 0, &mut back).unwrap();
    assert!(
        back == data,
        "the multipart object differs from what was written"
    );
    assert_eq!(
        store.list_multipart_uploads().unwrap(),
        Vec::<String>::new()
    );

    // put() of more than one part goes through multipart too.
    store
        .put("big/put", &data[..(6 << 20) + 1], &PutOptions::default())
        .unwrap();
    assert!(store.get("big/put", u64::MAX).unwrap() == data[..(6 << 20) + 1]);

    // A writer dropped uncommitted aborts its upload.
    let mut w = store
        .multipart_writer("big/dropped", &PutOptions::default())
        .unwrap();
    w.write_all(&data[..6 << 20]).unwrap();
    assert!(w.upload_id().is_some());
    assert_eq!(store.list_multipart_uploads().unwrap(), vec!["big/dropped"]);
    drop(w);
    assert_eq!(
        store.list_multipart_uploads().unwrap(),
        Vec::<String>::new()
    );
    assert!(!store.exists("big/dropped").unwrap());

    // A writer whose upload fails (aborted behind its back after the first part) fails, and
    // leaves neither an object nor an upload. (moto answers the orphaned UploadPart with a 500
    // rather than S3's 404 NoSuchUpload; 500s are retried, so this store handle allows only 2
    // attempts.)
    let impatient = moto.store("multipart/prefix", "part-size=5MiB&attempts=2");
    let mut w = impatient
        .multipart_writer("big/failed", &PutOptions::default())
        .unwrap();
    w.write_all(&data[..5 << 20]).unwrap();
    let id = w.upload_id().unwrap().to_owned();
    store.abort_multipart_upload("big/failed", &id).unwrap();
    let res = w
        .write_all(&data[5 << 20..])
        .map_err(|e| e.to_string())
        .and_then(|()| Box::new(w).commit().map_err(|e| e.to_string()));
    let err = res.unwrap_err();
    // Part 1 may still be in flight when the upload is aborted: either part fails.
    assert!(err.contains("UploadPart "), "{err}");
    assert!(err.contains("s3://multipart/prefix"), "{err}");
    assert!(err.contains("big/failed"), "{err}");
    assert!(!store.exists("big/failed").unwrap());
    assert_eq!(
        store.list_multipart_uploads().unwrap(),
        Vec::<String>::new()
    );

    // Small streamed objects are one PUT at commit, with their metadata.
    let mut w = store
        .create("small", &PutOptions::with_uncompressed_size(5))
        .unwrap();
    w.write_all(b"tiny").unwrap();
    assert!(!store.exists("small").unwrap());
    w.commit().unwrap();
    assert_eq!(store.get("small", 4).unwrap(), b"tiny");
    assert_eq!(store.stat("small").unwrap().logical_size(), 5);
}

#[test]
fn range_reads_metadata_limits_and_missing_objects() {
    let Some(moto) = Moto::start(false) else {
        return;
    };
    let store = moto.store("edges/p", "");
    let len = 100_003usize;
    let data = random(len, 2);
    store
        .put("obj", &data, &PutOptions::with_uncompressed_size(123_456))
        .unwrap();
    let n = len as u64;

    // First byte, last byte, the whole object, a middle range.
    let mut b = [0u8; 1];
    store.read_range("obj", 0, &mut b).unwrap();
    assert_eq!(b[0], data[0]);
    store.read_range("obj", n - 1, &mut b).unwrap();
    assert_eq!(b[0], data[len - 1]);
    let mut all = vec![0u8; len];
    let mut reported = Vec::new();
    store
        .read_range_progress("obj", 0, &mut all, &mut |k| reported.push(k))
        .unwrap();
    assert!(all == data);
    assert_eq!(reported.last(), Some(&len));
    assert!(reported.windows(2).all(|w| w[0] <= w[1]));
    let mut mid = vec![0u8; 4096];
    store.read_range("obj", 50_000, &mut mid).unwrap();
    assert!(mid == data[50_000..54_096]);

    // Across the end, at the end, past the end: errors, never data.
    for (offset, size) in [(n - 10, 20usize), (n, 1), (n + 100, 5)] {
        let mut buf = vec![0u8; size];
        let err = store.read_range("obj", offset, &mut buf).unwrap_err();
        assert_eq!(
            err.kind(),
            StoreErrorKind::Truncated,
            "[{offset}, +{size}): {err}"
        );
        assert!(err.to_string().contains("obj"), "{err}");
    }
    // An empty range reads nothing.
    store.read_range("obj", n, &mut []).unwrap();

    // A stream stopped by its sink returns what it delivered.
    let mut seen = 0u64;
    let got = store
        .read_stream("obj", 0, n, &mut |piece| {
            seen += piece.len() as u64;
            ControlFlow::Break(())
        })
        .unwrap();
    assert_eq!(got, seen);
    assert!(got > 0 && got <= n);

    // Metadata: stat prefers uncompressed-size; a plain object has none.
    let info = store.stat("obj").unwrap();
    assert_eq!((info.size, info.uncompressed_size), (n, Some(123_456)));
    assert_eq!(info.logical_size(), 123_456);
    store
        .put("plain", &data[..1000], &PutOptions::default())
        .unwrap();
    let info = store.stat("plain").unwrap();
    assert_eq!((info.size, info.uncompressed_size), (1000, None));
    assert_eq!(info.logical_size(), 1000);

    // get: the limit is enforced before the body is read.
    assert!(store.get("obj", n).unwrap() == data);
    let err = store.get("obj", n - 1).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::TooLarge, "{err}");
    store.put("empty", b"", &PutOptions::default()).unwrap();
    assert_eq!(store.get("empty", 0).unwrap(), b"");
    assert_eq!(store.stat("empty").unwrap().size, 0);

    // Keys that need encoding round-trip (the signature covers the encoded path).
    let odd = "odd dir/a+b=c&d~e(1)/ü.bin";
    store.put(odd, b"odd", &PutOptions::default()).unwrap();
    assert_eq!(store.get(odd, 10).unwrap(), b"odd");
    assert!(store.exists(odd).unwrap());

    // Missing objects: NotFound everywhere, exists is false; bad keys are refused.
    assert!(store.exists("obj").unwrap());
    assert!(!store.exists("missing").unwrap());
    for err in [
        store.stat("missing").unwrap_err(),
        store.get("missing", 100).unwrap_err(),
        store.read_range("missing", 0, &mut [0u8; 4]).unwrap_err(),
    ] {
        assert_eq!(err.kind(), StoreErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
    }
    let before = store.http_stats();
    let _ = store.stat("missing");
    assert_eq!(
        store.http_stats().retries,
        before.retries,
        "404 is not retried"
    );
    assert_eq!(
        store.stat("../x").unwrap_err().kind(),
        StoreErrorKind::InvalidKey
    );

    // Unsigned requests are refused (moto: 403), and the error says they were unsigned.
    let anon = moto.store_as(&moto.url("edges/p", ""), None);
    let err = anon.get("obj", n).unwrap_err().to_string();
    assert!(err.contains("403") && err.contains("unsigned"), "{err}");
}

#[test]
fn wrong_credentials_are_a_clear_error() {
    let Some(moto) = Moto::start(true) else {
        return;
    };
    let url = moto.url("locked/p", "");
    let store = moto.store_as(&url, Some(("wrong", "wrong")));
    let before = store.http_stats();
    let err = store.stat("b/rootfs.ext4.header").unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&url), "{text}");
    assert!(text.contains("InvalidAccessKeyId"), "{text}");
    assert!(text.contains("403"), "{text}");
    assert_eq!(
        store.http_stats().retries,
        before.retries,
        "403 is not retried"
    );
    eprintln!("stat with a wrong key: {text}");
    let err = store.put("k", b"x", &PutOptions::default()).unwrap_err();
    eprintln!("put with a wrong key: {err}");
    assert!(err.to_string().contains("InvalidAccessKeyId"), "{err}");

    // Through the CLI: one line naming the store and the S3 error code.
    let out = moto
        .thaw()
        .env("AWS_ACCESS_KEY_ID", "wrong")
        .args(["inspect", "--store", &url, "--build"])
        .arg(uuid::Uuid::new_v4().to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("s3://locked/p"), "{stderr}");
    assert!(stderr.contains("InvalidAccessKeyId"), "{stderr}");
}

#[test]
fn faults_on_ranged_gets_are_retried_and_never_served() {
    let Some(moto) = Moto::start(false) else {
        return;
    };
    let direct = moto.store("faults/p", "");
    let len = 300_000usize;
    let data = random(len, 3);
    direct.put("obj", &data, &PutOptions::default()).unwrap();
    let port: u16 = moto.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = FaultProxy::start(port);
    let url = format!(
        "s3://faults/p?endpoint={}&idle-timeout=300ms&first-byte-timeout=300ms",
        proxy.endpoint()
    );
    let store = moto.store_as(&url, Some((moto::ACCESS_KEY, moto::SECRET_KEY)));

    // B1 (503, 429), B4 (a truncated body, a reset), B3/B5 (a hang, a stalled body): each
    // retried, reads resume where delivery stopped, and the result is exact.
    proxy.inject(
        "GET /faults/p/obj",
        &[
            Fault::Status(503),
            Fault::Status(429),
            Fault::Truncate { bytes: 10_000 },
            Fault::Reset { bytes: 20_000 },
            Fault::Hang(Duration::from_millis(600)),
            Fault::Slow {
                bytes: 30_000,
                stall: Duration::from_millis(600),
            },
        ],
    );
    let before = store.http_stats();
    let mut got = vec![0u8; len];
    let mut pieces = Vec::new();
    store
        .read_range_progress("obj", 0, &mut got, &mut |n| pieces.push(n))
        .unwrap();
    assert!(got == data, "a faulty transfer changed the bytes");
    assert_eq!(proxy.pending(), 0, "every fault was met");
    assert_eq!(store.http_stats().retries - before.retries, 6);
    assert!(pieces.windows(2).all(|w| w[0] <= w[1]));
    // Resumed reads ask for the rest, not the whole object again.
    let log = proxy.log();
    assert!(
        log.iter().any(|l| l.contains("range=bytes=10000-299999")),
        "{log:?}"
    );

    // Past the attempts: an error naming the store, the key and the last cause; the sink only
    // ever got real bytes of the object.
    let strict = moto.store_as(
        &format!("s3://faults/p?endpoint={}&attempts=2", proxy.endpoint()),
        Some((moto::ACCESS_KEY, moto::SECRET_KEY)),
    );
    proxy.inject(
        "GET /faults/p/obj",
        &[
            Fault::Truncate { bytes: 1000 },
            Fault::Truncate { bytes: 1000 },
        ],
    );
    let mut delivered = Vec::new();
    let err = strict
        .read_stream("obj", 0, len as u64, &mut |piece| {
            delivered.extend_from_slice(piece);
            ControlFlow::Continue(())
        })
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("s3://faults/p") && text.contains("obj"),
        "{text}"
    );
    assert!(text.contains("2 attempts"), "{text}");
    assert!(
        delivered == data[..delivered.len()],
        "bytes not of the object were delivered"
    );

    // A 404 is not retried.
    proxy.reset_counts();
    proxy.inject("GET /faults/p/obj", &[Fault::Status(404)]);
    let err = store.read_range("obj", 0, &mut [0u8; 10]).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::NotFound, "{err}");
    assert_eq!(proxy.requests(), 1);
}

#[test]
fn moto_checks_our_signatures() {
    // Authentication enforced after 3 free actions (the IAM setup): every request below is
    // checked against its SigV4 signature.
    let Some(moto) = Moto::start_with(Some(3)) else {
        return;
    };
    let (id, secret) = moto::iam_credentials(&moto);
    let url = moto.url("signed/p", "part-size=5MiB");
    let store = moto.store_as(&url, Some((&id, &secret)));
    store.create_bucket().unwrap();
    // Keys that need encoding, metadata headers, ranges, HEAD, multipart: all signed right.
    let odd = "odd dir/a+b=c&d~e(1)/ü.bin";
    store
        .put(odd, b"signed", &PutOptions::with_uncompressed_size(6))
        .unwrap();
    assert_eq!(store.get(odd, 10).unwrap(), b"signed");
    assert_eq!(store.stat(odd).unwrap().logical_size(), 6);
    let mut b = [0u8; 3];
    store.read_range(odd, 2, &mut b).unwrap();
    assert_eq!(&b, b"gne");
    let data = random((5 << 20) + 100, 4);
    let mut w = store
        .create("big", &PutOptions::with_uncompressed_size(1))
        .unwrap();
    w.write_all(&data).unwrap();
    w.commit().unwrap();
    assert!(store.get("big", u64::MAX).unwrap() == data);
    assert_eq!(
        store.list_multipart_uploads().unwrap(),
        Vec::<String>::new()
    );

    // The right key with a wrong secret: SignatureDoesNotMatch, named.
    let forged = moto.store_as(&url, Some((&id, "not-the-secret")));
    let err = forged.get(odd, 10).unwrap_err().to_string();
    assert!(err.contains("SignatureDoesNotMatch"), "{err}");
    assert!(err.contains("s3://signed/p"), "{err}");
}
