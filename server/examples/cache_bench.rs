//! Micro-benchmark of chunk cache hits: ns per 4 KiB hit as a borrow (`ChunkCache::get`) and as
//! a copy (`ChunkCache::copy_to`), beside plain 4 KiB memcpys in the same run: from a `Vec`
//! (4 KiB pages) and from the cache memory itself (one whole-file borrow taken up front, so the
//! same huge pages without the per-hit presence check), over random 4 KiB-aligned offsets in a
//! 256 MiB fully present cache.
//!
//! Run: `cargo run --release -p thaw-server --example cache_bench [-- ROUNDS]`

use std::hint::black_box;
use std::time::Instant;

use rand::{Rng, SeedableRng, rngs::SmallRng};
use thaw_server::cache::ChunkCache;

const SIZE: u64 = 256 << 20;
const BLOCK: u64 = 4 << 10;
const HIT: usize = 4 << 10;
const OPS: usize = 1 << 20;

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args().nth(1).map_or(Ok(5), |a| a.parse())?;
    let cache = ChunkCache::new(SIZE, BLOCK)?;
    let mut guard = cache.reserve_fill(0..cache.blocks())?;
    for (i, b) in guard.buf().iter_mut().enumerate() {
        *b = i.to_le_bytes()[0] ^ i.to_le_bytes()[1];
    }
    let committed = guard.commit_all();
    anyhow::ensure!(committed.end == cache.blocks(), "cache not fully present");
    let plain: Vec<u8> = cache
        .get(0, usize::try_from(SIZE)?)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    anyhow::ensure!(
        plain.len() == usize::try_from(SIZE)?,
        "full-range get failed"
    );

    let whole = cache.get(0, usize::try_from(SIZE)?).unwrap_or_default();
    let mut rng = SmallRng::seed_from_u64(7);
    let blocks = SIZE / BLOCK;
    let offsets: Vec<u64> = (0..OPS)
        .map(|_| rng.random_range(0..blocks) * BLOCK)
        .collect();
    let mut dst = vec![0u8; HIT];

    println!(
        "256 MiB cache, 4 KiB blocks, {OPS} random 4 KiB-aligned hits per pass, {rounds} rounds"
    );
    println!(
        "{:>6} {:>9} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "round", "get ns", "copy_to ns", "memcpy Vec", "memcpy map", "copy/Vec", "copy/map"
    );
    let mut best = [f64::MAX; 4];
    for round in 0..rounds {
        let t = Instant::now();
        for &off in &offsets {
            black_box(cache.get(black_box(off), HIT));
        }
        let get = ns_per_op(t);

        let t = Instant::now();
        for &off in &offsets {
            black_box(cache.copy_to(black_box(off), &mut dst));
            black_box(&mut dst);
        }
        let copy = ns_per_op(t);

        let t = Instant::now();
        for &off in &offsets {
            let start = usize::try_from(black_box(off))?;
            if let Some(src) = plain.get(start..start + HIT) {
                dst.copy_from_slice(src);
            }
            black_box(&mut dst);
        }
        let memcpy = ns_per_op(t);

        let t = Instant::now();
        for &off in &offsets {
            let start = usize::try_from(black_box(off))?;
            if let Some(src) = whole.get(start..start + HIT) {
                dst.copy_from_slice(src);
            }
            black_box(&mut dst);
        }
        let memcpy_map = ns_per_op(t);

        let row = [get, copy, memcpy, memcpy_map];
        print_row(&round.to_string(), row);
        for (b, v) in best.iter_mut().zip(row) {
            *b = b.min(v);
        }
    }
    print_row("best", best);
    Ok(())
}

fn print_row(label: &str, [get, copy, memcpy, map]: [f64; 4]) {
    println!(
        "{label:>6} {get:>9.2} {copy:>11.2} {memcpy:>11.2} {map:>11.2} {:>11.2} {:>11.2}",
        copy / memcpy,
        copy / map
    );
}

fn ns_per_op(start: Instant) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "OPS is 2^20, exact in f64")]
    let ops = OPS as f64;
    start.elapsed().as_secs_f64() * 1e9 / ops
}
