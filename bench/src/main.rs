//! thaw-bench: test-data generation and benchmarks for thaw.
//!
//! - `thaw-bench gen`: a layered chain in e2b's layout plus the flattened image of every layer.
//! - `thaw-bench codec`: frame decode/encode throughput against the `zstd` and `lz4` CLIs.
//! - `thaw-bench engine`: e2b's chunker benchmarks (random access, cold concurrent reads, cache
//!   hits, bookkeeping) against the engine, beside e2b's figures.
//! - `thaw-bench stream`: a store's raw read throughput (one whole-object stream, then sequential
//!   ranged pieces), without the engine.
//! - `thaw-bench uffd`: the UFFD fault path (warm 4 KiB / 2 MiB faults vs a minimal handler, cold
//!   image touch with and without prefetch).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod codec_bench;
mod engine_bench;
mod export_mem;
mod gen_cmd;
mod stream_cmd;
mod uffd_bench;
mod uffd_sys;

/// thaw's benchmark harness and test-data generator.
#[derive(Debug, Parser)]
#[command(name = "thaw-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a base build plus N diff layers in e2b's layout, and the flattened image of
    /// every layer (the truth every read is compared with).
    Gen(gen_cmd::GenArgs),
    /// Frame codec throughput: our zstd/LZ4 decode and encode vs the `zstd` and `lz4` CLIs on the
    /// same data, in the same run.
    Codec(codec_bench::CodecBenchArgs),
    /// The engine under e2b's chunker benchmarks (simulated GCS/NFS): random access, cold
    /// concurrent reads per codec, cache hits, bookkeeping memory; e2b's figures beside ours.
    Engine(Box<engine_bench::EngineBenchArgs>),
    /// A store's raw read throughput, without the engine: one whole-object read_stream, then
    /// sequential ranged pieces.
    Stream(stream_cmd::StreamArgs),
    /// The UFFD fault path: warm 4 KiB and 2 MiB faults vs a minimal handler, and a cold image
    /// touch through the simulated store and file://, with and without prefetch.
    Uffd(Box<uffd_bench::UffdBenchArgs>),
    /// Export of guest memory at pause: a memfd with dirty pages stored as a memfile layer per
    /// codec and store, against the zstd / lz4 CLIs (or cp) on the same dirty bytes.
    ExportMem(Box<export_mem::ExportMemArgs>),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Gen(args) => gen_cmd::run(args),
        Command::Codec(args) => codec_bench::run(args),
        Command::Engine(args) => engine_bench::run(args),
        Command::Stream(args) => stream_cmd::run(args),
        Command::Uffd(args) => uffd_bench::run(args),
        Command::ExportMem(args) => export_mem::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
