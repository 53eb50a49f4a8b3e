//! The local directory store: atomic writes, streaming writers, key checks, reads.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]

mod common;

use std::fs;
use std::io::Write;

use common::temp_store;
use thaw_server::store::{PutOptions, Store, StoreErrorKind, open_store};

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn put_is_atomic_and_leaves_no_temp_files() {
    let (dir, store) = temp_store();
    store
        .put("b/obj", b"first", &PutOptions::default())
        .unwrap();
    store
        .put("b/obj", b"second!", &PutOptions::default())
        .unwrap();
    assert_eq!(names(&dir.path().join("b")), ["obj"]);
    assert_eq!(store.get("b/obj", 100).unwrap(), b"second!");
    assert_eq!(store.stat("b/obj").unwrap().size, 7);
    assert!(store.exists("b/obj").unwrap());
    assert!(!store.exists("b/other").unwrap());
}

#[test]
fn create_commit_and_drop() {
    let (dir, store) = temp_store();
    let mut w = store.create("x/y/data", &PutOptions::default()).unwrap();
    w.write_all(b"partial").unwrap();
    // Nothing under the final name until commit.
    assert!(!store.exists("x/y/data").unwrap());
    assert_eq!(
        store.stat("x/y/data").unwrap_err().kind(),
        StoreErrorKind::NotFound
    );
    w.write_all(b" and the rest").unwrap();
    w.commit().unwrap();
    assert_eq!(
        store.get("x/y/data", 1024).unwrap(),
        b"partial and the rest"
    );
    assert_eq!(names(&dir.path().join("x/y")), ["data"]);

    // A dropped writer leaves nothing, not even over an existing object.
    let mut w = store.create("x/y/data", &PutOptions::default()).unwrap();
    w.write_all(b"garbage").unwrap();
    drop(w);
    assert_eq!(names(&dir.path().join("x/y")), ["data"]);
    assert_eq!(
        store.get("x/y/data", 1024).unwrap(),
        b"partial and the rest"
    );
}

#[test]
fn path_traversal_is_rejected() {
    let (dir, store) = temp_store();
    let outside = dir.path().parent().unwrap().join("thaw-escape-test");
    for key in [
        "../thaw-escape-test",
        "a/../../x",
        "/etc/passwd",
        "a//b",
        "",
        "a/./b",
    ] {
        let e = store.put(key, b"x", &PutOptions::default()).unwrap_err();
        assert_eq!(e.kind(), StoreErrorKind::InvalidKey, "{key:?}");
        assert_eq!(
            store.get(key, 10).unwrap_err().kind(),
            StoreErrorKind::InvalidKey
        );
        assert_eq!(
            store.exists(key).unwrap_err().kind(),
            StoreErrorKind::InvalidKey
        );
        assert!(store.create(key, &PutOptions::default()).is_err());
        let mut buf = [0u8; 1];
        assert!(store.read_range(key, 0, &mut buf).is_err());
    }
    assert!(!outside.exists());
}

#[test]
fn short_read_is_an_error_never_data() {
    let (_dir, store) = temp_store();
    store
        .put("b/o", &[7u8; 100], &PutOptions::default())
        .unwrap();
    let mut buf = [0u8; 50];
    store.read_range("b/o", 50, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 50]);
    let mut buf = [0u8; 51];
    let e = store.read_range("b/o", 50, &mut buf).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Truncated);
    assert!(e.to_string().contains("b/o"), "{e}");
    assert!(e.to_string().contains("file://"), "{e}");
    let e = store.read_range("b/o", u64::MAX - 2, &mut buf).unwrap_err();
    assert_ne!(e.kind(), StoreErrorKind::NotFound);
    let e = store.read_range("b/missing", 0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::NotFound);
}

#[test]
fn get_refuses_large_objects() {
    let (_dir, store) = temp_store();
    store
        .put("b/o", &[1u8; 1000], &PutOptions::default())
        .unwrap();
    assert_eq!(store.get("b/o", 1000).unwrap().len(), 1000);
    let e = store.get("b/o", 999).unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::TooLarge);
}

#[test]
fn uncompressed_size_sidecar() {
    let (dir, store) = temp_store();
    let opts = PutOptions::with_uncompressed_size(123_456);
    store.put("b/memfile.zstd", b"frames", &opts).unwrap();
    assert_eq!(
        fs::read_to_string(dir.path().join("b/memfile.zstd.uncompressed-size")).unwrap(),
        "123456"
    );
    let info = store.stat("b/memfile.zstd").unwrap();
    assert_eq!((info.size, info.uncompressed_size), (6, Some(123_456)));
    assert_eq!(info.logical_size(), 123_456);

    let mut w = store
        .create("b/rootfs.ext4.lz4", &PutOptions::with_uncompressed_size(9))
        .unwrap();
    w.write_all(b"abc").unwrap();
    // The sidecar is written after the data, at commit.
    assert!(
        !dir.path()
            .join("b/rootfs.ext4.lz4.uncompressed-size")
            .exists()
    );
    w.commit().unwrap();
    assert_eq!(
        store.stat("b/rootfs.ext4.lz4").unwrap().uncompressed_size,
        Some(9)
    );

    // Other metadata is not persisted by the file store.
    let mut opts = PutOptions::default();
    opts.metadata.insert("team_id".into(), "t".into());
    store.put("b/snapfile", b"s", &opts).unwrap();
    assert_eq!(names(&dir.path().join("b")).len(), 5);
}

#[test]
fn open_store_urls() {
    let (dir, _) = temp_store();
    let url = format!("file://{}", dir.path().display());
    let s = open_store(&url).unwrap();
    assert_eq!(s.url(), url);
    s.put("k/v", b"1", &PutOptions::default()).unwrap();
    let bare = open_store(dir.path().to_str().unwrap()).unwrap();
    assert_eq!(bare.get("k/v", 1).unwrap(), b"1");
    let e = open_store("ftp://bucket/prefix").unwrap_err();
    assert_eq!(e.kind(), StoreErrorKind::Unsupported);
}
