//! e2b build headers: the 64-byte metadata and the V3, V4 and V5 bodies.
//!
//! See `docs/formats.md` (and the reference it follows) for the byte layout. Reading dispatches
//! on `Version & 0xFFFF`: 1, 2, 3 -> V3 body; 4 -> V4; 5 -> V5 (0 and > 5 are
//! [`ErrorKind::Unsupported`]). Writing produces the body of the metadata's format version (V3 for
//! versions 1..=3).
//!
//! Every parsed header is validated ([`Header::validate`]): mappings sorted, contiguous, covering
//! `[0, size)`, 4 KiB aligned, lengths > 0 — with e2b's tolerance for versions below
//! [`NORMALIZE_FIX_VERSION`].

use std::collections::{BTreeMap, BTreeSet};

use crate::frame_table::merge_ranges;
use crate::{BuildId, CodecError, ErrorKind, FrameTable, PAGE_SIZE, Result};

mod cursor;
mod v3;
mod v4;
mod v5;

/// Cap on the uncompressed length of a V4/V5 body (e2b: 256 MiB, read and write side).
pub const MAX_BODY_LEN: u32 = 256 * 1024 * 1024;

/// Cap on the number of mappings in one header (V4 count, V5 N, and V3 records). It also bounds
/// the mappings a V5 body reconstructs (non-empty entries plus the nil gaps between them), and
/// [`Header::to_bytes`] refuses headers with more mappings than this, so whatever thaw writes it
/// can read back.
pub const MAX_MAPPINGS: u32 = 8 * 1024 * 1024;

/// Cap on the number of distinct builds in one header (V4/V5 builds section, V5 build table).
pub const MAX_BUILDS: u32 = 65_535;

/// Versions below this downgrade some validation errors (unaligned or out-of-bounds offsets) to
/// tolerated conditions, as e2b's `NormalizeFixVersion`.
pub const NORMALIZE_FIX_VERSION: u64 = 3;

/// Length of one V3/V4 mapping record.
pub const MAPPING_RECORD_LEN: usize = 40;

