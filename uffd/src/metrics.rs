//! Handler metrics as plain atomics (relaxed counters; read with [`Metrics::snapshot`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets of the fetch latency histogram: bucket `i` counts fetches that took
/// `[2^i, 2^(i+1))` microseconds (bucket 0 also holds < 1 µs; the last holds everything longer).
pub const LATENCY_BUCKETS: usize = 32;

/// Live counters, updated by the fault thread and fetch completions.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) faults_missing: AtomicU64,
    pub(crate) faults_write: AtomicU64,
    pub(crate) faults_wp: AtomicU64,
    pub(crate) faults_deduped: AtomicU64,
    pub(crate) copies: AtomicU64,
    pub(crate) zero_installs: AtomicU64,
    pub(crate) bytes_copied: AtomicU64,
    pub(crate) eexist: AtomicU64,
    pub(crate) eagain: AtomicU64,
    pub(crate) remove_events: AtomicU64,
    pub(crate) removed_pages: AtomicU64,
    pub(crate) fetches: AtomicU64,
    pub(crate) fetch_retries: AtomicU64,
    pub(crate) fetch_failures: AtomicU64,
    pub(crate) prefaults: AtomicU64,
    pub(crate) prefault_bytes: AtomicU64,
    pub(crate) prefault_skipped: AtomicU64,
    pub(crate) fetch_latency_us: [AtomicU64; LATENCY_BUCKETS],
}

/// A point-in-time copy of [`Metrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Missing-page faults read (read and write).
    pub faults_missing: u64,
    /// Of those, write faults.
    pub faults_write: u64,
    /// Write-protect faults (sync WP mode).
    pub faults_wp: u64,
    /// Faults on a page whose fetch was already in flight (answered by that fetch's install).
    pub faults_deduped: u64,
    /// Successful `UFFDIO_COPY`s of source data.
    pub copies: u64,
    /// Successful zero installs (`UFFDIO_ZEROPAGE` or a copy from the zero buffer).
    pub zero_installs: u64,
    /// Bytes installed by `copies`.
    pub bytes_copied: u64,
    /// Installs that found the page already present (answered with `UFFDIO_WAKE`).
    pub eexist: u64,
    /// Ioctls that returned EAGAIN (deferred and retried).
    pub eagain: u64,
    /// `UFFD_EVENT_REMOVE` events.
    pub remove_events: u64,
    /// Pages marked removed by those events.
    pub removed_pages: u64,
    /// Fetches started (including retries).
    pub fetches: u64,
    /// Fetch retries after a failure.
    pub fetch_retries: u64,
    /// Failed fetch attempts.
    pub fetch_failures: u64,
    /// Pages installed ahead of any fault by [`Prefaulter`](crate::Prefaulter) (data or zeros).
    pub prefaults: u64,
    /// Bytes of source data installed by those prefaults.
    pub prefault_bytes: u64,
    /// Prefaults that found the page already handled by the fault path.
    pub prefault_skipped: u64,
    /// Fetch latency histogram (see [`LATENCY_BUCKETS`]).
    pub fetch_latency_us: [u64; LATENCY_BUCKETS],
}

impl Metrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn record_fetch(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = (us.max(1).ilog2() as usize).min(LATENCY_BUCKETS - 1);
        Self::inc(&self.fetch_latency_us[bucket]);
    }

    /// Copies every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            faults_missing: l(&self.faults_missing),
            faults_write: l(&self.faults_write),
            faults_wp: l(&self.faults_wp),
            faults_deduped: l(&self.faults_deduped),
            copies: l(&self.copies),
            zero_installs: l(&self.zero_installs),
            bytes_copied: l(&self.bytes_copied),
            eexist: l(&self.eexist),
            eagain: l(&self.eagain),
            remove_events: l(&self.remove_events),
            removed_pages: l(&self.removed_pages),
            fetches: l(&self.fetches),
            fetch_retries: l(&self.fetch_retries),
            fetch_failures: l(&self.fetch_failures),
            prefaults: l(&self.prefaults),
            prefault_bytes: l(&self.prefault_bytes),
            prefault_skipped: l(&self.prefault_skipped),
            fetch_latency_us: std::array::from_fn(|i| l(&self.fetch_latency_us[i])),
        }
    }
}

impl MetricsSnapshot {
    /// Total fetches recorded in the latency histogram.
    pub fn fetch_latency_count(&self) -> u64 {
        self.fetch_latency_us.iter().sum()
    }

    /// The fetch latency below which a fraction `q` (0..=1) of the recorded fetches fall, as the
    /// upper bound of its histogram bucket (so within a factor of two); `None` with no fetches.
    pub fn fetch_latency_quantile(&self, q: f64) -> Option<Duration> {
        let total = self.fetch_latency_count();
        if total == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        let mut seen = 0u64;
        for (i, &n) in self.fetch_latency_us.iter().enumerate() {
            seen += n;
            #[allow(clippy::cast_precision_loss, reason = "counts far below 2^52")]
            let frac = seen as f64 / total as f64;
            if n > 0 && frac >= q {
                return Some(Duration::from_micros(1u64 << (i + 1).min(63)));
            }
        }
        Some(Duration::from_micros(1u64 << LATENCY_BUCKETS.min(63)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets() {
        let m = Metrics::default();
        m.record_fetch(Duration::ZERO);
        m.record_fetch(Duration::from_micros(3));
        m.record_fetch(Duration::from_millis(1));
        m.record_fetch(Duration::from_secs(1 << 40));
        let s = m.snapshot();
        assert_eq!(s.fetch_latency_us[0], 1);
        assert_eq!(s.fetch_latency_us[1], 1);
        assert_eq!(s.fetch_latency_us[9], 1); // 1000 us: [512, 1024)
        assert_eq!(s.fetch_latency_us[LATENCY_BUCKETS - 1], 1);
        assert_eq!(s.fetch_latency_count(), 4);
        assert_eq!(
            s.fetch_latency_quantile(0.5),
            Some(Duration::from_micros(4))
        );
        assert_eq!(
            s.fetch_latency_quantile(0.75),
            Some(Duration::from_micros(1024))
        );
        assert_eq!(MetricsSnapshot::default().fetch_latency_quantile(0.5), None);
    }
}
