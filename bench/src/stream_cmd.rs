//! `thaw-bench stream`: the store's raw read throughput, without the engine: one `read_stream` of
//! a whole object, then the object again in sequential pieces (one ranged request each), each
//! into a sink that only counts the bytes. Used by `bench/gcs_bench.sh` to separate the HTTP
//! transport from the engine's decoding.

use std::ops::ControlFlow;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use thaw_server::cli::parse_size;
use thaw_server::store::open_store;

/// `thaw-bench stream` options.
#[derive(Debug, Args)]
pub struct StreamArgs {
    /// Store URL (any `open_store` accepts: gs://bucket/prefix?endpoint=..., file:///dir, ...).
    #[arg(long)]
    store: String,
    /// Object key.
    #[arg(long)]
    key: String,
    /// Piece size of the sequential ranged reads.
    #[arg(long, value_parser = parse_size, default_value = "1MiB")]
    piece: u64,
    /// Rounds of both measurements.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

/// Runs `thaw-bench stream`.
pub fn run(args: &StreamArgs) -> anyhow::Result<()> {
    let store = open_store(&args.store)?;
    let size = store.stat(&args.key)?.size;
    anyhow::ensure!(args.piece > 0, "--piece must be positive");
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    for round in 1..=args.rounds {
        let t = Instant::now();
        let mut got = 0u64;
        let mut pieces_seen = 0u64;
        store
            .read_stream(&args.key, 0, size, &mut |p| {
                got += p.len() as u64;
                pieces_seen += 1;
                ControlFlow::Continue(())
            })
            .context("whole-object read")?;
        let whole = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut at = 0u64;
        let mut requests = 0u64;
        while at < size {
            let len = args.piece.min(size - at);
            store
                .read_stream(&args.key, at, len, &mut |_| ControlFlow::Continue(()))
                .context("ranged read")?;
            at += len;
            requests += 1;
        }
        let pieces = t.elapsed().as_secs_f64();
        println!(
            "round {round}: one request {:.1} MiB in {whole:.3} s ({:.0} MiB/s, {pieces_seen} pieces \
             of {:.0} KiB on average); {requests} ranged requests of {:.2} MiB in {pieces:.3} s \
             ({:.0} MiB/s)",
            mib(got),
            mib(got) / whole.max(1e-9),
            got as f64 / 1024.0 / pieces_seen.max(1) as f64,
            mib(args.piece),
            mib(size) / pieces.max(1e-9),
        );
    }
    Ok(())
}