/// V4/V5 flags bit 0: the header describes a build whose upload is still in flight.
pub const FLAG_INCOMPLETE: u8 = 0x01;

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
        let b = self.version.to_le_bytes();
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Parses the first 64 bytes of `input`.
    pub fn parse(input: &[u8]) -> Result<Metadata> {
        let mut c = cursor::Cursor::new(input, "metadata");
        if c.remaining() < Self::LEN {
            return Err(CodecError::truncated(
                "metadata",
                Self::LEN as u64,
                input.len() as u64,
            ));
        }
        Ok(Metadata {
            version: c.u64()?,
            block_size: c.u64()?,
            size: c.u64()?,
            generation: c.u64()?,
            build_id: c.uuid()?,
            base_build_id: c.uuid()?,
        })
    }

    /// Appends the 64-byte form to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(self.build_id.as_bytes());
        out.extend_from_slice(self.base_build_id.as_bytes());
    }

    /// True when the full version is at least [`NORMALIZE_FIX_VERSION`] (e2b compares the whole
    /// `Version`, not the masked format): alignment and bounds are enforced strictly.
    pub fn is_normalize_fix_applied(&self) -> bool {
        self.version >= NORMALIZE_FIX_VERSION
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

    /// Parses one 40-byte V3/V4 record.
    fn read_record(c: &mut cursor::Cursor<'_>) -> Result<Mapping> {
        Ok(Mapping {
            offset: c.u64()?,
            length: c.u64()?,
            build_id: c.uuid()?,
            build_storage_offset: c.u64()?,
        })
    }

    /// Appends the 40-byte V3/V4 record.
    fn write_record(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(self.build_id.as_bytes());
        out.extend_from_slice(&self.build_storage_offset.to_le_bytes());
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
    ///
    /// Parsing never back-fills entries: a V3 header always has an empty map (e2b back-fills
    /// zero entries for V3 headers at load time; thaw callers treat "no entry" in a V3 header as
    /// "uncompressed, size unknown" instead), and a V4/V5 header has exactly the entries on disk
    /// (a missing entry means "resolve through that build's own header", e2b fix #3447).
    pub builds: BTreeMap<BuildId, BuildData>,
    /// Mappings sorted by offset, contiguous, covering `[0, size)` (nil gaps explicit).
    pub mappings: Vec<Mapping>,
}

impl Header {
    /// Parses a header of any version 1..=5 and validates it.
    ///
    /// A V3 body with no records, and a V4 body with no mappings, stand for one mapping
    /// `{0, roundup(size, 4096), build_id, 0}` (none when `size` is 0), as in e2b.
    pub fn parse(input: &[u8]) -> Result<Header> {
        let metadata = Metadata::parse(input)?;
        let body = input.get(Metadata::LEN..).unwrap_or_default();
        let header = match metadata.format() {
            1..=3 => v3::parse(metadata, body)?,
            4 => v4::parse(metadata, body)?,
            5 => v5::parse(metadata, body)?,
            other => {
                return Err(CodecError::new(
                    ErrorKind::Unsupported,
                    "header",
                    format!(
                        "unknown header format {other} (version {:#x})",
                        metadata.version
                    ),
                ));
            }
        };
        header.validate()?;
        Ok(header)
    }

    /// Serializes in the format of `metadata.format()` (1..=3 -> V3 body).
    ///
    /// The header is validated first. `incomplete == true` is refused
    /// ([`ErrorKind::InvalidArgument`]: it is never persisted, and V3 cannot express it), as are
    /// more than [`MAX_MAPPINGS`] mappings, more than [`MAX_BUILDS`] builds, and a V4/V5 body
    /// longer than [`MAX_BODY_LEN`] ([`ErrorKind::TooLarge`]). Frame tables are written as
    /// they are (not trimmed; [`crate::diff::child_header`] trims ancestor tables).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.validate()?;
        if self.incomplete {
            return Err(CodecError::new(
                ErrorKind::InvalidArgument,
                "header",
                "refusing to serialize a header flagged incomplete (pending upload)",
            ));
        }
        let count = self.mappings.len() as u64;
        if count > u64::from(MAX_MAPPINGS) {
            return Err(CodecError::too_large(
                "header mappings",
                count,
                u64::from(MAX_MAPPINGS),
            ));
        }
        match self.metadata.format() {
            1..=3 => Ok(v3::write(self)),
            4 => v4::write(self),
            5 => v5::write(self),
            other => Err(CodecError::new(
                ErrorKind::Unsupported,
                "header",
                format!("cannot write header format {other}"),
            )),
        }
    }

    /// Checks the invariants: mappings sorted, contiguous, covering `[0, size)`, 4 KiB aligned,
    /// no zero lengths (tolerated below [`NORMALIZE_FIX_VERSION`] as e2b does); block size
    /// non-zero.
    ///
    /// Exactly, from version 3 on: the first mapping starts at 0, each next one starts where the
    /// previous one ends, offsets, lengths and (non-nil) storage offsets are multiples of 4096,
    /// lengths are > 0, and the last mapping ends at `roundup(size, 4096)`. Below version 3
    /// alignment is not required, zero-length mappings are tolerated, and the last mapping may
    /// end anywhere in `[size, max(size + block_size, roundup(size, 4096))]` (e2b's legacy rule). A `size` of 0 requires no
    /// mappings. Storage ranges must not overflow `u64`. All violations are
    /// [`ErrorKind::Corrupt`].
    pub fn validate(&self) -> Result<()> {
        const WHAT: &str = "header mappings";
        let md = &self.metadata;
        if md.block_size == 0 {
            return Err(CodecError::corrupt("metadata", "block size is zero"));
        }
        let strict = md.is_normalize_fix_applied();
        let mut pos: u64 = 0;
        for (i, m) in self.mappings.iter().enumerate() {
            if m.offset != pos {
                let kind = if m.offset > pos { "gap" } else { "overlap" };
                return Err(CodecError::corrupt(
                    WHAT,
                    format!(
                        "{kind}: mapping {i} starts at {:#x}, expected {pos:#x}",
                        m.offset
                    ),
                ));
            }
            let end = m
                .offset
                .checked_add(m.length)
                .ok_or_else(|| CodecError::corrupt(WHAT, format!("mapping {i} end overflows")))?;
            if m.build_storage_offset.checked_add(m.length).is_none() {
                return Err(CodecError::corrupt(
                    WHAT,
                    format!("mapping {i} storage range overflows"),
                ));
            }
            if strict {
                if m.length == 0 {
                    return Err(CodecError::corrupt(
                        WHAT,
                        format!("mapping {i} at {:#x} has zero length", m.offset),
                    ));
                }
                let storage_unaligned =
                    !m.is_nil() && !m.build_storage_offset.is_multiple_of(PAGE_SIZE);
                if !m.offset.is_multiple_of(PAGE_SIZE)
                    || !m.length.is_multiple_of(PAGE_SIZE)
                    || storage_unaligned
                {
                    return Err(CodecError::corrupt(
                        WHAT,
                        format!(
                            "mapping {i} ({:#x}+{:#x} -> {:#x}) is not 4 KiB aligned",
                            m.offset, m.length, m.build_storage_offset
                        ),
                    ));
                }
            }
            pos = end;
        }
        let (lo, hi) = if md.size == 0 {
            (0, 0)
        } else if strict {
            let r = round_up_page(md.size)
                .ok_or_else(|| CodecError::corrupt("metadata", "size overflows"))?;
            (r, r)
        } else {
            let rounded = round_up_page(md.size).unwrap_or(u64::MAX);
            (md.size, md.size.saturating_add(md.block_size).max(rounded))
        };
        if pos < lo || pos > hi {
            return Err(CodecError::corrupt(
                WHAT,
                format!(
                    "mappings cover [0, {pos:#x}) but the size is {:#x} (expected an end in \
                     [{lo:#x}, {hi:#x}])",
                    md.size
                ),
            ));
        }
        Ok(())
    }

    /// e2b `GetShiftedMapping`: the mapping holding device `offset` (must be < size and 4 KiB
    /// aligned from version 3 on), shifted to start at `offset`.
    ///
    /// `offset >= size` is [`ErrorKind::OutOfBounds`] (below version 3 only offsets past the
    /// mappings are); an unaligned offset from version 3 on is [`ErrorKind::InvalidArgument`].
    pub fn resolve(&self, offset: u64) -> Result<ResolvedMapping> {
        const WHAT: &str = "header lookup";
        let strict = self.metadata.is_normalize_fix_applied();
        if strict && offset >= self.metadata.size {
            return Err(CodecError::new(
                ErrorKind::OutOfBounds,
                WHAT,
                format!("offset {offset:#x} >= size {:#x}", self.metadata.size),
            ));
        }
        if strict && !offset.is_multiple_of(PAGE_SIZE) {
            return Err(CodecError::new(
                ErrorKind::InvalidArgument,
                WHAT,
                format!("offset {offset:#x} is not 4 KiB aligned"),
            ));
        }
        let idx = self.mappings.partition_point(|m| m.offset <= offset);
        let m = idx
            .checked_sub(1)
            .and_then(|i| self.mappings.get(i))
            .filter(|m| offset < m.end())
            .ok_or_else(|| {
                CodecError::new(
                    ErrorKind::OutOfBounds,
                    WHAT,
                    format!("no mapping holds offset {offset:#x}"),
                )
            })?;
        let shift = offset - m.offset;
        let in_build = m
            .build_storage_offset
            .checked_add(shift)
            .ok_or_else(|| CodecError::corrupt(WHAT, "storage offset overflows"))?;
        Ok(ResolvedMapping {
            build_id: m.build_id,
            offset: in_build,
            length: m.length - shift,
        })
    }

    /// The builds-section entry for `build`, if any.
    pub fn build_data(&self, build: &BuildId) -> Option<&BuildData> {
        self.builds.get(build)
    }

    /// A base-layer header: `build_id` owns the whole device (one mapping to itself at storage
    /// offset 0, up to `roundup(size, 4096)`), generation 0, base build = `build_id`, no builds
    /// section entries (add the self entry after compressing). `version` is the full metadata
    /// version (3, 4 or 5 for new headers).
    pub fn new_base(build_id: BuildId, size: u64, block_size: u64, version: u64) -> Result<Header> {
        Self::new_single(build_id, build_id, size, block_size, version)
    }

    /// A base-layer header whose whole device reads as zeros (one nil mapping), as e2b's
    /// all-empty memfile base. Generation 0, base build = `build_id`.
    pub fn new_empty(
        build_id: BuildId,
        size: u64,
        block_size: u64,
        version: u64,
    ) -> Result<Header> {
        Self::new_single(build_id, crate::NIL_BUILD, size, block_size, version)
    }

    fn new_single(
        build_id: BuildId,
        target: BuildId,
        size: u64,
        block_size: u64,
        version: u64,
    ) -> Result<Header> {
        let length = round_up_page(size).ok_or_else(|| {
            CodecError::new(ErrorKind::InvalidArgument, "header", "size overflows")
        })?;
        let mappings = if size == 0 {
            Vec::new()
        } else {
            vec![Mapping {
                offset: 0,
                length,
                build_id: target,
                build_storage_offset: 0,
            }]
        };
        let header = Header {
            metadata: Metadata {
                version,
                block_size,
                size,
                generation: 0,
                build_id,
                base_build_id: build_id,
            },
            incomplete: false,
            builds: BTreeMap::new(),
            mappings,
        };
        header
            .validate()
            .map_err(|e| CodecError::new(ErrorKind::InvalidArgument, "header", e.to_string()))?;
        Ok(header)
    }

    /// The storage ranges `[start, end)` of `build`'s data file that this header's mappings
    /// reference, sorted and merged (touching ranges joined). Used to trim frame tables.
    pub fn referenced_ranges(&self, build: &BuildId) -> Vec<(u64, u64)> {
        let ranges: Vec<(u64, u64)> = self
            .mappings
            .iter()
            .filter(|m| m.build_id == *build)
            .map(|m| {
                (
                    m.build_storage_offset,
                    m.build_storage_offset.saturating_add(m.length),
                )
            })
            .collect();
        merge_ranges(&ranges)
    }

    /// The distinct non-nil builds the mappings reference.
    pub fn referenced_builds(&self) -> BTreeSet<BuildId> {
        self.mappings
            .iter()
            .filter(|m| !m.is_nil())
            .map(|m| m.build_id)
            .collect()
    }
}

/// `roundup(v, 4096)`, `None` on overflow.
pub(crate) fn round_up_page(v: u64) -> Option<u64> {
    v.checked_add(PAGE_SIZE - 1)
        .map(|x| x / PAGE_SIZE * PAGE_SIZE)
}

/// The default mapping a body without mappings stands for (e2b `NewHeader`).
fn default_mappings(md: &Metadata) -> Result<Vec<Mapping>> {
    if md.size == 0 {
        return Ok(Vec::new());
    }
    let length =
        round_up_page(md.size).ok_or_else(|| CodecError::corrupt("metadata", "size overflows"))?;
    Ok(vec![Mapping {
        offset: 0,
        length,
        build_id: md.build_id,
        build_storage_offset: 0,
    }])
}
