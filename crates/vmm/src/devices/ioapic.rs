//! A userspace IOAPIC for the split irqchip (`--irqchip split`): KVM keeps
//! the local APICs, and each IOAPIC pin becomes an MSI route that follows
//! the guest's redirection entry. A device raises a pin by writing its
//! irqfd on GSI = pin; with the route in place KVM delivers the interrupt
//! straight to the local APIC, without passing through this code.
//!
//! The register state is a pure state machine ([`IoapicRegs`]); the bus
//! adapter ([`Ioapic`]) turns changed entries into route updates.
//!
//! Level-triggered entries are routed with the MSI level bit, which puts
//! their vector in KVM's EOI-exit bitmap: the guest's EOI of such a vector
//! comes back as `KVM_EXIT_IOAPIC_EOI`, and the router resamples the level
//! sources on the pin (PCI INTx: the device unmasks and re-raises the line
//! if it is still asserted). Changing an entry to deliverable resamples
//! its pin too (see `interrupts`).
//!
//! The remote-IRR bit is not emulated (it reads 0): setting it would need
//! this code to see each delivery, but deliveries go from the source's
//! irqfd to the local APIC without passing through userspace. It is not
//! needed to keep a level interrupt from being delivered again before its
//! EOI: a level source signals its irqfd once per assertion and then stays
//! masked (VFIO's automasked INTx) until it is resampled, which happens
//! only on the EOI or on the guest's reprogramming of the entry. A guest
//! that polls remote IRR (Linux does, when it moves a level interrupt)
//! sees "not pending" and carries on.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::interrupts::{InterruptRouter, MsiMessage, IOAPIC_PINS};

/// Register window size of the IOAPIC's MMIO range.
pub const IOAPIC_MMIO_LEN: u64 = 0x1000;
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARB: u32 = 0x02;
const REG_TABLE: u32 = 0x10;
/// Version 0x11 (as QEMU's and KVM's), highest entry index in bits 16-23.
const VERSION: u32 = 0x11 | ((IOAPIC_PINS - 1) << 16);
const ENTRY_MASKED: u64 = 1 << 16;
const ENTRY_REMOTE_IRR: u64 = 1 << 14;
const ENTRY_DELIVERY_STATUS: u64 = 1 << 12;
/// Bits of an entry the guest can write.
const ENTRY_WRITABLE: u64 = !(ENTRY_REMOTE_IRR | ENTRY_DELIVERY_STATUS) & 0xff00_0000_0001_ffff;

/// The IOAPIC's registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoapicRegs {
    select: u32,
    id: u32,
    entries: [u64; IOAPIC_PINS as usize],
}

impl Default for IoapicRegs {
    fn default() -> Self {
        IoapicRegs {
            select: 0,
            id: 0,
            // Every pin comes out of reset masked.
            entries: [ENTRY_MASKED; IOAPIC_PINS as usize],
        }
    }
}

/// The MSI message a redirection entry stands for, or None if masked.
pub fn entry_message(entry: u64) -> Option<MsiMessage> {
    if entry & ENTRY_MASKED != 0 {
        return None;
    }
    let vector = (entry & 0xff) as u32;
    let delivery = ((entry >> 8) & 0x7) as u32;
    let logical = (entry >> 11) & 1;
    let level = ((entry >> 15) & 1) as u32;
    let dest = (entry >> 56) & 0xff;
    // Lowest-priority delivery sets the redirection hint.
    let hint = u64::from(delivery == 1);
    Some(MsiMessage {
        address: 0xfee0_0000 | (dest << 12) | (hint << 3) | (logical << 2),
        data: vector | (delivery << 8) | (level << 15) | (level << 14),
    })
}

impl IoapicRegs {
    /// A 32-bit read of the register window.
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            IOREGSEL => self.select,
            IOWIN => match self.select {
                REG_ID | REG_ARB => self.id,
                REG_VERSION => VERSION,
                r if (REG_TABLE..REG_TABLE + 2 * IOAPIC_PINS).contains(&r) => {
                    let e = self.entries[((r - REG_TABLE) / 2) as usize];
                    if r % 2 == 0 {
                        e as u32
                    } else {
                        (e >> 32) as u32
                    }
                }
                _ => 0,
            },
            _ => 0,
        }
    }

    /// A 32-bit write; returns the pin whose entry changed, if any.
    pub fn write(&mut self, offset: u64, value: u32) -> Option<u32> {
        match offset {
            IOREGSEL => self.select = value & 0xff,
            IOWIN => match self.select {
                REG_ID => self.id = value & 0x0f00_0000,
                r if (REG_TABLE..REG_TABLE + 2 * IOAPIC_PINS).contains(&r) => {
                    let pin = (r - REG_TABLE) / 2;
                    let e = &mut self.entries[pin as usize];
                    let old = *e;
                    let new = if r % 2 == 0 {
                        (old & !0xffff_ffff) | u64::from(value)
                    } else {
                        (old & 0xffff_ffff) | (u64::from(value) << 32)
                    };
                    *e = (new & ENTRY_WRITABLE) | (old & !ENTRY_WRITABLE);
                    return (*e != old).then_some(pin);
                }
                _ => {}
            },
            _ => {}
        }
        None
    }

    pub fn entry(&self, pin: u32) -> Option<u64> {
        self.entries.get(pin as usize).copied()
    }
}

/// The IOAPIC on the MMIO bus, programming pin routes.
pub struct Ioapic {
    regs: IoapicRegs,
    router: Arc<InterruptRouter>,
}

