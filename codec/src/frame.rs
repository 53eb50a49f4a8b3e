//! Frame codecs: encode one frame, and decode one frame into a caller buffer of exactly the
//! declared uncompressed size.
//!
//! zstd frames are standard zstd frames (content checksum on when written; window = frame size);
//! LZ4 frames are LZ4 *frame format* streams (4 MB max block, block checksums on, content
//! checksum off, as e2b writes them). A frame that decodes to any other size, fails a checksum,
//! has trailing bytes or declares more than [`crate::frame_table::MAX_FRAME_SIZE`] is an error,
//! never a panic.
//!
//! # Decoding rules
//!
//! [`FrameDecoder::decode`] takes exactly one whole frame and a destination of exactly the
//! declared uncompressed size, and fails with:
//!
//! - [`ErrorKind::TooLarge`] when `dst` or a size declared by the frame header (content size,
//!   zstd window) exceeds [`MAX_FRAME_SIZE`], checked before anything is decoded;
//! - [`ErrorKind::SizeMismatch`] when the frame declares or produces a size other than
//!   `dst.len()`, in either direction (for `None`, when `src.len() != dst.len()`);
//! - [`ErrorKind::Truncated`] when the input ends before the frame does;
//! - [`ErrorKind::Corrupt`] for bad magic, bad header or block checksums, bad content checksums,
//!   undecodable data, and trailing bytes after the frame (a second concatenated frame included);
//! - [`ErrorKind::Unsupported`] for valid-but-foreign variants: zstd and LZ4 dictionaries,
//!   skippable frames, the legacy LZ4 format.
//!
//! On error the contents of `dst` are unspecified (partly written).
//!
//! # Zero-length frames (catalogue C5)
//!
//! Encoding an empty input gives a valid empty frame of the codec (zstd: a 13-byte frame with
//! content size 0 and a checksum; LZ4: header and end mark; `None`: zero bytes). Such a frame
//! decodes into an empty `dst`. An empty *input* for zstd or LZ4 is [`ErrorKind::Truncated`]
//! (there is no frame at all), even when `dst` is empty. Frame tables never hold zero-size frames,
//! so this only matters to callers using the codec directly.
//!
//! # LZ4 decoding
//!
//! LZ4 frames are parsed here (RFC-like spec: `lz4_Frame_format.md`) and each block is decoded
//! with `lz4_flex::block` straight into `dst`, rather than through `lz4_flex::frame::FrameDecoder`:
//! that reader decodes into its own 4 MiB buffer and copies out (an extra copy and two 4 MiB
//! allocations per decoder), and it reports a stream cut at a block boundary (end mark missing)
//! as a clean end of stream, which would let a truncated frame through. Header, block and content
//! checksums (xxHash32) are all verified when present.

use std::fmt;

use lz4_flex::frame::{BlockMode, BlockSize, FrameInfo};
use twox_hash::XxHash32;
use zstd_safe::zstd_sys::ZSTD_EndDirective;
use zstd_safe::{CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer, ResetDirective};

use crate::frame_table::MAX_FRAME_SIZE;
use crate::{CodecError, CompressionType, ErrorKind, Result};

/// zstd's smallest window log (`ZSTD_WINDOWLOG_MIN`).
const ZSTD_WINDOWLOG_MIN: u32 = 10;

/// The decoder's bound on a zstd frame's window: log2 of [`MAX_FRAME_SIZE`] (64 MiB).
const ZSTD_WINDOWLOG_MAX_DECODE: u32 = MAX_FRAME_SIZE.ilog2();

/// zstd frame magic number.
const ZSTD_MAGIC: u32 = 0xFD2F_B528;

/// LZ4 frame magic number.
const LZ4_MAGIC: u32 = 0x184D_2204;

/// LZ4 legacy frame magic number.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;

/// LZ4 back-reference window: linked blocks may refer this far back into earlier blocks.
const LZ4_WINDOW: usize = 64 * 1024;

/// Lowest zstd level the encoder accepts.
const ZSTD_MIN_LEVEL: i32 = 1;

/// Highest zstd level the encoder accepts.
const ZSTD_MAX_LEVEL: i32 = 22;

/// Encodes frames; holds one reusable compression context.
pub struct FrameEncoder {
    compression: CompressionType,
    level: i32,
    /// The zstd context (zstd only).
    cctx: Option<CCtx<'static>>,
    /// The LZ4 frame encoder, reused across frames (its 4 MiB buffers and hash table too). Its
    /// writer is a placeholder between calls: the caller's `dst` is swapped in while encoding.
    lz4: Option<lz4_flex::frame::FrameEncoder<Vec<u8>>>,
}

impl fmt::Debug for FrameEncoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameEncoder")
            .field("compression", &self.compression)
            .field("level", &self.level)
            .finish()
    }
}

