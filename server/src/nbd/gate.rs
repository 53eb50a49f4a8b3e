//! The write gate of a writable export: how an export (pause) holds the guest's writes back.
//!
//! Every write-like request (WRITE, WRITE_ZEROES, TRIM) passes the gate: it takes a shared
//! hold for the time it changes the overlay (and, with FUA, makes it durable). An export takes
//! the gate exclusively: the writes in progress finish first (they were or will be
//! acknowledged, so they belong in the layer), then new writes either **wait** until the gate
//! opens again or are **refused** with `ESHUTDOWN`, as the request asks. A *closed* gate refuses
//! every write for good (an export that ends with `close`).

use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

const OPEN: u8 = 0;
const REFUSING: u8 = 1;
const CLOSED: u8 = 2;

/// What new writes do while an export holds the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeldWrites {
    /// They wait until the gate opens.
    Wait,
    /// They fail at once with `ESHUTDOWN`.
    Refuse,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct WriteGate {
    lock: RwLock<()>,
    mode: AtomicU8,
}

/// Why a write did not pass the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// An export holds the gate and asked for new writes to be refused.
    Exporting,
    /// The export was closed after an export.
    Closed,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Exporting => "writes are held back: the export is being snapshotted",
            Self::Closed => "the export was closed for writes after a snapshot",
        })
    }
}

impl WriteGate {
    /// Passes the gate for one write: the guard keeps an export out until it drops.
    ///
    /// # Errors
    /// The gate refuses writes (an export in `refuse` mode, or closed).
    pub async fn enter(&self) -> Result<RwLockReadGuard<'_, ()>, Refused> {
        self.check()?;
        let guard = self.lock.read().await;
        // The mode may have changed while this write waited behind an export.
        self.check()?;
        Ok(guard)
    }

    fn check(&self) -> Result<(), Refused> {
        match self.mode.load(Ordering::Acquire) {
            REFUSING => Err(Refused::Exporting),
            CLOSED => Err(Refused::Closed),
            _ => Ok(()),
        }
    }

    /// Takes the gate exclusively (for an export): returns once the writes in progress have
    /// finished; new writes wait or are refused per `held` until the guard drops.
    pub async fn hold(&self, held: HeldWrites) -> GateHold<'_> {
        if held == HeldWrites::Refuse {
            let _ = self
                .mode
                .compare_exchange(OPEN, REFUSING, Ordering::AcqRel, Ordering::Acquire);
        }
        GateHold {
            gate: self,
            _guard: self.lock.write().await,
            close: false,
        }
    }

    /// Whether writes are refused for good.
    pub fn is_closed(&self) -> bool {
        self.mode.load(Ordering::Acquire) == CLOSED
    }

    /// Whether an export holds the gate right now.
    pub fn is_held(&self) -> bool {
        self.lock.try_read().is_err()
    }
}

/// An export's exclusive hold of a [`WriteGate`]; dropping it opens the gate again, unless
/// [`close`](Self::close) was called.
#[derive(Debug)]
pub struct GateHold<'a> {
    gate: &'a WriteGate,
    _guard: RwLockWriteGuard<'a, ()>,
    close: bool,
}

impl GateHold<'_> {
    /// Refuse every write from now on (the export ends with `close`).
    pub fn close(mut self) {
        self.close = true;
    }
}

impl Drop for GateHold<'_> {
    fn drop(&mut self) {
        let mode = if self.close { CLOSED } else { OPEN };
        if self.gate.mode.load(Ordering::Acquire) != CLOSED {
            self.gate.mode.store(mode, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn held_writes_wait_or_are_refused_and_close_is_final() {
        block_on(async {
            let gate = WriteGate::default();
            drop(gate.enter().await.unwrap());
            {
                let _h = gate.hold(HeldWrites::Refuse).await;
                assert_eq!(gate.enter().await.unwrap_err(), Refused::Exporting);
                assert!(gate.is_held());
            }
            drop(gate.enter().await.unwrap());
            {
                let _h = gate.hold(HeldWrites::Wait).await;
                // A waiting write does not pass while the hold lasts.
                let waiting =
                    tokio::time::timeout(std::time::Duration::from_millis(50), gate.enter()).await;
                assert!(waiting.is_err());
            }
            gate.hold(HeldWrites::Wait).await.close();
            assert_eq!(gate.enter().await.unwrap_err(), Refused::Closed);
            drop(gate.hold(HeldWrites::Wait).await);
            assert!(gate.is_closed());
        });
    }
}
