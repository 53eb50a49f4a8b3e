//! Encoders for everything the server sends in the transmission phase (simple replies,
//! structured reply chunks, block-status extents) and for option replies and requests.
//!
//! Data-carrying chunks are split into a fixed-size header returned by value and the data the
//! caller already holds, so a server can `writev` the header and its cache memory without
//! copying the data.

use super::consts::*;
use super::handshake::Negotiated;
use super::request::{Command, Request};
use crate::{CodecError, ErrorKind, Result};

const WHAT: &str = "nbd reply";

/// A simple reply header: magic, u32 error (0 = success), u64 cookie. A successful READ is
/// followed by exactly `length` bytes of data; nothing follows any other reply.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header: magic, u16 flags, u16 type, u64 cookie, u32 payload length.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

fn done_flag(done: bool) -> u16 {
    if done { REPLY_FLAG_DONE } else { 0 }
}

/// `NBD_REPLY_TYPE_NONE` with `DONE`: ends a structured reply whose earlier chunks did not.
pub fn none_chunk(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
}

/// Length of an `OFFSET_DATA` chunk's header plus its offset field.
pub const OFFSET_DATA_HEADER_LEN: usize = CHUNK_HEADER_LEN + 8;

/// The first 28 bytes of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk (header + u64 offset); the
/// `data_len` data bytes follow on the wire. `data_len` must be >= 1 and leave room for the
/// offset in the u32 length ([`ErrorKind::InvalidArgument`] otherwise).
pub fn offset_data_header(
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) -> Result<[u8; OFFSET_DATA_HEADER_LEN]> {
    if data_len == 0 {
        return Err(invalid("an OFFSET_DATA chunk needs at least one data byte"));
    }
    let Some(length) = data_len.checked_add(8) else {
        return Err(invalid(
            "OFFSET_DATA data length overflows the chunk length",
        ));
    };
    let mut b = [0u8; OFFSET_DATA_HEADER_LEN];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        done_flag(done),
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        length,
    ));
    b[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    Ok(b)
}

/// Length of a whole `OFFSET_HOLE` chunk.
pub const OFFSET_HOLE_LEN: usize = CHUNK_HEADER_LEN + 12;

/// A whole `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `hole_len` bytes at `offset` read as zeros.
/// `hole_len` must be nonzero ([`ErrorKind::InvalidArgument`]).
pub fn offset_hole_chunk(
    cookie: u64,
    offset: u64,
    hole_len: u32,
    done: bool,
) -> Result<[u8; OFFSET_HOLE_LEN]> {
    if hole_len == 0 {
        return Err(invalid("an OFFSET_HOLE chunk needs a nonzero hole size"));
    }
    let mut b = [0u8; OFFSET_HOLE_LEN];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        done_flag(done),
        REPLY_TYPE_OFFSET_HOLE,
        cookie,
        12,
    ));
    b[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 8].copy_from_slice(&offset.to_be_bytes());
    b[CHUNK_HEADER_LEN + 8..].copy_from_slice(&hole_len.to_be_bytes());
    Ok(b)
}

/// `message` cut to at most [`MAX_STRING`] bytes, on a character boundary.
fn clip_message(message: &str) -> &str {
    let mut end = message.len().min(MAX_STRING);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.get(..end).unwrap_or_default()
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk (u32 error, u16 message length, message) to `out`.
/// Messages longer than [`MAX_STRING`] bytes are cut on a character boundary.
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str, done: bool) {
    encode_error_common(out, cookie, error, message, None, done);
}

/// Appends an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk (as [`encode_error_chunk`], then the u64
/// offset of the failure, which must lie inside the request).
pub fn encode_error_offset_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    error: u32,
    message: &str,
    offset: u64,
    done: bool,
) {
    encode_error_common(out, cookie, error, message, Some(offset), done);
}

fn encode_error_common(
    out: &mut Vec<u8>,
    cookie: u64,
    error: u32,
    message: &str,
    offset: Option<u64>,
    done: bool,
) {
    let msg = clip_message(message).as_bytes();
    // <= 4096, so both conversions are exact.
    let msg_len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
    let extra: u32 = if offset.is_some() { 8 } else { 0 };
    let length = 6 + u32::from(msg_len) + extra;
    let kind = if offset.is_some() {
        REPLY_TYPE_ERROR_OFFSET
    } else {
        REPLY_TYPE_ERROR
    };
    out.extend_from_slice(&chunk_header(done_flag(done), kind, cookie, length));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&msg_len.to_be_bytes());
    out.extend_from_slice(msg);
    if let Some(off) = offset {
        out.extend_from_slice(&off.to_be_bytes());
    }
}

