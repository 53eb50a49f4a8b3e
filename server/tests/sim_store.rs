//! The simulated store (`sim:`): URL parsing, pacing, shared bandwidth, progress, injected faults,
//! the fault switch, counters; and the file store's progressive reads.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]

use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thaw_server::store::sim::{FaultKind, FaultMode, Pacing, SimConfig, SimStats};
use thaw_server::store::{
    FileStore, ObjectInfo, ObjectWriter, PutOptions, SimStore, Store, StoreError, StoreErrorKind,
    open_store,
};

const MIB: usize = 1 << 20;

/// Timing tests run one at a time, so they do not steal each other's CPU.
fn timing_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    SmallRng::seed_from_u64(seed).fill(&mut out[..]);
    out
}

/// A directory with object `b/obj` of `len` bytes, and its contents.
fn dir_with_object(len: usize) -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let bytes = data(len, 7);
    FileStore::new(dir.path().to_path_buf())
        .put("b/obj", &bytes, &PutOptions::default())
        .unwrap();
    (dir, bytes)
}

fn sim(dir: &tempfile::TempDir, params: &str) -> SimStore {
    let url = format!("sim:{params}inner=file://{}", dir.path().display());
    SimStore::open(&url).unwrap()
}

/// Reads `[offset, offset + len)` recording every progress report.
fn read_recording(
    store: &dyn Store,
    offset: u64,
    len: usize,
) -> (Result<(), StoreError>, Vec<u8>, Vec<usize>) {
    let mut buf = vec![0u8; len];
    let mut reports = Vec::new();
    let r = store.read_range_progress("b/obj", offset, &mut buf, &mut |n| reports.push(n));
    (r, buf, reports)
}

#[test]
fn url_parsing_good_and_bad() {
    let (config, inner) = SimConfig::parse(
        "ttfb=20ms,jitter=5ms,bw=100MB/s,chunk=64KiB,fail=0.01,truncate=0.02,stall=0.5,\
         stall_for=2s,seed=42,pacing=request,burst=1MiB,inner=file:///dir",
    )
    .unwrap();
    assert_eq!(inner, "file:///dir");
    assert_eq!(config.ttfb, Duration::from_millis(20));
    assert_eq!(config.jitter, Duration::from_millis(5));
    assert_eq!(config.bandwidth, Some(100_000_000));
    assert_eq!(config.chunk, 65_536);
    assert_eq!(config.burst, Some(1 << 20));
    assert_eq!(config.pacing, Pacing::PerRequest);
    assert!((config.fail - 0.01).abs() < 1e-12);
    assert!((config.truncate - 0.02).abs() < 1e-12);
    assert!((config.stall - 0.5).abs() < 1e-12);
    assert_eq!(config.stall_for, Duration::from_secs(2));
    assert_eq!(config.seed, Some(42));

    // Units, and inner URLs that contain commas or are simulated themselves.
    let (c, inner) =
        SimConfig::parse("ttfb=250us,bw=1.5GiB/s,chunk=4KB,inner=sim:inner=/a,b").unwrap();
    assert_eq!(c.ttfb, Duration::from_micros(250));
    assert_eq!(c.bandwidth, Some(1_610_612_736));
    assert_eq!(c.chunk, 4000);
    assert_eq!(inner, "sim:inner=/a,b");
    let (c, _) = SimConfig::parse("bw=unlimited,ttfb=1s,inner=/x").unwrap();
    assert_eq!((c.bandwidth, c.ttfb), (None, Duration::from_secs(1)));
    assert_eq!(
        SimConfig::parse("inner=/x").unwrap().0,
        SimConfig::default()
    );

    for (params, needle) in [
        ("", "missing inner"),
        ("ttfb=20ms", "missing inner"),
        ("ttfb=20ms,", "missing inner"),
        ("inner=", "needs a store URL"),
        ("ttfb=20,inner=/x", "duration"),
        ("ttfb=fast,inner=/x", "duration"),
        ("ttfb=-1ms,inner=/x", "duration"),
        ("bw=100MB,inner=/x", "bandwidth"),
        ("bw=0MB/s,inner=/x", "bandwidth"),
        ("bw=100mbps,inner=/x", "bandwidth"),
        ("chunk=0B,inner=/x", "positive size"),
        ("chunk=64k,inner=/x", "size"),
        ("fail=1.5,inner=/x", "probability"),
        ("fail=-0.1,inner=/x", "probability"),
        ("truncate=NaN,inner=/x", "probability"),
        ("seed=x,inner=/x", "integer"),
        ("pacing=fair,inner=/x", "shared or request"),
        ("colour=blue,inner=/x", "unknown parameter \"colour\""),
        ("ttfb,inner=/x", "not key=value"),
        ("ttfb=1ms,ttfb=2ms,inner=/x", "twice"),
    ] {
        let err = SimConfig::parse(params).unwrap_err();
        assert!(err.contains(needle), "{params:?}: {err}");
        let url = format!("sim:{params}");
        let err = open_store(&url).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::InvalidUrl, "{url}");
        assert!(err.to_string().contains(needle), "{url}: {err}");
    }

    // The canonical URL names every parameter and the inner store; it parses back.
    let store = SimStore::open("sim:ttfb=20ms,bw=100MB/s,seed=3,fail=0.25,inner=/srv/b").unwrap();
    assert_eq!(
        store.url(),
        "sim:ttfb=20ms,bw=100MB/s,chunk=64KiB,fail=0.25,seed=3,inner=file:///srv/b"
    );
    assert_eq!(store.seed(), 3);
    let again = SimStore::open(&store.url()).unwrap();
    assert_eq!(again.config(), store.config());
    assert_eq!(again.url(), store.url());
}

