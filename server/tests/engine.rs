//! The engine's invariants (docs/engine.md, ARCHITECTURE.md invariants 1-3):
//! byte equality with the flattened image for every layer of random chains (zstd, LZ4, none;
//! 4 KiB and 2 MiB blocks), one store request per cold frame for N concurrent readers, failed
//! or corrupt transfers never served nor cached, directory tiers shared between engines.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]
#![allow(
    clippy::cast_possible_truncation,
    reason = "test images are a few MiB: offsets fit in usize"
)]

use std::fs;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thaw_codec::{CompressionType, FileKind, HUGEPAGE_SIZE, PAGE_SIZE};
use thaw_server::chain::{ChainManifest, ChainSpec, generate};
use thaw_server::engine::{Engine, EngineConfig, FetchErrorKind, ReadError};
use thaw_server::store::sim::{FaultKind, SimConfig};
use thaw_server::store::{FileStore, SimStore, Store};
use thaw_server::writer::WriteOptions;

fn spec(codec: CompressionType, memfile_block: u64, seed: u64) -> ChainSpec {
    ChainSpec {
        layers: 3,
        size: 10 * 1024 * 1024 + 3 * 4096,
        memfile_block_size: memfile_block,
        files: FileKind::ALL.to_vec(),
        seed,
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
    }
}

fn chain(dir: &Path, spec: &ChainSpec) -> (Arc<FileStore>, ChainManifest) {
    let store = Arc::new(FileStore::new(dir.join("store")));
    let manifest = generate(store.as_ref(), &dir.join("expected"), spec).unwrap();
    (store, manifest)
}

/// The tests' engine settings: read-ahead off, so that store requests are exactly the ones the
/// reads cause (read-ahead has its own test).
fn config() -> EngineConfig {
    EngineConfig {
        fetch_deadline: Duration::from_secs(20),
        readahead_units: 0,
        ..EngineConfig::default()
    }
}

/// Reads every layer of `manifest` through `engine` in random pieces (and whole) and compares
/// with the flattened images.
fn check_layers(engine: &Engine, manifest: &ChainManifest, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for layer in &manifest.layers {
        for file in FileKind::ALL {
            let want = fs::read(&layer.files[file.name()].flat).unwrap();
            let f = engine.open(layer.build_id, file).unwrap();
            assert_eq!(f.size(), want.len() as u64);
            // Random reads first (cold), of every size from one byte to 3 MiB.
            for _ in 0..40 {
                let len = rng.random_range(1..=(3 << 20)).min(want.len());
                let off = rng.random_range(0..=(want.len() - len));
                let mut buf = vec![0u8; len];
                f.read_at(off as u64, &mut buf).unwrap();
                assert!(
                    buf == want[off..off + len],
                    "{file} gen {} at {off}+{len}",
                    layer.generation
                );
            }
            let mut all = vec![0u8; want.len()];
            f.read_at(0, &mut all).unwrap();
            assert!(
                all == want,
                "{file} gen {}: whole file differs",
                layer.generation
            );
        }
    }
}

#[test]
fn every_layer_reads_back_exactly_for_every_codec_and_block_size() {
    for (codec, block, seed) in [
        (CompressionType::Zstd, PAGE_SIZE, 1),
        (CompressionType::Lz4, HUGEPAGE_SIZE, 2),
        (CompressionType::None, PAGE_SIZE, 3),
        (CompressionType::None, HUGEPAGE_SIZE, 4),
        (CompressionType::Zstd, HUGEPAGE_SIZE, 5),
        (CompressionType::Lz4, PAGE_SIZE, 6),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (store, manifest) = chain(dir.path(), &spec(codec, block, seed));
        // The local store read with io_uring (straight into the cache) and with pread on the
        // fetch threads.
        for uring_local in [true, false] {
            let engine = Engine::new(
                store.clone(),
                EngineConfig {
                    uring_local,
                    ..config()
                },
            )
            .unwrap();
            check_layers(&engine, &manifest, seed);
            engine.drain(Duration::from_secs(20));
            assert_eq!(engine.sessions_in_flight(), 0);
            let stats = engine.stats();
            assert!(
                stats.store_requests > 0 && stats.fetch_errors == 0,
                "{codec:?} uring {uring_local}: {stats:?}"
            );
        }
    }
}

