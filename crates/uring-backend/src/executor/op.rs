//! In-flight operations: the op table, the `Op` future and completions.
//!
//! Every operation's owned resources (buffers, iovec arrays, file handles,
//! keepalives) live in a slot of the executor's op table, keyed by the SQE's
//! `user_data`, from the moment its SQE is queued until its CQE has been
//! reaped. Dropping the `Op` future early only marks the slot detached and
//! asks the kernel to cancel; the slot, and everything in it, is freed when
//! the CQE arrives.

use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, squeue};

use super::Executor;

/// `user_data` of cancel requests, whose completions are ignored. Slab keys
/// never take this value.
pub(super) const CANCEL_TAG: u64 = u64::MAX;

pub(super) enum OpState {
    /// In the kernel; the waker of whoever awaits it.
    Pending(Option<Waker>),
    /// The CQE's result, waiting for the future to collect it.
    Done(i32),
    /// In the kernel, with nobody waiting: freed when the CQE arrives.
    Detached,
}

pub(super) struct OpSlot {
    pub(super) state: OpState,
    pub(super) owned: Box<dyn Any>,
    /// Waits for something outside the ring (an eventfd read): its
    /// completion may never come, so polling does not wait for it.
    pub(super) waits: bool,
    /// Started with `submit_direct`: the completion goes to this handler,
    /// with this tag, instead of to an `Op` future.
    pub(super) direct: Option<(std::rc::Rc<dyn super::direct::Completion>, u64)>,
}

enum Stage<R> {
    Queued(u64),
    /// Never reached the kernel: the error and the resources.
    Failed(i32, Box<R>),
    Finished,
}

/// The future of one operation; resolves to the CQE result (a negative
/// errno on failure) and gives the owned resources back.
pub(crate) struct Op<'a, R: 'static> {
    ex: &'a Executor,
    stage: Stage<R>,
}

impl<R: 'static> Op<'_, R> {
    /// An operation that fails without reaching the kernel.
    pub(super) fn failed(ex: &Executor, errno: i32, owned: Box<R>) -> Op<'_, R> {
        Op {
            ex,
            stage: Stage::Failed(-errno, owned),
        }
    }
}

fn take_owned<R: 'static>(owned: Box<dyn Any>) -> Box<R> {
    match owned.downcast::<R>() {
        Ok(r) => r,
        // An op's slot only ever holds the type its future was made with.
        Err(_) => unreachable!("op slot holds a different resource type"),
    }
}

impl<R: 'static> Future for Op<'_, R> {
    type Output = (i32, Box<R>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Op holds no self-references; moving out of it is fine.
        let this = self.get_mut();
        match std::mem::replace(&mut this.stage, Stage::Finished) {
            Stage::Finished => panic!("Op polled after completion"),
            Stage::Failed(res, owned) => Poll::Ready((res, owned)),
            Stage::Queued(key) => {
                let mut ops = this.ex.ops.borrow_mut();
                let Some(slot) = ops.get_mut(key) else {
                    unreachable!("a queued op lost its slot")
                };
                match &mut slot.state {
                    OpState::Done(res) => {
                        let res = *res;
                        let owned = ops.remove(key).map(|s| s.owned);
                        drop(ops);
                        match owned {
                            Some(owned) => Poll::Ready((res, take_owned(owned))),
                            None => unreachable!("slot vanished"),
                        }
                    }
                    OpState::Pending(waker) => {
                        match waker {
                            Some(w) if w.will_wake(cx.waker()) => {}
                            _ => *waker = Some(cx.waker().clone()),
                        }
                        this.stage = Stage::Queued(key);
                        Poll::Pending
                    }
                    OpState::Detached => unreachable!("a live op was detached"),
                }
            }
        }
    }
}

impl<R: 'static> Drop for Op<'_, R> {
    fn drop(&mut self) {
        let Stage::Queued(key) = self.stage else {
            return;
        };
        let mut ops = self.ex.ops.borrow_mut();
        let Some(slot) = ops.get_mut(key) else { return };
        match slot.state {
            OpState::Done(_) => {
                // Completed but never collected: the kernel is done with
                // the resources.
                let freed = ops.remove(key);
                drop(ops);
                drop(freed);
            }
            OpState::Pending(_) => {
                slot.state = OpState::Detached;
                drop(ops);
                self.ex.cancel(key);
            }
            OpState::Detached => {}
        }
    }
}

