//! The receive side of one queue pair: frames read from the TAP straight
//! into the guest's buffers.
//!
//! The task keeps the guest's posted RX chains in a local list. When the
//! list holds room for the largest frame the guest can be sent, it starts
//! one `readv` on the TAP queue across those buffers (several chains with
//! `MRG_RXBUF`, one without) and waits for it together with the pair's wake
//! eventfd (stop, or a change of the active queue pairs). Without enough
//! buffers it waits for the guest's kick, never spinning. A frame the guest
//! filters out leaves the buffers in place for the next one.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};

use uring_backend::executor::{Completion, EventFdReader, Executor};
use uring_backend::net::VNET_HDR_LEN;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::{NetShared, PairCtx};
use super::queue::{first, iovecs_into, segments_into, Either};
use crate::vq::{schedule_notify, SharedQueue};

/// Most buffers one `readv` takes (`UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// One posted receive chain.
struct RxChain {
    head: u16,
    segs: Vec<(GuestAddress, u32)>,
    len: u32,
}

/// Calls `f` with each piece of guest memory that holds bytes `offset` to
/// `offset + len` of a list of chains' segments.
fn for_segs_at<'a>(
    chains: impl Iterator<Item = &'a RxChain>,
    mut offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, usize),
) {
    let mut want = len;
    for seg in chains.flat_map(|c| c.segs.iter()) {
        if want == 0 {
            break;
        }
        let seg_len = u64::from(seg.1);
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let n = ((seg_len - offset) as usize).min(want);
        f(seg.0.unchecked_add(offset), n);
        want -= n;
        offset = 0;
    }
}

/// The pieces [`for_segs_at`] visits, as a list.
#[cfg(test)]
fn segs_at<'a>(
    chains: impl Iterator<Item = &'a RxChain>,
    offset: u64,
    len: usize,
) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
    for_segs_at(chains, offset, len, |a, n| out.push((a, n)));
    out
}

/// The frame read in flight: shared with the op table, which keeps its
/// iovec array alive until the kernel is done with it.
struct FrameRead {
    iov: RefCell<Vec<libc::iovec>>,
    /// The guest memory the iovecs point into.
    _mem: Rc<vm_memory::GuestMemoryMmap>,
    done: Cell<Option<i32>>,
    waker: RefCell<Option<Waker>>,
}