#[test]
fn concurrent_async_readers_agree_with_the_flat_image() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 11));
    let sim: Arc<dyn Store> = Arc::new(SimStore::new(
        store,
        SimConfig {
            ttfb: Duration::from_millis(2),
            bandwidth: Some(500_000_000),
            ..SimConfig::default()
        },
    ));
    let engine = Engine::new(sim, config()).unwrap();
    let top = manifest.top().unwrap();
    let want = Arc::new(fs::read(&top.files["rootfs.ext4"].flat).unwrap());
    let f = Arc::new(engine.open(top.build_id, FileKind::Rootfs).unwrap());
    let rt = thaw_server::runtime::Runtime::new(2).unwrap();
    let handles = rt
        .spawn_all(move |core| {
            let (f, want) = (Arc::clone(&f), Arc::clone(&want));
            async move {
                let mut rng = SmallRng::seed_from_u64(core as u64);
                for _ in 0..200 {
                    let len = rng.random_range(1..=(256 << 10)).min(want.len());
                    let off = rng.random_range(0..=(want.len() - len));
                    let mut buf = vec![0u8; len];
                    f.read(off as u64, &mut buf).await.unwrap();
                    assert!(buf == want[off..off + len], "core {core} at {off}+{len}");
                    let r = f.read_ref(off as u64, len).await.unwrap();
                    assert!(r.as_slice() == &want[off..off + len]);
                }
            }
        })
        .unwrap();
    for h in handles {
        h.join().unwrap();
    }
}

fn sim_over(store: Arc<FileStore>, ttfb_ms: u64) -> Arc<SimStore> {
    Arc::new(SimStore::new(
        store,
        SimConfig {
            ttfb: Duration::from_millis(ttfb_ms),
            bandwidth: Some(200_000_000),
            ..SimConfig::default()
        },
    ))
}

