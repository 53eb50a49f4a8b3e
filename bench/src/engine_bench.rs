//! `thaw-bench engine`: e2b's chunker benchmarks (reference §10.1 and §10.2) run against thaw's
//! engine, with e2b's parameters, printing e2b's figures beside ours.
//!
//! - `random`: e2b's `BenchmarkRandomAccess`: one 4 MiB uncompressed object (one chunk), 3
//!   concurrent callers each reading one random 4 KiB block, seeded pre-generated offset
//!   triples, one engine per backend and a fresh (cold) cache per triple, simulated GCS (20 ms, 100 MB/s) and NFS
//!   (1 ms, 500 MB/s). Metrics: average and worst latency per caller (e2b's `avg-us/caller`,
//!   `worst-us/caller`), p50/p99/p99.9, and both as ratios to the TTFB (goal: average <= 1.25 x,
//!   worst <= 1.6 x).
//! - `cold`: e2b's compression design-doc benchmark: 100 MiB of ~3x-compressible data, 2 MiB
//!   frames, 4 workers reading the whole file in 4 KiB or 2 MiB reads, codecs none / LZ4 /
//!   zstd 1-3, simulated GCS (50 ms, 100 MB/s) and NFS (1 ms, 500 MB/s), a fresh engine per
//!   iteration; ms per iteration and the fraction of the simulated link used.
//! - `hit`: ns per 4 KiB cache hit as a borrow (`try_get`, `read_ref_blocking`) and as a copy
//!   (`read_at`), beside a plain 4 KiB memcpy measured in the same run.
//! - `bookkeeping`: bookkeeping bytes per GiB of image and process RSS growth beyond the touched
//!   data.
//!
//! Pacing: e2b's simulated backends sleep per request (`time.Sleep` per reader, each reader paced
//! at the full bandwidth on its own): that is [`Pacing::PerRequest`]. [`Pacing::Shared`] (one
//! link for the whole store, N requests share the bandwidth) is the physical model and the one
//! the "fraction of the link" figure is meaningful for. Both are run unless `--pacing` says
//! otherwise, and every row says which.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use thaw_codec::{BuildId, CompressionType, FileKind, Header, Mapping, Metadata};
use thaw_server::cache::ChunkCache;
use thaw_server::engine::{Engine, EngineConfig, LayeredFile, ReadBuf};
use thaw_server::store::sim::{Pacing, SimConfig};
use thaw_server::store::{FileStore, SimStore, Store};
use thaw_server::writer::{WriteOptions, store_build_file};

use crate::codec_bench::generate;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const BLOCK: u64 = 4 * KIB;
const FRAME: u64 = 2 * MIB;

/// Which sub-benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Which {
    /// e2b's BenchmarkRandomAccess (3 callers, one cold 4 MiB chunk).
    Random,
    /// e2b's cold concurrent read of 100 MiB per codec.
    Cold,
    /// 4 KiB cache hits vs memcpy.
    Hit,
    /// Bookkeeping memory per GiB of image.
    Bookkeeping,
    /// Everything.
    All,
}

/// How the cold benchmark splits the file between workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Worker `w` reads the `w`-th of `workers` contiguous parts, front to back.
    Contiguous,
    /// Worker `w` reads every `workers`-th 2 MiB range.
    Interleaved,
}

/// Which simulated-store pacing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PacingArg {
    /// Every request paced at the full bandwidth on its own (e2b's `time.Sleep` backends).
    Request,
    /// One link shared by all requests of the store.
    Shared,
    /// Both, one row each.
    Both,
}

impl PacingArg {
    fn list(self) -> Vec<Pacing> {
        match self {
            Self::Request => vec![Pacing::PerRequest],
            Self::Shared => vec![Pacing::Shared],
            Self::Both => vec![Pacing::PerRequest, Pacing::Shared],
        }
    }
}

fn pacing_name(p: Pacing) -> &'static str {
    match p {
        Pacing::PerRequest => "per-request",
        Pacing::Shared => "shared",
    }
}

/// Arguments of `thaw-bench engine`.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineBenchArgs {
    /// Sub-benchmarks to run (comma-separated): random, cold, hit, bookkeeping, all.
    #[arg(value_enum, value_delimiter = ',', default_value = "all")]
    which: Vec<Which>,
    /// Simulated-store pacing: request (e2b's), shared (one link), both.
    #[arg(long, value_enum, default_value = "both")]
    pacing: PacingArg,
    /// Seed of the random offsets and of the data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// random: offset triples per backend and pacing (e2b: 500 pre-generated, 150-300 run).
    #[arg(long, default_value_t = 150)]
    random_iterations: usize,
    /// random: backends (comma-separated): gcs, nfs, and zero (no TTFB, unlimited bandwidth: the
    /// engine's own overhead on a cold miss, no e2b figure).
    #[arg(long, value_delimiter = ',', default_value = "gcs,nfs,zero")]
    random_backends: Vec<String>,
    /// random: concurrent callers per triple.
    #[arg(long, default_value_t = 3)]
    callers: usize,
    /// cold: iterations per codec, backend, read size and pacing (e2b: 10).
    #[arg(long, default_value_t = 2)]
    cold_iterations: usize,
    /// cold: data size in MiB.
    #[arg(long, default_value_t = 100)]
    cold_mib: u64,
    /// cold: concurrent workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// cold: how the file is split between workers: contiguous (worker w reads the w-th quarter
    /// front to back; matches e2b's figures) or interleaved (worker w reads every 4th 2 MiB range).
    #[arg(long, value_enum, default_value = "contiguous")]
    layout: Layout,
    /// cold: codecs (comma-separated): none, lz4, zstd1, zstd2, zstd3.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,lz4,zstd1,zstd2,zstd3"
    )]
    codecs: Vec<String>,
    /// cold: read sizes in bytes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "4096,2097152")]
    read_sizes: Vec<u64>,
    /// cold: backends (comma-separated): gcs, nfs.
    #[arg(long, value_delimiter = ',', default_value = "gcs,nfs")]
    backends: Vec<String>,
    /// hit: 4 KiB reads per pass.
    #[arg(long, default_value_t = 1 << 18)]
    hit_reads: usize,
    /// hit: passes (the fastest and the median are reported).
    #[arg(long, default_value_t = 7)]
    hit_passes: usize,
    /// bookkeeping: image size in GiB.
    #[arg(long, default_value_t = 1)]
    bookkeeping_gib: u64,
    /// bookkeeping: random 4 KiB blocks touched.
    #[arg(long, default_value_t = 8)]
    touch: usize,
    /// Engine setting: request-first join window in bytes (default: the engine's).
    #[arg(long)]
    join_window: Option<u64>,
    /// Engine setting: most concurrent transfers per uncompressed chunk (default: the engine's).
    #[arg(long)]
    max_runs_per_chunk: Option<usize>,
    /// Engine setting: sequential read-ahead in units (default: the engine's; 0 disables).
    #[arg(long)]
    readahead_units: Option<usize>,
    /// Engine setting: most prefetch/read-ahead transfers at once (default: the engine's).
    #[arg(long)]
    prefetch_concurrency: Option<usize>,
    /// Directory for the generated builds (default: a temporary directory, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the results as Markdown tables to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

