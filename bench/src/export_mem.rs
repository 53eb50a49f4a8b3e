//! `thaw-bench export-mem`: export of guest memory at pause (issue 6), each figure beside its floor
//! measured in the same run.
//!
//! A memfile base build (`generate`'s ~3x-compressible pages) is stored in every destination
//! store; a memfd holds the guest memory (the base image, then `--dirty` of its 4 KiB pages
//! rewritten in runs of 1-16 pages with pages copied from elsewhere, first byte flipped, so the
//! diff compresses like the image). Each timed export is the code path of
//! `UffdServer::export_memory`: [`export_layer`] of [`FileKind::Memfile`] over the base header,
//! the dirty runs as the change set, the dirty pages read from the memfd with positioned reads
//! (what the handler's `MemfdSource` does), framing, compression, SHA-256, data object, header.
//! What it leaves out is the fault handler's page-state walk that builds the change set
//! (`memory_changes`; it needs a live userfaultfd session).
//!
//! The floor: the same dirty pages, packed in `dirty.bin` on tmpfs (page cache), through the
//! command-line tool of the codec (`zstd -L -T2`, `lz4 -1`, `cp` for none) and through the
//! issue's literal `zstd -1 -T2` for every codec; for `none` also `cp` followed by
//! `openssl dgst -sha256` (the copy and the checksum a layer needs); for a `gs://…?endpoint=`
//! destination also the floor tool's output uploaded with `curl` (one media upload). Floors and
//! exports take turns rep by rep (both see the same load); beside wall time, the CPU seconds of
//! the export (this process) and of the codec floor tool (from `/proc/self/stat`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use clap::Args;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use thaw_codec::{BuildId, CompressionType, FileKind, Header, Mapping, Metadata};
use thaw_server::cli::{CodecArg, parse_codec, parse_size};
use thaw_server::export::{BlockSource, ChangeSet, Exported, export_layer};
use thaw_server::store::{Store, open_store};
use thaw_server::writer::{WriteOptions, store_build_file};

use crate::codec_bench::generate;

const PAGE: u64 = 4096;

