//! The time-stamp counter and its frequency.

use crate::port::{inb, outb};
use core::arch::x86_64::{__cpuid, _rdtsc};

/// Reads the TSC.
pub fn now() -> u64 {
    // SAFETY: RDTSC is available on every x86-64 CPU and has no side
    // effect (CR4.TSD is clear: the guest runs in ring 0 anyway).
    unsafe { _rdtsc() }
}

/// PIT input clock in Hz.
const PIT_HZ: u64 = 1_193_182;
/// Calibration interval: 11932 PIT ticks = 10 ms.
const PIT_COUNT: u16 = 11_932;
const PIT_CH2_DATA: u16 = 0x42;
const PIT_COMMAND: u16 = 0x43;
/// Port B of the 8255 / NMI status port: bit 0 gates PIT channel 2, bit 1
/// enables the speaker, bit 5 reads channel 2's output.
const PORT_B: u16 = 0x61;
/// Upper bound on status polls (about a second even at 1 µs per poll).
const POLL_LIMIT: u32 = 1 << 20;

/// TSC ticks per second: from CPUID leaf 0x15 (crystal clock and ratio),
/// else leaf 0x16 (base frequency in MHz), else the hypervisor timing leaf
/// 0x40000010, else measured once against PIT channel 2. `None` when
/// nothing works.
pub fn frequency() -> Option<u64> {
    let max = __cpuid(0).eax;
    if max >= 0x15 {
        let l = __cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return Some(u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax));
        }
    }
    if max >= 0x16 {
        let mhz = __cpuid(0x16).eax & 0xffff;
        if mhz != 0 {
            return Some(u64::from(mhz) * 1_000_000);
        }
    }
    // A hypervisor's timing leaf (ringvm, QEMU with vmware-cpuid-freq):
    // TSC kHz in EAX.
    if __cpuid(1).ecx & (1 << 31) != 0 && __cpuid(0x4000_0000).eax >= 0x4000_0010 {
        let khz = __cpuid(0x4000_0010).eax;
        if khz != 0 {
            return Some(u64::from(khz) * 1000);
        }
    }
    calibrate_with_pit()
}

/// Counts TSC ticks while PIT channel 2 counts down [`PIT_COUNT`] in mode 0
/// (output goes high at terminal count).
fn calibrate_with_pit() -> Option<u64> {
    // SAFETY: port B and PIT channel 2 only drive the PC speaker, which is
    // kept off; the original port B value is restored below.
    let saved = unsafe { inb(PORT_B) };
    // SAFETY: as above.
    unsafe {
        outb(PORT_B, (saved & !0x02) | 0x01); // gate on, speaker off
        outb(PIT_COMMAND, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
        outb(PIT_CH2_DATA, PIT_COUNT as u8);
        outb(PIT_CH2_DATA, (PIT_COUNT >> 8) as u8);
    }
    let start = now();
    let mut result = None;
    // SAFETY: reading port B has no side effect.
    if unsafe { inb(PORT_B) } & 0x20 == 0 {
        for _ in 0..POLL_LIMIT {
            // SAFETY: as above.
            if unsafe { inb(PORT_B) } & 0x20 != 0 {
                let ticks = now() - start;
                result = Some(ticks * PIT_HZ / u64::from(PIT_COUNT));
                break;
            }
        }
    }
    // SAFETY: restores the speaker/gate bits found on entry.
    unsafe { outb(PORT_B, saved) };
    result.filter(|&hz| hz != 0)
}
