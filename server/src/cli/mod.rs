//! The `thaw` command line: argument definitions (clap derive) and the subcommands.

use std::io::Read;

use anyhow::bail;
use clap::{Parser, Subcommand};
use thaw_codec::{CompressionType, FileKind};

use crate::store::Store;

pub mod compress;
pub mod ctl;
pub mod demo;
pub mod engine_args;
pub mod inspect;
pub mod read;
pub mod serve;
pub mod uffd;

/// thaw serves VM snapshot images (e2b's layered build format) lazily.
#[derive(Debug, Parser)]
#[command(name = "thaw", version, propagate_version = true)]
#[command(
    after_help = "Stores are named by URL: file:///abs/dir, a plain directory path,\n\
gs://bucket/prefix (Google Cloud Storage), s3://bucket/prefix (S3 and S3-compatible stores), or\n\
sim:ttfb=20ms,bw=100MB/s,inner=URL (a simulated object store).\n\
gs:// credentials: THAW_GCS_TOKEN (a bearer token), else GOOGLE_APPLICATION_CREDENTIALS, gcloud's\n\
application-default credentials or the metadata server; STORAGE_EMULATOR_HOST=http://HOST:PORT\n\
(or ?endpoint=URL) names an emulator, used without credentials. HTTP deadlines and retries:\n\
URL parameters (gs://b/p?connect-timeout=5s&first-byte-timeout=10s&idle-timeout=10s&budget=25s\n\
&attempts=10&backoff-base=50ms&backoff-max=2s, the defaults) or THAW_HTTP_CONNECT_TIMEOUT, ...;\n\
uploads: ?part-size=16MiB&upload-concurrency=4, ?upload=xml|compose|resumable (the XML multipart\n\
upload, default for the real service; compose parts; a JSON resumable session in 64MiB chunks,\n\
default with an emulator) and ?xml-endpoint=URL.\n\
s3://: credentials AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (none: unsigned\n\
requests); ?endpoint=http://HOST:PORT (MinIO, R2, moto...; else AWS_ENDPOINT_URL_S3 or\n\
AWS_ENDPOINT_URL; default AWS), ?region=R (else AWS_REGION, AWS_DEFAULT_REGION, us-east-1),\n\
?path-style=true|false (default: true with an endpoint, else virtual-host), and the same\n\
deadline, retry and upload parameters (part-size at least 5MiB). See docs/object-storage.md.\n\
Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=thaw_server=debug) for more."
)]
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing buys nothing"
)]
pub enum Command {
    /// Turn an uncompressed build into a framed, compressed one (zstd or LZ4).
    #[command(long_about = compress::LONG_ABOUT, after_help = compress::AFTER_HELP)]
    Compress(compress::CompressArgs),
    /// Show a build's header, builds section, mappings and frames; optionally verify its data.
    #[command(long_about = inspect::LONG_ABOUT)]
    Inspect(inspect::InspectArgs),
    /// Read a build file (or a range) through the engine and its cache tiers.
    #[command(long_about = read::LONG_ABOUT)]
    Read(read::ReadArgs),
    /// Build a small layered, compressed ext4 image and serve it over NBD (the quick start).
    #[command(long_about = demo::LONG_ABOUT)]
    Demo(demo::DemoArgs),
    /// Serve build files over NBD (unix sockets, TCP) with a copy-on-write overlay.
    #[command(long_about = serve::LONG_ABOUT, after_help = serve::AFTER_HELP)]
    Serve(serve::ServeArgs),
    /// Serve a VM's memory to Firecracker (UFFD snapshot backend) from a build's memfile.
    #[command(long_about = uffd::LONG_ABOUT)]
    Uffd(uffd::UffdArgs),
    /// Control a running `thaw serve --control PATH`: list exports, snapshot one (pause).
    #[command(long_about = ctl::LONG_ABOUT)]
    Ctl(ctl::CtlArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Compress(args) => compress::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Read(args) => read::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Uffd(args) => uffd::run(&args),
        Command::Ctl(args) => ctl::run(&args),
    }
}

/// Which build files a command works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileSelection {
    /// One file.
    One(FileKind),
    /// Both files (an absent one is skipped).
    All,
}

impl FileSelection {
    /// The files selected, rootfs first.
    pub fn files(self) -> Vec<FileKind> {
        match self {
            Self::One(f) => vec![f],
            Self::All => FileKind::ALL.to_vec(),
        }
    }
}

/// Parses `rootfs.ext4` (or `rootfs`), `memfile` or `all`.
pub fn parse_file_selection(s: &str) -> Result<FileSelection, String> {
    if s == "all" {
        return Ok(FileSelection::All);
    }
    s.parse::<FileKind>()
        .map(FileSelection::One)
        .map_err(|_| format!("{s:?} is not one of rootfs.ext4, memfile, all"))
}