/// Arguments of `thaw-bench export-mem`.
#[derive(Debug, Args)]
pub struct ExportMemArgs {
    /// Guest memory size.
    #[arg(long, value_parser = parse_size, default_value = "512MiB")]
    size: u64,
    /// Fraction of the 4 KiB pages the guest rewrote.
    #[arg(long, default_value_t = 0.2)]
    dirty: f64,
    /// Timed runs per point (median, min and max are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Codecs, comma-separated: zstd:LEVEL, lz4, none.
    #[arg(long, value_delimiter = ',', default_value = "zstd:1,zstd:2,lz4,none")]
    codecs: Vec<String>,
    /// Extra destination store URL (e.g. `gs://bucket/prefix?endpoint=http://127.0.0.1:PORT`);
    /// `file://WORKDIR/out` is always measured.
    #[arg(long)]
    dest: Vec<String>,
    /// Working directory (dirty.bin, the local store); tmpfs is best.
    #[arg(long)]
    workdir: PathBuf,
    /// Encoder threads (default: all cores, as the control API uses).
    #[arg(long)]
    workers: Option<usize>,
    /// Seed of the image and of the dirty pages.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// A memfd holding guest memory, read like `UffdServer`'s memfd source.
struct Memfd(File);

impl BlockSource for Memfd {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
}

/// One measured point.
struct Point {
    median: f64,
    min: f64,
    max: f64,
}

fn point(mut xs: Vec<f64>) -> anyhow::Result<Point> {
    ensure!(!xs.is_empty(), "no runs");
    xs.sort_by(f64::total_cmp);
    Ok(Point {
        median: xs.get(xs.len() / 2).copied().unwrap_or_default(),
        min: xs.first().copied().unwrap_or_default(),
        max: xs.last().copied().unwrap_or_default(),
    })
}

/// Runs `thaw-bench export-mem`.
pub fn run(args: &ExportMemArgs) -> anyhow::Result<()> {
    ensure!(args.reps > 0, "--reps must be at least 1");
    ensure!(
        args.size >= PAGE && args.size.is_multiple_of(PAGE),
        "--size must be a non-zero multiple of 4096"
    );
    ensure!(
        args.dirty > 0.0 && args.dirty <= 1.0,
        "--dirty must be in (0, 1]"
    );
    let codecs = args
        .codecs
        .iter()
        .map(|c| parse_codec(c).map_err(|e| anyhow::anyhow!("codec {c}: {e}")))
        .collect::<anyhow::Result<Vec<CodecArg>>>()?;
    for tool in ["zstd", "lz4", "cp", "openssl"] {
        ensure!(
            Command::new(tool).arg("--version").output().is_ok(),
            "missing tool: {tool}"
        );
    }
    std::fs::create_dir_all(&args.workdir)
        .with_context(|| format!("creating {}", args.workdir.display()))?;
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let size = usize::try_from(args.size).context("--size does not fit in memory")?;

    eprintln!("generating a {} MiB memory image", args.size >> 20);
    let image = generate(args.seed, size);
    let base = BuildId::new_v4();
    let header = base_header(base, args.size);

    let mut dests = vec![format!("file://{}/out", args.workdir.display())];
    dests.extend(args.dest.iter().cloned());
    let mut stores = Vec::new();
    for url in &dests {
        let store = open_store(url).with_context(|| format!("opening {url}"))?;
        eprintln!("storing the base memfile {base} in {url}");
        store_base(store.as_ref(), &header, &image, workers)?;
        stores.push((url.clone(), store));
    }

    // Guest memory: the base image in a memfd, then the guest's writes.
    let memfd = rustix::fs::memfd_create("thaw-bench-guest", rustix::fs::MemfdFlags::CLOEXEC)
        .context("memfd_create")?;
    let memfd = File::from(memfd);
    memfd.write_all_at(&image, 0).context("filling the memfd")?;
    let dirty = dirty_runs(args.seed, args.size / PAGE, args.dirty);
    let dirty_bin = args.workdir.join("dirty.bin");
    write_guest_changes(&memfd, &image, &dirty, args.seed, &dirty_bin)?;
    drop(image);
    let changes = ChangeSet {
        block_size: PAGE,
        dirty,
        zero: Vec::new(),
    };
    let diff_len = changes.diff_len();
    eprintln!(
        "{} dirty pages in {} runs, {diff_len} dirty bytes; load average {}",
        changes.dirty_blocks(),
        changes.dirty.len(),
        load_average()
    );
    let source = Memfd(memfd);

    println!(
        "{:<7} {:<12} {:>9} {:>15} {:>9} {:<12} {:>6} {:>9} {:>6} {:>9} {:>6} {:>7} {:>7} {:>6}",
        "codec",
        "dest",
        "thaw_s",
        "thaw_range",
        "floor_s",
        "floor_tool",
        "ratio",
        "zstd1_s",
        "ratio",
        "upload_s",
        "ratio",
        "thaw_cpu",
        "flr_cpu",
        "ratio"
    );
    let zstd1_argv = ["zstd", "-1", "-T2", "-q", "-f"];
    let sha_script = r#"cp "$1" "$2" && openssl dgst -sha256 "$1" >/dev/null"#;
    let sha_argv = ["bash", "-c", sha_script, "_"];
    let floor_out = args.workdir.join("floor.out");
    for codec in &codecs {
        let (tool, floor_cmd): (String, Vec<String>) = match codec.codec {
            CompressionType::Zstd => (
                format!("zstd -{} -T2", codec.level),
                vec![
                    "zstd".into(),
                    format!("-{}", codec.level),
                    "-T2".into(),
                    "-q".into(),
                    "-f".into(),
                ],
            ),
            CompressionType::Lz4 => (
                "lz4 -1".into(),
                vec!["lz4".into(), "-1".into(), "-q".into(), "-f".into()],
            ),
            CompressionType::None => ("cp".into(), vec!["cp".into()]),
        };
        let argv: Vec<&str> = floor_cmd.iter().map(String::as_str).collect();
        let is_zstd = codec.codec == CompressionType::Zstd;
        let none = codec.codec == CompressionType::None;
        let opts = WriteOptions {
            codec: codec.codec,
            level: codec.level,
            frame_size: thaw_codec::DEFAULT_FRAME_SIZE,
            header_version: 4,
            workers,
            progress: false,
        };
        // The floors and the exports take turns, rep by rep, so that both see the same load.
        let (mut zstd1, mut fl, mut fl_cpu, mut sha) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut thaw = vec![(Vec::new(), Vec::new(), Vec::new()); stores.len()];
        for _ in 0..args.reps {
            zstd1.push(time_tool(&zstd1_argv, &dirty_bin, &floor_out, true)?.0);
            if none {
                // The work a plain layer needs at least: the copy and the SHA-256 of the
                // header's self entry, one after the other (openssl uses SHA-NI).
                sha.push(time_tool(&sha_argv, &dirty_bin, &floor_out, false)?.0);
            }
            // Last, so that floor.out holds the codec floor's output for the upload floor.
            let (t, cpu) = time_tool(&argv, &dirty_bin, &floor_out, is_zstd)?;
            fl.push(t);
            fl_cpu.push(cpu);
            for ((url, store), (times, cpus, ups)) in stores.iter().zip(thaw.iter_mut()) {
                let id = BuildId::new_v4();
                let cpu0 = cpu_seconds(false)?;
                let t0 = Instant::now();
                let exported = export_layer(
                    store.as_ref(),
                    FileKind::Memfile,
                    &header,
                    id,
                    &changes,
                    &source,
                    &opts,
                )?;
                times.push(t0.elapsed().as_secs_f64());
                cpus.push(cpu_seconds(false)? - cpu0);
                let Exported::Stored(s) = exported else {
                    bail!("build {id} was already stored");
                };
                ensure!(
                    s.uncompressed_size == diff_len,
                    "exported {} bytes, not {diff_len}",
                    s.uncompressed_size
                );
                if let Some((ep, bucket)) = gcs_upload_target(url) {
                    ups.push(curl_upload(&ep, &bucket, &floor_out)?);
                }
            }
        }
        let _ = std::fs::remove_file(&floor_out);
        let (zstd1, fl, fl_cpu) = (point(zstd1)?, point(fl)?, point(fl_cpu)?);
        for ((url, _), (times, cpus, ups)) in stores.iter().zip(thaw) {
            let t = point(times)?;
            let cpu = point(cpus)?;
            // The scheme, and the GCS upload mode when the URL names one (`gs/resumable`).
            let scheme = url.split(':').next().unwrap_or("?");
            let label = match url.split_once("upload=") {
                Some((_, mode)) => format!("{scheme}/{}", mode.split('&').next().unwrap_or("")),
                None => scheme.to_owned(),
            };
            let (up_s, up_r) = if ups.is_empty() {
                ("-".to_owned(), "-".to_owned())
            } else {
                let u = point(ups)?.median + fl.median;
                (format!("{u:.3}"), format!("{:.2}", t.median / u))
            };
            println!(
                "{:<7} {:<12} {:>9.3} {:>15} {:>9.3} {:<12} {:>6.2} {:>9.3} {:>6.2} {:>9} {:>6} {:>7.2} {:>7.2} {:>6.2}",
                codec_label(codec),
                label,
                t.median,
                format!("{:.3}-{:.3}", t.min, t.max),
                fl.median,
                tool,
                t.median / fl.median,
                zstd1.median,
                t.median / zstd1.median,
                up_s,
                up_r,
                cpu.median,
                fl_cpu.median,
                cpu.median / fl_cpu.median
            );
            if none {
                let sf = point(sha.clone())?;
                println!(
                    "        {label:<12} against cp + openssl dgst -sha256 ({:.3} s): {:.2}",
                    sf.median,
                    t.median / sf.median
                );
            }
        }
    }
    eprintln!("load average: {}", load_average());
    Ok(())
}

fn codec_label(c: &CodecArg) -> String {
    match c.codec {
        CompressionType::Zstd => format!("zstd:{}", c.level),
        CompressionType::Lz4 => "lz4".into(),
        CompressionType::None => "none".into(),
    }
}

fn base_header(id: BuildId, size: u64) -> Header {
    Header {
        metadata: Metadata {
            version: 4,
            block_size: PAGE,
            size,
            generation: 0,
            build_id: id,
            base_build_id: id,
        },
        incomplete: false,
        builds: BTreeMap::new(),
        mappings: vec![Mapping {
            offset: 0,
            length: size,
            build_id: id,
            build_storage_offset: 0,
        }],
    }
}

fn store_base(
    store: &dyn Store,
    header: &Header,
    image: &[u8],
    workers: usize,
) -> anyhow::Result<()> {
    let opts = WriteOptions {
        codec: CompressionType::Zstd,
        level: 1,
        frame_size: thaw_codec::DEFAULT_FRAME_SIZE,
        header_version: 4,
        workers,
        progress: false,
    };
    let mut r: &[u8] = image;
    store_build_file(
        store,
        FileKind::Memfile,
        header,
        &mut r as &mut dyn Read,
        image.len() as u64,
        &opts,
    )
    .context("storing the base memfile")?;
    Ok(())
}

/// `fraction` of `pages` pages in runs of 1-16 at random places, sorted and merged.
fn dirty_runs(seed: u64, pages: u64, fraction: f64) -> Vec<Range<u64>> {
    let mut rng = SmallRng::seed_from_u64(seed);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a page count, far below 2^52"
    )]
    let want = ((pages as f64) * fraction) as u64;
    let mut dirty = vec![false; usize::try_from(pages).unwrap_or(0)];
    let mut count = 0u64;
    while count < want.min(pages) {
        let run = rng.random_range(1..=16u64).min(pages);
        let start = rng.random_range(0..=pages - run);
        for b in start..start + run {
            if let Some(d) = usize::try_from(b).ok().and_then(|i| dirty.get_mut(i))
                && !*d
            {
                *d = true;
                count += 1;
            }
        }
    }
    let mut runs: Vec<Range<u64>> = Vec::new();
    for (b, d) in (0u64..).zip(dirty) {
        if !d {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.end == b => r.end = b + 1,
            _ => runs.push(b..b + 1),
        }
    }
    runs
}

