//! The thread-per-core runtime and the io_uring read primitives.
#![allow(
    clippy::tests_outside_test_module,
    reason = "an integration test crate is itself the test module"
)]

use std::cell::RefCell;
use std::io;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thaw_server::runtime::{Runtime, TaskError, current_worker};
use thaw_server::uring::{FixedPool, HeapRegion, RegionBuf, read_exact_at, read_fixed_exact_at};
use tokio::sync::{Notify, oneshot};
use tokio_uring::buf::BoundedBuf;

const FILE_LEN: usize = (1 << 20) + 123;

/// A temp file of `FILE_LEN` pseudo-random bytes, and its contents.
fn temp_file() -> (tempfile::NamedTempFile, Vec<u8>) {
    let mut rng = SmallRng::seed_from_u64(7);
    let mut data = vec![0_u8; FILE_LEN];
    rng.fill(&mut data[..]);
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().write_all_at(&data, 0).unwrap();
    (file, data)
}

fn pread(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap();
    let mut buf = vec![0_u8; len];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn random_ranges(seed: u64, count: usize, max_len: usize) -> Vec<(u64, usize)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let len = rng.random_range(1..=max_len);
            let offset = rng.random_range(0..=FILE_LEN - len);
            (u64::try_from(offset).unwrap(), len)
        })
        .collect()
}

#[test]
fn zero_workers_means_one_per_core() {
    let rt = Runtime::new(0).unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(rt.workers(), cores);
}

#[test]
fn spawn_on_each_worker_runs_there() {
    let rt = Runtime::new(3).unwrap();
    assert_eq!(current_worker(), None);
    for core in 0..3 {
        let (worker, name) = rt
            .block_on(core, || async {
                (
                    current_worker(),
                    std::thread::current().name().map(str::to_owned),
                )
            })
            .unwrap();
        assert_eq!(worker, Some(core));
        assert_eq!(
            name.as_deref(),
            Some(format!("thaw-worker-{core}").as_str())
        );
    }
    let all = rt
        .spawn_all(|i| async move { (i, current_worker()) })
        .unwrap();
    for (i, handle) in all.into_iter().enumerate() {
        assert_eq!(handle.join().unwrap(), (i, Some(i)));
    }
}

#[test]
fn pinned_workers_start_and_run() {
    let rt = Runtime::builder().workers(2).pin(true).build().unwrap();
    for core in 0..2 {
        assert_eq!(
            rt.block_on(core, || async { current_worker() }).unwrap(),
            Some(core)
        );
    }
}

#[test]
fn spawn_on_missing_worker_is_an_error() {
    let rt = Runtime::new(2).unwrap();
    let err = rt.spawn_on(2, || async {}).unwrap_err();
    assert!(
        matches!(
            err,
            TaskError::NoSuchWorker {
                core: 2,
                workers: 2
            }
        ),
        "{err}"
    );
}

#[test]
fn not_send_future_runs_on_its_worker() {
    let rt = Runtime::new(2).unwrap();
    let sum = rt
        .block_on(1, || async {
            let shared = Rc::new(RefCell::new(Vec::new()));
            let mut handles = Vec::new();
            for i in 0..10_u32 {
                let shared = Rc::clone(&shared);
                handles.push(tokio_uring::spawn(async move {
                    tokio::task::yield_now().await;
                    shared.borrow_mut().push(i);
                }));
            }
            for handle in handles {
                handle.await.unwrap();
            }
            let sum: u32 = shared.borrow().iter().sum();
            sum
        })
        .unwrap();
    assert_eq!(sum, 45);
}

#[test]
fn wake_worker_to_worker_with_notify_and_oneshot() {
    let rt = Runtime::new(2).unwrap();
    for _ in 0..100 {
        let notify = Arc::new(Notify::new());
        let (tx, rx) = oneshot::channel::<u64>();
        let waiter = {
            let notify = Arc::clone(&notify);
            rt.spawn_on(0, move || async move {
                notify.notified().await;
                let value = rx.await.unwrap();
                (current_worker(), value)
            })
            .unwrap()
        };
        let waker = rt
            .spawn_on(1, move || async move {
                notify.notify_one();
                tx.send(42).unwrap();
                current_worker()
            })
            .unwrap();
        assert_eq!(waker.join().unwrap(), Some(1));
        assert_eq!(waiter.join().unwrap(), (Some(0), 42));
    }
}