impl FrameEncoder {
    /// A new encoder. `level` applies to zstd (1..=22; e2b uses 1..=4) and is ignored otherwise.
    ///
    /// A zstd level outside 1..=22 is [`ErrorKind::InvalidArgument`].
    pub fn new(compression: CompressionType, level: i32) -> Result<Self> {
        let cctx = match compression {
            CompressionType::Zstd => {
                if !(ZSTD_MIN_LEVEL..=ZSTD_MAX_LEVEL).contains(&level) {
                    return Err(CodecError::new(
                        ErrorKind::InvalidArgument,
                        "zstd encoder",
                        format!("level {level} outside {ZSTD_MIN_LEVEL}..={ZSTD_MAX_LEVEL}"),
                    ));
                }
                let mut cctx = CCtx::try_create().ok_or_else(|| {
                    CodecError::new(
                        ErrorKind::InvalidArgument,
                        "zstd encoder",
                        "cannot create a compression context",
                    )
                })?;
                zstd_param(&mut cctx, CParameter::CompressionLevel(level))?;
                zstd_param(&mut cctx, CParameter::ChecksumFlag(true))?;
                zstd_param(&mut cctx, CParameter::ContentSizeFlag(true))?;
                Some(cctx)
            }
            CompressionType::Lz4 | CompressionType::None => None,
        };
        Ok(Self {
            compression,
            level,
            cctx,
            lz4: None,
        })
    }

    /// Encodes `src` as one frame, appending it to `dst`; returns the compressed size.
    ///
    /// `src` longer than [`MAX_FRAME_SIZE`] is [`ErrorKind::TooLarge`] (no decoder would accept
    /// the frame). On error `dst` keeps its previous contents.
    pub fn encode(&mut self, src: &[u8], dst: &mut Vec<u8>) -> Result<usize> {
        let len = u64::try_from(src.len()).unwrap_or(u64::MAX);
        if len > u64::from(MAX_FRAME_SIZE) {
            return Err(CodecError::too_large(
                "frame encoder input",
                len,
                u64::from(MAX_FRAME_SIZE),
            ));
        }
        let start = dst.len();
        let res = match self.compression {
            CompressionType::None => {
                dst.extend_from_slice(src);
                Ok(())
            }
            CompressionType::Zstd => match self.cctx.as_mut() {
                Some(cctx) => encode_zstd(cctx, src, dst),
                None => Err(CodecError::new(
                    ErrorKind::InvalidArgument,
                    "zstd encoder",
                    "no compression context",
                )),
            },
            CompressionType::Lz4 => self.encode_lz4(src, dst),
        };
        match res {
            Ok(()) => Ok(dst.len().saturating_sub(start)),
            Err(e) => {
                dst.truncate(start);
                Err(e)
            }
        }
    }
}

/// Sets one compression parameter.
fn zstd_param(cctx: &mut CCtx<'static>, param: CParameter) -> Result<()> {
    cctx.set_parameter(param)
        .map(drop)
        .map_err(|code| zstd_error("zstd encoder", code))
}

/// A zstd error code as a [`CodecError`] of kind `Corrupt`.
fn zstd_error(what: &'static str, code: usize) -> CodecError {
    CodecError::corrupt(what, zstd_safe::get_error_name(code))
}

/// The window log covering a whole frame of `len` bytes: ceil(log2(len)), at least zstd's min.
fn window_log_for(len: usize) -> u32 {
    let log = match len.checked_next_power_of_two() {
        Some(p) => p.trailing_zeros(),
        None => usize::BITS,
    };
    log.max(ZSTD_WINDOWLOG_MIN)
}

/// One zstd frame: pledged size (so the header carries the content size), window = frame size,
/// content checksum on.
fn encode_zstd(cctx: &mut CCtx<'static>, src: &[u8], dst: &mut Vec<u8>) -> Result<()> {
    const WHAT: &str = "zstd encoder";
    cctx.reset(ResetDirective::SessionOnly)
        .map_err(|code| zstd_error(WHAT, code))?;
    zstd_param(cctx, CParameter::WindowLog(window_log_for(src.len())))?;
    let len = u64::try_from(src.len()).unwrap_or(u64::MAX);
    cctx.set_pledged_src_size(Some(len))
        .map_err(|code| zstd_error(WHAT, code))?;
    let bound = zstd_safe::compress_bound(src.len());
    dst.reserve(bound);
    let mut input = InBuffer::around(src);
    // Bounded: with compress_bound bytes of room zstd finishes in one call; every further call
    // must make progress, and the frame can never exceed the bound by much.
    for _ in 0..64 {
        let start = dst.len();
        if dst.capacity().saturating_sub(start) < 64 {
            dst.reserve(bound.max(64));
        }
        let mut output = OutBuffer::around_pos(&mut *dst, start);
        let remaining = cctx
            .compress_stream2(&mut output, &mut input, ZSTD_EndDirective::ZSTD_e_end)
            .map_err(|code| zstd_error(WHAT, code))?;
        if remaining == 0 {
            return Ok(());
        }
    }
    Err(CodecError::corrupt(WHAT, "compressor made no progress"))
}

/// The LZ4 frame shape e2b writes: 4 MB max block, independent blocks, block checksums on,
/// content checksum off, no content size.
fn lz4_frame_info() -> FrameInfo {
    FrameInfo::new()
        .block_size(BlockSize::Max4MB)
        .block_mode(BlockMode::Independent)
        .block_checksums(true)
        .content_checksum(false)
}

