//! Invariant 3: a cache hit allocates nothing (and takes no lock, by construction: the hit path
//! is a presence-bitmap load and a borrow). A counting global allocator checks the first part
//! for every hit API, on a layered image with several builds and nil mappings.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use thaw_codec::{CompressionType, FileKind, PAGE_SIZE};
use thaw_server::chain::{ChainSpec, generate};
use thaw_server::engine::{Engine, EngineConfig};
use thaw_server::store::FileStore;
use thaw_server::writer::WriteOptions;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: Safe because every call is forwarded unchanged to the system allocator; the counter
// is a thread-local `Cell` (no allocation, no reentrancy).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|a| a.set(a.get() + 1));
        // SAFETY: Safe because the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: Safe because `ptr` was allocated by `System` with this layout (above).
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

#[test]
fn hits_allocate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FileStore::new(dir.path().join("store")));
    let spec = ChainSpec {
        layers: 2,
        size: 8 << 20,
        memfile_block_size: PAGE_SIZE,
        files: vec![FileKind::Rootfs],
        seed: 3,
        dirty_fraction: 0.2,
        zero_fraction: 0.1,
        write: WriteOptions {
            codec: CompressionType::Zstd,
            level: 1,
            frame_size: 2 << 20,
            header_version: 4,
            workers: 1,
            progress: false,
        },
    };
    let manifest = generate(store.as_ref(), &dir.path().join("expected"), &spec).unwrap();
    let top = manifest.top().unwrap();
    let engine = Engine::new(store, EngineConfig::default()).unwrap();
    let f = engine.open(top.build_id, FileKind::Rootfs).unwrap();
    let size = f.size();
    // Warm everything (this allocates: opening builds, sessions).
    let mut all = vec![0u8; usize::try_from(size).unwrap()];
    f.read_at(0, &mut all).unwrap();
    engine.drain(std::time::Duration::from_secs(20));

    let mut buf = vec![0u8; 64 << 10];
    let pages = size / PAGE_SIZE;
    let before = allocs();
    let mut borrowed = 0usize;
    for i in 0..4096u64 {
        // A spread of offsets across every mapping (different builds, nil ranges).
        let page = (i * 7919) % pages;
        let off = page * PAGE_SIZE;
        if let Some(b) = f.try_get(off, 4096) {
            borrowed += b.len();
        }
        f.read_at(off, &mut buf[..4096]).unwrap();
        let n = (buf.len() as u64).min(size - off);
        f.read_at(off, &mut buf[..usize::try_from(n).unwrap()])
            .unwrap();
        assert!(f.is_present(off, 4096));
    }
    let after = allocs();
    assert_eq!(after - before, 0, "hits allocated {} times", after - before);
    assert!(borrowed > 0);
}