#[test]
fn gcs_read_of_4mib_takes_about_62ms() {
    let _lock = timing_lock();
    let (dir, bytes) = dir_with_object(4 * MIB);
    let store = sim(&dir, "ttfb=20ms,bw=100MB/s,");
    let t = Instant::now();
    let (r, buf, reports) = read_recording(&store, 0, 4 * MIB);
    let took = t.elapsed();
    r.unwrap();
    assert!(buf == bytes, "data differs");
    assert!(
        (Duration::from_millis(55)..Duration::from_millis(400)).contains(&took),
        "4 MiB at 20 ms + 100 MB/s took {took:?}, expected ~62 ms"
    );
    assert_eq!(reports.len(), 64, "one report per 64 KiB step");
    let s = store.stats();
    assert_eq!((s.reads, s.bytes_delivered), (1, 4 << 20));

    // A reader that falls behind (here: 30 ms in one progress callback) catches up within the
    // receive window: oversleeping does not compound (~62 ms, not ~92 ms). The upper bound is what
    // tells the two apart, so a loaded machine gets three attempts; a broken catch-up fails all.
    let late_read = || {
        let t = Instant::now();
        let mut buf = vec![0u8; 4 * MIB];
        let mut slept = false;
        store
            .read_range_progress("b/obj", 0, &mut buf, &mut |_| {
                if !slept {
                    slept = true;
                    std::thread::sleep(Duration::from_millis(30));
                }
            })
            .unwrap();
        assert!(buf == bytes, "data differs");
        t.elapsed()
    };
    let attempts: Vec<Duration> = (0..3).map(|_| late_read()).collect();
    assert!(
        attempts.iter().all(|t| *t >= Duration::from_millis(55)),
        "{attempts:?}"
    );
    assert!(
        attempts.iter().any(|t| *t < Duration::from_millis(85)),
        "a late reader catches up: {attempts:?}, expected ~62 ms"
    );

    // The NFS profile: 1 ms + 4 MiB at 500 MB/s = ~9.4 ms.
    let nfs = sim(&dir, "ttfb=1ms,bw=500MB/s,");
    let t = Instant::now();
    nfs.read_range("b/obj", 0, &mut vec![0u8; 4 * MIB]).unwrap();
    let took = t.elapsed();
    assert!(
        (Duration::from_millis(8)..Duration::from_millis(200)).contains(&took),
        "4 MiB at 1 ms + 500 MB/s took {took:?}, expected ~9.4 ms"
    );
}

