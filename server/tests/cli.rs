//! `thaw compress` and `thaw inspect` on a small 3-layer chain.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]

mod common;

use std::fs;

use common::{Layer, path_str, plain_v3, temp_store, thaw, three_layer_chain};
use thaw_codec::names::{data_object, header_object, metadata_object, snapfile_object};
use thaw_codec::{CompressionType, FileKind, Header};
use thaw_server::flatten::read_flat;
use thaw_server::layout::MAX_HEADER_LEN;
use thaw_server::store::{FileStore, PutOptions, Store};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn run_ok(args: &[&str]) -> String {
    let o = thaw(args);
    assert!(
        o.status.success(),
        "thaw {args:?} failed:\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

fn check_layers(store: &dyn Store, file: FileKind, layers: &[Layer]) {
    for (i, l) in layers.iter().enumerate() {
        let flat = read_flat(store, l.build, file).unwrap();
        assert!(
            flat == l.model,
            "{file} layer {i} ({}) differs from the model",
            l.build
        );
    }
}

fn header(store: &dyn Store, layer: &Layer, file: FileKind) -> Header {
    let bytes = store
        .get(&header_object(layer.build, file), MAX_HEADER_LEN)
        .unwrap();
    Header::parse(&bytes).unwrap()
}

fn compress_and_verify(codec: &str, ct: CompressionType) {
    let (dir, store) = temp_store();
    let root = path_str(dir.path());
    let (rootfs, memfile) = three_layer_chain(&store, &plain_v3());
    let top = rootfs[2].build.to_string();
    let mem_top = memfile[2].build.to_string();
    // The rootfs and memfile chains have different build ids; compress both tops.
    let out = run_ok(&[
        "compress",
        "--store",
        root,
        "--build",
        &top,
        "--file",
        "rootfs.ext4",
        "--codec",
        codec,
        "--recursive",
        "--frame-size",
        "64KiB",
        "--workers",
        "2",
    ]);
    assert_eq!(out.lines().count(), 3, "one summary line per layer: {out}");
    assert!(out.contains(&format!("{top}/rootfs.ext4: ")), "{out}");
    assert!(out.contains("frames"), "{out}");
    run_ok(&[
        "compress",
        "--store",
        root,
        "--build",
        &mem_top,
        "--codec",
        codec,
        "--recursive",
        "--frame-size",
        "64KiB",
        "--header-version",
        "5",
    ]);

    for (file, layers) in [(FileKind::Rootfs, &rootfs), (FileKind::Memfile, &memfile)] {
        for l in layers.iter() {
            let out = run_ok(&[
                "inspect",
                "--store",
                root,
                "--build",
                &l.build.to_string(),
                "--verify",
            ]);
            assert!(out.contains("verify: OK"), "{out}");
            let h = header(&store, l, file);
            let top_header = header(&store, &layers[2], file);
            if l.build != layers[2].build && !top_header.referenced_builds().contains(&l.build) {
                // Not referenced by the chain (the all-zeros memfile base): left as it was.
                assert_eq!(h.metadata.version, 3);
                continue;
            }
            let own = h.build_data(&l.build).expect("self entry");
            assert_eq!(own.frames.compression(), ct);
            // Every ancestor the mappings reference has a compressed entry with a real table.
            for b in h.referenced_builds() {
                let e = h.build_data(&b).expect("entry for every referenced build");
                assert_eq!(e.frames.compression(), ct, "{file} {} -> {b}", l.build);
                assert!(!e.frames.frames().is_empty() || e.size == 0);
            }
        }
        check_layers(&store, file, layers);
    }
    // The rootfs base is compressed too; its zstd/lz4 object has the uncompressed-size sidecar.
    let obj = data_object(rootfs[0].build, FileKind::Rootfs, ct);
    assert_eq!(
        store.stat(&obj).unwrap().uncompressed_size,
        Some(1024 * 1024)
    );

    // A second run skips what is already compressed.
    let out = run_ok(&[
        "compress",
        "--store",
        root,
        "--build",
        &top,
        "--codec",
        codec,
        "--recursive",
    ]);
    assert!(out.contains("already compressed"), "{out}");
    assert!(
        out.contains(&format!("{top}/memfile: absent, skipped")),
        "{out}"
    );
}

#[test]
fn compress_recursive_zstd_then_verify() {
    compress_and_verify("zstd:2", CompressionType::Zstd);
}

#[test]
fn compress_recursive_lz4_then_verify() {
    compress_and_verify("lz4", CompressionType::Lz4);
}

#[test]
fn verify_names_the_corrupt_frame() {
    let (dir, store) = temp_store();
    let root = path_str(dir.path());
    let (rootfs, _) = three_layer_chain(&store, &plain_v3());
    let top = &rootfs[2];
    let id = top.build.to_string();
    run_ok(&[
        "compress",
        "--store",
        root,
        "--build",
        &id,
        "--file",
        "rootfs",
        "--codec",
        "zstd:1",
        "--frame-size",
        "64KiB",
    ]);
    run_ok(&["inspect", "--store", root, "--build", &id, "--verify"]);
    let h = header(&store, top, FileKind::Rootfs);
    let frames = h.build_data(&top.build).unwrap().frames.frames().to_vec();
    assert!(frames.len() >= 3, "{} frames", frames.len());
    let f = frames[2];
    let path = dir.path().join(data_object(
        top.build,
        FileKind::Rootfs,
        CompressionType::Zstd,
    ));
    let mut bytes = fs::read(&path).unwrap();
    let at = usize::try_from(f.start_c + u64::from(f.size_c) / 2).unwrap();
    bytes[at] ^= 0x40;
    fs::write(&path, &bytes).unwrap();

    let o = thaw(&[
        "inspect",
        "--store",
        root,
        "--build",
        &id,
        "--file",
        "rootfs.ext4",
        "--verify",
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
    assert!(err.contains("frame 2"), "{err}");
    assert!(err.contains(&format!("C offset {}", f.start_c)), "{err}");
    assert!(err.contains(&format!("U offset {}", f.start_u)), "{err}");
    assert!(err.contains(&id), "{err}");
    // Without --verify, inspect still works (it does not read data).
    run_ok(&["inspect", "--store", root, "--build", &id]);
}

#[test]
fn verify_detects_a_checksum_mismatch_in_plain_data() {
    let (dir, store) = temp_store();
    let root = path_str(dir.path());
    let (rootfs, _) = three_layer_chain(&store, &plain_v3());
    let top = &rootfs[2];
    let id = top.build.to_string();
    // A V4 header with a plain object and a checksum: codec none.
    run_ok(&[
        "compress",
        "--store",
        root,
        "--build",
        &id,
        "--file",
        "rootfs.ext4",
        "--codec",
        "none",
    ]);
    run_ok(&["inspect", "--store", root, "--build", &id, "--verify"]);
    let path = dir.path().join(data_object(
        top.build,
        FileKind::Rootfs,
        CompressionType::None,
    ));
    let mut bytes = fs::read(&path).unwrap();
    bytes[5] ^= 1;
    fs::write(&path, &bytes).unwrap();
    let o = thaw(&["inspect", "--store", root, "--build", &id, "--verify"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("SHA-256 mismatch"), "{}", stderr(&o));
}

#[test]
fn compress_to_another_store() {
    let (src_dir, src) = temp_store();
    let (dst_dir, _) = temp_store();
    let dst = FileStore::new(dst_dir.path().to_path_buf());
    let (rootfs, _) = three_layer_chain(&src, &plain_v3());
    let top = rootfs[2].build;
    let src_url = path_str(src_dir.path());
    src.put(&snapfile_object(top), b"vm state", &PutOptions::default())
        .unwrap();
    src.put(
        &metadata_object(rootfs[0].build),
        b"{\"version\":1}",
        &PutOptions::default(),
    )
    .unwrap();
    // The base is already compressed in the source: it is copied as is, not re-encoded.
    run_ok(&[
        "compress",
        "--store",
        src_url,
        "--build",
        &rootfs[0].build.to_string(),
        "--codec",
        "lz4",
    ]);
    let to = format!("file://{}", dst_dir.path().display());
    let out = run_ok(&[
        "compress",
        "--store",
        src_url,
        "--build",
        &top.to_string(),
        "--codec",
        "zstd:3",
        "--recursive",
        "--to",
        &to,
        "--frame-size",
        "128KiB",
    ]);
    assert!(out.contains("already compressed (lz4), copied to"), "{out}");
    check_layers(&dst, FileKind::Rootfs, &rootfs);
    assert_eq!(
        header(&dst, &rootfs[0], FileKind::Rootfs),
        header(&src, &rootfs[0], FileKind::Rootfs)
    );
    let lz4 = data_object(rootfs[0].build, FileKind::Rootfs, CompressionType::Lz4);
    assert_eq!(dst.stat(&lz4).unwrap(), src.stat(&lz4).unwrap());
    for l in &rootfs {
        run_ok(&[
            "inspect",
            "--store",
            &to,
            "--build",
            &l.build.to_string(),
            "--verify",
        ]);
    }
    // The source store is untouched apart from the base: still plain V3.
    for l in &rootfs[1..] {
        assert_eq!(header(&src, l, FileKind::Rootfs).metadata.version, 3);
    }
    // The top's entry for the base, in the destination, describes the lz4 object.
    let top_in_dst = header(&dst, &rootfs[2], FileKind::Rootfs);
    let base_entry = top_in_dst.build_data(&rootfs[0].build).unwrap();
    assert_eq!(base_entry.frames.compression(), CompressionType::Lz4);
    let mid_entry = top_in_dst.build_data(&rootfs[1].build).unwrap();
    assert_eq!(mid_entry.frames.compression(), CompressionType::Zstd);
    assert_eq!(dst.get(&snapfile_object(top), 100).unwrap(), b"vm state");
    assert_eq!(
        dst.get(&metadata_object(rootfs[0].build), 100).unwrap(),
        b"{\"version\":1}"
    );
    check_layers(&src, FileKind::Rootfs, &rootfs);
}

#[test]
fn inspect_json_parses() {
    let (dir, store) = temp_store();
    let root = path_str(dir.path());
    let (rootfs, memfile) = three_layer_chain(&store, &plain_v3());
    let id = rootfs[1].build.to_string();
    run_ok(&[
        "compress",
        "--store",
        root,
        "--build",
        &id,
        "--codec",
        "lz4",
        "--recursive",
    ]);
    let out = run_ok(&[
        "inspect",
        "--store",
        root,
        "--build",
        &id,
        "--json",
        "--mappings",
        "--frames",
        "--verify",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "only rootfs.ext4 exists for this build");
    let f = &files[0];
    assert_eq!(f["file"], "rootfs.ext4");
    assert_eq!(f["header"]["build_id"], id.as_str());
    assert_eq!(f["header"]["format"], 4);
    assert_eq!(f["header"]["generation"], 1);
    assert_eq!(f["header"]["size"], 1024 * 1024);
    assert_eq!(f["builds"].as_array().unwrap().len(), 2);
    assert!(
        f["builds"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["is_self"] == true && b["codec"] == "lz4")
    );
    assert_eq!(
        f["mapping_summary"]["entries"].as_u64().unwrap(),
        u64::try_from(f["mappings"].as_array().unwrap().len()).unwrap()
    );
    assert_eq!(f["mapping_summary"]["zero_bytes"], 10 * 4096);
    assert_eq!(f["verify"]["sha256_checked"], true);
    assert!(f["frames"].as_array().unwrap().len() == 2);

    // Text mode lists mappings and frames.
    let out = run_ok(&[
        "inspect",
        "--store",
        root,
        "--build",
        &id,
        "--mappings",
        "--frames",
    ]);
    assert!(out.contains("-> zeros"), "{out}");
    assert!(out.contains("frames of"), "{out}");
    // A V3 build inspects too (memfile chain untouched).
    let out = run_ok(&[
        "inspect",
        "--store",
        root,
        "--build",
        &memfile[2].build.to_string(),
        "--json",
        "--verify",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["files"][0]["header"]["format"], 3);
}

#[test]
fn legacy_headerless_build() {
    let (dir, store) = temp_store();
    let root = path_str(dir.path());
    let build = uuid::Uuid::new_v4();
    let data = common::test_data(11, 300 * 1024 + 100);
    store
        .put(
            &data_object(build, FileKind::Rootfs, CompressionType::None),
            &data,
            &PutOptions::default(),
        )
        .unwrap();
    assert_eq!(read_flat(&store, build, FileKind::Rootfs).unwrap(), data);
    let out = run_ok(&[
        "inspect",
        "--store",
        root,
        "--build",
        &build.to_string(),
        "--verify",
    ]);
    assert!(out.contains("legacy"), "{out}");
    run_ok(&[
        "compress",
        "--store",
        root,
        "--build",
        &build.to_string(),
        "--codec",
        "zstd",
        "--frame-size",
        "64KiB",
    ]);
    let h = Header::parse(
        &store
            .get(&header_object(build, FileKind::Rootfs), MAX_HEADER_LEN)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(h.metadata.generation, 1);
    assert_eq!(h.metadata.size, 300 * 1024 + 100);
    assert_eq!(read_flat(&store, build, FileKind::Rootfs).unwrap(), data);
    run_ok(&[
        "inspect",
        "--store",
        root,
        "--build",
        &build.to_string(),
        "--verify",
    ]);
}

#[test]
fn errors_are_one_line_and_non_zero() {
    let (dir, _) = temp_store();
    let root = path_str(dir.path());
    let id = uuid::Uuid::new_v4().to_string();
    let o = thaw(&["inspect", "--store", root, "--build", &id]);
    assert!(!o.status.success());
    assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
    let o = thaw(&[
        "compress",
        "--store",
        "ftp://bucket",
        "--build",
        &id,
        "--codec",
        "lz4",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not supported yet"), "{}", stderr(&o));
    let o = thaw(&[
        "compress", "--store", root, "--build", &id, "--codec", "gzip",
    ]);
    assert!(!o.status.success());
}