impl Completion for FrameRead {
    fn complete(&self, _tag: u64, result: i32) {
        self.done.set(Some(result));
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

impl FrameRead {
    /// Waits for the read's completion.
    fn finished(&self) -> impl std::future::Future<Output = i32> + '_ {
        std::future::poll_fn(move |cx| {
            if let Some(r) = self.done.take() {
                return Poll::Ready(r);
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
    }
}

struct Rx {
    ex: Rc<Executor>,
    q: SharedQueue,
    shared: Arc<NetShared>,
    pair: usize,
    chains: VecDeque<RxChain>,
    /// The held chains are the last ones taken from the avail ring (no
    /// chain was returned behind them), so handing the queue back can
    /// un-take them.
    held_are_last: bool,
    mrg: bool,
    max_frame: u64,
    /// Segment lists of chains given back, for the next ones.
    spare: Vec<Vec<(GuestAddress, u32)>>,
}

impl Rx {
    /// Pops every available chain into the local list. Returns false if
    /// the driver sent nothing usable.
    fn refill(&mut self) {
        let q = self.q.clone();
        let mut q = q.borrow_mut();
        let mem = q.mem.clone();
        loop {
            q.disable_notification();
            while let Some(chain) = q.pop() {
                let head = chain.head_index();
                let mut segs = self.spare.pop().unwrap_or_default();
                let r = segments_into(chain, &mem, true, &mut segs);
                match r {
                    Ok(_) if segs.len() > MAX_IOVECS => {
                        q.log.warn(format_args!(
                            "queue {}: RX chain of {} buffers is more than one read takes",
                            q.index,
                            segs.len()
                        ));
                        self.shared
                            .stats
                            .rx_bad_chains
                            .fetch_add(1, Ordering::Relaxed);
                        q.complete(head, 0);
                        self.held_are_last &= self.chains.is_empty();
                    }
                    Ok(len) if len >= VNET_HDR_LEN as u64 => {
                        self.chains.push_back(RxChain {
                            head,
                            segs,
                            len: len.min(u64::from(u32::MAX)) as u32,
                        });
                        continue;
                    }
                    Ok(s) => {
                        q.log.warn(format_args!(
                            "queue {}: RX chain of {} bytes cannot hold a header",
                            q.index, s
                        ));
                        self.shared
                            .stats
                            .rx_bad_chains
                            .fetch_add(1, Ordering::Relaxed);
                        q.complete(head, 0);
                        self.held_are_last &= self.chains.is_empty();
                    }
                    Err(e) => {
                        q.log.warn(format_args!("queue {}: RX chain: {e}", q.index));
                        self.shared
                            .stats
                            .rx_bad_chains
                            .fetch_add(1, Ordering::Relaxed);
                        q.complete(head, 0);
                        self.held_are_last &= self.chains.is_empty();
                    }
                }
                self.spare.push(segs);
            }
            if self.enough() || !q.enable_notification() {
                break;
            }
        }
    }

    /// Whether the posted buffers can take the largest frame.
    fn enough(&self) -> bool {
        if !self.mrg {
            return !self.chains.is_empty();
        }
        let mut total = 0u64;
        for c in &self.chains {
            total += u64::from(c.len);
            if total >= self.max_frame {
                return true;
            }
        }
        false
    }

    /// The chains one read goes into.
    fn read_chains(&self) -> usize {
        if !self.mrg {
            return 1;
        }
        let (mut total, mut segs) = (0u64, 0usize);
        for (i, c) in self.chains.iter().enumerate() {
            // One readv takes at most MAX_IOVECS buffers; a frame that
            // does not fit what is left is dropped (and counted).
            segs += c.segs.len();
            if segs > MAX_IOVECS {
                return i.max(1);
            }
            total += u64::from(c.len);
            if total >= self.max_frame {
                return i + 1;
            }
        }
        self.chains.len()
    }

    /// A frame of `n` bytes (header included) arrived in the first
    /// `used` chains.
    fn deliver(&mut self, n: usize, used: usize) {
        let stats = &self.shared.stats;
        let capacity: u64 = self
            .chains
            .iter()
            .take(used)
            .map(|c| u64::from(c.len))
            .sum();
        if n < VNET_HDR_LEN + 14 || n as u64 > capacity {
            // Too short to be a frame, or longer than the buffers the
            // guest gave (the TAP reports the full length): drop it and
            // keep the buffers.
            stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let q = self.q.clone();
        let mut q = q.borrow_mut();
        let mem = q.mem.clone();
        if !self.shared.filter_open.load(Ordering::Relaxed) {
            let mut dst = [0u8; 6];
            let mut got = 0;
            let mut ok = true;
            for_segs_at(self.chains.iter(), VNET_HDR_LEN as u64, 6, |addr, len| {
                if ok && mem.read_slice(&mut dst[got..got + len], addr).is_ok() {
                    got += len;
                } else {
                    ok = false;
                }
            });
            let filter = self.shared.filter.lock().unwrap_or_else(|e| e.into_inner());
            if got == 6 && !filter.accepts(&dst) {
                stats.rx_filtered.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        // Hand out whole chains until the frame is covered; the first
        // one's header says how many.
        let (mut left, mut num_buffers) = (n as u64, 0u16);
        for c in &self.chains {
            if left == 0 {
                break;
            }
            left -= left.min(u64::from(c.len));
            num_buffers += 1;
        }
        let bytes = num_buffers.to_le_bytes();
        let mut at = 0;
        for_segs_at(self.chains.iter().take(1), 10, 2, |addr, len| {
            let _ = mem.write_slice(&bytes[at..at + len.min(2 - at)], addr);
            at += len;
        });
        let mut left = n as u64;
        for _ in 0..num_buffers {
            let Some(c) = self.chains.pop_front() else {
                break;
            };
            let l = left.min(u64::from(c.len));
            left -= l;
            q.complete(c.head, l as u32);
            self.spare.push(c.segs);
        }
        if self.chains.is_empty() {
            self.held_are_last = true;
        }
        stats.rx_packets.fetch_add(1, Ordering::Relaxed);
        stats
            .rx_bytes
            .fetch_add((n - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        drop(q);
        schedule_notify(&self.ex, &self.q);
    }
}

/// Serves the RX queue of one pair until the device stops.
pub(super) async fn serve_rx(ex: Rc<Executor>, ctx: PairCtx, wake: Arc<EventFd>) {
    let _guard = ctx.guard;
    let shared = ctx.shared;
    let returned = ctx.returned;
    let Some(tap) = shared.tap.queue(ctx.pair) else {
        returned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((ctx.q.index, ctx.q.queue.state()));
        return;
    };
    let tap_slot = ex.register_file(&*tap).ok();
    let kick = EventFdReader::new(Arc::new(ctx.kick));
    let woken = EventFdReader::new(wake);
    let q = ctx.q.into_served(shared.log.clone());
    let read = Rc::new(FrameRead {
        iov: RefCell::new(Vec::new()),
        _mem: q.borrow().mem.clone(),
        done: Cell::new(None),
        waker: RefCell::new(None),
    });
    let mut rx = Rx {
        ex: ex.clone(),
        q,
        shared: shared.clone(),
        pair: ctx.pair,
        chains: VecDeque::new(),
        held_are_last: true,
        mrg: ctx.mrg,
        max_frame: ctx.max_frame,
        spare: Vec::new(),
    };
    let mut segs: Vec<(GuestAddress, u32)> = Vec::new();
    let mut failures = 0u32;
    let stopping = || shared.stop.load(Ordering::SeqCst);
    while !stopping() {
        rx.refill();
        let active = rx.pair < usize::from(shared.active_pairs.load(Ordering::SeqCst));
        let dead = shared.tap_dead.load(Ordering::SeqCst);
        if !rx.enough() || !active || dead {
            // Wait for buffers (the driver's kick) or a wake-up; an idle
            // or dead pair waits for the wake-up alone. A read left in the
            // kernel by the one that lost is collected next time.
            if active && !dead {
                let _ = first(pin!(kick.read(&ex)), pin!(woken.read(&ex))).await;
            } else {
                let _ = woken.read(&ex).await;
            }
            continue;
        }
        let used = rx.read_chains();
        segs.clear();
        segs.extend(
            rx.chains
                .iter()
                .take(used)
                .flat_map(|c| c.segs.iter().copied()),
        );
        let mem = rx.q.borrow().mem.clone();
        if !iovecs_into(&mem, &segs, &mut read.iov.borrow_mut()) {
            shared.stats.rx_bad_chains.fetch_add(1, Ordering::Relaxed);
            let c = rx.chains.pop_front();
            if let Some(c) = c {
                rx.q.borrow_mut().complete(c.head, 0);
            }
            continue;
        }
        let result = if uring_backend::net::injected_eagain(true) {
            // A test build's EAGAIN storm: a round trip through the ring
            // that found no frame.
            let _ = ex.nop().await;
            -libc::EAGAIN
        } else {
            let handler: Rc<dyn Completion> = read.clone();
            // The op table keeps `read` (iovecs, guest memory) until the
            // completion, which this task awaits below even when stopping.
            // SAFETY: as said just above; `tap` holds the TAP queue open.
            let started = unsafe {
                uring_backend::net::start_frame_io(
                    &ex,
                    &tap,
                    tap_slot,
                    (handler, 0),
                    false,
                    &read.iov.borrow(),
                )
            };
            match started {
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                Ok(()) => loop {
                    match first(pin!(read.finished()), pin!(woken.read(&ex))).await {
                        Either::Left(result) => break result,
                        Either::Right(_) => {
                            let active =
                                rx.pair < usize::from(shared.active_pairs.load(Ordering::SeqCst));
                            if stopping() || !active {
                                // The read must be over before the queue
                                // goes back: it writes into the guest's
                                // buffers.
                                let _ = ex.cancel_fd(tap.clone()).await;
                                break read.finished().await;
                            }
                        }
                    }
                },
            }
        };
        if result >= 0 {
            failures = 0;
            rx.deliver(result as usize, used);
            continue;
        }
        match -result {
            // No frame after all (the ring waits for one before it reads,
            // so each EAGAIN is a round trip, not a spin): counted, and the
            // read is issued again.
            libc::EAGAIN => {
                shared.stats.rx_eagain.fetch_add(1, Ordering::Relaxed);
            }
            libc::EINTR | libc::ECANCELED => {}
            errno => {
                let e = std::io::Error::from_raw_os_error(errno);
                failures += 1;
                if !shared.tap.is_alive(rx.pair) || failures >= 3 {
                    shared.tap_gone(rx.pair, &e);
                } else {
                    rx.q.borrow().log.warn(format_args!(
                        "TAP {} queue {}: read failed: {e}",
                        shared.tap.name(),
                        rx.pair
                    ));
                }
            }
        }
    }
    // Reads left in the kernel would swallow the next task's signals.
    kick.cancel(&ex).await;
    woken.cancel(&ex).await;
    if let Some(slot) = tap_slot {
        ex.unregister_file(slot);
    }
    // Buffers taken and not filled go back to the avail ring for the next
    // task; if a chain was returned behind them, they are returned empty.
    let unpop = if rx.held_are_last {
        rx.chains.len() as u16
    } else {
        let mut q = rx.q.borrow_mut();
        for c in rx.chains.drain(..) {
            q.complete(c.head, 0);
        }
        0
    };
    rx.q.borrow().hand_back(&returned, unpop);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_cross_segments_and_chains() {
        let a = RxChain {
            head: 0,
            segs: vec![(GuestAddress(0x1000), 8), (GuestAddress(0x2000), 8)],
            len: 16,
        };
        let b = RxChain {
            head: 1,
            segs: vec![(GuestAddress(0x3000), 100)],
            len: 100,
        };
        let chains = [a, b];
        assert_eq!(
            segs_at(chains.iter(), 10, 2),
            vec![(GuestAddress(0x2002), 2)]
        );
        assert_eq!(
            segs_at(chains.iter(), 6, 4),
            vec![(GuestAddress(0x1006), 2), (GuestAddress(0x2000), 2)]
        );
        assert_eq!(
            segs_at(chains.iter(), 14, 6),
            vec![(GuestAddress(0x2006), 2), (GuestAddress(0x3000), 4)]
        );
        assert!(segs_at(chains.iter(), 200, 6).is_empty());
    }
}
