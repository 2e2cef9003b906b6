//! PCI MSI-X: capability 0x11 and the vector table in a memory BAR.
//!
//! Capability layout: +2 message control (bits 10:0 table size - 1, bit 14
//! function mask, bit 15 enable), +4 table offset | BIR (bits 2:0).
//! Table entries are 16 bytes: address low, address high, data, vector
//! control (bit 0 = masked).

use crate::mmio;
use crate::paging;
use crate::pci::Function;

/// Capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;

const CTRL_ENABLE: u32 = 1 << 15;
const CTRL_FUNCTION_MASK: u32 = 1 << 14;
/// Base of the xAPIC MSI address window.
const MSI_ADDRESS: u32 = 0xfee0_0000;

/// A located, mapped MSI-X table.
#[derive(Clone, Copy, Debug)]
pub struct Msix {
    func: Function,
    cap: u8,
    table: u64,
    /// Number of table entries.
    pub size: u16,
}

impl Msix {
    /// Reads the capability at config offset `cap` and maps its table.
    /// `bar` resolves a BAR index to its address.
    pub fn probe(
        func: Function,
        cap: u8,
        mut bar: impl FnMut(u8) -> Result<u64, &'static str>,
    ) -> Result<Msix, &'static str> {
        let ctrl = func.read32(cap) >> 16;
        let size = (ctrl & 0x7ff) as u16 + 1;
        let loc = func.read32(cap + 4);
        let table = bar((loc & 7) as u8)?
            .checked_add(u64::from(loc & !7))
            .ok_or("MSI-X table address overflows")?;
        paging::map_uncached(table, u64::from(size) * 16)
            .map_err(|_| "cannot map the MSI-X table")?;
        Ok(Msix {
            func,
            cap,
            table,
            size,
        })
    }

    fn set_control(&self, set: u32, clear: u32) {
        let dword = self.func.read32(self.cap);
        let value = (dword | (set << 16)) & !(clear << 16);
        // SAFETY: the low half (ID, next pointer) is read-only; only the
        // enable and function-mask bits change. No vector fires while the
        // guest keeps interrupts off.
        unsafe { self.func.write32(self.cap, value) };
    }

    /// Enables MSI-X with the whole function masked (so no entry fires
    /// half-programmed).
    pub fn enable_masked(&self) {
        self.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK, 0);
    }

    /// Clears the function mask: unmasked entries may now fire.
    pub fn unmask_function(&self) {
        self.set_control(0, CTRL_FUNCTION_MASK);
    }

    /// Disables MSI-X (the function falls back to INTx, if enabled in its
    /// command register).
    pub fn disable(&self) {
        self.set_control(0, CTRL_ENABLE | CTRL_FUNCTION_MASK);
    }

    /// Masks (or unmasks) entry `index` (< `size`) through its vector
    /// control word, leaving the message alone.
    pub fn set_masked(&self, index: u16, masked: bool) {
        debug_assert!(index < self.size);
        let control = self.table + u64::from(index) * 16 + 12;
        // SAFETY: the word lies inside the mapped table (`index < size`);
        // only the mask bit is written.
        unsafe { mmio::write32(control, u32::from(masked)) };
    }

    /// Locates and maps the pending bit array. `bar` resolves a BAR index
    /// to its address.
    pub fn pba(
        &self,
        mut bar: impl FnMut(u8) -> Result<u64, &'static str>,
    ) -> Result<Pba, &'static str> {
        let loc = self.func.read32(self.cap + 8);
        let addr = bar((loc & 7) as u8)?
            .checked_add(u64::from(loc & !7))
            .ok_or("MSI-X PBA address overflows")?;
        let len = u64::from(self.size).div_ceil(64) * 8;
        paging::map_uncached(addr, len).map_err(|_| "cannot map the MSI-X PBA")?;
        Ok(Pba {
            addr,
            size: self.size,
        })
    }

    /// Programs entry `index` (< `size`) for a fixed, edge-triggered
    /// interrupt on `vector` of the local APIC with ID `apic_id` (physical
    /// destination mode), and unmasks it.
    pub fn set_entry(&self, index: u16, apic_id: u8, vector: u8) {
        debug_assert!(index < self.size);
        let entry = self.table + u64::from(index) * 16;
        // SAFETY: the entry lies inside the mapped table (`index < size`);
        // the message targets the guest's own APIC, not memory.
        unsafe {
            mmio::write32(entry, MSI_ADDRESS | (u32::from(apic_id) << 12));
            mmio::write32(entry + 4, 0);
            mmio::write32(entry + 8, u32::from(vector));
            mmio::write32(entry + 12, 0);
        }
    }
}

/// A located, mapped MSI-X pending bit array.
#[derive(Clone, Copy, Debug)]
pub struct Pba {
    addr: u64,
    size: u16,
}

impl Pba {
    /// Whether entry `index` (< the table size) has a pending message.
    pub fn pending(&self, index: u16) -> bool {
        debug_assert!(index < self.size);
        // The PBA takes aligned dword reads; bit `index % 32` of dword
        // `index / 32`.
        let dword = self.addr + u64::from(index / 32) * 4;
        // SAFETY: the dword lies inside the mapped PBA; reading it has no
        // side effect.
        let bits = unsafe { mmio::read32(dword) };
        bits & (1 << (index % 32)) != 0
    }
}
