//! `thaw-bench uffd`: the UFFD fault path, each figure beside its limit measured in the same run.
//!
//! - `warm4k`: a 4 KiB-page memfile fully present in the engine's cache, served by
//!   [`serve_file`] (the engine's `EngineSource` + thaw-uffd's fault loop) to a peer in this
//!   process that registered anonymous memory with a userfaultfd, sent it over the socket like
//!   Firecracker, and touches every page once (shuffled); latency is measured in the touching
//!   thread around each first touch. The limit: a minimal handler (one thread, blocking `read()`
//!   of a `uffd_msg`, one `UFFDIO_COPY` from a prepared buffer) on the same peer pattern.
//!   Goals: p50 <= 1.5 x the limit, >= 150k faults/s on the one handler thread.
//! - `warm2m`: the same with 2 MiB pages on hugetlb memory (`vm.nr_hugepages` is raised for the
//!   run and restored). Goal: p50 <= 1.2 x the limit.
//! - `cold`: a memory image touched in the prefetch order through the simulated store (20 ms,
//!   100 MB/s, one shared link) and from a local `file://` store, zstd 2 MiB frames, with and
//!   without the recorded prefetch plan (`metadata.json` `prefetch.memory` = the touch order).
//!   Floors: the link time (stored bytes / bandwidth + TTFB) for the simulated store; all faults
//!   at the warm 4 KiB latency for `file://`.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hdrhistogram::Histogram;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use serde::Serialize;
use thaw_codec::{BuildId, CompressionType, FileKind, Header, Mapping, Metadata};
use thaw_server::engine::{Engine, EngineConfig};
use thaw_server::store::sim::{Pacing, SimConfig};
use thaw_server::store::{FileStore, PutOptions, SimStore, Store};
use thaw_server::uffd::{UffdOptions, UffdReport, UffdServer, serve_file, serve_uffd};
use thaw_server::writer::{WriteOptions, store_build_file};
use thaw_uffd::{HandlerConfig, ioctl};

use crate::codec_bench::generate;
use crate::uffd_sys::{self as sys, Mem};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const PAGE: u64 = 4 * KIB;
const HUGE: u64 = 2 * MIB;
const FRAME: u64 = 2 * MIB;

const GOAL_4K_RATIO: f64 = 1.5;
const GOAL_4K_RATE: f64 = 150_000.0;
const GOAL_2M_RATIO: f64 = 1.2;

/// Which sub-benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// Warm 4 KiB faults vs a minimal handler.
    Warm4k,
    /// Warm 2 MiB (hugetlb) faults vs a bare 2 MiB UFFDIO_COPY handler.
    Warm2m,
    /// Cold image touch through the simulated store and file://, with and without prefetch.
    Cold,
    /// Everything.
    All,
}

/// The cold benchmark's touch order (also the recorded prefetch plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// 2 MiB frames in a seeded random order, the 4 KiB pages of each frame shuffled.
    Framelocal,
    /// Every 4 KiB page in a seeded random order.
    Random,
    /// Front to back.
    Sequential,
}

fn touch_order(order: Order, len: usize, seed: u64) -> anyhow::Result<Vec<usize>> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let pages = len / usize_of(PAGE)?;
    Ok(match order {
        Order::Sequential => (0..pages).collect(),
        Order::Random => {
            let mut v: Vec<usize> = (0..pages).collect();
            v.shuffle(&mut rng);
            v
        }
        Order::Framelocal => {
            let per_frame = usize_of(FRAME / PAGE)?;
            let mut frames: Vec<usize> = (0..len / usize_of(FRAME)?).collect();
            frames.shuffle(&mut rng);
            let mut v = Vec::with_capacity(pages);
            for f in frames {
                let mut p: Vec<usize> = (f * per_frame..(f + 1) * per_frame).collect();
                p.shuffle(&mut rng);
                v.extend(p);
            }
            v
        }
    })
}

