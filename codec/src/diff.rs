//! The child header built at pause from a parent header plus the dirty and empty block sets
//! (e2b `ToDiffHeader`).
//!
//! Dirty blocks go to the new build at packed offsets (the k-th dirty block in device order is at
//! `k * block_size` of the new data file); empty blocks become nil mappings; the result is merged
//! over the parent's mappings (the diff wins), then adjacent runs of the same build are merged
//! when storage-contiguous (nil runs always merge).

use std::collections::BTreeMap;
use std::ops::Range;

use crate::header::Mapping;
use crate::{BuildId, CodecError, ErrorKind, Header, NIL_BUILD, PAGE_SIZE, Result};

const WHAT: &str = "child header";

/// The blocks a pause changed, in units of `block_size` (4 KiB for rootfs, the page size for
/// memfile). Ranges are block indices, sorted and non-overlapping within each set; a block in
/// both sets counts as dirty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiffMetadata {
    /// Block size of the ranges (a multiple of 4096).
    pub block_size: u64,
    /// Blocks with new data, in device order.
    pub dirty: Vec<Range<u64>>,
    /// Blocks that now read as zeros.
    pub empty: Vec<Range<u64>>,
}

impl DiffMetadata {
    /// Number of dirty blocks (= the packed diff's size / block_size). Empty ranges count 0.
    pub fn dirty_blocks(&self) -> u64 {
        self.dirty.iter().fold(0u64, |acc, r| {
            acc.saturating_add(r.end.saturating_sub(r.start))
        })
    }
}

/// Builds the child header of `parent` for `new_build`: generation + 1, build id `new_build`,
/// base build id and version copied from the parent, builds section carried over for builds the
/// merged mappings still reference (V4/V5), mappings merged as described in the module docs.
///
/// Also copied: block size and size. For a V4/V5 parent, each carried builds entry has its frame
/// table trimmed to the storage ranges the child's mappings reference; the entry for
/// `new_build` itself is *not* added (the caller adds it after compressing the diff). A V3
/// parent gives an empty builds section.
///
/// Errors: a block size of 0 or not a multiple of 4096, unsorted or overlapping ranges within a
/// set, a nil `new_build`, or a `new_build` the parent already references are
/// [`ErrorKind::InvalidArgument`]; a block range reaching past the parent's mappings (which end
/// at `roundup(size, 4096)`) is [`ErrorKind::OutOfBounds`]; an invalid parent is reported as
/// by [`Header::validate`].
pub fn child_header(parent: &Header, new_build: BuildId, diff: &DiffMetadata) -> Result<Header> {
    parent.validate()?;
    let bs = diff.block_size;
    if bs == 0 || !bs.is_multiple_of(PAGE_SIZE) {
        return Err(invalid(format!(
            "block size {bs} is not a positive multiple of 4096"
        )));
    }
    if new_build.is_nil() {
        return Err(invalid("the new build id is nil".into()));
    }
    if parent.builds.contains_key(&new_build)
        || parent.mappings.iter().any(|m| m.build_id == new_build)
    {
        return Err(invalid(format!(
            "the parent already references build {new_build}"
        )));
    }
    let device_end = parent.mappings.last().map_or(0, Mapping::end);
    let dirty = byte_ranges(&diff.dirty, bs, device_end, "dirty")?;
    let empty = byte_ranges(&diff.empty, bs, device_end, "empty")?;

    // Diff mappings: dirty runs packed into the new build, empty runs minus dirty as nil.
    let mut overlay = Vec::with_capacity(dirty.len() + empty.len());
    let mut packed: u64 = 0;
    for &(s, e) in &dirty {
        overlay.push(Mapping {
            offset: s,
            length: e - s,
            build_id: new_build,
            build_storage_offset: packed,
        });
        packed += e - s; // bounded by device_end
    }
    for (s, e) in subtract(&empty, &dirty) {
        overlay.push(Mapping {
            offset: s,
            length: e - s,
            build_id: NIL_BUILD,
            build_storage_offset: 0,
        });
    }
    overlay.sort_unstable_by_key(|m| m.offset);

    let merged = normalize(merge(&parent.mappings, &overlay));

    let md = &parent.metadata;
    let generation = md
        .generation
        .checked_add(1)
        .ok_or_else(|| CodecError::corrupt(WHAT, "generation overflows"))?;
    let mut child = Header {
        metadata: crate::Metadata {
            version: md.version,
            block_size: md.block_size,
            size: md.size,
            generation,
            build_id: new_build,
            base_build_id: md.base_build_id,
        },
        incomplete: false,
        builds: BTreeMap::new(),
        mappings: merged,
    };
    if md.format() >= 4 {
        for id in child.referenced_builds() {
            if let Some(bd) = parent.builds.get(&id) {
                let mut entry = bd.clone();
                entry.frames = bd.frames.trimmed(&child.referenced_ranges(&id));
                child.builds.insert(id, entry);
            }
        }
    }
    child.validate()?;
    Ok(child)
}

