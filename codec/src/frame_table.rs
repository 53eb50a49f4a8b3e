//! Frame tables: where each independently decodable frame of a compressed data object lies, in
//! uncompressed (U) and compressed (C) space.
//!
//! On disk (inside V4/V5 header builds sections), little-endian:
//! `u32 compressionType` (0 none, 1 zstd, 2 lz4), `u32 nFrames`, then nFrames x 24-byte entries
//! `{StartU i64, StartC i64, SizeU i32, SizeC i32}`. Entries are sorted, non-overlapping in both
//! spaces, sizes > 0. Tables in a header may be *sparse* (gaps in U space) when trimmed to the
//! ranges a header's mappings reference.
//!
//! Parsing follows e2b's reader: a table whose compression type is 0 *or* whose frame count is 0
//! is "no frame table" (uncompressed); type 0 with frames is corrupt. Unlike e2b, unknown
//! compression ids are rejected ([`ErrorKind::Unsupported`]) and frame sizes are capped at
//! [`MAX_FRAME_SIZE`].

use crate::{CodecError, ErrorKind, Result};

/// Most frames one table may hold (e2b's cap).
pub const MAX_FRAMES: u32 = 1 << 20;

/// Largest uncompressed (and compressed) size of one frame that thaw accepts: the cap checked
/// before any frame buffer is allocated. e2b writes 2 MiB frames; this leaves generous room.
pub const MAX_FRAME_SIZE: u32 = 64 * 1024 * 1024;

/// On-disk size of one frame entry.
pub const FRAME_ENTRY_LEN: usize = 24;

/// The codec of a build's data object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompressionType {
    /// Stored as is (no frame table).
    #[default]
    None,
    /// One standard zstd frame per table frame (content checksum on).
    Zstd,
    /// One LZ4 frame-format stream per table frame (block checksums on).
    Lz4,
}

impl CompressionType {
    /// The on-disk id: 0 none, 1 zstd, 2 lz4.
    pub fn id(self) -> u32 {
        match self {
            Self::None => 0,
            Self::Zstd => 1,
            Self::Lz4 => 2,
        }
    }

    /// From the on-disk id; unknown ids are [`ErrorKind::Unsupported`].
    pub fn from_id(id: u32) -> Result<Self> {
        match id {
            0 => Ok(Self::None),
            1 => Ok(Self::Zstd),
            2 => Ok(Self::Lz4),
            other => Err(CodecError::new(
                ErrorKind::Unsupported,
                "compression type",
                format!("unknown compression id {other}"),
            )),
        }
    }

    /// The data object suffix: `""`, `".zstd"`, `".lz4"`.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::None => "",
            Self::Zstd => ".zstd",
            Self::Lz4 => ".lz4",
        }
    }

    /// Lower-case name: `none`, `zstd`, `lz4`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Zstd => "zstd",
            Self::Lz4 => "lz4",
        }
    }
}

impl std::fmt::Display for CompressionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One frame: `[start_u, start_u + size_u)` of the uncompressed file is stored, compressed, at
/// `[start_c, start_c + size_c)` of the data object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Uncompressed offset of the frame's first byte.
    pub start_u: u64,
    /// Offset of the frame's first byte inside the compressed data object.
    pub start_c: u64,
    /// Uncompressed size (> 0, <= [`MAX_FRAME_SIZE`]).
    pub size_u: u32,
    /// Compressed size (> 0, <= [`MAX_FRAME_SIZE`]).
    pub size_c: u32,
}

impl Frame {
    /// One past the frame's last uncompressed byte (saturating; a validated table never
    /// saturates).
    pub fn end_u(&self) -> u64 {
        self.start_u.saturating_add(u64::from(self.size_u))
    }

    /// One past the frame's last compressed byte (saturating; a validated table never
    /// saturates).
    pub fn end_c(&self) -> u64 {
        self.start_c.saturating_add(u64::from(self.size_c))
    }
}

/// A validated frame table. `compression == None` implies no frames ("uncompressed").
///
/// Invariants (enforced by every constructor): frames sorted by `start_u`, strictly
/// non-overlapping in U and in C space (C ascending too), sizes > 0 and <= [`MAX_FRAME_SIZE`],
/// at most [`MAX_FRAMES`] entries, no end offset overflows `i64`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FrameTable {
    compression: CompressionType,
    frames: Vec<Frame>,
}

const WHAT: &str = "frame table";

/// Largest offset an end may reach: the on-disk fields are `i64`.
const MAX_END: u64 = i64::MAX.cast_unsigned();

impl FrameTable {
    /// An empty table: the data is uncompressed.
    pub fn uncompressed() -> Self {
        Self::default()
    }

