//! `thaw-bench codec`: frame codec throughput, compared with the reference `zstd` and `lz4` CLIs
//! on the same data in the same run.
//!
//! The data is ~3x compressible (a seeded mix of random, zero, repeated-pattern and low-entropy
//! 4 KiB pages, like a guest memory image), split into frames of `--frame-kib` (2 MiB, e2b's
//! default). Measured:
//!
//! - decode: uncompressed bytes per second of [`FrameDecoder::decode`] on one thread into an
//!   exact-size reused buffer, fastest of repeated passes over all frames;
//! - the CLIs' own benchmark modes on the same file cut into the same frame size
//!   (`zstd -b1 -e3 -B<frame>`, `lz4 -b1 -B<frame>`), and the ratio ours / CLI for decoding;
//! - compression throughput with 1 and 2 worker threads, and the compression ratio.
//!
//! Throughput is in MB/s with MB = 10^6 bytes, as the zstd and lz4 CLIs print it.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use thaw_codec::{CompressionType, FrameDecoder, FrameEncoder};

/// Arguments of `thaw-bench codec`.
#[derive(Debug, Clone, clap::Args)]
pub struct CodecBenchArgs {
    /// Size of the generated data, MiB.
    #[arg(long, default_value_t = 96)]
    pub size_mib: usize,
    /// Frame size, KiB (e2b's default is 2048).
    #[arg(long, default_value_t = 2048)]
    pub frame_kib: usize,
    /// Seed of the data generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Minimum time spent measuring each decode figure, seconds (the fastest pass is reported).
    #[arg(long, default_value_t = 1.0)]
    pub min_secs: f64,
    /// Minimum evaluation time given to the CLI benchmarks (`-i`), seconds.
    #[arg(long, default_value_t = 1)]
    pub cli_secs: u32,
    /// Skip the zstd / lz4 CLI comparison.
    #[arg(long)]
    pub no_cli: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One codec configuration.
#[derive(Debug, Clone, Copy)]
struct Codec {
    compression: CompressionType,
    level: i32,
}

impl Codec {
    fn name(self) -> String {
        match self.compression {
            CompressionType::Zstd => format!("zstd-{}", self.level),
            CompressionType::Lz4 => "lz4".to_string(),
            CompressionType::None => "none".to_string(),
        }
    }
}

const CODECS: [Codec; 4] = [
    Codec {
        compression: CompressionType::Zstd,
        level: 1,
    },
    Codec {
        compression: CompressionType::Zstd,
        level: 2,
    },
    Codec {
        compression: CompressionType::Zstd,
        level: 3,
    },
    Codec {
        compression: CompressionType::Lz4,
        level: 0,
    },
];

/// Results for one codec.
#[derive(Debug, Clone, Serialize)]
struct CodecResult {
    codec: String,
    uncompressed_bytes: u64,
    compressed_bytes: u64,
    ratio: f64,
    compress_mbps_1t: f64,
    compress_mbps_2t: f64,
    decode_mbps: f64,
    decode_passes: u32,
    cli_compress_mbps: Option<f64>,
    cli_decode_mbps: Option<f64>,
    cli_ratio: Option<f64>,
    decode_vs_cli: Option<f64>,
}

/// Everything `--json` writes.
#[derive(Debug, Serialize)]
struct Report {
    data_bytes: u64,
    frame_bytes: u64,
    frames: usize,
    seed: u64,
    mb: &'static str,
    zstd_cli: Option<String>,
    lz4_cli: Option<String>,
    zstd_cli_command: String,
    lz4_cli_command: String,
    results: Vec<CodecResult>,
}

/// Runs the codec benchmark: prints a Markdown table, optionally writes JSON.
pub fn run(args: &CodecBenchArgs) -> anyhow::Result<()> {
    if args.size_mib == 0 || args.frame_kib == 0 {
        bail!("--size-mib and --frame-kib must be positive");
    }
    let size = args
        .size_mib
        .checked_mul(1 << 20)
        .context("--size-mib too large")?;
    let frame = args
        .frame_kib
        .checked_mul(1 << 10)
        .context("--frame-kib too large")?;
    eprintln!(
        "codec bench: generating {} MiB (seed {}), {} KiB frames",
        args.size_mib, args.seed, args.frame_kib
    );
    let data = generate(args.seed, size);
    let frames: Vec<&[u8]> = data.chunks(frame).collect();
    let min = Duration::from_secs_f64(args.min_secs.max(0.0));

    let file = if args.no_cli {
        None
    } else {
        let mut f = tempfile::NamedTempFile::new().context("temp file for the CLI benchmarks")?;
        f.write_all(&data)?;
        f.flush()?;
        Some(f)
    };
    let zstd_cmd = format!("zstd -q -b1 -e3 -B{frame} -i{} <data>", args.cli_secs);
    let lz4_cmd = format!("lz4 -q -b1 -B{frame} -i{} <data>", args.cli_secs);
    let (zstd_cli, lz4_cli) = match &file {
        Some(f) => {
            eprintln!("codec bench: {zstd_cmd}");
            let z = cli_bench(
                "zstd",
                &["-q", "-b1", "-e3"],
                frame,
                args.cli_secs,
                f.path(),
            );
            eprintln!("codec bench: {lz4_cmd}");
            let l = cli_bench("lz4", &["-q", "-b1"], frame, args.cli_secs, f.path());
            (report_cli("zstd", z), report_cli("lz4", l))
        }
        None => (None, None),
    };

    let mut results = Vec::new();
    for codec in CODECS {
        eprintln!("codec bench: {}", codec.name());
        let (encoded, c1) = compress_all(codec, &frames)?;
        let c2 = compress_parallel(codec, &frames, 2)?;
        let compressed: u64 = encoded.iter().map(|f| f.len() as u64).sum();
        let (decode_mbps, passes) = decode_bench(codec, &encoded, &frames, min)?;
        let cli = match codec.compression {
            CompressionType::Zstd => zstd_cli.as_ref().and_then(|c| c.1.get(&codec.level)),
            CompressionType::Lz4 => lz4_cli.as_ref().and_then(|c| c.1.get(&1)),
            CompressionType::None => None,
        }
        .copied();
        let total = data.len() as u64;
        results.push(CodecResult {
            codec: codec.name(),
            uncompressed_bytes: total,
            compressed_bytes: compressed,
            ratio: ratio(total, compressed),
            compress_mbps_1t: mbps(total, c1),
            compress_mbps_2t: mbps(total, c2),
            decode_mbps,
            decode_passes: passes,
            cli_compress_mbps: cli.map(|c| c.compress_mbps),
            cli_decode_mbps: cli.map(|c| c.decode_mbps),
            cli_ratio: cli.map(|c| c.ratio),
            decode_vs_cli: cli.map(|c| decode_mbps / c.decode_mbps),
        });
    }

    let report = Report {
        data_bytes: data.len() as u64,
        frame_bytes: frame as u64,
        frames: frames.len(),
        seed: args.seed,
        mb: "10^6 bytes",
        zstd_cli: zstd_cli.map(|c| c.0),
        lz4_cli: lz4_cli.map(|c| c.0),
        zstd_cli_command: zstd_cmd,
        lz4_cli_command: lz4_cmd,
        results,
    };
    print_markdown(&report);
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("codec bench: wrote {}", path.display());
    }
    Ok(())
}

