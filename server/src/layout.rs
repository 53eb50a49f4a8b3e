//! How a build file is found in a store: its header (or e2b's legacy synthetic header), and for
//! each build a header references, which data object holds its bytes and with which frame table
//! (e2b `createDiff` / `StorageDiff.resolve`, reference §3.4).
//!
//! Synchronous and simple: shared by the writer, `compress`, `inspect` and the reference reader.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use thaw_codec::names::{data_object, header_object};
use thaw_codec::{
    BuildData, BuildId, CompressionType, FileKind, Frame, FrameDecoder, FrameTable, Header,
    Mapping, Metadata, PAGE_SIZE,
};

use crate::store::Store;

/// Largest header object accepted: a V4/V5 body is capped at 256 MiB decoded; a V3 header at
/// [`thaw_codec::header::MAX_MAPPINGS`] records of 40 bytes. Both fit.
pub const MAX_HEADER_LEN: u64 = 512 * 1024 * 1024;

/// A build file's header as found in a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedHeader {
    /// The header (synthetic when `legacy`).
    pub header: Header,
    /// True when `{build}/{file}.header` is missing and the header was synthesised from the
    /// plain data object (e2b legacy builds).
    pub legacy: bool,
}

/// e2b's synthetic header for a headerless (legacy) build: version 1, generation 1, block size
/// 2 MiB (memfile) or 4 KiB (rootfs), one mapping of the whole object to itself (rounded up to
/// 4 KiB).
pub fn legacy_header(build: BuildId, file: FileKind, size: u64) -> Header {
    let rounded = size.div_ceil(PAGE_SIZE).saturating_mul(PAGE_SIZE);
    let mappings = if rounded == 0 {
        Vec::new()
    } else {
        vec![Mapping {
            offset: 0,
            length: rounded,
            build_id: build,
            build_storage_offset: 0,
        }]
    };
    Header {
        metadata: Metadata {
            version: 1,
            block_size: file.legacy_block_size(),
            size,
            generation: 1,
            build_id: build,
            base_build_id: build,
        },
        incomplete: false,
        builds: BTreeMap::new(),
        mappings,
    }
}

