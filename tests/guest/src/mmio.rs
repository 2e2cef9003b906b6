//! Volatile access to device registers (MMIO) at physical addresses.
//!
//! Addresses must be mapped (identity map below 4 GiB, or made so with
//! [`crate::paging::map_uncached`]) and belong to a device register block:
//! every access is a single naturally sized `mov`, which is what device
//! emulators expect.

use core::ptr::{read_volatile, with_exposed_provenance_mut, write_volatile};

/// Reads a byte register.
///
/// # Safety
///
/// `addr` must be a mapped device register whose read has no effect on
/// memory that Rust code owns.
#[inline(always)]
pub unsafe fn read8(addr: u64) -> u8 {
    // SAFETY: the caller guarantees a mapped register; a volatile read is a
    // single byte-sized load.
    unsafe { read_volatile(with_exposed_provenance_mut::<u8>(addr as usize)) }
}

/// Reads a 16-bit register (`addr` 2-byte aligned).
///
/// # Safety
///
/// As for [`read8`].
#[inline(always)]
pub unsafe fn read16(addr: u64) -> u16 {
    // SAFETY: as for `read8`; the caller guarantees alignment.
    unsafe { read_volatile(with_exposed_provenance_mut::<u16>(addr as usize)) }
}

/// Reads a 32-bit register (`addr` 4-byte aligned).
///
/// # Safety
///
/// As for [`read8`].
#[inline(always)]
pub unsafe fn read32(addr: u64) -> u32 {
    // SAFETY: as for `read8`; the caller guarantees alignment.
    unsafe { read_volatile(with_exposed_provenance_mut::<u32>(addr as usize)) }
}

/// Writes a byte register.
///
/// # Safety
///
/// `addr` must be a mapped device register, and the effect of the write
/// (e.g. DMA the device starts) must not break memory safety.
#[inline(always)]
pub unsafe fn write8(addr: u64, value: u8) {
    // SAFETY: the caller guarantees a mapped register and vouches for the
    // effect; a volatile write is a single byte-sized store.
    unsafe { write_volatile(with_exposed_provenance_mut::<u8>(addr as usize), value) }
}

/// Writes a 16-bit register (`addr` 2-byte aligned).
///
/// # Safety
///
/// As for [`write8`].
#[inline(always)]
pub unsafe fn write16(addr: u64, value: u16) {
    // SAFETY: as for `write8`; the caller guarantees alignment.
    unsafe { write_volatile(with_exposed_provenance_mut::<u16>(addr as usize), value) }
}

/// Writes a 32-bit register (`addr` 4-byte aligned).
///
/// # Safety
///
/// As for [`write8`].
#[inline(always)]
pub unsafe fn write32(addr: u64, value: u32) {
    // SAFETY: as for `write8`; the caller guarantees alignment.
    unsafe { write_volatile(with_exposed_provenance_mut::<u32>(addr as usize), value) }
}

/// Writes a 64-bit register as two 32-bit halves, low first (virtio lets
/// drivers access 64-bit fields that way, and every device accepts it).
///
/// # Safety
///
/// As for [`write8`], for both halves.
#[inline(always)]
pub unsafe fn write64_split(addr: u64, value: u64) {
    // SAFETY: forwarded to the caller's guarantee for both halves.
    unsafe {
        write32(addr, value as u32);
        write32(addr + 4, (value >> 32) as u32);
    }
}