impl EngineBenchArgs {
    fn runs(&self, w: Which) -> bool {
        self.which.contains(&Which::All) || self.which.contains(&w)
    }

    fn engine_config(&self) -> EngineConfig {
        let mut c = EngineConfig::default();
        if let Some(j) = self.join_window {
            c.join_window = j;
        }
        if let Some(m) = self.max_runs_per_chunk {
            c.max_runs_per_chunk = m;
        }
        if let Some(r) = self.readahead_units {
            c.readahead_units = r;
        }
        if let Some(p) = self.prefetch_concurrency {
            c.prefetch_concurrency = p;
        }
        c
    }
}

// ---------------------------------------------------------------------------------------------
// e2b's published figures (reference §10.1, §10.2): the comparison baselines.

/// e2b PR #1868, streaming chunker: (backend, avg ms, worst ms).
const E2B_RANDOM: [(&str, f64, f64); 2] = [("GCS", 42.8, 63.3), ("NFS", 6.0, 10.4)];

/// e2b's compression design doc: (codec, GCS 4KB, GCS 2MB, NFS 4KB, NFS 2MB) ms per iteration.
const E2B_COLD: [(&str, [f64; 4]); 5] = [
    ("none", [562.0, 587.0, 63.0, 74.0]),
    ("lz4", [983.0, 861.0, 103.0, 95.0]),
    ("zstd1", [818.0, 738.0, 57.0, 72.0]),
    ("zstd2", [820.0, 740.0, 58.0, 71.0]),
    ("zstd3", [815.0, 731.0, 55.0, 66.0]),
];

/// e2b's new chunker, cache-hit path at 4 KB (compression design doc: 132 ns/op; 130 at 2 MB).
const E2B_HIT_NS: f64 = 132.0;

const GOAL_AVG_TTFB: f64 = 1.25;
const GOAL_WORST_TTFB: f64 = 1.6;
const GOAL_LINK: f64 = 0.9;
const GOAL_BORROW_NS: f64 = 15.0;
const GOAL_COPY_MEMCPY: f64 = 1.5;
const GOAL_BOOKKEEPING_PER_GIB: f64 = 64.0 * 1024.0;

// ---------------------------------------------------------------------------------------------
// Results.

