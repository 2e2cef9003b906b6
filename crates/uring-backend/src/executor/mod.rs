//! A single-threaded executor driven by one io_uring.
//!
//! One turn of [`Executor::run`]:
//! 1. poll the tasks that are ready (a bounded number),
//! 2. run the callbacks queued with [`Executor::defer`],
//! 3. one `io_uring_enter` that submits every SQE queued during the turn
//!    and, unless a task is already ready again, waits for a completion,
//! 4. reap every CQE, which completes operations and wakes their tasks.
//!
//! Tasks are local (`!Send`); wakers are `Send + Sync` and may be woken from
//! any thread (see `task.rs`).

mod buffers;
mod direct;
mod op;
pub(crate) mod ops;
mod setup;
mod task;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use io_uring::IoUring;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::slab::Slab;
use buffers::FixedBuffers;
pub use direct::{Completion, Deferred, EventFdReader, FILE_SLOTS};
use op::OpSlot;
pub use setup::{Opcodes, RingSetup};
use task::{Task, TaskWaker, WakeShared};

/// Largest number of task polls in one turn before the executor goes back
/// to the kernel, so a busy set of tasks cannot starve I/O.
const POLL_BUDGET: usize = 1024;

/// Errors from setting up or running the executor.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("creating an io_uring with {entries} entries")]
    Setup {
        entries: u32,
        #[source]
        source: io::Error,
    },
    #[error("enabling the io_uring after restricting it")]
    EnableRings(#[source] io::Error),
    #[error("creating the executor's wake eventfd")]
    WakeEventFd(#[source] io::Error),
    #[error("io_uring_enter failed")]
    Enter(#[source] io::Error),
    #[error("sandboxing the thread: {0}")]
    Sandbox(String),
    #[error("the executor is already running")]
    AlreadyRunning,
    #[error("{count} fixed buffers are more than io_uring allows ({max})")]
    TooManyBuffers { count: usize, max: usize },
    #[error("registering {count} fixed buffers ({bytes} bytes)")]
    RegisterBuffers {
        count: usize,
        bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error("unregistering fixed buffers")]
    UnregisterBuffers(#[source] io::Error),
    #[error("registering a file with the ring")]
    RegisterFile(#[source] io::Error),
    #[error("the executor stopped before the task finished")]
    Unfinished,
}

/// Counters for benchmarks; written by the executor's thread only, read
/// from anywhere.
#[derive(Debug, Default)]
pub struct ExecutorStats {
    turns: AtomicU64,
    enters: AtomicU64,
    sqes_submitted: AtomicU64,
    cqes_reaped: AtomicU64,
    poll_hits: AtomicU64,
    poll_misses: AtomicU64,
    poll_window_ns: AtomicU64,
}

/// A copy of [`ExecutorStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub turns: u64,
    pub enters: u64,
    pub sqes_submitted: u64,
    pub cqes_reaped: u64,
    /// Idle spells that busy-polling ended with work found, without
    /// sleeping.
    pub poll_hits: u64,
    /// Idle spells that polled for the whole poll time, then slept.
    pub poll_misses: u64,
    /// The adaptive poll window now, in nanoseconds.
    pub poll_window_ns: u64,
}

/// Single writer: a load and a store, no read-modify-write.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl ExecutorStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            turns: self.turns.load(Ordering::Relaxed),
            enters: self.enters.load(Ordering::Relaxed),
            sqes_submitted: self.sqes_submitted.load(Ordering::Relaxed),
            cqes_reaped: self.cqes_reaped.load(Ordering::Relaxed),
            poll_hits: self.poll_hits.load(Ordering::Relaxed),
            poll_misses: self.poll_misses.load(Ordering::Relaxed),
            poll_window_ns: self.poll_window_ns.load(Ordering::Relaxed),
        }
    }

    fn add_cqes(&self, n: u64) {
        bump(&self.cqes_reaped, n);
    }
}

