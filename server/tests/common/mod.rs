//! Shared fixtures: small layered chains stored with the build writer, and their models.
#![allow(dead_code)]

use std::ops::Range;
use std::path::Path;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thaw_codec::diff::{DiffMetadata, child_header};
use thaw_codec::{BuildId, CompressionType, FileKind, Header};
use thaw_server::store::{FileStore, Store};
use thaw_server::writer::{WriteOptions, store_build_file};

pub const BLOCK: u64 = 4096;

/// Data that compresses somewhat: each 4 KiB block is random, a repeated byte, or zeros-ish text.
pub fn test_data(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = vec![0u8; len];
    for block in out.chunks_mut(4096) {
        match rng.random_range(0..3u8) {
            0 => rng.fill(block),
            1 => block.fill(rng.random()),
            _ => {
                for (i, b) in block.iter_mut().enumerate() {
                    *b = b"thaw layered test data "[i % 23];
                }
            }
        }
    }
    out
}

/// Plain V3 options (no codec), the way e2b stores uncompressed builds.
pub fn plain_v3() -> WriteOptions {
    WriteOptions {
        codec: CompressionType::None,
        level: 0,
        frame_size: 64 * 1024,
        header_version: 3,
        workers: 2,
        progress: false,
    }
}

/// One layer of a chain: its build id and the device contents it presents (the model).
#[derive(Debug, Clone)]
pub struct Layer {
    pub build: BuildId,
    pub header: Header,
    pub model: Vec<u8>,
}

/// Stores a base layer of `file` (full data) and returns it.
pub fn store_base(
    store: &dyn Store,
    file: FileKind,
    size: u64,
    seed: u64,
    opts: &WriteOptions,
) -> Layer {
    let build = uuid::Uuid::new_v4();
    let header = Header::new_base(build, size, BLOCK, u64::from(opts.header_version)).unwrap();
    let data = test_data(seed, usize::try_from(size).unwrap());
    store_build_file(store, file, &header, &mut data.as_slice(), size, opts).unwrap();
    Layer {
        build,
        header,
        model: data,
    }
}

/// Stores a base layer whose device reads as zeros (no data), as e2b's empty memfile base.
pub fn store_empty_base(
    store: &dyn Store,
    file: FileKind,
    size: u64,
    opts: &WriteOptions,
) -> Layer {
    let build = uuid::Uuid::new_v4();
    let header = Header::new_empty(build, size, BLOCK, u64::from(opts.header_version)).unwrap();
    store_build_file(store, file, &header, &mut [].as_slice(), 0, opts).unwrap();
    Layer {
        build,
        header,
        model: vec![0; usize::try_from(size).unwrap()],
    }
}

/// Stores a child of `parent` writing `dirty` blocks (new data) and zeroing `empty` blocks.
pub fn store_child(
    store: &dyn Store,
    file: FileKind,
    parent: &Layer,
    dirty: Vec<Range<u64>>,
    empty: Vec<Range<u64>>,
    seed: u64,
    opts: &WriteOptions,
) -> Layer {
    let build = uuid::Uuid::new_v4();
    let diff = DiffMetadata {
        block_size: BLOCK,
        dirty: dirty.clone(),
        empty: empty.clone(),
    };
    let header = child_header(&parent.header, build, &diff).unwrap();
    let len = diff.dirty_blocks() * BLOCK;
    let data = test_data(seed, usize::try_from(len).unwrap());
    let mut model = parent.model.clone();
    let b = usize::try_from(BLOCK).unwrap();
    for r in &empty {
        for blk in r.clone() {
            let at = usize::try_from(blk).unwrap() * b;
            model[at..at + b].fill(0);
        }
    }
    let mut k = 0usize;
    for r in &dirty {
        for blk in r.clone() {
            let at = usize::try_from(blk).unwrap() * b;
            model[at..at + b].copy_from_slice(&data[k * b..(k + 1) * b]);
            k += 1;
        }
    }
    store_build_file(store, file, &header, &mut data.as_slice(), len, opts).unwrap();
    Layer {
        build,
        header,
        model,
    }
}

/// A 3-layer chain for both files: returns [base, middle, top] per file (rootfs, memfile).
/// rootfs: full 1 MiB base; memfile: empty 768 KiB base.
#[allow(
    clippy::single_range_in_vec_init,
    reason = "a one-range block set is meant"
)]
pub fn three_layer_chain(store: &dyn Store, opts: &WriteOptions) -> (Vec<Layer>, Vec<Layer>) {
    let rootfs_size = 1024 * 1024;
    let a = store_base(store, FileKind::Rootfs, rootfs_size, 1, opts);
    // B rewrites blocks 10..40 and 100..140, zeroes 200..210.
    let b = store_child(
        store,
        FileKind::Rootfs,
        &a,
        vec![10..40, 100..140],
        vec![200..210],
        2,
        opts,
    );
    // C rewrites 30..110 (overlapping B's and A's ranges) and 250..256, zeroes 0..4.
    let c = store_child(
        store,
        FileKind::Rootfs,
        &b,
        vec![30..110, 250..256],
        vec![0..4],
        3,
        opts,
    );

    let mem_size = 768 * 1024;
    let ma = store_empty_base(store, FileKind::Memfile, mem_size, opts);
    let mb = store_child(
        store,
        FileKind::Memfile,
        &ma,
        vec![0..64, 100..120],
        vec![],
        4,
        opts,
    );
    let mc = store_child(
        store,
        FileKind::Memfile,
        &mb,
        vec![50..70, 180..192],
        vec![110..115],
        5,
        opts,
    );
    (vec![a, b, c], vec![ma, mb, mc])
}

/// A file store in a fresh temp dir.
pub fn temp_store() -> (tempfile::TempDir, FileStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path().to_path_buf());
    (dir, store)
}

/// Runs the thaw binary.
pub fn thaw(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_thaw"))
        .args(args)
        .output()
        .unwrap()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