#[derive(Debug, Clone, Serialize)]
struct RandomRow {
    backend: String,
    pacing: String,
    ttfb_ms: f64,
    bandwidth_mb_s: f64,
    iterations: usize,
    callers: usize,
    avg_us: f64,
    worst_us: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    avg_over_ttfb: f64,
    worst_over_ttfb: f64,
    goal_avg_met: bool,
    goal_worst_met: bool,
    e2b_avg_us: f64,
    e2b_worst_us: f64,
    avg_ours_over_e2b: f64,
    worst_ours_over_e2b: f64,
    store_requests_per_iter: f64,
    store_bytes_per_iter: f64,
    /// Time from the callers' start until the whole chunk was present (ms, mean).
    chunk_complete_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
struct ColdRow {
    backend: String,
    pacing: String,
    codec: String,
    read_size: u64,
    iterations: usize,
    ms_mean: f64,
    ms_min: f64,
    ms_max: f64,
    stored_bytes: u64,
    ratio: f64,
    store_requests_per_iter: f64,
    store_bytes_per_iter: f64,
    /// Bytes from the store / (bandwidth x time): the fraction of the one link under shared
    /// pacing; under per-request pacing the number of links kept busy on average.
    link_used: f64,
    /// The model's lower bound for shared pacing: TTFB + stored bytes / bandwidth (ms).
    shared_floor_ms: f64,
    e2b_ms: Option<f64>,
    ours_over_e2b: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct HitRow {
    what: String,
    best_ns: f64,
    median_ns: f64,
    over_memcpy: f64,
    goal: String,
    goal_met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
struct BookkeepingRow {
    image_bytes: u64,
    blocks_touched: usize,
    bookkeeping_bytes: u64,
    bookkeeping_per_gib: f64,
    filled_bytes: u64,
    rss_before_open: u64,
    rss_after_open: u64,
    rss_after_touch: u64,
    rss_growth_beyond_filled: i64,
    rss_growth_beyond_filled_per_gib: f64,
    goal_met: bool,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    engine_config: BTreeMap<String, String>,
    random: Vec<RandomRow>,
    /// Diagnostic: first write into a fresh 4 MiB `ChunkCache` (its hugepage fault), µs p50 /
    /// mean / p99 over `random_iterations` fresh caches; every cold triple pays this once.
    first_touch_us: Option<[f64; 3]>,
    cold: Vec<ColdRow>,
    cold_layout: Option<Layout>,
    hit: Vec<HitRow>,
    bookkeeping: Option<BookkeepingRow>,
    wall_s: f64,
}

// ---------------------------------------------------------------------------------------------

/// Runs `thaw-bench engine`.
pub fn run(args: &EngineBenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let config = args.engine_config();
    let mut report = Report::default();
    report
        .engine_config
        .insert("join_window".into(), config.join_window.to_string());
    report.engine_config.insert(
        "max_runs_per_chunk".into(),
        config.max_runs_per_chunk.to_string(),
    );
    report
        .engine_config
        .insert("fetch_threads".into(), config.fetch_threads.to_string());
    report
        .engine_config
        .insert("readahead_units".into(), config.readahead_units.to_string());
    report.engine_config.insert(
        "prefetch_concurrency".into(),
        config.prefetch_concurrency.to_string(),
    );

    if args.runs(Which::Random) {
        report.random = bench_random(args, &dir.join("random"), &config)?;
        print_random(&report.random);
        let ft = first_touch(args.random_iterations.max(10))?;
        println!(
            "diagnostic: first 4 KiB write into a fresh 4 MiB ChunkCache (MADV_HUGEPAGE fault): \
             p50 {:.0} us, mean {:.0} us, p99 {:.0} us",
            ft[0], ft[1], ft[2]
        );
        report.first_touch_us = Some(ft);
    }
    if args.runs(Which::Cold) {
        report.cold = bench_cold(args, &dir.join("cold"), &config)?;
        report.cold_layout = Some(args.layout);
        print_cold(&report.cold);
    }
    if args.runs(Which::Hit) {
        report.hit = bench_hit(args, &dir.join("hit"), &config)?;
        print_hit(&report.hit);
    }
    if args.runs(Which::Bookkeeping) {
        let row = bench_bookkeeping(args, &dir.join("bookkeeping"), &config)?;
        print_bookkeeping(&row);
        report.bookkeeping = Some(row);
    }
    report.wall_s = started.elapsed().as_secs_f64();
    eprintln!("engine bench: {:.1} s", report.wall_s);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("engine bench: wrote {}", path.display());
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, markdown(&report))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("engine bench: wrote {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// Stores `data` (of `len` bytes) as the memfile of a single-layer build `id` in `store`.
fn write_build(
    store: &dyn Store,
    id: BuildId,
    data: &mut dyn Read,
    len: u64,
    codec: CompressionType,
    level: i32,
) -> anyhow::Result<u64> {
    let header = Header {
        metadata: Metadata {
            version: 4,
            block_size: BLOCK,
            size: len,
            generation: 0,
            build_id: id,
            base_build_id: id,
        },
        incomplete: false,
        builds: BTreeMap::new(),
        mappings: vec![Mapping {
            offset: 0,
            length: len,
            build_id: id,
            build_storage_offset: 0,
        }],
    };
    let opts = WriteOptions {
        codec,
        level,
        frame_size: FRAME,
        header_version: 4,
        workers: std::thread::available_parallelism().map_or(1, usize::from),
        progress: false,
    };
    let stored = store_build_file(store, FileKind::Memfile, &header, data, len, &opts)
        .with_context(|| format!("storing build {id}"))?;
    Ok(stored.stored_size)
}

fn sim_config(backend: &str, pacing: Pacing, cold: bool) -> anyhow::Result<SimConfig> {
    let mut c = match backend {
        "gcs" | "GCS" => SimConfig::gcs(),
        "nfs" | "NFS" => SimConfig::nfs(),
        "zero" | "ZERO" => SimConfig::default(),
        _ => bail!("unknown backend {backend:?} (gcs, nfs, zero)"),
    };
    if cold && c.ttfb == Duration::from_millis(20) {
        // The compression design doc simulated GCS with a 50 ms TTFB.
        c.ttfb = Duration::from_millis(50);
    }
    c.pacing = pacing;
    c.seed = Some(1);
    Ok(c)
}

/// Waits until the engine has no fetch in flight (the background part of a chunk), so the next
/// iteration starts on an idle machine.
fn quiesce(engine: &Engine) {
    let until = Instant::now() + Duration::from_secs(30);
    while engine.sessions_in_flight() > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn codec_of(name: &str) -> anyhow::Result<(CompressionType, i32)> {
    Ok(match name {
        "none" => (CompressionType::None, 0),
        "lz4" => (CompressionType::Lz4, 0),
        "zstd1" => (CompressionType::Zstd, 1),
        "zstd2" => (CompressionType::Zstd, 2),
        "zstd3" => (CompressionType::Zstd, 3),
        _ => bail!("unknown codec {name:?} (none, lz4, zstd1, zstd2, zstd3)"),
    })
}

fn check_bytes(got: &[u8], data: &[u8], offset: u64) -> anyhow::Result<()> {
    let start = usize::try_from(offset)?;
    let want = data
        .get(start..start + got.len())
        .context("read past the generated data")?;
    ensure!(got == want, "wrong bytes read at offset {offset}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Random access.

fn bench_random(
    args: &EngineBenchArgs,
    dir: &Path,
    config: &EngineConfig,
) -> anyhow::Result<Vec<RandomRow>> {
    ensure!(args.callers > 0, "--callers must be positive");
    std::fs::create_dir_all(dir)?;
    let inner: Arc<dyn Store> = Arc::new(FileStore::new(dir.to_path_buf()));
    let size = 4 * MIB;
    let data = generate(args.seed, usize::try_from(size)?);
    let id = BuildId::from_u128(0x7a11_0001);
    write_build(
        inner.as_ref(),
        id,
        &mut data.as_slice(),
        size,
        CompressionType::None,
        0,
    )?;
    // Pre-generated offset triples (seeded), shared by every backend and pacing.
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let blocks = size / BLOCK;
    let triples: Vec<Vec<u64>> = (0..args.random_iterations)
        .map(|_| {
            (0..args.callers)
                .map(|_| rng.random_range(0..blocks) * BLOCK)
                .collect()
        })
        .collect();

    let mut rows = Vec::new();
    for backend in &args.random_backends {
        let backend = backend.to_uppercase();
        let (e2b_avg_ms, e2b_worst_ms) = E2B_RANDOM
            .iter()
            .find(|(b, _, _)| *b == backend)
            .map_or((f64::NAN, f64::NAN), |&(_, a, w)| (a, w));
        let pacings = if backend == "ZERO" {
            vec![Pacing::Shared]
        } else {
            args.pacing.list()
        };
        for pacing in pacings {
            let sim_cfg = sim_config(&backend, pacing, false)?;
            let ttfb_us = micros(sim_cfg.ttfb) as f64;
            let bw = sim_cfg.bandwidth.unwrap_or(0) as f64;
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut worst_sum = 0.0;
            let mut all_sum = 0.0;
            let mut requests = 0u64;
            let mut bytes = 0u64;
            let mut complete_ms = Vec::new();
            eprintln!(
                "random: {backend} {} x {} triples ...",
                pacing_name(pacing),
                triples.len()
            );
            // One engine (fetch threads, like a running server) per backend; a fresh cache per
            // triple: the previous triple's LayeredFile is dropped, and with it its build's
            // cache (e2b: a fresh chunker per iteration).
            let sim = Arc::new(SimStore::new(Arc::clone(&inner), sim_cfg.clone()));
            let engine = Engine::new(Arc::clone(&sim) as Arc<dyn Store>, config.clone())?;
            for triple in &triples {
                let file = engine.open(id, FileKind::Memfile)?;
                let before = sim.stats();
                let stats_before = engine.stats();
                let barrier = Barrier::new(triple.len() + 1);
                let (lats, t0) = std::thread::scope(|s| {
                    let handles: Vec<_> = triple
                        .iter()
                        .map(|&off| {
                            let (file, barrier, data) = (&file, &barrier, &data);
                            s.spawn(move || -> anyhow::Result<Duration> {
                                let mut buf = vec![0u8; 4096];
                                barrier.wait();
                                let t = Instant::now();
                                file.read_at(off, &mut buf)?;
                                let lat = t.elapsed();
                                check_bytes(&buf, data, off)?;
                                Ok(lat)
                            })
                        })
                        .collect();
                    barrier.wait();
                    let t0 = Instant::now();
                    let lats: Vec<anyhow::Result<Duration>> = handles
                        .into_iter()
                        .map(|h| h.join().unwrap_or_else(|_| bail!("a caller panicked")))
                        .collect();
                    (lats, t0)
                });
                quiesce(&engine);
                complete_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                let mut worst = 0u64;
                for lat in lats {
                    let us = micros(lat?);
                    hist.record(us.max(1))?;
                    worst = worst.max(us);
                    all_sum += us as f64;
                }
                worst_sum += worst as f64;
                let st = engine.stats();
                requests += st.store_requests - stats_before.store_requests;
                bytes += st.store_bytes - stats_before.store_bytes;
                let after = sim.stats();
                ensure!(
                    after.stats == before.stats && after.exists == before.exists,
                    "the timed reads made metadata requests"
                );
            }
            let n = triples.len() as f64;
            let avg_us = all_sum / (n * args.callers as f64);
            let worst_us = worst_sum / n;
            let e2b_avg_us = e2b_avg_ms * 1e3;
            let e2b_worst_us = e2b_worst_ms * 1e3;
            rows.push(RandomRow {
                backend: backend.clone(),
                pacing: pacing_name(pacing).to_owned(),
                ttfb_ms: ttfb_us / 1e3,
                bandwidth_mb_s: bw / 1e6,
                iterations: triples.len(),
                callers: args.callers,
                avg_us,
                worst_us,
                p50_us: hist.value_at_quantile(0.5),
                p99_us: hist.value_at_quantile(0.99),
                p999_us: hist.value_at_quantile(0.999),
                max_us: hist.max(),
                avg_over_ttfb: if ttfb_us > 0.0 {
                    avg_us / ttfb_us
                } else {
                    f64::NAN
                },
                worst_over_ttfb: if ttfb_us > 0.0 {
                    worst_us / ttfb_us
                } else {
                    f64::NAN
                },
                goal_avg_met: avg_us <= GOAL_AVG_TTFB * ttfb_us,
                goal_worst_met: worst_us <= GOAL_WORST_TTFB * ttfb_us,
                e2b_avg_us,
                e2b_worst_us,
                avg_ours_over_e2b: avg_us / e2b_avg_us,
                worst_ours_over_e2b: worst_us / e2b_worst_us,
                store_requests_per_iter: requests as f64 / n,
                store_bytes_per_iter: bytes as f64 / n,
                chunk_complete_ms: mean(&complete_ms),
            });
        }
    }
    Ok(rows)
}

fn print_random(rows: &[RandomRow]) {
    println!();
    println!(
        "== random access: 4 MiB uncompressed chunk, {} callers x one random 4 KiB block, cold engine per triple ==",
        rows.first().map_or(3, |r| r.callers)
    );
    println!(
        "{:<4} {:<11} {:>5} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>9} {:>9} {:>6} {:>6} {:>5} {:>7}",
        "be",
        "pacing",
        "iter",
        "avg-us",
        "worst-us",
        "p50",
        "p99",
        "p99.9",
        "max",
        "avg/T",
        "wst/T",
        "e2b-avg",
        "e2b-wst",
        "a/e2b",
        "w/e2b",
        "reqs",
        "chunk-ms"
    );
    for r in rows {
        println!(
            "{:<4} {:<11} {:>5} {:>9.0} {:>9.0} {:>8} {:>8} {:>8} {:>8} {:>6.2}{} {:>6.2}{} {:>9.0} {:>9.0} {:>6.2} {:>6.2} {:>5.2} {:>7.1}",
            r.backend,
            r.pacing,
            r.iterations,
            r.avg_us,
            r.worst_us,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.max_us,
            r.avg_over_ttfb,
            goal_mark(r.ttfb_ms, r.goal_avg_met),
            r.worst_over_ttfb,
            goal_mark(r.ttfb_ms, r.goal_worst_met),
            r.e2b_avg_us,
            r.e2b_worst_us,
            r.avg_ours_over_e2b,
            r.worst_ours_over_e2b,
            r.store_requests_per_iter,
            r.chunk_complete_ms,
        );
    }
    println!(
        "goal: avg <= {GOAL_AVG_TTFB} x TTFB, worst <= {GOAL_WORST_TTFB} x TTFB (+ met, ! missed); \
         avg/worst are e2b's avg-us/caller and worst-us/caller (mean of per-triple max); \
         e2b pacing = per-request"
    );
}

/// Times the first 4 KiB write into fresh 4 MiB caches (the page fault a cold chunk pays).
fn first_touch(n: usize) -> anyhow::Result<[f64; 3]> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for _ in 0..n {
        let cache = ChunkCache::new(4 * MIB, BLOCK)?;
        let mut g = cache.reserve_fill(0..1)?;
        let t = Instant::now();
        g.buf().fill(0xa5);
        black_box(g.buf());
        hist.record(micros(t.elapsed()).max(1))?;
        drop(g);
    }
    Ok([
        hist.value_at_quantile(0.5) as f64,
        hist.mean(),
        hist.value_at_quantile(0.99) as f64,
    ])
}

fn goal_mark(ttfb_ms: f64, ok: bool) -> char {
    if ttfb_ms > 0.0 { mark(ok) } else { ' ' }
}

fn mark(ok: bool) -> char {
    if ok { '+' } else { '!' }
}

// ---------------------------------------------------------------------------------------------
// 2. Cold concurrent.

fn bench_cold(
    args: &EngineBenchArgs,
    dir: &Path,
    config: &EngineConfig,
) -> anyhow::Result<Vec<ColdRow>> {
    ensure!(args.workers > 0, "--workers must be positive");
    ensure!(
        args.cold_iterations > 0,
        "--cold-iterations must be positive"
    );
    for &rs in &args.read_sizes {
        ensure!(
            rs > 0 && rs <= FRAME && FRAME.is_multiple_of(rs),
            "read size {rs} must divide 2 MiB"
        );
    }
    std::fs::create_dir_all(dir)?;
    let inner: Arc<dyn Store> = Arc::new(FileStore::new(dir.to_path_buf()));
    let size = args.cold_mib * MIB;
    eprintln!("cold: generating {} MiB ...", args.cold_mib);
    let data = generate(args.seed, usize::try_from(size)?);
    let mut builds = Vec::new();
    for (i, name) in args.codecs.iter().enumerate() {
        let (codec, level) = codec_of(name)?;
        let id = BuildId::from_u128(0x7a11_1000 + u128::try_from(i)?);
        let stored = write_build(inner.as_ref(), id, &mut data.as_slice(), size, codec, level)?;
        eprintln!("cold: stored {name}: {stored} bytes");
        builds.push((name.clone(), id, stored));
    }

    let mut rows = Vec::new();
    for backend in &args.backends {
        for pacing in args.pacing.list() {
            let sim_cfg = sim_config(backend, pacing, true)?;
            let bw = sim_cfg.bandwidth.unwrap_or(1) as f64;
            for (name, id, stored) in &builds {
                for &read_size in &args.read_sizes {
                    let mut times = Vec::new();
                    let mut requests = 0u64;
                    let mut bytes = 0u64;
                    for it in 0..args.cold_iterations {
                        let sim = Arc::new(SimStore::new(Arc::clone(&inner), sim_cfg.clone()));
                        let engine =
                            Engine::new(Arc::clone(&sim) as Arc<dyn Store>, config.clone())?;
                        let file = engine.open(*id, FileKind::Memfile)?;
                        let secs = cold_read(&file, size, read_size, args.workers, args.layout)?;
                        times.push(secs);
                        let st = engine.stats();
                        requests += st.store_requests;
                        bytes += st.store_bytes;
                        if it == 0 {
                            verify_all(&file, &data)?;
                        }
                        quiesce(&engine);
                    }
                    let n = times.len() as f64;
                    let t = mean(&times);
                    let col = match (backend.as_str(), read_size) {
                        ("gcs", 4096) => Some(0),
                        ("gcs", FRAME) => Some(1),
                        ("nfs", 4096) => Some(2),
                        ("nfs", FRAME) => Some(3),
                        _ => None,
                    };
                    let e2b_ms = col.and_then(|c| {
                        E2B_COLD
                            .iter()
                            .find(|(n, _)| n == name)
                            .and_then(|(_, v)| v.get(c).copied())
                    });
                    let ms = t * 1e3;
                    let row = ColdRow {
                        backend: backend.to_uppercase(),
                        pacing: pacing_name(pacing).to_owned(),
                        codec: name.clone(),
                        read_size,
                        iterations: times.len(),
                        ms_mean: ms,
                        ms_min: times.iter().copied().fold(f64::INFINITY, f64::min) * 1e3,
                        ms_max: times.iter().copied().fold(0.0, f64::max) * 1e3,
                        stored_bytes: *stored,
                        ratio: size as f64 / *stored as f64,
                        store_requests_per_iter: requests as f64 / n,
                        store_bytes_per_iter: bytes as f64 / n,
                        link_used: (bytes as f64 / n) / (bw * t),
                        shared_floor_ms: (sim_cfg.ttfb.as_secs_f64() + *stored as f64 / bw) * 1e3,
                        e2b_ms,
                        ours_over_e2b: e2b_ms.map(|e| ms / e),
                    };
                    eprintln!(
                        "cold: {} {} {} {}: {:.0} ms",
                        row.backend, row.pacing, row.codec, read_size, row.ms_mean
                    );
                    rows.push(row);
                }
            }
        }
    }
    Ok(rows)
}

/// `workers` threads read the whole file: worker `w` takes every `workers`-th 2 MiB range, in
/// `read_size` reads. Returns the seconds from the common start until the last worker is done.
fn cold_read(
    file: &LayeredFile,
    size: u64,
    read_size: u64,
    workers: usize,
    layout: Layout,
) -> anyhow::Result<f64> {
    let ranges = size.div_ceil(FRAME);
    // Contiguous parts: `ranges` split as evenly as possible.
    let per = ranges.div_ceil(workers as u64);
    let barrier = Barrier::new(workers + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let barrier = &barrier;
                s.spawn(move || -> anyhow::Result<()> {
                    let mut buf = vec![0u8; usize::try_from(read_size)?];
                    barrier.wait();
                    let (mut r, last, step) = match layout {
                        Layout::Interleaved => (w as u64, ranges, workers as u64),
                        Layout::Contiguous => {
                            let first = (w as u64 * per).min(ranges);
                            (first, (first + per).min(ranges), 1)
                        }
                    };
                    while r < last {
                        let start = r * FRAME;
                        let end = (start + FRAME).min(size);
                        let mut off = start;
                        while off < end {
                            let n = usize::try_from((end - off).min(read_size))?;
                            file.read_at(off, &mut buf[..n])?;
                            black_box(&buf);
                            off += read_size;
                        }
                        r += step;
                    }
                    Ok(())
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        for h in handles {
            h.join().unwrap_or_else(|_| bail!("a worker panicked"))?;
        }
        Ok(t0.elapsed().as_secs_f64())
    })
}

fn verify_all(file: &LayeredFile, data: &[u8]) -> anyhow::Result<()> {
    let mut buf = vec![0u8; usize::try_from(FRAME)?];
    let mut off = 0u64;
    while off < file.size() {
        let n = usize::try_from((file.size() - off).min(FRAME))?;
        file.read_at(off, &mut buf[..n])?;
        check_bytes(&buf[..n], data, off)?;
        off += FRAME;
    }
    Ok(())
}

fn e2b_cold_label(r: &ColdRow) -> String {
    let rs = if r.read_size == FRAME {
        "2MB".to_owned()
    } else if r.read_size == 4096 {
        "4KB".to_owned()
    } else {
        format!("{}B", r.read_size)
    };
    format!("{} {rs}", r.backend)
}

fn print_cold(rows: &[ColdRow]) {
    println!();
    println!(
        "== cold concurrent: workers read the whole file, 2 MiB frames, fresh engine per iteration (ms per iteration) =="
    );
    println!(
        "{:<8} {:<11} {:<6} {:>4} {:>8} {:>8} {:>8} {:>6} {:>8} {:>7} {:>9} {:>8} {:>6}",
        "column",
        "pacing",
        "codec",
        "iter",
        "ms",
        "min",
        "max",
        "ratio",
        "reqs",
        "link",
        "floor-ms",
        "e2b-ms",
        "/e2b"
    );
    for r in rows {
        println!(
            "{:<8} {:<11} {:<6} {:>4} {:>8.0} {:>8.0} {:>8.0} {:>6.2} {:>8.0} {:>6.0}% {:>9.0} {:>8} {:>6}",
            e2b_cold_label(r),
            r.pacing,
            r.codec,
            r.iterations,
            r.ms_mean,
            r.ms_min,
            r.ms_max,
            r.ratio,
            r.store_requests_per_iter,
            r.link_used * 100.0,
            r.shared_floor_ms,
            r.e2b_ms.map_or("-".to_owned(), |e| format!("{e:.0}")),
            r.ours_over_e2b
                .map_or("-".to_owned(), |e| format!("{e:.2}")),
        );
    }
    println!(
        "link = store bytes / (bandwidth x time): the share of the one link (shared pacing; goal >= {:.0}%), \
         or the number of links busy on average (per-request pacing, e2b's); floor-ms = TTFB + stored/bandwidth",
        GOAL_LINK * 100.0
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Cache hits.

fn bench_hit(
    args: &EngineBenchArgs,
    dir: &Path,
    config: &EngineConfig,
) -> anyhow::Result<Vec<HitRow>> {
    std::fs::create_dir_all(dir)?;
    let store: Arc<dyn Store> = Arc::new(FileStore::new(dir.to_path_buf()));
    let size = 64 * MIB;
    let data = generate(args.seed, usize::try_from(size)?);
    let id = BuildId::from_u128(0x7a11_2000);
    write_build(
        store.as_ref(),
        id,
        &mut data.as_slice(),
        size,
        CompressionType::None,
        0,
    )?;
    let engine = Engine::new(store, config.clone())?;
    let file = engine.open(id, FileKind::Memfile)?;
    verify_all(&file, &data)?;
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let blocks = size / BLOCK;
    let offsets: Vec<u64> = (0..args.hit_reads)
        .map(|_| rng.random_range(0..blocks) * BLOCK)
        .collect();
    let offsets_usize: Vec<usize> = offsets
        .iter()
        .map(|&o| usize::try_from(o))
        .collect::<Result<_, _>>()?;
    let mut buf = vec![0u8; 4096];
    let n = offsets.len() as f64;
    let mut borrow = Vec::new();
    let mut borrow_ref = Vec::new();
    let mut copy = Vec::new();
    let mut memcpy = Vec::new();
    let mut cache_get = Vec::new();
    let mut empty = Vec::new();
    let builds = file.open_builds();
    let cache = builds.first().context("no open build")?.cache();
    for _ in 0..args.hit_passes.max(1) {
        // The loop alone (offset load + black_box).
        let t = Instant::now();
        for &o in &offsets {
            black_box(o);
        }
        empty.push(t.elapsed().as_secs_f64() * 1e9 / n);

        // The build's ChunkCache directly (no header lookup): the floor of `try_get`.
        let t = Instant::now();
        for &o in &offsets {
            black_box(cache.get(black_box(o), 4096));
        }
        cache_get.push(t.elapsed().as_secs_f64() * 1e9 / n);

        // memcpy from the same data, same offsets, into the same buffer.
        let t = Instant::now();
        for &o in &offsets_usize {
            buf.copy_from_slice(&data[o..o + 4096]);
            black_box(&mut buf);
        }
        memcpy.push(t.elapsed().as_secs_f64() * 1e9 / n);

        let t = Instant::now();
        let mut misses = 0usize;
        for &o in &offsets {
            match black_box(file.try_get(black_box(o), 4096)) {
                Some(s) => {
                    black_box(s);
                }
                None => misses += 1,
            }
        }
        borrow.push(t.elapsed().as_secs_f64() * 1e9 / n);
        ensure!(misses == 0, "try_get missed {misses} warm blocks");

        let t = Instant::now();
        for &o in &offsets {
            let r = file.read_ref_blocking(black_box(o), 4096)?;
            ensure!(
                matches!(r, ReadBuf::Cache(_)),
                "read_ref_blocking did not borrow"
            );
            black_box(&r);
        }
        borrow_ref.push(t.elapsed().as_secs_f64() * 1e9 / n);

        let t = Instant::now();
        for &o in &offsets {
            file.read_at(black_box(o), &mut buf)?;
            black_box(&mut buf);
        }
        copy.push(t.elapsed().as_secs_f64() * 1e9 / n);
    }
    let memcpy_best = memcpy.iter().copied().fold(f64::INFINITY, f64::min);
    let row = |what: &str, v: &[f64], goal: String, met: Option<bool>| {
        let best = v.iter().copied().fold(f64::INFINITY, f64::min);
        HitRow {
            what: what.to_owned(),
            best_ns: best,
            median_ns: median(v),
            over_memcpy: best / memcpy_best,
            goal,
            goal_met: met,
        }
    };
    let borrow_best = borrow.iter().copied().fold(f64::INFINITY, f64::min);
    let borrow_ref_best = borrow_ref.iter().copied().fold(f64::INFINITY, f64::min);
    let copy_best = copy.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(vec![
        row("memcpy 4 KiB (same run)", &memcpy, "baseline".into(), None),
        row("loop + black_box only", &empty, "-".into(), None),
        row(
            "ChunkCache::get (borrow, no header)",
            &cache_get,
            "-".into(),
            None,
        ),
        row(
            "try_get (borrow)",
            &borrow,
            format!("<= {GOAL_BORROW_NS} ns"),
            Some(borrow_best <= GOAL_BORROW_NS),
        ),
        row(
            "read_ref_blocking (borrow)",
            &borrow_ref,
            format!("<= {GOAL_BORROW_NS} ns"),
            Some(borrow_ref_best <= GOAL_BORROW_NS),
        ),
        row(
            "read_at (copy)",
            &copy,
            format!("<= {GOAL_COPY_MEMCPY} x memcpy"),
            Some(copy_best <= GOAL_COPY_MEMCPY * memcpy_best),
        ),
        HitRow {
            what: "e2b chunker Slice hit (reference)".into(),
            best_ns: E2B_HIT_NS,
            median_ns: E2B_HIT_NS,
            over_memcpy: E2B_HIT_NS / memcpy_best,
            goal: "-".into(),
            goal_met: None,
        },
    ])
}

fn print_hit(rows: &[HitRow]) {
    println!();
    println!("== cache hit: warm 64 MiB file, random 4 KiB offsets (ns per read) ==");
    println!(
        "{:<36} {:>9} {:>9} {:>8} {:>22}",
        "path", "best-ns", "median-ns", "/memcpy", "goal"
    );
    for r in rows {
        println!(
            "{:<36} {:>9.1} {:>9.1} {:>8.2} {:>20} {}",
            r.what,
            r.best_ns,
            r.median_ns,
            r.over_memcpy,
            r.goal,
            r.goal_met.map_or(' ', mark)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Bookkeeping.

fn vm_rss() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS in /proc/self/status")?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

fn bench_bookkeeping(
    args: &EngineBenchArgs,
    dir: &Path,
    config: &EngineConfig,
) -> anyhow::Result<BookkeepingRow> {
    std::fs::create_dir_all(dir)?;
    let store: Arc<dyn Store> = Arc::new(FileStore::new(dir.to_path_buf()));
    let size = args.bookkeeping_gib * 1024 * MIB;
    ensure!(size > 0, "--bookkeeping-gib must be positive");
    let id = BuildId::from_u128(0x7a11_3000);
    eprintln!("bookkeeping: writing a {size}-byte uncompressed build ...");
    write_build(
        store.as_ref(),
        id,
        &mut std::io::repeat(0x5a).take(size),
        size,
        CompressionType::None,
        0,
    )?;
    let rss_before_open = vm_rss()?;
    let engine = Engine::new(store, config.clone())?;
    let file = engine.open(id, FileKind::Memfile)?;
    let rss_after_open = vm_rss()?;
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let mut buf = vec![0u8; 4096];
    for _ in 0..args.touch {
        let off = rng.random_range(0..size / BLOCK) * BLOCK;
        file.read_at(off, &mut buf)?;
        ensure!(buf.iter().all(|&b| b == 0x5a), "wrong bytes at {off}");
    }
    quiesce(&engine);
    let rss_after_touch = vm_rss()?;
    let bookkeeping = u64::try_from(file.bookkeeping_bytes())?;
    let filled = engine.stats().filled_bytes;
    let gib = size as f64 / (1u64 << 30) as f64;
    let growth = i64::try_from(rss_after_touch)? - i64::try_from(rss_before_open)?;
    let beyond = growth - i64::try_from(filled)?;
    let per_gib = bookkeeping as f64 / gib;
    Ok(BookkeepingRow {
        image_bytes: size,
        blocks_touched: args.touch,
        bookkeeping_bytes: bookkeeping,
        bookkeeping_per_gib: per_gib,
        filled_bytes: filled,
        rss_before_open,
        rss_after_open,
        rss_after_touch,
        rss_growth_beyond_filled: beyond,
        rss_growth_beyond_filled_per_gib: beyond as f64 / gib,
        goal_met: per_gib <= GOAL_BOOKKEEPING_PER_GIB,
    })
}

fn print_bookkeeping(r: &BookkeepingRow) {
    println!();
    println!(
        "== bookkeeping: {} GiB uncompressed image, {} random 4 KiB blocks touched ==",
        r.image_bytes >> 30,
        r.blocks_touched
    );
    println!(
        "bookkeeping_bytes: {} ({:.1} KiB per GiB; goal <= {:.0} KiB per GiB {})",
        r.bookkeeping_bytes,
        r.bookkeeping_per_gib / 1024.0,
        GOAL_BOOKKEEPING_PER_GIB / 1024.0,
        mark(r.goal_met)
    );
    println!(
        "RSS: before open {} KiB, after open {} KiB, after touch {} KiB; filled {} KiB; growth beyond filled {} KiB ({:.1} KiB per GiB)",
        r.rss_before_open >> 10,
        r.rss_after_open >> 10,
        r.rss_after_touch >> 10,
        r.filled_bytes >> 10,
        r.rss_growth_beyond_filled / 1024,
        r.rss_growth_beyond_filled_per_gib / 1024.0
    );
}

// ---------------------------------------------------------------------------------------------
// Markdown.

fn markdown(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let cfg: Vec<String> = r
        .engine_config
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(s, "Engine config: {}\n", cfg.join(", "));
    if let Some(ft) = r.first_touch_us {
        let _ = writeln!(
            s,
            "First 4 KiB write into a fresh 4 MiB cache (hugepage fault): p50 {:.0} µs, mean {:.0} µs, p99 {:.0} µs.\n",
            ft[0], ft[1], ft[2]
        );
    }
    if !r.random.is_empty() {
        let _ = writeln!(
            s,
            "| backend | pacing | triples | avg µs/caller | worst µs/caller | p50 µs | p99 µs | p99.9 µs | avg / TTFB | worst / TTFB | e2b avg / worst µs | ours / e2b (avg, worst) | store requests / triple |"
        );
        let _ = writeln!(
            s,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for x in &r.random {
            let _ = writeln!(
                s,
                "| {} ({:.0} ms, {:.0} MB/s) | {} | {} | {:.0} | {:.0} | {} | {} | {} | {:.2} {} | {:.2} {} | {:.0} / {:.0} | {:.2}, {:.2} | {:.2} |",
                x.backend,
                x.ttfb_ms,
                x.bandwidth_mb_s,
                x.pacing,
                x.iterations,
                x.avg_us,
                x.worst_us,
                x.p50_us,
                x.p99_us,
                x.p999_us,
                x.avg_over_ttfb,
                if x.ttfb_ms > 0.0 {
                    goal_word(x.goal_avg_met)
                } else {
                    ""
                },
                x.worst_over_ttfb,
                if x.ttfb_ms > 0.0 {
                    goal_word(x.goal_worst_met)
                } else {
                    ""
                },
                x.e2b_avg_us,
                x.e2b_worst_us,
                x.avg_ours_over_e2b,
                x.worst_ours_over_e2b,
                x.store_requests_per_iter,
            );
        }
        let _ = writeln!(
            s,
            "\nGoals: avg <= {GOAL_AVG_TTFB} x TTFB, worst <= {GOAL_WORST_TTFB} x TTFB.\n"
        );
    }
    if !r.cold.is_empty() {
        if let Some(layout) = r.cold_layout {
            let _ = writeln!(s, "Cold layout: {layout:?}.\n");
        }
        let _ = writeln!(
            s,
            "| column | pacing | codec | iterations | ms (mean) | min–max | ratio | link used | TTFB + stored/bw ms | e2b ms | ours / e2b |"
        );
        let _ = writeln!(s, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for x in &r.cold {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.0} | {:.0}–{:.0} | {:.2} | {:.0} % | {:.0} | {} | {} |",
                e2b_cold_label(x),
                x.pacing,
                x.codec,
                x.iterations,
                x.ms_mean,
                x.ms_min,
                x.ms_max,
                x.ratio,
                x.link_used * 100.0,
                x.shared_floor_ms,
                x.e2b_ms.map_or("-".to_owned(), |e| format!("{e:.0}")),
                x.ours_over_e2b
                    .map_or("-".to_owned(), |e| format!("{e:.2}")),
            );
        }
        let _ = writeln!(s);
    }
    if !r.hit.is_empty() {
        let _ = writeln!(s, "| 4 KiB hit | best ns | median ns | / memcpy | goal |");
        let _ = writeln!(s, "|---|---:|---:|---:|---|");
        for x in &r.hit {
            let goal = match x.goal_met {
                Some(m) => format!("{} ({})", x.goal, goal_word(m)),
                None => x.goal.clone(),
            };
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.1} | {:.2} | {} |",
                x.what, x.best_ns, x.median_ns, x.over_memcpy, goal
            );
        }
        let _ = writeln!(s);
    }
    if let Some(b) = &r.bookkeeping {
        let _ = writeln!(
            s,
            "| image | touched | bookkeeping | per GiB | RSS growth beyond filled | per GiB | goal |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
        let _ = writeln!(
            s,
            "| {} GiB | {} blocks ({} KiB filled) | {} B | {:.1} KiB | {} KiB | {:.1} KiB | <= 64 KiB/GiB ({}) |",
            b.image_bytes >> 30,
            b.blocks_touched,
            b.filled_bytes >> 10,
            b.bookkeeping_bytes,
            b.bookkeeping_per_gib / 1024.0,
            b.rss_growth_beyond_filled / 1024,
            b.rss_growth_beyond_filled_per_gib / 1024.0,
            goal_word(b.goal_met)
        );
    }
    s
}

fn goal_word(met: bool) -> &'static str {
    if met { "met" } else { "missed" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_reads() {
        assert!(vm_rss().unwrap() > 0);
    }

    #[test]
    fn codecs_parse() {
        for (name, _) in E2B_COLD {
            codec_of(name).unwrap();
        }
        assert!(codec_of("zstd9").is_err());
    }
}
