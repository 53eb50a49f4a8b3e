//! The V4 body, and the parts V5 shares with it: the outer framing (`flags u8`,
//! `u32 uncompressedBlockLen`, one LZ4 frame-format stream) and the builds section.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use lz4_flex::frame::{BlockSize, FrameDecoder, FrameEncoder, FrameInfo};

use super::cursor::Cursor;
use super::{
    BuildData, FLAG_INCOMPLETE, Header, MAPPING_RECORD_LEN, MAX_BODY_LEN, MAX_BUILDS, MAX_MAPPINGS,
    Mapping, Metadata, default_mappings,
};
use crate::{BuildId, CodecError, ErrorKind, FrameTable, Result};

/// Fixed part of one builds-section entry: id, size, checksum, and the frame table's two `u32`s.
const MIN_BUILD_ENTRY_LEN: usize = 16 + 8 + 32 + 8;

/// The LZ4 frame magic number.
const LZ4_MAGIC: u32 = 0x184D_2204;

/// Parses a V4 body (everything after the metadata).
pub(super) fn parse(metadata: Metadata, body: &[u8]) -> Result<Header> {
    let (flags, block) = decode_body(body, "V4 body")?;
    let mut c = Cursor::new(&block, "V4 builds section");
    let builds = read_builds(&mut c)?;
    c.set_what("V4 mappings");
    let count = c.u32()?;
    if count > MAX_MAPPINGS {
        return Err(CodecError::too_large(
            "V4 mapping count",
            u64::from(count),
            u64::from(MAX_MAPPINGS),
        ));
    }
    let count = count as usize;
    let need = count * MAPPING_RECORD_LEN;
    if need > c.remaining() {
        return Err(CodecError::truncated(
            "V4 mappings",
            need as u64,
            c.remaining() as u64,
        ));
    }
    let mappings = if count == 0 {
        default_mappings(&metadata)?
    } else {
        let mut mappings = Vec::with_capacity(count);
        for _ in 0..count {
            mappings.push(Mapping::read_record(&mut c)?);
        }
        mappings
    };
    expect_end(&c)?;
    Ok(Header {
        metadata,
        incomplete: flags & FLAG_INCOMPLETE != 0,
        builds,
        mappings,
    })
}

/// Serializes a V4 header (already validated by the caller).
pub(super) fn write(header: &Header) -> Result<Vec<u8>> {
    let mut block = Vec::new();
    write_builds(&mut block, &header.builds)?;
    let count = u32::try_from(header.mappings.len()).unwrap_or(u32::MAX);
    block.extend_from_slice(&count.to_le_bytes());
    block.reserve(header.mappings.len() * MAPPING_RECORD_LEN);
    for m in &header.mappings {
        m.write_record(&mut block);
    }
    assemble(header, &block, "V4 body")
}

/// Metadata + flags + length + LZ4 frame of `block`.
pub(super) fn assemble(header: &Header, block: &[u8], what: &'static str) -> Result<Vec<u8>> {
    let len = u32::try_from(block.len())
        .ok()
        .filter(|&l| l <= MAX_BODY_LEN)
        .ok_or_else(|| CodecError::too_large(what, block.len() as u64, u64::from(MAX_BODY_LEN)))?;
    let mut out = Vec::with_capacity(Metadata::LEN + 5 + block.len() / 2);
    header.metadata.write(&mut out);
    // `incomplete` is refused before we get here; flags are always 0 on disk.
    out.push(0);
    out.extend_from_slice(&len.to_le_bytes());
    let info = FrameInfo::new()
        .block_size(BlockSize::Max4MB)
        .block_checksums(true)
        .content_checksum(true);
    let mut enc = FrameEncoder::with_frame_info(info, out);
    let encoded = enc
        .write_all(block)
        .map_err(|e| e.to_string())
        .and_then(|()| enc.finish().map_err(|e| e.to_string()));
    encoded.map_err(|e| CodecError::new(ErrorKind::InvalidArgument, what, format!("lz4: {e}")))
}