#[test]
fn concurrent_cold_readers_of_one_frame_cause_one_store_request() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 21));
    let base = &manifest.layers[0];
    let want = Arc::new(fs::read(&base.files["memfile"].flat).unwrap());
    for readers in [2usize, 8, 64] {
        let sim = sim_over(Arc::clone(&store), 30);
        let engine = Engine::new(sim.clone(), config()).unwrap();
        let f = Arc::new(engine.open(base.build_id, FileKind::Memfile).unwrap());
        // Opening read the header: count data reads only from here.
        sim.reset_stats();
        let barrier = Arc::new(Barrier::new(readers));
        let threads: Vec<_> = (0..readers)
            .map(|i| {
                let (f, want, barrier) = (Arc::clone(&f), Arc::clone(&want), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    // All inside frame 1 (2..4 MiB), different blocks.
                    let off = (2 << 20) + (i as u64 % 500) * 4096;
                    let mut buf = vec![0u8; 4096];
                    barrier.wait();
                    f.read_at(off, &mut buf).unwrap();
                    assert!(buf == want[off as usize..off as usize + 4096]);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let stats = sim.stats();
        assert_eq!(stats.reads, 1, "{readers} readers: {stats:?}");
        assert_eq!(engine.stats().sessions, 1);
    }
}

#[test]
fn concurrent_cold_readers_of_one_chunk_transfer_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::None, PAGE_SIZE, 22));
    let base = &manifest.layers[0];
    let want = Arc::new(fs::read(&base.files["rootfs.ext4"].flat).unwrap());
    let sim = sim_over(Arc::clone(&store), 20);
    let engine = Engine::new(sim.clone(), config()).unwrap();
    let f = Arc::new(engine.open(base.build_id, FileKind::Rootfs).unwrap());
    sim.reset_stats();
    let readers = 16;
    let barrier = Arc::new(Barrier::new(readers));
    let threads: Vec<_> = (0..readers)
        .map(|i| {
            let (f, want, barrier) = (Arc::clone(&f), Arc::clone(&want), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let off = (4 << 20) + (i as u64 * 61 % 1024) * 4096;
                let mut buf = vec![0u8; 4096];
                barrier.wait();
                f.read_at(off, &mut buf).unwrap();
                assert!(buf == want[off as usize..off as usize + 4096]);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Wait for the chunk's transfers to finish filling it.
    for _ in 0..200 {
        if engine.sessions_in_flight() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(engine.sessions_in_flight(), 0);
    let stats = sim.stats();
    // Request-first transfers never overlap: the chunk's bytes cross the link once (plus at most
    // one in-flight delivery step per extra transfer that stopped on another's blocks).
    assert!(
        stats.reads <= EngineConfig::default().max_runs_per_chunk as u64 + 1,
        "{stats:?}"
    );
    let chunk = 4u64 << 20;
    let slack = stats.reads * 64 * 1024;
    assert!(
        stats.bytes_delivered >= chunk && stats.bytes_delivered <= chunk + slack,
        "{stats:?}"
    );
    assert!(f.is_present(4 << 20, chunk));
    assert_eq!(engine.stats().sessions, 1);
}

#[test]
fn failed_truncated_and_corrupt_transfers_are_never_served_nor_cached() {
    for codec in [
        CompressionType::Zstd,
        CompressionType::Lz4,
        CompressionType::None,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (store, manifest) = chain(dir.path(), &spec(codec, PAGE_SIZE, 31));
        let base = &manifest.layers[0];
        let want = fs::read(&base.files["memfile"].flat).unwrap();
        let sim = sim_over(Arc::clone(&store), 1);
        let shared_dir = dir.path().join("shared");
        let engine = Engine::new(
            sim.clone(),
            EngineConfig {
                shared_cache: Some(shared_dir.clone()),
                // One attempt: the failure reaches the reader (retries are tested below).
                retries: 0,
                // One transfer per chunk, so that the fault hits the reader's bytes (with
                // several, another transfer may deliver them before the cut).
                max_runs_per_chunk: 1,
                ..config()
            },
        )
        .unwrap();
        let f = engine.open(base.build_id, FileKind::Memfile).unwrap();
        // Open the build's data (metadata requests) before injecting faults into data reads.
        let mut first = vec![0u8; 4096];
        f.read_at(0, &mut first).unwrap();
        for (k, kind) in [FaultKind::Fail, FaultKind::Truncate]
            .into_iter()
            .enumerate()
        {
            // A cold frame (chunk) per fault: frame (chunk) 1, then 2.
            let unit: u64 = if codec == CompressionType::None {
                4 << 20
            } else {
                2 << 20
            };
            let off = (k as u64 + 1) * unit + 8192;
            // Let background transfers end, so that the fault hits this read's transfer.
            while engine.sessions_in_flight() > 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            let writebacks = engine.stats().writebacks;
            sim.inject(kind, 1);
            // The rest of the unit: a truncated body always cuts inside it.
            let len = ((unit - 8192) as usize).min(want.len() - off as usize);
            let mut buf = vec![0xAAu8; len];
            let err = f
                .read_at(off, &mut buf)
                .expect_err(&format!("{codec:?} {kind:?} at {off}+{len}"));
            let ReadError::Fetch(e) = &err else {
                panic!("{codec:?} {kind:?}: {err}");
            };
            assert!(matches!(e.kind, FetchErrorKind::Store(_)), "{err}");
            let msg = err.to_string();
            assert!(
                msg.contains(&base.build_id.to_string()) && msg.contains("sim:"),
                "{msg}"
            );
            let unit_name = if codec == CompressionType::None {
                "chunk"
            } else {
                "frame"
            };
            assert!(msg.contains(&format!("{unit_name} {}", k + 1)), "{msg}");
            if codec != CompressionType::None {
                // Nothing of the frame is present, nothing was written back.
                assert!(!f.is_present(off, 4096), "{codec:?} {kind:?}");
            }
            assert_eq!(engine.stats().writebacks, writebacks, "{codec:?} {kind:?}");
            assert_eq!(
                data_files(&shared_dir),
                writebacks,
                "only complete files are cached"
            );
            // The read after it succeeds.
            f.read_at(off, &mut buf).unwrap();
            assert!(
                buf == want[off as usize..off as usize + len],
                "{codec:?} {kind:?}"
            );
        }
        // The flattened image still matches everywhere.
        let mut all = vec![0u8; want.len()];
        f.read_at(0, &mut all).unwrap();
        assert!(all == want);
    }
}

#[test]
fn a_corrupt_object_is_refused_and_a_corrupt_cache_file_falls_through() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 41));
    let base = &manifest.layers[0];
    let want = fs::read(&base.files["rootfs.ext4"].flat).unwrap();
    let shared_dir = dir.path().join("shared");
    // Warm the shared cache through one engine.
    {
        let engine = Engine::new(
            store.clone(),
            EngineConfig {
                shared_cache: Some(shared_dir.clone()),
                ..config()
            },
        )
        .unwrap();
        let f = engine.open(base.build_id, FileKind::Rootfs).unwrap();
        let mut all = vec![0u8; want.len()];
        f.read_at(0, &mut all).unwrap();
        assert!(all == want);
        // Write-backs finish on the fetch threads after the readers are woken: wait for them,
        // or a frame file written after the corruption below would be a valid hit.
        assert!(engine.drain(Duration::from_secs(20)));
        assert!(engine.stats().writebacks > 0);
    }
    // Corrupt every cached frame file.
    let mut corrupted = 0;
    for entry in walk(&shared_dir) {
        if entry.extension().is_some_and(|e| e == "frm") {
            let mut bytes = fs::read(&entry).unwrap();
            // The last byte is part of the frame's content checksum.
            let last = bytes.len() - 1;
            bytes[last] ^= 0xFF;
            fs::write(&entry, bytes).unwrap();
            corrupted += 1;
        }
    }
    assert!(corrupted > 0);

    let engine = Engine::new(
        store.clone(),
        EngineConfig {
            shared_cache: Some(shared_dir.clone()),
            ..config()
        },
    )
    .unwrap();
    let f = engine.open(base.build_id, FileKind::Rootfs).unwrap();
    let mut all = vec![0u8; want.len()];
    f.read_at(0, &mut all).unwrap();
    assert!(all == want, "corrupt cache files were served");
    let stats = engine.stats();
    assert!(stats.tier_evictions as usize >= 1, "{stats:?}");
    assert_eq!(stats.shared_cache_hits, 0, "{stats:?}");

    // A corrupt data object in the store: the read fails, names the frame, caches nothing.
    let object = store
        .root()
        .join(base.build_id.to_string())
        .join("rootfs.ext4.zstd");
    let mut bytes = fs::read(&object).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x55;
    fs::write(&object, &bytes).unwrap();
    let shared2 = dir.path().join("shared2");
    let engine = Engine::new(
        store.clone(),
        EngineConfig {
            shared_cache: Some(shared2.clone()),
            ..config()
        },
    )
    .unwrap();
    let f = engine.open(base.build_id, FileKind::Rootfs).unwrap();
    let mut all = vec![0u8; want.len()];
    let err = f.read_at(0, &mut all).unwrap_err();
    let ReadError::Fetch(e) = &err else {
        panic!("{err}");
    };
    assert_eq!(e.kind, FetchErrorKind::Corrupt, "{err}");
    assert!(err.to_string().contains("frame"), "{err}");
    // Frames that failed are not present and not in the cache directory; others are fine.
    let frm: Vec<_> = walk(&shared2)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "frm"))
        .collect();
    // The flipped byte spoils one frame: every other one was verified and written back.
    let frames = want.len().div_ceil(2 << 20);
    assert_eq!(frm.len(), frames - 1, "{frm:?}");
}

