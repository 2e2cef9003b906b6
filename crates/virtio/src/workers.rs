//! Counting the tasks that serve a device's queues, so that `reset` can
//! wait until none of them touches guest memory any more.

use std::sync::{Arc, Condvar, Mutex};

use uring_backend::iothread::IoThread;

/// Counts running queue workers; `reset` waits for zero.
#[derive(Default)]
pub struct WorkerCount {
    running: Mutex<usize>,
    idle: Condvar,
}

impl WorkerCount {
    pub(crate) fn started(&self) {
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    pub(crate) fn finished(&self) {
        let mut n = self.running.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    pub(crate) fn wait_idle(&self) {
        let mut n = self.running.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Decrements the worker count when dropped: when a worker ends, or when
/// its context is dropped without ever running.
struct WorkerGuard(Arc<WorkerCount>);

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        self.0.finished();
    }
}

/// Proof that a worker was counted; it counts as finished when this is
/// dropped.
pub struct WorkerGuardToken {
    _guard: WorkerGuard,
}

impl WorkerGuardToken {
    /// Counts a worker as started.
    pub fn new(workers: &Arc<WorkerCount>) -> WorkerGuardToken {
        workers.started();
        WorkerGuardToken {
            _guard: WorkerGuard(workers.clone()),
        }
    }
}

/// The iothread of each of `count` queues (or queue pairs): the `requested`
/// iothread indices in turn, or all of `iothreads` when none were named.
/// Err((index, available)) names an index that does not exist.
pub fn spread_over_iothreads(
    requested: &[usize],
    iothreads: &[Arc<IoThread>],
    count: usize,
) -> Result<Vec<Arc<IoThread>>, (usize, usize)> {
    let pool: Vec<usize> = if requested.is_empty() {
        (0..iothreads.len()).collect()
    } else {
        requested.to_vec()
    };
    if let Some(&index) = pool.iter().find(|&&i| i >= iothreads.len()) {
        return Err((index, iothreads.len()));
    }
    if pool.is_empty() {
        return Err((0, 0));
    }
    Ok((0..count)
        .map(|q| iothreads[pool[q % pool.len()]].clone())
        .collect())
}