fn concurrent_reads(store: &Arc<SimStore>) -> Vec<Duration> {
    let barrier = Arc::new(Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let store = Arc::clone(store);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4 * MIB];
                barrier.wait();
                let t = Instant::now();
                store.read_range("b/obj", 0, &mut buf).unwrap();
                t.elapsed()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn concurrent_reads_share_the_bandwidth() {
    let _lock = timing_lock();
    let (dir, _) = dir_with_object(4 * MIB);
    let store = Arc::new(sim(&dir, "ttfb=20ms,bw=100MB/s,"));
    let times = concurrent_reads(&store);
    for took in &times {
        assert!(
            (Duration::from_millis(92)..Duration::from_millis(600)).contains(took),
            "two concurrent 4 MiB reads sharing 100 MB/s: {times:?}, expected both ~104 ms"
        );
    }
    let s = store.stats();
    assert_eq!((s.reads, s.bytes_delivered, s.in_flight), (2, 8 << 20, 0));
    assert_eq!(s.in_flight_max, 2);

    // pacing=request gives each request the whole bandwidth (e2b's simulated backends).
    let store = Arc::new(sim(&dir, "ttfb=20ms,bw=100MB/s,pacing=request,"));
    // The upper bound tells per-request pacing from a shared link (~104 ms), so a loaded machine
    // gets three attempts; shared pacing would fail every one.
    let rounds: Vec<Vec<Duration>> = (0..3).map(|_| concurrent_reads(&store)).collect();
    assert!(
        rounds
            .iter()
            .flatten()
            .all(|t| *t >= Duration::from_millis(55)),
        "{rounds:?}"
    );
    assert!(
        rounds
            .iter()
            .any(|times| times.iter().all(|t| *t < Duration::from_millis(92))),
        "two concurrent 4 MiB reads paced per request: {rounds:?}, expected both ~62 ms"
    );
}

#[test]
fn progress_is_monotonic_and_ends_at_len() {
    let (dir, bytes) = dir_with_object(MIB + 1000);
    let store = sim(&dir, "chunk=100KB,");
    let (r, buf, reports) = read_recording(&store, 500, MIB);
    r.unwrap();
    assert!(buf[..] == bytes[500..500 + MIB]);
    assert!(reports.windows(2).all(|w| w[0] < w[1]), "{reports:?}");
    assert_eq!(reports.last(), Some(&MIB));
    assert_eq!(reports.len(), MIB.div_ceil(100_000));
    assert!(
        reports[..reports.len() - 1]
            .iter()
            .all(|n| n % 100_000 == 0)
    );

    // An empty read reports 0 once; a missing object is an error, even for an empty read.
    let (r, _, reports) = read_recording(&store, 0, 0);
    r.unwrap();
    assert_eq!(reports, [0]);
    let mut empty = [0u8; 0];
    let err = store
        .read_range_progress("b/missing", 0, &mut empty, &mut |_| {})
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::NotFound);
    // Reading past the end is the inner store's Truncated error, after a valid prefix.
    let (r, buf, reports) = read_recording(&store, 0, MIB + 2000);
    assert_eq!(r.unwrap_err().kind(), StoreErrorKind::Truncated);
    let last = reports.last().copied().unwrap_or(0);
    assert!(last < MIB + 1000);
    assert!(buf[..last] == bytes[..last]);
}

#[test]
fn injected_failures_and_truncations_are_errors_and_counted() {
    let (dir, bytes) = dir_with_object(MIB);
    let failing = sim(&dir, "fail=1,");
    let (r, _, reports) = read_recording(&failing, 0, MIB);
    let err = r.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Io);
    assert!(err.to_string().contains("injected"), "{err}");
    assert!(reports.is_empty(), "a failed request delivers no byte");
    assert_eq!(
        failing.stat("b/obj").unwrap_err().kind(),
        StoreErrorKind::Io
    );
    assert_eq!(
        failing.exists("b/obj").unwrap_err().kind(),
        StoreErrorKind::Io
    );
    assert_eq!(
        failing.get("b/obj", u64::MAX).unwrap_err().kind(),
        StoreErrorKind::Io
    );
    let s = failing.stats();
    assert_eq!((s.faults_failed, s.bytes_delivered, s.faults()), (4, 0, 4));
    assert_eq!((s.reads, s.stats, s.exists, s.gets), (1, 1, 1, 1));

    let truncating = sim(&dir, "truncate=1,seed=1,");
    for i in 0..20u64 {
        let offset = i * 1000;
        let (r, buf, reports) = read_recording(&truncating, offset, MIB / 2);
        let err = r.unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Truncated);
        let last = reports.last().copied().unwrap_or(0);
        assert!(last < MIB / 2, "a truncated body is never complete");
        assert!(reports.windows(2).all(|w| w[0] < w[1]));
        let at = usize::try_from(offset).unwrap();
        assert!(
            buf[..last] == bytes[at..at + last],
            "the reported prefix is valid"
        );
    }
    assert_eq!(
        truncating.get("b/obj", u64::MAX).unwrap_err().kind(),
        StoreErrorKind::Truncated
    );
    let s = truncating.stats();
    assert_eq!(
        (s.faults_truncated, s.faults_failed, s.reads, s.gets),
        (21, 0, 20, 1)
    );
    // Requests without a body cannot be truncated.
    assert!(truncating.exists("b/obj").unwrap());
    assert_eq!(truncating.stat("b/obj").unwrap().size, 1 << 20);
}

