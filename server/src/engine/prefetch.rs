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

/// e2b's recorded prefetch plan (`metadata.json` → `prefetch.memory`): block indices in
/// first-touch order, and the block size they count in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchPlan {
    /// Block indices, in recorded order.
    pub indices: Vec<u64>,
    /// Block size in bytes.
    pub block_size: u64,
}

/// Largest `metadata.json` read.
pub const MAX_METADATA_LEN: u64 = 64 << 20;

/// Parses the `prefetch.memory` section of a build's `metadata.json`; `Ok(None)` when there is
/// none (older builds, or prefetch not recorded).
///
/// # Errors
/// Malformed JSON, or a section with a block size that is not a power of two from 4 KiB to
/// 2 MiB.
pub fn parse_prefetch_plan(metadata_json: &[u8]) -> anyhow::Result<Option<PrefetchPlan>> {
    #[derive(serde::Deserialize)]
    struct Metadata {
        #[serde(default)]
        prefetch: Option<Prefetch>,
    }
    #[derive(serde::Deserialize)]
    struct Prefetch {
        #[serde(default)]
        memory: Option<Memory>,
    }
    #[derive(serde::Deserialize)]
    struct Memory {
        #[serde(default)]
        indices: Vec<u64>,
        block_size: u64,
    }
    let md: Metadata =
        serde_json::from_slice(metadata_json).map_err(|e| anyhow::anyhow!("metadata.json: {e}"))?;
    let Some(memory) = md.prefetch.and_then(|p| p.memory) else {
        return Ok(None);
    };
    let bs = memory.block_size;
    if !bs.is_power_of_two() || !(4096..=(2 << 20)).contains(&bs) {
        anyhow::bail!(
            "metadata.json: prefetch.memory.block_size {bs} is not a power of two in 4 KiB..2 MiB"
        );
    }
    Ok(Some(PrefetchPlan {
        indices: memory.indices,
        block_size: bs,
    }))
}

/// Reads `{build}/metadata.json` from `store` and parses its prefetch plan; `Ok(None)` when the
/// object or the section is missing.
///
/// # Errors
/// A store error other than "not found", or a malformed document.
pub fn load_prefetch_plan(
    store: &dyn crate::store::Store,
    build: thaw_codec::BuildId,
) -> anyhow::Result<Option<PrefetchPlan>> {
    let key = format!("{build}/metadata.json");
    match store.get(&key, MAX_METADATA_LEN) {
        Ok(bytes) => parse_prefetch_plan(&bytes),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_or_fail_clearly() {
        let doc = br#"{"version":2,"template":{"build_id":"x"},"prefetch":{"memory":{"indices":[5,1,9],"access_types":["read","write","read"],"block_size":2097152}}}"#;
        assert_eq!(
            parse_prefetch_plan(doc).unwrap(),
            Some(PrefetchPlan {
                indices: vec![5, 1, 9],
                block_size: 2 << 20
            })
        );
        assert_eq!(parse_prefetch_plan(br#"{"version":1}"#).unwrap(), None);
        assert_eq!(parse_prefetch_plan(br#"{"prefetch":{}}"#).unwrap(), None);
        assert!(
            parse_prefetch_plan(br#"{"prefetch":{"memory":{"indices":[],"block_size":3}}}"#)
                .is_err()
        );
        assert!(parse_prefetch_plan(b"not json").is_err());
    }
}
