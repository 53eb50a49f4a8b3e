//! The V5 body: V4's framing and builds section, then a columnar, varint-coded mapping section
//! in 4 KiB page units that omits nil (zero) ranges.
//!
//! ```text
//! u32 M                 distinct non-nil build ids, in order of first appearance
//! M x [16] build id
//! u32 N                 non-nil entries
//! N x uvarint           offset delta in pages (first vs 0)
//! N x uvarint           length in pages
//! N x varint (zigzag)   storage-offset delta in pages (first vs 0; may be negative)
//! N x uvarint           index into the build-id table
//! ```
//! The reader rebuilds the omitted gaps, and the tail up to `ceil(size / 4096)` pages, as nil
//! mappings (storage offset 0).

use std::collections::HashMap;

use super::cursor::{Cursor, put_uvarint, put_varint};
use super::v4::{assemble, decode_body, expect_end, read_builds, write_builds};
use super::{Header, MAX_BUILDS, MAX_MAPPINGS, Mapping, Metadata};
use crate::{BuildId, CodecError, NIL_BUILD, PAGE_SIZE, Result};

const WHAT: &str = "V5 mappings";

/// Largest page index (offsets, lengths, storage offsets are `u32` pages, ~16 TiB).
const MAX_PAGE: u64 = u32::MAX as u64;

/// Parses a V5 body (everything after the metadata).
pub(super) fn parse(metadata: Metadata, body: &[u8]) -> Result<Header> {
    if metadata.block_size == 0 {
        return Err(CodecError::corrupt("metadata", "block size is zero"));
    }
    let (flags, block) = decode_body(body, "V5 body")?;
    let mut c = Cursor::new(&block, "V5 builds section");
    let builds = read_builds(&mut c)?;
    c.set_what(WHAT);
    let mappings = read_mappings(&mut c, metadata.size)?;
    expect_end(&c)?;
    Ok(Header {
        metadata,
        incomplete: flags & super::FLAG_INCOMPLETE != 0,
        builds,
        mappings,
    })
}

fn size_pages(size: u64) -> Result<u64> {
    let pages = size.div_ceil(PAGE_SIZE);
    if pages > MAX_PAGE {
        return Err(CodecError::too_large("V5 size in pages", pages, MAX_PAGE));
    }
    Ok(pages)
}

