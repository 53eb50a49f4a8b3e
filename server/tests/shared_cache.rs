//! The shared directory cache: e2b's names, the lock/temp/link write protocol, corruption
//! handling, cross-process and concurrent use, and the `CachedStore` wrapper.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, SystemTime};

use thaw_server::store::shared_cache::{
    CHUNK_SIZE, CachedStore, SharedCache, SharedCacheStats, WriteOutcome,
};
use thaw_server::store::{
    FileStore, ObjectInfo, ObjectWriter, PutOptions, Store, StoreError, StoreErrorKind,
};

const OBJ: &str = "2f6d3a52-8a3b-4c1e-9d7f-0123456789ab/rootfs.ext4.zstd";
const PLAIN: &str = "2f6d3a52-8a3b-4c1e-9d7f-0123456789ab/rootfs.ext4";
const MIB4: usize = 4 * 1024 * 1024;

fn data(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let i = u64::try_from(i).unwrap();
            u8::try_from((i.wrapping_mul(2_654_435_761) >> 7) & 0xff).unwrap() ^ seed
        })
        .collect()
}

/// Every file below `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn no_protocol_leftovers(dir: &Path) {
    let left: Vec<String> = files(dir)
        .into_iter()
        .filter(|f| f.contains(".tmp.") || f.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "temp/lock files left behind: {left:?}");
}

fn frame_final(root: &Path) -> PathBuf {
    root.join(OBJ).join("0000000000441000-91234.frm")
}

#[test]
fn names_and_modes_match_e2b() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::new(dir.path());
    let frame = data(1, 0x91234);
    assert_eq!(
        cache.put_frame(OBJ, 0x441000, &frame).unwrap(),
        WriteOutcome::Written
    );
    let chunk = data(2, MIB4);
    assert_eq!(
        cache.put_chunk(PLAIN, 4, CHUNK_SIZE, &chunk).unwrap(),
        WriteOutcome::Written
    );
    cache.put_size(PLAIN, 123_456).unwrap();
    cache.put_blob(PLAIN, b"blob").unwrap();
    assert_eq!(
        files(dir.path()),
        vec![
            format!("{OBJ}/0000000000441000-91234.frm"),
            format!("{PLAIN}/000000000004-4194304.bin"),
            format!("{PLAIN}/content.bin"),
            format!("{PLAIN}/size.txt"),
        ]
    );
    assert_eq!(fs::read(frame_final(dir.path())).unwrap(), frame);
    assert_eq!(
        fs::read_to_string(dir.path().join(PLAIN).join("size.txt")).unwrap(),
        "123456"
    );
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&frame_final(dir.path())), 0o600);
    assert_eq!(mode(&dir.path().join(OBJ)), 0o700);
    assert_eq!(mode(dir.path().join(OBJ).parent().unwrap()), 0o700);
    assert_eq!(
        cache.frame_path(OBJ, 0x441000, 0x91234).unwrap(),
        frame_final(dir.path())
    );
}

#[test]
fn frame_miss_hit_and_stats() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::new(dir.path());
    assert_eq!(cache.get_frame(OBJ, 0x441000, 0x91234).unwrap(), None);
    let frame = data(3, 0x91234);
    cache.put_frame(OBJ, 0x441000, &frame).unwrap();
    assert_eq!(
        cache.get_frame(OBJ, 0x441000, 0x91234).unwrap().as_deref(),
        Some(frame.as_slice())
    );
    // A different frame of the same object is a different file.
    assert_eq!(cache.get_frame(OBJ, 0x441000 + 0x91234, 10).unwrap(), None);
    assert_eq!(
        cache.stats(),
        SharedCacheStats {
            hits: 1,
            misses: 2,
            writes: 1,
            ..SharedCacheStats::default()
        }
    );
    no_protocol_leftovers(dir.path());
}

#[test]
fn fresh_lock_held_by_another_writer_skips() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::new(dir.path());
    let lock = dir.path().join(OBJ).join("0000000000441000-91234.frm.lock");
    fs::create_dir_all(lock.parent().unwrap()).unwrap();
    fs::write(&lock, b"").unwrap();
    let out = cache.put_frame(OBJ, 0x441000, &data(4, 0x91234)).unwrap();
    assert_eq!(out, WriteOutcome::Skipped);
    assert!(!frame_final(dir.path()).exists());
    // The other writer's lock is left alone, and we left nothing of our own.
    assert!(lock.exists());
    assert_eq!(files(dir.path()).len(), 1, "{:?}", files(dir.path()));
    assert_eq!(cache.stats().skipped, 1);
    assert_eq!(cache.stats().writes, 0);
}