/// ~3x-compressible data: 4 KiB pages, each random (incompressible), zero, a repeated short
/// pattern, or low-entropy bytes (16-symbol alphabet: entropy coders halve it, LZ matchers don't).
pub(crate) fn generate(seed: u64, size: usize) -> Vec<u8> {
    const PAGE: usize = 4096;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut data = vec![0u8; size];
    for page in data.chunks_mut(PAGE) {
        match rng.random_range(0..100u32) {
            // Random.
            0..24 => rng.fill_bytes(page),
            // Zero.
            24..56 => {}
            // A repeated pattern of 8..64 bytes.
            56..88 => {
                let mut pat = [0u8; 64];
                let plen = rng.random_range(8..=64usize);
                let pat = pat.get_mut(..plen).unwrap_or_default();
                rng.fill_bytes(pat);
                for (b, p) in page.iter_mut().zip(pat.iter().cycle()) {
                    *b = *p;
                }
            }
            // Low entropy: nibble-valued bytes.
            _ => {
                rng.fill_bytes(page);
                for b in page.iter_mut() {
                    *b &= 0x0F;
                }
            }
        }
    }
    data
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    let secs = d.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / secs / 1e6
    } else {
        0.0
    }
}

fn ratio(u: u64, c: u64) -> f64 {
    if c == 0 { 0.0 } else { u as f64 / c as f64 }
}