/// Splits the outer framing and decodes the LZ4 stream: returns the flags and the decoded
/// block, which is exactly `uncompressedBlockLen` bytes long.
///
/// The declared length is checked against [`MAX_BODY_LEN`] before anything is allocated, the
/// LZ4 frame's structure is walked first (so a stream cut anywhere is
/// [`ErrorKind::Truncated`] and bytes after its end are [`ErrorKind::Corrupt`]), and decoding
/// stops one byte past the declared length (a longer or shorter result is
/// [`ErrorKind::SizeMismatch`]). Unknown flag bits are [`ErrorKind::Unsupported`].
pub(super) fn decode_body(body: &[u8], what: &'static str) -> Result<(u8, Vec<u8>)> {
    let mut c = Cursor::new(body, what);
    let flags = c.u8()?;
    let len = c.u32()?;
    if flags & !FLAG_INCOMPLETE != 0 {
        return Err(CodecError::new(
            ErrorKind::Unsupported,
            what,
            format!("unknown flags {flags:#04x}"),
        ));
    }
    if len > MAX_BODY_LEN {
        return Err(CodecError::too_large(
            "uncompressed header block length",
            u64::from(len),
            u64::from(MAX_BODY_LEN),
        ));
    }
    let stream = c.rest();
    let extent = lz4_frame_extent(stream, what)?;
    if extent != stream.len() {
        return Err(CodecError::corrupt(
            what,
            format!(
                "{} trailing bytes after the LZ4 stream",
                stream.len() - extent
            ),
        ));
    }
    // Grow as data arrives rather than trusting the declared length for the allocation.
    let mut out = Vec::with_capacity((len as usize).min(1 << 20));
    let mut decoder = FrameDecoder::new(stream);
    (&mut decoder)
        .take(u64::from(len) + 1)
        .read_to_end(&mut out)
        .map_err(|e| CodecError::corrupt(what, format!("lz4: {e}")))?;
    if out.len() as u64 != u64::from(len) {
        return Err(CodecError::new(
            ErrorKind::SizeMismatch,
            what,
            format!(
                "LZ4 stream decodes to {}{} bytes, header declares {len}",
                out.len(),
                if out.len() as u64 > u64::from(len) {
                    "+"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok((flags, out))
}

/// Walks one LZ4 frame (magic, descriptor, blocks, end mark, optional content checksum) and
/// returns its length, without decoding. lz4_flex treats a stream cut at a block boundary as a
/// clean end, so the walk is what makes truncation an error.
fn lz4_frame_extent(stream: &[u8], what: &'static str) -> Result<usize> {
    let mut c = Cursor::new(stream, what);
    let magic = c.u32()?;
    if magic != LZ4_MAGIC {
        return Err(CodecError::corrupt(
            what,
            format!("not an LZ4 frame (magic {magic:#010x})"),
        ));
    }
    let flg = c.u8()?;
    let bd = c.u8()?;
    if flg >> 6 != 1 {
        return Err(CodecError::corrupt(
            what,
            format!("unsupported LZ4 frame version {}", flg >> 6),
        ));
    }
    let block_checksums = flg & 0x10 != 0;
    let content_size = flg & 0x08 != 0;
    let content_checksum = flg & 0x04 != 0;
    let dict_id = flg & 0x01 != 0;
    if content_size {
        c.advance(8)?;
    }
    if dict_id {
        c.advance(4)?;
    }
    c.advance(1)?; // header checksum, verified by the decoder
    let max_block: u32 = match (bd >> 4) & 0x07 {
        4 => 64 << 10,
        5 => 256 << 10,
        6 => 1 << 20,
        7 => 4 << 20,
        other => {
            return Err(CodecError::corrupt(
                what,
                format!("bad LZ4 block size id {other}"),
            ));
        }
    };
    loop {
        let block = c.u32()?;
        if block == 0 {
            break;
        }
        let size = block & 0x7FFF_FFFF;
        if size > max_block {
            return Err(CodecError::corrupt(
                what,
                format!("LZ4 block of {size} bytes exceeds the frame's {max_block}"),
            ));
        }
        c.advance(size as usize)?;
        if block_checksums {
            c.advance(4)?;
        }
    }
    if content_checksum {
        c.advance(4)?;
    }
    Ok(stream.len() - c.remaining())
}

/// Reads the builds section. The count is capped at [`MAX_BUILDS`] and checked against the
/// bytes left before allocating; entries may come in any order but duplicates are
/// [`ErrorKind::Corrupt`], as is a negative size.
pub(super) fn read_builds(c: &mut Cursor<'_>) -> Result<BTreeMap<BuildId, BuildData>> {
    let count = c.u32()?;
    if count > MAX_BUILDS {
        return Err(CodecError::too_large(
            "build count",
            u64::from(count),
            u64::from(MAX_BUILDS),
        ));
    }
    let need = count as usize * MIN_BUILD_ENTRY_LEN;
    if need > c.remaining() {
        return Err(CodecError::truncated(
            c.what(),
            need as u64,
            c.remaining() as u64,
        ));
    }
    let mut builds = BTreeMap::new();
    for i in 0..count {
        let id = c.uuid()?;
        let size = c.i64()?;
        if size < 0 {
            return Err(CodecError::corrupt(
                c.what(),
                format!("build {id} has negative size {size}"),
            ));
        }
        let checksum: [u8; 32] = c.array()?;
        let (frames, used) = FrameTable::parse(c.rest())?;
        c.advance(used)?;
        let entry = BuildData {
            size: size.cast_unsigned(),
            checksum,
            frames,
        };
        if builds.insert(id, entry).is_some() {
            return Err(CodecError::corrupt(
                c.what(),
                format!("duplicate entry {i} for build {id}"),
            ));
        }
    }
    Ok(builds)
}

/// Writes the builds section, sorted ascending by raw id (the map's order).
pub(super) fn write_builds(out: &mut Vec<u8>, builds: &BTreeMap<BuildId, BuildData>) -> Result<()> {
    let count = u32::try_from(builds.len())
        .ok()
        .filter(|&n| n <= MAX_BUILDS)
        .ok_or_else(|| {
            CodecError::too_large("build count", builds.len() as u64, u64::from(MAX_BUILDS))
        })?;
    out.extend_from_slice(&count.to_le_bytes());
    for (id, bd) in builds {
        let size = i64::try_from(bd.size).map_err(|_| {
            CodecError::new(
                ErrorKind::InvalidArgument,
                "builds section",
                format!("build {id} size {} does not fit i64", bd.size),
            )
        })?;
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&bd.checksum);
        bd.frames.write(out);
    }
    Ok(())
}

/// Bytes left after the last section are corrupt.
pub(super) fn expect_end(c: &Cursor<'_>) -> Result<()> {
    if c.remaining() != 0 {
        return Err(CodecError::corrupt(
            c.what(),
            format!("{} trailing bytes in the decoded block", c.remaining()),
        ));
    }
    Ok(())
}
