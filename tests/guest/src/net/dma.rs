//! Static memory the device reads and writes: one 2 KiB buffer per
//! descriptor of every RX and TX queue, the control queue's command area,
//! and the scratch buffer merged RX buffers are gathered into.
//!
//! Everything lives in .bss (zeroed by the loader), identity mapped, so a
//! pointer is also the guest-physical address the device is given.

use super::options::{BUF_BYTES, MAX_COUNT, MAX_PAIRS};
use crate::virtio::queue::MAX_SIZE;
use core::cell::UnsafeCell;

const PER_QUEUE: usize = MAX_SIZE as usize;
/// Offset of the ack byte in the control area.
pub const CTRL_ACK: usize = 256;
const CTRL_BYTES: usize = 512;

type Buffers = [[[u8; BUF_BYTES]; PER_QUEUE]; MAX_PAIRS];

#[repr(C, align(4096))]
struct Dma {
    rx: UnsafeCell<Buffers>,
    tx: UnsafeCell<Buffers>,
    ctrl: UnsafeCell<[u8; CTRL_BYTES]>,
    scratch: UnsafeCell<[u8; BUF_BYTES]>,
}

// SAFETY: shared only with the device; the single vCPU accesses it through
// raw pointers, never while the device owns the part accessed.
unsafe impl Sync for Dma {}

static DMA: Dma = Dma {
    rx: UnsafeCell::new([[[0; BUF_BYTES]; PER_QUEUE]; MAX_PAIRS]),
    tx: UnsafeCell::new([[[0; BUF_BYTES]; PER_QUEUE]; MAX_PAIRS]),
    ctrl: UnsafeCell::new([0; CTRL_BYTES]),
    scratch: UnsafeCell::new([0; BUF_BYTES]),
};

fn buffer(pool: &UnsafeCell<Buffers>, pair: usize, id: usize) -> *mut u8 {
    assert!(pair < MAX_PAIRS && id < PER_QUEUE);
    // SAFETY: in bounds of the pool (asserted); only the address is taken.
    unsafe {
        pool.get()
            .cast::<u8>()
            .add((pair * PER_QUEUE + id) * BUF_BYTES)
    }
}

/// RX buffer `id` of queue pair `pair` (`BUF_BYTES` long).
pub fn rx(pair: usize, id: usize) -> *mut u8 {
    buffer(&DMA.rx, pair, id)
}

/// TX buffer `id` of queue pair `pair` (`BUF_BYTES` long).
pub fn tx(pair: usize, id: usize) -> *mut u8 {
    buffer(&DMA.tx, pair, id)
}

/// The control queue's command area (`CTRL_ACK` bytes of command, then
/// the ack byte).
pub fn ctrl() -> *mut u8 {
    DMA.ctrl.get().cast()
}

/// The buffer merged RX buffers are gathered into (`BUF_BYTES` long).
pub fn scratch() -> *mut u8 {
    DMA.scratch.get().cast()
}

/// One bit per flood sequence number: echo seen.
struct Bitmap(UnsafeCell<[u64; (MAX_COUNT / 64) as usize]>);

// SAFETY: used by the single vCPU only, through `seen_bitmap`.
unsafe impl Sync for Bitmap {}

static SEEN: Bitmap = Bitmap(UnsafeCell::new([0; (MAX_COUNT / 64) as usize]));

/// The flood's echo bitmap.
///
/// # Safety
///
/// At most one reference may exist (the flood takes it once).
pub unsafe fn seen_bitmap() -> &'static mut [u64] {
    // SAFETY: exclusive as the caller guarantees; static, so 'static.
    unsafe { &mut *SEEN.0.get() }
}
