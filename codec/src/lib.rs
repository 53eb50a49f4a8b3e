//! thaw-codec: bytes <-> structures for everything thaw reads or writes.
//!
//! No I/O, no async, no `unsafe`. Everything here is byte-compatible with e2b's storage format
//! (see `docs/formats.md`): the 64-byte header metadata, V3/V4/V5 header bodies, frame tables,
//! frame encoding and decoding (zstd, LZ4 frame format, uncompressed) into caller buffers of an
//! exact declared size, object and shared-cache file names, and the child header built at pause.
//! [`nbd`] is the NBD wire protocol, server side, sans-io (see `docs/nbd.md`).
//!
//! Every length read from input is checked against a cap before anything is allocated, and every
//! failure is a [`CodecError`] with a stable [`ErrorKind`]: no input makes this crate panic.
#![forbid(unsafe_code)]

pub mod diff;
pub mod error;
pub mod frame;
pub mod frame_table;
pub mod header;
pub mod names;
pub mod nbd;
pub mod uffd;

pub use error::{CodecError, ErrorKind, Result};
pub use frame::{FrameDecoder, FrameEncoder, StreamDecoder};
pub use frame_table::{CompressionType, Frame, FrameTable};
pub use header::{BuildData, Header, Mapping, Metadata, ResolvedMapping};
pub use names::FileKind;
pub use uffd::{RegionMap, UffdRegion};

/// A build id: 16 raw bytes in canonical RFC-4122 order, as e2b writes Go's `uuid.UUID`.
pub type BuildId = uuid::Uuid;

/// The nil build id: a mapping to it reads as zeros.
pub const NIL_BUILD: BuildId = uuid::Uuid::nil();

/// The universal address granularity of header mappings (e2b `PageSize`).
pub const PAGE_SIZE: u64 = 4096;

/// Hugepage size, the other block size a memfile may have.
pub const HUGEPAGE_SIZE: u64 = 2 * 1024 * 1024;

/// e2b's uncompressed fetch unit (`MemoryChunkSize`).
pub const CHUNK_SIZE: u64 = 4 * 1024 * 1024;

/// The default frame size for compressed data objects.
pub const DEFAULT_FRAME_SIZE: u64 = 2 * 1024 * 1024;
