//! `thaw inspect`: show a build file's header, builds section and mappings; `--verify` decodes
//! every frame of the build's own data and checks it against the header.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::io::{Read, Write};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use sha2::{Digest, Sha256};
use thaw_codec::names::data_object;
use thaw_codec::{BuildData, BuildId, CompressionType, FileKind, FrameDecoder, FrameTable, Header};

use super::{FileSelection, StoreReader, mib, parse_file_selection};
use crate::layout::{DataSource, decode_frame, load_header, resolve_source, self_entry};
use crate::store::{Store, open_store};

/// `--help` text of the subcommand.
pub const LONG_ABOUT: &str = "Inspect a build: header metadata (version, block size, size, generation, \
build ids), the builds section (size, SHA-256, codec, frames, ratio) and a mapping summary \
(entries, bytes per build, zero bytes and ranges).\n\n\
--verify decodes every frame of the build's own data object to its declared size, checks the \
SHA-256 of the uncompressed data against the header's self entry, and checks that every mapping \
lies inside the referenced build's data (where its size is known). The first failure exits \
non-zero with a message naming the build, file, frame index and offsets (or the mapping).";

/// Arguments of `thaw inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
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
    /// List every mapping.
    #[arg(long)]
    pub mappings: bool,
    /// List the frames of every build entry.
    #[arg(long)]
    pub frames: bool,
    /// Decode every frame of the build's own data and check sizes, SHA-256 and mapping bounds.
    #[arg(long)]
    pub verify: bool,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The JSON document `thaw inspect --json` prints.
#[derive(Debug, Serialize)]
pub struct InspectReport {
    /// Store URL.
    pub store: String,
    /// Build id.
    pub build: String,
    /// One report per file present.
    pub files: Vec<FileReport>,
}

/// What `inspect` reports about one build file.
#[derive(Debug, Serialize)]
pub struct FileReport {
    /// `rootfs.ext4` or `memfile`.
    pub file: String,
    /// True when the header was synthesised (e2b legacy headerless build).
    pub legacy: bool,
    /// The metadata.
    pub header: HeaderInfo,
    /// The builds section (empty for V3).
    pub builds: Vec<BuildInfo>,
    /// Mapping statistics.
    pub mapping_summary: MappingSummary,
    /// Every mapping (with `--mappings`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mappings: Option<Vec<MappingInfo>>,
    /// Every frame of every entry (with `--frames`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames: Option<Vec<BuildFrames>>,
    /// Verification result (with `--verify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyReport>,
}

/// Header metadata.
#[derive(Debug, Serialize)]
pub struct HeaderInfo {
    /// Raw version field.
    pub version: u64,
    /// Format (`version & 0xFFFF`).
    pub format: u16,
    /// Block size.
    pub block_size: u64,
    /// Device size.
    pub size: u64,
    /// Generation.
    pub generation: u64,
    /// Owning build.
    pub build_id: String,
    /// Base (root template) build.
    pub base_build_id: String,
}

/// One builds-section entry.
#[derive(Debug, Serialize)]
pub struct BuildInfo {
    /// The build.
    pub build_id: String,
    /// True for the header's own build.
    pub is_self: bool,
    /// Uncompressed size (0 = unknown).
    pub size: u64,
    /// SHA-256 hex (None = unknown).
    pub sha256: Option<String>,
    /// `none`, `zstd`, `lz4`.
    pub codec: String,
    /// Frames in the (possibly trimmed) table.
    pub frames: usize,
    /// Uncompressed bytes the frames cover.
    pub frames_u: u64,
    /// Compressed bytes of the frames.
    pub frames_c: u64,
    /// frames_u / frames_c (None when uncompressed).
    pub ratio: Option<f64>,
}

/// Mapping statistics.
#[derive(Debug, Serialize)]
pub struct MappingSummary {
    /// Number of mappings.
    pub entries: usize,
    /// Bytes mapped to zeros.
    pub zero_bytes: u64,
    /// Number of zero mappings.
    pub zero_ranges: usize,
    /// Bytes and ranges per build.
    pub builds: Vec<BuildBytes>,
}

/// Bytes mapped to one build.
#[derive(Debug, Serialize)]
pub struct BuildBytes {
    /// The build.
    pub build_id: String,
    /// Device bytes mapped to it.
    pub bytes: u64,
    /// Number of mappings.
    pub ranges: usize,
}

/// One mapping.
#[derive(Debug, Serialize)]
pub struct MappingInfo {
    /// Device offset.
    pub offset: u64,
    /// Length.
    pub length: u64,
    /// Build (nil = zeros).
    pub build_id: String,
    /// Offset in the build's data.
    pub build_storage_offset: u64,
}

