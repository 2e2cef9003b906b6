//! An executor on its own thread, fed with jobs from other threads.
//!
//! The executor is created on the thread (its ring is single-issuer). A job
//! goes through a channel, and the job eventfd wakes the ring: the thread
//! keeps one read outstanding on it and runs every queued job each time it
//! completes.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::executor::{
    Executor, ExecutorError, ExecutorStats, PollWhen, StatsSnapshot, StopHandle,
};

/// Work for an iothread, run on it with its executor.
pub type Job = Box<dyn FnOnce(&Rc<Executor>) + Send>;

/// Errors from starting or stopping an iothread.
#[derive(Debug, thiserror::Error)]
pub enum IoThreadError {
    #[error("creating the job eventfd of iothread {name}")]
    EventFd {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting iothread {name}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the executor of iothread {name}")]
    Executor {
        name: String,
        #[source]
        source: ExecutorError,
    },
    #[error("iothread {name} ended before it was ready")]
    Died { name: String },
    #[error("the executor of iothread {name} failed")]
    Run {
        name: String,
        #[source]
        source: ExecutorError,
    },
    #[error("iothread {name} panicked")]
    Panicked { name: String },
}

/// The thread's CPU clock, and its final reading once it has ended (the
/// clock id names a thread ID the kernel may reuse after that).
struct CpuClock {
    clock: libc::clockid_t,
    ended: AtomicBool,
    final_ns: AtomicU64,
}

impl CpuClock {
    fn read(clock: libc::clockid_t) -> Option<u64> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write.
        let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
        (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
    }

    fn current_thread() -> Option<libc::clockid_t> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: pthread_self is always valid; `clock` is a valid out pointer.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        (rc == 0).then_some(clock)
    }
}

struct Ready {
    stop: StopHandle,
    stats: Arc<ExecutorStats>,
    cpu: Arc<CpuClock>,
}

/// A thread running one [`Executor`].
pub struct IoThread {
    name: String,
    jobs: Sender<Job>,
    job_fd: Arc<EventFd>,
    stop: StopHandle,
    stats: Arc<ExecutorStats>,
    cpu: Arc<CpuClock>,
    thread: Option<JoinHandle<Result<(), ExecutorError>>>,
}

async fn serve_jobs(ex: Rc<Executor>, jobs: Receiver<Job>, fd: Arc<EventFd>) {
    loop {
        while let Ok(job) = jobs.try_recv() {
            job(&ex);
        }
        if let Err(e) = ex.read_eventfd(fd.clone()).await {
            log::error!("iothread: reading the job eventfd: {e}; no more jobs");
            return;
        }
    }
}

/// An iothread (or any helper thread, such as a vhost-user device's
/// watcher) takes no process-directed signals (SIGTERM, SIGINT, ...): they
/// belong to the thread that waits for them, whether the helper was
/// started before or after that thread blocked them.
pub fn block_process_signals() {
    // SAFETY: sigset_t is plain data; sigfillset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigfillset(&mut set) };
    // Synchronous signals stay deliverable: a blocked SIGSYS from a
    // seccomp filter (or SIGSEGV, SIGBUS) kills without a report.
    for sig in [
        libc::SIGSYS,
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
    ] {
        // SAFETY: `set` is a valid sigset_t.
        unsafe { libc::sigdelset(&mut set, sig) };
    }
    // SAFETY: blocking signals in the calling thread only; a null old-mask
    // pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        log::warn!(
            "iothread: blocking signals: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
}

/// Run by an iothread once its executor is set up and before it takes
/// jobs (e.g. installing a seccomp filter); an error ends the thread.
pub type Sandbox = Box<dyn FnOnce() -> Result<(), String> + Send>;

