//! Export at pause (server/src/export.rs): an NBD export's copy-on-write overlay becomes a new
//! layer that, served from a fresh engine, reads back exactly what the guest saw; successive
//! pause/resume cycles stay correct and compact; a repeated export is idempotent; a failed export
//! leaves no readable build and the next one succeeds.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "test images are a few MiB: offsets fit in usize"
)]

use std::fmt;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thaw_codec::names::header_object;
use thaw_codec::{BuildId, CompressionType, FileKind, Header, PAGE_SIZE};
use thaw_server::chain::{ChainSpec, generate};
use thaw_server::engine::{Engine, EngineConfig};
use thaw_server::export::{
    BlockSource, ChangeSet, Exported, OverlaySnapshot, export_layer, export_overlay,
};
use thaw_server::layout::read_stored_header;
use thaw_server::nbd::Overlay;
use thaw_server::store::{
    FileStore, ObjectInfo, ObjectWriter, PutOptions, Store, StoreError, StoreErrorKind,
};
use thaw_server::writer::WriteOptions;

const SIZE: u64 = 6 * 1024 * 1024 + 5 * PAGE_SIZE;

fn opts(codec: CompressionType) -> WriteOptions {
    WriteOptions {
        codec,
        level: 1,
        frame_size: 1024 * 1024,
        header_version: 4,
        workers: 2,
        progress: false,
    }
}

/// A one-layer generated rootfs chain; returns the store, the top build and its flat image.
fn base_chain(dir: &Path, codec: CompressionType, seed: u64) -> (Arc<FileStore>, BuildId, Vec<u8>) {
    let store = Arc::new(FileStore::new(dir.join("store")));
    let spec = ChainSpec {
        layers: 1,
        size: SIZE,
        memfile_block_size: PAGE_SIZE,
        files: vec![FileKind::Rootfs],
        seed,
        dirty_fraction: 0.2,
        zero_fraction: 0.1,
        write: opts(codec),
    };
    let manifest = generate(store.as_ref(), &dir.join("expected"), &spec).unwrap();
    let top = manifest.top().unwrap();
    let flat = fs::read(&top.files["rootfs.ext4"].flat).unwrap();
    (store, top.build_id, flat)
}

fn engine(store: Arc<dyn Store>) -> Engine {
    Engine::new(
        store,
        EngineConfig {
            fetch_deadline: Duration::from_secs(20),
            ..EngineConfig::default()
        },
    )
    .unwrap()
}

/// A guest session on `build`: random whole-block writes, partial writes (merged with the base
/// read through the engine), all-zero writes, write-zeroes and trims into a fresh overlay,
/// applied to `model` as well.
fn guest_session(
    eng: &Engine,
    build: BuildId,
    overlay: &Overlay,
    model: &mut [u8],
    rng: &mut SmallRng,
) {
    let f = eng.open(build, FileKind::Rootfs).unwrap();
    let blocks = SIZE / PAGE_SIZE;
    for _ in 0..rng.random_range(20..60) {
        let kind = rng.random_range(0..10);
        let b = rng.random_range(0..blocks);
        let run = rng.random_range(1..=8u64).min(blocks - b);
        let off = b * PAGE_SIZE;
        let len = run * PAGE_SIZE;
        match kind {
            0..=4 => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data[..]);
                overlay.write(off, &data, &Vec::new()).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            5 | 6 => {
                // Unaligned: the partly covered blocks are merged with their current bytes.
                let off = off + rng.random_range(1..PAGE_SIZE);
                let len = rng.random_range(1..2 * PAGE_SIZE).min(SIZE - off);
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data[..]);
                let base = overlay
                    .partial_base_blocks(off, len)
                    .into_iter()
                    .map(|blk| {
                        let mut bytes = vec![0u8; PAGE_SIZE as usize];
                        f.read_at(blk * PAGE_SIZE, &mut bytes).unwrap();
                        (blk, bytes)
                    })
                    .collect();
                overlay.write(off, &data, &base).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            7 => {
                let data = vec![0u8; len as usize];
                overlay.write(off, &data, &Vec::new()).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            8 => {
                overlay.write_zeroes(off, len, false, &Vec::new()).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                overlay.trim(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
        }
    }
}

/// What the guest sees: the overlay over the layered file.
fn assert_reads_back(store: Arc<dyn Store>, build: BuildId, model: &[u8], what: &str) {
    let eng = engine(store);
    let f = eng.open(build, FileKind::Rootfs).unwrap();
    assert_eq!(f.size(), model.len() as u64, "{what}");
    let mut all = vec![0u8; model.len()];
    f.read_at(0, &mut all).unwrap();
    if let Some(i) = all.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{what}: the exported build differs from the guest's view at byte {i}");
    }
}

/// No two adjacent mappings that e2b's merge rules would have merged.
fn assert_compact(h: &Header, what: &str) {
    for w in h.mappings.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let mergeable = a.build_id == b.build_id
            && (a.is_nil() || a.build_storage_offset + a.length == b.build_storage_offset);
        assert!(!mergeable, "{what}: unmerged adjacent mappings {a:?} {b:?}");
    }
}

