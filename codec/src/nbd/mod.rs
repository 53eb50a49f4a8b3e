//! The NBD wire protocol, server side, sans-io (`NetworkBlockDevice/nbd` `doc/proto.md`).
//!
//! - [`consts`]: magics, flags, option, reply, command and errno numbers.
//! - [`export`]: what an export offers ([`ExportConfig`], [`BlockSize`], [`ExportFeatures`])
//!   and the transmission flags it turns into.
//! - [`handshake`]: [`ServerHandshake`], the fixed newstyle option haggling as a state machine
//!   fed with bytes; it ends in [`Progress::Go`] with a [`Negotiated`] connection,
//!   [`Progress::Abort`] or [`Progress::Reject`].
//! - [`request`]: [`Request::parse`] of the 28-byte request header and
//!   [`Request::validate`] against the [`Negotiated`] parameters, giving the spec's errno and
//!   how many payload bytes to drain.
//! - [`reply`]: simple replies, structured reply chunks (headers returned by value so data can
//!   be written with `writev` straight from cache memory), block-status extents.
//!
//! Nothing here does I/O, allocates beyond the documented caps, or panics on any input.
//! Extended headers and TLS are not supported (answered `ERR_UNSUP` and `ERR_POLICY`).

pub mod consts;
pub mod export;
pub mod handshake;
pub mod reply;
pub mod request;

pub use export::{BlockSize, ExportConfig, ExportFeatures};
pub use handshake::{
    BASE_ALLOCATION_ID, HandshakeConfig, HandshakeLimits, Negotiated, Progress, RejectReason,
    ServerHandshake, Step,
};
pub use reply::Extent;
pub use request::{Command, Errno, Invalid, Request};
