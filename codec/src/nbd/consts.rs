//! Numbers of the NBD wire protocol (`NetworkBlockDevice/nbd` `doc/proto.md`). All fields on the
//! wire are big-endian.
//!
//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`, 32-byte requests and replies) are not
//! supported: the option is answered `NBD_REP_ERR_UNSUP` like any unknown option, so the magics
//! and flags that only exist with it are not listed.

// --- magics -------------------------------------------------------------------------------------

/// `NBDMAGIC`: the first 8 bytes of the server greeting (ASCII `NBDMAGIC`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes of the newstyle greeting, and the magic of every option request
/// (ASCII `IHAVEOPT`).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (`NBD_REQUEST_MAGIC`).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply (`NBD_SIMPLE_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (`NBD_STRUCTURED_REPLY_MAGIC`).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// --- sizes --------------------------------------------------------------------------------------

/// Length of the newstyle greeting: magic, `IHAVEOPT`, u16 handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option request header: `IHAVEOPT`, u32 option, u32 length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, u32 option, u32 reply type, u32 length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a (compact) transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Zero bytes that follow the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Longest string (export name, description, query, context name) the spec lets a peer send:
/// `NBD_MAX_STRING`.
pub const MAX_STRING: usize = 4096;

// --- handshake flags (u16, server -> client) ----------------------------------------------------

/// `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks the fixed newstyle handshake.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// `NBD_FLAG_NO_ZEROES`: the server can omit the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

// --- client flags (u32, client -> server) -------------------------------------------------------

/// `NBD_FLAG_C_FIXED_NEWSTYLE`: the client speaks the fixed newstyle handshake.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// `NBD_FLAG_C_NO_ZEROES`: the client asks the server to omit the 124 zero bytes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// --- transmission flags (u16, per export) -------------------------------------------------------

/// `NBD_FLAG_HAS_FLAGS`: always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`: every write-like command fails with `EPERM`.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`: `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`: `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_ROTATIONAL`: a hint that the device behaves like a spinning disk.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_FLAG_SEND_TRIM`: `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`: `NBD_CMD_WRITE_ZEROES` is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF`: `NBD_CMD_FLAG_DF` is supported (only with structured replies).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`: flush and FUA take effect across connections.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_RESIZE`: `NBD_CMD_RESIZE` is supported (never set by thaw).
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_FLAG_SEND_CACHE`: `NBD_CMD_CACHE` is supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_FLAG_SEND_FAST_ZERO`: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// --- options ------------------------------------------------------------------------------------

/// `NBD_OPT_EXPORT_NAME`: choose an export and end the handshake (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: the client gives up; the server answers `ACK` and closes.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`: list the exports.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`: upgrade to TLS (refused by thaw with `ERR_POLICY`).
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`: describe an export without choosing it.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`: describe an export and enter transmission with it.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`: enable structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`: list metadata contexts matching queries.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`: select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`: 64-bit headers (not supported: answered `ERR_UNSUP`).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// --- option reply types -------------------------------------------------------------------------

/// `NBD_REP_ACK`: the option succeeded (or a list ended).
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: one export in answer to `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`: one piece of export information (`NBD_INFO_*`).
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`: one metadata context (u32 id, name).
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`: known and valid, but forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`: known but syntactically invalid (or in the wrong state).
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`: TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`: the export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the client must ask for `NBD_INFO_BLOCK_SIZE`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// `NBD_REP_ERR_TOO_BIG`: the request or its reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// --- NBD_INFO types (u16, first field of an NBD_REP_INFO payload) -------------------------------

/// `NBD_INFO_EXPORT`: u64 size, u16 transmission flags (always sent for INFO/GO).
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: the export's canonical name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: a human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: u32 minimum, u32 preferred, u32 maximum block size.
pub const INFO_BLOCK_SIZE: u16 = 3;

// --- commands (u16 request type) ----------------------------------------------------------------

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE` (the only command with a request payload here).
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`: soft disconnect, no reply.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`: prefetch a range.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

// --- command flags (u16) ------------------------------------------------------------------------

/// `NBD_CMD_FLAG_FUA`: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`: `WRITE_ZEROES` must allocate.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`: don't fragment a structured `READ` reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`: one extent per context in a `BLOCK_STATUS` reply.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`: fail `WRITE_ZEROES` with `ENOTSUP` unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Every command flag thaw understands.
pub const CMD_FLAGS_KNOWN: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

// --- structured replies -------------------------------------------------------------------------

/// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`: empty final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: u64 offset, then data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`: u64 offset, u32 hole size (reads as zeros).
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`: u32 context id, then (u32 length, u32 flags) extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks an error chunk type.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// `NBD_REPLY_TYPE_ERROR`: u32 error, u16 message length, message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`: as `ERROR`, then u64 offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// --- errno values on the wire -------------------------------------------------------------------

/// `NBD_EPERM`: operation not permitted (writes on a read-only export).
pub const NBD_EPERM: u32 = 1;
/// `NBD_EIO`: I/O error.
pub const NBD_EIO: u32 = 5;
/// `NBD_ENOMEM`: out of memory (the spec discourages it).
pub const NBD_ENOMEM: u32 = 12;
/// `NBD_EINVAL`: invalid request.
pub const NBD_EINVAL: u32 = 22;
/// `NBD_ENOSPC`: no space (writes past the end).
pub const NBD_ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`: a `DF` read too large for one chunk.
pub const NBD_EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`: only for `FAST_ZERO` requests that cannot be fast.
pub const NBD_ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`: the server is shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

// --- metadata contexts --------------------------------------------------------------------------

/// The one metadata context thaw serves.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `NBD_STATE_HOLE` in `base:allocation`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO` in `base:allocation`: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