    /// Validates and builds a table. `compression == None` with frames is [`ErrorKind::Corrupt`];
    /// a compressed type with zero frames is allowed (an empty object). More than
    /// [`MAX_FRAMES`] frames or a frame larger than [`MAX_FRAME_SIZE`] is
    /// [`ErrorKind::TooLarge`]; zero sizes, unsorted or overlapping frames (in U or C space) and
    /// ends past `i64::MAX` are [`ErrorKind::Corrupt`].
    pub fn new(compression: CompressionType, frames: Vec<Frame>) -> Result<Self> {
        if compression == CompressionType::None && !frames.is_empty() {
            return Err(CodecError::corrupt(
                WHAT,
                format!("compression type none with {} frames", frames.len()),
            ));
        }
        let count = u64::try_from(frames.len()).unwrap_or(u64::MAX);
        if count > u64::from(MAX_FRAMES) {
            return Err(CodecError::too_large(
                "frame table frame count",
                count,
                u64::from(MAX_FRAMES),
            ));
        }
        let mut prev: Option<&Frame> = None;
        for (i, f) in frames.iter().enumerate() {
            check_frame(i, f)?;
            if let Some(p) = prev {
                if f.start_u < p.end_u() {
                    return Err(CodecError::corrupt(
                        WHAT,
                        format!(
                            "frame {i} starts at U {} before the end of frame {} (U {})",
                            f.start_u,
                            i - 1,
                            p.end_u()
                        ),
                    ));
                }
                if f.start_c < p.end_c() {
                    return Err(CodecError::corrupt(
                        WHAT,
                        format!(
                            "frame {i} starts at C {} before the end of frame {} (C {})",
                            f.start_c,
                            i - 1,
                            p.end_c()
                        ),
                    ));
                }
            }
            prev = Some(f);
        }
        Ok(Self {
            compression,
            frames,
        })
    }

    /// The codec.
    pub fn compression(&self) -> CompressionType {
        self.compression
    }

    /// The frames, sorted.
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// True when the table describes compressed data (a codec other than none).
    pub fn is_compressed(&self) -> bool {
        self.compression != CompressionType::None
    }

    /// Index of the frame whose U range holds `offset_u`, or `None` (offset in a gap or past the
    /// end). Binary search.
    pub fn locate(&self, offset_u: u64) -> Option<usize> {
        let idx = self
            .frames
            .partition_point(|f| f.start_u <= offset_u)
            .checked_sub(1)?;
        let frame = self.frames.get(idx)?;
        (offset_u < frame.end_u()).then_some(idx)
    }

    /// A copy trimmed to the frames that overlap any of the U ranges `[start, end)` given
    /// (ranges in any order, may overlap). Used for ancestor entries in a child header.
    ///
    /// Empty ranges (`start >= end`) select nothing; an empty `ranges` gives a table with the
    /// same codec and no frames (which is written as "no frame table").
    pub fn trimmed(&self, ranges: &[(u64, u64)]) -> FrameTable {
        let merged = merge_ranges(ranges);
        let mut frames = Vec::new();
        let mut ri = 0;
        for f in &self.frames {
            // Merged ranges are disjoint and sorted: skip the ones ending at or before this
            // frame (they end before every later frame too).
            while merged.get(ri).is_some_and(|&(_, e)| e <= f.start_u) {
                ri += 1;
            }
            if merged.get(ri).is_some_and(|&(s, _)| s < f.end_u()) {
                frames.push(*f);
            }
        }
        FrameTable {
            compression: self.compression,
            frames,
        }
    }

    /// Total uncompressed bytes of the frames.
    pub fn total_u(&self) -> u64 {
        self.frames.iter().map(|f| u64::from(f.size_u)).sum()
    }

    /// Total compressed bytes of the frames.
    pub fn total_c(&self) -> u64 {
        self.frames.iter().map(|f| u64::from(f.size_c)).sum()
    }

