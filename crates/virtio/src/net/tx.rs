//! The transmit side of one queue pair: each frame the guest posts is one
//! `writev` of its buffers (virtio-net header included) to the TAP queue.
//! Everything popped in one pass reaches the kernel in one
//! `io_uring_enter`; a chain goes back to the guest when its write
//! completed.

use std::cell::Cell;
use std::cell::RefCell;
use std::fs::File;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use uring_backend::executor::{yield_now, Executor};
use uring_backend::net::VNET_HDR_LEN;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};

use super::device::{NetShared, PairCtx};
use super::queue::{iovecs, schedule_notify, segments, ChainError, NetQueue};

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
    let segs = segments(chain, mem, false)?;
    if segs.segs.len() > MAX_IOVECS {
        return Err(TxDrop::TooManyBuffers(segs.segs.len()));
    }
    if segs.len < (VNET_HDR_LEN + 14) as u64 || segs.len > max_len {
        return Err(TxDrop::Length {
            len: segs.len,
            max: max_len,
        });
    }
    let iov = iovecs(mem, &segs.segs).ok_or(TxDrop::Unmapped)?;
    Ok(TxFrame { iov, len: segs.len })
}

struct Tx {
    ex: Rc<Executor>,
    q: Rc<RefCell<NetQueue>>,
    shared: Arc<NetShared>,
    tap: Arc<File>,
    pair: usize,
    max_len: u64,
    inflight: Rc<Cell<usize>>,
}

#[derive(PartialEq, Eq)]
enum Drained {
    Empty,
    MoreLeft,
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
        let mut budget = usize::from(self.q.borrow().queue.size()).max(1);
        loop {
            self.q.borrow_mut().disable_notification();
            loop {
                if budget == 0 {
                    return Drained::MoreLeft;
                }
                budget -= 1;
                let Some(chain) = self.q.borrow_mut().pop() else {
                    break;
                };
                let head = chain.head_index();
                let mem = self.q.borrow().mem.clone();
                let frame = match tx_frame(chain, &mem, self.max_len) {
                    Ok(f) => f,
                    Err(e) => {
                        self.drop_frame(head, format_args!("{e}"));
                        continue;
                    }
                };
                self.inflight.set(self.inflight.get() + 1);
                let ex = self.ex.clone();
                let fut = write_frame(self.clone_parts(), head, frame.iov, frame.len);
                ex.spawn(fut);
            }
            if !self.q.borrow_mut().enable_notification() {
                return Drained::Empty;
            }
        }
    }

    fn clone_parts(&self) -> Tx {
        Tx {
            ex: self.ex.clone(),
            q: self.q.clone(),
            shared: self.shared.clone(),
            tap: self.tap.clone(),
            pair: self.pair,
            max_len: self.max_len,
            inflight: self.inflight.clone(),
        }
    }
}

async fn write_frame(tx: Tx, head: u16, iov: Vec<libc::iovec>, len: u64) {
    let mem = tx.q.borrow().mem.clone();
    let stats = &tx.shared.stats;
    let written = if uring_backend::net::injected_eagain(false) {
        // A test build's EAGAIN storm (see `injected_eagain`).
        let _ = tx.ex.nop().await;
        Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
    } else {
        tx.ex.writev(tx.tap.clone(), 0, iov, Box::new(mem)).await
    };
    match written {
        Ok(_) => {
            stats.tx_packets.fetch_add(1, Ordering::Relaxed);
            stats
                .tx_bytes
                .fetch_add(len - VNET_HDR_LEN as u64, Ordering::Relaxed);
        }
        Err(e) => {
            stats.tx_errors.fetch_add(1, Ordering::Relaxed);
            if e.raw_os_error() == Some(libc::EAGAIN) {
                stats.tx_eagain.fetch_add(1, Ordering::Relaxed);
            }
            if !tx.shared.tap.is_alive(tx.pair) {
                tx.shared.tap_gone(tx.pair, &e);
            } else {
                tx.q.borrow().log.warn(format_args!(
                    "TAP {} queue {}: write failed: {e}",
                    tx.shared.tap.name(),
                    tx.pair
                ));
            }
        }
    }
    tx.q.borrow_mut().complete(head, 0);
    tx.inflight.set(tx.inflight.get() - 1);
    schedule_notify(&tx.ex, &tx.q);
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
    let kick = Arc::new(ctx.kick);
    let tx = Tx {
        ex: ex.clone(),
        q: ctx.q.into_net_queue(shared.log.clone()),
        shared: shared.clone(),
        tap,
        pair: ctx.pair,
        max_len: ctx.max_frame,
        inflight: Rc::new(Cell::new(0)),
    };
    loop {
        if let Err(e) = ex.read_eventfd(kick.clone()).await {
            shared
                .log
                .warn(format_args!("queue {}: reading the kick: {e}", index));
            break;
        }
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        while tx.drain() == Drained::MoreLeft {
            yield_now().await;
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
        }
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
    }
    // Frames already handed to the kernel complete before the queue goes
    // back.
    while tx.inflight.get() > 0 {
        if ex.nop().await.is_err() {
            break;
        }
    }
    tx.q.borrow().hand_back(&returned, 0);
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
