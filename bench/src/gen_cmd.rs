//! `thaw-bench gen`: writes a layered chain and its flattened images.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use thaw_server::chain::{ChainSpec, generate};
use thaw_server::cli::{CodecArg, FileSelection, parse_codec, parse_file_selection, parse_size};
use thaw_server::store::open_store;
use thaw_server::writer::WriteOptions;

/// Arguments of `thaw-bench gen`.
#[derive(Debug, Args)]
pub struct GenArgs {
    /// Store to write the builds into (`file:///dir`).
    #[arg(long)]
    store: String,
    /// Diff layers on top of the base build.
    #[arg(long, default_value_t = 3)]
    layers: usize,
    /// Device size of each file (e.g. 64MiB).
    #[arg(long, value_parser = parse_size, default_value = "64MiB")]
    size: u64,
    /// Memfile block (page) size: 4096, or 2097152 for a hugepage guest. Rootfs blocks are always
    /// 4 KiB.
    #[arg(long, value_parser = parse_size, default_value = "4096")]
    block: u64,
    /// Codec of the stored data objects: zstd:LEVEL, lz4 or none.
    #[arg(long, value_parser = parse_codec, default_value = "none")]
    codec: CodecArg,
    /// Frame size of compressed data objects.
    #[arg(long, value_parser = parse_size, default_value = "2MiB")]
    frame_size: u64,
    /// Header format version to write: 3 (only with --codec none), 4 or 5. Default: 3 for
    /// uncompressed chains, 4 otherwise.
    #[arg(long)]
    header_version: Option<u16>,
    /// Which files each build has: rootfs.ext4, memfile or all.
    #[arg(long, value_parser = parse_file_selection, default_value = "all")]
    file: FileSelection,
    /// Seed of every random choice (same seed, same bytes).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fraction of blocks each diff layer rewrites.
    #[arg(long, default_value_t = 0.1)]
    dirty: f64,
    /// Fraction of blocks each layer turns into zeros.
    #[arg(long, default_value_t = 0.02)]
    zero: f64,
    /// Directory for the flattened images and chain.json (default for `file:///x/store`:
    /// `/x/store-expected`).
    #[arg(long)]
    expected: Option<PathBuf>,
    /// Encoder threads (default: all cores).
    #[arg(long)]
    workers: Option<usize>,
}

/// Runs `thaw-bench gen`.
pub fn run(args: &GenArgs) -> anyhow::Result<()> {
    let store = open_store(&args.store)?;
    let expected = match &args.expected {
        Some(dir) => dir.clone(),
        None => default_expected_dir(&args.store)
            .context("--expected is required when the store is not a local directory (file://)")?,
    };
    let header_version = args.header_version.unwrap_or(match args.codec.codec {
        thaw_codec::CompressionType::None => 3,
        _ => 4,
    });
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let spec = ChainSpec {
        layers: args.layers,
        size: args.size,
        memfile_block_size: args.block,
        files: args.file.files(),
        seed: args.seed,
        dirty_fraction: args.dirty,
        zero_fraction: args.zero,
        write: WriteOptions {
            codec: args.codec.codec,
            level: args.codec.level,
            frame_size: args.frame_size,
            header_version,
            workers,
            progress: false,
        },
    };
    let manifest = generate(store.as_ref(), &expected, &spec)?;
    for layer in &manifest.layers {
        let files: Vec<String> = layer
            .files
            .iter()
            .map(|(name, f)| {
                format!(
                    "{name}: {} mappings, {} diff bytes",
                    f.mappings, f.diff_bytes
                )
            })
            .collect();
        println!(
            "generation {} build {}  {}",
            layer.generation,
            layer.build_id,
            files.join("; ")
        );
    }
    if let Some(top) = manifest.top() {
        println!("top build: {}", top.build_id);
    }
    println!("expected images and chain.json: {}", expected.display());
    Ok(())
}

/// `/x/store-expected` for `file:///x/store` (or a plain path).
fn default_expected_dir(store: &str) -> Option<PathBuf> {
    let path = store.strip_prefix("file://").unwrap_or(store);
    if path.contains("://") {
        return None;
    }
    let dir = PathBuf::from(path);
    let name = dir.file_name()?.to_string_lossy().into_owned();
    Some(dir.parent()?.join(format!("{name}-expected")))
}
