//! `thaw read`: read a build file (or a range of it) through the engine: the lazy, cached,
//! layered read path the NBD and UFFD servers use, with its cache tiers.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use thaw_codec::{BuildId, FileKind};

use super::engine_args::EngineArgs;
use super::{mib, parse_size};
use crate::engine::{load_prefetch_plan, prefetch_offsets};

/// Help text.
pub const LONG_ABOUT: &str = "Read a build file through the engine: every 4 KiB resolved through \
the header to the build that holds it, fetched once per frame (compressed) or 4 MiB chunk, \
decoded straight into the cache, and written to --output. With --cache-dir / --shared-cache the \
fetched frames and chunks are kept for the next process (e2b's shared cache layout). Prints \
what was fetched from where to stderr.";

/// `thaw read` options.
#[derive(Debug, Args)]
pub struct ReadArgs {
    #[command(flatten)]
    pub engine: EngineArgs,

    /// The build id (a UUID).
    #[arg(long)]
    pub build: BuildId,

    /// The file: rootfs.ext4 (or rootfs) or memfile.
    #[arg(long, default_value = "rootfs.ext4")]
    pub file: FileKind,

    /// First byte to read.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub offset: u64,

    /// Bytes to read (default: to the end of the file).
    #[arg(long, value_parser = parse_size)]
    pub length: Option<u64>,

    /// Where to write the bytes (`-` for stdout). Without it, the bytes are read and dropped
    /// (a cache warm-up, or a measurement).
    #[arg(long, short)]
    pub output: Option<String>,

    /// Before reading, warm the memfile from the build's recorded prefetch plan
    /// (metadata.json prefetch.memory), in the background, while the read proceeds.
    #[arg(long)]
    pub prefetch: bool,

    /// Read size of each request.
    #[arg(long, default_value = "4MiB", value_parser = parse_size)]
    pub chunk: u64,
}

/// Runs `thaw read`.
pub fn run(args: &ReadArgs) -> anyhow::Result<()> {
    let engine = args.engine.engine()?;
    let file = Arc::new(
        engine
            .open(args.build, args.file)
            .with_context(|| format!("opening build {} ({})", args.build, args.file))?,
    );
    let size = file.size();
    let end = match args.length {
        Some(len) => args.offset.checked_add(len).context("range overflows")?,
        None => size,
    };
    if args.offset > end || end > size {
        anyhow::bail!(
            "range [{}, {end}) is outside the file of {size} bytes",
            args.offset
        );
    }
    let prefetch = if args.prefetch {
        match load_prefetch_plan(engine.meta_store().as_ref(), args.build)? {
            Some(plan) => {
                eprintln!(
                    "prefetch: {} blocks of {} bytes from metadata.json",
                    plan.indices.len(),
                    plan.block_size
                );
                Some(prefetch_offsets(
                    Arc::clone(&file),
                    plan.indices,
                    plan.block_size,
                    engine.config().prefetch_concurrency,
                ))
            }
            None => {
                eprintln!("prefetch: build {} has no recorded plan", args.build);
                None
            }
        }
    } else {
        None
    };
    let mut out: Option<Box<dyn Write>> = match args.output.as_deref() {
        None => None,
        Some("-") => Some(Box::new(std::io::BufWriter::new(std::io::stdout().lock()))),
        Some(path) => Some(Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {path}"))?,
        ))),
    };
    let started = Instant::now();
    let step = args.chunk.clamp(4096, 64 << 20);
    let mut buf = vec![0u8; usize::try_from(step)?];
    let mut pos = args.offset;
    while pos < end {
        let n = usize::try_from(step.min(end - pos))?;
        let piece = &mut buf[..n];
        file.read_at(pos, piece).with_context(|| {
            format!(
                "reading [{pos}, +{n}) of build {} ({})",
                args.build, args.file
            )
        })?;
        if let Some(w) = out.as_mut() {
            w.write_all(piece)?;
        }
        pos += n as u64;
    }
    if let Some(mut w) = out {
        w.flush()?;
    }
    let secs = started.elapsed().as_secs_f64();
    if let Some(p) = prefetch {
        let (done, failed) = p.join();
        eprintln!("prefetch: {done} blocks warmed, {failed} failed");
    }
    // Let background transfers and write-backs finish: a cut write-back loses the cached copy.
    if !engine.drain(engine.config().fetch_deadline) {
        tracing::warn!("fetches still in flight at exit; their write-backs are lost");
    }
    let s = engine.stats();
    let bytes = end - args.offset;
    eprintln!(
        "read {:.1} MiB in {secs:.3} s ({:.1} MiB/s); fetched {} sessions, {} store requests ({:.1} MiB), \
         {} from --cache-dir, {} from --shared-cache, {} written back, {} retries, {} errors",
        mib(bytes),
        mib(bytes) / secs.max(1e-9),
        s.sessions,
        s.store_requests,
        mib(s.store_bytes),
        s.cache_dir_hits,
        s.shared_cache_hits,
        s.writebacks,
        s.retries,
        s.fetch_errors,
    );
    Ok(())
}
