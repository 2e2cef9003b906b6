//! x86 port I/O. Every access is a VM exit: use sparingly.

use core::arch::asm;

/// Writes one byte to an I/O port.
///
/// # Safety
///
/// The caller must know what device (if any) sits at `port` and that the
/// write cannot break memory safety (e.g. by starting DMA into memory Rust
/// code owns).
#[inline(always)]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: `out` only talks to the device at `port`; the caller vouches
    // for the effect of the write. No stack use, flags preserved.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) }
}

/// Reads one byte from an I/O port.
///
/// # Safety
///
/// The caller must know that reading `port` has no effect that could break
/// memory safety (reads from UART status registers are harmless).
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` only talks to the device at `port`; the caller vouches
    // for the effect of the read. No stack use, flags preserved.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nostack, preserves_flags)) }
    value
}

/// Writes a dword to an I/O port.
///
/// # Safety
///
/// As for [`outb`]: the caller vouches for the effect of the write.
#[inline(always)]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: `out` only talks to the device at `port`; the caller vouches
    // for the effect of the write. No stack use, flags preserved.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    }
}

/// Reads a dword from an I/O port.
///
/// # Safety
///
/// As for [`inb`]: the caller vouches for the effect of the read.
#[inline(always)]
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: `in` only talks to the device at `port`; the caller vouches
    // for the effect of the read. No stack use, flags preserved.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags))
    }
    value
}
