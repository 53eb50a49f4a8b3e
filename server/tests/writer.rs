//! The build writer round trip: data -> store_build_file -> read_flat / header checks.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]
#![allow(
    clippy::single_range_in_vec_init,
    reason = "one-range block sets are meant"
)]

mod common;

use common::{BLOCK, plain_v3, store_base, store_child, temp_store, test_data};
use sha2::{Digest, Sha256};
use thaw_codec::names::{data_object, header_object};
use thaw_codec::{CompressionType, FileKind, Header};
use thaw_server::flatten::read_flat;
use thaw_server::layout::MAX_HEADER_LEN;
use thaw_server::store::Store;
use thaw_server::writer::{WriteOptions, store_build_file};

fn opts(codec: CompressionType, version: u16) -> WriteOptions {
    WriteOptions {
        codec,
        level: 2,
        frame_size: 256 * 1024,
        header_version: version,
        workers: 2,
        progress: false,
    }
}

#[test]
fn round_trip_all_codecs_and_versions() {
    // Not a multiple of the frame size: the last frame is shorter.
    let size: u64 = 1536 * 1024 + 3 * 4096;
    let data = test_data(42, usize::try_from(size).unwrap());
    let sha: [u8; 32] = Sha256::digest(&data).into();
    for codec in [
        CompressionType::None,
        CompressionType::Zstd,
        CompressionType::Lz4,
    ] {
        for version in [3u16, 4, 5] {
            let (_dir, store) = temp_store();
            let build = uuid::Uuid::new_v4();
            let header = Header::new_base(build, size, BLOCK, 3).unwrap();
            let o = opts(codec, version);
            let result = store_build_file(
                &store,
                FileKind::Rootfs,
                &header,
                &mut data.as_slice(),
                size,
                &o,
            );
            if version == 3 && codec != CompressionType::None {
                let e = result.unwrap_err();
                assert!(format!("{e:#}").contains("version 3"), "{e:#}");
                assert!(
                    !store
                        .exists(&header_object(build, FileKind::Rootfs))
                        .unwrap()
                );
                continue;
            }
            let stored = result.unwrap_or_else(|e| panic!("{codec:?} V{version}: {e:#}"));
            let ctx = format!("{codec:?} V{version}");
            assert_eq!(stored.sha256, sha, "{ctx}");
            assert_eq!(stored.uncompressed_size, size, "{ctx}");
            assert_eq!(
                stored.data_object,
                data_object(build, FileKind::Rootfs, codec),
                "{ctx}"
            );
            assert_eq!(stored.header.metadata.version, u64::from(version), "{ctx}");
            // The header in the store is the one reported.
            let bytes = store
                .get(&header_object(build, FileKind::Rootfs), MAX_HEADER_LEN)
                .unwrap();
            assert_eq!(Header::parse(&bytes).unwrap(), stored.header, "{ctx}");
            let obj = store.stat(&stored.data_object).unwrap();
            assert_eq!(obj.size, stored.stored_size, "{ctx}");
            if version >= 4 {
                let e = stored.header.build_data(&build).expect("self entry");
                assert_eq!(e.size, size, "{ctx}");
                assert_eq!(e.checksum, sha, "{ctx}");
                assert_eq!(e.frames.compression(), codec, "{ctx}");
            } else {
                assert!(stored.header.builds.is_empty(), "{ctx}");
            }
            if codec == CompressionType::None {
                assert_eq!(stored.frames, 0, "{ctx}");
                // Plain too: it tells a layer from a legacy headerless build.
                assert_eq!(obj.uncompressed_size, Some(size), "{ctx}");
            } else {
                assert_eq!(stored.frames, 7, "{ctx}");
                assert_eq!(obj.uncompressed_size, Some(size), "{ctx}");
                let table = &stored.header.build_data(&build).unwrap().frames;
                let frames = table.frames();
                let (mut u, mut c) = (0, 0);
                for f in frames {
                    assert_eq!((f.start_u, f.start_c), (u, c), "{ctx}");
                    u += u64::from(f.size_u);
                    c += u64::from(f.size_c);
                }
                assert_eq!(u, size, "{ctx}");
                assert_eq!(c, obj.size, "{ctx}");
                assert_eq!(frames.last().unwrap().size_u, 3 * 4096, "{ctx}");
            }
            assert_eq!(
                read_flat(&store, build, FileKind::Rootfs).unwrap(),
                data,
                "{ctx}"
            );
        }
    }
}

