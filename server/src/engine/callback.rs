//! Completion callbacks for callers without an async runtime (the UFFD fault thread): a future
//! driven by its own wakers. Each wake polls the future on the waking thread (a fetch thread,
//! after it released the session lock) until it completes, then calls the callback once.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Callback<T> = Box<dyn FnOnce(T) + Send>;

struct Task<T> {
    slot: Mutex<Option<(BoxFuture<T>, Callback<T>)>>,
}

impl<T: Send + 'static> Task<T> {
    fn run(self: &Arc<Self>) {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        let Some((fut, _)) = slot.as_mut() else {
            return;
        };
        let waker = Waker::from(Arc::clone(self));
        let mut cx = Context::from_waker(&waker);
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx)
            && let Some((_, done)) = slot.take()
        {
            drop(slot);
            done(out);
        }
    }
}

impl<T: Send + 'static> Wake for Task<T> {
    fn wake(self: Arc<Self>) {
        self.run();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.run();
    }
}

/// Polls `fut` now and on every wake until it completes, then calls `done` with its output.
pub(crate) fn spawn_with_callback<T: Send + 'static>(
    fut: impl Future<Output = T> + Send + 'static,
    done: impl FnOnce(T) + Send + 'static,
) {
    let task = Arc::new(Task {
        slot: Mutex::new(Some((
            Box::pin(fut) as BoxFuture<T>,
            Box::new(done) as Callback<T>,
        ))),
    });
    task.run();
}
