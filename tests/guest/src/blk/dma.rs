//! Static memory the device reads and writes: per-slot request headers,
//! status bytes and indirect tables, and the data buffer pool.
//!
//! Everything lives in .bss (zeroed by the loader), identity mapped, so a
//! pointer is also the guest-physical address the device is given.

use super::options::{MAX_QD, POOL_BYTES};
use crate::virtio::queue::Desc;
use core::cell::UnsafeCell;

/// Request header, device-readable.
#[repr(C)]
pub struct Header {
    pub kind: u32,
    pub reserved: u32,
    pub sector: u64,
}

/// Per-slot request memory.
#[repr(C, align(16))]
pub struct Slot {
    /// Indirect descriptor table (used when INDIRECT_DESC is negotiated).
    pub table: [Desc; 3],
    pub header: Header,
    pub status: u8,
}

#[repr(C, align(4096))]
struct Dma {
    pool: UnsafeCell<[u64; POOL_BYTES / 8]>,
    slots: UnsafeCell<[Slot; MAX_QD as usize]>,
}

// SAFETY: shared only with the device; the single vCPU accesses it through
// raw pointers, never while the device owns the part accessed.
unsafe impl Sync for Dma {}

const EMPTY_DESC: Desc = Desc {
    addr: 0,
    len: 0,
    flags: 0,
    next: 0,
};

static DMA: Dma = Dma {
    pool: UnsafeCell::new([0; POOL_BYTES / 8]),
    slots: UnsafeCell::new(
        [const {
            Slot {
                table: [EMPTY_DESC; 3],
                header: Header {
                    kind: 0,
                    reserved: 0,
                    sector: 0,
                },
                status: 0,
            }
        }; MAX_QD as usize],
    ),
};

/// Slot `slot`'s request memory (`slot` < [`MAX_QD`]).
pub fn slot(slot: usize) -> *mut Slot {
    assert!(slot < MAX_QD as usize);
    // SAFETY: in bounds of the slot array (asserted).
    unsafe { DMA.slots.get().cast::<Slot>().add(slot) }
}

/// Address of slot `slot`'s data buffer for `bs`-byte requests.
pub fn buffer_addr(slot: usize, bs: usize) -> u64 {
    assert!((slot + 1) * bs <= POOL_BYTES);
    DMA.pool.get() as u64 + (slot * bs) as u64
}

/// Slot `slot`'s data buffer for `bs`-byte requests, as words.
///
/// # Safety
///
/// The slot must not be in flight (the device does not own the buffer)
/// and no other reference to the buffer may exist.
pub unsafe fn buffer(slot: usize, bs: usize) -> &'static mut [u64] {
    assert!((slot + 1) * bs <= POOL_BYTES);
    // SAFETY: in bounds (asserted), 8-byte aligned (bs is a multiple of
    // 512), exclusive and not shared with the device as the caller
    // guarantees.
    unsafe {
        core::slice::from_raw_parts_mut(DMA.pool.get().cast::<u64>().add(slot * bs / 8), bs / 8)
    }
}
