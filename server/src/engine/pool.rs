//! The fetch threads: a small pool that runs blocking store transfers (the [`Store`] trait is
//! synchronous), demand jobs before prefetch jobs.
//!
//! Threads are started on demand up to a cap and park when idle. Prefetch jobs run only while
//! fewer than `prefetch_limit` of them are running, so prefetch never holds every thread and a
//! demand job queued behind prefetch work starts first.
//!
//! [`Store`]: crate::store::Store

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// A unit of work: one transfer (or one run of a transfer) of a fetch session.
pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

/// Which queue a job goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Priority {
    /// A reader is waiting for it.
    Demand,
    /// Background warming.
    Prefetch,
}

#[derive(Default)]
struct Queues {
    demand: VecDeque<Job>,
    prefetch: VecDeque<Job>,
    threads: usize,
    idle: usize,
    running_prefetch: usize,
    shutdown: bool,
}

struct Inner {
    queues: Mutex<Queues>,
    wake: Condvar,
    max_threads: usize,
    prefetch_limit: usize,
}

/// The pool. Dropping it lets the threads finish their current job and exit.
pub(crate) struct FetchPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FetchPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q = self.inner.lock();
        f.debug_struct("FetchPool")
            .field("threads", &q.threads)
            .field("idle", &q.idle)
            .field("queued_demand", &q.demand.len())
            .field("queued_prefetch", &q.prefetch.len())
            .finish()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        // A job never runs under this lock, so a poisoned lock only means a panic while
        // pushing or popping a queue: the queues are still consistent.
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl FetchPool {
    /// A pool of at most `max_threads` threads (at least 1), of which at most `prefetch_limit`
    /// (at least 1) run prefetch jobs at once.
    pub(crate) fn new(max_threads: usize, prefetch_limit: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                queues: Mutex::new(Queues::default()),
                wake: Condvar::new(),
                max_threads: max_threads.max(1),
                prefetch_limit: prefetch_limit.max(1),
            }),
        }
    }

    /// Queues `job`. Returns `false` (and drops the job) after shutdown or when no thread can
    /// be started.
    pub(crate) fn submit(&self, priority: Priority, job: Job) -> bool {
        let mut q = self.inner.lock();
        if q.shutdown {
            return false;
        }
        match priority {
            Priority::Demand => q.demand.push_back(job),
            Priority::Prefetch => q.prefetch.push_back(job),
        }
        let runnable = q.demand.len()
            + usize::from(!q.prefetch.is_empty() && q.running_prefetch < self.inner.prefetch_limit);
        if q.idle >= runnable || q.threads >= self.inner.max_threads {
            drop(q);
            self.inner.wake.notify_one();
            return true;
        }
        q.threads += 1;
        drop(q);
        let inner = Arc::clone(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("thaw-fetch".into())
            .stack_size(512 * 1024)
            .spawn(move || worker(&inner));
        if let Err(e) = spawned {
            let mut q = self.inner.lock();
            q.threads -= 1;
            let starved = q.threads == 0;
            drop(q);
            tracing::error!(error = %e, "cannot start a fetch thread");
            if starved {
                // Nobody will run the job: fail it by dropping it (its session sees the drop).
                let mut q = self.inner.lock();
                match priority {
                    Priority::Demand => drop(q.demand.pop_back()),
                    Priority::Prefetch => drop(q.prefetch.pop_back()),
                }
                return false;
            }
        }
        true
    }

    /// Threads started so far (for metrics and tests).
    pub(crate) fn threads(&self) -> usize {
        self.inner.lock().threads
    }
}

impl Drop for FetchPool {
    fn drop(&mut self) {
        let mut q = self.inner.lock();
        q.shutdown = true;
        // Queued jobs are dropped: their sessions fail their waiters (see `session::RunGuard`).
        let demand = std::mem::take(&mut q.demand);
        let prefetch = std::mem::take(&mut q.prefetch);
        drop(q);
        self.inner.wake.notify_all();
        drop(demand);
        drop(prefetch);
    }
}

fn worker(inner: &Inner) {
    loop {
        let mut q = inner.lock();
        let (job, prefetch) = loop {
            if let Some(job) = q.demand.pop_front() {
                break (job, false);
            }
            if q.running_prefetch < inner.prefetch_limit
                && let Some(job) = q.prefetch.pop_front()
            {
                q.running_prefetch += 1;
                break (job, true);
            }
            if q.shutdown {
                q.threads -= 1;
                return;
            }
            q.idle += 1;
            q = inner.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
            q.idle -= 1;
        };
        drop(q);
        job();
        if prefetch {
            let mut q = inner.lock();
            q.running_prefetch -= 1;
            let more = !q.prefetch.is_empty();
            drop(q);
            if more {
                inner.wake.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn runs_every_job_and_caps_threads() {
        let pool = FetchPool::new(3, 1);
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        for _ in 0..50 {
            let done = Arc::clone(&done);
            let tx = tx.clone();
            assert!(pool.submit(
                Priority::Demand,
                Box::new(move || {
                    std::thread::sleep(Duration::from_millis(1));
                    done.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(());
                })
            ));
        }
        for _ in 0..50 {
            rx.recv_timeout(Duration::from_secs(30)).unwrap();
        }
        assert_eq!(done.load(Ordering::SeqCst), 50);
        assert!(pool.threads() <= 3);
    }

    #[test]
    fn demand_overtakes_queued_prefetch() {
        let pool = FetchPool::new(1, 1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        // Occupy the only thread until both kinds of job are queued.
        pool.submit(
            Priority::Demand,
            Box::new(move || {
                let _ = gate_rx.recv();
            }),
        );
        for (p, name) in [
            (Priority::Prefetch, "prefetch"),
            (Priority::Demand, "demand"),
        ] {
            let order = Arc::clone(&order);
            let done_tx = done_tx.clone();
            pool.submit(
                p,
                Box::new(move || {
                    order.lock().unwrap().push(name);
                    let _ = done_tx.send(());
                }),
            );
        }
        gate_tx.send(()).unwrap();
        for _ in 0..2 {
            done_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec!["demand", "prefetch"]);
    }
}
