//! The assigned function's configuration space as the device reports it,
//! checked before anything is built on it: identity, header type, BAR
//! types and sizes, the capability chain (walked with a bound, so a chain
//! that loops is an error), and the MSI/MSI-X capabilities' layout. Also
//! the emulated MSI capability.
//!
//! The guest sees the capabilities we can support (MSI, MSI-X, power
//! management, vendor-specific) linked in the device's order; every other
//! capability (PCI Express, ...) is unlinked, and the extended space above
//! 0x100 reads as zero.

use vmm::interrupts::MsiMessage;
use vmm::pci::msix::msi_message;
use vmm::pci::BarKind;

/// The VFIO PCI region that holds configuration space.
pub const CONFIG_REGION: u32 = 7;
/// The part of configuration space we read and emulate.
pub const CONFIG_SIZE: usize = 256;
pub const CAP_ID_PM: u8 = 0x01;
pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_VENDOR: u8 = 0x09;
pub const CAP_ID_PCIE: u8 = 0x10;
pub const CAP_ID_MSIX: u8 = 0x11;
/// Capabilities the guest may see.
const KEPT_CAPS: [u8; 4] = [CAP_ID_PM, CAP_ID_MSI, CAP_ID_VENDOR, CAP_ID_MSIX];
/// At most this many capabilities fit in 0x40..0x100 (4 bytes each).
const MAX_CAPS: usize = 48;
const STATUS_CAP_LIST: u8 = 1 << 4;
/// Bytes of the MSI-X capability.
pub const MSIX_CAP_LEN: u16 = 12;
/// Bytes of an MSI-X table entry and of a PBA qword.
const MSIX_ENTRY: u64 = 16;

/// A configuration space the device model cannot accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("no function answers (vendor ID {vendor:#06x})")]
    NoFunction { vendor: u16 },
    #[error("header type {header:#04x} is not a type-0 (endpoint) function")]
    NotEndpoint { header: u8 },
    #[error("capability pointer {ptr:#04x} at {at:#04x} points outside 0x40-0xfc")]
    CapPointer { at: u16, ptr: u8 },
    #[error("the capability list loops (capability at {ptr:#04x} reached twice)")]
    CapLoop { ptr: u8 },
    #[error("capability {id:#04x} at {at:#04x} runs past the configuration space")]
    CapTooLong { id: u8, at: u8 },
    #[error(
        "BAR{index} is {size:#x} bytes: a memory BAR must be a power of two of at least 16 bytes"
    )]
    BarSize { index: u8, size: u64 },
    #[error("BAR{index} is a 64-bit BAR in the last BAR slot")]
    Bar64AtEnd { index: u8 },
    #[error("BAR{index} is a memory BAR of an unknown type {kind}")]
    BarType { index: u8, kind: u32 },
    #[error(
        "the MSI-X {what} ({len:#x} bytes at {offset:#x} of BAR{bir}) is not inside a memory BAR"
    )]
    MsixOutsideBar {
        what: &'static str,
        bir: u8,
        offset: u64,
        len: u64,
    },
}

fn u16_at(c: &[u8; CONFIG_SIZE], off: usize) -> u16 {
    u16::from_le_bytes([c[off], c[off + 1]])
}

fn u32_at(c: &[u8; CONFIG_SIZE], off: usize) -> u32 {
    u32::from_le_bytes([c[off], c[off + 1], c[off + 2], c[off + 3]])
}

/// One capability in the device's chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub id: u8,
    pub offset: u8,
}

/// Where the MSI-X table and PBA are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    pub cap: u8,
    pub count: u16,
    pub table_bir: u8,
    pub table_offset: u64,
    pub pba_bir: u8,
    pub pba_offset: u64,
}

impl MsixLayout {
    pub fn table_len(&self) -> u64 {
        u64::from(self.count) * MSIX_ENTRY
    }

    pub fn pba_len(&self) -> u64 {
        u64::from(self.count).div_ceil(64) * 8
    }
}

/// The MSI capability's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiLayout {
    pub cap: u8,
    pub is64: bool,
    pub maskable: bool,
}