/// The frames of one entry.
#[derive(Debug, Serialize)]
pub struct BuildFrames {
    /// The build.
    pub build_id: String,
    /// Codec.
    pub codec: String,
    /// Frames.
    pub frames: Vec<FrameInfo>,
}

/// One frame.
#[derive(Debug, Serialize)]
pub struct FrameInfo {
    /// Index in the table.
    pub index: usize,
    /// Uncompressed start.
    pub start_u: u64,
    /// Compressed start.
    pub start_c: u64,
    /// Uncompressed size.
    pub size_u: u32,
    /// Compressed size.
    pub size_c: u32,
}

/// What `--verify` checked.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    /// Data object checked.
    pub object: String,
    /// Frames decoded (0 for a plain object).
    pub frames_checked: usize,
    /// Uncompressed bytes hashed.
    pub bytes: u64,
    /// SHA-256 of the uncompressed data.
    pub sha256: String,
    /// Whether the header's self entry had a checksum to compare with (it matched if so).
    pub sha256_checked: bool,
    /// Mappings whose bounds were checked.
    pub mappings_checked: usize,
}

/// Runs `thaw inspect`.
pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let store = open_store(&args.store)?;
    let mut report = InspectReport {
        store: store.url(),
        build: args.build.to_string(),
        files: Vec::new(),
    };
    let mut out = std::io::stdout().lock();
    for file in args.file.files() {
        let Some(loaded) = load_header(&*store, args.build, file)? else {
            if matches!(args.file, FileSelection::One(_)) {
                bail!("{}: build {} has no {file}", store.url(), args.build);
            }
            continue;
        };
        let mut fr = file_report(file, &loaded.header, loaded.legacy, args);
        if !args.json {
            print_text(&mut out, args.build, &fr)?;
        }
        if args.verify {
            let v = verify(&*store, file, &loaded.header)
                .with_context(|| format!("verify failed for build {} {file}", args.build))?;
            if !args.json {
                writeln!(
                    out,
                    "  verify: OK: {} frames, {} bytes, sha256 {}{}; {} mappings in bounds",
                    v.frames_checked,
                    v.bytes,
                    v.sha256,
                    if v.sha256_checked {
                        " (matches the header)"
                    } else {
                        " (no checksum in header)"
                    },
                    v.mappings_checked
                )?;
            }
            fr.verify = Some(v);
        }
        report.files.push(fr);
    }
    if report.files.is_empty() {
        bail!(
            "{}: build {} has neither rootfs.ext4 nor memfile",
            store.url(),
            args.build
        );
    }
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    }
    Ok(())
}

fn build_info(id: &BuildId, e: &BuildData, me: BuildId) -> BuildInfo {
    let (u, c) = (e.frames.total_u(), e.frames.total_c());
    BuildInfo {
        build_id: id.to_string(),
        is_self: *id == me,
        size: e.size,
        sha256: (e.checksum != [0; 32]).then(|| hex::encode(e.checksum)),
        codec: e.frames.compression().as_str().to_owned(),
        frames: e.frames.frames().len(),
        frames_u: u,
        frames_c: c,
        ratio: (e.frames.is_compressed() && c != 0).then(|| u as f64 / c as f64),
    }
}