#[test]
fn ten_pause_resume_cycles_read_back_exactly_for_every_codec() {
    for (i, codec) in [
        CompressionType::Zstd,
        CompressionType::Lz4,
        CompressionType::None,
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut build, mut model) = base_chain(dir.path(), codec, 7 + i as u64);
        let mut rng = SmallRng::seed_from_u64(100 + i as u64);
        for cycle in 0..10 {
            let what = format!("{codec:?} cycle {cycle}");
            let eng = engine(store.clone());
            let overlay = Overlay::create(&dir.path().join("ov"), "e", SIZE, PAGE_SIZE).unwrap();
            guest_session(&eng, build, &overlay, &mut model, &mut rng);
            let parent = read_stored_header(store.as_ref(), build, FileKind::Rootfs)
                .unwrap()
                .unwrap();
            let new = uuid::Uuid::new_v4();
            let out = export_overlay(
                store.as_ref(),
                FileKind::Rootfs,
                &parent,
                new,
                &overlay,
                &opts(codec),
            )
            .unwrap();
            let Exported::Stored(stored) = &out else {
                panic!("{what}: first export reported {out:?}");
            };
            assert_eq!(
                stored.uncompressed_size,
                ChangeSet::of_overlay(&overlay).diff_len(),
                "{what}: the diff holds exactly the dirty blocks"
            );
            assert_eq!(
                stored.header.metadata.generation,
                parent.metadata.generation + 1
            );
            assert_compact(&stored.header, &what);
            // A repeated request is idempotent.
            let again = export_overlay(
                store.as_ref(),
                FileKind::Rootfs,
                &parent,
                new,
                &overlay,
                &opts(codec),
            )
            .unwrap();
            assert!(
                matches!(again, Exported::AlreadyStored(ref h) if *h == stored.header),
                "{what}: {again:?}"
            );
            drop(eng);
            assert_reads_back(store.clone(), new, &model, &what);
            build = new;
        }
        // Ten generations of random writes: the header stays compact (far fewer mappings than
        // the blocks written).
        let top = read_stored_header(store.as_ref(), build, FileKind::Rootfs)
            .unwrap()
            .unwrap();
        assert!(
            top.mappings.len() < 2000,
            "{codec:?}: {} mappings",
            top.mappings.len()
        );
    }
}

