//! A panic hook that SIGKILLs every registered peer, so a handler that dies never leaves a VM
//! hanging forever on its next fault (Firecracker freezes rather than fall back to zeros).
//!
//! Installed once per process, chained before the previous hook. Fault threads register their
//! peer for as long as they run ([`register_peer`] returns a guard that unregisters).

use std::sync::{Mutex, Once, PoisonError};

use crate::os;

static PEERS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();

/// Installs the hook (idempotent). Called by [`register_peer`]; call it early in `main` too.
pub fn install() {
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // try_lock: a panic while the registry is locked must not deadlock the hook.
            let peers = match PEERS.try_lock() {
                Ok(p) => p.clone(),
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().clone(),
                Err(std::sync::TryLockError::WouldBlock) => Vec::new(),
            };
            for pid in peers {
                if os::kill_peer(pid) {
                    eprintln!("thaw-uffd: panic: killed peer pid {pid}");
                }
            }
            previous(info);
        }));
    });
}

/// Keeps a peer registered with the panic hook while alive.
#[derive(Debug)]
pub struct PeerGuard(i32);

/// Registers `pid` to be SIGKILLed if this process panics.
pub fn register_peer(pid: i32) -> PeerGuard {
    install();
    PEERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(pid);
    PeerGuard(pid)
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let mut peers = PEERS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = peers.iter().position(|&p| p == self.0) {
            peers.swap_remove(i);
        }
    }
}

/// The pids currently registered (for diagnostics and tests).
pub fn registered_peers() -> Vec<i32> {
    PEERS.lock().unwrap_or_else(PoisonError::into_inner).clone()
}
