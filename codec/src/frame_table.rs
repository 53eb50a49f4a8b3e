//! Frame tables: where each independently decodable frame of a compressed data object lies, in
//! uncompressed (U) and compressed (C) space.
//!
//! On disk (inside V4/V5 header builds sections), little-endian:
//! `u32 compressionType` (0 none, 1 zstd, 2 lz4), `u32 nFrames`, then nFrames x 24-byte entries
//! `{StartU i64, StartC i64, SizeU i32, SizeC i32}`. Entries are sorted, non-overlapping in both
//! spaces, sizes > 0. Tables in a header may be *sparse* (gaps in U space) when trimmed to the
//! ranges a header's mappings reference.

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
        todo!()
    }

    /// From the on-disk id; unknown ids are [`ErrorKind::Unsupported`].
    pub fn from_id(id: u32) -> Result<Self> {
        let _ = id;
        todo!()
    }

    /// The data object suffix: `""`, `".zstd"`, `".lz4"`.
    pub fn suffix(self) -> &'static str {
        todo!()
    }

    /// Lower-case name: `none`, `zstd`, `lz4`.
    pub fn as_str(self) -> &'static str {
        todo!()
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
    /// One past the frame's last uncompressed byte.
    pub fn end_u(&self) -> u64 {
        self.start_u + u64::from(self.size_u)
    }

    /// One past the frame's last compressed byte.
    pub fn end_c(&self) -> u64 {
        self.start_c + u64::from(self.size_c)
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

impl FrameTable {
    /// An empty table: the data is uncompressed.
    pub fn uncompressed() -> Self {
        Self::default()
    }

    /// Validates and builds a table. `compression == None` with frames is [`ErrorKind::Corrupt`];
    /// a compressed type with zero frames is allowed (an empty object).
    pub fn new(compression: CompressionType, frames: Vec<Frame>) -> Result<Self> {
        let _ = (compression, frames);
        todo!()
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
        let _ = offset_u;
        todo!()
    }

    /// A copy trimmed to the frames that overlap any of the U ranges `[start, end)` given
    /// (ranges in any order, may overlap). Used for ancestor entries in a child header.
    pub fn trimmed(&self, ranges: &[(u64, u64)]) -> FrameTable {
        let _ = ranges;
        todo!()
    }

    /// Total uncompressed bytes of the frames.
    pub fn total_u(&self) -> u64 {
        todo!()
    }

    /// Total compressed bytes of the frames.
    pub fn total_c(&self) -> u64 {
        todo!()
    }

    /// Parses a table from the start of `input`; returns it and the bytes consumed.
    /// `nFrames` is checked against [`MAX_FRAMES`] and against the bytes present before anything
    /// is allocated.
    pub fn parse(input: &[u8]) -> Result<(FrameTable, usize)> {
        let _ = input;
        todo!()
    }

    /// Appends the on-disk form to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        let _ = out;
        todo!()
    }
}

#[allow(dead_code)]
fn _kind_used() -> ErrorKind {
    let _ = CodecError::corrupt("x", "y");
    ErrorKind::Corrupt
}