fn read_mappings(c: &mut Cursor<'_>, size: u64) -> Result<Vec<Mapping>> {
    let total_pages = size_pages(size)?;
    let m = c.u32()?;
    if m > MAX_BUILDS {
        return Err(CodecError::too_large(
            "V5 build table",
            u64::from(m),
            u64::from(MAX_BUILDS),
        ));
    }
    let need = m as usize * 16;
    if need > c.remaining() {
        return Err(CodecError::truncated(
            WHAT,
            need as u64,
            c.remaining() as u64,
        ));
    }
    let mut ids = Vec::with_capacity(m as usize);
    for _ in 0..m {
        ids.push(c.uuid()?);
    }
    let n = c.u32()?;
    if n > MAX_MAPPINGS {
        return Err(CodecError::too_large(
            "V5 entry count",
            u64::from(n),
            u64::from(MAX_MAPPINGS),
        ));
    }
    let n = n as usize;
    // Every entry takes at least one byte in each of the four columns.
    if n * 4 > c.remaining() {
        return Err(CodecError::truncated(
            WHAT,
            (n * 4) as u64,
            c.remaining() as u64,
        ));
    }

    let mut offsets = Vec::with_capacity(n);
    let mut acc: u64 = 0;
    for i in 0..n {
        let d = c.uvarint()?;
        acc = acc
            .checked_add(d)
            .filter(|&v| v <= MAX_PAGE)
            .ok_or_else(|| {
                CodecError::corrupt(WHAT, format!("entry {i} offset exceeds u32 pages"))
            })?;
        offsets.push(acc);
    }
    let mut lengths = Vec::with_capacity(n);
    for i in 0..n {
        let v = c.uvarint()?;
        if v > MAX_PAGE {
            return Err(CodecError::corrupt(
                WHAT,
                format!("entry {i} length {v} exceeds u32 pages"),
            ));
        }
        lengths.push(v);
    }
    let mut storage = Vec::with_capacity(n);
    let mut sacc: i64 = 0;
    for i in 0..n {
        let d = c.varint()?;
        sacc = sacc
            .checked_add(d)
            .filter(|&v| (0..=MAX_PAGE.cast_signed()).contains(&v))
            .ok_or_else(|| {
                CodecError::corrupt(WHAT, format!("entry {i} storage offset out of range"))
            })?;
        storage.push(sacc.cast_unsigned());
    }
    let mut index = Vec::with_capacity(n);
    for i in 0..n {
        let v = c.uvarint()?;
        let id = usize::try_from(v)
            .ok()
            .and_then(|v| ids.get(v))
            .ok_or_else(|| {
                CodecError::corrupt(
                    WHAT,
                    format!("entry {i} build index {v} out of range ({m} builds)"),
                )
            })?;
        index.push(*id);
    }

    // Check the geometry and count the mappings (entries plus nil gaps) before allocating them.
    let mut total: u64 = 0;
    let mut cur: u64 = 0;
    for i in 0..n {
        let (off, len) = (offsets[i], lengths[i]);
        if len == 0 {
            return Err(CodecError::corrupt(
                WHAT,
                format!("entry {i} has zero length"),
            ));
        }
        if off < cur {
            return Err(CodecError::corrupt(
                WHAT,
                format!("entry {i} at page {off} overlaps the previous end {cur}"),
            ));
        }
        let end = off + len; // both <= u32::MAX
        if end > total_pages {
            return Err(CodecError::corrupt(
                WHAT,
                format!("entry {i} ends at page {end}, past the size ({total_pages} pages)"),
            ));
        }
        total += 1 + u64::from(off > cur);
        cur = end;
    }
    total += u64::from(cur < total_pages);
    if total > u64::from(MAX_MAPPINGS) {
        return Err(CodecError::too_large(
            "V5 reconstructed mappings",
            total,
            u64::from(MAX_MAPPINGS),
        ));
    }

    let nil = |from: u64, to: u64| Mapping {
        offset: from * PAGE_SIZE,
        length: (to - from) * PAGE_SIZE,
        build_id: NIL_BUILD,
        build_storage_offset: 0,
    };
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut cur: u64 = 0;
    for i in 0..n {
        let (off, len) = (offsets[i], lengths[i]);
        if off > cur {
            out.push(nil(cur, off));
        }
        out.push(Mapping {
            offset: off * PAGE_SIZE,
            length: len * PAGE_SIZE,
            build_id: index[i],
            build_storage_offset: storage[i] * PAGE_SIZE,
        });
        cur = off + len;
    }
    if cur < total_pages {
        out.push(nil(cur, total_pages));
    }
    Ok(out)
}

/// Serializes a V5 header (already validated by the caller, so every mapping is 4 KiB aligned).
pub(super) fn write(header: &Header) -> Result<Vec<u8>> {
    let mut block = Vec::new();
    write_builds(&mut block, &header.builds)?;
    size_pages(header.metadata.size)?;

    let entries: Vec<&Mapping> = header.mappings.iter().filter(|m| !m.is_nil()).collect();
    let mut table: Vec<BuildId> = Vec::new();
    let mut index_of: HashMap<BuildId, u64> = HashMap::new();
    let mut index = Vec::with_capacity(entries.len());
    for m in &entries {
        let next = table.len() as u64;
        let idx = *index_of.entry(m.build_id).or_insert_with(|| {
            table.push(m.build_id);
            next
        });
        index.push(idx);
    }
    if table.len() as u64 > u64::from(MAX_BUILDS) {
        return Err(CodecError::too_large(
            "V5 build table",
            table.len() as u64,
            u64::from(MAX_BUILDS),
        ));
    }
    let pages = |bytes: u64| -> Result<u64> {
        let p = bytes / PAGE_SIZE;
        if p > MAX_PAGE {
            return Err(CodecError::too_large("V5 page index", p, MAX_PAGE));
        }
        Ok(p)
    };

    // Both counts are bounded by the caps checked above and in `Header::to_bytes`.
    block.extend_from_slice(&u32::try_from(table.len()).unwrap_or(u32::MAX).to_le_bytes());
    for id in &table {
        block.extend_from_slice(id.as_bytes());
    }
    block.extend_from_slice(
        &u32::try_from(entries.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    let mut prev = 0;
    for m in &entries {
        let off = pages(m.offset)?;
        put_uvarint(&mut block, off - prev);
        prev = off;
    }
    for m in &entries {
        put_uvarint(&mut block, pages(m.length)?);
    }
    let mut prev: i64 = 0;
    for m in &entries {
        // <= u32::MAX, so the cast is exact.
        let s = pages(m.build_storage_offset)?.cast_signed();
        put_varint(&mut block, s - prev);
        prev = s;
    }
    for idx in index {
        put_uvarint(&mut block, idx);
    }
    assemble(header, &block, "V5 body")
}