impl MsiLayout {
    fn data_at(&self) -> u16 {
        if self.is64 {
            12
        } else {
            8
        }
    }

    fn mask_at(&self) -> u16 {
        self.data_at() + 4
    }

    /// Bytes of the capability.
    pub fn size(&self) -> u16 {
        match (self.is64, self.maskable) {
            (false, false) => 10,
            (true, false) => 14,
            (false, true) => 20,
            (true, true) => 24,
        }
    }
}

/// One memory BAR of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarLayout {
    pub index: u8,
    pub size: u64,
    pub kind: BarKind,
}

/// The function's checked layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Every capability in chain order.
    pub caps: Vec<Capability>,
    /// The ones the guest sees, in chain order.
    pub kept: Vec<Capability>,
    pub msix: Option<MsixLayout>,
    pub msi: Option<MsiLayout>,
    pub bars: Vec<BarLayout>,
    /// I/O BARs, which are not offered to the guest.
    pub io_bars: Vec<u8>,
}

impl Layout {
    /// The capability pointer the guest sees.
    pub fn head(&self) -> u8 {
        self.kept.first().map_or(0, |c| c.offset)
    }

    /// The kept capability starting at `offset`, and the next pointer the
    /// guest sees for it.
    pub fn kept_at(&self, offset: u8) -> Option<(Capability, u8)> {
        let i = self.kept.iter().position(|c| c.offset == offset)?;
        Some((self.kept[i], self.kept.get(i + 1).map_or(0, |c| c.offset)))
    }

    /// The kept capability whose first byte is at or below `offset` and
    /// closest to it (the one a byte belongs to, for kept capabilities
    /// the guest can reach).
    pub fn kept_containing(&self, offset: u16) -> Option<Capability> {
        self.kept
            .iter()
            .filter(|c| u16::from(c.offset) <= offset)
            .max_by_key(|c| c.offset)
            .copied()
    }

    pub fn bar(&self, index: u8) -> Option<&BarLayout> {
        self.bars.iter().find(|b| b.index == index)
    }
}

/// Walks the capability chain; a pointer outside 0x40..0xfc or a loop is
/// an error.
pub fn walk_capabilities(cfg: &[u8; CONFIG_SIZE]) -> Result<Vec<Capability>, ConfigError> {
    let mut caps: Vec<Capability> = Vec::new();
    if cfg[0x06] & STATUS_CAP_LIST == 0 {
        return Ok(caps);
    }
    let mut at: u16 = 0x34;
    let mut ptr = cfg[0x34] & 0xfc;
    while ptr != 0 {
        if ptr < 0x40 {
            return Err(ConfigError::CapPointer { at, ptr });
        }
        if caps.iter().any(|c| c.offset == ptr) || caps.len() >= MAX_CAPS {
            return Err(ConfigError::CapLoop { ptr });
        }
        let id = cfg[usize::from(ptr)];
        caps.push(Capability { id, offset: ptr });
        at = u16::from(ptr) + 1;
        ptr = cfg[usize::from(at)] & 0xfc;
    }
    Ok(caps)
}

/// Reads the memory BARs from the raw BAR registers and the regions'
/// sizes (`sizes[i]` is region `i`'s size; 0 means no BAR).
fn parse_bars(
    cfg: &[u8; CONFIG_SIZE],
    sizes: &[u64; 6],
) -> Result<(Vec<BarLayout>, Vec<u8>), ConfigError> {
    let mut bars = Vec::new();
    let mut io = Vec::new();
    let mut i = 0u8;
    while i < 6 {
        let raw = u32_at(cfg, 0x10 + 4 * usize::from(i));
        let size = sizes[usize::from(i)];
        if size == 0 {
            i += 1;
            continue;
        }
        if raw & 1 != 0 {
            io.push(i);
            i += 1;
            continue;
        }
        if !size.is_power_of_two() || size < 16 {
            return Err(ConfigError::BarSize { index: i, size });
        }
        let prefetchable = raw & 0x8 != 0;
        let kind = match (raw >> 1) & 3 {
            0 => BarKind::Mem32,
            2 if i < 5 => BarKind::Mem64 { prefetchable },
            2 => return Err(ConfigError::Bar64AtEnd { index: i }),
            kind => return Err(ConfigError::BarType { index: i, kind }),
        };
        if kind == BarKind::Mem32 && size > 1 << 31 {
            return Err(ConfigError::BarSize { index: i, size });
        }
        bars.push(BarLayout {
            index: i,
            size,
            kind,
        });
        i += if kind == BarKind::Mem32 { 1 } else { 2 };
    }
    Ok((bars, io))
}

