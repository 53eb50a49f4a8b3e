//! `thaw compress`: store an uncompressed build as a framed, compressed one.
//!
//! For each selected file of the build: read its header (`{build}/{file}.header`; a missing
//! header means an e2b legacy build and gets the synthetic V1 header), stream the plain data
//! object through the build writer into the destination store, and print a one-line summary.
//!
//! - A file whose header already has a compressed self entry is **skipped** (with a message):
//!   compressing twice would only re-encode the same bytes. When the destination is another
//!   store, such a file is copied there as is (data object, then header), so the destination
//!   holds a complete chain.
//! - `--recursive` first handles every ancestor build the mappings reference (deepest first,
//!   each once), so the ancestor entries written into child headers carry real frame tables.
//!   With `--to` another store, ancestors are copied/compressed there too, and each build's
//!   `snapfile` and `metadata.json` are copied when present.
//! - The plain data object is left in place in the source store (the new header points readers
//!   at the compressed object).

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use thaw_codec::names::{data_object, header_object, metadata_object, snapfile_object};
use thaw_codec::{BuildId, CompressionType, FileKind};

use super::{
    CodecArg, FileSelection, StoreReader, copy_object, mib, parse_codec, parse_file_selection,
    parse_size,
};
use crate::layout::{LoadedHeader, MAX_HEADER_LEN, load_header, self_entry};
use crate::store::{PutOptions, Store, open_store};
use crate::writer::{WriteOptions, store_build_file};

/// `--help` text of the subcommand.
pub const LONG_ABOUT: &str = "Compress a build: reads {build}/{file}.header (or synthesises e2b's legacy header when \
it is missing) and the plain data object, and stores the data as independently decodable frames \
({build}/{file}.zstd or .lz4) followed by a V4/V5 header whose builds section holds the frame table \
and the SHA-256 of the uncompressed data.\n\n\
A file whose header already has a compressed self entry is skipped (copied as is when --to names \
another store). The plain object is left in place.";
/// Text after `--help`.
pub const AFTER_HELP: &str = "Example:\n  thaw compress --store /srv/builds --build 2f6d3a52-8a3b-4c1e-9d7f-0123456789ab \\\n      --codec zstd:2 --recursive";

/// Arguments of `thaw compress`.
#[derive(Debug, Args)]
pub struct CompressArgs {
    /// Store holding the build (file:///abs/dir, a directory path, gs://bucket/prefix or
    /// s3://bucket/prefix).
    #[arg(long, env = "THAW_STORE")]
    pub store: String,
    /// Build id (UUID).
    #[arg(long)]
    pub build: BuildId,
    /// Which file: rootfs.ext4, memfile, or all (an absent file is then skipped).
    #[arg(long, default_value = "all", value_parser = parse_file_selection)]
    pub file: FileSelection,
    /// Codec: zstd:LEVEL (1..=22; e2b uses 1..=4), zstd (= zstd:2), lz4, or none.
    #[arg(long, value_parser = parse_codec)]
    pub codec: CodecArg,
    /// Uncompressed bytes per frame (2MiB, 4KiB, plain bytes); a multiple of the block size.
    #[arg(long, default_value = "2MiB", value_parser = parse_size)]
    pub frame_size: u64,
    /// First compress every uncompressed ancestor build the mappings reference (deepest first).
    #[arg(long)]
    pub recursive: bool,
    /// Destination store (default: the source store): file:///abs/dir, a directory path,
    /// gs://bucket/prefix or s3://bucket/prefix. Each data object is written (and committed) before its header.
    #[arg(long)]
    pub to: Option<String>,
    /// Frame encoding threads (default: the number of cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Header version to write.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(4..=5))]
    pub header_version: u16,
    /// Do not show a progress bar (it is only shown when stderr is a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
}

/// Runs `thaw compress`.
pub fn run(args: &CompressArgs) -> anyhow::Result<()> {
    let src = open_store(&args.store)?;
    let dst = match &args.to {
        Some(url) => open_store(url)?,
        None => Arc::clone(&src),
    };
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let mut job = Compressor {
        same_store: src.url() == dst.url(),
        src,
        dst,
        opts: WriteOptions {
            codec: args.codec.codec,
            level: args.codec.level,
            frame_size: args.frame_size,
            header_version: args.header_version,
            workers,
            progress: !args.no_progress,
        },
        codec: args.codec,
        recursive: args.recursive,
        done: HashSet::new(),
        active: Vec::new(),
        blobs_done: HashSet::new(),
    };
    let selection = args.file;
    let mut any = false;
    for file in selection.files() {
        let required = matches!(selection, FileSelection::One(_));
        any |= job.process(args.build, file, required)?;
    }
    if !any {
        bail!(
            "build {} has neither rootfs.ext4 nor memfile in {}",
            args.build,
            job.src.url()
        );
    }
    Ok(())
}