impl FrameEncoder {
    /// One LZ4 frame (see [`lz4_frame_info`]), appended to `dst`.
    ///
    /// lz4_flex's encoder starts a new frame on the first write after `try_finish`, resetting
    /// its state, so one encoder serves every frame and its two 4 MiB buffers are allocated
    /// once, not per frame. An empty frame after a non-empty one would come out as a bare end
    /// mark, though, so empty inputs use a fresh encoder.
    fn encode_lz4(&mut self, src: &[u8], dst: &mut Vec<u8>) -> Result<()> {
        const WHAT: &str = "lz4 encoder";
        if src.is_empty() {
            let enc = lz4_flex::frame::FrameEncoder::with_frame_info(lz4_frame_info(), &mut *dst);
            return enc
                .finish()
                .map(drop)
                .map_err(|e| CodecError::corrupt(WHAT, e.to_string()));
        }
        let enc = self.lz4.get_or_insert_with(|| {
            lz4_flex::frame::FrameEncoder::with_frame_info(lz4_frame_info(), Vec::new())
        });
        std::mem::swap(enc.get_mut(), dst);
        let res = std::io::Write::write_all(enc, src)
            .map_err(|e| CodecError::corrupt(WHAT, e.to_string()))
            .and_then(|()| {
                enc.try_finish()
                    .map_err(|e| CodecError::corrupt(WHAT, e.to_string()))
            });
        std::mem::swap(enc.get_mut(), dst);
        if res.is_err() {
            // Mid-frame state is unknown: start over with a new encoder next time.
            self.lz4 = None;
        }
        res
    }
}

/// Decodes frames; holds one reusable decompression context.
pub struct FrameDecoder {
    /// The zstd context, created on first use (bounded window, reused for every frame).
    dctx: Option<DCtx<'static>>,
}

impl fmt::Debug for FrameDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameDecoder")
            .field("zstd_context", &self.dctx.is_some())
            .finish()
    }
}

impl FrameDecoder {
    /// A new decoder. The zstd context is created on the first zstd frame.
    pub fn new() -> Self {
        Self { dctx: None }
    }

    /// Decodes the whole frame `src` of codec `compression` into `dst`, which must be filled
    /// exactly: fewer or more decoded bytes, a checksum failure or trailing input are errors.
    ///
    /// See the module docs for the error kinds. Does not allocate (after the first zstd frame).
    pub fn decode(
        &mut self,
        compression: CompressionType,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<()> {
        let dst_len = u64::try_from(dst.len()).unwrap_or(u64::MAX);
        if dst_len > u64::from(MAX_FRAME_SIZE) {
            return Err(CodecError::too_large(
                "frame destination",
                dst_len,
                u64::from(MAX_FRAME_SIZE),
            ));
        }
        match compression {
            CompressionType::None => {
                if src.len() != dst.len() {
                    return Err(size_mismatch(
                        "uncompressed frame",
                        dst.len(),
                        format!("{} bytes", src.len()),
                    ));
                }
                dst.copy_from_slice(src);
                Ok(())
            }
            CompressionType::Zstd => {
                let dctx = self.zstd_context()?;
                decode_zstd(dctx, src, dst)
            }
            CompressionType::Lz4 => decode_lz4(src, dst),
        }
    }

    /// The zstd context, created with a bounded window on first use.
    fn zstd_context(&mut self) -> Result<&mut DCtx<'static>> {
        if self.dctx.is_none() {
            let mut dctx = DCtx::try_create().ok_or_else(|| {
                CodecError::new(
                    ErrorKind::InvalidArgument,
                    "zstd decoder",
                    "cannot create a decompression context",
                )
            })?;
            dctx.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOWLOG_MAX_DECODE))
                .map_err(|code| zstd_error("zstd decoder", code))?;
            self.dctx = Some(dctx);
        }
        self.dctx.as_mut().ok_or_else(|| {
            CodecError::new(ErrorKind::InvalidArgument, "zstd decoder", "no context")
        })
    }
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

/// A [`ErrorKind::SizeMismatch`] error: `dst_len` bytes were declared by the caller, `got`
/// describes what the frame declared or produced.
fn size_mismatch(what: &'static str, dst_len: usize, got: String) -> CodecError {
    CodecError::new(
        ErrorKind::SizeMismatch,
        what,
        format!("expected {dst_len} bytes, frame has {got}"),
    )
}

/// Reads a little-endian u32 at `at`, or reports truncation.
fn le_u32(src: &[u8], at: usize, what: &'static str) -> Result<u32> {
    let end = at.saturating_add(4);
    match src.get(at..end) {
        Some(b) => {
            let mut a = [0u8; 4];
            a.copy_from_slice(b);
            Ok(u32::from_le_bytes(a))
        }
        None => Err(CodecError::truncated(what, end as u64, src.len() as u64)),
    }
}

/// Reads `n <= 8` little-endian bytes at `at` as a u64, or reports truncation.
fn le_uint(src: &[u8], at: usize, n: usize, what: &'static str) -> Result<u64> {
    let end = at.saturating_add(n);
    match src.get(at..end) {
        Some(b) if n <= 8 => {
            let mut a = [0u8; 8];
            if let Some(d) = a.get_mut(..n) {
                d.copy_from_slice(b);
            }
            Ok(u64::from_le_bytes(a))
        }
        Some(_) => Err(CodecError::corrupt(what, "integer wider than 8 bytes")),
        None => Err(CodecError::truncated(what, end as u64, src.len() as u64)),
    }
}

/// What the decoder needs from a zstd frame header (RFC 8878 §3.1.1.1).
#[derive(Debug)]
struct ZstdFrameHeader {
    /// The declared content size, if the header has one.
    content_size: Option<u64>,
    /// The window size the frame needs.
    window_size: u64,
}

