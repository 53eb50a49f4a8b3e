//! thaw-uffd: the userfaultfd memory handler for Firecracker's UFFD snapshot backend.
//!
//! Firecracker restores a VM with `mem_backend: {backend_type: "Uffd"}`: it connects to a unix
//! socket and sends, in one message, its guest memory layout (JSON) and a userfaultfd registered on
//! that memory. From then on every first touch of a guest page blocks until this handler installs
//! the page.
//!
//! - [`handshake::accept`] receives and validates that message ([`thaw_codec::RegionMap`]).
//! - [`FaultHandler::spawn`] runs the fault loop on a dedicated thread, answering faults from a
//!   [`PageSource`] (implemented by the engine's layered store), tracking per-page state
//!   ([`PageState`]) for the pause/export step, and failing closed (SIGKILL the peer) when a page
//!   cannot be produced.
//!
//! The crate does not depend on the engine; see `docs/uffd.md` for the design and what is tested.
//! All `unsafe` lives in [`ioctl`] (the userfaultfd ABI) and `os` (sockets, poll, eventfd, mmap).

pub mod error;
pub mod handler;
pub mod handshake;
pub mod ioctl;
pub mod metrics;
mod os;
pub mod panic_hook;
pub mod source;
pub mod state;

pub use error::{ErrorKind, Result, UffdError};
pub use handler::{Exit, FaultHandler, HandlerConfig, Prefault, Prefaulter};
pub use handshake::{Handshake, HandshakeConfig, PeerCred};
pub use metrics::MetricsSnapshot;
pub use os::{kill_peer, read_process_memory};
pub use source::{FetchDone, FetchError, Lookup, PAGE_BUF_ALIGN, PageBuf, PageSource};
pub use state::PageState;
pub use thaw_codec::{RegionMap, UffdRegion};
