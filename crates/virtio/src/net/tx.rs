//! The transmit side of one queue pair: each frame the guest posts is one
//! `writev` of its buffers (virtio-net header included) to the TAP queue,
//! a direct ring operation tagged with the frame's slot in the queue's
//! table (nothing allocated per frame once warm). Everything popped in one
//! pass reaches the kernel in one `io_uring_enter`; a chain goes back to
//! the guest when its write completed.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use uring_backend::executor::{Completion, EventFdReader, Executor};
use uring_backend::net::VNET_HDR_LEN;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

use super::device::{NetShared, PairCtx};
use super::queue::{iovecs_into, segments_into, ChainError};
use crate::vq::{drain, schedule_notify, serve_kicks, settle, Chain, Drained, SharedQueue};

/// Most buffers one `writev` takes (`UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// Why a guest's TX chain is dropped instead of sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TxDrop {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("{0} buffers, more than one write takes")]
    TooManyBuffers(usize),
    #[error("{len} bytes with its header (negotiated maximum {max})")]
    Length { len: u64, max: u64 },
    #[error("buffers outside guest memory")]
    Unmapped,
}

/// A TX chain checked for sending: its buffers as host iovecs into guest
/// memory and its length (virtio-net header included).
pub struct TxFrame {
    pub iov: Vec<libc::iovec>,
    pub len: u64,
}

/// Checks a guest's TX chain: all device-readable, inside guest memory, at
/// most one `writev`'s worth of buffers, a header and an Ethernet header
/// long and at most `max_len` bytes. Public (hidden) for the fuzz target.
#[doc(hidden)]
pub fn tx_frame<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    max_len: u64,
) -> Result<TxFrame, TxDrop>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let (mut segs, mut iov) = (Vec::new(), Vec::new());
    let len = tx_frame_into(chain, mem, max_len, &mut segs, &mut iov)?;
    Ok(TxFrame { iov, len })
}

/// [`tx_frame`] into lists the caller keeps (`segs` is scratch).
fn tx_frame_into<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    max_len: u64,
    segs: &mut Vec<(GuestAddress, u32)>,
    iov: &mut Vec<libc::iovec>,
) -> Result<u64, TxDrop>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let len = segments_into(chain, mem, false, segs)?;
    if segs.len() > MAX_IOVECS {
        return Err(TxDrop::TooManyBuffers(segs.len()));
    }
    if len < (VNET_HDR_LEN + 14) as u64 || len > max_len {
        return Err(TxDrop::Length { len, max: max_len });
    }
    if !iovecs_into(mem, segs, iov) {
        return Err(TxDrop::Unmapped);
    }
    Ok(len)
}

/// A frame being written.
struct TxSlot {
    head: u16,
    iov: Vec<libc::iovec>,
    len: u64,
    /// A test build's injected EAGAIN: the ring ran a no-op instead.
    injected: bool,
}

/// The TX side of one pair, shared by its task and, through the op table,
/// by every write in flight (which keeps the slots' iovec arrays and the
/// guest memory alive until the kernel is done).
struct Tx {
    me: Weak<Tx>,
    ex: Rc<Executor>,
    q: SharedQueue,
    shared: Arc<NetShared>,
    tap: Arc<File>,
    /// The TAP queue's slot in this ring's registered-file table.
    tap_slot: Option<u32>,
    pair: usize,
    max_len: u64,
    slots: RefCell<Vec<TxSlot>>,
    max_slots: usize,
    free: RefCell<Vec<u32>>,
    segs: RefCell<Vec<(GuestAddress, u32)>>,
    inflight: Cell<usize>,
}

impl Tx {
    fn drop_frame(&self, head: u16, why: std::fmt::Arguments<'_>) {
        let mut q = self.q.borrow_mut();
        q.log
            .warn(format_args!("queue {}: TX frame dropped: {why}", q.index));
        self.shared.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
        q.complete(head, 0);
        drop(q);
        schedule_notify(&self.ex, &self.q);
    }

    /// Starts a write for every available chain (at most a queue's worth).
    fn drain(&self) -> Drained {
        drain(&self.q, |chain| self.take(chain), || false)
    }

    fn take(&self, chain: Chain) {
        let head = chain.head_index();
        let mem = self.q.borrow().mem.clone();
        let index = {
            let mut slots = self.slots.borrow_mut();
            match self.free.borrow_mut().pop() {
                Some(i) => i,
                None if slots.len() < self.max_slots => {
                    slots.push(TxSlot {
                        head,
                        iov: Vec::new(),
                        len: 0,
                        injected: false,
                    });
                    (slots.len() - 1) as u32
                }
                None => {
                    drop(slots);
                    self.drop_frame(
                        head,
                        format_args!("more frames in flight than the queue holds"),
                    );
                    return;
                }
            }
        };
        let checked = {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[index as usize];
            slot.head = head;
            let r = tx_frame_into(
                chain,
                &mem,
                self.max_len,
                &mut self.segs.borrow_mut(),
                &mut slot.iov,
            );
            if let Ok(len) = r {
                slot.len = len;
            }
            r
        };
        if let Err(e) = checked {
            self.free.borrow_mut().push(index);
            self.drop_frame(head, format_args!("{e}"));
            return;
        }
        self.inflight.set(self.inflight.get() + 1);
        let Some(me) = self.me.upgrade() else { return };
        let injected = uring_backend::net::injected_eagain(false);
        let started = {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[index as usize];
            slot.injected = injected;
            if injected {
                // A test build's EAGAIN storm: a round trip through the
                // ring that writes nothing.
                self.ex.nop_direct(me, u64::from(index))
            } else {
                // SAFETY: the slot's iovecs, the guest RAM (held by `q`) and
                // the TAP stay until `index` completes: the op table holds `me`.
                unsafe {
                    uring_backend::net::start_frame_io(
                        &self.ex,
                        &self.tap,
                        self.tap_slot,
                        (me, u64::from(index)),
                        true,
                        &slot.iov,
                    )
                }
            }
        };
        if let Err(e) = started {
            self.written(index, -e.raw_os_error().unwrap_or(libc::EIO));
        }
    }

