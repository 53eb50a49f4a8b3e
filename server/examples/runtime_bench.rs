//! Micro-benchmark of the thread-per-core runtime and the io_uring read path:
//!
//! - cross-core wake latency: round trips worker 0 -> worker 1 -> worker 0 through two
//!   `tokio::sync::Notify`s, and OS thread -> worker 0 -> OS thread (`Notify` there, a std channel
//!   back); p50/p99/max over `ROUNDS` round trips;
//! - 4 KiB random reads from a 256 MiB file in `/dev/shm` (tmpfs): io_uring at queue depth 1 and
//!   32 (owned `Vec` buffers and registered buffers) on one worker, against a `pread` loop on one
//!   thread, over the same offsets.
//!
//! Run: `cargo run --release -p thaw-server --example runtime_bench [-- ROUNDS READS [DIR]]`
//! (DIR defaults to `/dev/shm`; the file is page-cache resident in any case).

use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use thaw_server::runtime::Runtime;
use thaw_server::uring::{FixedPool, read_exact_at, read_fixed_exact_at};
use tokio::sync::Notify;
use tokio_uring::buf::BoundedBuf;

const FILE_SIZE: usize = 256 << 20;
const BLOCK: usize = 4 << 10;
const DEPTH: usize = 32;

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(10_000), |a| a.parse())?;
    let reads: usize = std::env::args().nth(2).map_or(Ok(200_000), |a| a.parse())?;
    let rt = Runtime::new(2)?;

    println!("cross-core wake round trips ({rounds}):");
    let ww = worker_to_worker(&rt, rounds)?;
    report("  worker0 -> worker1 -> worker0", ww);
    let tw = thread_to_worker(&rt, rounds)?;
    report("  thread -> worker0 -> thread  ", tw);

    let dir = std::env::args()
        .nth(3)
        .unwrap_or_else(|| "/dev/shm".to_owned());
    let path =
        std::path::Path::new(&dir).join(format!("thaw-runtime-bench-{}", std::process::id()));
    let result = reads_bench(&rt, &path, reads);
    let _ = std::fs::remove_file(&path);
    result
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let at = |q: f64| {
        let last = samples.len().saturating_sub(1);
        // Quantile index; the float is in [0, last], so the conversion cannot lose anything.
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let i = ((last as f64) * q).round() as usize;
        samples.get(i).copied().unwrap_or_default()
    };
    println!(
        "{what}  p50 {:>7.1} us  p99 {:>7.1} us  max {:>8.1} us",
        micros(at(0.5)),
        micros(at(0.99)),
        micros(at(1.0))
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn worker_to_worker(rt: &Runtime, rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let ping = Arc::new(Notify::new());
    let pong = Arc::new(Notify::new());
    let responder = {
        let (ping, pong) = (Arc::clone(&ping), Arc::clone(&pong));
        rt.spawn_on(1, move || async move {
            for _ in 0..rounds {
                ping.notified().await;
                pong.notify_one();
            }
        })?
    };
    let samples = rt.block_on(0, move || async move {
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let start = Instant::now();
            ping.notify_one();
            pong.notified().await;
            samples.push(start.elapsed());
        }
        samples
    })?;
    responder.join()?;
    Ok(samples)
}

fn thread_to_worker(rt: &Runtime, rounds: usize) -> anyhow::Result<Vec<Duration>> {
    let ping = Arc::new(Notify::new());
    let (back_tx, back_rx) = std::sync::mpsc::channel::<()>();
    let responder = {
        let ping = Arc::clone(&ping);
        rt.spawn_on(0, move || async move {
            for _ in 0..rounds {
                ping.notified().await;
                if back_tx.send(()).is_err() {
                    break;
                }
            }
        })?
    };
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        ping.notify_one();
        back_rx.recv().context("responder gone")?;
        samples.push(start.elapsed());
    }
    responder.join()?;
    Ok(samples)
}

