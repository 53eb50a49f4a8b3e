//! thaw-uffd: the userfaultfd memory handler for Firecracker's UFFD backend.
//!
//! Not built yet: the handshake, fault loop and page states arrive with the UFFD issue. The crate
//! exists now so the workspace layout matches `docs/architecture.md`.
