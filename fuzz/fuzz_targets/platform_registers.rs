//! Guest-writable platform registers under arbitrary guest accesses: a PCI
//! function's configuration space (BARs, a capability, the command
//! register), the split irqchip's IOAPIC register window and the MSI
//! messages its entries become, and the ACPI power/reset/GED registers.
//! None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::devices::acpi_pm::{AcpiPmRegs, ACPI_PM_LEN, ACPI_PM_PORT};
use vmm::devices::ioapic::{entry_message, IoapicRegs};
use vmm::pci::{BarKind, PciConfigSpace, PciIdentity};

fuzz_target!(|input: &[u8]| {
    let mut cfg = PciConfigSpace::new(PciIdentity {
        vendor: 0x1af4,
        device: 0x1042,
        subsystem_vendor: 0x1af4,
        subsystem: 0x1100,
        class: 0x01,
        subclass: 0x80,
        prog_if: 0,
        revision: 1,
    });
    cfg.add_bar(
        0,
        0x4000,
        BarKind::Mem64 {
            prefetchable: false,
        },
    );
    cfg.add_bar(2, 0x1000, BarKind::Mem32);
    cfg.add_capability(
        0x11,
        &[0x07, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x30, 0x00, 0x00],
        &[0x00, 0xc0],
    );
    let mut ioapic = IoapicRegs::default();
    let mut pm = AcpiPmRegs::default();
    for op in input.chunks_exact(8) {
        let value = u32::from_le_bytes([op[4], op[5], op[6], op[7]]);
        match op[0] % 4 {
            0 => {
                let offset = u16::from_le_bytes([op[1], op[2]]) % 0x1000;
                let len = [1usize, 2, 4][usize::from(op[3] % 3)];
                if op[3] & 0x80 != 0 {
                    let mut b = [0u8; 4];
                    cfg.read(offset, &mut b[..len]);
                } else {
                    cfg.write(offset, &value.to_le_bytes()[..len]);
                }
                let _ = cfg.decoded_bars();
                let _ = cfg.bar_requests();
            }
            1 => {
                let offset = u64::from(op[1]) & 0x1f;
                if op[2] & 1 != 0 {
                    let _ = ioapic.read(offset);
                } else if let Some(pin) = ioapic.write(offset, value) {
                    let _ = ioapic.entry(pin).and_then(entry_message);
                }
            }
            2 => {
                let port = ACPI_PM_PORT + u16::from(op[1]) % ACPI_PM_LEN;
                if op[2] & 1 != 0 {
                    let _ = pm.read(port);
                } else {
                    let _ = pm.write(port, op[4]);
                }
            }
            _ => {
                let _ = pm.raise(op[1]);
            }
        }
    }
});
