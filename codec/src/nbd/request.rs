//! Transmission-phase requests: parsing the 28-byte header and validating it against what was
//! negotiated, with the errno the spec asks for.
//!
//! ```text
//! u32 magic 0x25609513 | u16 flags | u16 type | u64 cookie | u64 offset | u32 length
//! ```
//! followed by `length` bytes of payload for `NBD_CMD_WRITE` only.

use super::consts::*;
use super::handshake::Negotiated;
use crate::{CodecError, Result};

/// A command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`: `length` payload bytes follow the header.
    Write,
    /// `NBD_CMD_DISC`: finish outstanding requests, then close; no reply.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Any other type (answered `EINVAL`; no payload follows).
    Unknown(u16),
}

impl Command {
    /// From the wire type.
    pub fn from_u16(t: u16) -> Self {
        match t {
            CMD_READ => Self::Read,
            CMD_WRITE => Self::Write,
            CMD_DISC => Self::Disc,
            CMD_FLUSH => Self::Flush,
            CMD_TRIM => Self::Trim,
            CMD_CACHE => Self::Cache,
            CMD_WRITE_ZEROES => Self::WriteZeroes,
            CMD_BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// The wire type.
    pub fn as_u16(self) -> u16 {
        match self {
            Self::Read => CMD_READ,
            Self::Write => CMD_WRITE,
            Self::Disc => CMD_DISC,
            Self::Flush => CMD_FLUSH,
            Self::Trim => CMD_TRIM,
            Self::Cache => CMD_CACHE,
            Self::WriteZeroes => CMD_WRITE_ZEROES,
            Self::BlockStatus => CMD_BLOCK_STATUS,
            Self::Unknown(t) => t,
        }
    }

    /// A short lower-case name (`read`, `write`, ..., `unknown`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Disc => "disc",
            Self::Flush => "flush",
            Self::Trim => "trim",
            Self::Cache => "cache",
            Self::WriteZeroes => "write_zeroes",
            Self::BlockStatus => "block_status",
            Self::Unknown(_) => "unknown",
        }
    }
}

/// The errno values of the wire, with the spec's rules for when each may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Errno {
    /// `NBD_EPERM` (1): write-like command on a read-only export.
    Perm,
    /// `NBD_EIO` (5).
    Io,
    /// `NBD_ENOMEM` (12): discouraged by the spec.
    NoMem,
    /// `NBD_EINVAL` (22): bad request.
    Inval,
    /// `NBD_ENOSPC` (28): write past the end, out of space.
    NoSpc,
    /// `NBD_EOVERFLOW` (75): only for a `DF` read too large for one chunk.
    Overflow,
    /// `NBD_ENOTSUP` (95): only for a `FAST_ZERO` write-zeroes that would be slow.
    NotSup,
    /// `NBD_ESHUTDOWN` (108): the server is shutting down.
    Shutdown,
}

/// Linux errno numbers used by [`Errno::from_linux`].
mod linux {
    pub const EPERM: i32 = 1;
    pub const EIO: i32 = 5;
    pub const ENOMEM: i32 = 12;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EOVERFLOW: i32 = 75;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
    pub const EDQUOT: i32 = 122;
}

impl Errno {
    /// The wire value.
    pub fn code(self) -> u32 {
        match self {
            Self::Perm => NBD_EPERM,
            Self::Io => NBD_EIO,
            Self::NoMem => NBD_ENOMEM,
            Self::Inval => NBD_EINVAL,
            Self::NoSpc => NBD_ENOSPC,
            Self::Overflow => NBD_EOVERFLOW,
            Self::NotSup => NBD_ENOTSUP,
            Self::Shutdown => NBD_ESHUTDOWN,
        }
    }