#[test]
fn a_different_layer_under_an_existing_build_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (store, build, mut model) = base_chain(dir.path(), CompressionType::Zstd, 3);
    let eng = engine(store.clone());
    let mut rng = SmallRng::seed_from_u64(5);
    let parent = read_stored_header(store.as_ref(), build, FileKind::Rootfs)
        .unwrap()
        .unwrap();
    let new = uuid::Uuid::new_v4();
    let a = Overlay::create(&dir.path().join("ov"), "a", SIZE, PAGE_SIZE).unwrap();
    guest_session(&eng, build, &a, &mut model, &mut rng);
    export_overlay(
        store.as_ref(),
        FileKind::Rootfs,
        &parent,
        new,
        &a,
        &opts(CompressionType::Zstd),
    )
    .unwrap();
    let stored_before = fs::read(store.root().join(header_object(new, FileKind::Rootfs))).unwrap();

    // Same blocks, other bytes: same mappings, different checksum.
    let b = Overlay::create(&dir.path().join("ov"), "b", SIZE, PAGE_SIZE).unwrap();
    for r in a.dirty_blocks() {
        let len = (r.end - r.start) * PAGE_SIZE;
        b.write(r.start * PAGE_SIZE, &vec![0x5a; len as usize], &Vec::new())
            .unwrap();
    }
    for r in a.zero_blocks() {
        b.trim(r.start * PAGE_SIZE, (r.end - r.start) * PAGE_SIZE)
            .unwrap();
    }
    let err = export_overlay(
        store.as_ref(),
        FileKind::Rootfs,
        &parent,
        new,
        &b,
        &opts(CompressionType::Zstd),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("already holds a different layer") && msg.contains("checksum"),
        "{msg}"
    );
    // Nothing was overwritten.
    let stored_after = fs::read(store.root().join(header_object(new, FileKind::Rootfs))).unwrap();
    assert_eq!(stored_before, stored_after);
    assert_reads_back(store, new, &model, "after the refused export");
}

/// A store that fails the first header put (after the data object was committed), as a process
/// killed between the two would.
#[derive(Debug)]
struct FailHeaderOnce {
    inner: FileStore,
    armed: AtomicBool,
}

impl Store for FailHeaderOnce {
    fn url(&self) -> String {
        self.inner.url()
    }
    fn read_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.inner.read_range(key, offset, buf)
    }
    fn stat(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        self.inner.stat(key)
    }
    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>, StoreError> {
        self.inner.get(key, max_len)
    }
    fn put(&self, key: &str, data: &[u8], opts: &PutOptions) -> Result<(), StoreError> {
        if key.ends_with(".header") && self.armed.swap(false, Ordering::SeqCst) {
            return Err(StoreError::new(
                StoreErrorKind::Io,
                self.url(),
                key,
                "injected: the process died before the header",
            ));
        }
        self.inner.put(key, data, opts)
    }
    fn create(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError> {
        self.inner.create(key, opts)
    }
    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.exists(key)
    }
}

/// A block source that fails after `left` reads.
struct FailingSource<'a> {
    overlay: &'a Overlay,
    left: std::sync::atomic::AtomicUsize,
}

impl BlockSource for FailingSource<'_> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            return Err(io::Error::other("injected: the source failed mid-diff"));
        }
        self.overlay.read_at(offset, buf)
    }
}

impl fmt::Debug for FailingSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FailingSource")
    }
}

#[test]
fn an_interrupted_export_leaves_no_readable_build_and_the_next_one_succeeds() {
    interrupted_export(CompressionType::Zstd);
}

/// Uncompressed: the data object alone is a plain object, which must not open as a legacy
/// headerless build.
#[test]
fn an_interrupted_uncompressed_export_is_not_taken_for_a_legacy_build() {
    interrupted_export(CompressionType::None);
}

