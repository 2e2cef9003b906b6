//! The worker: one thread that carries out, one at a time, every request
//! that changes the VMM's or the VM's state (building, booting, pausing,
//! rebooting, deleting a VM).
//!
//! It exists for the sandbox: building a VM opens files, `/dev/kvm` and
//! TAPs, maps guest memory and starts vCPU threads and iothreads, which
//! inherit their parent's seccomp filter and can only narrow it. The
//! connection threads that parse requests are children of the accepting
//! thread and run under its narrow list, so the calls that need the broad
//! one are handed here: a thread started before any filter, with a list
//! of its own. A job runs to its end before the next starts, which also
//! serialises state changes.

use std::sync::mpsc;

/// A job for the worker.
type Job = Box<dyn FnOnce() + Send>;

/// What a thread runs first, before any job or request (installing its
/// seccomp filter); an error ends the thread before it serves anything.
pub type Sandbox = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// Errors from starting the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("starting the {name} thread")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sandboxing the {name} thread: {message}")]
    Sandbox { name: String, message: String },
}

/// The handle of the worker thread; jobs are sent to it.
pub struct Worker {
    jobs: mpsc::Sender<Job>,
}

impl Worker {
    /// Starts the worker thread `name`, which runs `sandbox` first; returns
    /// once it did (its error, if any, is this call's).
    pub fn spawn(name: &str, sandbox: Option<Sandbox>) -> Result<Worker, WorkerError> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let ready = sandbox.map_or(Ok(()), |s| s());
                let ok = ready.is_ok();
                let _ = ready_tx.send(ready);
                if !ok {
                    return;
                }
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|source| WorkerError::Thread {
                name: name.into(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Worker { jobs }),
            Ok(Err(message)) => Err(WorkerError::Sandbox {
                name: name.into(),
                message,
            }),
            Err(_) => Err(WorkerError::Sandbox {
                name: name.into(),
                message: "the thread ended before it was ready".into(),
            }),
        }
    }

    /// Runs `f` on the worker and returns its result; `None` when the
    /// worker is gone (a job panicked).
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.send(job).ok()?;
        rx.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_on_the_worker_thread_in_order() {
        let w = Worker::spawn("test-worker", None).unwrap();
        let names: Vec<String> = (0..3)
            .map(|i| {
                w.run(move || format!("{}:{i}", std::thread::current().name().unwrap_or("?")))
                    .unwrap()
            })
            .collect();
        assert_eq!(names, ["test-worker:0", "test-worker:1", "test-worker:2"]);
    }

    #[test]
    fn a_failing_sandbox_is_the_spawn_error_and_a_dead_worker_answers_none() {
        let err = Worker::spawn("w", Some(Box::new(|| Err("no filter".into()))))
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "sandboxing the w thread: no filter");
        let w = Worker::spawn("w2", None).unwrap();
        assert_eq!(w.run(|| -> u8 { panic!("job fails") }), None);
        assert_eq!(w.run(|| 1), None);
    }
}