/// Parses a zstd frame header, reporting truncation, bad magic and dictionaries precisely.
fn zstd_frame_header(src: &[u8]) -> Result<ZstdFrameHeader> {
    const WHAT: &str = "zstd frame header";
    let magic = le_u32(src, 0, WHAT)?;
    if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
        return Err(CodecError::new(
            ErrorKind::Unsupported,
            WHAT,
            "skippable frame, not a data frame",
        ));
    }
    if magic != ZSTD_MAGIC {
        return Err(CodecError::corrupt(
            WHAT,
            format!("bad magic {magic:#010x}"),
        ));
    }
    let fhd = *src
        .get(4)
        .ok_or_else(|| CodecError::truncated(WHAT, 5, src.len() as u64))?;
    if fhd & 0x08 != 0 {
        return Err(CodecError::corrupt(WHAT, "reserved bit set"));
    }
    let fcs_flag = fhd >> 6;
    let single_segment = fhd & 0x20 != 0;
    let did_len: usize = match fhd & 0x03 {
        0 => 0,
        1 => 1,
        2 => 2,
        _ => 4,
    };
    let fcs_len: usize = match fcs_flag {
        0 if single_segment => 1,
        0 => 0,
        1 => 2,
        2 => 4,
        _ => 8,
    };
    let wd_len = usize::from(!single_segment);
    let header_len = 5 + wd_len + did_len + fcs_len;
    if src.len() < header_len {
        return Err(CodecError::truncated(
            WHAT,
            header_len as u64,
            src.len() as u64,
        ));
    }
    let mut at = 5;
    let window_from_descriptor = if single_segment {
        None
    } else {
        let wd = *src
            .get(at)
            .ok_or_else(|| CodecError::truncated(WHAT, 6, src.len() as u64))?;
        at += 1;
        let log = 10 + u32::from(wd >> 3);
        // log <= 41: fits a u64 comfortably.
        let base = 1u64 << log;
        Some(base + (base / 8) * u64::from(wd & 0x07))
    };
    let dict_id = le_uint(src, at, did_len, WHAT)?;
    at += did_len;
    if dict_id != 0 {
        return Err(CodecError::new(
            ErrorKind::Unsupported,
            WHAT,
            format!("frame needs dictionary {dict_id}"),
        ));
    }
    let content_size = match fcs_len {
        0 => None,
        2 => Some(le_uint(src, at, 2, WHAT)?.saturating_add(256)),
        n => Some(le_uint(src, at, n, WHAT)?),
    };
    let window_size = match (window_from_descriptor, content_size) {
        (Some(w), _) => w,
        (None, Some(c)) => c,
        // Single segment implies a content size field (fcs_len >= 1).
        (None, None) => 0,
    };
    Ok(ZstdFrameHeader {
        content_size,
        window_size,
    })
}

/// Checks what a zstd frame header declares against the cap and the destination (catalogue C3):
/// a content size other than `dst_len` or above the cap, or a window above the cap, is refused
/// before any byte is decoded.
fn check_zstd_header(header: &ZstdFrameHeader, dst_len: usize) -> Result<()> {
    let cap = u64::from(MAX_FRAME_SIZE);
    if let Some(size) = header.content_size {
        if size > cap {
            return Err(CodecError::too_large("zstd frame content size", size, cap));
        }
        if size != dst_len as u64 {
            return Err(size_mismatch(
                "zstd frame",
                dst_len,
                format!("content size {size}"),
            ));
        }
    }
    if header.window_size > cap {
        return Err(CodecError::too_large(
            "zstd frame window",
            header.window_size,
            cap,
        ));
    }
    Ok(())
}

/// Decodes one zstd frame into exactly `dst`.
fn decode_zstd(dctx: &mut DCtx<'static>, src: &[u8], dst: &mut [u8]) -> Result<()> {
    const WHAT: &str = "zstd frame";
    // Catalogue C3: everything the header declares is checked before any decoding.
    check_zstd_header(&zstd_frame_header(src)?, dst.len())?;

    dctx.reset(ResetDirective::SessionOnly)
        .map_err(|code| zstd_error(WHAT, code))?;
    let dst_len = dst.len();
    let mut input = InBuffer::around(src);
    let mut finished = false;
    {
        let mut output = OutBuffer::around(dst);
        loop {
            let before = (input.pos(), output.pos());
            let hint = dctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|code| zstd_error(WHAT, code))?;
            if hint == 0 {
                finished = true;
                break;
            }
            if (input.pos(), output.pos()) == before {
                // No progress: either the output is full (probe below) or the input ran out.
                break;
            }
        }
        if finished && output.pos() != dst_len {
            return Err(size_mismatch(
                WHAT,
                dst_len,
                format!("{} bytes", output.pos()),
            ));
        }
        if !finished && output.pos() != dst_len {
            return Err(no_progress(WHAT, &input, src.len()));
        }
    }
    if !finished {
        // dst is full but the frame has not ended: it must end without producing another byte.
        let mut extra = [0u8; 1];
        let mut output = OutBuffer::around(&mut extra[..]);
        loop {
            let before = input.pos();
            let hint = dctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|code| zstd_error(WHAT, code))?;
            if output.pos() != 0 {
                return Err(size_mismatch(WHAT, dst_len, "more bytes".to_string()));
            }
            if hint == 0 {
                break;
            }
            if input.pos() == before {
                return Err(no_progress(WHAT, &input, src.len()));
            }
        }
    }
    if input.pos() != src.len() {
        return Err(CodecError::corrupt(
            WHAT,
            format!(
                "{} trailing bytes after the frame",
                src.len().saturating_sub(input.pos())
            ),
        ));
    }
    Ok(())
}