#[test]
fn ancestor_entries_are_loaded_and_trimmed() {
    let (_dir, store) = temp_store();
    let zstd = opts(CompressionType::Zstd, 4);
    let base = store_base(&store, FileKind::Rootfs, 2 * 1024 * 1024, 7, &zstd);
    // The child only keeps base blocks 0..64 (the first 256 KiB frame) visible... and the rest
    // of the device is rewritten or zeroed.
    let child = store_child(
        &store,
        FileKind::Rootfs,
        &base,
        vec![64..128],
        vec![128..512],
        8,
        &opts(CompressionType::Lz4, 5),
    );
    let bytes = store
        .get(
            &header_object(child.build, FileKind::Rootfs),
            MAX_HEADER_LEN,
        )
        .unwrap();
    let h = Header::parse(&bytes).unwrap();
    assert_eq!(h.metadata.version, 5);
    let base_entry = h.build_data(&base.build).expect("ancestor entry");
    let base_own = store
        .get(&header_object(base.build, FileKind::Rootfs), MAX_HEADER_LEN)
        .map(|b| Header::parse(&b).unwrap())
        .unwrap();
    let full = base_own.build_data(&base.build).unwrap();
    assert_eq!(full.frames.frames().len(), 8);
    assert_eq!(base_entry.size, full.size);
    assert_eq!(base_entry.checksum, full.checksum);
    assert_eq!(base_entry.frames.compression(), CompressionType::Zstd);
    assert_eq!(base_entry.frames.frames(), &full.frames.frames()[..1]);
    let self_entry = h.build_data(&child.build).unwrap();
    assert_eq!(self_entry.frames.compression(), CompressionType::Lz4);
    assert_eq!(
        read_flat(&store, child.build, FileKind::Rootfs).unwrap(),
        child.model
    );
    assert_eq!(
        read_flat(&store, base.build, FileKind::Rootfs).unwrap(),
        base.model
    );
}

#[test]
fn v3_ancestors_get_zero_entries() {
    let (_dir, store) = temp_store();
    let base = store_base(&store, FileKind::Memfile, 512 * 1024, 9, &plain_v3());
    let child = store_child(
        &store,
        FileKind::Memfile,
        &base,
        vec![3..9],
        vec![],
        10,
        &opts(CompressionType::Zstd, 4),
    );
    let bytes = store
        .get(
            &header_object(child.build, FileKind::Memfile),
            MAX_HEADER_LEN,
        )
        .unwrap();
    let h = Header::parse(&bytes).unwrap();
    assert!(h.build_data(&base.build).unwrap().is_zero());
    assert_eq!(
        read_flat(&store, child.build, FileKind::Memfile).unwrap(),
        child.model
    );
}

#[test]
fn bad_inputs_are_refused_before_writing() {
    let (_dir, store) = temp_store();
    let build = uuid::Uuid::new_v4();
    let header = Header::new_base(build, 64 * 1024, 2 * 1024 * 1024, 4).unwrap();
    let data = vec![0u8; 64 * 1024];
    // Frame size not a multiple of the 2 MiB block size.
    let e = store_build_file(
        &store,
        FileKind::Memfile,
        &header,
        &mut data.as_slice(),
        65536,
        &opts(CompressionType::Zstd, 4),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("frame size"), "{e:#}");
    // Data shorter than the mappings reference.
    let header = Header::new_base(build, 64 * 1024, BLOCK, 4).unwrap();
    let e = store_build_file(
        &store,
        FileKind::Rootfs,
        &header,
        &mut data.as_slice(),
        4096,
        &opts(CompressionType::Zstd, 4),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("mapping #0"), "{e:#}");
    // Reader shorter than the declared length: error, and no object left behind.
    let e = store_build_file(
        &store,
        FileKind::Rootfs,
        &header,
        &mut &data[..1000],
        65536,
        &opts(CompressionType::Lz4, 4),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("data ended"), "{e:#}");
    assert!(
        !store
            .exists(&data_object(build, FileKind::Rootfs, CompressionType::Lz4))
            .unwrap()
    );
    assert!(
        !store
            .exists(&header_object(build, FileKind::Rootfs))
            .unwrap()
    );
}

