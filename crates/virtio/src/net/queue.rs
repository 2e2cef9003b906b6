//! Pieces the network queue tasks share: a queue with its interrupt and
//! per-turn notification coalescing, descriptor chains turned into guest
//! segments, and waiting for the first of two futures.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use uring_backend::executor::Executor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::device::{NetStats, ReturnedQueues};
use crate::ratelimit::RateLimitedLog;

/// A queue, its interrupt and the memory it lives in; shared by a queue's
/// task and the I/O tasks it starts.
pub(super) struct NetQueue {
    pub queue: Queue,
    pub mem: Rc<GuestMemoryMmap>,
    interrupt: Option<EventFd>,
    notify_scheduled: bool,
    pub index: u16,
    pub log: Arc<RateLimitedLog>,
    stats: Arc<NetStats>,
}

/// What a queue task is made of.
pub(super) struct NetQueueParts {
    pub queue: Queue,
    pub event_idx: bool,
    pub mem: GuestMemoryMmap,
    pub interrupt: Option<EventFd>,
    pub index: u16,
    pub log: Arc<RateLimitedLog>,
    pub stats: Arc<NetStats>,
}

impl NetQueue {
    pub fn new(parts: NetQueueParts) -> Rc<RefCell<NetQueue>> {
        let mut queue = parts.queue;
        queue.set_event_idx(parts.event_idx);
        Rc::new(RefCell::new(NetQueue {
            queue,
            mem: Rc::new(parts.mem),
            interrupt: parts.interrupt,
            notify_scheduled: false,
            index: parts.index,
            log: parts.log,
            stats: parts.stats,
        }))
    }

    /// Hands the queue back when its task ends, `unpop` chains before
    /// where it stands (chains taken from the avail ring and not used:
    /// a later task takes them again).
    pub fn hand_back(&self, returned: &ReturnedQueues, unpop: u16) {
        let mut state = self.queue.state();
        state.next_avail = state.next_avail.wrapping_sub(unpop);
        returned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((self.index, state));
    }

    /// Returns a chain to the driver.
    pub fn complete(&mut self, head: u16, len: u32) {
        if let Err(e) = self.queue.add_used(&*self.mem, head, len) {
            self.log
                .warn(format_args!("queue {}: add_used: {e}", self.index));
        }
    }

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
        if needed {
            if let Some(irq) = &self.interrupt {
                match irq.write(1) {
                    Ok(()) => {
                        self.stats
                            .interrupts
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => self.log.warn(format_args!(
                        "queue {}: raising the interrupt: {e}",
                        self.index
                    )),
                }
            }
        }
    }

    /// Pops the next available chain, or None (notifications are handled
    /// by the caller's disable/enable loop).
    pub fn pop(&mut self) -> Option<DescriptorChain<Rc<GuestMemoryMmap>>> {
        let mem = self.mem.clone();
        self.queue.pop_descriptor_chain(mem)
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

    pub fn disable_notification(&mut self) {
        if let Err(e) = self.queue.disable_notification(&*self.mem) {
            self.log.warn(format_args!(
                "queue {}: disabling notifications: {e}",
                self.index
            ));
        }
    }
}

/// Interrupts the driver at most once per executor turn, if the used-event
/// rule says so.
pub(super) fn schedule_notify(ex: &Rc<Executor>, q: &Rc<RefCell<NetQueue>>) {
    let mut s = q.borrow_mut();
    if s.notify_scheduled {
        return;
    }
    s.notify_scheduled = true;
    let q = q.clone();
    ex.defer(move || q.borrow_mut().notify_if_needed());
}

/// A chain's buffers, all of one direction, checked against guest memory.
#[derive(Debug, Default)]
pub(super) struct Segments {
    pub segs: Vec<(GuestAddress, u32)>,
    pub len: u64,
}

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("a {0} descriptor in a chain the device must only {1}")]
    WrongDirection(&'static str, &'static str),
    #[error("the descriptor chain is malformed (loop, too long, or a bad indirect table)")]
    Malformed,
}

/// Collects a chain whose descriptors must all be device-writable
/// (`writable`) or all device-readable.
pub(super) fn segments<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    writable: bool,
) -> Result<Segments, ChainError>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let mut out = Segments::default();
    let mut last_had_next = true;
    let mut any = false;
    for desc in chain.clone() {
        any = true;
        last_had_next = desc.has_next();
        if desc.is_write_only() != writable {
            return Err(if writable {
                ChainError::WrongDirection("read-only", "write")
            } else {
                ChainError::WrongDirection("write-only", "read")
            });
        }
        let (addr, len) = (desc.addr(), desc.len());
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, addr, len as usize) {
            return Err(ChainError::OutsideMemory { addr: addr.0, len });
        }
        out.segs.push((addr, len));
        out.len += u64::from(len);
    }
    // The iterator stops early on loops, over-long chains and bad indirect
    // tables: the last descriptor it gave still points onwards.
    if !any || last_had_next {
        return Err(ChainError::Malformed);
    }
    Ok(out)
}

/// Host iovecs for guest segments (already checked to lie in memory).
pub(super) fn iovecs(
    mem: &GuestMemoryMmap,
    segs: &[(GuestAddress, u32)],
) -> Option<Vec<libc::iovec>> {
    segs.iter()
        .map(|&(addr, len)| {
            let slice = mem.get_slice(addr, len as usize).ok()?;
            Some(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: len as usize,
            })
        })
        .collect()
}

/// Which of two futures finished first.
pub(super) enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Waits for whichever of `a` and `b` completes first; the other stays
/// usable (pending) for a later call.
pub(super) async fn first<A, B>(
    a: &mut Pin<Box<A>>,
    b: &mut Pin<Box<B>>,
) -> Either<A::Output, B::Output>
where
    A: Future + ?Sized,
    B: Future + ?Sized,
{
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(v));
        }
        if let Poll::Ready(v) = b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(v));
        }
        Poll::Pending
    })
    .await
}
