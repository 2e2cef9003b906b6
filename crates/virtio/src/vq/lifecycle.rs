//! A device's served queues across activate, pause, resume, restore and
//! reset: each queue's kick and interrupt kept for restarting it, the
//! count of running workers, the stop flag they watch and the queues they
//! hand back when they stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ActivateError, PauseError, QueueInit};
use crate::workers::{WorkerCount, WorkerGuardToken};

/// Where each queue worker leaves its queue when it stops.
pub type ReturnedQueues = Arc<Mutex<Vec<(u16, QueueState)>>>;

/// A queue to serve: index, the queue, its kick and its interrupt.
pub type QueueStart = (u16, Queue, EventFd, Option<EventFd>);

/// The served queues of one activation.
pub struct QueueSet {
    /// Set to stop every worker (each also gets a kick).
    pub stop: Arc<AtomicBool>,
    workers: Arc<WorkerCount>,
    returned: ReturnedQueues,
    /// Each served queue's kick and interrupt, to restart it.
    wiring: Vec<(u16, EventFd, Option<EventFd>)>,
    /// While paused: each stopped queue where its worker left it.
    paused: Option<Vec<(u16, QueueState)>>,
}

impl QueueSet {
    /// Takes the queues of an activation; those `serve` says no to are
    /// left idle. Returns the set and each queue to start.
    pub fn new(
        queues: Vec<QueueInit>,
        serve: impl Fn(u16) -> bool,
    ) -> Result<(QueueSet, Vec<QueueStart>), ActivateError> {
        let mut set = QueueSet {
            stop: Arc::new(AtomicBool::new(false)),
            workers: Arc::new(WorkerCount::default()),
            returned: ReturnedQueues::default(),
            wiring: Vec::with_capacity(queues.len()),
            paused: None,
        };
        let mut starts = Vec::with_capacity(queues.len());
        for q in queues {
            if !serve(q.index) {
                continue;
            }
            let dup = |e: &EventFd| e.try_clone().map_err(ActivateError::EventFd);
            let interrupt = q.interrupt.as_ref().map(dup).transpose()?;
            set.wiring.push((q.index, dup(&q.kick)?, interrupt));
            starts.push((q.index, q.queue, q.kick, q.interrupt));
        }
        Ok((set, starts))
    }

    /// Counts a worker as started; it counts as finished when the token
    /// is dropped, whether or not the worker ever ran.
    pub fn worker(&self) -> WorkerGuardToken {
        WorkerGuardToken::new(&self.workers)
    }

    /// Where workers hand their queue back.
    pub fn returned(&self) -> ReturnedQueues {
        self.returned.clone()
    }

    /// Stops every worker (work in flight completes first; `wakes` are
    /// written besides the kicks, for workers that wait on other
    /// eventfds) and takes the queues they hand back, by index.
    fn stop_workers(&self, wakes: &[Arc<EventFd>]) -> Vec<(u16, QueueState)> {
        self.stop.store(true, Ordering::SeqCst);
        for (_, kick, _) in &self.wiring {
            let _ = kick.write(1);
        }
        for w in wakes {
            let _ = w.write(1);
        }
        self.workers.wait_idle();
        let mut queues =
            std::mem::take(&mut *self.returned.lock().unwrap_or_else(|e| e.into_inner()));
        queues.sort_by_key(|(index, _)| *index);
        queues
    }

    /// Stops for good (reset): each queue where its worker left it (a
    /// queue whose worker never ran is missing).
    pub fn stop_all(&mut self, wakes: &[Arc<EventFd>]) -> Vec<(u16, QueueState)> {
        match self.paused.take() {
            Some(queues) => queues,
            None => self.stop_workers(wakes),
        }
    }

    /// Stops the workers and keeps their queues for [`QueueSet::resume`];
    /// false if it was paused already.
    pub fn pause(&mut self, wakes: &[Arc<EventFd>]) -> bool {
        if self.paused.is_some() {
            return false;
        }
        self.paused = Some(self.stop_workers(wakes));
        true
    }

    /// A restored activation: paused, its workers to start on resume at
    /// the positions of `starts`.
    pub fn start_paused(&mut self, starts: &[QueueStart]) {
        self.paused = Some(starts.iter().map(|(i, q, _, _)| (*i, q.state())).collect());
    }

    /// While paused: each queue where its worker stopped.
    pub fn paused_queues(&self) -> Vec<(u16, QueueState)> {
        self.paused.clone().unwrap_or_default()
    }

    /// Leaves the pause: the queues to start again at their kept
    /// positions, or None if it was not paused. Each gets a kick, for
    /// what the driver posted before the pause that no worker took.
    pub fn resume(&mut self) -> Result<Option<Vec<QueueStart>>, PauseError> {
        let Some(queues) = self.paused.take() else {
            return Ok(None);
        };
        let mut starts = Vec::with_capacity(queues.len());
        for (index, state) in &queues {
            let Some((_, kick, interrupt)) = self.wiring.iter().find(|(i, _, _)| i == index) else {
                continue;
            };
            let dup = |e: &EventFd| e.try_clone().map_err(PauseError::EventFd);
            let started = Queue::try_from(*state)
                .map_err(|source| PauseError::Queue {
                    index: *index,
                    source,
                })
                .and_then(|q| {
                    Ok((
                        *index,
                        q,
                        dup(kick)?,
                        interrupt.as_ref().map(dup).transpose()?,
                    ))
                });
            match started {
                Ok(s) => starts.push(s),
                Err(e) => {
                    self.paused = Some(queues);
                    return Err(e);
                }
            }
        }
        self.stop.store(false, Ordering::SeqCst);
        for (_, kick, _) in &self.wiring {
            let _ = kick.write(1);
        }
        Ok(Some(starts))
    }
}