fn file_report(file: FileKind, h: &Header, legacy: bool, args: &InspectArgs) -> FileReport {
    let md = &h.metadata;
    let me = md.build_id;
    let mut per_build: BTreeMap<BuildId, (u64, usize)> = BTreeMap::new();
    let (mut zero_bytes, mut zero_ranges) = (0u64, 0usize);
    for m in &h.mappings {
        // Device bytes: the last mapping may run past `size` up to the next 4 KiB.
        let len = m.end().min(md.size).saturating_sub(m.offset);
        if m.is_nil() {
            zero_bytes = zero_bytes.saturating_add(len);
            zero_ranges += 1;
        } else {
            let e = per_build.entry(m.build_id).or_default();
            e.0 = e.0.saturating_add(len);
            e.1 += 1;
        }
    }
    let frames = args.frames.then(|| {
        h.builds
            .iter()
            .filter(|(_, e)| e.frames.is_compressed())
            .map(|(id, e)| BuildFrames {
                build_id: id.to_string(),
                codec: e.frames.compression().as_str().to_owned(),
                frames: e
                    .frames
                    .frames()
                    .iter()
                    .enumerate()
                    .map(|(index, f)| FrameInfo {
                        index,
                        start_u: f.start_u,
                        start_c: f.start_c,
                        size_u: f.size_u,
                        size_c: f.size_c,
                    })
                    .collect(),
            })
            .collect()
    });
    FileReport {
        file: file.name().to_owned(),
        legacy,
        header: HeaderInfo {
            version: md.version,
            format: md.format(),
            block_size: md.block_size,
            size: md.size,
            generation: md.generation,
            build_id: me.to_string(),
            base_build_id: md.base_build_id.to_string(),
        },
        builds: h
            .builds
            .iter()
            .map(|(id, e)| build_info(id, e, me))
            .collect(),
        mapping_summary: MappingSummary {
            entries: h.mappings.len(),
            zero_bytes,
            zero_ranges,
            builds: per_build
                .into_iter()
                .map(|(id, (bytes, ranges))| BuildBytes {
                    build_id: id.to_string(),
                    bytes,
                    ranges,
                })
                .collect(),
        },
        mappings: args.mappings.then(|| {
            h.mappings
                .iter()
                .map(|m| MappingInfo {
                    offset: m.offset,
                    length: m.length,
                    build_id: m.build_id.to_string(),
                    build_storage_offset: m.build_storage_offset,
                })
                .collect()
        }),
        frames,
        verify: None,
    }
}