/// The error for a zstd stream that stopped making progress before the frame ended.
fn no_progress(what: &'static str, input: &InBuffer<'_>, src_len: usize) -> CodecError {
    if input.pos() >= src_len {
        CodecError::new(
            ErrorKind::Truncated,
            what,
            format!("input ended after {src_len} bytes, before the end of the frame"),
        )
    } else {
        CodecError::corrupt(what, "decoder stalled before the end of the frame")
    }
}

/// LZ4 frame descriptor flags we need.
#[derive(Debug, Clone, Copy)]
struct Lz4Descriptor {
    independent: bool,
    block_checksums: bool,
    content_checksum: bool,
    max_block: usize,
}

/// Parses an LZ4 frame header; returns the descriptor, declared content size, header length.
fn lz4_frame_header(src: &[u8]) -> Result<(Lz4Descriptor, Option<u64>, usize)> {
    const WHAT: &str = "lz4 frame header";
    let magic = le_u32(src, 0, WHAT)?;
    if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
        return Err(CodecError::new(
            ErrorKind::Unsupported,
            WHAT,
            "skippable frame, not a data frame",
        ));
    }
    if magic == LZ4_LEGACY_MAGIC {
        return Err(CodecError::new(
            ErrorKind::Unsupported,
            WHAT,
            "legacy LZ4 frame format",
        ));
    }
    if magic != LZ4_MAGIC {
        return Err(CodecError::corrupt(
            WHAT,
            format!("bad magic {magic:#010x}"),
        ));
    }
    let need2 = |n: u64| CodecError::truncated(WHAT, n, src.len() as u64);
    let flg = *src.get(4).ok_or_else(|| need2(5))?;
    let bd = *src.get(5).ok_or_else(|| need2(6))?;
    if flg >> 6 != 0b01 {
        return Err(CodecError::new(
            ErrorKind::Unsupported,
            WHAT,
            format!("frame version {}", flg >> 6),
        ));
    }
    if flg & 0x02 != 0 || bd & 0x8F != 0 {
        return Err(CodecError::corrupt(WHAT, "reserved bits set"));
    }
    let has_content_size = flg & 0x08 != 0;
    let has_dict = flg & 0x01 != 0;
    let max_block = match (bd >> 4) & 0x07 {
        4 => 64 * 1024,
        5 => 256 * 1024,
        6 => 1024 * 1024,
        7 => 4 * 1024 * 1024,
        other => {
            return Err(CodecError::corrupt(
                WHAT,
                format!("invalid block size id {other}"),
            ));
        }
    };
    let desc_end = 6 + if has_content_size { 8 } else { 0 } + if has_dict { 4 } else { 0 };
    let hc = *src
        .get(desc_end)
        .ok_or_else(|| need2(desc_end as u64 + 1))?;
    let descriptor = src.get(4..desc_end).ok_or_else(|| need2(desc_end as u64))?;
    let expected_hc = (XxHash32::oneshot(0, descriptor) >> 8) & 0xFF;
    if u32::from(hc) != expected_hc {
        return Err(CodecError::corrupt(WHAT, "header checksum mismatch"));
    }
    if has_dict {
        return Err(CodecError::new(
            ErrorKind::Unsupported,
            WHAT,
            "frame needs a dictionary",
        ));
    }
    let content_size = if has_content_size {
        Some(le_uint(src, 6, 8, WHAT)?)
    } else {
        None
    };
    Ok((
        Lz4Descriptor {
            independent: flg & 0x20 != 0,
            block_checksums: flg & 0x10 != 0,
            content_checksum: flg & 0x04 != 0,
            max_block,
        },
        content_size,
        desc_end + 1,
    ))
}

/// Verifies an xxHash32 checksum stored little-endian at `at`; returns the position after it.
fn lz4_checksum(src: &[u8], at: usize, data: &[u8], what: &'static str) -> Result<usize> {
    let stored = le_u32(src, at, what)?;
    if XxHash32::oneshot(0, data) != stored {
        return Err(CodecError::corrupt(what, "checksum mismatch"));
    }
    Ok(at.saturating_add(4))
}

/// Decodes one independent LZ4 block into `out` (its capacity bounds the output).
///
/// liblz4's `LZ4_decompress_safe` (via the `lz4` crate's safe API; it never reads or writes
/// outside the given buffers, whatever the input) is ~2.7x faster than lz4_flex's checked decoder
/// on 2 MiB frames. It reports every failure alike, so on the error path lz4_flex decodes the block
/// again to classify it (output too small vs malformed); the success path is liblz4's alone.
fn decompress_block(
    block: &[u8],
    out: &mut [u8],
) -> std::result::Result<usize, lz4_flex::block::DecompressError> {
    let capacity = i32::try_from(out.len()).unwrap_or(i32::MAX);
    match lz4::block::decompress_to_buffer(block, Some(capacity), out) {
        Ok(n) => Ok(n),
        Err(_) => lz4_flex::block::decompress_into(block, out),
    }
}