struct Compressor {
    src: Arc<dyn Store>,
    dst: Arc<dyn Store>,
    same_store: bool,
    opts: WriteOptions,
    codec: CodecArg,
    recursive: bool,
    done: HashSet<(BuildId, FileKind)>,
    /// The chain being descended (cycle detection).
    active: Vec<BuildId>,
    blobs_done: HashSet<BuildId>,
}

impl Compressor {
    /// Handles `file` of `build` (and, with `--recursive`, its ancestors first). Returns whether
    /// the file exists; a missing file is an error when `required`.
    fn process(&mut self, build: BuildId, file: FileKind, required: bool) -> anyhow::Result<bool> {
        if self.done.contains(&(build, file)) {
            return Ok(true);
        }
        if self.active.contains(&build) {
            bail!(
                "build {build} ({file}) references itself through its ancestors: {:?}",
                self.active
            );
        }
        let Some(loaded) = load_header(&*self.src, build, file)? else {
            if required {
                bail!(
                    "{}: build {build} has no {file} (neither {} nor {})",
                    self.src.url(),
                    header_object(build, file),
                    data_object(build, file, CompressionType::None)
                );
            }
            println!("{build}/{file}: absent, skipped");
            return Ok(false);
        };
        if self.recursive {
            self.active.push(build);
            let result = self.ancestors(&loaded, file);
            self.active.pop();
            result?;
        }
        self.store_file(build, file, &loaded)
            .with_context(|| format!("compressing build {build} {file}"))?;
        if !self.same_store {
            self.copy_blobs(build)?;
        }
        self.done.insert((build, file));
        Ok(true)
    }

    fn ancestors(&mut self, loaded: &LoadedHeader, file: FileKind) -> anyhow::Result<()> {
        let me = loaded.header.metadata.build_id;
        let mut seen = BTreeSet::new();
        let mut order = Vec::new();
        for m in &loaded.header.mappings {
            if !m.is_nil() && m.build_id != me && seen.insert(m.build_id) {
                order.push(m.build_id);
            }
        }
        for ancestor in order {
            self.process(ancestor, file, true)
                .with_context(|| format!("ancestor {ancestor} of build {me}"))?;
        }
        Ok(())
    }

    fn store_file(
        &mut self,
        build: BuildId,
        file: FileKind,
        loaded: &LoadedHeader,
    ) -> anyhow::Result<()> {
        let header = &loaded.header;
        if let Some(entry) = self_entry(header)
            && entry.frames.is_compressed()
        {
            let codec = entry.frames.compression().as_str();
            if self.same_store {
                println!("{build}/{file}: already compressed ({codec}), skipped");
            } else {
                let object = data_object(build, file, entry.frames.compression());
                copy_object(&*self.src, &*self.dst, &object)?;
                let key = header_object(build, file);
                let bytes = self.src.get(&key, MAX_HEADER_LEN)?;
                self.dst.put(&key, &bytes, &PutOptions::default())?;
                println!(
                    "{build}/{file}: already compressed ({codec}), copied to {}",
                    self.dst.url()
                );
            }
            return Ok(());
        }
        let object = data_object(build, file, CompressionType::None);
        let data_len = match self_entry(header) {
            Some(e) if e.size != 0 => e.size,
            _ => self.src.stat(&object)?.logical_size(),
        };
        let mut reader = StoreReader::new(&*self.src, object, data_len);
        let stored = store_build_file(&*self.dst, file, header, &mut reader, data_len, &self.opts)?;
        let secs = stored.elapsed.as_secs_f64().max(1e-9);
        let ratio = if stored.stored_size == 0 {
            1.0
        } else {
            stored.uncompressed_size as f64 / stored.stored_size as f64
        };
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{build}/{file}: {:.1} MiB -> {:.1} MiB ({ratio:.2}x), {} frames, {:.0} MB/s, {}",
            mib(stored.uncompressed_size),
            mib(stored.stored_size),
            stored.frames,
            stored.uncompressed_size as f64 / 1e6 / secs,
            self.codec,
        )?;
        Ok(())
    }

    /// Copies `snapfile` and `metadata.json` of `build` to the destination, once, when present.
    fn copy_blobs(&mut self, build: BuildId) -> anyhow::Result<()> {
        if !self.blobs_done.insert(build) {
            return Ok(());
        }
        for key in [snapfile_object(build), metadata_object(build)] {
            if self.src.exists(&key)? {
                copy_object(&*self.src, &*self.dst, &key)?;
                tracing::info!(%key, to = %self.dst.url(), "copied");
            }
        }
        Ok(())
    }
}