#[test]
fn task_on_one_worker_awaits_a_task_spawned_on_another() {
    let rt = Runtime::new(2).unwrap();
    let handle = rt.handle().clone();
    let got = rt
        .block_on(0, move || async move {
            let remote = handle.spawn_on(1, || async { current_worker() }).unwrap();
            (current_worker(), remote.await.unwrap())
        })
        .unwrap();
    assert_eq!(got, (Some(0), Some(1)));
}

#[test]
fn wake_worker_from_os_thread() {
    let rt = Runtime::new(2).unwrap();
    let notify = Arc::new(Notify::new());
    let waiter = {
        let notify = Arc::clone(&notify);
        rt.spawn_on(0, move || async move {
            notify.notified().await;
            current_worker()
        })
        .unwrap()
    };
    let (tx, rx) = oneshot::channel::<&'static str>();
    let second = rt
        .spawn_on(1, move || async move { rx.await.unwrap() })
        .unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        notify.notify_one();
        tx.send("from a thread").unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(waiter.join().unwrap(), Some(0));
    assert_eq!(second.join().unwrap(), "from a thread");
}

#[test]
fn panic_in_task_fails_its_handle_and_the_worker_survives() {
    let rt = Runtime::new(1).unwrap();
    let in_future = rt
        .spawn_on(0, || async {
            tokio::task::yield_now().await;
            panic!("boom in the future");
        })
        .unwrap();
    let err = in_future.join().unwrap_err();
    assert!(
        matches!(&err, TaskError::Panicked(m) if m == "boom in the future"),
        "{err}"
    );

    let in_builder = rt
        .spawn_on(0, || -> std::future::Ready<()> {
            panic!("boom in the builder")
        })
        .unwrap();
    let err = in_builder.join().unwrap_err();
    assert!(
        matches!(&err, TaskError::Panicked(m) if m == "boom in the builder"),
        "{err}"
    );

    assert_eq!(rt.block_on(0, || async { 7 }).unwrap(), 7);
}

#[test]
fn join_on_a_worker_answers_would_block() {
    let rt = Runtime::new(2).unwrap();
    let handle = rt.handle().clone();
    let err = rt
        .block_on(0, move || async move {
            let inner = handle.spawn_on(1, || async {}).unwrap();
            inner.join().unwrap_err()
        })
        .unwrap();
    assert!(matches!(err, TaskError::WouldBlock), "{err}");
}