impl Executor {
    /// Queues an SQE whose pointers refer into `owned` (moving the box does
    /// not move what it points to). `build` gets the boxed resources and
    /// returns the SQE; the executor sets its `user_data`.
    pub(crate) fn submit_op<R: 'static>(
        &self,
        owned: Box<R>,
        build: impl FnOnce(&mut R) -> squeue::Entry,
    ) -> Op<'_, R> {
        self.submit_op_waiting(owned, build, false)
    }

    /// As [`Executor::submit_op`]; `waits` marks an op whose completion
    /// depends on an outside event (see [`OpSlot::waits`]).
    pub(crate) fn submit_op_waiting<R: 'static>(
        &self,
        mut owned: Box<R>,
        build: impl FnOnce(&mut R) -> squeue::Entry,
        waits: bool,
    ) -> Op<'_, R> {
        let entry = build(&mut owned);
        let key = self.ops.borrow_mut().insert(OpSlot {
            state: OpState::Pending(None),
            owned,
            waits,
            direct: None,
        });
        match self.push(&entry.user_data(key)) {
            Ok(()) => {
                self.inflight.set(self.inflight.get() + 1);
                if !waits {
                    self.busy.set(self.busy.get() + 1);
                }
                Op {
                    ex: self,
                    stage: Stage::Queued(key),
                }
            }
            Err(e) => {
                let owned = self.ops.borrow_mut().remove(key).map(|s| s.owned);
                let errno = e.raw_os_error().unwrap_or(libc::EBUSY);
                match owned {
                    Some(owned) => Op::failed(self, errno, take_owned(owned)),
                    None => unreachable!("slot vanished"),
                }
            }
        }
    }

    /// Queues an SQE nobody awaits (the executor's read of its own wake
    /// eventfd, which waits for an outside event); its resources are freed
    /// on completion.
    pub(super) fn submit_detached<R: 'static>(
        &self,
        owned: Box<R>,
        build: impl FnOnce(&mut R) -> squeue::Entry,
    ) -> io::Result<u64> {
        let mut op = self.submit_op_waiting(owned, build, true);
        match std::mem::replace(&mut op.stage, Stage::Finished) {
            Stage::Queued(key) => {
                if let Some(slot) = self.ops.borrow_mut().get_mut(key) {
                    slot.state = OpState::Detached;
                }
                Ok(key)
            }
            Stage::Failed(res, _) => Err(io::Error::from_raw_os_error(-res)),
            Stage::Finished => unreachable!("fresh op already finished"),
        }
    }

    /// Puts one SQE on the submission queue, submitting what is queued if
    /// the queue is full.
    pub(super) fn push(&self, entry: &squeue::Entry) -> io::Result<()> {
        for _ in 0..2 {
            {
                let mut ring = self.ring.borrow_mut();
                let mut sq = ring.submission();
                // SAFETY: every pointer in the SQE refers to memory owned by
                // its op slot (or to nothing), which stays in the op table
                // until the CQE is reaped.
                if unsafe { sq.push(entry) }.is_ok() {
                    return Ok(());
                }
            }
            self.enter(0)?;
        }
        Err(io::Error::from_raw_os_error(libc::EBUSY))
    }

    /// Best-effort cancel of an in-flight op.
    pub(super) fn cancel(&self, key: u64) {
        if !self.setup.opcodes.async_cancel {
            return;
        }
        let entry = opcode::AsyncCancel::new(key).build().user_data(CANCEL_TAG);
        if let Err(e) = self.push(&entry) {
            log::debug!("could not queue a cancel: {e}");
        }
    }

    /// Drains the completion queue: records results, wakes waiters, runs
    /// direct handlers, frees detached ops. Returns the number of CQEs
    /// reaped. Allocates nothing once its scratch lists have grown.
    pub(super) fn reap(&self) -> usize {
        let mut wakers = std::mem::take(&mut *self.reap_wakers.borrow_mut());
        let mut direct = std::mem::take(&mut *self.reap_direct.borrow_mut());
        let mut freed = Vec::new();
        let mut rearm = false;
        let mut count = 0;
        {
            let mut ring = self.ring.borrow_mut();
            let mut ops = self.ops.borrow_mut();
            for cqe in ring.completion() {
                count += 1;
                let key = cqe.user_data();
                if key == CANCEL_TAG {
                    continue;
                }
                let Some(slot) = ops.get_mut(key) else {
                    log::warn!("io_uring completion for unknown op {key:#x}");
                    continue;
                };
                self.inflight.set(self.inflight.get().saturating_sub(1));
                if !slot.waits {
                    self.busy.set(self.busy.get().saturating_sub(1));
                }
                if let Some((handler, tag)) = slot.direct.take() {
                    direct.push((handler, tag, cqe.result()));
                    // The handler took over what the kernel used.
                    let slot = ops.remove(key);
                    drop(slot);
                    continue;
                }
                match &mut slot.state {
                    OpState::Pending(waker) => {
                        if let Some(w) = waker.take() {
                            wakers.push(w);
                        }
                        slot.state = OpState::Done(cqe.result());
                    }
                    OpState::Detached => {
                        if self.wake_key.get() == Some(key) {
                            self.wake_key.set(None);
                            rearm = self.wake_rearm_ok(cqe.result());
                        }
                        freed.push(ops.remove(key));
                    }
                    OpState::Done(_) => log::warn!("second completion for op {key:#x}"),
                }
            }
        }
        drop(freed);
        for w in wakers.drain(..) {
            w.wake();
        }
        for (handler, tag, result) in direct.drain(..) {
            handler.complete(tag, result);
        }
        // Keep the lists' capacity for the next reap.
        *self.reap_wakers.borrow_mut() = wakers;
        *self.reap_direct.borrow_mut() = direct;
        if rearm {
            self.arm_wake();
        }
        self.stats.add_cqes(count as u64);
        count
    }
}
