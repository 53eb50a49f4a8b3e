//! thaw-server: the engine and the `thaw` command line.

pub mod cache;