/// Arguments of `thaw-bench uffd`.
#[derive(Debug, Clone, clap::Args)]
pub struct UffdBenchArgs {
    /// Sub-benchmarks to run (comma-separated): warm4k, warm2m, cold, all.
    #[arg(value_enum, value_delimiter = ',', default_value = "all")]
    which: Vec<Which>,
    /// warm4k: image size in MiB.
    #[arg(long, default_value_t = 64)]
    warm_mib: u64,
    /// warm2m: image size in MiB (this many MiB of hugetlb pages are reserved for the run).
    #[arg(long, default_value_t = 128)]
    huge_mib: u64,
    /// warm4k/warm2m: passes of each handler (alternating; all samples pooled).
    #[arg(long, default_value_t = 3)]
    passes: usize,
    /// cold: image size in MiB.
    #[arg(long, default_value_t = 256)]
    cold_mib: u64,
    /// cold: touch (and plan) orders, comma-separated: framelocal (2 MiB frames shuffled, the
    /// pages of each frame shuffled), random (all 4 KiB pages shuffled), sequential.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "framelocal")]
    cold_order: Vec<Order>,
    /// cold: prefetch worker threads of the UFFD server.
    #[arg(long, default_value_t = 8)]
    prefetch_concurrency: usize,
    /// Seed of the data and of the touch orders.
    #[arg(long, default_value_t = 42)]
    seed: u64,
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

impl UffdBenchArgs {
    fn runs(&self, w: Which) -> bool {
        self.which.contains(&Which::All) || self.which.contains(&w)
    }
}

// ---------------------------------------------------------------------------------------------
// Results.

/// Fault latencies of one handler over all passes.
#[derive(Debug, Clone, Serialize)]
struct Lat {
    faults: u64,
    p50_ns: u64,
    p99_ns: u64,
    mean_ns: f64,
    max_ns: u64,
    /// Faults per second of touching (one faulting thread, one handler thread).
    faults_per_s: f64,
    /// On-CPU time of the handler thread (`/proc/.../schedstat`), ns per fault.
    handler_cpu_ns_per_fault: f64,
    /// Faults per handler CPU-second (what one handler core could serve).
    faults_per_handler_core_s: f64,
}

#[derive(Debug, Clone, Serialize)]
struct WarmRow {
    page: String,
    image_mib: u64,
    passes: usize,
    engine: Lat,
    minimal: Lat,
    /// engine p50 / minimal p50.
    ratio_p50: f64,
    goal_ratio: f64,
    ratio_met: bool,
    /// Goal on faults/s (4 KiB only).
    goal_rate: Option<f64>,
    rate_met: Option<bool>,
    /// Pages the engine had to fetch (must be 0: everything was warm).
    engine_fetches: u64,
}

#[derive(Debug, Clone, Serialize)]
struct ColdRow {
    order: Order,
    store: String,
    prefetch: bool,
    image_mib: u64,
    stored_mib: f64,
    /// From the start of `serve_uffd` (prefetch starts there) to the last page touched.
    total_ms: f64,
    floor_ms: Option<f64>,
    floor: String,
    ratio: Option<f64>,
    fault_p50_us: f64,
    fault_p99_us: f64,
    faults: u64,
    prefaulted: u64,
    store_requests: u64,
    store_mib: f64,
    /// Every page faulted at the warm 4 KiB mean latency (the fault path alone), if measured.
    faults_at_warm_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    machine: String,
    warm: Vec<WarmRow>,
    skipped: Vec<String>,
    cold: Vec<ColdRow>,
    cold_order: String,
}

pub fn run(args: &UffdBenchArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut report = Report {
        machine: machine(),
        warm: Vec::new(),
        skipped: Vec::new(),
        cold: Vec::new(),
        cold_order: String::new(),
    };
    if args.runs(Which::Warm4k) {
        let row = bench_warm(args, &dir, PAGE, args.warm_mib)?;
        print_warm(&row);
        report.warm.push(row);
    }
    if args.runs(Which::Warm2m) {
        match HugePages::reserve(args.huge_mib.div_ceil(2) + 1) {
            Ok(guard) => {
                let r = bench_warm(args, &dir, HUGE, args.huge_mib);
                drop(guard);
                let row = r?;
                print_warm(&row);
                report.warm.push(row);
            }
            Err(e) => {
                let msg = format!("warm2m skipped: no hugetlb pages ({e:#})");
                eprintln!("{msg}");
                report.skipped.push(msg);
            }
        }
    }
    if args.runs(Which::Cold) {
        let warm_mean = report
            .warm
            .iter()
            .find(|r| r.page == "4 KiB")
            .map(|r| r.engine.mean_ns);
        report.cold_order = "framelocal = the 2 MiB frames in a seeded random order, the 4 KiB \
                             pages of each frame shuffled; random = every 4 KiB page shuffled; \
                             sequential = front to back"
            .into();
        report.cold = bench_cold(args, &dir, warm_mean)?;
        print_cold(&report.cold);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, markdown(&report))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cores} cores, load average {} at the start",
        load.join(" ")
    )
}