/// A codec and its level, from `zstd:LEVEL`, `zstd` (level 2), `lz4` or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecArg {
    /// The codec.
    pub codec: CompressionType,
    /// The zstd level (0 for the others).
    pub level: i32,
}

impl std::fmt::Display for CodecArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.codec {
            CompressionType::Zstd => write!(f, "zstd:{}", self.level),
            CompressionType::Lz4 => f.write_str("lz4"),
            CompressionType::None => f.write_str("none"),
        }
    }
}

/// Parses a codec argument: `zstd:LEVEL` (1..=22), `zstd` (= `zstd:2`), `lz4`, `none`.
pub fn parse_codec(s: &str) -> Result<CodecArg, String> {
    let (name, level) = match s.split_once(':') {
        Some((n, l)) => (n, Some(l)),
        None => (s, None),
    };
    match (name, level) {
        ("zstd", None) => Ok(CodecArg {
            codec: CompressionType::Zstd,
            level: 2,
        }),
        ("zstd", Some(l)) => match l.parse::<i32>() {
            Ok(level) if (1..=22).contains(&level) => Ok(CodecArg {
                codec: CompressionType::Zstd,
                level,
            }),
            _ => Err(format!("zstd level {l:?} is not a number in 1..=22")),
        },
        ("lz4", None) => Ok(CodecArg {
            codec: CompressionType::Lz4,
            level: 0,
        }),
        ("none", None) => Ok(CodecArg {
            codec: CompressionType::None,
            level: 0,
        }),
        _ => Err(format!("{s:?} is not one of zstd:LEVEL, zstd, lz4, none")),
    }
}

/// Parses a size: plain bytes (`4096`) or a number with a binary unit (`4KiB`, `2MiB`, `1GiB`;
/// `K`, `M`, `G`, `KB`... are read as binary units too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 2MiB, 4KiB, 65536)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{s:?} has an unknown unit (use KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A [`Read`] over a byte range of a store object (4 MiB range reads).
#[derive(Debug)]
pub struct StoreReader<'a> {
    store: &'a dyn Store,
    key: String,
    pos: u64,
    end: u64,
}

impl<'a> StoreReader<'a> {
    /// Reads `[0, len)` of object `key`.
    pub fn new(store: &'a dyn Store, key: String, len: u64) -> Self {
        Self {
            store,
            key,
            pos: 0,
            end: len,
        }
    }
}

impl Read for StoreReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        const MAX_READ: u64 = 4 * 1024 * 1024;
        let left = self.end.saturating_sub(self.pos);
        let want = u64::try_from(buf.len())
            .unwrap_or(u64::MAX)
            .min(left)
            .min(MAX_READ);
        let n = usize::try_from(want).map_err(std::io::Error::other)?;
        if n == 0 {
            return Ok(0);
        }
        self.store
            .read_range(&self.key, self.pos, &mut buf[..n])
            .map_err(std::io::Error::other)?;
        self.pos += want;
        Ok(n)
    }
}

/// Copies object `key` from `src` to `dst` (streamed; keeps the `uncompressed-size` metadata).
pub fn copy_object(src: &dyn Store, dst: &dyn Store, key: &str) -> anyhow::Result<u64> {
    let info = src.stat(key)?;
    let opts = match info.uncompressed_size {
        Some(u) => crate::store::PutOptions::with_uncompressed_size(u),
        None => crate::store::PutOptions::default(),
    };
    let mut writer = dst.create(key, &opts)?;
    let mut reader = StoreReader::new(src, key.to_owned(), info.size);
    let copied = std::io::copy(&mut reader, &mut writer)?;
    if copied != info.size {
        bail!(
            "{}: {key}: copied {copied} of {} bytes",
            src.url(),
            info.size
        );
    }
    writer.commit()?;
    Ok(copied)
}

/// Mebibytes, for messages.
pub(crate) fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2MiB"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("2XB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }

    #[test]
    fn codecs() {
        assert_eq!(
            parse_codec("zstd:3"),
            Ok(CodecArg {
                codec: CompressionType::Zstd,
                level: 3
            })
        );
        assert_eq!(
            parse_codec("lz4").map(|c| c.codec),
            Ok(CompressionType::Lz4)
        );
        assert_eq!(
            parse_codec("none").map(|c| c.codec),
            Ok(CompressionType::None)
        );
        assert!(parse_codec("zstd:0").is_err());
        assert!(parse_codec("lz4:1").is_err());
        assert!(parse_codec("gzip").is_err());
    }

    #[test]
    fn file_selection() {
        assert_eq!(parse_file_selection("all"), Ok(FileSelection::All));
        assert_eq!(
            parse_file_selection("rootfs.ext4"),
            Ok(FileSelection::One(FileKind::Rootfs))
        );
        assert!(parse_file_selection("disk").is_err());
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