/// One block-status extent as a backend reports it: `length` bytes with `flags`
/// (`STATE_HOLE`, `STATE_ZERO` for `base:allocation`). Lengths are u64; the encoder clips them
/// to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Length in bytes (zero-length extents are skipped).
    pub length: u64,
    /// Status flags.
    pub flags: u32,
}

/// Most descriptors one `BLOCK_STATUS` chunk carries; the rest of the range is left for the
/// client to ask again (the spec lets the server describe less than the request).
pub const MAX_EXTENTS_PER_CHUNK: usize = 1024;

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for `context_id` describing consecutive
/// `extents` from the request's offset, and returns how many bytes of the request it covers.
///
/// The encoding is always valid for a request of `request_len` bytes: zero-length extents are
/// skipped, adjacent extents with equal flags merge, the list stops once the request is covered
/// and the last descriptor is clipped to it (so every length fits in u32), `req_one` keeps only
/// the first descriptor, and at most [`MAX_EXTENTS_PER_CHUNK`] descriptors are written. No
/// descriptor at all (empty input or `request_len == 0`) is [`ErrorKind::InvalidArgument`] and
/// leaves `out` unchanged.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    cookie: u64,
    context_id: u32,
    request_len: u32,
    extents: &[Extent],
    req_one: bool,
    done: bool,
) -> Result<u32> {
    let mut descs: Vec<(u32, u32)> = Vec::new();
    let mut remaining = request_len;
    for e in extents {
        if remaining == 0 {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let len = u32::try_from(e.length.min(u64::from(remaining))).unwrap_or(remaining);
        remaining -= len;
        match descs.last_mut() {
            Some(last) if last.1 == e.flags => last.0 += len,
            _ => {
                if descs.len() == MAX_EXTENTS_PER_CHUNK {
                    break;
                }
                descs.push((len, e.flags));
            }
        }
    }
    if req_one {
        descs.truncate(1);
    }
    if descs.is_empty() {
        return Err(invalid(
            "a BLOCK_STATUS chunk needs at least one nonzero extent",
        ));
    }
    let count = u32::try_from(descs.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&chunk_header(
        done_flag(done),
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + 8 * count,
    ));
    out.extend_from_slice(&context_id.to_be_bytes());
    let mut covered = 0u32;
    for (len, flags) in descs {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        covered += len;
    }
    Ok(covered)
}

/// Appends the error reply for `request`, choosing the form the connection requires: with
/// structured replies, a READ or BLOCK_STATUS gets an `NBD_REPLY_TYPE_ERROR` chunk with `DONE`
/// (the spec forbids simple replies to READ once structured replies are on); everything else
/// gets a simple reply. `error` must be nonzero (an `NBD_E*` value).
pub fn encode_error_reply(
    out: &mut Vec<u8>,
    negotiated: &Negotiated,
    request: &Request,
    error: u32,
    message: &str,
) {
    let structured = negotiated.structured_replies
        && matches!(request.command, Command::Read | Command::BlockStatus);
    if structured {
        encode_error_chunk(out, request.cookie, error, message, true);
    } else {
        out.extend_from_slice(&simple_reply(request.cookie, error));
    }
}

/// Appends an option reply: magic, u32 option, u32 reply type, u32 length, then `data`.
///
/// Handshake data is bounded by the caller (names and messages are at most [`MAX_STRING`]
/// bytes); data longer than `u32::MAX` is [`ErrorKind::TooLarge`] and appends nothing.
pub fn encode_option_reply(
    out: &mut Vec<u8>,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| {
        CodecError::too_large(
            "nbd option reply length",
            u64::try_from(data.len()).unwrap_or(u64::MAX),
            u64::from(u32::MAX),
        )
    })?;
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

/// Appends an option request as a client sends it: `IHAVEOPT`, u32 option, u32 length, `data`
/// (for test clients and tools). Data longer than `u32::MAX` is [`ErrorKind::TooLarge`].
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) -> Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| {
        CodecError::too_large(
            "nbd option length",
            u64::try_from(data.len()).unwrap_or(u64::MAX),
            u64::from(u32::MAX),
        )
    })?;
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

fn invalid(detail: &str) -> CodecError {
    CodecError::new(ErrorKind::InvalidArgument, WHAT, detail)
}
