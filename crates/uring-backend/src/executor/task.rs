//! Tasks, their wakers and the ready queue.
//!
//! A waker is an `Arc<TaskWaker>`: it is `Send + Sync` and may be woken
//! from any thread. A wake puts the task's key on a mutex-protected ready
//! queue (once, until the task is polled again) and, if the executor is
//! blocked in `io_uring_enter`, writes the executor's wake eventfd, on which
//! the executor keeps a read outstanding. Wakes from the executor's own
//! thread while it is running (the common case: completions, deferred
//! callbacks, tasks waking each other) never touch the eventfd.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Wake, Waker};

use vmm_sys_util::eventfd::EventFd;

pub(super) type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;

/// State shared between the executor and every waker and stop handle.
pub(super) struct WakeShared {
    ready: Mutex<VecDeque<u64>>,
    /// Set while the executor is (about to be) blocked in the kernel.
    pub(super) sleeping: AtomicBool,
    pub(super) stop: AtomicBool,
    pub(super) fd: Arc<EventFd>,
}

impl WakeShared {
    pub(super) fn new(fd: EventFd) -> WakeShared {
        WakeShared {
            ready: Mutex::new(VecDeque::new()),
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            fd: Arc::new(fd),
        }
    }

    pub(super) fn ready(&self) -> MutexGuard<'_, VecDeque<u64>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Interrupts a blocked `io_uring_enter`.
    pub(super) fn kick(&self) {
        if let Err(e) = self.fd.write(1) {
            log::warn!("waking the io_uring executor: {e}");
        }
    }

    pub(super) fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
    }
}

pub(super) struct TaskWaker {
    key: u64,
    queued: AtomicBool,
    shared: Arc<WakeShared>,
}

impl TaskWaker {
    /// A waker for a task that is already on the ready queue.
    pub(super) fn new(key: u64, shared: Arc<WakeShared>) -> Arc<TaskWaker> {
        Arc::new(TaskWaker {
            key,
            queued: AtomicBool::new(true),
            shared,
        })
    }

    /// Called just before the task is polled: wakes from now on queue it
    /// again.
    pub(super) fn clear_queued(&self) {
        self.queued.store(false, Ordering::SeqCst);
    }
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::SeqCst) {
            return;
        }
        self.shared.ready().push_back(self.key);
        // Paired with the executor's store of `sleeping` followed by its
        // look at the ready queue: either it sees our key, or we see it
        // sleeping and kick it.
        if self.shared.sleeping.load(Ordering::SeqCst) {
            self.shared.kick();
        }
    }
}

pub(super) struct Task {
    pub(super) future: Option<LocalFuture>,
    pub(super) waker: Option<(Arc<TaskWaker>, Waker)>,
}
