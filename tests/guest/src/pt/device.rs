//! The vfio-user test device as the guest sees it (tests/devices/README.md):
//! BAR0 registers, the capability list, and the static DMA buffers.

use super::options::MAX_DMA;
use crate::mmio;
use crate::pci::Function;
use core::cell::UnsafeCell;

/// The ID register's value ("RVM1").
pub const ID_VALUE: u32 = 0x5256_4d31;
/// Bytes of BAR0 and BAR2 the guest maps.
pub const BAR0_LEN: u64 = 0x1000;
pub const BAR2_LEN: u64 = 0x4000;

// BAR0 register offsets.
const ID: u64 = 0x00;
const DOORBELL: u64 = 0x04;
const DMA_SRC_LO: u64 = 0x08;
const DMA_SRC_HI: u64 = 0x0c;
const DMA_DST_LO: u64 = 0x10;
const DMA_DST_HI: u64 = 0x14;
const DMA_LEN: u64 = 0x18;
const DMA_CMD: u64 = 0x1c;
const DMA_STATUS: u64 = 0x20;
const PEEK_VALUE: u64 = 0x24;
const PEEK_OFFSET: u64 = 0x28;
const INTX: u64 = 0x30;

/// DMA_CMD value that starts a copy, and the DMA_STATUS of a good one.
const DMA_COPY: u32 = 1;
pub const DMA_DONE: u32 = 1;

/// The mapped register BAR.
#[derive(Clone, Copy, Debug)]
pub struct Regs {
    base: u64,
}

impl Regs {
    /// # Safety
    ///
    /// `base` must be the test device's BAR0, mapped (uncached) for
    /// [`BAR0_LEN`] bytes, with memory decoding enabled.
    pub unsafe fn new(base: u64) -> Regs {
        Regs { base }
    }

    fn read(&self, reg: u64) -> u32 {
        // SAFETY: inside the mapped BAR0 (see `new`); no register has a
        // read side effect.
        unsafe { mmio::read32(self.base + reg) }
    }

    fn write(&self, reg: u64, v: u32) {
        // SAFETY: inside the mapped BAR0. Only registers without effect on
        // guest memory are written here (DMA_CMD goes through `dma`).
        unsafe { mmio::write32(self.base + reg, v) }
    }

    pub fn id(&self) -> u32 {
        self.read(ID)
    }

    /// Rings the doorbell of MSI-X vector `v`.
    pub fn ring(&self, v: u32) {
        self.write(DOORBELL, v);
    }

    /// Asserts (or deasserts) the device's INTx line.
    pub fn set_intx(&self, asserted: bool) {
        self.write(INTX, u32::from(asserted));
    }

    /// Address of the INTX register (writing 0 deasserts the line).
    pub fn intx_register(&self) -> u64 {
        self.base + INTX
    }

    /// The word at BAR2 offset `off`, as the device reads its own memory.
    pub fn peek(&self, off: u32) -> u32 {
        self.write(PEEK_OFFSET, off);
        self.read(PEEK_VALUE)
    }

    /// Copies `len` bytes from guest-physical `src` to `dst` with the
    /// device's DMA engine; returns DMA_STATUS.
    ///
    /// # Safety
    ///
    /// `[dst, dst + len)` must be memory no Rust reference points into.
    pub unsafe fn dma(&self, src: u64, dst: u64, len: u32) -> u32 {
        self.write(DMA_SRC_LO, src as u32);
        self.write(DMA_SRC_HI, (src >> 32) as u32);
        self.write(DMA_DST_LO, dst as u32);
        self.write(DMA_DST_HI, (dst >> 32) as u32);
        self.write(DMA_LEN, len);
        // SAFETY: the caller guarantees the destination is free to write;
        // the copy finishes before the write completes.
        unsafe { mmio::write32(self.base + DMA_CMD, DMA_COPY) };
        self.read(DMA_STATUS)
    }
}

/// Most capabilities kept (the most that fit in 192 bytes).
const MAX_CAPS: usize = 48;

/// A function's capability list, in chain order.
pub struct Caps {
    list: [(u8, u8); MAX_CAPS],
    len: usize,
    /// The chain came back to an offset it had visited.
    pub looped: bool,
}

impl Caps {
    /// Walks `func`'s list, stopping at the first offset seen twice.
    pub fn read(func: Function) -> Caps {
        let mut caps = Caps {
            list: [(0, 0); MAX_CAPS],
            len: 0,
            looped: false,
        };
        // One flag per dword: capabilities are dword aligned.
        let mut seen = [false; 64];
        for (at, id) in func.capabilities() {
            let slot = &mut seen[usize::from(at >> 2)];
            if *slot || caps.len == MAX_CAPS {
                caps.looped = *slot;
                break;
            }
            *slot = true;
            caps.list[caps.len] = (at, id);
            caps.len += 1;
        }
        caps
    }

