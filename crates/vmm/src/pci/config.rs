//! A type-0 PCI configuration space: identity registers, the command
//! register, BARs with sizing, and a capability list. Devices keep one and
//! intercept the registers they emulate themselves.

use super::BarRange;

pub const PCI_VENDOR_ID: u16 = 0x00;
pub const PCI_COMMAND: u16 = 0x04;
pub const PCI_STATUS: u16 = 0x06;
pub const PCI_BAR0: u16 = 0x10;
pub const PCI_CAPABILITY_LIST: u16 = 0x34;
pub const PCI_INTERRUPT_LINE: u16 = 0x3c;
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAP_LIST: u16 = 1 << 4;
const CONFIG_SIZE: usize = 4096;
const FIRST_CAP: usize = 0x40;
const BARS: usize = 6;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Mem32,
    /// A 64-bit BAR; the next BAR slot holds the upper half.
    Mem64 {
        prefetchable: bool,
    },
}

#[derive(Clone, Copy, Debug, Default)]
struct Bar {
    size: u64,
    kind: Option<BarKind>,
    addr: u64,
}

/// Identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct PciIdentity {
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
}

/// What a snapshot keeps of a configuration space: every byte as the
/// guest sees it and each BAR's address.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PciConfigState {
    pub bytes: Vec<u8>,
    pub bar_addrs: Vec<u64>,
}

