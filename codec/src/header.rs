//! e2b build headers: the 64-byte metadata and the V3, V4 and V5 bodies.
//!
//! See `docs/formats.md` (and the reference it follows) for the byte layout. Reading dispatches
//! on `Version & 0xFFFF`: 1, 2, 3 -> V3 body; 4 -> V4; 5 -> V5. Writing produces the body of the
//! metadata's format version (V3 for versions 1..=3).

use std::collections::BTreeMap;

use crate::{BuildId, FrameTable, Result};

/// Cap on the uncompressed length of a V4/V5 body (e2b: 256 MiB, read and write side).
pub const MAX_BODY_LEN: u32 = 256 * 1024 * 1024;

/// Cap on the number of mappings in one header (V4 count, V5 N, and V3 records).
pub const MAX_MAPPINGS: u32 = 8 * 1024 * 1024;

/// Cap on the number of distinct builds in one header (V4/V5 builds section, V5 build table).
pub const MAX_BUILDS: u32 = 65_535;

/// Versions below this downgrade some validation errors (unaligned or out-of-bounds offsets) to
/// tolerated conditions, as e2b's `NormalizeFixVersion`.
pub const NORMALIZE_FIX_VERSION: u64 = 3;

/// The 64-byte little-endian metadata that starts every header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metadata {
    /// Format version; the format is `version & 0xFFFF`.
    pub version: u64,
    /// 4096 for rootfs; the guest page size (4096 or 2 MiB) for memfile.
    pub block_size: u64,
    /// Logical device size in bytes.
    pub size: u64,
    /// Pause/resume depth: base template 0, +1 per pause (legacy synthetic headers: 1).
    pub generation: u64,
    /// The build that owns this header.
    pub build_id: BuildId,
    /// The root template build of the chain.
    pub base_build_id: BuildId,
}

impl Metadata {
    /// Encoded length.
    pub const LEN: usize = 64;

    /// The format version, `version & 0xFFFF`.
    pub fn format(&self) -> u16 {
        todo!()
    }

    /// Parses the first 64 bytes of `input`.
    pub fn parse(input: &[u8]) -> Result<Metadata> {
        let _ = input;
        todo!()
    }

    /// Appends the 64-byte form to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        let _ = out;
        todo!()
    }
}

/// One mapping: device bytes `[offset, offset + length)` are stored in build `build_id`'s data
/// file at `[build_storage_offset, +length)`; the nil build means zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// Device byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Owning build; [`crate::NIL_BUILD`] = zeros.
    pub build_id: BuildId,
    /// Byte offset inside the build's (uncompressed) data file.
    pub build_storage_offset: u64,
}

impl Mapping {
    /// One past the mapping's last device byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }

    /// True when the mapping reads as zeros.
    pub fn is_nil(&self) -> bool {
        self.build_id.is_nil()
    }
}

/// What a header says about one build's data file (V4/V5 builds section).
///
/// A *zero* entry (size 0, zero checksum, uncompressed table) means "uncompressed, size unknown"
/// (written for V3-era ancestors).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BuildData {
    /// Uncompressed size of the data file; 0 = unknown.
    pub size: u64,
    /// SHA-256 of the uncompressed data file; all zero = unknown.
    pub checksum: [u8; 32],
    /// The frame table; uncompressed when it has no codec.
    pub frames: FrameTable,
}

impl BuildData {
    /// True for the zero entry ("uncompressed, size unknown").
    pub fn is_zero(&self) -> bool {
        self.size == 0 && self.checksum == [0; 32] && !self.frames.is_compressed()
    }
}

/// The result of looking up a device offset (e2b `GetShiftedMapping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedMapping {
    /// Build holding the bytes (nil = zeros).
    pub build_id: BuildId,
    /// Offset inside that build's data file.
    pub offset: u64,
    /// Bytes left in this mapping from the looked-up offset.
    pub length: u64,
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The metadata.
    pub metadata: Metadata,
    /// V4/V5 flags bit 0 (`IncompletePendingUpload`); never persisted as true.
    pub incomplete: bool,
    /// V4/V5 builds section (empty for V3).
    pub builds: BTreeMap<BuildId, BuildData>,
    /// Mappings sorted by offset, contiguous, covering `[0, size)` (nil gaps explicit).
    pub mappings: Vec<Mapping>,
}

impl Header {
    /// Parses a header of any version 1..=5.
    pub fn parse(input: &[u8]) -> Result<Header> {
        let _ = input;
        todo!()
    }

    /// Serializes in the format of `metadata.format()` (1..=3 -> V3 body).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        todo!()
    }

    /// Checks the invariants: mappings sorted, contiguous, covering `[0, size)`, 4 KiB aligned,
    /// no zero lengths (tolerated below [`NORMALIZE_FIX_VERSION`] as e2b does); block size
    /// non-zero.
    pub fn validate(&self) -> Result<()> {
        todo!()
    }

    /// e2b `GetShiftedMapping`: the mapping holding device `offset` (must be < size and 4 KiB
    /// aligned from version 3 on), shifted to start at `offset`.
    pub fn resolve(&self, offset: u64) -> Result<ResolvedMapping> {
        let _ = offset;
        todo!()
    }

    /// The builds-section entry for `build`, if any.
    pub fn build_data(&self, build: &BuildId) -> Option<&BuildData> {
        self.builds.get(build)
    }
}