/// Frame (`.frm`) and chunk (`{index}-{size}.bin`) files under a cache directory.
fn data_files(dir: &Path) -> u64 {
    walk(dir)
        .iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.ends_with(".frm") || (name.ends_with(".bin") && name.contains('-'))
        })
        .count() as u64
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

#[test]
fn nil_mappings_fetch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 51));
    let top = manifest.top().unwrap();
    let sim = sim_over(Arc::clone(&store), 1);
    let engine = Engine::new(sim.clone(), config()).unwrap();
    let f = engine.open(top.build_id, FileKind::Rootfs).unwrap();
    let nil = f
        .header()
        .mappings
        .iter()
        .find(|m| m.is_nil() && m.offset < f.size())
        .cloned()
        .expect("the generator writes zero ranges");
    sim.reset_stats();
    let mut buf = vec![1u8; 4096];
    f.read_at(nil.offset, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(sim.stats().reads, 0);
    assert_eq!(f.try_get(nil.offset, 4096).map(<[u8]>::len), Some(4096));
}

/// Catalogue B1 and B4: transient failures and truncated bodies are retried within the budget
/// (nothing partial cached); past the budget the read fails with EIO and nothing is cached.
#[test]
fn transient_failures_are_retried_within_the_budget() {
    for codec in [CompressionType::Zstd, CompressionType::None] {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(codec, PAGE_SIZE, 61);
        spec.size = 14 * 1024 * 1024 + 3 * 4096;
        let (store, manifest) = chain(dir.path(), &spec);
        let base = &manifest.layers[0];
        let want = fs::read(&base.files["rootfs.ext4"].flat).unwrap();
        let sim = sim_over(Arc::clone(&store), 1);
        let shared_dir = dir.path().join("shared");
        let engine = Engine::new(
            sim.clone(),
            EngineConfig {
                shared_cache: Some(shared_dir.clone()),
                retries: 3,
                retry_base: Duration::from_millis(2),
                // One transfer per chunk: with several, a transfer that reaches another's
                // blocks before its injected cut ends cleanly and the fault never shows.
                max_runs_per_chunk: 1,
                ..config()
            },
        )
        .unwrap();
        let f = engine.open(base.build_id, FileKind::Rootfs).unwrap();
        let mut first = vec![0u8; 4096];
        f.read_at(0, &mut first).unwrap();
        let unit: u64 = if codec == CompressionType::None {
            4 << 20
        } else {
            2 << 20
        };
        let settle = |engine: &Engine| {
            while engine.sessions_in_flight() > 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // B1: two failures, then success.
        settle(&engine);
        let before = engine.stats();
        sim.reset_stats();
        sim.inject(FaultKind::Fail, 2);
        let off = unit;
        let len = (unit as usize).min(want.len() - off as usize);
        let mut buf = vec![0u8; len];
        f.read_at(off, &mut buf).unwrap();
        assert!(buf == want[off as usize..off as usize + len], "{codec:?}");
        let after = engine.stats();
        assert_eq!(after.retries - before.retries, 2, "{codec:?}: {after:?}");
        assert_eq!(after.fetch_errors, before.fetch_errors);
        // B4: a truncated body is retried; what is cached is complete.
        settle(&engine);
        let before = engine.stats();
        sim.inject(FaultKind::Truncate, 1);
        let off = 2 * unit;
        let len = (unit as usize).min(want.len() - off as usize);
        let mut buf = vec![0u8; len];
        f.read_at(off, &mut buf).unwrap();
        assert!(buf == want[off as usize..off as usize + len], "{codec:?}");
        assert_eq!(engine.stats().retries - before.retries, 1);
        // Past the budget: EIO, nothing cached, no retry storm.
        settle(&engine);
        let before = engine.stats();
        let cached = data_files(&shared_dir);
        sim.reset_stats();
        sim.set_fault_mode(thaw_server::store::sim::FaultMode::FailAll);
        let off = want.len() as u64 - 4096;
        let mut buf = vec![0u8; 4096];
        let err = f.read_at(off, &mut buf).unwrap_err();
        assert_eq!(err.errno(), libc_eio(), "{err}");
        assert_eq!(sim.stats().reads, 4, "1 attempt + 3 retries");
        assert_eq!(engine.stats().retries - before.retries, 3);
        assert_eq!(data_files(&shared_dir), cached);
        assert!(!f.is_present(off, 4096));
        sim.set_fault_mode(thaw_server::store::sim::FaultMode::Off);
        f.read_at(off, &mut buf).unwrap();
        assert!(buf == want[off as usize..]);
    }
}

fn libc_eio() -> i32 {
    5
}

/// Catalogue B10: 64 concurrent misses on one frame share one GET; when it fails, all 64 fail
/// together and nothing is cached.
#[test]
fn sixty_four_readers_fail_together_when_the_one_get_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 71));
    let base = &manifest.layers[0];
    let sim = sim_over(Arc::clone(&store), 30);
    let shared_dir = dir.path().join("shared");
    let engine = Engine::new(
        sim.clone(),
        EngineConfig {
            shared_cache: Some(shared_dir.clone()),
            retries: 0,
            ..config()
        },
    )
    .unwrap();
    let f = Arc::new(engine.open(base.build_id, FileKind::Memfile).unwrap());
    let mut first = vec![0u8; 4096];
    f.read_at(0, &mut first).unwrap();
    let cached = data_files(&shared_dir);
    sim.reset_stats();
    sim.set_fault_mode(thaw_server::store::sim::FaultMode::FailAll);
    let readers = 64;
    let barrier = Arc::new(Barrier::new(readers));
    let threads: Vec<_> = (0..readers)
        .map(|i| {
            let (f, barrier) = (Arc::clone(&f), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let off = (2 << 20) + (i as u64) * 4096;
                let mut buf = vec![0u8; 4096];
                barrier.wait();
                f.read_at(off, &mut buf).unwrap_err().to_string()
            })
        })
        .collect();
    let errors: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(errors.len(), 64);
    assert!(errors.iter().all(|e| e.contains("frame 1")), "{errors:?}");
    assert_eq!(sim.stats().reads, 1, "{:?}", sim.stats());
    assert_eq!(data_files(&shared_dir), cached);
    assert!(!f.is_present(2 << 20, 2 << 20));
}

