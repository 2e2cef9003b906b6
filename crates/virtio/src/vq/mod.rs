//! One virtqueue served on an io_uring iothread: the layer every device
//! (blk, net, and those after them) builds its queues on.
//!
//! - [`ServedQueue`]: the queue, the guest memory it lives in and its
//!   interrupt; returning chains to the used ring; per-turn interrupt
//!   coalescing with the event-index rule ([`schedule_notify`]); handing
//!   the queue back, in its final state, when the worker stops.
//! - [`drain`]: virtio-queue's disable/enable-notification loop over the
//!   avail ring, with a per-pass bound of one queue's worth.
//! - [`serve_kicks`]: one outstanding read of the queue's kick eventfd
//!   (an ioeventfd on its notify address), a pass over the avail ring per
//!   kick, and the stop check; [`settle`] then waits for the work in
//!   flight before the queue goes back.
//! - [`lifecycle::QueueSet`]: a device's served queues over activate,
//!   pause, resume, restore and reset.
//!
//! Nothing here allocates per request or per kick.

pub mod lifecycle;
#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::ops::Deref;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use uring_backend::executor::{yield_now, Deferred, EventFdReader, Executor};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::ratelimit::RateLimitedLog;
pub use lifecycle::{QueueSet, QueueStart, ReturnedQueues};

/// Counts the interrupts a device raised (its stats block).
pub trait InterruptCounter {
    fn interrupt_raised(&self);
}

/// A descriptor chain of a served queue.
pub type Chain = DescriptorChain<Rc<GuestMemoryMmap>>;

/// What a queue is made of when its worker starts.
pub struct QueueParts {
    pub index: u16,
    pub queue: Queue,
    pub event_idx: bool,
    pub mem: GuestMemoryMmap,
    pub interrupt: Option<EventFd>,
    pub log: Arc<RateLimitedLog>,
    pub counter: Arc<dyn InterruptCounter + Send + Sync>,
}

/// A queue, its memory and its interrupt, shared by the queue's worker
/// and the I/O it started.
pub struct ServedQueue {
    pub queue: Queue,
    /// Shared by every request of the queue (cloning the memory itself
    /// would copy its region list each time).
    pub mem: Rc<GuestMemoryMmap>,
    interrupt: Option<EventFd>,
    notify_scheduled: bool,
    pub index: u16,
    pub log: Arc<RateLimitedLog>,
    counter: Arc<dyn InterruptCounter + Send + Sync>,
}

/// A [`ServedQueue`] behind a `RefCell`, in an `Rc` the executor can hold
/// for the end-of-turn interrupt check.
pub struct QueueCell(RefCell<ServedQueue>);

impl Deref for QueueCell {
    type Target = RefCell<ServedQueue>;
    fn deref(&self) -> &RefCell<ServedQueue> {
        &self.0
    }
}

impl Deferred for QueueCell {
    fn run(self: Rc<Self>) {
        self.0.borrow_mut().notify_if_needed();
    }
}

pub type SharedQueue = Rc<QueueCell>;

impl ServedQueue {
    pub fn shared(parts: QueueParts) -> SharedQueue {
        let mut queue = parts.queue;
        queue.set_event_idx(parts.event_idx);
        Rc::new(QueueCell(RefCell::new(ServedQueue {
            queue,
            mem: Rc::new(parts.mem),
            interrupt: parts.interrupt,
            notify_scheduled: false,
            index: parts.index,
            log: parts.log,
            counter: parts.counter,
        })))
    }

    /// Returns a chain to the driver with `len` bytes written into it.
    pub fn complete(&mut self, head: u16, len: u32) {
        if let Err(e) = self.queue.add_used(&*self.mem, head, len) {
            self.log
                .warn(format_args!("queue {}: add_used: {e}", self.index));
        }
    }

    /// The next available chain, or None.
    pub fn pop(&mut self) -> Option<Chain> {
        let mem = self.mem.clone();
        self.queue.pop_descriptor_chain(mem)
    }

    pub fn disable_notification(&mut self) {
        if let Err(e) = self.queue.disable_notification(&*self.mem) {
            self.log.warn(format_args!(
                "queue {}: disabling notifications: {e}",
                self.index
            ));
        }
    }

