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

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use uring_backend::executor::Executor;
use uring_backend::net::VNET_HDR_LEN;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::device::{NetShared, PairCtx};
use super::queue::{first, iovecs, schedule_notify, segments, Either, NetQueue};

/// Most buffers one `readv` takes (`UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// One posted receive chain.
struct RxChain {
    head: u16,
    segs: Vec<(GuestAddress, u32)>,
    len: u32,
}

/// Reads or writes `buf` at byte `offset` of a list of chains' segments.
fn segs_at<'a>(
    chains: impl Iterator<Item = &'a RxChain>,
    mut offset: u64,
    len: usize,
) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
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
        out.push((seg.0.unchecked_add(offset), n));
        want -= n;
        offset = 0;
    }
    out
}

struct Rx {
    ex: Rc<Executor>,
    q: Rc<RefCell<NetQueue>>,
    shared: Arc<NetShared>,
    pair: usize,
    chains: VecDeque<RxChain>,
    /// The held chains are the last ones taken from the avail ring (no
    /// chain was returned behind them), so handing the queue back can
    /// un-take them.
    held_are_last: bool,
    mrg: bool,
    max_frame: u64,
}

impl Rx {
    /// Pops every available chain into the local list. Returns false if
    /// the driver sent nothing usable.
    fn refill(&mut self) {
        let mut q = self.q.borrow_mut();
        let mem = q.mem.clone();
        loop {
            q.disable_notification();
            while let Some(chain) = q.pop() {
                let head = chain.head_index();
                match segments(chain, &mem, true) {
                    Ok(s) if s.segs.len() > MAX_IOVECS => {
                        q.log.warn(format_args!(
                            "queue {}: RX chain of {} buffers is more than one read takes",
                            q.index,
                            s.segs.len()
                        ));
                        self.shared
                            .stats
                            .rx_bad_chains
                            .fetch_add(1, Ordering::Relaxed);
                        q.complete(head, 0);
                        self.held_are_last &= self.chains.is_empty();
                    }
                    Ok(s) if s.len >= VNET_HDR_LEN as u64 => self.chains.push_back(RxChain {
                        head,
                        segs: s.segs,
                        len: s.len.min(u64::from(u32::MAX)) as u32,
                    }),
                    Ok(s) => {
                        q.log.warn(format_args!(
                            "queue {}: RX chain of {} bytes cannot hold a header",
                            q.index, s.len
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
            for (addr, len) in segs_at(self.chains.iter(), VNET_HDR_LEN as u64, 6) {
                if mem.read_slice(&mut dst[got..got + len], addr).is_err() {
                    break;
                }
                got += len;
            }
            let filter = self.shared.filter.lock().unwrap_or_else(|e| e.into_inner());
            if got == 6 && !filter.accepts(&dst) {
                stats.rx_filtered.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        // Hand out whole chains until the frame is covered.
        let mut left = n as u64;
        let mut taken = Vec::new();
        while left > 0 {
            let Some(c) = self.chains.pop_front() else {
                break;
            };
            let l = left.min(u64::from(c.len));
            left -= l;
            taken.push((c, l as u32));
        }
        if self.chains.is_empty() {
            self.held_are_last = true;
        }
        let num_buffers = taken.len() as u16;
        if let Some((first_chain, _)) = taken.first() {
            for (addr, len) in segs_at(std::iter::once(first_chain), 10, 2) {
                let bytes = num_buffers.to_le_bytes();
                let _ = mem.write_slice(&bytes[..len.min(2)], addr);
            }
        }
        for (c, l) in taken {
            q.complete(c.head, l);
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
    let kick = Arc::new(ctx.kick);
    let mut rx = Rx {
        ex: ex.clone(),
        q: ctx.q.into_net_queue(shared.log.clone()),
        shared: shared.clone(),
        pair: ctx.pair,
        chains: VecDeque::new(),
        held_are_last: true,
        mrg: ctx.mrg,
        max_frame: ctx.max_frame,
    };
    let mut woken = Box::pin(ex.read_eventfd(wake.clone()));
    let mut failures = 0u32;
    let stopping = || shared.stop.load(Ordering::SeqCst);
    while !stopping() {
        rx.refill();
        let active = rx.pair < usize::from(shared.active_pairs.load(Ordering::SeqCst));
        let dead = shared.tap_dead.load(Ordering::SeqCst);
        if !rx.enough() || !active || dead {
            // Wait for buffers (the driver's kick) or a wake-up; an idle
            // or dead pair waits for the wake-up alone.
            if active && !dead {
                let mut kicked = Box::pin(ex.read_eventfd(kick.clone()));
                if let Either::Right(_) = first(&mut kicked, &mut woken).await {
                    woken = Box::pin(ex.read_eventfd(wake.clone()));
                    // Take the kick read back from the kernel: left there,
                    // it would swallow the driver's next kick.
                    let _ = ex.cancel_fd(kick.clone()).await;
                    let _ = kicked.await;
                }
            } else {
                let _ = (&mut woken).await;
                woken = Box::pin(ex.read_eventfd(wake.clone()));
            }
            continue;
        }
        let used = rx.read_chains();
        let segs: Vec<(GuestAddress, u32)> = rx
            .chains
            .iter()
            .take(used)
            .flat_map(|c| c.segs.iter().copied())
            .collect();
        let mem = rx.q.borrow().mem.clone();
        let Some(iov) = iovecs(&mem, &segs) else {
            shared.stats.rx_bad_chains.fetch_add(1, Ordering::Relaxed);
            let c = rx.chains.pop_front();
            if let Some(c) = c {
                rx.q.borrow_mut().complete(c.head, 0);
            }
            continue;
        };
        let result = if uring_backend::net::injected_eagain(true) {
            // A test build's EAGAIN storm: a round trip through the ring
            // that found no frame.
            let _ = ex.nop().await;
            Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
        } else {
            let mut read = Box::pin(ex.readv_waiting(tap.clone(), iov, Box::new(mem)));
            loop {
                match first(&mut read, &mut woken).await {
                    Either::Left(result) => break result,
                    Either::Right(_) => {
                        woken = Box::pin(ex.read_eventfd(wake.clone()));
                        let active =
                            rx.pair < usize::from(shared.active_pairs.load(Ordering::SeqCst));
                        if stopping() || !active {
                            // The read must be over before the queue goes
                            // back: it writes into the guest's buffers.
                            let _ = ex.cancel_fd(tap.clone()).await;
                            break read.await;
                        }
                    }
                }
            }
        };
        match result {
            Ok(n) => {
                failures = 0;
                rx.deliver(n, used);
            }
            Err(e) => match e.raw_os_error() {
                // No frame after all (the ring waits for one before it
                // reads, so each EAGAIN is a round trip, not a spin):
                // counted, and the read is issued again.
                Some(libc::EAGAIN) => {
                    shared.stats.rx_eagain.fetch_add(1, Ordering::Relaxed);
                }
                Some(libc::EINTR) | Some(libc::ECANCELED) => {}
                _ => {
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
            },
        }
    }
    let _ = ex.cancel_fd(wake.clone()).await;
    let _ = woken.await;
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