fn reads_bench(rt: &Runtime, path: &std::path::Path, reads: usize) -> anyhow::Result<()> {
    let mut rng = SmallRng::seed_from_u64(11);
    let mut data = vec![0_u8; FILE_SIZE];
    rng.fill(&mut data[..]);
    std::fs::write(path, &data)?;
    drop(data);
    let blocks = u64::try_from(FILE_SIZE / BLOCK)?;
    let block = u64::try_from(BLOCK)?;
    let offsets: Arc<[u64]> = (0..reads)
        .map(|_| rng.random_range(0..blocks) * block)
        .collect();

    println!(
        "4 KiB random reads from a 256 MiB file in {} ({reads} per run):",
        path.parent().unwrap_or(path).display()
    );
    // pread on this thread.
    let file = std::fs::File::open(path)?;
    let mut buf = vec![0_u8; BLOCK];
    let mut check = 0_u64;
    let start = Instant::now();
    for &offset in offsets.iter() {
        file.read_exact_at(&mut buf, offset)?;
        check = check.wrapping_add(u64::from(buf[0]));
    }
    iops("  pread, 1 thread                ", reads, start.elapsed());

    for (label, depth, fixed) in [
        ("  io_uring QD1, Vec buffer       ", 1, false),
        ("  io_uring QD32, Vec buffers     ", DEPTH, false),
        ("  io_uring QD1, registered buffer", 1, true),
        ("  io_uring QD32, registered bufs ", DEPTH, true),
    ] {
        let path = path.to_owned();
        let offsets = Arc::clone(&offsets);
        let (elapsed, sum) = rt.block_on(0, move || async move {
            uring_reads(&path, &offsets, depth, fixed).await
        })??;
        iops(label, reads, elapsed);
        anyhow::ensure!(sum == check, "io_uring read different bytes than pread");
    }
    Ok(())
}

fn iops(what: &str, reads: usize, elapsed: Duration) {
    let reads = u32::try_from(reads).unwrap_or(u32::MAX);
    let per_op = elapsed / reads.max(1);
    println!(
        "{what}  {:>9.0} IOPS  {:>6.2} us/read",
        f64::from(reads) / elapsed.as_secs_f64(),
        micros(per_op)
    );
}

/// `depth` tasks on this worker, each reading its share of `offsets`; answers the elapsed time
/// and the sum of each block's first byte (to check against pread).
async fn uring_reads(
    path: &std::path::Path,
    offsets: &Arc<[u64]>,
    depth: usize,
    fixed: bool,
) -> anyhow::Result<(Duration, u64)> {
    let file = Rc::new(tokio_uring::fs::File::open(path).await?);
    let pool = if fixed {
        Some(FixedPool::register(depth, BLOCK)?)
    } else {
        None
    };
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(depth);
    for lane in 0..depth {
        let file = Rc::clone(&file);
        let offsets = Arc::clone(offsets);
        let pool = pool.clone();
        tasks.push(tokio_uring::spawn(async move {
            let mut sum = 0_u64;
            let mut vec_buf = Some(vec![0_u8; BLOCK]);
            for &offset in offsets.iter().skip(lane).step_by(depth) {
                if let Some(pool) = &pool {
                    let (res, buf) = read_fixed_exact_at(&file, pool.next().await, offset).await;
                    res?;
                    sum = sum.wrapping_add(u64::from(buf.first().copied().unwrap_or(0)));
                } else {
                    let buf = vec_buf.take().unwrap_or_default();
                    let (res, slice) = read_exact_at(&file, buf.slice(..BLOCK), offset).await;
                    res?;
                    let buf = slice.into_inner();
                    sum = sum.wrapping_add(u64::from(buf.first().copied().unwrap_or(0)));
                    vec_buf = Some(buf);
                }
            }
            anyhow::Ok(sum)
        }));
    }
    let mut sum = 0_u64;
    for task in tasks {
        sum = sum.wrapping_add(task.await??);
    }
    let elapsed = start.elapsed();
    if let Some(pool) = pool {
        pool.unregister()?;
    }
    Ok((elapsed, sum))
}