#[test]
fn shutdown_runs_queued_tasks_and_joins() {
    let rt = Runtime::new(2).unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    // A slow task first, so the rest are still queued or live when shutdown starts.
    for core in 0..2 {
        let done = Arc::clone(&done);
        handles.push(
            rt.spawn_on(core, move || async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                done.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap(),
        );
    }
    for i in 0..200 {
        let done = Arc::clone(&done);
        handles.push(
            rt.spawn_on(i % 2, move || async move {
                tokio::task::yield_now().await;
                done.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap(),
        );
    }
    let handle = rt.handle().clone();
    assert_eq!(rt.shutdown(), 0);
    assert_eq!(done.load(Ordering::Relaxed), 202);
    for h in handles {
        h.join().unwrap();
    }
    let err = handle.spawn_on(0, || async {}).unwrap_err();
    assert!(matches!(err, TaskError::ShutDown), "{err}");
}

#[test]
fn shutdown_grace_drops_stuck_tasks() {
    let rt = Runtime::builder()
        .workers(1)
        .shutdown_grace(Duration::from_millis(50))
        .build()
        .unwrap();
    let stuck = rt.spawn_on(0, std::future::pending::<()>).unwrap();
    let start = Instant::now();
    drop(rt);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(matches!(stuck.join().unwrap_err(), TaskError::Cancelled));
}

#[test]
fn uring_read_exact_at_matches_pread() {
    let (file, data) = temp_file();
    let path = file.path().to_owned();
    let rt = Runtime::new(1).unwrap();
    let ranges = random_ranges(1, 500, 70_000);
    let got = {
        let path = path.clone();
        let ranges = ranges.clone();
        rt.block_on(0, move || async move {
            let file = tokio_uring::fs::File::open(&path).await.unwrap();
            let mut out = Vec::new();
            for (offset, len) in ranges {
                let (res, buf) = read_exact_at(&file, Vec::with_capacity(len), offset).await;
                res.unwrap();
                out.push(buf);
            }
            // A prefix of a larger buffer through a slice.
            let (res, slice) = read_exact_at(&file, vec![0_u8; 100].slice(10..20), 5).await;
            res.unwrap();
            let prefix = slice.into_inner();
            file.close().await.unwrap();
            (out, prefix)
        })
        .unwrap()
    };
    for ((offset, len), buf) in ranges.iter().zip(&got.0) {
        assert_eq!(buf.len(), *len);
        assert_eq!(*buf, pread(&path, *offset, *len));
    }
    assert_eq!(&got.1[..10], &[0; 10]);
    assert_eq!(&got.1[10..20], &data[5..15]);
    assert_eq!(&got.1[20..], &[0; 80]);
}

#[test]
fn uring_read_past_eof_is_unexpected_eof() {
    let (file, _) = temp_file();
    let path = file.path().to_owned();
    let rt = Runtime::new(1).unwrap();
    let len = u64::try_from(FILE_LEN).unwrap();
    let kinds = rt
        .block_on(0, move || async move {
            let file = tokio_uring::fs::File::open(&path).await.unwrap();
            let mut kinds = Vec::new();
            // Straddling the end.
            let (res, buf) = read_exact_at(&file, vec![0_u8; 4096], len - 100).await;
            kinds.push(res.map_err(|e| e.kind()));
            assert_eq!(buf.len(), 4096, "the buffer comes back whole");
            // Entirely past the end.
            let (res, _) = read_exact_at(&file, vec![0_u8; 10], len + 5).await;
            kinds.push(res.map_err(|e| e.kind()));
            // Exactly up to the end.
            let (res, _) = read_exact_at(&file, vec![0_u8; 100], len - 100).await;
            kinds.push(res.map_err(|e| e.kind()));
            // Zero bytes at the end.
            let (res, _) = read_exact_at(&file, Vec::new(), len).await;
            kinds.push(res.map_err(|e| e.kind()));
            // Offset + length overflows.
            let (res, _) = read_exact_at(&file, vec![0_u8; 10], u64::MAX - 5).await;
            kinds.push(res.map_err(|e| e.kind()));
            kinds
        })
        .unwrap();
    assert_eq!(
        kinds,
        vec![
            Err(io::ErrorKind::UnexpectedEof),
            Err(io::ErrorKind::UnexpectedEof),
            Ok(()),
            Ok(()),
            Err(io::ErrorKind::InvalidInput),
        ]
    );
}

#[test]
fn uring_read_outside_a_worker_is_an_error_not_a_panic() {
    let (file, _) = temp_file();
    let file = tokio_uring::fs::File::from_std(std::fs::File::open(file.path()).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (res, _) = rt.block_on(read_exact_at(&file, vec![0_u8; 10], 0));
    assert_eq!(res.unwrap_err().kind(), io::ErrorKind::Unsupported);
    assert_eq!(
        FixedPool::register(1, 4096).unwrap_err().kind(),
        io::ErrorKind::Unsupported
    );
}

#[test]
fn uring_fixed_buffer_reads_match_pread() {
    let (file, data) = temp_file();
    let path = file.path().to_owned();
    let rt = Runtime::new(2).unwrap();
    let ranges = random_ranges(2, 300, 64 << 10);
    let handles = rt
        .spawn_all({
            let path = path.clone();
            let ranges = ranges.clone();
            move |_| {
                let path = path.clone();
                let ranges = ranges.clone();
                async move {
                    let pool = FixedPool::register(4, 64 << 10).unwrap();
                    // A second registration on the same ring is refused, not a panic.
                    assert!(FixedPool::register(1, 4096).is_err());
                    let file = tokio_uring::fs::File::open(&path).await.unwrap();
                    let mut out = Vec::new();
                    for (offset, len) in ranges {
                        let buf = pool.next().await;
                        let (res, slice) =
                            read_fixed_exact_at(&file, buf.slice(..len), offset).await;
                        res.unwrap();
                        out.push(slice[..].to_vec());
                    }
                    // EOF through the fixed path too.
                    let end = u64::try_from(FILE_LEN).unwrap();
                    let (res, _) = read_fixed_exact_at(&file, pool.next().await, end - 10).await;
                    assert_eq!(res.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
                    pool.unregister().unwrap();
                    out
                }
            }
        })
        .unwrap();
    for handle in handles {
        let got = handle.join().unwrap();
        for ((offset, len), buf) in ranges.iter().zip(&got) {
            let start = usize::try_from(*offset).unwrap();
            assert_eq!(&buf[..], &data[start..start + len]);
        }
    }
}

#[test]
fn uring_reads_into_region_memory() {
    let (file, data) = temp_file();
    let path = file.path().to_owned();
    let rt = Runtime::new(1).unwrap();
    let region = Arc::new(HeapRegion::zeroed(FILE_LEN));
    const CHUNK: usize = 64 << 10;
    {
        let region = Arc::clone(&region);
        rt.block_on(0, move || async move {
            let file = tokio_uring::fs::File::open(&path).await.unwrap();
            let mut handles = Vec::new();
            let file = Rc::new(file);
            for start in (0..FILE_LEN).step_by(CHUNK) {
                let len = CHUNK.min(FILE_LEN - start);
                // SAFETY: the chunks are disjoint, and nothing else reads or writes the region
                // until every `RegionBuf` is dropped (the tasks are joined below).
                let buf = unsafe { RegionBuf::new(Arc::clone(&region), start, len) }.unwrap();
                let file = Rc::clone(&file);
                handles.push(tokio_uring::spawn(async move {
                    let (res, buf) = read_exact_at(&file, buf, u64::try_from(start).unwrap()).await;
                    res.unwrap();
                    assert_eq!(buf.as_slice().len(), len);
                }));
            }
            for h in handles {
                h.await.unwrap();
            }
            // A window past the region is refused.
            // SAFETY: a refused window gives no access.
            assert!(unsafe { RegionBuf::new(Arc::clone(&region), FILE_LEN - 1, 2) }.is_none());
        })
        .unwrap();
    }
    let bytes = Arc::try_unwrap(region).unwrap().into_vec();
    assert!(bytes == data, "region contents differ from the file");
}

#[test]
fn many_concurrent_reads_on_one_worker() {
    let (file, _) = temp_file();
    let path = file.path().to_owned();
    let rt = Runtime::builder()
        .workers(1)
        .ring_entries(64)
        .build()
        .unwrap();
    let ranges = random_ranges(3, 2000, 16 << 10);
    let got = {
        let path = path.clone();
        let ranges = ranges.clone();
        rt.block_on(0, move || async move {
            let file = Rc::new(tokio_uring::fs::File::open(&path).await.unwrap());
            // More reads in flight than the ring has entries: submission must flush and go on.
            let handles: Vec<_> = ranges
                .into_iter()
                .map(|(offset, len)| {
                    let file = Rc::clone(&file);
                    tokio_uring::spawn(async move {
                        let (res, buf) =
                            read_exact_at(&file, Vec::with_capacity(len), offset).await;
                        res.map(|()| buf)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for h in handles {
                out.push(h.await.unwrap().unwrap());
            }
            out
        })
        .unwrap()
    };
    for ((offset, len), buf) in ranges.iter().zip(&got) {
        assert_eq!(*buf, pread(&path, *offset, *len));
    }
}