    /// From a wire value; `None` for values the spec does not define (clients treat those as
    /// `EINVAL`).
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            NBD_EPERM => Self::Perm,
            NBD_EIO => Self::Io,
            NBD_ENOMEM => Self::NoMem,
            NBD_EINVAL => Self::Inval,
            NBD_ENOSPC => Self::NoSpc,
            NBD_EOVERFLOW => Self::Overflow,
            NBD_ENOTSUP => Self::NotSup,
            NBD_ESHUTDOWN => Self::Shutdown,
            _ => return None,
        })
    }

    /// Maps a Linux errno from the backend to the wire, flag-aware: `EPERM`/`EROFS` -> `EPERM`;
    /// `ENOSPC`/`EDQUOT`/`EFBIG` -> `ENOSPC`; `EOVERFLOW` -> `EOVERFLOW` only when the request
    /// has `DF` (else `EINVAL`); `EOPNOTSUPP` -> `ENOTSUP` only when the request has
    /// `FAST_ZERO` (else `EINVAL`); `ENOMEM`, `EINVAL`, `ESHUTDOWN` as themselves; anything
    /// else `EIO`.
    pub fn from_linux(errno: i32, request_flags: u16) -> Self {
        match errno {
            linux::EPERM | linux::EROFS => Self::Perm,
            linux::ENOSPC | linux::EDQUOT | linux::EFBIG => Self::NoSpc,
            linux::EOVERFLOW if request_flags & CMD_FLAG_DF != 0 => Self::Overflow,
            linux::EOPNOTSUPP if request_flags & CMD_FLAG_FAST_ZERO != 0 => Self::NotSup,
            linux::EOVERFLOW | linux::EOPNOTSUPP | linux::EINVAL => Self::Inval,
            linux::ENOMEM => Self::NoMem,
            linux::ESHUTDOWN => Self::Shutdown,
            linux::EIO => Self::Io,
            _ => Self::Io,
        }
    }

    /// Lower-case name (`eperm`, `eio`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Perm => "eperm",
            Self::Io => "eio",
            Self::NoMem => "enomem",
            Self::Inval => "einval",
            Self::NoSpc => "enospc",
            Self::Overflow => "eoverflow",
            Self::NotSup => "enotsup",
            Self::Shutdown => "eshutdown",
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request the server must not execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Invalid {
    /// Answer with `errno` (echoing the cookie) after reading and discarding `drain` payload
    /// bytes (a rejected WRITE's data), so the stream stays in sync.
    Reply {
        /// The error to send.
        errno: Errno,
        /// Payload bytes to skip before the next request header.
        drain: u32,
        /// What was wrong (for logs).
        reason: &'static str,
    },
    /// Close the connection: a WRITE too large to skip (the stream cannot be resynchronised
    /// at an acceptable cost).
    Disconnect {
        /// What was wrong (for logs).
        reason: &'static str,
    },
}

/// A parsed request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque cookie (handle) the reply must echo.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (for WRITE, the payload that follows).
    pub length: u32,
}

impl Request {
    /// Parses a request header. A wrong magic is [`crate::ErrorKind::Corrupt`]: the spec makes
    /// it a violation, so the server closes the connection (after draining in-flight work).
    pub fn parse(header: &[u8; REQUEST_LEN]) -> Result<Self> {
        let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        if magic != REQUEST_MAGIC {
            return Err(CodecError::corrupt(
                "nbd request",
                format!("request magic {magic:#010x}"),
            ));
        }
        let mut u64_at = [0u8; 8];
        u64_at.copy_from_slice(&header[8..16]);
        let cookie = u64::from_be_bytes(u64_at);
        u64_at.copy_from_slice(&header[16..24]);
        let offset = u64::from_be_bytes(u64_at);
        Ok(Self {
            flags: u16::from_be_bytes([header[4], header[5]]),
            command: Command::from_u16(u16::from_be_bytes([header[6], header[7]])),
            cookie,
            offset,
            length: u32::from_be_bytes([header[24], header[25], header[26], header[27]]),
        })
    }