/// When an idle executor busy-polls (see [`Executor::set_poll`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PollWhen {
    /// Whenever it would sleep: new requests (kicks) and completions are
    /// both picked up without a wake-up. Costs CPU while the device idles.
    #[default]
    Always,
    /// Only while I/O it started is in flight: completions are picked up
    /// without a wake-up, new requests still wake it. Cheaper when idle.
    IoInFlight,
    /// Whenever it would sleep, for a window that adapts between zero and
    /// the poll time (the ceiling) to the gaps between work this executor
    /// measures: after a sleep the next piece of work ended, the window
    /// doubles (from [`ADAPTIVE_START`]) if polling that long, within the
    /// ceiling, would have caught it, and halves (down to zero) if the
    /// sleep was longer than the ceiling. As QEMU's `poll-grow` and
    /// `poll-shrink`: a device with work coming polls, an idle one sleeps
    /// at once. With more than [`ADAPTIVE_MAX_INFLIGHT`] operations in
    /// flight it sleeps without polling.
    Adaptive,
}

/// The first window an adaptive executor polls for.
pub const ADAPTIVE_START: Duration = Duration::from_micros(4);

/// An adaptive executor with more I/O than this in flight does not poll:
/// its completions come in batches and one sleep is paid per batch, while
/// spinning would take the CPU the submitter needs (measured with
/// benches/blkbench: polling at QD32 cost 7-13 % of IOPS on 2 cores).
pub const ADAPTIVE_MAX_INFLIGHT: usize = 4;

/// Stops an executor from any thread.
#[derive(Clone)]
pub struct StopHandle(Arc<WakeShared>);

impl StopHandle {
    /// Makes the executor's current (or next) [`Executor::run`] return
    /// after its current turn.
    pub fn stop(&self) {
        self.0.request_stop();
    }
}

/// A direct op's completion waiting for its handler: handler, tag, result.
type DirectDone = (Rc<dyn Completion>, u64, i32);

/// The io_uring executor of one thread.
pub struct Executor {
    ring: RefCell<IoUring>,
    setup: RingSetup,
    ops: RefCell<Slab<OpSlot>>,
    /// Ops whose CQE has not arrived yet.
    inflight: Cell<usize>,
    /// Of those, the ones that complete on their own (I/O, not a wait for
    /// an eventfd): polling for them is worthwhile.
    busy: Cell<usize>,
    tasks: RefCell<Slab<Task>>,
    shared: Arc<WakeShared>,
    /// Ready keys being polled this turn.
    polling: RefCell<VecDeque<u64>>,
    /// The outstanding read on the wake eventfd, if armed.
    wake_key: Cell<Option<u64>>,
    deferred: RefCell<Vec<Box<dyn FnOnce()>>>,
    deferred_rc: RefCell<Vec<Rc<dyn Deferred>>>,
    /// Scratch lists of `reap`, kept for their capacity.
    reap_wakers: RefCell<Vec<Waker>>,
    reap_direct: RefCell<Vec<DirectDone>>,
    /// Which slots of the registered-file table are taken.
    file_slots: RefCell<Vec<bool>>,
    buffers: RefCell<FixedBuffers>,
    stats: Arc<ExecutorStats>,
    running: Cell<bool>,
    shutting_down: Cell<bool>,
    /// How long an idle executor busy-polls before it sleeps, and when.
    poll: Cell<Duration>,
    poll_when: Cell<PollWhen>,
    /// The adaptive window (see [`PollWhen::Adaptive`]).
    window: Cell<Duration>,
}

impl Executor {
    /// Sets up an io_uring with `entries` submission entries, restricted to
    /// the executor's opcodes where the kernel allows it. Must be called on
    /// the thread that will run the executor (the ring is single-issuer).
    pub fn new(entries: u32) -> Result<Rc<Executor>, ExecutorError> {
        let (ring, setup) = setup::create(entries)?;
        let wake_fd = EventFd::new(EFD_NONBLOCK).map_err(ExecutorError::WakeEventFd)?;
        log::debug!("io_uring executor: {setup:?}");
        Ok(Rc::new(Executor {
            ring: RefCell::new(ring),
            setup,
            ops: RefCell::new(Slab::new()),
            inflight: Cell::new(0),
            busy: Cell::new(0),
            tasks: RefCell::new(Slab::new()),
            shared: Arc::new(WakeShared::new(wake_fd)),
            polling: RefCell::new(VecDeque::new()),
            wake_key: Cell::new(None),
            deferred: RefCell::new(Vec::new()),
            deferred_rc: RefCell::new(Vec::new()),
            reap_wakers: RefCell::new(Vec::new()),
            reap_direct: RefCell::new(Vec::new()),
            file_slots: RefCell::new(vec![false; FILE_SLOTS as usize]),
            buffers: RefCell::new(FixedBuffers::default()),
            stats: Arc::new(ExecutorStats::default()),
            running: Cell::new(false),
            shutting_down: Cell::new(false),
            poll: Cell::new(Duration::ZERO),
            poll_when: Cell::new(PollWhen::Always),
            window: Cell::new(Duration::ZERO),
        }))
    }

