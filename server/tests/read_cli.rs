//! `thaw read`: the engine from the command line; the shared cache written by one process is
//! used by the next; corrupt cache files fall through; an unwritable cache costs nothing but
//! the write-back (catalogue B6, B8).
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use thaw_codec::{CompressionType, FileKind, PAGE_SIZE};
use thaw_server::chain::{ChainManifest, ChainSpec, generate};
use thaw_server::store::FileStore;
use thaw_server::writer::WriteOptions;

fn chain(dir: &Path, codec: CompressionType) -> ChainManifest {
    let store = FileStore::new(dir.join("store"));
    let spec = ChainSpec {
        layers: 2,
        size: 9 * 1024 * 1024,
        memfile_block_size: PAGE_SIZE,
        files: FileKind::ALL.to_vec(),
        seed: 7,
        dirty_fraction: 0.2,
        zero_fraction: 0.05,
        write: WriteOptions {
            codec,
            level: 1,
            frame_size: 2 * 1024 * 1024,
            header_version: 4,
            workers: 2,
            progress: false,
        },
    };
    generate(&store, &dir.join("expected"), &spec).unwrap()
}

fn thaw_read(dir: &Path, build: &str, extra: &[&str], out: &Path) -> Output {
    let store = format!("file://{}", dir.join("store").display());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thaw"));
    cmd.args(["read", "--store", &store, "--build", build, "--output"])
        .arg(out)
        .args(extra);
    cmd.output().unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "thaw read failed: {err}");
    err
}

/// The counter after `label` in the summary line (`... 5 from --shared-cache ...`).
fn count(summary: &str, label: &str) -> u64 {
    let i = summary
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} in {summary}"));
    summary[..i]
        .split_whitespace()
        .last()
        .and_then(|n| n.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("number before {label:?} in {summary}"))
}

#[test]
fn a_shared_cache_written_by_one_process_serves_the_next() {
    for codec in [CompressionType::Zstd, CompressionType::None] {
        let dir = tempfile::tempdir().unwrap();
        let manifest = chain(dir.path(), codec);
        let top = manifest.top().unwrap();
        let build = top.build_id.to_string();
        let want = fs::read(&top.files["rootfs.ext4"].flat).unwrap();
        let shared = dir.path().join("nfs");
        let shared_arg = shared.to_str().unwrap();
        let out = dir.path().join("out");

        let first = ok(&thaw_read(
            dir.path(),
            &build,
            &["--shared-cache", shared_arg],
            &out,
        ));
        assert_eq!(fs::read(&out).unwrap(), want, "{codec:?}: first process");
        assert!(count(&first, "written back") > 0, "{first}");
        assert_eq!(count(&first, "from --shared-cache"), 0, "{first}");

        let second = ok(&thaw_read(
            dir.path(),
            &build,
            &["--shared-cache", shared_arg],
            &out,
        ));
        assert_eq!(fs::read(&out).unwrap(), want, "{codec:?}: second process");
        assert!(count(&second, "from --shared-cache") > 0, "{second}");
        assert_eq!(count(&second, "store requests"), 0, "{codec:?}: {second}");

        // A local --cache-dir in front: filled from the shared cache, then used alone.
        let local = dir.path().join("local");
        let local_arg = local.to_str().unwrap();
        let both = ["--cache-dir", local_arg, "--shared-cache", shared_arg];
        let third = ok(&thaw_read(dir.path(), &build, &both, &out));
        assert_eq!(fs::read(&out).unwrap(), want);
        assert_eq!(count(&third, "store requests"), 0, "{third}");
        let fourth = ok(&thaw_read(dir.path(), &build, &both, &out));
        assert!(count(&fourth, "from --cache-dir") > 0, "{fourth}");
        assert_eq!(count(&fourth, "from --shared-cache"), 0, "{fourth}");
        // Every write-back finished before the processes exited: no temp or lock files.
        let leftovers: Vec<_> = walk(&shared)
            .into_iter()
            .chain(walk(&local))
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.ends_with(".lock") || n.contains(".tmp.") || n.contains(".temp.")
            })
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[test]
fn truncated_cache_files_fall_through_to_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = chain(dir.path(), CompressionType::Zstd);
    let top = manifest.top().unwrap();
    let build = top.build_id.to_string();
    let want = fs::read(&top.files["rootfs.ext4"].flat).unwrap();
    let shared = dir.path().join("nfs");
    let args = ["--shared-cache", shared.to_str().unwrap()];
    let out = dir.path().join("out");
    ok(&thaw_read(dir.path(), &build, &args, &out));
    // Truncate every frame file (B6: a cache file cut short, e.g. by a crashed writer on NFS).
    let mut cut = 0;
    for p in walk(&shared) {
        if p.extension().is_some_and(|e| e == "frm") {
            let len = fs::metadata(&p).unwrap().len();
            let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(len / 2).unwrap();
            cut += 1;
        }
    }
    assert!(cut > 0);
    let summary = ok(&thaw_read(dir.path(), &build, &args, &out));
    assert_eq!(fs::read(&out).unwrap(), want);
    assert_eq!(count(&summary, "from --shared-cache"), 0, "{summary}");
    assert!(count(&summary, "store requests") > 0, "{summary}");
}