/// Decodes one LZ4 frame-format stream into exactly `dst`.
fn decode_lz4(src: &[u8], dst: &mut [u8]) -> Result<()> {
    const WHAT: &str = "lz4 frame";
    let cap = u64::from(MAX_FRAME_SIZE);
    let (desc, content_size, mut at) = lz4_frame_header(src)?;
    if let Some(size) = content_size {
        if size > cap {
            return Err(CodecError::too_large("lz4 frame content size", size, cap));
        }
        if size != dst.len() as u64 {
            return Err(size_mismatch(
                WHAT,
                dst.len(),
                format!("content size {size}"),
            ));
        }
    }
    let dst_len = dst.len();
    let mut pos = 0usize;
    loop {
        let word = le_u32(src, at, "lz4 block header")?;
        at = at.saturating_add(4);
        if word == 0 {
            break;
        }
        let uncompressed = word & 0x8000_0000 != 0;
        let len = usize::try_from(word & 0x7FFF_FFFF).unwrap_or(usize::MAX);
        if len > desc.max_block {
            return Err(CodecError::corrupt(
                "lz4 block",
                format!(
                    "block of {len} bytes exceeds the frame's {} max",
                    desc.max_block
                ),
            ));
        }
        let end = at.saturating_add(len);
        let block = src
            .get(at..end)
            .ok_or_else(|| CodecError::truncated("lz4 block", end as u64, src.len() as u64))?;
        at = end;
        if desc.block_checksums {
            at = lz4_checksum(src, at, block, "lz4 block checksum")?;
        }
        let (head, tail) = dst.split_at_mut(pos);
        let produced = if uncompressed {
            let out = tail
                .get_mut(..len)
                .ok_or_else(|| size_mismatch(WHAT, dst_len, "more bytes".to_string()))?;
            out.copy_from_slice(block);
            len
        } else {
            let res = if desc.independent || head.is_empty() {
                decompress_block(block, tail)
            } else {
                let dict = head
                    .get(head.len().saturating_sub(LZ4_WINDOW)..)
                    .unwrap_or(&[]);
                lz4_flex::block::decompress_into_with_dict(block, tail, dict)
            };
            match res {
                Ok(n) => n,
                Err(lz4_flex::block::DecompressError::OutputTooSmall { .. }) => {
                    return Err(size_mismatch(WHAT, dst_len, "more bytes".to_string()));
                }
                Err(e) => return Err(CodecError::corrupt("lz4 block", e.to_string())),
            }
        };
        pos = pos.saturating_add(produced);
    }
    if pos != dst_len {
        return Err(size_mismatch(WHAT, dst_len, format!("{pos} bytes")));
    }
    if desc.content_checksum {
        at = lz4_checksum(src, at, dst, "lz4 content checksum")?;
    }
    if at != src.len() {
        return Err(CodecError::corrupt(
            WHAT,
            format!(
                "{} trailing bytes after the frame",
                src.len().saturating_sub(at)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                if i % 1000 < 300 {
                    u8::try_from(i % 251).unwrap_or(0)
                } else {
                    0
                }
            })
            .collect()
    }

    fn round_trip(c: CompressionType, level: i32, len: usize) {
        let data = sample(len);
        let mut enc = FrameEncoder::new(c, level).unwrap();
        let mut frame = vec![0xAA];
        let n = enc.encode(&data, &mut frame).unwrap();
        assert_eq!(n, frame.len() - 1);
        let mut out = vec![0u8; len];
        FrameDecoder::new()
            .decode(c, &frame[1..], &mut out)
            .unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn round_trips() {
        for len in [0, 1, 1000, 4096, 2 * 1024 * 1024] {
            round_trip(CompressionType::Zstd, 1, len);
            round_trip(CompressionType::Zstd, 3, len);
            round_trip(CompressionType::Lz4, 0, len);
            round_trip(CompressionType::None, 0, len);
        }
    }

    #[test]
    fn window_log() {
        assert_eq!(window_log_for(0), ZSTD_WINDOWLOG_MIN);
        assert_eq!(window_log_for(1024), 10);
        assert_eq!(window_log_for(1025), 11);
        assert_eq!(window_log_for(2 * 1024 * 1024), 21);
        assert_eq!(window_log_for(2 * 1024 * 1024 + 1), 22);
        assert_eq!(ZSTD_WINDOWLOG_MAX_DECODE, 26);
    }

    #[test]
    fn zstd_header_declares_content_size_and_window() {
        let data = sample(2 * 1024 * 1024);
        let mut enc = FrameEncoder::new(CompressionType::Zstd, 1).unwrap();
        let mut frame = Vec::new();
        enc.encode(&data, &mut frame).unwrap();
        let h = zstd_frame_header(&frame).unwrap();
        assert_eq!(h.content_size, Some(data.len() as u64));
        assert!(h.window_size >= data.len() as u64);
        // Checksum flag (bit 2 of the descriptor) is on.
        assert_ne!(frame[4] & 0x04, 0);
    }

    #[test]
    fn zero_length_frames() {
        let mut enc = FrameEncoder::new(CompressionType::Zstd, 1).unwrap();
        let mut frame = Vec::new();
        enc.encode(&[], &mut frame).unwrap();
        assert_eq!(frame.len(), 13);
        let mut dec = FrameDecoder::new();
        dec.decode(CompressionType::Zstd, &frame, &mut []).unwrap();
        let err = dec.decode(CompressionType::Zstd, &[], &mut []).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Truncated);
        let err = dec.decode(CompressionType::Lz4, &[], &mut []).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Truncated);
        dec.decode(CompressionType::None, &[], &mut []).unwrap();
    }

    #[test]
    fn reused_lz4_encoder_matches_fresh_ones() {
        let mut reused = FrameEncoder::new(CompressionType::Lz4, 0).unwrap();
        let mut dec = FrameDecoder::new();
        for len in [
            100_000,
            0,
            1,
            2 * 1024 * 1024,
            0,
            0,
            5000,
            4 * 1024 * 1024 + 7,
            3,
        ] {
            let data = sample(len);
            let mut a = vec![1, 2, 3];
            reused.encode(&data, &mut a).unwrap();
            let mut b = vec![1, 2, 3];
            FrameEncoder::new(CompressionType::Lz4, 0)
                .unwrap()
                .encode(&data, &mut b)
                .unwrap();
            assert_eq!(a, b, "len {len}");
            let mut out = vec![0u8; len];
            dec.decode(CompressionType::Lz4, &a[3..], &mut out).unwrap();
            assert_eq!(out, data, "len {len}");
        }
    }

    #[test]
    fn bad_level() {
        let err = FrameEncoder::new(CompressionType::Zstd, 0).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        FrameEncoder::new(CompressionType::Lz4, 0).unwrap();
    }

    #[test]
    fn lz4_frame_is_e2b_shaped() {
        let data = sample(2 * 1024 * 1024);
        let mut frame = Vec::new();
        FrameEncoder::new(CompressionType::Lz4, 0)
            .unwrap()
            .encode(&data, &mut frame)
            .unwrap();
        let (desc, content_size, header_len) = lz4_frame_header(&frame).unwrap();
        assert!(desc.block_checksums);
        assert!(!desc.content_checksum);
        assert!(desc.independent);
        assert_eq!(desc.max_block, 4 * 1024 * 1024);
        assert_eq!(content_size, None);
        assert_eq!(header_len, 7);
        // One block of a 2 MiB frame, then the end mark.
        assert_eq!(&frame[frame.len() - 4..], &[0, 0, 0, 0]);
    }
}