fn age_file(path: &Path, age: Duration) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

#[test]
fn stale_lock_is_removed_and_the_write_happens() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::new(dir.path());
    assert_eq!(cache.stale_lock(), Duration::from_secs(10));
    let lock = dir.path().join(OBJ).join("0000000000441000-91234.frm.lock");
    fs::create_dir_all(lock.parent().unwrap()).unwrap();
    fs::write(&lock, b"").unwrap();
    age_file(&lock, Duration::from_secs(11));
    let frame = data(5, 0x91234);
    assert_eq!(
        cache.put_frame(OBJ, 0x441000, &frame).unwrap(),
        WriteOutcome::Written
    );
    assert_eq!(fs::read(frame_final(dir.path())).unwrap(), frame);
    assert!(!lock.exists());
    no_protocol_leftovers(dir.path());
}

#[test]
fn stale_age_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::with_stale_lock(dir.path(), Duration::from_secs(3600));
    let lock = dir.path().join(OBJ).join("0000000000441000-91234.frm.lock");
    fs::create_dir_all(lock.parent().unwrap()).unwrap();
    fs::write(&lock, b"").unwrap();
    age_file(&lock, Duration::from_secs(60));
    assert_eq!(
        cache.put_frame(OBJ, 0x441000, &data(6, 0x91234)).unwrap(),
        WriteOutcome::Skipped
    );
    assert!(lock.exists());
}

#[test]
fn never_overwrites_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::new(dir.path());
    let old = data(7, 0x91234);
    fs::create_dir_all(dir.path().join(OBJ)).unwrap();
    fs::write(frame_final(dir.path()), &old).unwrap();
    let out = cache.put_frame(OBJ, 0x441000, &data(8, 0x91234)).unwrap();
    assert_eq!(out, WriteOutcome::AlreadyPresent);
    assert_eq!(fs::read(frame_final(dir.path())).unwrap(), old);
    assert_eq!(cache.put_size(PLAIN, 1).unwrap(), WriteOutcome::Written);
    assert_eq!(
        cache.put_size(PLAIN, 2).unwrap(),
        WriteOutcome::AlreadyPresent
    );
    assert_eq!(cache.get_size(PLAIN).unwrap(), Some(1));
    assert_eq!(cache.stats().already_present, 2);
    no_protocol_leftovers(dir.path());
}

#[test]
fn a_failed_write_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::new(dir.path());
    cache.set_fail_before_link(true);
    let frame = data(9, 0x91234);
    let err = cache.put_frame(OBJ, 0x441000, &frame).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Io);
    assert!(cache.put_size(PLAIN, 5).is_err());
    assert!(cache.put_blob(PLAIN, b"x").is_err());
    assert_eq!(files(dir.path()), Vec::<String>::new());
    assert_eq!(cache.stats().writes, 0);
    // The lock was released: the next write goes through at once.
    cache.set_fail_before_link(false);
    assert_eq!(
        cache.put_frame(OBJ, 0x441000, &frame).unwrap(),
        WriteOutcome::Written
    );
    assert_eq!(files(dir.path()).len(), 1);
}

#[test]
fn a_write_into_an_unusable_directory_is_an_error_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The object's directory path is blocked by a regular file.
    fs::create_dir_all(dir.path().join(OBJ).parent().unwrap()).unwrap();
    fs::write(dir.path().join(OBJ), b"not a dir").unwrap();
    let cache = SharedCache::new(dir.path());
    assert!(cache.put_frame(OBJ, 0, b"abc").is_err());
    assert_eq!(cache.get_frame(OBJ, 0, 3).ok().flatten(), None);
    assert_eq!(files(dir.path()), vec![OBJ.to_owned()]);
}