/// Writes the dirty pages into the memfd (copies of other pages, first byte flipped) and the
/// same bytes, packed in page order, into `out`.
fn write_guest_changes(
    memfd: &File,
    image: &[u8],
    dirty: &[Range<u64>],
    seed: u64,
    out: &Path,
) -> anyhow::Result<()> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
    let pages = image.len() / 4096;
    let mut packed =
        std::io::BufWriter::new(File::create(out).with_context(|| format!("{}", out.display()))?);
    let mut page = vec![0u8; 4096];
    for r in dirty {
        for b in r.clone() {
            let src = rng.random_range(0..pages) * 4096;
            page.copy_from_slice(
                image
                    .get(src..src + 4096)
                    .context("page out of the image")?,
            );
            if let Some(first) = page.first_mut() {
                *first ^= 0xFF;
            }
            memfd
                .write_all_at(&page, b * PAGE)
                .context("writing guest memory")?;
            packed.write_all(&page).context("writing dirty.bin")?;
        }
    }
    packed.flush().context("writing dirty.bin")?;
    Ok(())
}

/// Runs the floor tool once: `argv... IN -o OUT` for zstd, `argv... IN OUT` otherwise.
fn run_tool(argv: &[&str], input: &Path, out: &Path, zstd: bool) -> anyhow::Result<()> {
    let (prog, rest) = argv.split_first().context("empty command")?;
    let mut cmd = Command::new(prog);
    cmd.args(rest).arg(input);
    if zstd {
        cmd.arg("-o");
    }
    cmd.arg(out);
    let status = cmd.status().with_context(|| format!("running {prog}"))?;
    ensure!(status.success(), "{prog} failed: {status}");
    Ok(())
}