fn interrupted_export(codec: CompressionType) {
    let dir = tempfile::tempdir().unwrap();
    let (store, build, mut model) = base_chain(dir.path(), codec, 11);
    let eng = engine(store.clone());
    let mut rng = SmallRng::seed_from_u64(12);
    let overlay = Overlay::create(&dir.path().join("ov"), "x", SIZE, PAGE_SIZE).unwrap();
    guest_session(&eng, build, &overlay, &mut model, &mut rng);
    let parent = read_stored_header(store.as_ref(), build, FileKind::Rootfs)
        .unwrap()
        .unwrap();
    let parent_bytes = fs::read(store.root().join(header_object(build, FileKind::Rootfs))).unwrap();
    let changes = ChangeSet::of_overlay(&overlay);
    let new = uuid::Uuid::new_v4();

    // 1. The source fails in the middle of the diff: no data object, no header.
    let failing = FailingSource {
        overlay: &overlay,
        left: 1.into(),
    };
    let err = export_layer(
        store.as_ref(),
        FileKind::Rootfs,
        &parent,
        new,
        &changes,
        &failing,
        &opts(codec),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("injected"), "{err:#}");
    assert!(
        !store.root().join(new.to_string()).exists()
            || fs::read_dir(store.root().join(new.to_string()))
                .unwrap()
                .next()
                .is_none()
    );

    // 2. Killed between the data object and the header: the data object alone opens nothing.
    let failing_store = FailHeaderOnce {
        inner: FileStore::new(store.root().to_path_buf()),
        armed: AtomicBool::new(true),
    };
    export_overlay(
        &failing_store,
        FileKind::Rootfs,
        &parent,
        new,
        &overlay,
        &opts(codec),
    )
    .unwrap_err();
    assert!(
        read_stored_header(store.as_ref(), new, FileKind::Rootfs)
            .unwrap()
            .is_none(),
        "a header without its export"
    );
    let refused = engine(store.clone())
        .open(new, FileKind::Rootfs)
        .expect_err("a build without a header must not open");
    if codec == CompressionType::None {
        assert!(
            format!("{refused:#}").contains("upload did not finish"),
            "{refused:#}"
        );
    }

    // 3. The parent is untouched and the next export succeeds and reads back.
    assert_eq!(
        parent_bytes,
        fs::read(store.root().join(header_object(build, FileKind::Rootfs))).unwrap()
    );
    let out = export_overlay(
        &failing_store,
        FileKind::Rootfs,
        &parent,
        new,
        &overlay,
        &opts(codec),
    )
    .unwrap();
    assert!(matches!(out, Exported::Stored(_)), "{out:?}");
    drop(eng);
    assert_reads_back(store, new, &model, "after the retried export");
}

#[test]
fn a_write_during_the_export_fails_it_before_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let (store, build, mut model) = base_chain(dir.path(), CompressionType::Lz4, 21);
    let eng = engine(store.clone());
    let mut rng = SmallRng::seed_from_u64(22);
    let overlay = Overlay::create(&dir.path().join("ov"), "w", SIZE, PAGE_SIZE).unwrap();
    guest_session(&eng, build, &overlay, &mut model, &mut rng);
    overlay
        .write(0, &vec![1u8; PAGE_SIZE as usize], &Vec::new())
        .unwrap();
    let parent = read_stored_header(store.as_ref(), build, FileKind::Rootfs)
        .unwrap()
        .unwrap();
    let new = uuid::Uuid::new_v4();
    let (changes, snapshot) = OverlaySnapshot::take(&overlay).unwrap();
    // A write that was not held back lands after the sets were taken.
    overlay
        .write(0, &vec![2u8; PAGE_SIZE as usize], &Vec::new())
        .unwrap();
    let err = export_layer(
        store.as_ref(),
        FileKind::Rootfs,
        &parent,
        new,
        &changes,
        &snapshot,
        &opts(CompressionType::Lz4),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("overlay changed"), "{err:#}");
    assert!(
        read_stored_header(store.as_ref(), new, FileKind::Rootfs)
            .unwrap()
            .is_none()
    );
    // Held back properly, the same overlay exports and reads back (with the second write).
    model[..PAGE_SIZE as usize].fill(2);
    export_overlay(
        store.as_ref(),
        FileKind::Rootfs,
        &parent,
        new,
        &overlay,
        &opts(CompressionType::Lz4),
    )
    .unwrap();
    drop(eng);
    assert_reads_back(store, new, &model, "after the held-back export");
}