#[test]
fn wrong_size_on_hit_deletes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::new(dir.path());
    fs::create_dir_all(dir.path().join(OBJ)).unwrap();
    fs::write(frame_final(dir.path()), data(10, 0x91233)).unwrap();
    assert_eq!(cache.get_frame(OBJ, 0x441000, 0x91234).unwrap(), None);
    assert!(!frame_final(dir.path()).exists());
    let s = cache.stats();
    assert_eq!((s.corrupt, s.misses, s.hits), (1, 1, 0));

    // Chunks: a full chunk must be 4 MiB; the short last chunk has the caller's length.
    let full = dir.path().join(PLAIN).join("000000000000-4194304.bin");
    let last = dir.path().join(PLAIN).join("000000000001-4194304.bin");
    fs::create_dir_all(full.parent().unwrap()).unwrap();
    fs::write(&full, data(11, 1000)).unwrap();
    assert_eq!(
        cache.get_chunk(PLAIN, 0, CHUNK_SIZE, CHUNK_SIZE).unwrap(),
        None
    );
    assert!(!full.exists());
    let tail = data(12, 1000);
    cache.put_chunk(PLAIN, 1, CHUNK_SIZE, &tail).unwrap();
    assert_eq!(
        cache
            .get_chunk(PLAIN, 1, CHUNK_SIZE, 1000)
            .unwrap()
            .as_deref(),
        Some(tail.as_slice())
    );
    assert_eq!(cache.get_chunk(PLAIN, 1, CHUNK_SIZE, 999).unwrap(), None);
    assert!(!last.exists());
    assert_eq!(cache.stats().corrupt, 3);
    // A chunk larger than the chunk size is refused, not written.
    let err = cache.put_chunk(PLAIN, 2, 16, &[0u8; 17]).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::TooLarge);
    assert!(cache.get_chunk(PLAIN, 0, 0, 0).is_err());
}

#[test]
fn evict_removes_the_frame() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::new(dir.path());
    cache.put_frame(OBJ, 0x441000, &data(13, 0x91234)).unwrap();
    assert!(cache.evict_frame(OBJ, 0x441000, 0x91234).unwrap());
    assert!(!frame_final(dir.path()).exists());
    assert!(!cache.evict_frame(OBJ, 0x441000, 0x91234).unwrap());
    assert_eq!(cache.get_frame(OBJ, 0x441000, 0x91234).unwrap(), None);
    assert_eq!(cache.stats().evictions, 1);
    cache.put_chunk(PLAIN, 0, CHUNK_SIZE, b"tail").unwrap();
    assert!(cache.evict_chunk(PLAIN, 0, CHUNK_SIZE).unwrap());
    assert_eq!(cache.stats().evictions, 2);
}

#[test]
fn size_txt_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::new(dir.path());
    let size_file = dir.path().join(PLAIN).join("size.txt");
    fs::create_dir_all(size_file.parent().unwrap()).unwrap();
    assert_eq!(cache.get_size(PLAIN).unwrap(), None);
    for bad in [
        &b"12x"[..],
        b"",
        b"-5",
        b"+5",
        b"0x10",
        b"99999999999999999999999",
        b"\xff\xfe",
        &[b'1'; 100][..],
    ] {
        fs::write(&size_file, bad).unwrap();
        assert_eq!(cache.get_size(PLAIN).unwrap(), None, "{bad:?}");
        assert!(!size_file.exists(), "{bad:?} should have been deleted");
        let _ = fs::remove_file(&size_file);
    }
    fs::write(&size_file, " 42\n").unwrap();
    assert_eq!(cache.get_size(PLAIN).unwrap(), Some(42));
    // e2b's two-number form (some versions): not ours to use, not ours to delete.
    fs::write(&size_file, "100 40").unwrap();
    assert_eq!(cache.get_size(PLAIN).unwrap(), None);
    assert!(size_file.exists());
    fs::remove_file(&size_file).unwrap();
    cache.put_size(PLAIN, u64::MAX).unwrap();
    assert_eq!(cache.get_size(PLAIN).unwrap(), Some(u64::MAX));
    assert_eq!(cache.stats().corrupt, 8);
}

