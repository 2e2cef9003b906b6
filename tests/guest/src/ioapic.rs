//! The IOAPIC at 0xfec00000 (KVM's in-kernel one, or ringvm's userspace
//! one with `--irqchip split`): redirection entries through IOREGSEL and
//! IOWIN.

use crate::mmio;
use crate::paging;

/// Where the MP table and MADT put it.
pub const BASE: u64 = 0xfec0_0000;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_VERSION: u32 = 0x01;
const REG_TABLE: u32 = 0x10;

/// Entry bits.
pub const MASKED: u64 = 1 << 16;
pub const LEVEL: u64 = 1 << 15;

/// The mapped IOAPIC.
#[derive(Clone, Copy, Debug)]
pub struct Ioapic {
    base: u64,
}

impl Ioapic {
    /// Maps the IOAPIC's register window (uncached).
    pub fn map() -> Result<Ioapic, &'static str> {
        paging::map_uncached(BASE, 0x1000).map_err(|_| "cannot map the IOAPIC")?;
        Ok(Ioapic { base: BASE })
    }

    fn write(&self, reg: u32, v: u32) {
        // SAFETY: the register window is mapped (see `map`); IOREGSEL and
        // IOWIN take aligned 32-bit accesses, and only redirection entries
        // are written (by the callers below).
        unsafe {
            mmio::write32(self.base + IOREGSEL, reg);
            mmio::write32(self.base + IOWIN, v);
        }
    }

    fn read(&self, reg: u32) -> u32 {
        // SAFETY: as for `write`; reads have no side effect.
        unsafe {
            mmio::write32(self.base + IOREGSEL, reg);
            mmio::read32(self.base + IOWIN)
        }
    }

    /// Number of redirection entries.
    pub fn pins(&self) -> u32 {
        ((self.read(REG_VERSION) >> 16) & 0xff) + 1
    }

    /// Writes `pin`'s entry as Linux does: the high dword (destination)
    /// first, then the low one (vector, mode, mask).
    pub fn set_entry(&self, pin: u32, entry: u64) {
        self.write(REG_TABLE + 2 * pin + 1, (entry >> 32) as u32);
        self.write(REG_TABLE + 2 * pin, entry as u32);
    }
}

/// A fixed, physical, active-high, level-triggered entry for `vector` on
/// local APIC `apic_id`.
pub fn level_entry(vector: u8, apic_id: u8, masked: bool) -> u64 {
    (u64::from(apic_id) << 56) | LEVEL | if masked { MASKED } else { 0 } | u64::from(vector)
}