/// Largest zstd frame header (magic, descriptor, window, dictionary id, content size).
const ZSTD_MAX_HEADER: usize = 18;

/// Decodes one frame progressively as its compressed bytes arrive, straight into the caller's
/// destination (the cache memory), so a fetch need not wait for the whole frame before decoding.
///
/// - zstd: streamed through one reused decompression context; the frame header's declared
///   content size and window are checked (as in [`FrameDecoder::decode`]) before any byte is
///   decoded;
/// - LZ4 and uncompressed: the compressed bytes are gathered and decoded by
///   [`FrameDecoder::decode`] in [`finish`](Self::finish) (LZ4 blocks are small and decode at
///   several GB/s; streaming them buys nothing).
///
/// The destination holds verified bytes only once [`finish`](Self::finish) returned `Ok`: the
/// frame then decoded to exactly `dst.len()` bytes, its checksums passed and no byte trailed it.
/// Pass the same `dst` to every call of one frame.
pub struct StreamDecoder {
    decoder: FrameDecoder,
    state: StreamState,
}

/// Progress of the frame being decoded.
#[derive(Debug)]
struct StreamState {
    compression: CompressionType,
    /// zstd: the header has been checked and the context reset.
    started: bool,
    /// zstd: bytes of an incomplete header, held until it can be checked.
    head: Vec<u8>,
    /// zstd: decoded bytes written to `dst`.
    out_pos: usize,
    /// zstd: the decoder reported the end of the frame (checksum verified).
    ended: bool,
    /// Compressed bytes fed so far.
    fed: u64,
    /// LZ4 / none: the gathered compressed frame.
    gathered: Vec<u8>,
}

