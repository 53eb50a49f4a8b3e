//! The chain generator writes what it claims: every layer of every generated chain reads back,
//! through its header and the stored objects, exactly as the flattened image it wrote, and every
//! stored build passes `inspect --verify`.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]

use std::fs;

use thaw_codec::{CompressionType, FileKind, HUGEPAGE_SIZE, PAGE_SIZE};
use thaw_server::chain::{ChainManifest, ChainSpec, generate};
use thaw_server::cli::inspect::verify;
use thaw_server::flatten::read_flat;
use thaw_server::layout::read_stored_header;
use thaw_server::store::FileStore;
use thaw_server::writer::WriteOptions;

fn spec(codec: CompressionType, header_version: u16, memfile_block: u64, seed: u64) -> ChainSpec {
    ChainSpec {
        layers: 3,
        size: 6 * 1024 * 1024 + 5 * 4096,
        memfile_block_size: memfile_block,
        files: FileKind::ALL.to_vec(),
        seed,
        dirty_fraction: 0.15,
        zero_fraction: 0.05,
        write: WriteOptions {
            codec,
            level: 1,
            frame_size: 2 * 1024 * 1024,
            header_version,
            workers: 2,
            progress: false,
        },
    }
}

fn check(spec: &ChainSpec) {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().join("store"));
    let expected = dir.path().join("expected");
    let manifest = generate(&store, &expected, spec).unwrap();
    assert_eq!(manifest.layers.len(), spec.layers + 1);
    assert_eq!(ChainManifest::load(&expected).unwrap(), manifest);
    for (generation, layer) in manifest.layers.iter().enumerate() {
        assert_eq!(layer.generation, generation as u64);
        for file in FileKind::ALL {
            let truth = &layer.files[file.name()];
            let want = fs::read(&truth.flat).unwrap();
            assert_eq!(want.len() as u64, truth.size);
            let got = read_flat(&store, layer.build_id, file).unwrap();
            assert!(
                got == want,
                "generation {generation} {file}: served bytes differ from the flattened image"
            );
            let header = read_stored_header(&store, layer.build_id, file)
                .unwrap()
                .unwrap();
            assert_eq!(header.metadata.generation, generation as u64);
            assert_eq!(
                header.metadata.version & 0xFFFF,
                u64::from(spec.write.header_version)
            );
            let report = verify(&store, file, &header).unwrap();
            assert_eq!(report.sha256_checked, spec.write.header_version >= 4);
            if generation > 0 {
                // A diff layer stores only its dirty blocks.
                assert!(truth.diff_bytes < truth.size);
                assert_eq!(report.bytes, truth.diff_bytes);
            }
        }
    }
}

#[test]
fn uncompressed_v3_chain_reads_back() {
    check(&spec(CompressionType::None, 3, PAGE_SIZE, 1));
}

#[test]
fn zstd_v4_chain_reads_back() {
    check(&spec(CompressionType::Zstd, 4, PAGE_SIZE, 2));
}

#[test]
fn lz4_v5_chain_with_hugepage_memfile_reads_back() {
    check(&spec(CompressionType::Lz4, 5, HUGEPAGE_SIZE, 3));
}

#[test]
fn same_seed_same_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let s = spec(CompressionType::None, 3, PAGE_SIZE, 9);
    let ma = generate(&FileStore::new(a.path().join("s")), &a.path().join("e"), &s).unwrap();
    let mb = generate(&FileStore::new(b.path().join("s")), &b.path().join("e"), &s).unwrap();
    for (la, lb) in ma.layers.iter().zip(&mb.layers) {
        assert_eq!(la.build_id, lb.build_id);
        for (fa, fb) in la.files.values().zip(lb.files.values()) {
            assert_eq!(fa.sha256, fb.sha256);
        }
    }
}