#[test]
fn cache_files_replaced_by_other_frames_are_never_served() {
    // B9: a cache file replaced under its name (another node's bug, a restore from backup...):
    // each .frm file gets the bytes of a different frame. Sizes differ, or the content checksum
    // does: every one is refused and deleted, the bytes come from the store.
    let dir = tempfile::tempdir().unwrap();
    let manifest = chain(dir.path(), CompressionType::Zstd);
    let top = manifest.top().unwrap();
    let build = top.build_id.to_string();
    let want = fs::read(&top.files["rootfs.ext4"].flat).unwrap();
    let shared = dir.path().join("nfs");
    let args = ["--shared-cache", shared.to_str().unwrap()];
    let out = dir.path().join("out");
    ok(&thaw_read(dir.path(), &build, &args, &out));
    let mut frames: Vec<_> = walk(&shared)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "frm"))
        .collect();
    frames.sort();
    assert!(frames.len() >= 2, "{frames:?}");
    let contents: Vec<Vec<u8>> = frames.iter().map(|p| fs::read(p).unwrap()).collect();
    for (i, p) in frames.iter().enumerate() {
        fs::write(p, &contents[(i + 1) % contents.len()]).unwrap();
    }
    let summary = ok(&thaw_read(dir.path(), &build, &args, &out));
    assert_eq!(
        fs::read(&out).unwrap(),
        want,
        "a replaced cache file was served"
    );
    assert_eq!(count(&summary, "from --shared-cache"), 0, "{summary}");
    // They were deleted and written back fresh: a third process is served from the cache.
    let third = ok(&thaw_read(dir.path(), &build, &args, &out));
    assert_eq!(fs::read(&out).unwrap(), want);
    assert_eq!(count(&third, "store requests"), 0, "{third}");
}

#[test]
fn an_unwritable_cache_directory_serves_from_the_store() {
    // B8: the cache tier cannot take writes (here: a path whose parent is a file, so every
    // create fails with ENOTDIR; as root, permission bits would not stop us).
    let dir = tempfile::tempdir().unwrap();
    let manifest = chain(dir.path(), CompressionType::Zstd);
    let top = manifest.top().unwrap();
    let build = top.build_id.to_string();
    let want = fs::read(&top.files["rootfs.ext4"].flat).unwrap();
    let shared = dir.path().join("nfs");
    fs::create_dir_all(&shared).unwrap();
    // Every build's cache directory is a file: nothing can be written under them.
    for layer in &manifest.layers {
        fs::write(shared.join(layer.build_id.to_string()), b"not a directory").unwrap();
    }
    let out = dir.path().join("out");
    let summary = ok(&thaw_read(
        dir.path(),
        &build,
        &["--shared-cache", shared.to_str().unwrap()],
        &out,
    ));
    assert_eq!(fs::read(&out).unwrap(), want);
    assert_eq!(count(&summary, "written back"), 0, "{summary}");
    assert_eq!(count(&summary, "errors"), 0, "{summary}");
    assert_eq!(
        walk(&shared).len(),
        manifest.layers.len(),
        "no partial files"
    );
}

#[test]
fn bad_arguments_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = chain(dir.path(), CompressionType::Lz4);
    let top = manifest.top().unwrap().build_id.to_string();
    let out = dir.path().join("out");
    let o = thaw_read(
        dir.path(),
        &top,
        &["--offset", "1GiB", "--length", "4096"],
        &out,
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("outside the file"), "{err}");
    let missing = uuid::Uuid::new_v4().to_string();
    let o = thaw_read(dir.path(), &missing, &[], &out);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&missing) && err.contains("has no rootfs.ext4"),
        "{err}"
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