// ---------------------------------------------------------------------------------------------
// Builds.

/// Stores `data` as the memfile of a single-layer build `id` (one mapping, `block` bytes per
/// block) in `store`; returns the stored size.
fn write_build(
    store: &dyn Store,
    id: BuildId,
    data: &[u8],
    block: u64,
    codec: CompressionType,
) -> anyhow::Result<u64> {
    let len = data.len() as u64;
    let header = Header {
        metadata: Metadata {
            version: 4,
            block_size: block,
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
        level: 1,
        frame_size: FRAME,
        header_version: 4,
        workers: std::thread::available_parallelism().map_or(1, usize::from),
        progress: false,
    };
    let mut r: &[u8] = data;
    let stored = store_build_file(
        store,
        FileKind::Memfile,
        &header,
        &mut r as &mut dyn Read,
        len,
        &opts,
    )
    .with_context(|| format!("storing build {id}"))?;
    Ok(stored.stored_size)
}

fn region_json(base: u64, size: u64, page_size: u64) -> String {
    format!(
        r#"[{{"base_host_virt_addr":{base},"size":{size},"offset":0,"page_size":{page_size},"page_size_kib":{page_size}}}]"#
    )
}

fn usize_of(x: u64) -> anyhow::Result<usize> {
    usize::try_from(x).context("size does not fit in usize")
}

// ---------------------------------------------------------------------------------------------
// The peer: registers `mem`, touches pages, measures each first touch.

/// Touches `order` (page indices) once each; returns the histogram (ns) and the total time.
fn touch_all(
    mem: &Mem,
    page: usize,
    order: &[usize],
) -> anyhow::Result<(Histogram<u64>, Duration)> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut sink = 0u8;
    let start = Instant::now();
    for &p in order {
        let t = Instant::now();
        sink ^= mem.touch(p * page);
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        h.saturating_record(ns.max(1));
    }
    let total = start.elapsed();
    std::hint::black_box(sink);
    Ok((h, total))
}

/// A userfaultfd registered (MISSING) over `mem`, non-blocking as Firecracker creates it.
fn register(mem: &Mem) -> anyhow::Result<std::os::fd::OwnedFd> {
    let fd = ioctl::create().context("userfaultfd")?;
    ioctl::api(fd.as_fd(), ioctl::FEATURE_EVENT_REMOVE).context("UFFDIO_API")?;
    ioctl::register(
        fd.as_fd(),
        mem.addr(),
        mem.len() as u64,
        ioctl::REGISTER_MODE_MISSING,
    )
    .context("UFFDIO_REGISTER")?;
    Ok(fd)
}

/// Connects to `socket` and sends the handshake for `mem` (queued until the server accepts).
fn handshake(socket: &Path, mem: &Mem, page: u64) -> anyhow::Result<UnixStream> {
    let fd = register(mem)?;
    let stream = UnixStream::connect(socket).context("connecting to the UFFD socket")?;
    let json = region_json(mem.addr(), mem.len() as u64, page);
    sys::send_with_fd(&stream, json.as_bytes(), &fd).context("sending the handshake")?;
    Ok(stream)
}

fn handler_config() -> HandlerConfig {
    HandlerConfig {
        // The peer is this process.
        kill_peer_on_failure: false,
        ..HandlerConfig::default()
    }
}

