//! The 256-byte PCI configuration space: header, BAR registers (with the
//! usual sizing masks), and the capability chain MSI-X (0x40) → MSI (0x50)
//! → PCI Express (0x70) → vendor-specific (0x60).
//!
//! Writes keep only the bits of a per-byte writable mask; everything else
//! is read-only. The device does not act on any of it (the VMM emulates
//! MSI/MSI-X and BAR placement); a reset clears the command register and
//! the MSI/MSI-X enable bits.

use super::{Behaviour, BAD_BAR0_SIZE, BAR0_SIZE, BAR2_SIZE, DEVICE_ID, VENDOR_ID};
use super::{MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS};

/// Size of the configuration space.
pub const SIZE: usize = 256;

// Header offsets.
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION: usize = 0x08;
const HEADER_TYPE: usize = 0x0e;
const BAR0: usize = 0x10;
const BAR2: usize = 0x18;
const BAR3: usize = 0x1c;
const SUBSYSTEM_VENDOR: usize = 0x2c;
const SUBSYSTEM: usize = 0x2e;
const CAP_PTR: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;

/// Capability offsets and IDs.
pub const MSIX_CAP: usize = 0x40;
pub const MSI_CAP: usize = 0x50;
pub const VENDOR_CAP: usize = 0x60;
pub const PCIE_CAP: usize = 0x70;
const ID_MSIX: u8 = 0x11;
const ID_MSI: u8 = 0x05;
const ID_VENDOR: u8 = 0x09;
const ID_PCIE: u8 = 0x10;

/// Command bits the driver may set: memory space, bus master, SERR#,
/// INTx disable.
const COMMAND_MASK: u16 = 0x0506;
/// Status: capabilities list present.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Class code 0xff0000 and revision 1, as the dword at 0x08.
const CLASS_REVISION: u32 = 0xff00_0001;
const SUBSYSTEM_ID: u16 = 0x0001;
/// MSI-X message control: enable (15) and function mask (14).
const MSIX_CTRL_MASK: u16 = 0xc000;
/// MSI message control: enable (0), multiple message enable (6:4); bit 7
/// (64-bit address) is read-only and set.
const MSI_CTRL_MASK: u16 = 0x0071;
const MSI_CTRL_64BIT: u16 = 0x0080;
/// BIR of the MSI-X table and PBA.
const MSIX_BIR: u32 = 2;

/// Configuration space contents and writable bits.
#[derive(Clone)]
pub struct Config {
    bytes: [u8; SIZE],
    writable: [u8; SIZE],
}

impl Config {
    pub fn new(behaviour: Behaviour) -> Config {
        let mut c = Config {
            bytes: [0; SIZE],
            writable: [0; SIZE],
        };
        c.put16(0, VENDOR_ID, 0);
        c.put16(2, DEVICE_ID, 0);
        c.put16(COMMAND, 0, COMMAND_MASK);
        c.put16(STATUS, STATUS_CAP_LIST, 0);
        c.put32(REVISION, CLASS_REVISION, 0);
        c.bytes[HEADER_TYPE] = 0;

        // BAR0: 32-bit memory; the mask follows the (power-of-two rounded)
        // size the region reports, so sizing agrees with the region.
        let bar0_size = if behaviour == Behaviour::BadBarSize {
            BAD_BAR0_SIZE
        } else {
            BAR0_SIZE
        };
        let bar0_mask = !(bar0_size.next_power_of_two() as u32 - 1) & !0xf;
        c.put32(BAR0, 0, bar0_mask);
        // BAR2/3: 64-bit memory.
        c.put32(BAR2, 0x4, !(BAR2_SIZE as u32 - 1) & !0xf);
        c.put32(BAR3, 0, u32::MAX);

        c.put16(SUBSYSTEM_VENDOR, VENDOR_ID, 0);
        c.put16(SUBSYSTEM, SUBSYSTEM_ID, 0);
        c.bytes[CAP_PTR] = MSIX_CAP as u8;
        c.put8(INTERRUPT_LINE, 0, 0xff);
        c.bytes[INTERRUPT_PIN] = 1;

        // MSI-X: 8 vectors, table and PBA in BAR2.
        c.cap_header(MSIX_CAP, ID_MSIX, MSI_CAP);
        c.put16(MSIX_CAP + 2, MSIX_VECTORS as u16 - 1, MSIX_CTRL_MASK);
        c.put32(MSIX_CAP + 4, MSIX_TABLE_OFFSET as u32 | MSIX_BIR, 0);
        c.put32(MSIX_CAP + 8, MSIX_PBA_OFFSET as u32 | MSIX_BIR, 0);

        // MSI: 1 vector, 64-bit address, no per-vector masking.
        c.cap_header(MSI_CAP, ID_MSI, PCIE_CAP);
        c.put16(MSI_CAP + 2, MSI_CTRL_64BIT, MSI_CTRL_MASK);
        c.put32(MSI_CAP + 4, 0, 0xffff_fffc);
        c.put32(MSI_CAP + 8, 0, u32::MAX);
        c.put16(MSI_CAP + 12, 0, u16::MAX);

        // PCI Express (version 2, endpoint), which a VMM hides.
        c.cap_header(PCIE_CAP, ID_PCIE, VENDOR_CAP);
        c.put16(PCIE_CAP + 2, 0x0002, 0);

        // Vendor-specific: length 8, "RVM". CapLoop points it back at the
        // first capability.
        let next = if behaviour == Behaviour::CapLoop {
            MSIX_CAP
        } else {
            0
        };
        c.cap_header(VENDOR_CAP, ID_VENDOR, next);
        c.bytes[VENDOR_CAP + 2] = 8;
        c.bytes[VENDOR_CAP + 3..VENDOR_CAP + 6].copy_from_slice(b"RVM");
        c
    }