    /// Parses a table from the start of `input`; returns it and the bytes consumed.
    /// `nFrames` is checked against [`MAX_FRAMES`] and against the bytes present before anything
    /// is allocated.
    ///
    /// As in e2b, a compression type of 0 or a frame count of 0 yields an uncompressed table;
    /// type 0 with frames is [`ErrorKind::Corrupt`]; an unknown type is
    /// [`ErrorKind::Unsupported`]; negative offsets or non-positive sizes are
    /// [`ErrorKind::Corrupt`].
    pub fn parse(input: &[u8]) -> Result<(FrameTable, usize)> {
        let head = input
            .get(..8)
            .ok_or_else(|| CodecError::truncated(WHAT, 8, input.len() as u64))?;
        let ct_id = le_u32(head, 0);
        let n = le_u32(head, 4);
        if ct_id == 0 && n > 0 {
            return Err(CodecError::corrupt(
                WHAT,
                format!("compression type 0 with {n} frames"),
            ));
        }
        let compression = CompressionType::from_id(ct_id)?;
        if n > MAX_FRAMES {
            return Err(CodecError::too_large(
                "frame table frame count",
                u64::from(n),
                u64::from(MAX_FRAMES),
            ));
        }
        if n == 0 {
            return Ok((FrameTable::uncompressed(), 8));
        }
        // n <= 2^20, so this can't overflow.
        let body_len = (n as usize) * FRAME_ENTRY_LEN;
        let rest = input.get(8..).unwrap_or_default();
        let body = rest
            .get(..body_len)
            .ok_or_else(|| CodecError::truncated(WHAT, body_len as u64, rest.len() as u64))?;
        let mut frames = Vec::with_capacity(n as usize);
        for (i, e) in body.chunks_exact(FRAME_ENTRY_LEN).enumerate() {
            let start_u = le_i64(e, 0);
            let start_c = le_i64(e, 8);
            let size_u = le_i32(e, 16);
            let size_c = le_i32(e, 20);
            if start_u < 0 || start_c < 0 {
                return Err(CodecError::corrupt(
                    WHAT,
                    format!("frame {i} has a negative start (U {start_u}, C {start_c})"),
                ));
            }
            if size_u <= 0 || size_c <= 0 {
                return Err(CodecError::corrupt(
                    WHAT,
                    format!("frame {i} has a zero or negative size (U {size_u}, C {size_c})"),
                ));
            }
            frames.push(Frame {
                start_u: start_u.cast_unsigned(),
                start_c: start_c.cast_unsigned(),
                size_u: size_u.cast_unsigned(),
                size_c: size_c.cast_unsigned(),
            });
        }
        let table = FrameTable::new(compression, frames)?;
        Ok((table, 8 + body_len))
    }

    /// Appends the on-disk form to `out`. An uncompressed table is written as type 0 with no
    /// frames.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.compression.id().to_le_bytes());
        let n = if self.is_compressed() {
            self.frames.len()
        } else {
            0
        };
        // The invariants bound the count by MAX_FRAMES.
        out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
        for f in self.frames.iter().take(n) {
            // Invariants: offsets <= i64::MAX and sizes <= MAX_FRAME_SIZE < i32::MAX, so the
            // unsigned little-endian bytes equal the signed on-disk encoding.
            out.extend_from_slice(&f.start_u.to_le_bytes());
            out.extend_from_slice(&f.start_c.to_le_bytes());
            out.extend_from_slice(&f.size_u.to_le_bytes());
            out.extend_from_slice(&f.size_c.to_le_bytes());
        }
    }

    /// The on-disk length of this table.
    pub fn encoded_len(&self) -> usize {
        let n = if self.is_compressed() {
            self.frames.len()
        } else {
            0
        };
        8 + n * FRAME_ENTRY_LEN
    }
}