fn print_text(out: &mut impl Write, build: BuildId, r: &FileReport) -> anyhow::Result<()> {
    let h = &r.header;
    writeln!(
        out,
        "{build}/{}{}",
        r.file,
        if r.legacy {
            " (no header: e2b legacy synthetic header)"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "  header: version {} (format V{}), block size {}, size {} ({:.1} MiB), generation {}",
        h.version,
        if h.format <= 3 { 3 } else { h.format },
        h.block_size,
        h.size,
        mib(h.size),
        h.generation
    )?;
    writeln!(
        out,
        "  build {}, base build {}",
        h.build_id, h.base_build_id
    )?;
    if !r.builds.is_empty() {
        writeln!(out, "  builds section ({} entries):", r.builds.len())?;
    }
    for b in &r.builds {
        let size = if b.size == 0 {
            "size unknown".to_owned()
        } else {
            format!("{} bytes", b.size)
        };
        let sha = b.sha256.as_deref().unwrap_or("unknown");
        write!(
            out,
            "    {}{}: {size}, sha256 {sha}, {}",
            b.build_id,
            if b.is_self { " (self)" } else { "" },
            b.codec
        )?;
        match b.ratio {
            Some(ratio) => writeln!(
                out,
                ", {} frames, {:.1} MiB -> {:.1} MiB ({ratio:.2}x)",
                b.frames,
                mib(b.frames_u),
                mib(b.frames_c)
            )?,
            None => writeln!(out)?,
        }
    }
    let s = &r.mapping_summary;
    writeln!(
        out,
        "  mappings: {} entries; zeros: {} bytes in {} ranges",
        s.entries, s.zero_bytes, s.zero_ranges
    )?;
    for b in &s.builds {
        writeln!(
            out,
            "    {}: {} bytes in {} ranges",
            b.build_id, b.bytes, b.ranges
        )?;
    }
    if let Some(maps) = &r.mappings {
        writeln!(out, "  mapping list:")?;
        for m in maps {
            if m.build_id == thaw_codec::NIL_BUILD.to_string() {
                writeln!(out, "    [{:#x}, +{:#x}) -> zeros", m.offset, m.length)?;
            } else {
                writeln!(
                    out,
                    "    [{:#x}, +{:#x}) -> {} @ {:#x}",
                    m.offset, m.length, m.build_id, m.build_storage_offset
                )?;
            }
        }
    }
    if let Some(frames) = &r.frames {
        for b in frames {
            writeln!(out, "  frames of {} ({}):", b.build_id, b.codec)?;
            for f in &b.frames {
                writeln!(
                    out,
                    "    #{}: U [{:#x}, +{:#x}) C [{:#x}, +{:#x})",
                    f.index, f.start_u, f.size_u, f.start_c, f.size_c
                )?;
            }
        }
    }
    Ok(())
}

/// Decodes and hashes the build's own data, then checks every mapping's bounds.
pub fn verify(store: &dyn Store, file: FileKind, header: &Header) -> anyhow::Result<VerifyReport> {
    let me = header.metadata.build_id;
    let entry = self_entry(header);
    let mut sha = Sha256::new();
    let (object, frames_checked, bytes) = match entry {
        Some(e) if e.frames.is_compressed() => {
            let src = DataSource {
                build: me,
                file,
                object: data_object(me, file, e.frames.compression()),
                frames: e.frames.clone(),
                size: (e.size != 0).then_some(e.size),
            };
            let mut decoder = FrameDecoder::new();
            let mut expected_u = 0u64;
            for (i, f) in src.frames.frames().iter().enumerate() {
                if f.start_u != expected_u {
                    bail!(
                        "build {me} {file}: self frame table is not contiguous: frame {i} starts at U offset {} instead of {expected_u}",
                        f.start_u
                    );
                }
                let data = decode_frame(store, &src, i, *f, &mut decoder)?;
                sha.update(&data);
                expected_u = f.end_u();
            }
            let stored = store.stat(&src.object)?.size;
            let frames_c = src.frames.frames().last().map_or(0, |f| f.end_c());
            if stored != frames_c {
                bail!(
                    "build {me} {file}: {} is {stored} bytes but its frames end at C offset {frames_c}",
                    src.object
                );
            }
            (src.object, src.frames.frames().len(), expected_u)
        }
        _ => {
            let object = data_object(me, file, CompressionType::None);
            let size = store.stat(&object)?.size;
            let mut reader = StoreReader::new(store, object.clone(), size);
            let mut buf = vec![0u8; 4 * 1024 * 1024];
            loop {
                let n = reader
                    .read(&mut buf)
                    .with_context(|| format!("reading {object}"))?;
                if n == 0 {
                    break;
                }
                sha.update(&buf[..n]);
            }
            (object, 0, size)
        }
    };
    let digest: [u8; 32] = sha.finalize().into();
    let mut sha256_checked = false;
    if let Some(e) = entry {
        if e.size != 0 && e.size != bytes {
            bail!(
                "build {me} {file}: {object} holds {bytes} uncompressed bytes, the header's self entry says {}",
                e.size
            );
        }
        if e.checksum != [0; 32] {
            if e.checksum != digest {
                bail!(
                    "build {me} {file}: SHA-256 mismatch: the header says {}, the data of {object} hashes to {}",
                    hex::encode(e.checksum),
                    hex::encode(digest)
                );
            }
            sha256_checked = true;
        }
    }
    let mappings_checked = check_mappings(store, file, header, bytes)?;
    Ok(VerifyReport {
        object,
        frames_checked,
        bytes,
        sha256: hex::encode(digest),
        sha256_checked,
        mappings_checked,
    })
}

/// Checks every non-nil mapping lies inside its build's data (where the size is known) and, for
/// compressed builds, inside the frames of the table the header gives.
fn check_mappings(
    store: &dyn Store,
    file: FileKind,
    header: &Header,
    self_size: u64,
) -> anyhow::Result<usize> {
    let me = header.metadata.build_id;
    let size = header.metadata.size;
    let mut sources: BTreeMap<BuildId, DataSource> = BTreeMap::new();
    let mut checked = 0usize;
    for (i, m) in header.mappings.iter().enumerate() {
        if m.is_nil() || m.offset >= size {
            continue;
        }
        let what = || {
            format!(
                "mapping #{i} [{:#x}, +{:#x}) -> build {} @ {:#x}",
                m.offset, m.length, m.build_id, m.build_storage_offset
            )
        };
        let len = m.end().min(size) - m.offset;
        let end = m
            .build_storage_offset
            .checked_add(len)
            .with_context(|| format!("{}: offset overflows", what()))?;
        let (data_size, frames) = if m.build_id == me {
            (Some(self_size), None)
        } else {
            let src = match sources.entry(m.build_id) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    e.insert(resolve_source(store, file, header, m.build_id).with_context(what)?)
                }
            };
            (src.size, Some(&src.frames))
        };
        if let Some(ds) = data_size
            && end > ds
        {
            bail!(
                "{}: ends at {end:#x}, past the build's data size {ds:#x}",
                what()
            );
        }
        if let Some(table) = frames
            && table.is_compressed()
        {
            check_covered(table, m.build_storage_offset, end).with_context(what)?;
        }
        checked += 1;
    }
    Ok(checked)
}

/// Checks the U range `[start, end)` is covered by frames of `table` without gaps.
fn check_covered(table: &FrameTable, start: u64, end: u64) -> anyhow::Result<()> {
    let mut pos = start;
    while pos < end {
        let Some(i) = table.locate(pos) else {
            bail!("U offset {pos:#x} is in no frame of the header's frame table");
        };
        pos = table.frames()[i].end_u();
    }
    Ok(())
}
