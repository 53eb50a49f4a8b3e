//! Background prefetch: warm a file's cache from a list of offsets (e2b's `prefetch.memory`
//! in `metadata.json`: block indices in recorded first-touch order) with bounded concurrency.
//! Prefetch transfers queue behind demand transfers in the fetch pool, so demand reads go
//! first; a block fetched by both is fetched once (same session).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use super::LayeredFile;

/// Progress counters of a prefetch.
#[derive(Debug, Default)]
pub struct PrefetchProgress {
    /// Blocks to warm.
    pub total: AtomicU64,
    /// Blocks warmed (present, fetched or already there).
    pub done: AtomicU64,
    /// Blocks whose fetch failed (logged; demand reads retry them).
    pub failed: AtomicU64,
}

/// A running prefetch. Dropping it does not stop it; call [`cancel`](Self::cancel).
#[derive(Debug)]
pub struct PrefetchHandle {
    progress: Arc<PrefetchProgress>,
    cancel: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PrefetchHandle {
    /// Progress counters.
    pub fn progress(&self) -> &Arc<PrefetchProgress> {
        &self.progress
    }

    /// Stops issuing new fetches (running ones complete).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Waits for the prefetch to finish; returns (done, failed).
    pub fn join(self) -> (u64, u64) {
        for t in self.threads {
            let _ = t.join();
        }
        (
            self.progress.done.load(Ordering::Relaxed),
            self.progress.failed.load(Ordering::Relaxed),
        )
    }
}

/// Warms the blocks at `indices` (in units of `block_size` bytes, e2b's `prefetch.memory`
/// order) of `file` in the background, `concurrency` blocks at a time. Indices past the end of
/// the file are skipped.
pub fn prefetch_offsets(
    file: Arc<LayeredFile>,
    indices: Vec<u64>,
    block_size: u64,
    concurrency: usize,
) -> PrefetchHandle {
    let progress = Arc::new(PrefetchProgress::default());
    progress
        .total
        .store(indices.len() as u64, Ordering::Relaxed);
    let cancel = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let indices = Arc::new(indices);
    let threads = (0..concurrency.max(1))
        .filter_map(|_| {
            let (file, progress, cancel, next, indices) = (
                Arc::clone(&file),
                Arc::clone(&progress),
                Arc::clone(&cancel),
                Arc::clone(&next),
                Arc::clone(&indices),
            );
            std::thread::Builder::new()
                .name("thaw-prefetch".into())
                .spawn(move || {
                    while !cancel.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&block) = usize::try_from(i).ok().and_then(|i| indices.get(i))
                        else {
                            break;
                        };
                        let offset = block.saturating_mul(block_size);
                        let len = block_size.min(file.size().saturating_sub(offset));
                        if len == 0 {
                            progress.done.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        match file.prefetch_blocking(offset, len) {
                            Ok(()) => {
                                progress.done.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                progress.failed.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(offset, error = %e, "prefetch failed");
                            }
                        }
                    }
                })
                .ok()
        })
        .collect();
    PrefetchHandle {
        progress,
        cancel,
        threads,
    }
}