/// Reads and parses `{build}/{file}.header`; `Ok(None)` when the header object does not exist.
pub fn read_stored_header(
    store: &dyn Store,
    build: BuildId,
    file: FileKind,
) -> anyhow::Result<Option<Header>> {
    let key = header_object(build, file);
    let bytes = match store.get(&key, MAX_HEADER_LEN) {
        Ok(b) => b,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let header =
        Header::parse(&bytes).with_context(|| format!("{}: parsing header {key}", store.url()))?;
    if header.metadata.build_id != build {
        bail!(
            "{}: header {key} belongs to build {}, not {build}",
            store.url(),
            header.metadata.build_id
        );
    }
    Ok(Some(header))
}

/// The header of `file` of `build`: the stored one, or the legacy synthetic header when only the
/// plain data object exists. `Ok(None)` when neither exists (the build has no such file).
pub fn load_header(
    store: &dyn Store,
    build: BuildId,
    file: FileKind,
) -> anyhow::Result<Option<LoadedHeader>> {
    if let Some(header) = read_stored_header(store, build, file)? {
        return Ok(Some(LoadedHeader {
            header,
            legacy: false,
        }));
    }
    let plain = data_object(build, file, CompressionType::None);
    match store.stat(&plain) {
        // Legacy builds predate e2b's compression and its metadata; thaw sets `uncompressed-size`
        // on every data object it stores with a header (`writer::store_build_file`).
        Ok(info) if info.uncompressed_size.is_some() => bail!(
            "build {build} {file}: the data object {plain} has no header ({}) but carries \
             `uncompressed-size` metadata, so it is a layer whose upload did not finish, not a \
             legacy headerless build: refusing to read it",
            header_object(build, file)
        ),
        Ok(info) => Ok(Some(LoadedHeader {
            header: legacy_header(build, file, info.size),
            legacy: true,
        })),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The self entry of a V4+ header, if it has one.
pub fn self_entry(header: &Header) -> Option<&BuildData> {
    if header.metadata.format() < 4 {
        return None;
    }
    header.build_data(&header.metadata.build_id)
}

/// Where one build's bytes of one file are: the data object, its frame table and its
/// uncompressed size when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSource {
    /// The build.
    pub build: BuildId,
    /// The file.
    pub file: FileKind,
    /// The data object key (with the codec's suffix).
    pub object: String,
    /// The frame table (uncompressed when it has no codec). Possibly sparse.
    pub frames: FrameTable,
    /// Uncompressed size, when known (builds entry, `uncompressed-size` metadata or object size).
    pub size: Option<u64>,
}

/// Resolves where `build`'s bytes of `file` are, as seen from `referencing` (a header whose
/// mappings reference `build`), following e2b's rules:
/// - a builds-section entry with a frame table: the suffixed object, that (possibly sparse)
///   table, the entry's size;
/// - an entry without a table: the plain object (if the entry is the zero entry and the plain
///   object is missing, fall back to the build's own header);
/// - no entry: the build's own header decides (V4+ self entry, else plain); no header: plain.
pub fn resolve_source(
    store: &dyn Store,
    file: FileKind,
    referencing: &Header,
    build: BuildId,
) -> anyhow::Result<DataSource> {
    let entry = if referencing.metadata.format() >= 4 {
        referencing.build_data(&build)
    } else {
        None
    };
    if let Some(entry) = entry {
        if entry.frames.is_compressed() {
            return Ok(source_from_entry(build, file, entry));
        }
        let plain = data_object(build, file, CompressionType::None);
        if !entry.is_zero() || store.exists(&plain)? {
            let mut src = source_from_entry(build, file, entry);
            if src.size.is_none() {
                src.size = Some(store.stat(&plain)?.logical_size());
            }
            return Ok(src);
        }
        // Zero entry but no plain object: the build was compressed since; ask its header.
    }
    own_source(store, file, build)
}

/// The source of `build` as its own header (or the legacy layout) describes it.
pub fn own_source(store: &dyn Store, file: FileKind, build: BuildId) -> anyhow::Result<DataSource> {
    if let Some(header) = read_stored_header(store, build, file)?
        && let Some(entry) = self_entry(&header)
        && !entry.is_zero()
    {
        let mut src = source_from_entry(build, file, entry);
        if src.size.is_none() {
            src.size = Some(store.stat(&src.object)?.logical_size());
        }
        return Ok(src);
    }
    let object = data_object(build, file, CompressionType::None);
    let size = store
        .stat(&object)
        .with_context(|| format!("data of build {build} ({file})"))?
        .logical_size();
    Ok(DataSource {
        build,
        file,
        object,
        frames: FrameTable::uncompressed(),
        size: Some(size),
    })
}

fn source_from_entry(build: BuildId, file: FileKind, entry: &BuildData) -> DataSource {
    DataSource {
        build,
        file,
        object: data_object(build, file, entry.frames.compression()),
        frames: entry.frames.clone(),
        size: (entry.size != 0).then_some(entry.size),
    }
}

/// Reads uncompressed bytes of one [`DataSource`]; remembers the last decoded frame so that
/// neighbouring reads do not decode it again.
#[derive(Debug, Default)]
pub struct SourceReader {
    decoder: Option<FrameDecoder>,
    last: Option<(String, u64, Vec<u8>)>,
}

impl SourceReader {
    /// A reader with an empty frame cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fills `buf` with the uncompressed bytes `[offset, offset + buf.len())` of `src`.
    pub fn read(
        &mut self,
        store: &dyn Store,
        src: &DataSource,
        offset: u64,
        buf: &mut [u8],
    ) -> anyhow::Result<()> {
        let len = u64::try_from(buf.len())?;
        let end = offset
            .checked_add(len)
            .context("read range overflows u64")?;
        if let Some(size) = src.size
            && end > size
        {
            bail!(
                "range [{offset}, {end}) of build {} ({}) is past its data size {size}",
                src.build,
                src.file
            );
        }
        if !src.frames.is_compressed() {
            store.read_range(&src.object, offset, buf)?;
            return Ok(());
        }
        let mut pos = offset;
        let mut done = 0usize;
        while pos < end {
            let idx = src.frames.locate(pos).with_context(|| {
                format!(
                    "offset {pos} of build {} ({}) is in no frame of {}",
                    src.build, src.file, src.object
                )
            })?;
            let frame = src.frames.frames()[idx];
            let data = self.frame(store, src, idx, frame)?;
            let in_frame = usize::try_from(pos - frame.start_u)?;
            let n = usize::try_from((frame.end_u().min(end)) - pos)?;
            let chunk = data
                .get(in_frame..in_frame + n)
                .context("frame shorter than its table entry")?;
            buf[done..done + n].copy_from_slice(chunk);
            done += n;
            pos += u64::try_from(n)?;
        }
        Ok(())
    }

    /// The decoded bytes of frame `idx` of `src` (cached).
    fn frame(
        &mut self,
        store: &dyn Store,
        src: &DataSource,
        idx: usize,
        frame: Frame,
    ) -> anyhow::Result<&[u8]> {
        let hit = matches!(&self.last, Some((obj, start, _)) if *obj == src.object && *start == frame.start_u);
        if !hit {
            let data = decode_frame(
                store,
                src,
                idx,
                frame,
                self.decoder.get_or_insert_with(FrameDecoder::new),
            )?;
            self.last = Some((src.object.clone(), frame.start_u, data));
        }
        match &self.last {
            Some((_, _, data)) => Ok(data),
            None => bail!("frame cache empty"),
        }
    }
}

/// Reads frame `idx` of `src` from the store and decodes it to exactly its declared size. Errors
/// name the build, file, frame index and compressed/uncompressed offsets.
pub fn decode_frame(
    store: &dyn Store,
    src: &DataSource,
    idx: usize,
    frame: Frame,
    decoder: &mut FrameDecoder,
) -> anyhow::Result<Vec<u8>> {
    let what = || {
        format!(
            "build {} {} frame {idx} (C offset {}, {} bytes; U offset {}, {} bytes) of {}",
            src.build,
            src.file,
            frame.start_c,
            frame.size_c,
            frame.start_u,
            frame.size_u,
            src.object
        )
    };
    let mut compressed = vec![0u8; usize::try_from(frame.size_c)?];
    store
        .read_range(&src.object, frame.start_c, &mut compressed)
        .with_context(what)?;
    let mut out = vec![0u8; usize::try_from(frame.size_u)?];
    decoder
        .decode(src.frames.compression(), &compressed, &mut out)
        .with_context(what)?;
    Ok(out)
}
