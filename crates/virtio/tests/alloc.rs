//! The virtio-blk request path allocates nothing per request, and the
//! virtio-net path nothing per frame: a counting global allocator counts
//! the allocations made on the device's iothread while a driver (through
//! the virtio-pci transport, on a real KVM VM, with a real file or a real
//! TAP through io_uring) runs hundreds of reads, writes and flushes, or
//! sends and receives hundreds of frames, after a warm-up that lets the
//! queue's tables and lists grow.

mod driver;
mod tap;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use driver::{Driver, TestVm};
use ringvm_test_devices::kvm_available;
use uring_backend::iothread::IoThread;
use virtio::blk::{BlockDevice, DiskConfig};

thread_local! {
    /// On a thread whose allocations count: the counter they go to (each
    /// test has its own, as the tests run at once).
    static COUNTED: Cell<Option<&'static AtomicU64>> = const { Cell::new(None) };
}

static BLK_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static NET_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

struct Counting;

// SAFETY: every call goes to the system allocator unchanged; the counter
// is a side effect (the thread-local is const-initialised, so reading it
// does not allocate).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(counter) = COUNTED.with(Cell::get) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if let Some(counter) = COUNTED.with(Cell::get) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Makes the iothread's allocations count in `counter` from now on.
fn count_on(thread: &IoThread, counter: &'static AtomicU64) {
    let (tx, rx) = mpsc::channel();
    thread.run_on(Box::new(move |_ex| {
        COUNTED.with(|c| c.set(Some(counter)));
        let _ = tx.send(());
    }));
    rx.recv().unwrap();
}

fn requests(drv: &mut Driver, rounds: u64, pattern: &[u8]) {
    for i in 0..rounds {
        let sector = (i % 64) * 8;
        assert_eq!(drv.blk_write(0, sector, pattern), 0);
        let (status, back) = drv.blk_read(0, sector, pattern.len());
        assert_eq!(status, 0);
        assert_eq!(back, pattern);
        if i % 8 == 0 {
            assert_eq!(drv.blk_flush(0), 0);
        }
    }
}

#[test]
fn virtio_blk_reads_writes_and_flushes_allocate_nothing_per_request() {
    if !kvm_available() {
        return;
    }
    let path = std::env::temp_dir().join(format!("ringvm-alloc-{}.img", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let thread = Arc::new(IoThread::spawn("alloc-blk", 64).unwrap());
    let cfg = DiskConfig::parse(&format!("path={}", path.display())).unwrap();
    let vm = TestVm::new();
    let mut drv = Driver::new(
        &vm,
        Box::new(BlockDevice::new("blk-alloc", &cfg, std::slice::from_ref(&thread)).unwrap()),
    );
    drv.init_all().unwrap();
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
    count_on(&thread, &BLK_ALLOCATIONS);
    // Warm-up: the request table, the segment pool and the executor's
    // scratch lists reach their working size.
    requests(&mut drv, 50, &pattern);
    let warm = BLK_ALLOCATIONS.load(Ordering::Relaxed);
    assert!(warm > 0, "the counter sees the iothread's allocations");
    let rounds = 200;
    requests(&mut drv, rounds, &pattern);
    let per_run = BLK_ALLOCATIONS.load(Ordering::Relaxed) - warm;
    let served = rounds * 2 + rounds / 8;
    eprintln!("{per_run} allocations on the iothread for {served} requests after warm-up ({warm} during it)");
    assert!(
        per_run * 50 < served,
        "{per_run} allocations for {served} requests: the request path allocates"
    );
    drop(drv);
    std::fs::remove_file(&path).unwrap();
}

fn frames(drv: &mut Driver, wire: &tap::Wire, rounds: u64) {
    let peer = [0x52, 0x54, 0, 0, 0, 9];
    for i in 0..rounds {
        let payload: Vec<u8> = (0..100 + i % 1000).map(|b| (b ^ i) as u8).collect();
        let out = tap::frame([0xff; 6], tap::GUEST_MAC, &payload);
        assert_eq!(tap::guest_send(drv, 1, &out), 0);
        assert_eq!(wire.recv_ours(25).as_deref(), Some(&out[..]));
        let inbound = tap::frame(tap::GUEST_MAC, peer, &payload);
        wire.send(&inbound);
        let (_, got) = tap::guest_recv(drv, 0).expect("the guest got the frame");
        assert_eq!(got, inbound);
    }
}

#[test]
fn virtio_net_frames_allocate_nothing_per_frame() {
    if !tap::usable() {
        return;
    }
    let thread = Arc::new(IoThread::spawn("alloc-net", 64).unwrap());
    let (dev, ifname, _) = tap::device(
        "ip=10.9.7.1,mask=255.255.255.0,mac=52:54:00:aa:bb:01",
        std::slice::from_ref(&thread),
    );
    let vm = TestVm::new();
    let mut drv = Driver::new(&vm, Box::new(dev));
    let all = drv.device_features();
    drv.init(all & !tap::F_MRG).unwrap();
    let wire = tap::Wire::open(&ifname);
    tap::post_rx(&mut drv, 0, 8, 0x1_0000);
    count_on(&thread, &NET_ALLOCATIONS);
    frames(&mut drv, &wire, 50);
    let warm = NET_ALLOCATIONS.load(Ordering::Relaxed);
    let rounds = 200;
    frames(&mut drv, &wire, rounds);
    let per_run = NET_ALLOCATIONS.load(Ordering::Relaxed) - warm;
    let served = rounds * 2;
    eprintln!("{per_run} allocations on the iothread for {served} frames after warm-up ({warm} during it)");
    assert!(
        per_run * 50 < served,
        "{per_run} allocations for {served} frames: the frame path allocates"
    );
}