#[test]
fn blobs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::new(dir.path());
    let key = "2f6d3a52-8a3b-4c1e-9d7f-0123456789ab/memfile.header";
    assert_eq!(cache.get_blob(key, 1 << 20).unwrap(), None);
    cache.put_blob(key, b"header bytes").unwrap();
    assert_eq!(
        cache.get_blob(key, 1 << 20).unwrap().as_deref(),
        Some(&b"header bytes"[..])
    );
    // Too large for this caller: a miss, the file stays.
    assert_eq!(cache.get_blob(key, 4).unwrap(), None);
    assert!(dir.path().join(key).join("content.bin").exists());
    cache.put_blob("b/empty", b"").unwrap();
    assert_eq!(cache.get_blob("b/empty", 0).unwrap(), Some(Vec::new()));
}

#[test]
fn keys_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::new(dir.path());
    for key in ["", "/abs/x", "a/../b", "..", "a//b", "a/", "./a", "a/\0"] {
        let kind = |e: StoreError| e.kind();
        assert_eq!(
            cache.put_frame(key, 0, b"x").map_err(kind),
            Err(StoreErrorKind::InvalidKey),
            "{key:?}"
        );
        assert_eq!(
            cache.get_frame(key, 0, 1).map_err(kind),
            Err(StoreErrorKind::InvalidKey)
        );
        assert_eq!(
            cache.get_size(key).map_err(kind),
            Err(StoreErrorKind::InvalidKey)
        );
        assert_eq!(
            cache.put_blob(key, b"x").map_err(kind),
            Err(StoreErrorKind::InvalidKey)
        );
    }
    assert_eq!(files(dir.path()), Vec::<String>::new());
}

// ---- cross-process ----------------------------------------------------------------------------

const HELPER_ENV: &str = "THAW_SHARED_CACHE_HELPER_DIR";

/// Not a test of its own: when the env var is set, this is the second process of
/// `cross_process_files_are_shared` (it reads the parent's frame and writes its own).
#[test]
fn cross_process_helper() {
    let Some(root) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let cache = SharedCache::new(PathBuf::from(root));
    let parent = cache.get_frame(OBJ, 0, 5000).unwrap();
    assert_eq!(parent.as_deref(), Some(data(20, 5000).as_slice()));
    for i in 0..4u8 {
        let start = 0x10_0000 * u64::from(i);
        let out = cache.put_frame(PLAIN, start, &data(30 + i, 7000)).unwrap();
        assert_eq!(out, WriteOutcome::Written);
    }
    println!("helper pid {} wrote 4 frames", std::process::id());
}

#[test]
fn cross_process_files_are_shared() {
    let dir = tempfile::tempdir().unwrap();
    let cache = SharedCache::new(dir.path());
    cache.put_frame(OBJ, 0, &data(20, 5000)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "--exact",
            "cross_process_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helper failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("wrote 4 frames"), "{stdout}");
    assert!(
        !stdout.contains(&format!("helper pid {} ", std::process::id())),
        "the helper ran in this process"
    );
    for i in 0..4u8 {
        let start = 0x10_0000 * u64::from(i);
        assert_eq!(
            cache.get_frame(PLAIN, start, 7000).unwrap().as_deref(),
            Some(data(30 + i, 7000).as_slice()),
            "frame {i}"
        );
    }
    assert_eq!(cache.stats().hits, 4);
    no_protocol_leftovers(dir.path());
}

// ---- concurrency ------------------------------------------------------------------------------

#[test]
fn eight_racing_writers_make_one_file() {
    for round in 0..5u8 {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(SharedCache::new(dir.path()));
        let frame = Arc::new(data(40 + round, 0x9_1234));
        let barrier = Arc::new(Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (cache, frame, barrier) = (cache.clone(), frame.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    cache.put_frame(OBJ, 0x441000, &frame)
                })
            })
            .collect();
        let outcomes: Vec<WriteOutcome> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        let written = outcomes
            .iter()
            .filter(|o| **o == WriteOutcome::Written)
            .count();
        assert_eq!(written, 1, "{outcomes:?}");
        assert_eq!(
            files(dir.path()),
            vec![format!("{OBJ}/0000000000441000-91234.frm")]
        );
        assert_eq!(fs::read(frame_final(dir.path())).unwrap(), *frame);
        let s = cache.stats();
        assert_eq!(s.writes + s.skipped + s.already_present, 8, "{s:?}");
    }
}

// ---- CachedStore ------------------------------------------------------------------------------

