//! PCI configuration space through configuration mechanism #1 (ports
//! 0xCF8/0xCFC, dword accesses only), bus 0.
//!
//! Every port access is a VM exit, so enumeration reads one dword per
//! device (vendor/device ID) plus the header type of present devices.

use crate::port::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

// Configuration header offsets.
const ID: u8 = 0x00;
const COMMAND: u8 = 0x04;
const HEADER: u8 = 0x0c;
const BAR0: u8 = 0x10;
const CAP_PTR: u8 = 0x34;

/// Status register bit: a capability list is present.
const STATUS_CAP_LIST: u32 = 1 << 4;
/// Header type bit: the device has several functions.
const MULTIFUNCTION: u32 = 0x80 << 16;

/// Command register bits.
pub const CMD_MEMORY: u16 = 1 << 1;
pub const CMD_BUS_MASTER: u16 = 1 << 2;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;

/// A function on bus 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    pub dev: u8,
    pub func: u8,
}

impl Function {
    fn address(self, off: u8) -> u32 {
        0x8000_0000
            | (u32::from(self.dev) << 11)
            | (u32::from(self.func) << 8)
            | u32::from(off & 0xfc)
    }

    /// Reads the dword at `off` (rounded down to a dword boundary).
    pub fn read32(self, off: u8) -> u32 {
        // SAFETY: mechanism #1: selecting a register and reading it has no
        // effect beyond the configuration space of this function.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(off));
            inl(CONFIG_DATA)
        }
    }

    /// Writes the dword at `off` (rounded down to a dword boundary).
    ///
    /// # Safety
    ///
    /// The caller vouches for the effect on the device (e.g. enabling bus
    /// mastering lets it DMA into RAM).
    pub unsafe fn write32(self, off: u8, value: u32) {
        // SAFETY: the caller vouches for the effect of the write.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(off));
            outl(CONFIG_DATA, value);
        }
    }

    /// Reads the byte at `off`.
    pub fn read8(self, off: u8) -> u8 {
        (self.read32(off) >> (8 * (off & 3))) as u8
    }

    /// Vendor ID (low half) and device ID (high half).
    pub fn id(self) -> u32 {
        self.read32(ID)
    }

    /// Sets bits in the command register. The status half of the dword is
    /// written as zero, which leaves its write-1-to-clear bits alone.
    ///
    /// # Safety
    ///
    /// As for [`Function::write32`].
    pub unsafe fn enable(self, bits: u16) {
        let cmd = self.read32(COMMAND) as u16 | bits;
        // SAFETY: forwarded to the caller.
        unsafe { self.write32(COMMAND, u32::from(cmd)) };
    }

    /// Clears bits in the command register (the status half as in
    /// [`Function::enable`]).
    ///
    /// # Safety
    ///
    /// As for [`Function::write32`].
    pub unsafe fn disable(self, bits: u16) {
        let cmd = self.read32(COMMAND) as u16 & !bits;
        // SAFETY: forwarded to the caller.
        unsafe { self.write32(COMMAND, u32::from(cmd)) };
    }

    /// The capabilities as `(offset, id)`, following the list from the
    /// capabilities pointer. Stops after 48 entries (the most that fit in
    /// 192 bytes) so a looping list cannot hang the guest.
    pub fn capabilities(self) -> Capabilities {
        let next = if self.read32(COMMAND) & (STATUS_CAP_LIST << 16) != 0 {
            self.read8(CAP_PTR) & 0xfc
        } else {
            0
        };
        Capabilities {
            func: self,
            next,
            left: 48,
        }
    }

    /// The address of memory BAR `index` (64-bit BARs span two registers).
    pub fn bar(self, index: u8) -> Result<u64, BarError> {
        if index > 5 {
            return Err(BarError::BadIndex);
        }
        let low = self.read32(BAR0 + 4 * index);
        if low & 1 != 0 {
            return Err(BarError::Io);
        }
        let addr = match (low >> 1) & 3 {
            0 => u64::from(low & !0xf),
            2 if index < 5 => {
                let high = self.read32(BAR0 + 4 * (index + 1));
                u64::from(low & !0xf) | (u64::from(high) << 32)
            }
            _ => return Err(BarError::BadType),
        };
        if addr == 0 {
            return Err(BarError::Unassigned);
        }
        Ok(addr)
    }
}

/// Why a BAR cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarError {
    BadIndex,
    /// An I/O BAR where memory was needed.
    Io,
    /// Reserved type, or a 64-bit BAR in the last slot.
    BadType,
    /// Address 0: nobody assigned it.
    Unassigned,
}

impl BarError {
    pub fn describe(self) -> &'static str {
        match self {
            BarError::BadIndex => "bad BAR index",
            BarError::Io => "I/O BAR where a memory BAR is needed",
            BarError::BadType => "bad BAR type",
            BarError::Unassigned => "BAR not assigned (address 0)",
        }
    }
}

/// Iterator over a function's capability list.
pub struct Capabilities {
    func: Function,
    next: u8,
    left: u8,
}

impl Iterator for Capabilities {
    type Item = (u8, u8);

    fn next(&mut self) -> Option<(u8, u8)> {
        if self.next < 0x40 || self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.next;
        let head = self.func.read32(at);
        self.next = (head >> 8) as u8 & 0xfc;
        Some((at, head as u8))
    }
}

/// Present functions of bus 0 in device/function order, as `(function,
/// vendor|device << 16)`. Function 0 decides whether 1..7 are probed.
pub fn functions() -> impl Iterator<Item = (Function, u32)> {
    (0u8..32).flat_map(|dev| {
        let f0 = Function { dev, func: 0 };
        let id0 = f0.id();
        let count = if id0 as u16 == 0xffff {
            0
        } else if f0.read32(HEADER) & MULTIFUNCTION != 0 {
            8
        } else {
            1
        };
        (0..count).filter_map(move |func| {
            let f = Function { dev, func };
            let id = if func == 0 { id0 } else { f.id() };
            (id as u16 != 0xffff).then_some((f, id))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_address() {
        let f = Function { dev: 3, func: 1 };
        assert_eq!(f.address(0x10), 0x8000_1910);
        assert_eq!(f.address(0x13), 0x8000_1910);
        let f = Function { dev: 31, func: 7 };
        assert_eq!(f.address(0xfc), 0x8000_fffc);
    }
}
