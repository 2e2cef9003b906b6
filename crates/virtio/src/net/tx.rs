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
use virtio_queue::QueueT;

use super::device::{NetShared, PairCtx};
use super::queue::{iovecs, schedule_notify, segments, NetQueue};

/// Most buffers one `writev` takes (`UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

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
                let segs = match segments(chain, &mem, false) {
                    Ok(s) => s,
                    Err(e) => {
                        self.drop_frame(head, format_args!("{e}"));
                        continue;
                    }
                };
                if segs.segs.len() > MAX_IOVECS {
                    self.drop_frame(
                        head,
                        format_args!("{} buffers, more than one write takes", segs.segs.len()),
                    );
                    continue;
                }
                if segs.len < (VNET_HDR_LEN + 14) as u64 || segs.len > self.max_len {
                    self.drop_frame(
                        head,
                        format_args!(
                            "{} bytes with its header (negotiated maximum {})",
                            segs.len, self.max_len
                        ),
                    );
                    continue;
                }
                let Some(iov) = iovecs(&mem, &segs.segs) else {
                    self.drop_frame(head, format_args!("buffers outside guest memory"));
                    continue;
                };
                self.inflight.set(self.inflight.get() + 1);
                let ex = self.ex.clone();
                let fut = write_frame(self.clone_parts(), head, iov, segs.len);
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