/// Runs the floor tool once on `input` (into `out`, removed first): wall seconds, and the CPU
/// seconds (user + system) of the tool and its children.
fn time_tool(argv: &[&str], input: &Path, out: &Path, zstd: bool) -> anyhow::Result<(f64, f64)> {
    let _ = std::fs::remove_file(out);
    let cpu0 = cpu_seconds(true)?;
    let t0 = Instant::now();
    run_tool(argv, input, out, zstd)?;
    let t = t0.elapsed().as_secs_f64();
    Ok((t, cpu_seconds(true)? - cpu0))
}

/// CPU seconds (user + system) of this process (all threads), or of its waited-for children,
/// from `/proc/self/stat` (in USER_HZ, 100 per second on Linux: 10 ms resolution).
fn cpu_seconds(children: bool) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/self/stat has no command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14-17 of the line: 11-14 after the name (state
    // is field 3, index 0 here).
    let (a, b) = if children { (13, 14) } else { (11, 12) };
    let ticks = |i: usize| -> anyhow::Result<f64> {
        let v: u64 = fields
            .get(i)
            .context("/proc/self/stat is short")?
            .parse()
            .context("/proc/self/stat field")?;
        #[expect(clippy::cast_precision_loss, reason = "CPU ticks, far below 2^52")]
        Ok(v as f64 / 100.0)
    };
    Ok(ticks(a)? + ticks(b)?)
}

/// `(endpoint, bucket)` of a `gs://bucket/...?endpoint=URL` store URL.
fn gcs_upload_target(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("gs://")?;
    let (path, query) = rest.split_once('?')?;
    let bucket = path.split('/').next()?.to_owned();
    let ep = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("endpoint="))?
        .to_owned();
    Some((ep, bucket))
}

/// Seconds for one `curl` media upload of `file` into `bucket` at `ep`.
fn curl_upload(ep: &str, bucket: &str, file: &Path) -> anyhow::Result<f64> {
    let name = format!("upload-floor-{}", BuildId::new_v4());
    let url = format!("{ep}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}");
    let t0 = Instant::now();
    let out = Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "-X", "POST", "--data-binary"])
        .arg(format!("@{}", file.display()))
        .args(["-H", "Content-Type: application/octet-stream", &url])
        .status()
        .context("running curl")?;
    let t = t0.elapsed().as_secs_f64();
    ensure!(out.success(), "curl upload to {url} failed: {out}");
    Ok(t)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
