//! thaw-server: the engine and the `thaw` command line.
//!
//! - [`store`]: the object-store interface, the local directory store and the shared directory
//!   cache tier;
//! - [`cache`]: per-build-file cache memory (2 MiB-aligned, hugepage-advised) with a lock-free
//!   presence bitmap and exclusive fill guards — the engine's hit path;
//! - [`layout`]: finding a build file's header and each referenced build's data object;
//! - [`writer`]: storing a build file (data object, then header) — the one write path;
//! - [`flatten`]: the reference reader, a simple whole-device resolver used as test oracle;
//! - [`chain`]: layered test chains and their flattened images;
//! - [`runtime`]: thread-per-core workers, each a tokio-uring runtime (spawn on a core, wake
//!   across cores); [`uring`]: io_uring reads (owned, registered and foreign-memory buffers);
//! - [`nbd`]: the NBD server (`thaw serve`) and its copy-on-write overlay; [`metrics`]: the
//!   Prometheus endpoint;
//! - [`uffd`]: the UFFD memory handler over the engine ([`uffd::EngineSource`],
//!   [`uffd::serve_uffd`]); [`handlers`]: UFFD handlers started and stopped at runtime;
//! - [`cli`]: the `thaw` subcommands.

pub mod cache;
pub mod chain;
pub mod cli;
pub mod control;
pub mod engine;
pub mod export;
pub mod flatten;
pub mod handlers;
pub mod layout;
pub mod metrics;
pub mod nbd;
pub mod runtime;
pub mod store;
pub mod uffd;
pub mod uring;
pub mod writer;
