//! The queue layer on virtio-queue's mock split queue, with a real
//! io_uring executor: completion order, event-index suppression, per-turn
//! interrupt coalescing, a stop with requests in flight, and the per-pass
//! bound against a driver whose used ring lies over its avail index.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use uring_backend::executor::{EventFdReader, Executor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::ratelimit::RateLimitedLog;

#[derive(Default)]
struct Counter(AtomicU64);

impl InterruptCounter for Counter {
    fn interrupt_raised(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A queue served over `mock`'s rings, its interrupt eventfd (as the
/// guest's irqfd sees it) and the interrupt counter.
struct Rig {
    q: SharedQueue,
    irq: EventFd,
    counter: Arc<Counter>,
}

impl Rig {
    fn new(mem: &GuestMemoryMmap, queue: Queue, event_idx: bool) -> Rig {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let counter = Arc::new(Counter::default());
        let q = ServedQueue::shared(QueueParts {
            index: 0,
            queue,
            event_idx,
            mem: mem.clone(),
            interrupt: Some(irq.try_clone().unwrap()),
            log: Arc::new(RateLimitedLog::new("vq-test")),
            counter: counter.clone(),
        });
        Rig { q, irq, counter }
    }

    /// Interrupts raised since the last call (the eventfd's count).
    fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }

    fn pop_head(&self) -> u16 {
        self.q.borrow_mut().pop().expect("a chain").head_index()
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// Where the queues' used rings go. virtio-queue 0.18's mock places its
/// used ring 4 + size bytes after the avail ring's entries (it counts the
/// entries, not their bytes), over the avail ring's `used_event` and, from
/// 9 entries on, over entries of the avail ring itself.
const USED: u64 = 0x8000;

/// `mock`'s queue with its used ring moved to [`USED`].
fn queue(mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> Queue {
    let mut q: Queue = mock.create_queue().unwrap();
    q.set_ready(false);
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    q
}

/// The driver's used ring: (id, len) of each entry up to its index.
fn used(mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
    let n: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    (0..u64::from(n))
        .map(|i| {
            let at = USED + 4 + 8 * i;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            (id, len)
        })
        .collect()
}

/// Writes the avail ring's `used_event` (after its `size` entries).
fn set_used_event(
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<'_, GuestMemoryMmap>,
    size: u16,
    v: u16,
) {
    let at = mock.avail_addr().0 + 4 + 2 * u64::from(size);
    mem.write_obj(v, GuestAddress(at)).unwrap();
}

fn block_on<T: 'static>(ex: &Rc<Executor>, fut: impl Future<Output = T> + 'static) -> T {
    ex.block_on(fut).expect("the task finished")
}

#[test]
fn chains_go_back_in_the_order_they_complete_with_their_lengths() {
    let mem = mem();
    let mut mock = MockSplitQueue::new(&mem, 8);
    for _ in 0..4 {
        mock.add_chain(1).unwrap();
    }
    let rig = Rig::new(&mem, queue(&mock), false);
    let heads: Vec<u16> = (0..4).map(|_| rig.pop_head()).collect();
    assert!(rig.q.borrow_mut().pop().is_none());
    for (i, len) in [(2, 30), (0, 10), (3, 40), (1, 20)] {
        rig.q.borrow_mut().complete(heads[i], len);
    }
    let want: Vec<(u32, u32)> = [(2, 30), (0, 10), (3, 40), (1, 20)]
        .iter()
        .map(|&(i, len)| (u32::from(heads[i]), len))
        .collect();
    assert_eq!(used(&mem), want);
    // Completing is not interrupting: that waits for the end of the turn.
    assert_eq!(rig.interrupts(), 0);
}

#[test]
fn with_event_idx_the_driver_is_interrupted_only_past_its_used_event() {
    let mem = mem();
    let mut mock = MockSplitQueue::new(&mem, 8);
    for _ in 0..6 {
        mock.add_chain(1).unwrap();
    }
    let rig = Rig::new(&mem, queue(&mock), true);
    // The driver wants an interrupt once the third chain is used (used
    // index 2 -> 3).
    set_used_event(&mem, &mock, 8, 2);
    let mut interrupts = Vec::new();
    for _ in 0..4 {
        let head = rig.pop_head();
        let mut s = rig.q.borrow_mut();
        s.complete(head, 1);
        s.notify_if_needed();
        drop(s);
        interrupts.push(rig.interrupts());
    }
    assert_eq!(interrupts, [0, 0, 1, 0]);
    // Two completions checked together, the second crossing used_event:
    // one interrupt.
    set_used_event(&mem, &mock, 8, 5);
    for _ in 0..2 {
        let head = rig.pop_head();
        rig.q.borrow_mut().complete(head, 1);
    }
    rig.q.borrow_mut().notify_if_needed();
    assert_eq!(rig.interrupts(), 1);
    assert_eq!(rig.counter.0.load(Ordering::Relaxed), 2);
    assert_eq!(used(&mem).len(), 6);
}

#[test]
fn completions_of_one_turn_raise_one_interrupt_at_its_end() {
    let mem = mem();
    let mut mock = MockSplitQueue::new(&mem, 16);
    for _ in 0..12 {
        mock.add_chain(1).unwrap();
    }
    let rig = Rc::new(Rig::new(&mem, queue(&mock), false));
    let ex = Executor::new(8).unwrap();
    let (r, ex2) = (rig.clone(), ex.clone());
    let per_turn = block_on(&ex, async move {
        let mut seen = Vec::new();
        for batch in [5, 1, 6] {
            for _ in 0..batch {
                let head = r.pop_head();
                r.q.borrow_mut().complete(head, 0);
                schedule_notify(&ex2, &r.q);
                // Still inside the turn: nothing raised yet.
                assert_eq!(r.interrupts(), 0);
            }
            // The turn ends when the task waits for the ring.
            ex2.nop().await.unwrap();
            seen.push(r.interrupts());
        }
        seen
    });
    assert_eq!(per_turn, [1, 1, 1]);
    assert_eq!(rig.counter.0.load(Ordering::Relaxed), 3);
    assert_eq!(used(&mem).len(), 12);
}

#[test]
fn a_stop_with_requests_in_flight_waits_for_them_before_the_queue_goes_back() {
    let mem = mem();
    let mut mock = MockSplitQueue::new(&mem, 8);
    for _ in 0..3 {
        mock.add_chain(1).unwrap();
    }
    let rig = Rc::new(Rig::new(&mem, queue(&mock), false));
    let ex = Executor::new(16).unwrap();
    let kick_fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    // The "disk": every request taken completes when this is written.
    let disk_fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let returned = ReturnedQueues::default();
    let pending = Rc::new(RefCell::new(Vec::new()));
    let handed_back = Rc::new(Cell::new(false));

    {
        let (ex2, q, pending) = (ex.clone(), rig.q.clone(), pending.clone());
        let disk = EventFdReader::new(disk_fd.clone());
        ex.spawn(async move {
            while disk.read(&ex2).await.is_ok() {
                for head in pending.borrow_mut().drain(..) {
                    q.borrow_mut().complete(head, 7);
                    schedule_notify(&ex2, &q);
                }
            }
        });
    }
    {
        let (ex2, q, pending) = (ex.clone(), rig.q.clone(), pending.clone());
        let (stop, returned, handed_back) = (stop.clone(), returned.clone(), handed_back.clone());
        let kick = EventFdReader::new(kick_fd.clone());
        ex.spawn(async move {
            let pass = || {
                drain(
                    &q,
                    |chain| pending.borrow_mut().push(chain.head_index()),
                    || false,
                )
            };
            serve_kicks(&ex2, &kick, &stop, &q, pass).await;
            settle(&ex2, || pending.borrow().is_empty()).await;
            q.borrow().hand_back(&returned, 0);
            handed_back.set(true);
        });
    }
    let turns = |ex: Rc<Executor>, n: usize| async move {
        for _ in 0..n {
            ex.nop().await.unwrap();
        }
    };
    let (ex2, r) = (ex.clone(), rig.clone());
    let (p, hb, ret) = (pending.clone(), handed_back.clone(), returned.clone());
    block_on(&ex, async move {
        kick_fd.write(1).unwrap();
        for _ in 0..1000 {
            if p.borrow().len() == 3 {
                break;
            }
            turns(ex2.clone(), 1).await;
        }
        assert_eq!(p.borrow().len(), 3, "the worker took the three requests");
        // Reset: stop and kick. The requests are still in flight, so the
        // queue stays with its worker.
        stop.store(true, Ordering::SeqCst);
        kick_fd.write(1).unwrap();
        turns(ex2.clone(), 50).await;
        assert!(!hb.get());
        assert!(ret.lock().unwrap().is_empty());
        assert_eq!(r.interrupts(), 0);
        // The disk answers: the requests complete, then the queue goes back.
        disk_fd.write(1).unwrap();
        for _ in 0..1000 {
            if hb.get() {
                break;
            }
            turns(ex2.clone(), 1).await;
        }
        assert!(hb.get(), "the queue was handed back");
    });
    ex.shutdown();
    let back = returned.lock().unwrap().clone();
    assert_eq!(back.len(), 1);
    let (index, state) = back[0];
    assert_eq!(index, 0);
    assert_eq!(state.next_avail, 3);
    assert_eq!(state.next_used, 3);
    assert_eq!(
        used(&mem).iter().map(|e| e.1).collect::<Vec<_>>(),
        [7, 7, 7]
    );
    assert_eq!(rig.interrupts(), 1);
}

#[test]
fn a_used_ring_laid_over_the_avail_index_ends_a_pass_after_a_queue_s_worth() {
    const SIZE: u16 = 8;
    let mem = mem();
    let mut mock = MockSplitQueue::new(&mem, SIZE);
    // Descriptor 0 is a chain of one; every avail entry names it.
    mock.add_chain(1).unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    queue.set_ready(false);
    // The used ring starts where the avail ring does: writing the used
    // index moves the avail index, and each used entry (id 0, len 0)
    // leaves the avail entries at 0.
    queue.set_used_ring_address(Some(mock.avail_addr().0 as u32), Some(0));
    assert_eq!(queue.used_ring(), mock.avail_addr().0);
    // One chain ahead: every completion makes one more available.
    queue.set_next_used(1);
    queue.set_ready(true);
    let rig = Rig::new(&mem, queue, false);
    let taken = Cell::new(0u32);
    let passes: Vec<Drained> = (0..3)
        .map(|_| {
            drain(
                &rig.q,
                |chain| {
                    taken.set(taken.get() + 1);
                    assert!(taken.get() <= 10 * u32::from(SIZE), "the pass never ends");
                    rig.q.borrow_mut().complete(chain.head_index(), 0);
                },
                || false,
            )
        })
        .collect();
    assert_eq!(passes, [Drained::MoreLeft; 3]);
    assert_eq!(taken.get(), 3 * u32::from(SIZE));
}