    /// `(offset, id)` pairs in chain order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, u8)> + '_ {
        self.list[..self.len].iter().copied()
    }

    /// Offset of the first capability with `id`.
    pub fn find(&self, id: u8) -> Option<u8> {
        self.iter().find(|&(_, i)| i == id).map(|(at, _)| at)
    }
}

const WORDS: usize = MAX_DMA as usize / 8;

/// Source and destination of the DMA test; the destination has one spare
/// word that must stay zero.
#[repr(C, align(4096))]
struct Buffers {
    src: UnsafeCell<[u64; WORDS]>,
    dst: UnsafeCell<[u64; WORDS + 1]>,
}

// SAFETY: only the single vCPU and the device (while it copies) access the
// buffers, always through raw pointers.
unsafe impl Sync for Buffers {}

static BUFFERS: Buffers = Buffers {
    src: UnsafeCell::new([0; WORDS]),
    dst: UnsafeCell::new([0; WORDS + 1]),
};

/// Word `i` of the source pattern: distinct in every byte lane.
fn pattern(i: usize) -> u64 {
    (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5256_4d31_0000_0000
}

fn src() -> *mut u64 {
    BUFFERS.src.get().cast()
}

fn dst() -> *mut u64 {
    BUFFERS.dst.get().cast()
}

/// Guest-physical addresses of the source and destination (identity map).
pub fn dma_addresses() -> (u64, u64) {
    (src() as u64, dst() as u64)
}

/// Fills the first `len` (<= MAX_DMA) bytes of the source with the pattern
/// and zeroes the destination up to its spare word.
pub fn prepare(len: u32) {
    let words = (len as usize).div_ceil(8).min(WORDS);
    for i in 0..words {
        // SAFETY: `i < WORDS`; volatile, as the device reads it.
        unsafe { src().add(i).write_volatile(pattern(i)) };
    }
    for i in 0..=words {
        // SAFETY: `i <= WORDS`, inside the destination.
        unsafe { dst().add(i).write_volatile(0) };
    }
}

/// The offset of the first byte that is wrong after copying `len` bytes:
/// a destination byte that differs from the source, or a byte past `len`
/// (up to the end of the next word) that is no longer zero. Whole words
/// are compared as words (one loop turn per 8 bytes).
pub fn check(len: u32) -> Option<usize> {
    let len = len as usize;
    let dst_word = |i: usize| {
        // SAFETY: callers keep `i <= WORDS`, inside the destination; the
        // device has finished writing.
        unsafe { dst().add(i).read_volatile() }
    };
    let full = len / 8;
    for i in 0..full {
        let diff = dst_word(i) ^ pattern(i);
        if diff != 0 {
            return Some(8 * i + diff.trailing_zeros() as usize / 8);
        }
    }
    // The partial last word, then the spare bytes up to the next word end.
    for i in full..=len.div_ceil(8).min(WORDS) {
        let got = dst_word(i).to_le_bytes();
        let want = pattern(i).to_le_bytes();
        for (b, (g, w)) in got.iter().zip(want).enumerate() {
            let at = 8 * i + b;
            if *g != if at < len { w } else { 0 } {
                return Some(at);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the device does for a good copy.
    fn copy(len: usize) {
        for i in 0..len {
            // SAFETY: `i < len <= MAX_DMA`, inside both buffers.
            unsafe {
                let b = src().cast::<u8>().add(i).read();
                dst().cast::<u8>().add(i).write(b);
            }
        }
    }

    fn poke_dst(at: usize, v: u8) {
        // SAFETY: `at` is inside the destination (tests stay below
        // MAX_DMA + 8).
        unsafe { dst().cast::<u8>().add(at).write(v) };
    }

    // One test only: the buffers are a single static.
    #[test]
    fn dma_check_finds_missing_wrong_and_overrun_bytes() {
        for len in [1, 7, 8, 4096, 4099, MAX_DMA] {
            prepare(len);
            assert_eq!(check(len), if len == 0 { None } else { Some(0) });
            copy(len as usize);
            assert_eq!(check(len), None, "len {len}");
            let last = len as usize - 1;
            poke_dst(last, !pattern(last / 8).to_le_bytes()[last % 8]);
            assert_eq!(check(len), Some(last), "len {len}");
            copy(len as usize);
            // A byte past the end (in the spare word at most).
            poke_dst(len as usize, 1);
            assert_eq!(check(len), Some(len as usize), "len {len}");
        }
        let (s, d) = dma_addresses();
        assert_eq!(s % 4096, 0);
        assert!(d >= s + u64::from(MAX_DMA));
    }
}