/// `request` (the UFFD path): callbacks run once per request, after the bytes are present, from
/// any thread; many concurrent requests on cold frames all complete.
#[test]
fn request_callbacks_fire_once_when_present() {
    let dir = tempfile::tempdir().unwrap();
    let (store, manifest) = chain(dir.path(), &spec(CompressionType::Zstd, PAGE_SIZE, 81));
    let top = manifest.top().unwrap();
    let want = fs::read(&top.files["memfile"].flat).unwrap();
    let sim = sim_over(Arc::clone(&store), 5);
    let engine = Engine::new(sim, config()).unwrap();
    let f = Arc::new(engine.open(top.build_id, FileKind::Memfile).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let pages = (want.len() / 4096) as u64;
    for page in 0..pages {
        let tx = tx.clone();
        f.request(page * 4096, 4096, move |r| tx.send((page, r)).unwrap());
    }
    drop(tx);
    let mut seen = vec![false; pages as usize];
    for (page, r) in rx.iter() {
        r.unwrap();
        assert!(!seen[page as usize], "callback for page {page} ran twice");
        seen[page as usize] = true;
        let got = f
            .try_get(page * 4096, 4096)
            .expect("present after the callback");
        assert!(got == &want[(page * 4096) as usize..][..4096]);
    }
    assert!(seen.iter().all(|&s| s));
    // Out of range: an error, at once.
    let (tx, rx) = std::sync::mpsc::channel();
    f.request(f.size(), 4096, move |r| tx.send(r.is_err()).unwrap());
    assert!(rx.recv().unwrap());
}

/// Sequential readers get read-ahead (several frames in flight), random readers do not, and
/// read-ahead never fetches a frame twice.
#[test]
fn sequential_misses_read_ahead_and_random_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = spec(CompressionType::Zstd, PAGE_SIZE, 91);
    spec.layers = 0;
    spec.size = 16 << 20;
    let (store, manifest) = chain(dir.path(), &spec);
    let base = &manifest.layers[0];
    let want = fs::read(&base.files["rootfs.ext4"].flat).unwrap();
    let frames = want.len().div_ceil(2 << 20) as u64;
    let sim = sim_over(Arc::clone(&store), 5);
    let engine = Engine::new(
        sim.clone(),
        EngineConfig {
            readahead_units: 2,
            ..config()
        },
    )
    .unwrap();
    let f = engine.open(base.build_id, FileKind::Rootfs).unwrap();
    sim.reset_stats();
    let mut buf = vec![0u8; 64 << 10];
    for off in (0..want.len()).step_by(buf.len()) {
        f.read_at(off as u64, &mut buf).unwrap();
        assert!(buf == want[off..off + buf.len()]);
    }
    engine.drain(Duration::from_secs(20));
    let stats = engine.stats();
    assert!(stats.readahead > 0, "{stats:?}");
    assert_eq!(
        sim.stats().reads,
        frames,
        "each frame fetched once: {stats:?}"
    );
    // Read-ahead started fetches the reader would otherwise have started itself. (Whether the
    // reader then finds those frames complete (fewer misses) or still in flight (it joins the
    // read-ahead session) depends on the machine's load: count the sessions the reader started.)
    assert!(
        stats.misses - stats.joined < frames,
        "read-ahead started none of the reader's fetches: {stats:?}"
    );

    // Random single-block reads on a fresh engine: nothing read ahead.
    let engine = Engine::new(
        sim.clone(),
        EngineConfig {
            readahead_units: 2,
            ..config()
        },
    )
    .unwrap();
    let f = engine.open(base.build_id, FileKind::Rootfs).unwrap();
    for frame in [5u64, 1, 7, 3] {
        let mut page = vec![0u8; 4096];
        f.read_at(frame * (2 << 20), &mut page).unwrap();
    }
    assert_eq!(engine.stats().readahead, 0);
}