fn check_frame(i: usize, f: &Frame) -> Result<()> {
    if f.size_u == 0 || f.size_c == 0 {
        return Err(CodecError::corrupt(
            WHAT,
            format!("frame {i} has a zero size (U {}, C {})", f.size_u, f.size_c),
        ));
    }
    let largest = f.size_u.max(f.size_c);
    if largest > MAX_FRAME_SIZE {
        return Err(CodecError::too_large(
            "frame size",
            u64::from(largest),
            u64::from(MAX_FRAME_SIZE),
        ));
    }
    let end_u = f.start_u.checked_add(u64::from(f.size_u));
    let end_c = f.start_c.checked_add(u64::from(f.size_c));
    match (end_u, end_c) {
        (Some(u), Some(c)) if u <= MAX_END && c <= MAX_END => Ok(()),
        _ => Err(CodecError::corrupt(
            WHAT,
            format!("frame {i} ends past i64::MAX"),
        )),
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_i32(b: &[u8], at: usize) -> i32 {
    le_u32(b, at).cast_signed()
}

fn le_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    i64::from_le_bytes(a)
}

/// Sorts `ranges`, drops empty ones and merges overlapping or touching ones.
pub(crate) fn merge_ranges(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut sorted: Vec<(u64, u64)> = ranges.iter().copied().filter(|(s, e)| s < e).collect();
    sorted.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (s, e) in sorted {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(start_u: u64, start_c: u64, size_u: u32, size_c: u32) -> Frame {
        Frame {
            start_u,
            start_c,
            size_u,
            size_c,
        }
    }

    /// Hand-written on-disk table: type, count, then `(StartU, StartC, SizeU, SizeC)` entries.
    fn raw(ct: u32, n: u32, entries: &[(i64, i64, i32, i32)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&ct.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        for &(su, sc, zu, zc) in entries {
            b.extend_from_slice(&su.to_le_bytes());
            b.extend_from_slice(&sc.to_le_bytes());
            b.extend_from_slice(&zu.to_le_bytes());
            b.extend_from_slice(&zc.to_le_bytes());
        }
        b
    }

    #[test]
    fn compression_type_ids_suffixes_names() {
        for (ct, id, suffix, name) in [
            (CompressionType::None, 0, "", "none"),
            (CompressionType::Zstd, 1, ".zstd", "zstd"),
            (CompressionType::Lz4, 2, ".lz4", "lz4"),
        ] {
            assert_eq!(ct.id(), id);
            assert_eq!(CompressionType::from_id(id).unwrap(), ct);
            assert_eq!(ct.suffix(), suffix);
            assert_eq!(ct.as_str(), name);
            assert_eq!(ct.to_string(), name);
        }
        assert_eq!(
            CompressionType::from_id(3).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn new_validates() {
        let zstd = CompressionType::Zstd;
        assert!(FrameTable::new(zstd, vec![f(0, 0, 10, 5), f(10, 5, 10, 5)]).is_ok());
        // Sparse in U and C is fine.
        assert!(FrameTable::new(zstd, vec![f(0, 0, 10, 5), f(100, 50, 10, 5)]).is_ok());
        // A compressed type with no frames is an empty object.
        assert!(FrameTable::new(zstd, vec![]).is_ok());
        let kind = |c, v| FrameTable::new(c, v).unwrap_err().kind();
        assert_eq!(
            kind(CompressionType::None, vec![f(0, 0, 1, 1)]),
            ErrorKind::Corrupt
        );
        assert_eq!(kind(zstd, vec![f(0, 0, 0, 1)]), ErrorKind::Corrupt);
        assert_eq!(kind(zstd, vec![f(0, 0, 1, 0)]), ErrorKind::Corrupt);
        assert_eq!(
            kind(zstd, vec![f(0, 0, MAX_FRAME_SIZE + 1, 1)]),
            ErrorKind::TooLarge
        );
        // Overlap in U, overlap in C, descending order.
        assert_eq!(
            kind(zstd, vec![f(0, 0, 10, 5), f(9, 5, 10, 5)]),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind(zstd, vec![f(0, 0, 10, 5), f(10, 4, 10, 5)]),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind(zstd, vec![f(10, 5, 10, 5), f(0, 0, 10, 5)]),
            ErrorKind::Corrupt
        );
        // Ends past i64::MAX.
        let big = i64::MAX.cast_unsigned() - 5;
        assert_eq!(kind(zstd, vec![f(big, 0, 10, 5)]), ErrorKind::Corrupt);
        assert_eq!(kind(zstd, vec![f(0, big, 10, 10)]), ErrorKind::Corrupt);
        assert_eq!(kind(zstd, vec![f(u64::MAX, 0, 10, 5)]), ErrorKind::Corrupt);
    }

    #[test]
    fn locate_and_totals() {
        let t = FrameTable::new(
            CompressionType::Lz4,
            vec![f(0, 0, 10, 3), f(20, 3, 10, 4), f(30, 7, 5, 2)],
        )
        .unwrap();
        assert_eq!(t.locate(0), Some(0));
        assert_eq!(t.locate(9), Some(0));
        assert_eq!(t.locate(10), None); // gap
        assert_eq!(t.locate(19), None);
        assert_eq!(t.locate(20), Some(1));
        assert_eq!(t.locate(30), Some(2));
        assert_eq!(t.locate(34), Some(2));
        assert_eq!(t.locate(35), None);
        assert_eq!(t.locate(u64::MAX), None);
        assert_eq!(t.total_u(), 25);
        assert_eq!(t.total_c(), 9);
        assert_eq!(FrameTable::uncompressed().locate(0), None);
    }

    #[test]
    fn trimmed_keeps_overlapping_frames() {
        let frames: Vec<Frame> = (0..6).map(|i| f(i * 10, i * 4, 10, 4)).collect();
        let t = FrameTable::new(CompressionType::Zstd, frames.clone()).unwrap();
        let starts = |t: &FrameTable| t.frames().iter().map(|f| f.start_u).collect::<Vec<_>>();
        // Ranges in any order, overlapping, touching frame edges.
        let r = t.trimmed(&[(45, 46), (12, 15), (13, 20), (0, 0)]);
        assert_eq!(starts(&r), vec![10, 40]);
        assert_eq!(r.compression(), CompressionType::Zstd);
        // A range ending exactly at a frame start does not select it.
        assert_eq!(starts(&t.trimmed(&[(5, 10)])), vec![0]);
        assert_eq!(starts(&t.trimmed(&[(9, 21)])), vec![0, 10, 20]);
        assert_eq!(
            starts(&t.trimmed(&[(0, u64::MAX)])),
            vec![0, 10, 20, 30, 40, 50]
        );
        assert!(t.trimmed(&[]).frames().is_empty());
        assert!(t.trimmed(&[(60, 100)]).frames().is_empty());
        // Trimming a trimmed table is stable.
        assert_eq!(r.trimmed(&[(0, 100)]), r);
    }

    #[test]
    fn parse_hand_written_sparse_table() {
        let mut bytes = raw(1, 2, &[(0, 0, 4096, 100), (8192, 300, 4096, 80)]);
        bytes.extend_from_slice(b"next");
        let (t, used) = FrameTable::parse(&bytes).unwrap();
        assert_eq!(used, 8 + 48);
        assert_eq!(t.compression(), CompressionType::Zstd);
        assert_eq!(t.frames(), &[f(0, 0, 4096, 100), f(8192, 300, 4096, 80)]);
        let mut out = Vec::new();
        t.write(&mut out);
        assert_eq!(out, bytes[..used]);
        assert_eq!(t.encoded_len(), used);
    }

    #[test]
    fn parse_uncompressed_forms() {
        let (t, used) = FrameTable::parse(&raw(0, 0, &[])).unwrap();
        assert_eq!((t, used), (FrameTable::uncompressed(), 8));
        // e2b: a codec with zero frames is "no frame table".
        let (t, _) = FrameTable::parse(&raw(2, 0, &[])).unwrap();
        assert!(!t.is_compressed());
        let mut out = Vec::new();
        FrameTable::uncompressed().write(&mut out);
        assert_eq!(out, raw(0, 0, &[]));
    }

    #[test]
    fn parse_rejects_bad_tables() {
        let kind = |b: &[u8]| FrameTable::parse(b).unwrap_err().kind();
        assert_eq!(kind(&[1, 0, 0]), ErrorKind::Truncated);
        assert_eq!(kind(&raw(0, 1, &[(0, 0, 1, 1)])), ErrorKind::Corrupt);
        assert_eq!(kind(&raw(7, 1, &[(0, 0, 1, 1)])), ErrorKind::Unsupported);
        assert_eq!(kind(&raw(1, MAX_FRAMES + 1, &[])), ErrorKind::TooLarge);
        assert_eq!(kind(&raw(1, u32::MAX, &[])), ErrorKind::TooLarge);
        // Count larger than the bytes present.
        assert_eq!(kind(&raw(1, 1000, &[(0, 0, 1, 1)])), ErrorKind::Truncated);
        assert_eq!(kind(&raw(1, 1, &[(-1, 0, 1, 1)])), ErrorKind::Corrupt);
        assert_eq!(kind(&raw(1, 1, &[(0, -8, 1, 1)])), ErrorKind::Corrupt);
        assert_eq!(kind(&raw(1, 1, &[(0, 0, -1, 1)])), ErrorKind::Corrupt);
        assert_eq!(kind(&raw(1, 1, &[(0, 0, 1, 0)])), ErrorKind::Corrupt);
        assert_eq!(
            kind(&raw(1, 1, &[(0, 0, i32::MAX, 1)])),
            ErrorKind::TooLarge
        );
        assert_eq!(
            kind(&raw(1, 2, &[(100, 0, 10, 1), (0, 1, 10, 1)])),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind(&raw(1, 2, &[(0, 0, 10, 5), (5, 5, 10, 5)])),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind(&raw(1, 2, &[(0, 10, 10, 5), (10, 0, 10, 5)])),
            ErrorKind::Corrupt
        );
        assert_eq!(
            kind(&raw(1, 1, &[(i64::MAX - 4, 0, 10, 5)])),
            ErrorKind::Corrupt
        );
        // Every truncation of a valid table fails cleanly.
        let ok = raw(2, 2, &[(0, 0, 4096, 100), (4096, 100, 4096, 80)]);
        for cut in 0..ok.len() {
            assert_eq!(kind(&ok[..cut]), ErrorKind::Truncated, "cut at {cut}");
        }
    }
}