impl Ioapic {
    pub fn new(router: Arc<InterruptRouter>) -> Ioapic {
        Ioapic {
            regs: IoapicRegs::default(),
            router,
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct IoapicSection {
    select: u32,
    id: u32,
    entries: Vec<u64>,
}

/// The registers; restoring routes every pin as its entry says (the
/// routes are rebuilt, not stored).
impl crate::snapshot::Snapshot for Ioapic {
    fn save(&mut self) -> Result<Vec<u8>, crate::snapshot::SnapshotError> {
        crate::snapshot::encode(
            "ioapic",
            &IoapicSection {
                select: self.regs.select,
                id: self.regs.id,
                entries: self.regs.entries.to_vec(),
            },
        )
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), crate::snapshot::SnapshotError> {
        let s: IoapicSection = crate::snapshot::decode("ioapic", state)?;
        let entries: [u64; IOAPIC_PINS as usize] =
            s.entries.try_into().map_err(|e: Vec<u64>| {
                crate::snapshot::SnapshotError::mismatch(
                    "ioapic",
                    format!("{} redirection entries, not {IOAPIC_PINS}", e.len()),
                )
            })?;
        self.regs = IoapicRegs {
            select: s.select & 0xff,
            id: s.id & 0x0f00_0000,
            entries,
        };
        for pin in 0..IOAPIC_PINS {
            let msg = self.regs.entry(pin).and_then(entry_message);
            self.router.set_pin_route(pin, msg).map_err(|e| {
                crate::snapshot::SnapshotError::Apply {
                    what: "ioapic".into(),
                    detail: format!("routing pin {pin}: {e}"),
                }
            })?;
        }
        Ok(())
    }
}

impl BusDevice for Ioapic {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        // 32-bit accesses only; anything else reads as zero.
        if data.len() == 4 {
            data.copy_from_slice(&self.regs.read(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if let Some(pin) = self.regs.write(offset, u32::from_le_bytes(bytes)) {
            let msg = self.regs.entry(pin).and_then(entry_message);
            if let Err(e) = self.router.set_pin_route(pin, msg) {
                log::warn!("IOAPIC pin {pin}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes an entry as Linux does (high dword, then low, which holds
    /// the mask bit); returns the pins that changed, once each.
    fn write_entry(r: &mut IoapicRegs, pin: u32, e: u64) -> Vec<u32> {
        let mut changed = Vec::new();
        r.write(IOREGSEL, REG_TABLE + 2 * pin + 1);
        changed.extend(r.write(IOWIN, (e >> 32) as u32));
        r.write(IOREGSEL, REG_TABLE + 2 * pin);
        changed.extend(r.write(IOWIN, e as u32));
        changed.dedup();
        changed
    }

    #[test]
    fn identifies_itself_and_starts_masked() {
        let mut r = IoapicRegs::default();
        r.write(IOREGSEL, REG_VERSION);
        assert_eq!(r.read(IOWIN), 0x0017_0011);
        r.write(IOREGSEL, REG_ID);
        r.write(IOWIN, 0x0200_0000);
        assert_eq!(r.read(IOWIN), 0x0200_0000);
        for pin in 0..IOAPIC_PINS {
            assert_eq!(entry_message(r.entry(pin).unwrap()), None);
        }
    }

    #[test]
    fn entries_become_msi_messages() {
        let mut r = IoapicRegs::default();
        // Pin 4: vector 0x34, fixed, physical, edge, unmasked, to APIC 3.
        assert_eq!(write_entry(&mut r, 4, (3u64 << 56) | 0x34), vec![4]);
        assert_eq!(
            entry_message(r.entry(4).unwrap()),
            Some(MsiMessage {
                address: 0xfee0_3000,
                data: 0x34
            })
        );
        // Level, logical, lowest priority.
        write_entry(
            &mut r,
            9,
            (1u64 << 56) | (1 << 15) | (1 << 11) | (1 << 8) | 0x51,
        );
        assert_eq!(
            entry_message(r.entry(9).unwrap()),
            Some(MsiMessage {
                address: 0xfee0_100c,
                data: 0xc151
            })
        );
        // Masking takes the route away; rewriting the same value changes
        // nothing.
        assert_eq!(
            write_entry(&mut r, 4, (3u64 << 56) | ENTRY_MASKED | 0x34),
            vec![4]
        );
        assert_eq!(entry_message(r.entry(4).unwrap()), None);
        assert!(write_entry(&mut r, 4, (3u64 << 56) | ENTRY_MASKED | 0x34).is_empty());
        // Read-only bits stay as they were.
        write_entry(&mut r, 5, ENTRY_REMOTE_IRR | ENTRY_DELIVERY_STATUS | 0x20);
        assert_eq!(
            r.entry(5).unwrap() & (ENTRY_REMOTE_IRR | ENTRY_DELIVERY_STATUS),
            0
        );
    }

    #[test]
    fn out_of_range_registers_are_harmless() {
        let mut r = IoapicRegs::default();
        let before = r.clone();
        for sel in [0x03, 0x0f, REG_TABLE + 2 * IOAPIC_PINS, 0xff] {
            r.write(IOREGSEL, sel);
            assert_eq!(r.write(IOWIN, 0xffff_ffff), None);
            assert_eq!(r.read(IOWIN), 0);
        }
        assert_eq!(r.write(0x20, 1), None);
        assert_eq!(r.read(0x40), 0);
        r.write(IOREGSEL, 0);
        assert_eq!(r.entries, before.entries);
    }
}
