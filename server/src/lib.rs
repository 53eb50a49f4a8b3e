//! thaw-server: the engine and the `thaw` command line.
//!
//! - [`store`]: the object-store interface and the local directory store;
//! - [`layout`]: finding a build file's header and each referenced build's data object;
//! - [`writer`]: storing a build file (data object, then header) — the one write path;
//! - [`flatten`]: the reference reader, a simple whole-device resolver used as test oracle;
//! - [`cli`]: the `thaw` subcommands.

pub mod chain;
pub mod cli;
pub mod flatten;
pub mod layout;
pub mod store;
pub mod writer;