    /// [`Request::parse`] on the first [`REQUEST_LEN`] bytes of a slice;
    /// [`crate::ErrorKind::Truncated`] when it is shorter.
    pub fn parse_slice(bytes: &[u8]) -> Result<Self> {
        let header: &[u8; REQUEST_LEN] = bytes
            .get(..REQUEST_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
            CodecError::truncated(
                "nbd request",
                REQUEST_LEN as u64,
                u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            )
        })?;
        Self::parse(header)
    }

    /// The wire form (for clients and tests).
    pub fn to_bytes(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.as_u16().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Payload bytes that follow this header on the wire: `length` for WRITE, else 0. The
    /// server must consume them whether or not the request is valid.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }

    /// Whether every bit of `flag` is set.
    pub fn has_flag(&self, flag: u16) -> bool {
        self.flags & flag == flag
    }

    /// Checks the request against the connection and export, in this order:
    ///
    /// 1. unknown command: `EINVAL` (`DISC` is always accepted: it has no reply);
    /// 2. WRITE, TRIM or WRITE_ZEROES on a read-only export: `EPERM`;
    /// 3. unknown flag, or a flag on the wrong command or not advertised (`FUA` without
    ///    `SEND_FUA`; `NO_HOLE` or `FAST_ZERO` off WRITE_ZEROES; `DF` off READ or without
    ///    `SEND_DF`; `REQ_ONE` off BLOCK_STATUS): `EINVAL`;
    /// 4. a command not advertised (FLUSH, TRIM, WRITE_ZEROES, CACHE), BLOCK_STATUS without
    ///    structured replies and a selected `base:allocation`: `EINVAL`;
    /// 5. FLUSH with a nonzero offset or length: `EINVAL`;
    /// 6. READ or WRITE above the maximum block size: `EINVAL` (`EOVERFLOW` for a `DF` read);
    /// 7. offset or length not a multiple of the minimum block size: `EINVAL`;
    /// 8. offset + length overflowing or past the end: `ENOSPC` for WRITE and WRITE_ZEROES,
    ///    `EINVAL` otherwise;
    /// 9. BLOCK_STATUS with length 0: `EINVAL`.
    ///
    /// A rejected WRITE carries `drain = length` so the server skips its payload; a WRITE longer
    /// than twice the maximum block size is [`Invalid::Disconnect`] instead.
    pub fn validate(&self, n: &Negotiated) -> std::result::Result<(), Invalid> {
        let drain = self.payload_len();
        let drain_cap = n.block_size.max.saturating_mul(2);
        let fail = |errno: Errno, reason: &'static str| {
            if drain > drain_cap {
                Invalid::Disconnect {
                    reason: "write payload too large to skip",
                }
            } else {
                Invalid::Reply {
                    errno,
                    drain,
                    reason,
                }
            }
        };
        let cmd = self.command;
        match cmd {
            Command::Unknown(_) => return Err(fail(Errno::Inval, "unknown command")),
            Command::Disc => return Ok(()),
            _ => {}
        }
        let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
        if writes && n.read_only() {
            return Err(fail(Errno::Perm, "write to a read-only export"));
        }
        if self.flags & !CMD_FLAGS_KNOWN != 0 {
            return Err(fail(Errno::Inval, "unknown command flag"));
        }
        if self.has_flag(CMD_FLAG_FUA) && !n.has_flag(TFLAG_SEND_FUA) {
            return Err(fail(Errno::Inval, "FUA was not advertised"));
        }
        let zeroes = cmd == Command::WriteZeroes;
        if self.has_flag(CMD_FLAG_NO_HOLE) && !zeroes {
            return Err(fail(Errno::Inval, "NO_HOLE is only valid on WRITE_ZEROES"));
        }
        if self.has_flag(CMD_FLAG_FAST_ZERO) && !(zeroes && n.has_flag(TFLAG_SEND_FAST_ZERO)) {
            return Err(fail(
                Errno::Inval,
                "FAST_ZERO is only valid on WRITE_ZEROES when advertised",
            ));
        }
        let df = self.has_flag(CMD_FLAG_DF);
        if df && !(cmd == Command::Read && n.structured_replies && n.has_flag(TFLAG_SEND_DF)) {
            return Err(fail(
                Errno::Inval,
                "DF is only valid on READ with structured replies",
            ));
        }
        if self.has_flag(CMD_FLAG_REQ_ONE) && cmd != Command::BlockStatus {
            return Err(fail(Errno::Inval, "REQ_ONE is only valid on BLOCK_STATUS"));
        }
        let supported = match cmd {
            Command::Flush => n.has_flag(TFLAG_SEND_FLUSH),
            Command::Trim => n.has_flag(TFLAG_SEND_TRIM),
            Command::WriteZeroes => n.has_flag(TFLAG_SEND_WRITE_ZEROES),
            Command::Cache => n.has_flag(TFLAG_SEND_CACHE),
            Command::BlockStatus => n.structured_replies && n.base_allocation.is_some(),
            _ => true,
        };
        if !supported {
            return Err(fail(Errno::Inval, "command not negotiated"));
        }
        if cmd == Command::Flush {
            if self.offset != 0 || self.length != 0 {
                return Err(fail(Errno::Inval, "FLUSH with a nonzero offset or length"));
            }
            return Ok(());
        }
        if matches!(cmd, Command::Read | Command::Write) && self.length > n.block_size.max {
            let errno = if df { Errno::Overflow } else { Errno::Inval };
            return Err(fail(errno, "length above the maximum block size"));
        }
        let min = u64::from(n.block_size.min);
        if !self.offset.is_multiple_of(min) || !u64::from(self.length).is_multiple_of(min) {
            return Err(fail(Errno::Inval, "unaligned to the minimum block size"));
        }
        let in_bounds = self
            .offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= n.size);
        if !in_bounds {
            let errno = if matches!(cmd, Command::Write | Command::WriteZeroes) {
                Errno::NoSpc
            } else {
                Errno::Inval
            };
            return Err(fail(errno, "range past the end of the export"));
        }
        if cmd == Command::BlockStatus && self.length == 0 {
            return Err(fail(Errno::Inval, "BLOCK_STATUS with length 0"));
        }
        Ok(())
    }
}