/// Checks the function's configuration space and region sizes and works
/// out what the guest will see.
pub fn parse(cfg: &[u8; CONFIG_SIZE], bar_sizes: &[u64; 6]) -> Result<Layout, ConfigError> {
    let vendor = u16_at(cfg, 0);
    if vendor == 0xffff || vendor == 0 {
        return Err(ConfigError::NoFunction { vendor });
    }
    let header = cfg[0x0e] & 0x7f;
    if header != 0 {
        return Err(ConfigError::NotEndpoint { header: cfg[0x0e] });
    }
    let caps = walk_capabilities(cfg)?;
    let (bars, io_bars) = parse_bars(cfg, bar_sizes)?;
    let mut kept = Vec::new();
    let mut msix = None;
    let mut msi = None;
    for c in &caps {
        if !KEPT_CAPS.contains(&c.id) {
            continue;
        }
        let off = usize::from(c.offset);
        let len = match c.id {
            CAP_ID_MSIX => MSIX_CAP_LEN,
            CAP_ID_MSI => {
                let ctrl = u16_at(cfg, off + 2);
                MsiLayout {
                    cap: c.offset,
                    is64: ctrl & (1 << 7) != 0,
                    maskable: ctrl & (1 << 8) != 0,
                }
                .size()
            }
            _ => 2,
        };
        if off + usize::from(len) > CONFIG_SIZE {
            return Err(ConfigError::CapTooLong {
                id: c.id,
                at: c.offset,
            });
        }
        // Only the first MSI and MSI-X capability count.
        match c.id {
            CAP_ID_MSIX if msix.is_none() => {
                let ctrl = u16_at(cfg, off + 2);
                let table = u32_at(cfg, off + 4);
                let pba = u32_at(cfg, off + 8);
                msix = Some(MsixLayout {
                    cap: c.offset,
                    count: (ctrl & 0x7ff) + 1,
                    table_bir: (table & 7) as u8,
                    table_offset: u64::from(table & !7),
                    pba_bir: (pba & 7) as u8,
                    pba_offset: u64::from(pba & !7),
                });
            }
            CAP_ID_MSI if msi.is_none() => {
                let ctrl = u16_at(cfg, off + 2);
                msi = Some(MsiLayout {
                    cap: c.offset,
                    is64: ctrl & (1 << 7) != 0,
                    maskable: ctrl & (1 << 8) != 0,
                });
            }
            CAP_ID_MSIX | CAP_ID_MSI => continue,
            _ => {}
        }
        kept.push(*c);
    }
    let layout = Layout {
        caps,
        kept,
        msix,
        msi,
        bars,
        io_bars,
    };
    if let Some(m) = &layout.msix {
        for (what, bir, offset, len) in [
            ("table", m.table_bir, m.table_offset, m.table_len()),
            ("PBA", m.pba_bir, m.pba_offset, m.pba_len()),
        ] {
            let fits = layout
                .bar(bir)
                .is_some_and(|b| offset.checked_add(len).is_some_and(|end| end <= b.size));
            if !fits {
                return Err(ConfigError::MsixOutsideBar {
                    what,
                    bir,
                    offset,
                    len,
                });
            }
        }
    }
    Ok(layout)
}

/// The emulated MSI capability: one vector (Multiple Message Capable 0).
#[derive(Clone, Copy, Debug)]
pub struct MsiState {
    pub layout: MsiLayout,
    control: u16,
    addr_lo: u32,
    addr_hi: u32,
    data: u16,
    mask: bool,
}

const MSI_ENABLE: u16 = 1;