#[test]
fn empty_data_and_a_single_worker() {
    let (_dir, store) = temp_store();
    let build = uuid::Uuid::new_v4();
    let header = Header::new_empty(build, 256 * 1024, BLOCK, 4).unwrap();
    let o = WriteOptions {
        workers: 1,
        ..opts(CompressionType::Zstd, 4)
    };
    let stored = store_build_file(
        &store,
        FileKind::Memfile,
        &header,
        &mut [].as_slice(),
        0,
        &o,
    )
    .unwrap();
    assert_eq!((stored.frames, stored.stored_size), (0, 0));
    let e = stored.header.build_data(&build).unwrap();
    assert_eq!(e.checksum, <[u8; 32]>::from(Sha256::digest([])));
    assert_eq!(
        read_flat(&store, build, FileKind::Memfile).unwrap(),
        vec![0; 256 * 1024]
    );

    // One worker, many frames (more than the in-flight bound).
    let size = 40 * 4096;
    let data = test_data(5, size);
    let header = Header::new_base(build, 40 * 4096, BLOCK, 4).unwrap();
    let o = WriteOptions {
        workers: 1,
        frame_size: 4096,
        ..opts(CompressionType::Lz4, 4)
    };
    let stored = store_build_file(
        &store,
        FileKind::Rootfs,
        &header,
        &mut data.as_slice(),
        40 * 4096,
        &o,
    )
    .unwrap();
    assert_eq!(stored.frames, 40);
    assert_eq!(read_flat(&store, build, FileKind::Rootfs).unwrap(), data);
}

/// A store whose streaming writers fail after `limit` bytes (fault injection).
#[derive(Debug)]
struct FailingStore {
    inner: thaw_server::store::FileStore,
    limit: u64,
}

#[derive(Debug)]
struct FailingWriter {
    inner: Box<dyn thaw_server::store::ObjectWriter>,
    limit: u64,
}

impl std::io::Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.inner.written() + buf.len() as u64 > self.limit {
            return Err(std::io::Error::other("injected write failure"));
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl thaw_server::store::ObjectWriter for FailingWriter {
    fn commit(self: Box<Self>) -> Result<(), thaw_server::store::StoreError> {
        self.inner.commit()
    }

    fn written(&self) -> u64 {
        self.inner.written()
    }
}

impl Store for FailingStore {
    fn url(&self) -> String {
        format!("failing+{}", self.inner.url())
    }
    fn read_range(
        &self,
        key: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), thaw_server::store::StoreError> {
        self.inner.read_range(key, offset, buf)
    }
    fn stat(
        &self,
        key: &str,
    ) -> Result<thaw_server::store::ObjectInfo, thaw_server::store::StoreError> {
        self.inner.stat(key)
    }
    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>, thaw_server::store::StoreError> {
        self.inner.get(key, max_len)
    }
    fn put(
        &self,
        key: &str,
        data: &[u8],
        opts: &thaw_server::store::PutOptions,
    ) -> Result<(), thaw_server::store::StoreError> {
        self.inner.put(key, data, opts)
    }
    fn create(
        &self,
        key: &str,
        opts: &thaw_server::store::PutOptions,
    ) -> Result<Box<dyn thaw_server::store::ObjectWriter>, thaw_server::store::StoreError> {
        Ok(Box::new(FailingWriter {
            inner: self.inner.create(key, opts)?,
            limit: self.limit,
        }))
    }
    fn exists(&self, key: &str) -> Result<bool, thaw_server::store::StoreError> {
        self.inner.exists(key)
    }
}

#[test]
fn a_failing_object_writer_fails_cleanly() {
    let (dir, _) = temp_store();
    let store = FailingStore {
        inner: thaw_server::store::FileStore::new(dir.path().to_path_buf()),
        limit: 10_000,
    };
    let size = 64 * 4096;
    let data = test_data(3, size);
    let build = uuid::Uuid::new_v4();
    let header = Header::new_base(build, 64 * 4096, BLOCK, 4).unwrap();
    for (codec, workers) in [
        (CompressionType::Zstd, 1),
        (CompressionType::Lz4, 3),
        (CompressionType::None, 1),
    ] {
        let o = WriteOptions {
            workers,
            frame_size: 4096,
            ..opts(codec, 4)
        };
        // Random-ish 4 KiB frames: the limit is hit after a few frames, many more are pending.
        let e = store_build_file(
            &store,
            FileKind::Rootfs,
            &header,
            &mut data.as_slice(),
            64 * 4096,
            &o,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("injected write failure"), "{e:#}");
        assert!(
            !store
                .exists(&header_object(build, FileKind::Rootfs))
                .unwrap()
        );
        assert!(
            !store
                .exists(&data_object(build, FileKind::Rootfs, codec))
                .unwrap()
        );
    }
    // No temp file is left behind.
    assert_eq!(
        std::fs::read_dir(dir.path().join(build.to_string()))
            .unwrap()
            .count(),
        0
    );
}