/// A file store that counts calls and can be made to fail reads.
#[derive(Debug)]
struct Counting {
    inner: FileStore,
    reads: AtomicUsize,
    stats: AtomicUsize,
    gets: AtomicUsize,
    fail: AtomicBool,
}

impl Counting {
    fn new(root: &Path) -> Self {
        Self {
            inner: FileStore::new(root.to_path_buf()),
            reads: AtomicUsize::new(0),
            stats: AtomicUsize::new(0),
            gets: AtomicUsize::new(0),
            fail: AtomicBool::new(false),
        }
    }

    fn check(&self, key: &str) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::new(
                StoreErrorKind::Io,
                self.url(),
                key,
                "injected",
            ));
        }
        Ok(())
    }

    fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

impl Store for Counting {
    fn url(&self) -> String {
        self.inner.url()
    }
    fn read_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.check(key)?;
        self.inner.read_range(key, offset, buf)
    }
    fn stat(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        self.stats.fetch_add(1, Ordering::SeqCst);
        self.check(key)?;
        self.inner.stat(key)
    }
    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>, StoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.check(key)?;
        self.inner.get(key, max_len)
    }
    fn put(&self, key: &str, data: &[u8], opts: &PutOptions) -> Result<(), StoreError> {
        self.inner.put(key, data, opts)
    }
    fn create(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError> {
        self.inner.create(key, opts)
    }
    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.exists(key)
    }
}

struct Fixture {
    _store_dir: tempfile::TempDir,
    cache_dir: tempfile::TempDir,
    inner: Arc<Counting>,
    store: CachedStore,
    object: Vec<u8>,
}

/// An uncompressed object of one full chunk plus a 1000-byte last chunk.
fn fixture() -> Fixture {
    let store_dir = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let inner = Arc::new(Counting::new(store_dir.path()));
    let object = data(50, MIB4 + 1000);
    inner.put(PLAIN, &object, &PutOptions::default()).unwrap();
    let cache = Arc::new(SharedCache::new(cache_dir.path()));
    let store = CachedStore::new(cache, inner.clone());
    Fixture {
        _store_dir: store_dir,
        cache_dir,
        inner,
        store,
        object,
    }
}

#[test]
fn cached_store_serves_a_chunk_from_the_cache_after_one_inner_read() {
    let f = fixture();
    let mut buf = vec![0u8; MIB4];
    f.store.read_range(PLAIN, 0, &mut buf).unwrap();
    assert_eq!(buf, f.object[..MIB4]);
    assert_eq!(f.inner.reads(), 1);
    buf.fill(0);
    f.store.read_range(PLAIN, 0, &mut buf).unwrap();
    assert_eq!(buf, f.object[..MIB4]);
    assert_eq!(f.inner.reads(), 1, "second read must come from the cache");
    assert!(
        f.cache_dir
            .path()
            .join(PLAIN)
            .join("000000000000-4194304.bin")
            .exists()
    );

    // The short last chunk: recognised through the object size (one inner stat, then size.txt).
    let mut tail = vec![0u8; 1000];
    f.store.read_range(PLAIN, CHUNK_SIZE, &mut tail).unwrap();
    assert_eq!(tail, f.object[MIB4..]);
    assert_eq!(f.inner.reads(), 2);
    tail.fill(0);
    f.store.read_range(PLAIN, CHUNK_SIZE, &mut tail).unwrap();
    assert_eq!(tail, f.object[MIB4..]);
    assert_eq!(f.inner.reads(), 2);
    assert_eq!(f.inner.stats.load(Ordering::SeqCst), 1);

    // Other ranges pass through every time and never disturb the cached chunk.
    let mut small = vec![0u8; 4096];
    for _ in 0..2 {
        f.store.read_range(PLAIN, 0, &mut small).unwrap();
        assert_eq!(small, f.object[..4096]);
        f.store.read_range(PLAIN, 4096, &mut small).unwrap();
        assert_eq!(small, f.object[4096..8192]);
    }
    assert_eq!(f.inner.reads(), 6);
    assert_eq!(
        files(f.cache_dir.path()),
        vec![
            format!("{PLAIN}/000000000000-4194304.bin"),
            format!("{PLAIN}/000000000001-4194304.bin"),
            format!("{PLAIN}/size.txt"),
        ]
    );
    let s = f.store.cache().stats();
    assert_eq!((s.writes, s.corrupt), (3, 0), "{s:?}");
}