fn invalid(detail: String) -> CodecError {
    CodecError::new(ErrorKind::InvalidArgument, WHAT, detail)
}

/// Block ranges -> byte ranges, checking order, overlap and bounds; empty ranges are dropped.
fn byte_ranges(
    ranges: &[Range<u64>],
    bs: u64,
    device_end: u64,
    set: &str,
) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if r.start > r.end {
            return Err(invalid(format!(
                "{set} range {}..{} is reversed",
                r.start, r.end
            )));
        }
        if r.start == r.end {
            continue;
        }
        let (s, e) = match (r.start.checked_mul(bs), r.end.checked_mul(bs)) {
            (Some(s), Some(e)) if e <= device_end => (s, e),
            _ => {
                return Err(CodecError::new(
                    ErrorKind::OutOfBounds,
                    WHAT,
                    format!(
                        "{set} blocks {}..{} (block size {bs}) reach past the device end {device_end:#x}",
                        r.start, r.end
                    ),
                ));
            }
        };
        if out.last().is_some_and(|&(_, pe)| s < pe) {
            return Err(invalid(format!(
                "{set} ranges are not sorted and non-overlapping at {}..{}",
                r.start, r.end
            )));
        }
        out.push((s, e));
    }
    Ok(out)
}

/// `a` minus `b`; both sorted and disjoint.
fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    subtract_indexed(a, b)
        .into_iter()
        .map(|(_, s, e)| (s, e))
        .collect()
}

/// `a` minus `b` (both sorted by start, disjoint), each piece tagged with the index of the `a`
/// range it comes from. One pass: O(|a| + |b| + overlaps).
fn subtract_indexed(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(usize, u64, u64)> {
    let mut out = Vec::new();
    let mut first = 0;
    for (i, &(s, e)) in a.iter().enumerate() {
        while b.get(first).is_some_and(|&(_, be)| be <= s) {
            first += 1;
        }
        let mut cur = s;
        let mut j = first;
        while cur < e {
            match b.get(j) {
                Some(&(bs, be)) if bs < e => {
                    if bs > cur {
                        out.push((i, cur, bs));
                    }
                    cur = cur.max(be);
                    j += 1;
                }
                _ => {
                    out.push((i, cur, e));
                    cur = e;
                }
            }
        }
    }
    out
}

/// Overlays the sorted, disjoint `overlay` mappings on the contiguous `base` mappings: the parts
/// of `base` not covered are kept (storage offsets shifted accordingly), the overlay wins.
fn merge(base: &[Mapping], overlay: &[Mapping]) -> Vec<Mapping> {
    let covered: Vec<(u64, u64)> = overlay.iter().map(|m| (m.offset, m.end())).collect();
    // Zero-length mappings (tolerated in legacy parents) carry nothing and vanish here.
    let ranges: Vec<(u64, u64)> = base.iter().map(|m| (m.offset, m.end())).collect();
    let mut out = Vec::with_capacity(base.len() + 2 * overlay.len());
    for (i, s, e) in subtract_indexed(&ranges, &covered) {
        let Some(b) = base.get(i) else { continue };
        out.push(Mapping {
            offset: s,
            length: e - s,
            build_id: b.build_id,
            build_storage_offset: if b.is_nil() {
                0
            } else {
                b.build_storage_offset + (s - b.offset)
            },
        });
    }
    out.extend_from_slice(overlay);
    out.sort_unstable_by_key(|m| m.offset);
    out
}

/// Joins adjacent mappings of the same build when storage-contiguous (nil runs always join).
fn normalize(mappings: Vec<Mapping>) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::with_capacity(mappings.len());
    for m in mappings {
        if let Some(last) = out.last_mut() {
            let joins = last.build_id == m.build_id
                && last.end() == m.offset
                && (m.is_nil()
                    || last.build_storage_offset.checked_add(last.length)
                        == Some(m.build_storage_offset));
            if joins {
                last.length += m.length;
                continue;
            }
        }
        out.push(m);
    }
    out
}