/// Compresses every frame on this thread; returns the frames and the time taken.
fn compress_all(codec: Codec, frames: &[&[u8]]) -> anyhow::Result<(Vec<Vec<u8>>, Duration)> {
    let mut enc = FrameEncoder::new(codec.compression, codec.level)?;
    let mut out = Vec::with_capacity(frames.len());
    let start = Instant::now();
    for f in frames {
        let mut buf = Vec::with_capacity(f.len() / 2);
        enc.encode(f, &mut buf)?;
        out.push(buf);
    }
    Ok((out, start.elapsed()))
}

/// Compresses every frame with `threads` workers (frames dealt round-robin, one encoder per
/// worker); returns the wall time.
fn compress_parallel(codec: Codec, frames: &[&[u8]], threads: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> anyhow::Result<u64> {
                    let mut enc = FrameEncoder::new(codec.compression, codec.level)?;
                    let mut buf = Vec::new();
                    let mut total = 0u64;
                    for f in frames.iter().skip(t).step_by(threads) {
                        buf.clear();
                        total += enc.encode(f, &mut buf)? as u64;
                    }
                    Ok(total)
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("compression worker panicked"))??;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    Ok(start.elapsed())
}

/// Decodes all frames repeatedly for at least `min` (and at least 3 passes), into one reused
/// exact-size buffer; returns the fastest pass's MB/s and the pass count. The first pass also
/// verifies the output.
fn decode_bench(
    codec: Codec,
    encoded: &[Vec<u8>],
    frames: &[&[u8]],
    min: Duration,
) -> anyhow::Result<(f64, u32)> {
    let mut dec = FrameDecoder::new();
    let max = frames.iter().map(|f| f.len()).max().unwrap_or(0);
    let mut buf = vec![0u8; max];
    let total: u64 = frames.iter().map(|f| f.len() as u64).sum();
    for (e, f) in encoded.iter().zip(frames) {
        let dst = buf.get_mut(..f.len()).context("buffer")?;
        dec.decode(codec.compression, e, dst)?;
        if dst != *f {
            bail!("{}: decoded frame differs from the input", codec.name());
        }
    }
    let mut best = Duration::MAX;
    let mut passes = 0u32;
    let started = Instant::now();
    while passes < 3 || started.elapsed() < min {
        let t = Instant::now();
        for (e, f) in encoded.iter().zip(frames) {
            let dst = buf.get_mut(..f.len()).context("buffer")?;
            dec.decode(codec.compression, e, dst)?;
        }
        best = best.min(t.elapsed());
        passes += 1;
    }
    Ok((mbps(total, best), passes))
}

/// One level's line of a CLI benchmark.
#[derive(Debug, Clone, Copy)]
struct CliResult {
    ratio: f64,
    compress_mbps: f64,
    decode_mbps: f64,
}

type CliResults = std::collections::BTreeMap<i32, CliResult>;