#[test]
fn cached_store_stat_and_get() {
    let f = fixture();
    for _ in 0..3 {
        let info = f.store.stat(PLAIN).unwrap();
        assert_eq!(info.size, u64::try_from(MIB4 + 1000).unwrap());
        assert_eq!(info.logical_size(), info.size);
    }
    assert_eq!(f.inner.stats.load(Ordering::SeqCst), 1);
    let key = "2f6d3a52-8a3b-4c1e-9d7f-0123456789ab/metadata.json";
    f.inner
        .put(key, b"{\"v\":1}", &PutOptions::default())
        .unwrap();
    for _ in 0..3 {
        assert_eq!(f.store.get(key, 1024).unwrap(), b"{\"v\":1}");
    }
    assert_eq!(f.inner.gets.load(Ordering::SeqCst), 1);
    // A limit below the cached size falls through to the store, which refuses.
    assert_eq!(
        f.store.get(key, 2).unwrap_err().kind(),
        StoreErrorKind::TooLarge
    );
    // Pass-through operations.
    assert!(f.store.exists(key).unwrap());
    f.store
        .put("b/new", b"new", &PutOptions::default())
        .unwrap();
    assert!(f.inner.exists("b/new").unwrap());
}

#[test]
fn cached_store_failed_or_short_reads_write_nothing() {
    let f = fixture();
    f.inner.fail.store(true, Ordering::SeqCst);
    let mut buf = vec![0u8; MIB4];
    assert!(f.store.read_range(PLAIN, 0, &mut buf).is_err());
    assert!(f.store.get(PLAIN, u64::MAX).is_err());
    assert!(f.store.stat(PLAIN).is_err());
    assert_eq!(files(f.cache_dir.path()), Vec::<String>::new());
    f.inner.fail.store(false, Ordering::SeqCst);

    // An aligned full-chunk read past the end of the object: the store reports it truncated.
    let mut past = vec![0u8; MIB4];
    let err = f
        .store
        .read_range(PLAIN, CHUNK_SIZE, &mut past)
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Truncated);
    assert_eq!(files(f.cache_dir.path()), Vec::<String>::new());
    let s = f.store.cache().stats();
    assert_eq!(s.writes, 0, "{s:?}");

    // After recovery the same read caches normally.
    f.store.read_range(PLAIN, 0, &mut buf).unwrap();
    assert_eq!(buf, f.object[..MIB4]);
    assert_eq!(f.store.cache().stats().writes, 1);
}

#[test]
fn cached_store_passes_compressed_objects_through() {
    let f = fixture();
    let key = "2f6d3a52-8a3b-4c1e-9d7f-0123456789ab/memfile.zstd";
    let body = data(60, MIB4);
    f.inner
        .put(key, &body, &PutOptions::with_uncompressed_size(123))
        .unwrap();
    let mut buf = vec![0u8; MIB4];
    for _ in 0..2 {
        f.store.read_range(key, 0, &mut buf).unwrap();
        assert_eq!(buf, body);
        let info = f.store.stat(key).unwrap();
        assert_eq!(info.uncompressed_size, Some(123));
        assert_eq!(info.size, u64::try_from(MIB4).unwrap());
    }
    assert_eq!(f.inner.reads(), 2);
    assert_eq!(f.inner.stats.load(Ordering::SeqCst), 2);
    assert_eq!(files(f.cache_dir.path()), Vec::<String>::new());
}

#[test]
fn cached_store_survives_a_corrupt_cache_file() {
    let f = fixture();
    let chunk = f
        .cache_dir
        .path()
        .join(PLAIN)
        .join("000000000000-4194304.bin");
    fs::create_dir_all(chunk.parent().unwrap()).unwrap();
    fs::write(&chunk, b"garbage").unwrap();
    let mut buf = vec![0u8; MIB4];
    f.store.read_range(PLAIN, 0, &mut buf).unwrap();
    assert_eq!(buf, f.object[..MIB4]);
    assert_eq!(f.inner.reads(), 1);
    // Deleted as corrupt, then rewritten from the store's bytes.
    assert_eq!(fs::read(&chunk).unwrap(), f.object[..MIB4]);
    assert_eq!(f.store.cache().stats().corrupt, 1);
}
