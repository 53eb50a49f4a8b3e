//! thaw-bench: test-data generation and benchmarks for thaw.
//!
//! - `thaw-bench gen`: a layered chain in e2b's layout plus the flattened image of every layer.
//! - `thaw-bench codec`: frame decode/encode throughput against the `zstd` and `lz4` CLIs.
//! - `thaw-bench engine`: e2b's chunker benchmarks (random access, cold concurrent reads, cache
//!   hits, bookkeeping) against the engine, beside e2b's figures.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod codec_bench;
mod engine_bench;
mod gen_cmd;

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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