fn thread_main(
    entries: u32,
    jobs: Receiver<Job>,
    job_fd: Arc<EventFd>,
    ready: Sender<Result<Ready, ExecutorError>>,
    sandbox: Option<Sandbox>,
) -> Result<(), ExecutorError> {
    block_process_signals();
    let ex = match Executor::new(entries) {
        Ok(ex) => ex,
        Err(e) => {
            let _ = ready.send(Err(e));
            return Ok(());
        }
    };
    if let Some(sandbox) = sandbox {
        if let Err(e) = sandbox() {
            let _ = ready.send(Err(ExecutorError::Sandbox(e)));
            return Ok(());
        }
    }
    let cpu = Arc::new(CpuClock {
        clock: CpuClock::current_thread().unwrap_or(libc::CLOCK_THREAD_CPUTIME_ID),
        ended: AtomicBool::new(false),
        final_ns: AtomicU64::new(0),
    });
    let _ = ready.send(Ok(Ready {
        stop: ex.stop_handle(),
        stats: ex.stats(),
        cpu: cpu.clone(),
    }));
    ex.spawn(serve_jobs(ex.clone(), jobs, job_fd));
    let res = ex.run();
    ex.shutdown();
    drop(ex);
    let spent = CpuClock::read(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or(0);
    cpu.final_ns.store(spent, Ordering::SeqCst);
    cpu.ended.store(true, Ordering::SeqCst);
    res
}

impl IoThread {
    /// Starts a thread named `name` with an executor of `entries` ring
    /// entries; returns once the executor is set up.
    pub fn spawn(name: &str, entries: u32) -> Result<IoThread, IoThreadError> {
        Self::spawn_sandboxed(name, entries, None)
    }

    /// As [`IoThread::spawn`], running `sandbox` on the thread after the
    /// executor's set-up and before its first job.
    pub fn spawn_sandboxed(
        name: &str,
        entries: u32,
        sandbox: Option<Sandbox>,
    ) -> Result<IoThread, IoThreadError> {
        let job_fd =
            EventFd::new(EFD_NONBLOCK)
                .map(Arc::new)
                .map_err(|source| IoThreadError::EventFd {
                    name: name.to_string(),
                    source,
                })?;
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let fd = job_fd.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || thread_main(entries, job_rx, fd, ready_tx, sandbox))
            .map_err(|source| IoThreadError::Spawn {
                name: name.to_string(),
                source,
            })?;
        let ready = match ready_rx.recv() {
            Ok(Ok(ready)) => ready,
            Ok(Err(source)) => {
                let _ = thread.join();
                return Err(IoThreadError::Executor {
                    name: name.to_string(),
                    source,
                });
            }
            Err(_) => {
                let _ = thread.join();
                return Err(IoThreadError::Died {
                    name: name.to_string(),
                });
            }
        };
        Ok(IoThread {
            name: name.to_string(),
            jobs,
            job_fd,
            stop: ready.stop,
            stats: ready.stats,
            cpu: ready.cpu,
            thread: Some(thread),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `job` to run on the thread. Returns false if the thread has
    /// ended; the job is then dropped without running.
    pub fn run_on(&self, job: Job) -> bool {
        if self.jobs.send(job).is_err() {
            return false;
        }
        if let Err(e) = self.job_fd.write(1) {
            log::error!("iothread {}: waking it for a job: {e}", self.name);
        }
        true
    }

    /// Makes the thread's executor busy-poll for up to `poll` before it
    /// sleeps, always or only while I/O is in flight (see
    /// [`Executor::set_poll`]); zero turns polling off.
    ///
    /// [`Executor::set_poll`]: crate::executor::Executor::set_poll
    pub fn set_poll(&self, poll: Duration, when: PollWhen) -> bool {
        self.run_on(Box::new(move |ex| ex.set_poll(poll, when)))
    }

    /// CPU time the thread has used so far.
    pub fn cpu_time(&self) -> Duration {
        let ns = if self.cpu.ended.load(Ordering::SeqCst) {
            self.cpu.final_ns.load(Ordering::SeqCst)
        } else {
            CpuClock::read(self.cpu.clock)
                .unwrap_or_else(|| self.cpu.final_ns.load(Ordering::SeqCst))
        };
        Duration::from_nanos(ns)
    }

    /// The executor's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// `NAME: cpu_us=.. turns=.. ...`: the thread's CPU time and counters,
    /// as `--iothread-stats` prints them (benches parse this line).
    pub fn stats_line(&self) -> String {
        let s = self.stats();
        format!(
            "{}: cpu_us={} turns={} io_uring_enter={} sqes={} cqes={} poll_hits={} poll_misses={} poll_window_ns={}",
            self.name(),
            self.cpu_time().as_micros(),
            s.turns,
            s.enters,
            s.sqes_submitted,
            s.cqes_reaped,
            s.poll_hits,
            s.poll_misses,
            s.poll_window_ns
        )
    }

    /// Stops the executor (tasks are dropped and in-flight I/O drained) and
    /// joins the thread.
    pub fn stop(mut self) -> Result<(), IoThreadError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), IoThreadError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.stop();
        match thread.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(IoThreadError::Run {
                name: self.name.clone(),
                source,
            }),
            Err(_) => Err(IoThreadError::Panicked {
                name: self.name.clone(),
            }),
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            log::error!("{e}");
        }
    }
}