    fn put8(&mut self, off: usize, v: u8, mask: u8) {
        self.bytes[off] = v;
        self.writable[off] = mask;
    }

    fn put16(&mut self, off: usize, v: u16, mask: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
        self.writable[off..off + 2].copy_from_slice(&mask.to_le_bytes());
    }

    fn put32(&mut self, off: usize, v: u32, mask: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
        self.writable[off..off + 4].copy_from_slice(&mask.to_le_bytes());
    }

    fn cap_header(&mut self, off: usize, id: u8, next: usize) {
        self.bytes[off] = id;
        self.bytes[off + 1] = next as u8;
    }

    /// The bytes at `[off, off + len)`, if inside the space.
    fn range(off: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(off).ok()?;
        let end = start.checked_add(len)?;
        (end <= SIZE).then_some(start..end)
    }

    /// Reads `data.len()` bytes at `off`; false when out of range.
    pub fn read(&self, off: u64, data: &mut [u8]) -> bool {
        match Self::range(off, data.len()) {
            Some(r) => {
                data.copy_from_slice(&self.bytes[r]);
                true
            }
            None => false,
        }
    }

    /// Writes the writable bits of `data` at `off`; false when out of
    /// range.
    pub fn write(&mut self, off: u64, data: &[u8]) -> bool {
        let Some(r) = Self::range(off, data.len()) else {
            return false;
        };
        for (i, &d) in r.zip(data) {
            let m = self.writable[i];
            self.bytes[i] = (self.bytes[i] & !m) | (d & m);
        }
        true
    }

    fn read16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    fn clear16(&mut self, off: usize, bits: u16) {
        let v = self.read16(off) & !bits;
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// What a function reset does here: command register and interrupt
    /// enables cleared.
    pub fn reset(&mut self) {
        self.clear16(COMMAND, u16::MAX);
        self.clear16(MSIX_CAP + 2, MSIX_CTRL_MASK);
        self.clear16(MSI_CAP + 2, MSI_CTRL_MASK);
    }

    /// The command register.
    #[cfg(test)]
    pub fn command(&self) -> u16 {
        self.read16(COMMAND)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(c: &Config, limit: usize) -> Vec<(usize, u8)> {
        let mut out = Vec::new();
        let mut at = usize::from(c.bytes[CAP_PTR]);
        while at != 0 && out.len() < limit {
            out.push((at, c.bytes[at]));
            at = usize::from(c.bytes[at + 1]);
        }
        out
    }

    #[test]
    fn capability_chain_order() {
        let c = Config::new(Behaviour::Good);
        assert_eq!(
            chain(&c, 10),
            [(0x40, 0x11), (0x50, 0x05), (0x70, 0x10), (0x60, 0x09)]
        );
        let c = Config::new(Behaviour::CapLoop);
        assert_eq!(chain(&c, 10).len(), 10);
    }

    #[test]
    fn writes_keep_read_only_bits() {
        let mut c = Config::new(Behaviour::Good);
        assert!(c.write(0, &[0xff; 4]));
        let mut id = [0; 4];
        assert!(c.read(0, &mut id));
        assert_eq!(id, [0x34, 0x12, 0x56, 0x72]);
        assert!(c.write(COMMAND as u64, &[0xff, 0xff]));
        assert_eq!(c.command(), COMMAND_MASK);
        // BAR sizing.
        assert!(c.write(BAR0 as u64, &[0xff; 4]));
        let mut bar = [0; 4];
        assert!(c.read(BAR0 as u64, &mut bar));
        assert_eq!(u32::from_le_bytes(bar), 0xffff_f000);
        assert!(c.write(BAR2 as u64, &[0xff; 8]));
        let mut bar = [0; 8];
        assert!(c.read(BAR2 as u64, &mut bar));
        assert_eq!(u64::from_le_bytes(bar), 0xffff_ffff_ffff_c004);
        c.reset();
        assert_eq!(c.command(), 0);
        assert!(!c.write(255, &[0, 0]));
        assert!(!c.read(u64::MAX, &mut [0]));
    }
}