/// Runs `tool <args> -B<frame> -i<secs> <file>` and parses its `-q` result lines:
/// `-1      8009902 (1.003) 2105.26 MB/s 8721.9 MB/s  name`. Returns the version banner too.
fn cli_bench(
    tool: &str,
    args: &[&str],
    frame: usize,
    secs: u32,
    file: &std::path::Path,
) -> anyhow::Result<(String, CliResults)> {
    let out = Command::new(tool)
        .args(args)
        .arg(format!("-B{frame}"))
        .arg(format!("-i{secs}"))
        .arg(file)
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        bail!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut banner = String::new();
    let mut results = CliResults::new();
    for line in text.split(['\n', '\r']) {
        let line = line.trim();
        if line.starts_with("bench ") && banner.is_empty() {
            banner = format!("{tool} {line}");
        }
        if let Some((level, r)) = parse_cli_line(line) {
            results.insert(level, r);
        }
    }
    if results.is_empty() {
        bail!("no results parsed from {tool}'s output: {text}");
    }
    Ok((banner, results))
}

/// Parses `-3  33554432 (3.000) 500.1 MB/s 1500.2 MB/s  name`.
fn parse_cli_line(line: &str) -> Option<(i32, CliResult)> {
    let mut it = line.split_whitespace();
    let level: i32 = it.next()?.strip_prefix('-')?.parse().ok()?;
    let _csize: u64 = it.next()?.parse().ok()?;
    let ratio: f64 = it
        .next()?
        .trim_start_matches('(')
        .trim_end_matches(')')
        .parse()
        .ok()?;
    let compress_mbps: f64 = it.next()?.parse().ok()?;
    (it.next()? == "MB/s").then_some(())?;
    let decode_mbps: f64 = it.next()?.parse().ok()?;
    (it.next()? == "MB/s").then_some(())?;
    Some((
        level,
        CliResult {
            ratio,
            compress_mbps,
            decode_mbps,
        },
    ))
}

fn report_cli(tool: &str, r: anyhow::Result<(String, CliResults)>) -> Option<(String, CliResults)> {
    match r {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("codec bench: {tool} CLI comparison skipped: {e:#}");
            None
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

fn print_markdown(r: &Report) {
    println!(
        "codec benchmark: {} MiB in {} frames of {} KiB (seed {}); MB/s = 10^6 bytes/s of \
         uncompressed data; decode = fastest pass, one thread, exact-size reused buffer",
        r.data_bytes >> 20,
        r.frames,
        r.frame_bytes >> 10,
        r.seed
    );
    if let Some(z) = &r.zstd_cli {
        println!("CLI: {z}: `{}`", r.zstd_cli_command);
    }
    if let Some(l) = &r.lz4_cli {
        println!("CLI: {l}: `{}`", r.lz4_cli_command);
    }
    println!();
    println!(
        "| codec | ratio | compress 1T MB/s | compress 2T MB/s | decode MB/s | CLI ratio | CLI compress MB/s | CLI decode MB/s | decode ours/CLI |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in &r.results {
        println!(
            "| {} | {:.3} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
            c.codec,
            c.ratio,
            c.compress_mbps_1t,
            c.compress_mbps_2t,
            c.decode_mbps,
            opt(c.cli_ratio, 3),
            opt(c.cli_compress_mbps, 0),
            opt(c.cli_decode_mbps, 0),
            opt(c.decode_vs_cli, 2),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cli_lines() {
        let (level, r) =
            parse_cli_line("-1      8009902 (1.003) 2105.26 MB/s 8721.9 MB/s  cb.bin").unwrap();
        assert_eq!(level, 1);
        assert!((r.ratio - 1.003).abs() < 1e-9);
        assert!((r.compress_mbps - 2105.26).abs() < 1e-9);
        assert!((r.decode_mbps - 8721.9).abs() < 1e-9);
        assert!(parse_cli_line("bench 1.5.4 : input 8031957 bytes, 1 seconds").is_none());
        assert!(parse_cli_line("").is_none());
    }

    #[test]
    fn data_is_deterministic_and_compressible() {
        let a = generate(7, 1 << 20);
        assert_eq!(a, generate(7, 1 << 20));
        assert_ne!(a, generate(8, 1 << 20));
        let (enc, _) = compress_all(CODECS[0], &[&a[..]]).unwrap();
        let r = ratio(a.len() as u64, enc[0].len() as u64);
        assert!((2.0..5.0).contains(&r), "ratio {r}");
    }
}
