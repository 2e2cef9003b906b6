//! The request table of a virtio-blk queue: sized by the queue, it refuses
//! a request past that size with `VIRTIO_BLK_S_IOERR` instead of growing,
//! and every slot is free again once the requests in flight are done (what
//! a reset waits for). Real io_uring reads of a real file.

use std::future::Future;
use std::io::Write;

use uring_backend::block::{BlockOpenOptions, IoEngine};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use super::super::request::VIRTIO_BLK_T_IN;
use super::*;
use crate::vq::settle;

const SIZE: u16 = 8;
/// The queue's used ring (away from the mock's, which overlaps its avail
/// ring: see `vq::tests`).
const USED: u64 = 0x8000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn block_on<T: 'static>(ex: &Rc<Executor>, fut: impl Future<Output = T> + 'static) -> T {
    ex.block_on(fut).expect("the task finished")
}

/// Chain `k` (descriptors 2k, 2k+1): a one-sector read of sector k into
/// a buffer whose last byte is the status.
fn header_at(k: u16) -> u64 {
    0x1_0000 + u64::from(k) * 0x1000
}
fn status_at(k: u16) -> u64 {
    header_at(k) + 0x100 + 512
}

fn disk(path: &std::path::Path) -> BlockFile {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&vec![0x5a; 64 * 1024]).unwrap();
    drop(f);
    BlockFile::open(
        path,
        BlockOpenOptions {
            engine: IoEngine::Uring,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn the_request_table_refuses_rather_than_grows_and_every_slot_comes_back() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mock = MockSplitQueue::new(&mem, SIZE);
    for k in 0..SIZE / 2 {
        let (head, data) = (header_at(k), header_at(k) + 0x100);
        mem.write_obj(VIRTIO_BLK_T_IN, GuestAddress(head)).unwrap();
        mem.write_obj(0u32, GuestAddress(head + 4)).unwrap();
        mem.write_obj(u64::from(k), GuestAddress(head + 8)).unwrap();
        let descs = [
            Descriptor::new(head, 16, F_NEXT, 2 * k + 1),
            Descriptor::new(data, 513, F_WRITE, 0),
        ];
        for (i, d) in descs.into_iter().enumerate() {
            mock.desc_table()
                .store(2 * k + i as u16, RawDescriptor::from(d))
                .unwrap();
        }
    }
    // The driver offers `heads`; offering one still in flight is its bug,
    // the only way past the queue's size.
    let avail = mock.avail_addr().0;
    let offered = Cell::new(0u16);
    let offer = |heads: &[u16]| {
        for &h in heads {
            let i = offered.get();
            mem.write_obj(h, GuestAddress(avail + 4 + 2 * u64::from(i % SIZE)))
                .unwrap();
            offered.set(i.wrapping_add(1));
        }
        mem.write_obj(offered.get(), GuestAddress(avail + 2))
            .unwrap();
    };
    let used_idx = || mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap();
    let used_entry = |i: u64| -> (u32, u32) {
        let at = USED + 4 + 8 * (i % u64::from(SIZE));
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    };

    let mut queue: Queue = mock.create_queue().unwrap();
    queue.set_ready(false);
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    let stats = Arc::new(BlockStats::default());
    let log = Arc::new(RateLimitedLog::new("slab-test"));
    let vq = ServedQueue::shared(QueueParts {
        index: 0,
        queue,
        event_idx: false,
        mem: mem.clone(),
        interrupt: None,
        log: log.clone(),
        counter: stats.clone(),
    });
    let path = std::env::temp_dir().join(format!("ringvm-slab-{}", std::process::id()));
    let ex = Executor::new(32).unwrap();
    let q = Rc::new_cyclic(|me| BlkQueue {
        me: me.clone(),
        ex: ex.clone(),
        vq: vq.clone(),
        disk: disk(&path),
        file_slot: None,
        fixed: false,
        slots: RefCell::new(Vec::new()),
        max_slots: usize::from(SIZE),
        free: RefCell::new(Vec::new()),
        pool: RefCell::new(SegmentPool::default()),
        inflight: Cell::new(0),
        limits: RequestLimits {
            capacity_sectors: 128,
            readonly: false,
            discard: false,
            write_zeroes: false,
        },
        id: [0; VIRTIO_BLK_ID_BYTES],
        log,
        stats: stats.clone(),
    });
    std::fs::remove_file(&path).unwrap();

    // Nothing runs the executor yet: every read taken stays in flight.
    let heads: Vec<u16> = (0..SIZE / 2).map(|k| 2 * k).collect();
    offer(&heads);
    assert_eq!(q.drain(), Drained::Empty);
    offer(&heads);
    assert_eq!(q.drain(), Drained::Empty);
    assert_eq!(q.inflight.get(), usize::from(SIZE));
    assert_eq!(q.slots.borrow().len(), usize::from(SIZE));
    assert!(q.free.borrow().is_empty());
    assert_eq!(used_idx(), 0);

    // One more: refused at once with IOERR (status byte written, one byte
    // used), and the table has not grown.
    mem.write_obj(0xffu8, GuestAddress(status_at(1))).unwrap();
    offer(&[2]);
    assert_eq!(q.drain(), Drained::Empty);
    assert_eq!(q.slots.borrow().len(), usize::from(SIZE));
    assert_eq!(used_idx(), 1);
    assert_eq!(used_entry(0), (2, 1));
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(status_at(1))).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(stats.errors.load(Ordering::Relaxed), 1);

    // The reads complete (as a reset waits for them): every slot is free.
    let q2 = q.clone();
    block_on(&ex, async move {
        let ex = q2.ex.clone();
        settle(&ex, || q2.inflight.get() == 0).await;
    });
    assert_eq!(used_idx(), SIZE + 1);
    for i in 1..=u64::from(SIZE) {
        assert_eq!(used_entry(i).1, 513, "entry {i}");
    }
    assert_eq!(q.slots.borrow().len(), usize::from(SIZE));
    let mut free = q.free.borrow().clone();
    free.sort_unstable();
    assert_eq!(free, (0..u32::from(SIZE)).collect::<Vec<_>>());
    assert!(q.slots.borrow().iter().all(|s| s.req.is_none()));
    assert_eq!(stats.read_ops.load(Ordering::Relaxed), u64::from(SIZE));
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(header_at(1) + 0x100))
            .unwrap(),
        0x5a
    );
    ex.shutdown();
}