    /// Slot `index`'s write finished with `result`.
    fn written(&self, index: u32, result: i32) {
        let (head, len, injected) = {
            let slots = self.slots.borrow();
            let Some(slot) = slots.get(index as usize) else {
                return;
            };
            (slot.head, slot.len, slot.injected)
        };
        let result = if injected { -libc::EAGAIN } else { result };
        let stats = &self.shared.stats;
        if result >= 0 {
            stats.tx_packets.fetch_add(1, Ordering::Relaxed);
            stats
                .tx_bytes
                .fetch_add(len - VNET_HDR_LEN as u64, Ordering::Relaxed);
        } else {
            let e = std::io::Error::from_raw_os_error(-result);
            stats.tx_errors.fetch_add(1, Ordering::Relaxed);
            if result == -libc::EAGAIN {
                stats.tx_eagain.fetch_add(1, Ordering::Relaxed);
            }
            if !self.shared.tap.is_alive(self.pair) {
                self.shared.tap_gone(self.pair, &e);
            } else {
                self.q.borrow().log.warn(format_args!(
                    "TAP {} queue {}: write failed: {e}",
                    self.shared.tap.name(),
                    self.pair
                ));
            }
        }
        self.free.borrow_mut().push(index);
        self.q.borrow_mut().complete(head, 0);
        self.inflight.set(self.inflight.get() - 1);
        schedule_notify(&self.ex, &self.q);
    }
}

impl Completion for Tx {
    fn complete(&self, tag: u64, result: i32) {
        self.written(tag as u32, result);
    }
}

/// Serves the TX queue of one pair until the device stops.
pub(super) async fn serve_tx(ex: Rc<Executor>, ctx: PairCtx) {
    let _guard = ctx.guard;
    let shared = ctx.shared;
    let returned = ctx.returned;
    let index = ctx.q.index;
    let Some(tap) = shared.tap.queue(ctx.pair) else {
        returned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((index, ctx.q.queue.state()));
        return;
    };
    let size = usize::from(ctx.q.queue.size()).max(1);
    let tap_slot = ex.register_file(&*tap).ok();
    let q = ctx.q.into_served(shared.log.clone());
    let tx = Rc::new_cyclic(|me| Tx {
        me: me.clone(),
        ex: ex.clone(),
        q: q.clone(),
        shared: shared.clone(),
        tap,
        tap_slot,
        pair: ctx.pair,
        max_len: ctx.max_frame,
        slots: RefCell::new(Vec::with_capacity(size)),
        max_slots: size,
        free: RefCell::new(Vec::with_capacity(size)),
        segs: RefCell::new(Vec::new()),
        inflight: Cell::new(0),
    });
    let kick = EventFdReader::new(Arc::new(ctx.kick));
    serve_kicks(&ex, &kick, &shared.stop, &q, || tx.drain()).await;
    // Frames already handed to the kernel complete before the queue goes
    // back.
    settle(&ex, || tx.inflight.get() == 0).await;
    if let Some(slot) = tap_slot {
        ex.unregister_file(slot);
    }
    q.borrow().hand_back(&returned, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// `tx_frame` of the first chain made of `descs` (addr, len, flags).
    fn check(descs: &[(u64, u32, u16)], max_len: u64) -> Result<u64, TxDrop> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4_0000)]).unwrap();
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| RawDescriptor::from(Descriptor::new(a, l, f, i as u16 + 1)))
            .collect();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        tx_frame(chain, &mem, max_len).map(|f| {
            assert_eq!(f.iov.iter().map(|v| v.iov_len as u64).sum::<u64>(), f.len);
            f.len
        })
    }

    #[test]
    fn accepts_a_frame_and_refuses_what_a_write_cannot_send() {
        // Header and frame in two buffers.
        assert_eq!(
            check(&[(0x1_0000, 12, NEXT), (0x1_1000, 60, 0)], 1526),
            Ok(72)
        );
        // Device-writable buffers are not for TX.
        assert_eq!(
            check(&[(0x1_0000, 72, WRITE)], 1526),
            Err(TxDrop::Chain(ChainError::WrongDirection(
                "write-only",
                "read"
            )))
        );
        // Shorter than a header and an Ethernet header, longer than
        // negotiated, outside guest memory.
        assert!(matches!(
            check(&[(0x1_0000, 25, 0)], 1526),
            Err(TxDrop::Length { len: 25, .. })
        ));
        assert!(matches!(
            check(&[(0x1_0000, 1527, 0)], 1526),
            Err(TxDrop::Length { len: 1527, .. })
        ));
        assert!(matches!(
            check(&[(0x3_ff00, 0x200, 0)], 1526),
            Err(TxDrop::Chain(ChainError::OutsideMemory { .. }))
        ));
    }
}