impl fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamDecoder")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    /// A decoder with no frame started; call [`begin`](Self::begin) for each frame.
    pub fn new() -> Self {
        Self {
            decoder: FrameDecoder::new(),
            state: StreamState {
                compression: CompressionType::None,
                started: false,
                head: Vec::new(),
                out_pos: 0,
                ended: false,
                fed: 0,
                gathered: Vec::new(),
            },
        }
    }

    /// Starts a new frame of codec `compression` (forgets any earlier one).
    pub fn begin(&mut self, compression: CompressionType) {
        let s = &mut self.state;
        s.compression = compression;
        s.started = false;
        s.head.clear();
        s.out_pos = 0;
        s.ended = false;
        s.fed = 0;
        s.gathered.clear();
    }

    /// Compressed bytes fed since [`begin`](Self::begin).
    pub fn fed(&self) -> u64 {
        self.state.fed
    }

    /// Feeds the next compressed bytes of the frame; zstd output goes into `dst` (the whole
    /// frame's destination, of exactly its declared uncompressed size).
    ///
    /// # Errors
    /// As [`FrameDecoder::decode`]: a header declaring another size or too large a window, corrupt
    /// data, a checksum failure, or bytes after the end of the frame.
    pub fn feed(&mut self, input: &[u8], dst: &mut [u8]) -> Result<()> {
        self.state.fed = self
            .state
            .fed
            .saturating_add(u64::try_from(input.len()).unwrap_or(u64::MAX));
        let dst_len = u64::try_from(dst.len()).unwrap_or(u64::MAX);
        if dst_len > u64::from(MAX_FRAME_SIZE) {
            return Err(CodecError::too_large(
                "frame destination",
                dst_len,
                u64::from(MAX_FRAME_SIZE),
            ));
        }
        match self.state.compression {
            CompressionType::Zstd => self.feed_zstd(input, dst),
            CompressionType::Lz4 | CompressionType::None => {
                let cap = usize::try_from(MAX_FRAME_SIZE).unwrap_or(usize::MAX);
                if self.state.gathered.len().saturating_add(input.len()) > cap {
                    return Err(CodecError::too_large(
                        "compressed frame",
                        self.state.fed,
                        u64::from(MAX_FRAME_SIZE),
                    ));
                }
                self.state.gathered.extend_from_slice(input);
                Ok(())
            }
        }
    }

    /// Ends the frame: `Ok` only if it decoded to exactly `dst.len()` bytes with every checksum
    /// verified and nothing after it.
    ///
    /// # Errors
    /// [`ErrorKind::Truncated`] when the input ended before the frame did, and the errors of
    /// [`feed`](Self::feed).
    pub fn finish(&mut self, dst: &mut [u8]) -> Result<()> {
        match self.state.compression {
            CompressionType::Zstd => {
                const WHAT: &str = "zstd frame";
                if !self.state.started {
                    // Not even a whole header: let the one-shot decoder name the problem.
                    let head = std::mem::take(&mut self.state.head);
                    return self.decoder.decode(CompressionType::Zstd, &head, dst);
                }
                if !self.state.ended {
                    if self.state.out_pos >= dst.len() {
                        return Err(size_mismatch(WHAT, dst.len(), "more bytes".to_string()));
                    }
                    return Err(CodecError::new(
                        ErrorKind::Truncated,
                        WHAT,
                        format!(
                            "input ended after {} bytes, before the end of the frame",
                            self.state.fed
                        ),
                    ));
                }
                if self.state.out_pos != dst.len() {
                    return Err(size_mismatch(
                        WHAT,
                        dst.len(),
                        format!("{} bytes", self.state.out_pos),
                    ));
                }
                Ok(())
            }
            compression => {
                let gathered = std::mem::take(&mut self.state.gathered);
                let res = self.decoder.decode(compression, &gathered, dst);
                self.state.gathered = gathered;
                self.state.gathered.clear();
                res
            }
        }
    }

    fn feed_zstd(&mut self, input: &[u8], dst: &mut [u8]) -> Result<()> {
        const WHAT: &str = "zstd frame";
        let mut input = input;
        if !self.state.started {
            // Hold bytes until the header can be checked (C3: before decoding anything).
            let take = ZSTD_MAX_HEADER
                .saturating_sub(self.state.head.len())
                .min(input.len());
            let (now, rest) = input.split_at(take);
            self.state.head.extend_from_slice(now);
            input = rest;
            let header = match zstd_frame_header(&self.state.head) {
                Ok(h) => h,
                Err(e) if e.kind() == ErrorKind::Truncated && input.is_empty() => {
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            check_zstd_header(&header, dst.len())?;
            self.decoder
                .zstd_context()?
                .reset(ResetDirective::SessionOnly)
                .map_err(|code| zstd_error(WHAT, code))?;
            self.state.started = true;
            let head = std::mem::take(&mut self.state.head);
            let res = self.decode_zstd_bytes(&head, dst);
            self.state.head = head;
            self.state.head.clear();
            res?;
        }
        self.decode_zstd_bytes(input, dst)
    }

    fn decode_zstd_bytes(&mut self, src: &[u8], dst: &mut [u8]) -> Result<()> {
        const WHAT: &str = "zstd frame";
        if src.is_empty() {
            return Ok(());
        }
        if self.state.ended {
            return Err(CodecError::corrupt(
                WHAT,
                format!("{} trailing bytes after the frame", src.len()),
            ));
        }
        let out = dst.get_mut(self.state.out_pos..).unwrap_or_default();
        let dctx = self.decoder.zstd_context()?;
        let mut input = InBuffer::around(src);
        let mut output = OutBuffer::around(out);
        loop {
            let before = (input.pos(), output.pos());
            let hint = dctx
                .decompress_stream(&mut output, &mut input)
                .map_err(|code| zstd_error(WHAT, code))?;
            if hint == 0 {
                self.state.ended = true;
                break;
            }
            if input.pos() == src.len() {
                // All input consumed: the rest of the frame comes with the next feed.
                break;
            }
            if (input.pos(), output.pos()) == before {
                // Output full while the frame goes on: more bytes than declared.
                return Err(size_mismatch(WHAT, dst.len(), "more bytes".to_string()));
            }
        }
        self.state.out_pos = self.state.out_pos.saturating_add(output.pos());
        if self.state.ended && input.pos() != src.len() {
            return Err(CodecError::corrupt(
                WHAT,
                format!(
                    "{} trailing bytes after the frame",
                    src.len().saturating_sub(input.pos())
                ),
            ));
        }
        Ok(())
    }
}
