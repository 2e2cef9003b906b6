//! The virtio-blk request path allocates nothing per request: a counting
//! global allocator counts the allocations made on the device's iothread
//! while a driver (through the virtio-pci transport, on a real KVM VM and
//! a real file through io_uring) runs hundreds of reads, writes and
//! flushes, after a warm-up that lets the queue's tables and lists grow.

mod driver;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use driver::{Driver, TestVm};
use ringvm_test_devices::kvm_available;
use uring_backend::iothread::IoThread;
use virtio::blk::{BlockDevice, DiskConfig};

thread_local! {
    /// Set on the thread whose allocations count.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

struct Counting;

// SAFETY: every call goes to the system allocator unchanged; the counter
// is a side effect (the thread-local is const-initialised, so reading it
// does not allocate).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTED.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTED.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Makes the iothread's allocations count from now on.
fn count_on(thread: &IoThread) {
    let (tx, rx) = mpsc::channel();
    thread.run_on(Box::new(move |_ex| {
        COUNTED.with(|c| c.set(true));
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
    count_on(&thread);
    // Warm-up: the request table, the segment pool and the executor's
    // scratch lists reach their working size.
    requests(&mut drv, 50, &pattern);
    let warm = ALLOCATIONS.load(Ordering::Relaxed);
    assert!(warm > 0, "the counter sees the iothread's allocations");
    let rounds = 200;
    requests(&mut drv, rounds, &pattern);
    let per_run = ALLOCATIONS.load(Ordering::Relaxed) - warm;
    let served = rounds * 2 + rounds / 8;
    eprintln!("{per_run} allocations on the iothread for {served} requests after warm-up ({warm} during it)");
    assert!(
        per_run * 50 < served,
        "{per_run} allocations for {served} requests: the request path allocates"
    );
    drop(drv);
    std::fs::remove_file(&path).unwrap();
}