#[test]
fn random_faults_never_produce_short_successes() {
    let (dir, bytes) = dir_with_object(MIB);
    let store = sim(
        &dir,
        "fail=0.2,truncate=0.3,stall=0.1,stall_for=1ms,chunk=16KiB,",
    );
    let mut outcomes = [0u64; 3];
    for i in 0..300usize {
        let offset = (i * 7919) % (MIB / 2);
        let (r, buf, reports) = read_recording(&store, u64::try_from(offset).unwrap(), MIB / 4);
        let last = reports.last().copied().unwrap_or(0);
        assert!(buf[..last] == bytes[offset..offset + last]);
        match r {
            Ok(()) => {
                outcomes[0] += 1;
                assert_eq!(last, MIB / 4, "success means every byte");
            }
            Err(e) if e.kind() == StoreErrorKind::Io => {
                outcomes[1] += 1;
                assert!(reports.is_empty());
            }
            Err(e) => {
                assert_eq!(e.kind(), StoreErrorKind::Truncated, "{e}");
                outcomes[2] += 1;
                assert!(last < MIB / 4);
            }
        }
    }
    let s = store.stats();
    assert_eq!(
        (s.faults_failed, s.faults_truncated),
        (outcomes[1], outcomes[2])
    );
    assert!(outcomes.iter().all(|&n| n > 20), "{outcomes:?}");
    assert!(s.faults_stalled > 5, "{s:?}");
}