/// Configuration space bytes plus per-byte write masks.
pub struct PciConfigSpace {
    bytes: Vec<u8>,
    writable: Vec<u8>,
    bars: [Bar; BARS],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl PciConfigSpace {
    pub fn new(id: PciIdentity) -> Self {
        let mut s = PciConfigSpace {
            bytes: vec![0; CONFIG_SIZE],
            writable: vec![0; CONFIG_SIZE],
            bars: [Bar::default(); BARS],
            next_cap: FIRST_CAP,
            last_cap: None,
        };
        s.set_u16(0x00, id.vendor);
        s.set_u16(0x02, id.device);
        s.bytes[0x08] = id.revision;
        s.bytes[0x09] = id.prog_if;
        s.bytes[0x0a] = id.subclass;
        s.bytes[0x0b] = id.class;
        s.set_u16(0x2c, id.subsystem_vendor);
        s.set_u16(0x2e, id.subsystem);
        let cmd =
            (COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE).to_le_bytes();
        s.writable[PCI_COMMAND as usize] = cmd[0];
        s.writable[PCI_COMMAND as usize + 1] = cmd[1];
        s.writable[PCI_INTERRUPT_LINE as usize] = 0xff;
        s
    }

    fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn u16_at(&self, off: u16) -> u16 {
        let o = usize::from(off);
        u16::from_le_bytes([self.bytes[o], self.bytes[o + 1]])
    }

    pub fn u32_at(&self, off: u16) -> u32 {
        let o = usize::from(off);
        u32::from_le_bytes(self.bytes[o..o + 4].try_into().unwrap())
    }

    /// Declares memory BAR `index` of `size` bytes (a power of two, at
    /// least 16).
    pub fn add_bar(&mut self, index: u8, size: u64, kind: BarKind) {
        let i = usize::from(index);
        assert!(size.is_power_of_two() && size >= 16, "BAR size {size:#x}");
        assert!(i < BARS && (kind == BarKind::Mem32 || i + 1 < BARS));
        self.bars[i] = Bar {
            size,
            kind: Some(kind),
            addr: 0,
        };
        self.refresh_bar_bytes(i);
    }

    fn refresh_bar_bytes(&mut self, i: usize) {
        let bar = self.bars[i];
        let Some(kind) = bar.kind else { return };
        let flags: u32 = match kind {
            BarKind::Mem32 => 0,
            BarKind::Mem64 { prefetchable } => 0x4 | if prefetchable { 0x8 } else { 0 },
        };
        let off = usize::from(PCI_BAR0) + i * 4;
        let lo = (bar.addr as u32 & !0xf) | flags;
        self.bytes[off..off + 4].copy_from_slice(&lo.to_le_bytes());
        if let BarKind::Mem64 { .. } = kind {
            self.bytes[off + 4..off + 8].copy_from_slice(&((bar.addr >> 32) as u32).to_le_bytes());
        }
    }

    /// Sets BAR `index`'s address (initial placement by the VMM).
    pub fn set_bar_addr(&mut self, index: u8, addr: u64) {
        let i = usize::from(index);
        let size = self.bars[i].size;
        self.bars[i].addr = addr & !(size - 1);
        self.refresh_bar_bytes(i);
    }

    /// The declared memory BARs: (index, size, 64-bit).
    pub fn bar_requests(&self) -> Vec<(u8, u64, bool)> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                b.kind
                    .map(|k| (i as u8, b.size, matches!(k, BarKind::Mem64 { .. })))
            })
            .collect()
    }

    /// Memory BARs decoded now: Memory Space Enable set and an address
    /// programmed that does not wrap.
    pub fn decoded_bars(&self) -> Vec<BarRange> {
        if self.u16_at(PCI_COMMAND) & COMMAND_MEMORY == 0 {
            return Vec::new();
        }
        self.bars
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                b.kind.is_some() && b.addr != 0 && b.addr.checked_add(b.size).is_some()
            })
            .map(|(i, b)| BarRange {
                index: i as u8,
                addr: b.addr,
                size: b.size,
            })
            .collect()
    }

    /// Appends a capability with `id` and `body` (the bytes after the ID
    /// and next pointer); `writable` marks guest-writable bytes of the
    /// body. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> u16 {
        let off = self.next_cap;
        let len = (2 + body.len() + 3) & !3;
        assert!(
            off + len <= 0x100,
            "capabilities overflow the legacy config space"
        );
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + 2 + body.len()].copy_from_slice(body);
        for (i, m) in writable.iter().enumerate() {
            self.writable[off + 2 + i] = *m;
        }
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = off as u8,
            None => {
                self.bytes[usize::from(PCI_CAPABILITY_LIST)] = off as u8;
                let status = self.u16_at(PCI_STATUS) | STATUS_CAP_LIST;
                self.set_u16(usize::from(PCI_STATUS), status);
            }
        }
        self.last_cap = Some(off);
        self.next_cap = off + len;
        off as u16
    }

    /// Reads config space; out-of-range or misaligned reads return ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        let o = usize::from(offset);
        match self.bytes.get(o..o + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    /// The state for a snapshot.
    pub fn state(&self) -> PciConfigState {
        PciConfigState {
            bytes: self.bytes.clone(),
            bar_addrs: self.bars.iter().map(|b| b.addr).collect(),
        }
    }

    /// Loads a saved state into a space built by the same device: its
    /// identity (vendor, device, revision, class, subsystem) must match.
    /// BAR addresses are kept aligned to their BAR's size.
    pub fn set_state(&mut self, state: &PciConfigState) -> Result<(), String> {
        if state.bytes.len() != CONFIG_SIZE || state.bar_addrs.len() != BARS {
            return Err(format!(
                "{} configuration bytes and {} BARs, not {CONFIG_SIZE} and {BARS}",
                state.bytes.len(),
                state.bar_addrs.len()
            ));
        }
        for r in [0x00..0x04, 0x08..0x0c, 0x2c..0x30] {
            if state.bytes[r.clone()] != self.bytes[r.clone()] {
                return Err(format!(
                    "the saved function's identity (bytes {:#x}..{:#x}) is {:02x?}, this one's {:02x?}",
                    r.start,
                    r.end,
                    &state.bytes[r.clone()],
                    &self.bytes[r.clone()]
                ));
            }
        }
        self.bytes.copy_from_slice(&state.bytes);
        for (i, addr) in state.bar_addrs.iter().enumerate() {
            let bar = &mut self.bars[i];
            bar.addr = if bar.kind.is_some() {
                addr & !(bar.size - 1)
            } else {
                0
            };
        }
        Ok(())
    }

    /// Direct access for devices updating their own registers.
    pub fn bytes_mut(&mut self, offset: u16, len: usize) -> &mut [u8] {
        let o = usize::from(offset);
        &mut self.bytes[o..o + len]
    }

    /// Applies a guest write: BAR registers go through sizing logic,
    /// everything else through the write masks.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let o = usize::from(offset);
        if o + data.len() > CONFIG_SIZE {
            return;
        }
        let bar_area = usize::from(PCI_BAR0)..usize::from(PCI_BAR0) + BARS * 4;
        if bar_area.contains(&o) {
            if data.len() == 4 && o % 4 == 0 {
                self.write_bar_dword(
                    (o - usize::from(PCI_BAR0)) / 4,
                    u32::from_le_bytes(data.try_into().unwrap()),
                );
            }
            return;
        }
        for (i, b) in data.iter().enumerate() {
            let m = self.writable[o + i];
            self.bytes[o + i] = (self.bytes[o + i] & !m) | (b & m);
        }
    }

    fn write_bar_dword(&mut self, slot: usize, value: u32) {
        // Is `slot` a BAR's low half, or the high half of a 64-bit BAR?
        if let Some(kind) = self.bars[slot].kind {
            let bar = &mut self.bars[slot];
            let mask = !(bar.size - 1);
            bar.addr = match kind {
                BarKind::Mem32 => u64::from(value) & mask & 0xffff_ffff,
                BarKind::Mem64 { .. } => {
                    ((bar.addr & !0xffff_ffff) | u64::from(value & !0xf)) & mask
                }
            };
            self.refresh_bar_bytes(slot);
        } else if slot > 0 && matches!(self.bars[slot - 1].kind, Some(BarKind::Mem64 { .. })) {
            let bar = &mut self.bars[slot - 1];
            let mask = !(bar.size - 1);
            bar.addr = ((bar.addr & 0xffff_ffff) | (u64::from(value) << 32)) & mask;
            self.refresh_bar_bytes(slot - 1);
        }
        // Unimplemented BARs read as zero and ignore writes.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> PciConfigSpace {
        PciConfigSpace::new(PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            subsystem_vendor: 0x1af4,
            subsystem: 2,
            class: 1,
            subclass: 0,
            prog_if: 0,
            revision: 1,
        })
    }

    fn rd32(s: &PciConfigSpace, off: u16) -> u32 {
        let mut b = [0u8; 4];
        s.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn bar_sizing_returns_the_size_mask_and_flags() {
        let mut s = space();
        s.add_bar(
            0,
            0x4000,
            BarKind::Mem64 {
                prefetchable: false,
            },
        );
        s.add_bar(2, 0x1000, BarKind::Mem32);
        s.write(0x10, &0xffff_ffffu32.to_le_bytes());
        s.write(0x14, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(rd32(&s, 0x10), 0xffff_c004);
        assert_eq!(rd32(&s, 0x14), 0xffff_ffff);
        s.write(0x18, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(rd32(&s, 0x18), 0xffff_f000);
        // Unimplemented BARs stay zero.
        s.write(0x20, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(rd32(&s, 0x20), 0);
    }

    #[test]
    fn bars_decode_only_with_memory_space_enabled() {
        let mut s = space();
        s.add_bar(
            0,
            0x4000,
            BarKind::Mem64 {
                prefetchable: false,
            },
        );
        s.write(0x10, &0xd000_0000u32.to_le_bytes());
        s.write(0x14, &1u32.to_le_bytes());
        assert!(s.decoded_bars().is_empty());
        s.write(PCI_COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(
            s.decoded_bars(),
            vec![BarRange {
                index: 0,
                addr: 0x1_d000_0000,
                size: 0x4000
            }]
        );
    }

    #[test]
    fn capabilities_chain_and_read_only_bytes_hold() {
        let mut s = space();
        let a = s.add_capability(0x11, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[0, 0xc0]);
        let b = s.add_capability(0x09, &[14, 1, 0, 0], &[]);
        assert_eq!(s.u16_at(PCI_STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
        let mut p = [0u8];
        s.read(PCI_CAPABILITY_LIST, &mut p);
        assert_eq!(u16::from(p[0]), a);
        s.read(a + 1, &mut p);
        assert_eq!(u16::from(p[0]), b);
        s.write(a + 2, &[0xff, 0xff]);
        assert_eq!(s.u16_at(a + 2), 0xc000);
        s.write(0x00, &[0, 0, 0, 0]);
        assert_eq!(s.u16_at(0), 0x1af4);
    }
}