fn uffd_options(prefetch: bool, concurrency: usize) -> UffdOptions {
    UffdOptions {
        handshake_timeout: Duration::from_secs(30),
        kill_peer_on_handshake_error: false,
        handler: handler_config(),
        prefetch,
        prefetch_concurrency: concurrency,
        ..UffdOptions::default()
    }
}

fn finish(server: UffdServer) -> anyhow::Result<UffdReport> {
    server.stop();
    let r = server.join();
    if let Err(e) = &r.result {
        bail!("UFFD server failed: {e}; {}", r.summary());
    }
    Ok(r)
}

fn check_image(mem: &Mem, data: &[u8], what: &str) -> anyhow::Result<()> {
    if mem.as_slice() != data {
        let bad = mem
            .as_slice()
            .iter()
            .zip(data)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        bail!("{what}: guest memory differs from the image at byte {bad}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Warm faults.

fn bench_warm(args: &UffdBenchArgs, dir: &Path, page: u64, mib: u64) -> anyhow::Result<WarmRow> {
    let huge = page == HUGE;
    let len = usize_of(mib * MIB)?;
    ensure!(
        (len as u64).is_multiple_of(page) && len > 0,
        "image must be whole pages"
    );
    let data = generate(args.seed, len);
    let store = Arc::new(FileStore::new(dir.join(format!("warm-{page}"))));
    let id = BuildId::from_u128(u128::from(args.seed) << 8 | u128::from(page >> 12));
    write_build(store.as_ref(), id, &data, page, CompressionType::Zstd)?;
    let engine = Engine::new(store, EngineConfig::default())?;
    let file = Arc::new(engine.open(id, FileKind::Memfile)?);
    file.open_all()?;
    // Warm: every page present in the engine's cache.
    let mut buf = vec![0u8; usize_of(FRAME)?];
    for (i, want) in data.chunks(buf.len()).enumerate() {
        let b = &mut buf[..want.len()];
        file.read_at(i as u64 * FRAME, b)?;
        ensure!(b == want, "warm-up read differs at frame {i}");
    }
    ensure!(
        file.is_present(0, len as u64),
        "the image is not all present after warm-up"
    );
    // The minimal handler's source: the same bytes in a page-aligned buffer.
    let mut src = Mem::new(len, false)?;
    src.as_mut_slice().copy_from_slice(&data);
    let src = Arc::new(src);

    let pages = len / usize_of(page)?;
    let mut order: Vec<usize> = (0..pages).collect();
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let socket = dir.join(format!("uffd-{page}.sock"));
    let mut eh: Option<Histogram<u64>> = None;
    let mut mh: Option<Histogram<u64>> = None;
    let (mut et, mut mt) = (Duration::ZERO, Duration::ZERO);
    let (mut ecpu, mut mcpu) = (0u64, 0u64);
    let mut engine_fetches = 0;
    // Pass 0 warms up both paths (first use of the hugetlb pool, the handler thread, the
    // allocator) and is not recorded.
    for pass in 0..=args.passes.max(1) {
        order.shuffle(&mut rng);
        let record = pass > 0;
        // Engine path.
        {
            let mem = Mem::new(len, huge).context("guest memory")?;
            let _ = std::fs::remove_file(&socket);
            let listener = UnixListener::bind(&socket)?;
            let _stream = handshake(&socket, &mem, page)?;
            let server = serve_file(
                &engine,
                Arc::clone(&file),
                None,
                &listener,
                &uffd_options(false, 1),
            )?;
            let (h, t) = touch_all(&mem, usize_of(page)?, &order)?;
            let cpu = thread_cpu_ns("thaw-uffd").context("the handler thread's CPU time")?;
            let r = finish(server)?;
            engine_fetches += r.metrics.fetches;
            check_image(&mem, &data, "engine path")?;
            tracing::info!(pass, "{}", r.summary());
            if record {
                et += t;
                ecpu += cpu;
                match &mut eh {
                    Some(a) => a.add(&h)?,
                    None => eh = Some(h),
                }
            }
        }
        // Minimal handler.
        {
            let mem = Mem::new(len, huge).context("guest memory")?;
            let fd = register(&mem)?;
            sys::set_blocking(fd.as_fd())?;
            let src = Arc::clone(&src);
            let base = mem.addr();
            let ps = page;
            let handler = std::thread::Builder::new()
                .name("minimal-uffd".into())
                .spawn(move || -> std::io::Result<u64> {
                    let whole = src.as_slice();
                    let mut done = 0;
                    while done < pages {
                        let Some(addr) = sys::read_fault(fd.as_fd())? else {
                            continue;
                        };
                        let dst = addr & !(ps - 1);
                        let off = usize::try_from(dst - base).unwrap_or(0);
                        let n = usize::try_from(ps).unwrap_or(0);
                        match sys::copy(fd.as_fd(), dst, &whole[off..off + n]) {
                            Ok(()) => {}
                            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                            Err(e) => return Err(e),
                        }
                        done += 1;
                    }
                    Ok(self_cpu_ns().unwrap_or(0))
                })?;
            let (h, t) = touch_all(&mem, usize_of(page)?, &order)?;
            let cpu = handler
                .join()
                .map_err(|_| anyhow::anyhow!("minimal handler panicked"))??;
            check_image(&mem, &data, "minimal handler")?;
            if record {
                mt += t;
                mcpu += cpu;
                match &mut mh {
                    Some(a) => a.add(&h)?,
                    None => mh = Some(h),
                }
            }
        }
    }
    let (Some(eh), Some(mh)) = (eh, mh) else {
        bail!("no passes");
    };
    let engine = lat(&eh, et, ecpu);
    let minimal = lat(&mh, mt, mcpu);
    let ratio = engine.p50_ns as f64 / minimal.p50_ns.max(1) as f64;
    let (goal_ratio, goal_rate) = if huge {
        (GOAL_2M_RATIO, None)
    } else {
        (GOAL_4K_RATIO, Some(GOAL_4K_RATE))
    };
    Ok(WarmRow {
        page: if huge { "2 MiB" } else { "4 KiB" }.into(),
        image_mib: mib,
        passes: args.passes.max(1),
        rate_met: goal_rate.map(|g| engine.faults_per_handler_core_s >= g),
        engine,
        minimal,
        ratio_p50: ratio,
        goal_ratio,
        ratio_met: ratio <= goal_ratio,
        goal_rate,
        engine_fetches,
    })
}

fn lat(h: &Histogram<u64>, total: Duration, cpu_ns: u64) -> Lat {
    let per = cpu_ns as f64 / h.len().max(1) as f64;
    Lat {
        handler_cpu_ns_per_fault: per,
        faults_per_handler_core_s: if per > 0.0 { 1e9 / per } else { 0.0 },
        faults: h.len(),
        p50_ns: h.value_at_quantile(0.5),
        p99_ns: h.value_at_quantile(0.99),
        mean_ns: h.mean(),
        max_ns: h.max(),
        faults_per_s: h.len() as f64 / total.as_secs_f64().max(1e-9),
    }
}

fn print_warm(r: &WarmRow) {
    println!(
        "\nWarm {} faults ({} MiB image, {} passes, {} faults per handler)",
        r.page, r.image_mib, r.passes, r.engine.faults
    );
    println!(
        "  {:<28} {:>9} {:>9} {:>9} {:>10} {:>12} {:>12} {:>14}",
        "handler",
        "p50 ns",
        "p99 ns",
        "mean ns",
        "max ns",
        "faults/s",
        "cpu ns/fault",
        "faults/cpu-s"
    );
    for (name, l) in [
        ("thaw (serve_file)", &r.engine),
        ("minimal read+UFFDIO_COPY", &r.minimal),
    ] {
        println!(
            "  {:<28} {:>9} {:>9} {:>9.0} {:>10} {:>12.0} {:>12.0} {:>14.0}",
            name,
            l.p50_ns,
            l.p99_ns,
            l.mean_ns,
            l.max_ns,
            l.faults_per_s,
            l.handler_cpu_ns_per_fault,
            l.faults_per_handler_core_s
        );
    }
    println!(
        "  p50 ratio {:.2} x (goal <= {} x: {}){}; engine fetches {}",
        r.ratio_p50,
        r.goal_ratio,
        goal_word(r.ratio_met),
        r.goal_rate.map_or(String::new(), |g| format!(
            "; {:.0} faults per handler CPU-second (goal >= {g:.0}: {}; wall {:.0}/s, limit's wall {:.0}/s)",
            r.engine.faults_per_handler_core_s,
            goal_word(r.rate_met.unwrap_or(false)),
            r.engine.faults_per_s,
            r.minimal.faults_per_s
        )),
        r.engine_fetches
    );
}

/// On-CPU nanoseconds of the thread named `name` (the first one) of this process.
fn thread_cpu_ns(name: &str) -> anyhow::Result<u64> {
    for task in std::fs::read_dir("/proc/self/task")? {
        let task = task?.path();
        if std::fs::read_to_string(task.join("comm")).is_ok_and(|c| c.trim() == name) {
            return schedstat(&task.join("schedstat"));
        }
    }
    bail!("no thread named {name}")
}

/// On-CPU nanoseconds of the calling thread.
fn self_cpu_ns() -> anyhow::Result<u64> {
    schedstat(Path::new("/proc/thread-self/schedstat"))
}

fn schedstat(path: &Path) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(s.split_whitespace()
        .next()
        .context("empty schedstat")?
        .parse()?)
}

// ---------------------------------------------------------------------------------------------
// Hugetlb reservation.

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Raises `vm.nr_hugepages` by `n` for the run; restores the old value on drop.
struct HugePages {
    old: u64,
}

impl HugePages {
    fn reserve(n: u64) -> anyhow::Result<Self> {
        let read = || -> anyhow::Result<u64> {
            Ok(std::fs::read_to_string(NR_HUGEPAGES)?.trim().parse()?)
        };
        let old = read()?;
        let guard = Self { old };
        std::fs::write(NR_HUGEPAGES, (old + n).to_string())
            .with_context(|| format!("writing {NR_HUGEPAGES}"))?;
        let now = read()?;
        ensure!(
            now >= old + n,
            "asked for {} hugetlb pages, the kernel gave {now}",
            old + n
        );
        Ok(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(NR_HUGEPAGES, self.old.to_string()) {
            eprintln!("could not restore {NR_HUGEPAGES} to {}: {e}", self.old);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cold.

fn bench_cold(
    args: &UffdBenchArgs,
    dir: &Path,
    warm_mean_ns: Option<f64>,
) -> anyhow::Result<Vec<ColdRow>> {
    let len = usize_of(args.cold_mib * MIB)?;
    ensure!(
        (len as u64).is_multiple_of(FRAME) && len > 0,
        "cold image must be whole 2 MiB frames"
    );
    let data = generate(args.seed ^ 0xC01D, len);
    let store = Arc::new(FileStore::new(dir.join("cold")));
    let id = BuildId::from_u128(0xC01D_0000 | u128::from(args.seed));
    let stored = write_build(store.as_ref(), id, &data, PAGE, CompressionType::Zstd)?;
    let sim = SimConfig {
        pacing: Pacing::Shared,
        seed: Some(1),
        ..SimConfig::gcs()
    };
    let link_ms = stored as f64 / 100e6 * 1e3 + 20.0;
    let decode_ms = decode_floor(Arc::clone(&store), id, len)?;
    let mut rows = Vec::new();
    for &order_kind in &args.cold_order {
        let order = touch_order(order_kind, len, args.seed)?;
        let plan = serde_json::json!({
            "version": 2,
            "prefetch": {"memory": {"indices": order, "block_size": PAGE}},
        });
        store.put(
            &format!("{id}/metadata.json"),
            &serde_json::to_vec(&plan)?,
            &PutOptions::default(),
        )?;
        for sim_store in [true, false] {
            for prefetch in [false, true] {
                let s: Arc<dyn Store> = if sim_store {
                    Arc::new(SimStore::new(
                        Arc::clone(&store) as Arc<dyn Store>,
                        sim.clone(),
                    ))
                } else {
                    Arc::clone(&store) as Arc<dyn Store>
                };
                let engine = Engine::new(s, EngineConfig::default())?;
                let mem = Mem::new(len, false)?;
                let socket = dir.join("uffd-cold.sock");
                let _ = std::fs::remove_file(&socket);
                let listener = UnixListener::bind(&socket)?;
                let _stream = handshake(&socket, &mem, PAGE)?;
                let start = Instant::now();
                let server = serve_uffd(
                    &engine,
                    id,
                    &listener,
                    &uffd_options(prefetch, args.prefetch_concurrency),
                )?;
                let (h, _) = touch_all(&mem, usize_of(PAGE)?, &order)?;
                let total = start.elapsed();
                let r = finish(server)?;
                check_image(&mem, &data, "cold")?;
                eprintln!("{}", r.summary());
                let (floor_ms, floor) = if sim_store {
                    (
                        Some(link_ms),
                        "link: stored bytes / 100 MB/s + 20 ms".to_owned(),
                    )
                } else {
                    (
                        Some(decode_ms),
                        "decode: whole image into a fresh engine's cache, all cores".to_owned(),
                    )
                };
                let faults_at_warm_ms = warm_mean_ns.map(|ns| ns * order.len() as f64 / 1e6);
                let total_ms = total.as_secs_f64() * 1e3;
                rows.push(ColdRow {
                    store: if sim_store {
                        "sim GCS (20 ms, 100 MB/s shared)".into()
                    } else {
                        "file:// (local)".into()
                    },
                    prefetch,
                    image_mib: args.cold_mib,
                    stored_mib: stored as f64 / MIB as f64,
                    total_ms,
                    floor_ms,
                    floor,
                    ratio: floor_ms.map(|f| total_ms / f),
                    fault_p50_us: h.value_at_quantile(0.5) as f64 / 1e3,
                    fault_p99_us: h.value_at_quantile(0.99) as f64 / 1e3,
                    faults: r.metrics.faults_missing,
                    prefaulted: r.prefetch.map_or(0, |p| p.prefaulted),
                    store_requests: r.engine.store_requests,
                    store_mib: r.engine.store_bytes as f64 / MIB as f64,
                    order: order_kind,
                    faults_at_warm_ms,
                });
            }
        }
    }
    Ok(rows)
}

/// ms to decompress the whole image into a fresh engine's cache over `file://`, one reader per
/// core, each reading every n-th 2 MiB frame.
fn decode_floor(store: Arc<FileStore>, id: BuildId, len: usize) -> anyhow::Result<f64> {
    let engine = Engine::new(store, EngineConfig::default())?;
    let file = Arc::new(engine.open(id, FileKind::Memfile)?);
    let n = std::thread::available_parallelism().map_or(1, usize::from);
    let frames = len / usize_of(FRAME)?;
    let start = Instant::now();
    std::thread::scope(|sc| -> anyhow::Result<()> {
        let hs: Vec<_> = (0..n)
            .map(|w| {
                let file = Arc::clone(&file);
                sc.spawn(move || -> anyhow::Result<()> {
                    let mut buf = vec![0u8; 2 << 20];
                    for f in (w..frames).step_by(n) {
                        file.read_at(f as u64 * FRAME, &mut buf)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("decode reader panicked"))??;
        }
        Ok(())
    })?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

fn print_cold(rows: &[ColdRow]) {
    let Some(first) = rows.first() else {
        return;
    };
    println!(
        "\nCold touch of a {} MiB image (zstd 2 MiB frames, {:.1} MiB stored), prefetch order",
        first.image_mib, first.stored_mib
    );
    println!(
        "  {:<11} {:<34} {:>8} {:>10} {:>10} {:>7} {:>10} {:>10} {:>8} {:>10}",
        "order",
        "store",
        "prefetch",
        "total ms",
        "floor ms",
        "ratio",
        "p50 µs",
        "p99 µs",
        "faults",
        "prefaulted"
    );
    for r in rows {
        println!(
            "  {:<11} {:<34} {:>8} {:>10.0} {:>10} {:>7} {:>10.1} {:>10.1} {:>8} {:>10}",
            format!("{:?}", r.order).to_lowercase(),
            r.store,
            if r.prefetch { "yes" } else { "no" },
            r.total_ms,
            r.floor_ms.map_or("-".into(), |f| format!("{f:.0}")),
            r.ratio.map_or("-".into(), |x| format!("{x:.2}")),
            r.fault_p50_us,
            r.fault_p99_us,
            r.faults,
            r.prefaulted
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Markdown.

fn goal_word(met: bool) -> &'static str {
    if met { "met" } else { "missed" }
}

fn markdown(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "Machine: {}.\n", r.machine);
    if !r.warm.is_empty() {
        let _ = writeln!(
            s,
            "| page | handler | faults | p50 ns | p99 ns | mean ns | faults/s (wall) | handler CPU ns/fault | faults per handler CPU-s | p50 ratio | goal |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for w in &r.warm {
            let goal = format!(
                "p50 <= {} x: {}{}",
                w.goal_ratio,
                goal_word(w.ratio_met),
                w.goal_rate.map_or(String::new(), |g| format!(
                    "; >= {g:.0} faults per handler CPU-s: {}",
                    goal_word(w.rate_met.unwrap_or(false))
                ))
            );
            for (name, l, ratio, goal) in [
                (
                    "thaw (serve_file)",
                    &w.engine,
                    format!("{:.2}", w.ratio_p50),
                    goal,
                ),
                (
                    "minimal read + UFFDIO_COPY",
                    &w.minimal,
                    "1".into(),
                    "limit".into(),
                ),
            ] {
                let _ = writeln!(
                    s,
                    "| {} | {name} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {ratio} | {goal} |",
                    w.page,
                    l.faults,
                    l.p50_ns,
                    l.p99_ns,
                    l.mean_ns,
                    l.faults_per_s,
                    l.handler_cpu_ns_per_fault,
                    l.faults_per_handler_core_s
                );
            }
        }
        let _ = writeln!(s);
    }
    for k in &r.skipped {
        let _ = writeln!(s, "{k}\n");
    }
    if let Some(first) = r.cold.first() {
        let _ = writeln!(
            s,
            "Cold: {} MiB image, zstd level 1, 2 MiB frames ({:.1} MiB stored); touch orders: {}. The touch order is also the recorded prefetch plan.\n",
            first.image_mib, first.stored_mib, r.cold_order
        );
        let mut floors: Vec<String> = r
            .cold
            .iter()
            .map(|c| format!("{}: {}", c.store, c.floor))
            .collect();
        floors.sort();
        floors.dedup();
        let _ = writeln!(s, "Floors: {}.\n", floors.join("; "));
        let _ = writeln!(
            s,
            "| order | store | prefetch | total ms | floor ms | ratio | fault p50 µs | fault p99 µs | faults | prefaulted | store requests | store MiB |"
        );
        let _ = writeln!(
            s,
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for c in &r.cold {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {} | {} | {:.1} | {:.1} | {} | {} | {} | {:.1} |",
                format!("{:?}", c.order).to_lowercase(),
                c.store,
                if c.prefetch { "yes" } else { "no" },
                c.total_ms,
                c.floor_ms.map_or("-".into(), |f| format!("{f:.0}")),
                c.ratio.map_or("-".into(), |x| format!("{x:.2}")),
                c.fault_p50_us,
                c.fault_p99_us,
                c.faults,
                c.prefaulted,
                c.store_requests,
                c.store_mib
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touch_orders_are_permutations_of_every_page() {
        let len = usize::try_from(3 * FRAME).unwrap();
        for o in [Order::Framelocal, Order::Random, Order::Sequential] {
            let mut v = touch_order(o, len, 7).unwrap();
            if o == Order::Framelocal {
                // Each run of 512 pages stays in one frame.
                for chunk in v.chunks(512) {
                    assert!(chunk.iter().all(|&p| p / 512 == chunk[0] / 512));
                }
            }
            v.sort_unstable();
            assert_eq!(v, (0..3 * 512).collect::<Vec<_>>());
        }
    }

    #[test]
    fn thread_cpu_time_reads() {
        // The kernel accounts a running thread's time at ticks and switches: spin, then yield.
        let until = Instant::now() + Duration::from_millis(30);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        std::thread::sleep(Duration::from_millis(1));
        assert!(self_cpu_ns().unwrap() > 0);
    }
}