/// The outcome of each of `n` sequential reads: Ok, or the error kind and the bytes reported.
fn fault_sequence(store: &SimStore, n: usize) -> Vec<(Option<StoreErrorKind>, usize)> {
    (0..n)
        .map(|_| {
            let (r, _, reports) = read_recording(store, 0, 256 * 1024);
            (
                r.err().map(|e| e.kind()),
                reports.last().copied().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn seed_makes_fault_sequences_reproducible() {
    let (dir, _) = dir_with_object(MIB);
    let params = "fail=0.3,truncate=0.3,chunk=4KiB,seed=1234,";
    let a = fault_sequence(&sim(&dir, params), 60);
    let b = fault_sequence(&sim(&dir, params), 60);
    assert_eq!(a, b);
    assert!(a.iter().any(|(k, _)| k.is_none()));
    assert!(a.iter().any(|(k, _)| *k == Some(StoreErrorKind::Io)));
    assert!(a.iter().any(|(k, _)| *k == Some(StoreErrorKind::Truncated)));
    let c = fault_sequence(&sim(&dir, "fail=0.3,truncate=0.3,chunk=4KiB,seed=99,"), 60);
    assert_ne!(a, c);

    // An unseeded store reports the seed it picked; replaying it gives the same faults.
    let unseeded = sim(&dir, "fail=0.3,truncate=0.3,chunk=4KiB,");
    let first = fault_sequence(&unseeded, 60);
    let replay = sim(
        &dir,
        &format!("fail=0.3,truncate=0.3,chunk=4KiB,seed={},", unseeded.seed()),
    );
    assert_eq!(fault_sequence(&replay, 60), first);
}

#[test]
fn the_fault_switch_forces_failures_then_lets_retries_succeed() {
    let (dir, bytes) = dir_with_object(MIB);
    let store = sim(&dir, "");
    assert_eq!(store.fault_mode(), FaultMode::Random);
    store.set_fault_mode(FaultMode::FailAll);
    let (r, _, _) = read_recording(&store, 0, 4096);
    assert_eq!(r.unwrap_err().kind(), StoreErrorKind::Io);
    assert_eq!(store.stat("b/obj").unwrap_err().kind(), StoreErrorKind::Io);
    store.set_fault_mode(FaultMode::TruncateAll);
    let (r, _, _) = read_recording(&store, 0, 4096);
    assert_eq!(r.unwrap_err().kind(), StoreErrorKind::Truncated);
    assert!(store.exists("b/obj").unwrap(), "no body, no truncation");
    store.set_fault_mode(FaultMode::Random);
    let (r, buf, _) = read_recording(&store, 0, 4096);
    r.unwrap();
    assert!(buf[..] == bytes[..4096]);

    // One forced failure: the first attempt fails, the retry succeeds.
    store.inject(FaultKind::Fail, 1);
    let mut buf = vec![0u8; 4096];
    let first = store.read_range("b/obj", 0, &mut buf);
    assert_eq!(first.unwrap_err().kind(), StoreErrorKind::Io);
    store.read_range("b/obj", 0, &mut buf).unwrap();
    assert!(buf[..] == bytes[..4096]);
    // Truncation injections skip requests without a body.
    store.inject(FaultKind::Truncate, 2);
    assert!(store.exists("b/obj").unwrap());
    assert_eq!(
        store.get("b/obj", u64::MAX).unwrap_err().kind(),
        StoreErrorKind::Truncated
    );
    let err = store.read_range("b/obj", 0, &mut buf).unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Truncated);
    assert_eq!(store.get("b/obj", u64::MAX).unwrap(), bytes);
    // Off silences configured faults.
    let noisy = sim(&dir, "fail=1,");
    noisy.set_fault_mode(FaultMode::Off);
    noisy.read_range("b/obj", 0, &mut buf).unwrap();
    let s: SimStats = store.stats();
    assert_eq!((s.faults_failed, s.faults_truncated), (3, 3));
}

#[test]
fn stalls_pause_the_body_and_complete() {
    let _lock = timing_lock();
    let (dir, bytes) = dir_with_object(MIB);
    let store = sim(&dir, "stall=1,stall_for=60ms,");
    let t = Instant::now();
    let (r, buf, reports) = read_recording(&store, 0, MIB);
    let took = t.elapsed();
    r.unwrap();
    assert!(buf == bytes);
    assert_eq!(reports.last(), Some(&MIB));
    assert!(took >= Duration::from_millis(60), "{took:?}");
    assert_eq!(store.stats().faults_stalled, 1);
    store.set_fault_mode(FaultMode::StallAll);
    let t = Instant::now();
    assert_eq!(store.get("b/obj", u64::MAX).unwrap(), bytes);
    assert!(t.elapsed() >= Duration::from_millis(60));
    assert!(store.exists("b/obj").unwrap());
    assert_eq!(store.stats().faults_stalled, 2);
}

#[test]
fn metadata_requests_pay_ttfb_and_writes_pass_through() {
    let _lock = timing_lock();
    let (dir, bytes) = dir_with_object(MIB);
    let store = sim(&dir, "ttfb=20ms,bw=100MB/s,");
    let timed = |f: &dyn Fn()| {
        let t = Instant::now();
        f();
        t.elapsed()
    };
    let took = timed(&|| assert_eq!(store.stat("b/obj").unwrap().size, 1 << 20));
    assert!(
        (Duration::from_millis(20)..Duration::from_millis(400)).contains(&took),
        "{took:?}"
    );
    let took = timed(&|| assert!(!store.exists("b/nothing").unwrap()));
    assert!(
        (Duration::from_millis(20)..Duration::from_millis(400)).contains(&took),
        "{took:?}"
    );
    // get pays bandwidth too: 20 ms + 1 MiB at 100 MB/s = ~30 ms.
    let took = timed(&|| assert!(store.get("b/obj", u64::MAX).unwrap() == bytes));
    assert!(
        (Duration::from_millis(28)..Duration::from_millis(400)).contains(&took),
        "{took:?}"
    );
    assert_eq!(
        store.get("b/obj", 10).unwrap_err().kind(),
        StoreErrorKind::TooLarge
    );
    let s = store.stats();
    assert_eq!((s.stats, s.exists, s.gets, s.reads), (1, 1, 2, 0));
    assert_eq!(s.requests(), 4);
    assert_eq!(s.bytes_delivered, 1 << 20);
    assert_eq!((s.in_flight, s.in_flight_max), (0, 1));
    store.reset_stats();
    assert_eq!(store.stats(), SimStats::default());

    // Writes pass through unpaced (they would take >= 2 s if they paid TTFB or bandwidth).
    let slow = sim(&dir, "ttfb=2s,bw=1KB/s,");
    let took = timed(&|| {
        slow.put("b/new", &bytes, &PutOptions::default()).unwrap();
        let mut w = slow.create("b/streamed", &PutOptions::default()).unwrap();
        std::io::Write::write_all(&mut w, b"hello").unwrap();
        w.commit().unwrap();
    });
    assert!(
        took < Duration::from_secs(2),
        "writes are not paced: {took:?}"
    );
    let s = slow.stats();
    assert_eq!(
        (s.puts, s.creates, s.requests(), s.in_flight_max),
        (1, 1, 2, 0)
    );
    let inner = FileStore::new(dir.path().to_path_buf());
    assert_eq!(inner.get("b/streamed", 100).unwrap(), b"hello");
}

#[test]
fn file_store_reports_progress_in_batches() {
    let batch = FileStore::PROGRESS_BATCH;
    assert_eq!(batch, 256 * 1024);
    let (dir, bytes) = dir_with_object(4 * batch + 1);
    let store = FileStore::new(dir.path().to_path_buf());
    let (r, buf, reports) = read_recording(&store, 0, 4 * batch + 1);
    r.unwrap();
    assert!(buf == bytes);
    assert_eq!(
        reports,
        [batch, 2 * batch, 3 * batch, 4 * batch, 4 * batch + 1]
    );
    let (r, _, reports) = read_recording(&store, 0, 0);
    r.unwrap();
    assert_eq!(reports, [0]);
    // Past the end: Truncated, after the batches that were complete.
    let (r, buf, reports) = read_recording(&store, 1, 4 * batch + 1);
    let err = r.unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::Truncated);
    assert!(err.to_string().contains("past the end"), "{err}");
    assert_eq!(reports, [batch, 2 * batch, 3 * batch, 4 * batch]);
    assert!(buf[..4 * batch] == bytes[1..=4 * batch]);
    let err = store
        .read_range_progress("b/obj", u64::MAX, &mut [0u8; 2], &mut |_| {})
        .unwrap_err();
    assert_eq!(err.kind(), StoreErrorKind::InvalidKey);
}

/// A store that implements only `read_range`: the provided progress method reports once.
#[derive(Debug)]
struct Plain(FileStore);

impl Store for Plain {
    fn url(&self) -> String {
        self.0.url()
    }
    fn read_range(&self, key: &str, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.0.read_range(key, offset, buf)
    }
    fn stat(&self, key: &str) -> Result<ObjectInfo, StoreError> {
        self.0.stat(key)
    }
    fn get(&self, key: &str, max_len: u64) -> Result<Vec<u8>, StoreError> {
        self.0.get(key, max_len)
    }
    fn put(&self, key: &str, data: &[u8], opts: &PutOptions) -> Result<(), StoreError> {
        self.0.put(key, data, opts)
    }
    fn create(&self, key: &str, opts: &PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError> {
        self.0.create(key, opts)
    }
    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.0.exists(key)
    }
}

#[test]
fn default_progress_reports_once_at_the_end() {
    let (dir, bytes) = dir_with_object(MIB);
    let store = Plain(FileStore::new(dir.path().to_path_buf()));
    let (r, buf, reports) = read_recording(&store, 0, MIB);
    r.unwrap();
    assert!(buf == bytes);
    assert_eq!(reports, [MIB]);
    let (r, _, reports) = read_recording(&store, 1, MIB);
    assert_eq!(r.unwrap_err().kind(), StoreErrorKind::Truncated);
    assert!(reports.is_empty());
    // A simulated store over it still reports per step.
    let sim = SimStore::new(Arc::new(store), SimConfig::default());
    let (r, _, reports) = read_recording(&sim, 0, MIB);
    r.unwrap();
    assert_eq!(reports.len(), 16);
    // Profiles for e2b's simulated backends.
    assert_eq!(SimConfig::gcs().ttfb, Duration::from_millis(20));
    assert_eq!(SimConfig::nfs().bandwidth, Some(500_000_000));
}
