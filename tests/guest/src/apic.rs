//! The local APIC in xAPIC (MMIO) mode, and quieting the legacy 8259s.
//!
//! Interrupts the guest takes: MSI-X messages from virtqueues (fixed
//! delivery, physical destination = this APIC), and the watchdog tick of
//! the APIC timer. LINT0 (where firmware or the VMM wires the 8259 as
//! ExtINT) is masked and the 8259s are masked too, so no legacy timer or
//! UART interrupt can arrive on an exception vector.

use crate::idt;
use crate::mmio;
use crate::paging;
use crate::port::outb;

const IA32_APIC_BASE: u32 = 0x1b;
const BASE_ENABLE: u64 = 1 << 11;
const BASE_X2APIC: u64 = 1 << 10;
const BASE_MASK: u64 = 0x000f_ffff_ffff_f000;

// Register offsets.
const ID: u64 = 0x20;
const TPR: u64 = 0x80;
const EOI: u64 = 0xb0;
const SVR: u64 = 0xf0;
const LVT_TIMER: u64 = 0x320;
const LVT_LINT0: u64 = 0x350;
const LVT_ERROR: u64 = 0x370;
const TIMER_INITIAL: u64 = 0x380;
const TIMER_DIVIDE: u64 = 0x3e0;

const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
/// Divide configuration value for "divide by 1".
const DIVIDE_BY_1: u32 = 0xb;
/// Watchdog period in APIC timer clocks: about 1 s at the 1 GHz that KVM
/// and QEMU emulate; longer on hardware with a slower bus clock.
const WATCHDOG_PERIOD: u32 = 1_000_000_000;

/// The 8259 interrupt mask registers (master, slave).
const PIC1_DATA: u16 = 0x21;
const PIC2_DATA: u16 = 0xa1;

/// An enabled local APIC.
#[derive(Clone, Copy, Debug)]
pub struct Lapic {
    base: u64,
    /// xAPIC ID (MSI destination).
    pub id: u8,
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU; reading it has
    // no side effect.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(lo) | (u64::from(hi) << 32)
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: only used to set the global enable bit of IA32_APIC_BASE,
    // keeping its base address.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags))
    };
}

impl Lapic {
    fn write(&self, reg: u64, v: u32) {
        // SAFETY: `base` is the mapped, uncached xAPIC page (see `init`);
        // APIC registers take aligned 32-bit accesses.
        unsafe { mmio::write32(self.base + reg, v) }
    }

    fn read(&self, reg: u64) -> u32 {
        // SAFETY: as for `write`.
        unsafe { mmio::read32(self.base + reg) }
    }

    /// Starts the periodic watchdog tick on [`idt::TIMER_VECTOR`].
    pub fn start_watchdog(&self) {
        self.write(TIMER_DIVIDE, DIVIDE_BY_1);
        self.write(LVT_TIMER, u32::from(idt::TIMER_VECTOR) | LVT_PERIODIC);
        self.write(TIMER_INITIAL, WATCHDOG_PERIOD);
    }

    /// Stops the watchdog tick.
    pub fn stop_watchdog(&self) {
        self.write(TIMER_INITIAL, 0);
        self.write(LVT_TIMER, LVT_MASKED | u32::from(idt::TIMER_VECTOR));
    }
}

/// Masks the 8259s and enables the local APIC (software enable, spurious
/// vector 0xFF, LINT0 and error LVTs masked, TPR 0). Interrupts stay off.
pub fn init() -> Result<Lapic, &'static str> {
    // SAFETY: masking every 8259 input only stops legacy interrupts, which
    // the guest does not use.
    unsafe {
        outb(PIC1_DATA, 0xff);
        outb(PIC2_DATA, 0xff);
    }
    let msr = rdmsr(IA32_APIC_BASE);
    if msr & BASE_X2APIC != 0 {
        return Err("local APIC is in x2APIC mode");
    }
    if msr & BASE_ENABLE == 0 {
        wrmsr(IA32_APIC_BASE, msr | BASE_ENABLE);
    }
    let base = msr & BASE_MASK;
    if base + 0x1000 > 1 << 32 {
        return Err("local APIC above 4 GiB");
    }
    paging::map_uncached(base, 0x1000).map_err(|_| "cannot map the local APIC")?;
    let apic = Lapic { base, id: 0 };
    idt::RINGVM_APIC_EOI.store(base + EOI, core::sync::atomic::Ordering::Relaxed);
    apic.write(SVR, SVR_ENABLE | u32::from(idt::SPURIOUS_VECTOR));
    apic.write(TPR, 0);
    apic.write(LVT_LINT0, LVT_MASKED);
    apic.write(LVT_ERROR, LVT_MASKED);
    let id = (apic.read(ID) >> 24) as u8;
    Ok(Lapic { id, ..apic })
}