    /// How the ring was set up.
    pub fn setup(&self) -> &RingSetup {
        &self.setup
    }

    pub fn stats(&self) -> Arc<ExecutorStats> {
        self.stats.clone()
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.shared.clone())
    }

    /// Makes [`Executor::run`] return at the end of this turn.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    /// Number of operations whose completion has not been reaped yet (not
    /// counting the executor's own read on its wake eventfd).
    pub fn inflight(&self) -> usize {
        self.inflight.get() - usize::from(self.wake_key.get().is_some())
    }

    /// Number of tasks that have not finished.
    pub fn task_count(&self) -> usize {
        self.tasks.borrow().len()
    }

    /// Runs `fut` as a task of this executor.
    pub fn spawn(&self, fut: impl Future<Output = ()> + 'static) {
        let key = self.tasks.borrow_mut().insert(Task {
            future: Some(Box::pin(fut)),
            waker: None,
        });
        let tw = TaskWaker::new(key, self.shared.clone());
        let waker = Waker::from(tw.clone());
        if let Some(task) = self.tasks.borrow_mut().get_mut(key) {
            task.waker = Some((tw, waker));
        }
        self.shared.ready().push_back(key);
    }

    /// Runs `f` after the ready tasks of this turn, before the executor
    /// goes to the kernel.
    pub fn defer(&self, f: impl FnOnce() + 'static) {
        self.deferred.borrow_mut().push(Box::new(f));
    }

    /// Runs tasks and I/O until [`Executor::stop`] or a [`StopHandle`]
    /// asks it to return.
    pub fn run(&self) -> Result<(), ExecutorError> {
        if self.running.replace(true) {
            return Err(ExecutorError::AlreadyRunning);
        }
        let result = self.run_loop();
        self.shared.stop.store(false, Ordering::SeqCst);
        self.running.set(false);
        result
    }

    /// Runs `fut` as a task, and the executor until it finishes; its
    /// output. Tasks still pending stay for the next run.
    pub fn block_on<T: 'static>(
        self: &Rc<Self>,
        fut: impl Future<Output = T> + 'static,
    ) -> Result<T, ExecutorError> {
        let out = Rc::new(RefCell::new(None));
        let (o, ex) = (out.clone(), self.clone());
        self.spawn(async move {
            *o.borrow_mut() = Some(fut.await);
            ex.stop();
        });
        self.run()?;
        let v = out.borrow_mut().take();
        v.ok_or(ExecutorError::Unfinished)
    }

    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    fn run_loop(&self) -> Result<(), ExecutorError> {
        if self.wake_key.get().is_none() {
            self.arm_wake();
        }
        while !self.stopping() {
            bump(&self.stats.turns, 1);
            self.poll_ready();
            self.run_deferred();
            if self.stopping() {
                break;
            }
            let (worth_polling, window) = match self.poll_when.get() {
                PollWhen::Always => (true, self.poll.get()),
                PollWhen::IoInFlight => (self.busy.get() > 0, self.poll.get()),
                PollWhen::Adaptive => (self.busy.get() <= ADAPTIVE_MAX_INFLIGHT, self.window.get()),
            };
            if worth_polling && self.shared.ready().is_empty() && !window.is_zero() {
                // Busy-poll a while before sleeping: a completion or a
                // wake-up that comes soon costs no sleep and wake-up.
                let found = self.poll_for_work(window).map_err(ExecutorError::Enter)?;
                if found {
                    bump(&self.stats.poll_hits, 1);
                    self.reap();
                    continue;
                }
                bump(&self.stats.poll_misses, 1);
            }
            // Announce the sleep, then look at the ready queue (see
            // `TaskWaker::wake_by_ref` for the other side).
            self.shared.sleeping.store(true, Ordering::SeqCst);
            let idle = self.shared.ready().is_empty() && !self.stopping();
            let adapting = idle && worth_polling && self.poll_when.get() == PollWhen::Adaptive;
            let slept_from = adapting.then(Instant::now);
            let entered = self.enter(usize::from(idle));
            self.shared.sleeping.store(false, Ordering::SeqCst);
            entered.map_err(ExecutorError::Enter)?;
            if let Some(t0) = slept_from {
                self.adapt(window, t0.elapsed());
            }
            self.reap();
        }
        Ok(())
    }

    /// Makes an idle executor busy-poll for up to `poll` (checking the
    /// completion queue, pending task work and its ready queue) before it
    /// sleeps in `io_uring_enter`. Zero, the default, never polls. Polling
    /// trades CPU time for latency: a request that arrives within the
    /// window is served without a sleep and a wake-up.
    pub fn set_poll(&self, poll: Duration, when: PollWhen) {
        self.poll.set(poll);
        self.poll_when.set(when);
        self.window.set(Duration::ZERO);
        self.stats.poll_window_ns.store(0, Ordering::Relaxed);
    }

    /// The adaptive rule (see [`PollWhen::Adaptive`]): `window` was polled
    /// in vain, then the executor slept for `slept` until work came.
    fn adapt(&self, window: Duration, slept: Duration) {
        let next = next_window(window, slept, self.poll.get());
        if next != window {
            self.window.set(next);
            self.stats
                .poll_window_ns
                .store(next.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// Submits what is queued, then spins until a completion, task work,
    /// a ready task or a stop request turns up (true), or `window` passed.
    fn poll_for_work(&self, window: Duration) -> io::Result<bool> {
        self.enter(0)?;
        let deadline = Instant::now() + window;
        loop {
            let taskrun = {
                let mut ring = self.ring.borrow_mut();
                if !ring.completion().is_empty() {
                    return Ok(true);
                }
                let taskrun = ring.submission().taskrun();
                taskrun
            };
            if taskrun {
                // Completions waiting as task work: an enter runs it.
                self.enter(0)?;
                continue;
            }
            if !self.shared.ready().is_empty() || self.stopping() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// One `io_uring_enter`: submits everything queued and waits for
    /// `want` completions. Interruptions and a full completion queue are
    /// not errors: the caller reaps and comes back.
    fn enter(&self, want: usize) -> io::Result<usize> {
        bump(&self.stats.enters, 1);
        let res = self.ring.borrow().submit_and_wait(want);
        match res {
            Ok(n) => {
                bump(&self.stats.sqes_submitted, n as u64);
                Ok(n)
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    fn poll_ready(&self) {
        let mut budget = POLL_BUDGET;
        let mut polling = self.polling.borrow_mut();
        loop {
            {
                let mut ready = self.shared.ready();
                if ready.is_empty() {
                    return;
                }
                std::mem::swap(&mut *ready, &mut *polling);
            }
            while let Some(key) = polling.pop_front() {
                if budget == 0 || self.stopping() {
                    // Leave the rest, in order, for the next turn or run.
                    let mut ready = self.shared.ready();
                    while let Some(k) = polling.pop_back() {
                        ready.push_front(k);
                    }
                    ready.push_front(key);
                    return;
                }
                budget -= 1;
                self.poll_task(key);
            }
        }
    }

    fn poll_task(&self, key: u64) {
        let taken = {
            let mut tasks = self.tasks.borrow_mut();
            let Some(task) = tasks.get_mut(key) else {
                return;
            };
            match (task.future.take(), task.waker.take()) {
                (Some(f), Some(w)) => (f, w),
                (f, w) => {
                    task.future = f;
                    task.waker = w;
                    return;
                }
            }
        };
        let (mut future, (tw, waker)) = taken;
        tw.clear_queued();
        let mut cx = Context::from_waker(&waker);
        let done = future.as_mut().poll(&mut cx).is_ready();
        if done {
            let finished = self.tasks.borrow_mut().remove(key);
            drop(finished);
            drop(future);
        } else if let Some(task) = self.tasks.borrow_mut().get_mut(key) {
            task.future = Some(future);
            task.waker = Some((tw, waker));
        }
    }

    fn run_deferred(&self) {
        loop {
            let batch = std::mem::take(&mut *self.deferred.borrow_mut());
            let mut rcs = std::mem::take(&mut *self.deferred_rc.borrow_mut());
            if batch.is_empty() && rcs.is_empty() {
                *self.deferred_rc.borrow_mut() = rcs;
                return;
            }
            for f in batch {
                f();
            }
            for d in rcs.drain(..) {
                d.run();
            }
            // Keep the list's capacity; what was queued meanwhile moves in.
            let mut queued = self.deferred_rc.borrow_mut();
            rcs.append(&mut queued);
            *queued = rcs;
        }
    }

    /// Keeps one read outstanding on the wake eventfd, so that a wake from
    /// another thread ends a blocked `io_uring_enter`.
    fn arm_wake(&self) {
        if self.shutting_down.get() {
            return;
        }
        let owned = ops::EventFdRead::new(self.shared.fd.clone());
        let res = self.submit_detached(owned, ops::EventFdRead::entry);
        match res {
            Ok(key) => self.wake_key.set(Some(key)),
            Err(e) => log::warn!("arming the executor's wake eventfd: {e}"),
        }
    }

    fn wake_rearm_ok(&self, res: i32) -> bool {
        if res >= 0 || res == -libc::EINTR || res == -libc::EAGAIN {
            return true;
        }
        if res != -libc::ECANCELED {
            log::warn!(
                "reading the executor's wake eventfd: {}",
                io::Error::from_raw_os_error(-res)
            );
        }
        false
    }

    /// Drops every task, cancels every operation still in the kernel and
    /// waits for their completions, so that nothing the kernel may still
    /// touch is freed. Breaks the `Rc` cycles of tasks that hold the
    /// executor. Called by `Drop`, and by iothreads after `run`.
    pub fn shutdown(&self) {
        self.shutting_down.set(true);
        loop {
            let keys = self.tasks.borrow().keys();
            if keys.is_empty() {
                break;
            }
            for key in keys {
                let task = self.tasks.borrow_mut().remove(key);
                drop(task);
            }
        }
        self.deferred.borrow_mut().clear();
        self.deferred_rc.borrow_mut().clear();
        self.shared.ready().clear();
        let pending: Vec<u64> = {
            let ops = self.ops.borrow();
            ops.keys()
        };
        for key in pending {
            let waiting = matches!(
                self.ops.borrow_mut().get_mut(key).map(|s| &s.state),
                Some(op::OpState::Pending(_) | op::OpState::Detached)
            );
            if waiting {
                self.cancel(key);
            }
        }
        self.wake_key.set(None);
        while self.inflight.get() > 0 {
            if let Err(e) = self.enter(1) {
                log::error!(
                    "io_uring_enter while draining: {e}; leaking {} in-flight ops",
                    self.inflight.get()
                );
                let ops = std::mem::replace(&mut *self.ops.borrow_mut(), Slab::new());
                std::mem::forget(ops);
                self.inflight.set(0);
                break;
            }
            self.reap();
        }
        self.shutting_down.set(false);
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The adaptive poll window after polling `window` in vain and sleeping
/// `slept` (see [`PollWhen::Adaptive`]).
fn next_window(window: Duration, slept: Duration, ceiling: Duration) -> Duration {
    if window + slept <= ceiling {
        (window * 2).max(ADAPTIVE_START).min(ceiling)
    } else if slept > ceiling {
        let half = window / 2;
        if half < ADAPTIVE_START {
            Duration::ZERO
        } else {
            half
        }
    } else {
        window
    }
}

/// A future that is ready on its second poll: lets other ready tasks and
/// I/O run.
pub fn yield_now() -> impl Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
}

#[cfg(test)]
mod tests;