    /// Re-enables notifications; true when more chains arrived meanwhile.
    pub fn enable_notification(&mut self) -> bool {
        match self.queue.enable_notification(&*self.mem) {
            Ok(more) => more,
            Err(e) => {
                self.log.warn(format_args!(
                    "queue {}: enabling notifications: {e}",
                    self.index
                ));
                false
            }
        }
    }

    /// Interrupts the driver if the used-event rule (or, without
    /// `EVENT_IDX`, the driver's flag) asks for it.
    fn notify_if_needed(&mut self) {
        self.notify_scheduled = false;
        let needed = self
            .queue
            .needs_notification(&*self.mem)
            .unwrap_or_else(|e| {
                self.log.warn(format_args!(
                    "queue {}: reading used_event: {e}",
                    self.index
                ));
                true
            });
        if !needed {
            return;
        }
        if let Some(irq) = &self.interrupt {
            match irq.write(1) {
                Ok(()) => self.counter.interrupt_raised(),
                Err(e) => self.log.warn(format_args!(
                    "queue {}: raising the interrupt: {e}",
                    self.index
                )),
            }
        }
    }

    /// Hands the queue back when its worker ends, `unpop` chains before
    /// where it stands (chains taken from the avail ring and not used: the
    /// next worker takes them again).
    pub fn hand_back(&self, returned: &ReturnedQueues, unpop: u16) {
        let mut state = self.queue.state();
        state.next_avail = state.next_avail.wrapping_sub(unpop);
        returned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((self.index, state));
    }
}

/// Checks, once at the end of this executor turn, whether the driver
/// wants an interrupt for what was completed during the turn.
pub fn schedule_notify(ex: &Executor, q: &SharedQueue) {
    {
        let mut s = q.borrow_mut();
        if s.notify_scheduled {
            return;
        }
        s.notify_scheduled = true;
    }
    ex.defer_rc(q.clone());
}

/// Whether a pass over the avail ring emptied it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    Empty,
    /// A queue's worth was taken and more is there: let other work run,
    /// then come back.
    MoreLeft,
}

/// Takes every available chain (at most a queue's worth; a driver can keep
/// the ring non-empty forever, e.g. with its used ring laid over the avail
/// index) inside the disable/enable-notification loop, handing each to
/// `take` with the queue not borrowed. When `enough` says so after a
/// pass, the loop ends with notifications still disabled (the caller has
/// what it needs and comes back later).
pub fn drain(
    q: &SharedQueue,
    mut take: impl FnMut(Chain),
    mut enough: impl FnMut() -> bool,
) -> Drained {
    let mut budget = usize::from(q.borrow().queue.size()).max(1);
    loop {
        q.borrow_mut().disable_notification();
        loop {
            if budget == 0 {
                return Drained::MoreLeft;
            }
            budget -= 1;
            let chain = q.borrow_mut().pop();
            let Some(chain) = chain else {
                break;
            };
            take(chain);
        }
        if enough() || !q.borrow_mut().enable_notification() {
            return Drained::Empty;
        }
    }
}

/// Serves a queue's kicks until `stop`: one outstanding read on the kick
/// eventfd; on each kick, `pass` over the avail ring (again after a yield
/// while it says more is left).
pub async fn serve_kicks(
    ex: &Executor,
    kick: &EventFdReader,
    stop: &AtomicBool,
    q: &SharedQueue,
    mut pass: impl FnMut() -> Drained,
) {
    let stopping = || stop.load(Ordering::SeqCst);
    loop {
        if let Err(e) = kick.read(ex).await {
            let q = q.borrow();
            q.log
                .warn(format_args!("queue {}: reading the kick: {e}", q.index));
            return;
        }
        if stopping() {
            return;
        }
        while pass() == Drained::MoreLeft {
            yield_now().await;
            if stopping() {
                return;
            }
        }
        if stopping() {
            return;
        }
    }
}

/// Waits until `idle` says the work in flight is over (each turn of the
/// executor reaps completions), before a queue goes back.
pub async fn settle(ex: &Executor, idle: impl Fn() -> bool) {
    while !idle() {
        if ex.nop().await.is_err() {
            return;
        }
    }
}