impl MsiState {
    pub fn new(layout: MsiLayout) -> MsiState {
        MsiState {
            layout,
            control: 0,
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            mask: false,
        }
    }

    fn control_value(&self) -> u16 {
        let mut v = self.control & MSI_ENABLE;
        if self.layout.is64 {
            v |= 1 << 7;
        }
        if self.layout.maskable {
            v |= 1 << 8;
        }
        v
    }

    pub fn enabled(&self) -> bool {
        self.control & MSI_ENABLE != 0
    }

    pub fn masked(&self) -> bool {
        self.layout.maskable && self.mask
    }

    /// The message the guest programmed, if it is a valid MSI target.
    pub fn message(&self) -> Option<MsiMessage> {
        let hi = if self.layout.is64 { self.addr_hi } else { 0 };
        msi_message(
            (u64::from(hi) << 32) | u64::from(self.addr_lo),
            u32::from(self.data),
        )
    }

    /// The capability's bytes, `next` as its next pointer.
    pub fn bytes(&self, next: u8) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0] = CAP_ID_MSI;
        b[1] = next;
        b[2..4].copy_from_slice(&self.control_value().to_le_bytes());
        b[4..8].copy_from_slice(&self.addr_lo.to_le_bytes());
        if self.layout.is64 {
            b[8..12].copy_from_slice(&self.addr_hi.to_le_bytes());
        }
        let d = usize::from(self.layout.data_at());
        b[d..d + 2].copy_from_slice(&self.data.to_le_bytes());
        if self.layout.maskable {
            let m = usize::from(self.layout.mask_at());
            b[m] = u8::from(self.mask);
        }
        b
    }

    /// Applies a guest write of `data` at `offset` into the capability;
    /// read-only bytes keep their value.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let mut b = self.bytes(0);
        for (i, v) in data.iter().enumerate() {
            if let Some(slot) = b.get_mut(usize::from(offset) + i) {
                *slot = *v;
            }
        }
        let ctrl = u16::from_le_bytes([b[2], b[3]]);
        self.control = ctrl & MSI_ENABLE;
        self.addr_lo = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) & !3;
        if self.layout.is64 {
            self.addr_hi = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        }
        let d = usize::from(self.layout.data_at());
        self.data = u16::from_le_bytes([b[d], b[d + 1]]);
        if self.layout.maskable {
            self.mask = b[usize::from(self.layout.mask_at())] & 1 != 0;
        }
    }

    /// Back to reset state.
    pub fn reset(&mut self) {
        *self = MsiState::new(self.layout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function like the vfio-user test device: MSI-X at 0x40, MSI at
    /// 0x50, PCIe at 0x70, vendor at 0x60.
    pub(crate) fn test_config() -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..4].copy_from_slice(&0x7256_1234u32.to_le_bytes());
        c[0x06] = STATUS_CAP_LIST;
        c[0x10] = 0; // BAR0: 32-bit memory
        c[0x18] = 0x4; // BAR2: 64-bit memory
        c[0x34] = 0x40;
        c[0x40] = CAP_ID_MSIX;
        c[0x41] = 0x50;
        c[0x42..0x44].copy_from_slice(&7u16.to_le_bytes());
        c[0x44..0x48].copy_from_slice(&(0x2000u32 | 2).to_le_bytes());
        c[0x48..0x4c].copy_from_slice(&(0x3000u32 | 2).to_le_bytes());
        c[0x50] = CAP_ID_MSI;
        c[0x51] = 0x70;
        c[0x52..0x54].copy_from_slice(&0x80u16.to_le_bytes());
        c[0x70] = CAP_ID_PCIE;
        c[0x71] = 0x60;
        c[0x60] = CAP_ID_VENDOR;
        c[0x61] = 0;
        c
    }

    const SIZES: [u64; 6] = [0x1000, 0, 0x4000, 0, 0, 0];

    #[test]
    fn keeps_msi_msix_and_vendor_and_hides_pcie() {
        let l = parse(&test_config(), &SIZES).unwrap();
        assert_eq!(l.caps.len(), 4);
        let kept: Vec<u8> = l.kept.iter().map(|c| c.offset).collect();
        assert_eq!(kept, vec![0x40, 0x50, 0x60]);
        assert_eq!(l.head(), 0x40);
        assert_eq!(l.kept_at(0x50).unwrap().1, 0x60);
        assert_eq!(l.kept_at(0x60).unwrap().1, 0);
        assert!(l.kept_at(0x70).is_none());
        let m = l.msix.unwrap();
        assert_eq!((m.count, m.table_bir, m.table_offset), (8, 2, 0x2000));
        assert_eq!((m.pba_bir, m.pba_offset, m.pba_len()), (2, 0x3000, 8));
        assert_eq!(
            l.msi,
            Some(MsiLayout {
                cap: 0x50,
                is64: true,
                maskable: false
            })
        );
        assert_eq!(
            l.bars,
            vec![
                BarLayout {
                    index: 0,
                    size: 0x1000,
                    kind: BarKind::Mem32
                },
                BarLayout {
                    index: 2,
                    size: 0x4000,
                    kind: BarKind::Mem64 {
                        prefetchable: false
                    }
                }
            ]
        );
    }

    #[test]
    fn refuses_loops_bad_pointers_and_bad_bar_sizes() {
        let mut c = test_config();
        c[0x61] = 0x40;
        assert_eq!(parse(&c, &SIZES), Err(ConfigError::CapLoop { ptr: 0x40 }));
        let mut c = test_config();
        c[0x61] = 0x20;
        assert!(matches!(
            parse(&c, &SIZES),
            Err(ConfigError::CapPointer { ptr: 0x20, .. })
        ));
        assert_eq!(
            parse(&test_config(), &[0x1800, 0, 0x4000, 0, 0, 0]),
            Err(ConfigError::BarSize {
                index: 0,
                size: 0x1800
            })
        );
        assert!(matches!(
            parse(&test_config(), &[8, 0, 0x4000, 0, 0, 0]),
            Err(ConfigError::BarSize { index: 0, .. })
        ));
        // The MSI-X table past its BAR.
        assert!(matches!(
            parse(&test_config(), &[0x1000, 0, 0x2000, 0, 0, 0]),
            Err(ConfigError::MsixOutsideBar { what: "table", .. })
        ));
        let mut c = test_config();
        c[0] = 0xff;
        c[1] = 0xff;
        assert!(matches!(
            parse(&c, &SIZES),
            Err(ConfigError::NoFunction { .. })
        ));
        // A self-loop on the first capability.
        let mut c = test_config();
        c[0x41] = 0x40;
        assert_eq!(parse(&c, &SIZES), Err(ConfigError::CapLoop { ptr: 0x40 }));
    }

    #[test]
    fn no_capability_list_means_no_capabilities() {
        let mut c = test_config();
        c[0x06] = 0;
        let l = parse(&c, &SIZES).unwrap();
        assert!(l.caps.is_empty() && l.kept.is_empty() && l.msix.is_none());
    }

    #[test]
    fn msi_capability_keeps_read_only_bits_and_forms_messages() {
        let mut s = MsiState::new(MsiLayout {
            cap: 0x50,
            is64: true,
            maskable: true,
        });
        // The guest tries to set MMC and MME; only enable sticks.
        s.write(2, &0xffffu16.to_le_bytes());
        assert_eq!(u16::from_le_bytes([s.bytes(0)[2], s.bytes(0)[3]]), 0x181);
        assert!(s.enabled());
        s.write(4, &0xfee0_1003u32.to_le_bytes());
        s.write(12, &0x4041u16.to_le_bytes());
        assert_eq!(
            s.message(),
            Some(MsiMessage {
                address: 0xfee0_1000,
                data: 0x4041
            })
        );
        s.write(4, &0x1234_0000u32.to_le_bytes());
        assert_eq!(s.message(), None, "not an MSI target");
        s.write(16, &[1]);
        assert!(s.masked());
        // ID and next pointer are not writable.
        s.write(0, &[0xaa, 0xbb]);
        assert_eq!(s.bytes(0x60)[0..2], [CAP_ID_MSI, 0x60]);
        s.reset();
        assert!(!s.enabled() && !s.masked());
    }
}