/// The io_uring local path refuses a damaged object like the pread path: a truncated data file
/// fails the read with an error naming the unit, and nothing of it is cached.
#[test]
fn the_io_uring_local_path_refuses_damaged_objects() {
    for codec in [CompressionType::Zstd, CompressionType::None] {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(codec, PAGE_SIZE, 101);
        spec.layers = 0;
        let (store, manifest) = chain(dir.path(), &spec);
        let base = &manifest.layers[0];
        let want = fs::read(&base.files["rootfs.ext4"].flat).unwrap();
        let name = if codec == CompressionType::None {
            "rootfs.ext4"
        } else {
            "rootfs.ext4.zstd"
        };
        let object = store.root().join(base.build_id.to_string()).join(name);
        let engine = Engine::new(store.clone(), config()).unwrap();
        let f = engine.open(base.build_id, FileKind::Rootfs).unwrap();
        // Cut the object in half: the last unit cannot be read.
        let len = fs::metadata(&object).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&object)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        let off = want.len() as u64 - 4096;
        let mut buf = vec![0u8; 4096];
        let err = f.read_at(off, &mut buf).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("io_uring") && msg.contains(&base.build_id.to_string()),
            "{msg}"
        );
        assert!(!f.is_present(off, 4096));
        // The first bytes are still there and correct.
        let mut head = vec![0u8; 4096];
        f.read_at(0, &mut head).unwrap();
        assert!(head == want[..4096]);
    }
}
