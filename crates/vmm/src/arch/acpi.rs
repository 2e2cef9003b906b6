//! ACPI tables for x86 guests, built with the rust-vmm `acpi_tables`
//! crate: RSDP, XSDT, a hardware-reduced FADT (sleep control/status and
//! reset registers), a DSDT (PCI host bridge with `_CRS` and `_PRT`, COM1,
//! a GED-driven power button, `_S5_`), a MADT (a local APIC per vCPU, the
//! IOAPIC, interrupt source overrides, LINT1 as NMI) and an MCFG (the
//! ECAM).
//!
//! The tables sit in the BIOS area ([`ACPI_START`], reserved in the e820
//! map), RSDP first, where a legacy scan finds it too; the PVH start info
//! and the Linux boot parameters point at it. Building is pure
//! ([`build_tables`]); [`write_tables`] copies the result into guest
//! memory.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, Name,
    Notify, OpRegion, OpRegionSpace, Package, Path, ResourceTemplate, Scope, Store, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::acpi_pm::{
    GED_GSI, GED_POWER_BUTTON, GED_STATUS_PORT, RESET_PORT, RESET_VALUE, S5_SLEEP_TYPE,
    SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};
use crate::devices::serial::{COM1_GSI, COM1_PORT};
use crate::layout::{APIC_START, IOAPIC_START};

/// Where the RSDP goes; the other tables follow it.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the area the tables may use (the BIOS area ends at 1 MiB).
pub const ACPI_END: u64 = 0x10_0000;

const OEM_ID: [u8; 6] = *b"RINGVM";
const OEM_REVISION: u32 = 1;
/// The SCI's ISA IRQ as the FADT names it. A hardware-reduced platform
/// has no SCI; Linux still programs this line from the FADT, so it is one
/// nothing else uses, with an override saying level, active high.
const SCI_IRQ: u8 = 9;

/// Errors from placing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({size} bytes) do not fit below 1 MiB")]
    TooLarge { size: u64 },
    #[error("writing the ACPI tables to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// The PCI host bridge's resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHost {
    /// ECAM base for bus 0 (one bus).
    pub ecam: u64,
    /// The 32-bit MMIO window, `[start, end)`.
    pub mmio32: (u64, u64),
    /// The 64-bit MMIO window, `[start, end)`.
    pub mmio64: (u64, u64),
}

/// A PCI INTx line wired to an IOAPIC input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntxRoute {
    pub slot: u8,
    /// 0 = INTA# .. 3 = INTD#.
    pub pin: u8,
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    pub cpus: u8,
    /// The in-kernel irqchip has the legacy PICs (MADT PCAT_COMPAT).
    pub pic: bool,
    /// COM1 is present.
    pub serial: bool,
    pub pci: Option<PciHost>,
    pub intx: Vec<IntxRoute>,
}

/// One table to copy: guest address and bytes.
pub type Placed = (u64, Vec<u8>);

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"RINGFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton);
    b.sci_int = u16::from(SCI_IRQ).into();
    b.reset_reg = io_gas(RESET_PORT);
    b.reset_value = RESET_VALUE;
    b.sleep_control_reg = io_gas(SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io_gas(SLEEP_STATUS_PORT);
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"RINGVM\0\0").into();
    aml_bytes(&b.finalize())
}

/// MADT entry: interrupt source override (type 2).
fn iso(source: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut v = vec![2, 10, 0, source];
    v.extend_from_slice(&gsi.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

/// MADT entry: local APIC NMI (type 4) on LINT1 of every processor.
fn lapic_nmi() -> Vec<u8> {
    vec![4, 6, 0xff, 0, 0, 1]
}

fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        *b"RINGAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for cpu in 0..cfg.cpus {
        m.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let mut bytes = aml_bytes(&m);
    // The crate has no x86 override/NMI structures: appended here, then
    // the length and checksum fixed up. Flags (bytes 40..44): PCAT_COMPAT
    // when the legacy PICs exist.
    let mut extra = iso(SCI_IRQ, u32::from(SCI_IRQ), 0x000d);
    extra.extend(lapic_nmi());
    bytes.extend(extra);
    let flags: u32 = u32::from(cfg.pic);
    bytes[40..44].copy_from_slice(&flags.to_le_bytes());
    fix_header(&mut bytes);
    bytes
}

/// Sets an SDT's length field and checksum from its bytes.
fn fix_header(bytes: &mut [u8]) {
    let len = bytes.len() as u32;
    bytes[4..8].copy_from_slice(&len.to_le_bytes());
    bytes[9] = 0;
    let sum = bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    bytes[9] = sum.wrapping_neg();
}

fn mcfg(pci: &PciHost) -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, *b"RINGMCFG", OEM_REVISION);
    m.add_ecam(pci.ecam, 0, 0, 0);
    aml_bytes(&m)
}

fn pci_host(pci: &PciHost, intx: &[IntxRoute]) -> Vec<u8> {
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let cfg_ports = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::<u16>::new_io(0x0000, 0x0cf7, None);
    let io_high = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio32.0 as u32,
        (pci.mmio32.1 - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio64.0,
        pci.mmio64.1 - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, &mmio32, &mmio64]);
    // _PRT: Package { address 0xSSSS_FFFF, pin, source 0 (a GSI), GSI }.
    let addrs: Vec<u32> = intx
        .iter()
        .map(|r| (u32::from(r.slot) << 16) | 0xffff)
        .collect();
    let zero = aml::ZERO;
    let entries: Vec<Package> = intx
        .iter()
        .zip(&addrs)
        .map(|(r, a)| Package::new(vec![a, &r.pin, &zero, &r.gsi]))
        .collect();
    let prt = Package::new(entries.iter().map(|p| p as &dyn Aml).collect());
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A08"));
    let cid = Name::new("_CID".into(), &EISAName::new("PNP0A03"));
    let adr = Name::new("_ADR".into(), &aml::ZERO);
    let seg = Name::new("_SEG".into(), &aml::ZERO);
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let bbn = Name::new("_BBN".into(), &aml::ZERO);
    let crs = Name::new("_CRS".into(), &crs);
    let prt = Name::new("_PRT".into(), &prt);
    aml_bytes(&Device::new(
        "_SB_.PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt],
    ))
}

/// ECAM bytes per bus (32 devices x 8 functions x 4 KiB).
const ECAM_BUS_SIZE: u64 = 1 << 20;

/// A motherboard resource device (PNP0C02) reserving the ECAM. Linux uses
/// the MCFG's ECAM only if the region is reserved there (or in the e820
/// map); otherwise it prints "MMCONFIG ... not reserved in ACPI motherboard
/// resources" and falls back to port I/O for all config space.
fn motherboard_resources(pci: &PciHost) -> Vec<u8> {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C02"));
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let fixed;
    let wide;
    let ecam: &dyn Aml = match u32::try_from(pci.ecam + ECAM_BUS_SIZE - 1) {
        Ok(_) => {
            fixed = Memory32Fixed::new(true, pci.ecam as u32, ECAM_BUS_SIZE as u32);
            &fixed
        }
        Err(_) => {
            wide = AddressSpace::<u64>::new_memory(
                AddressSpaceCacheable::NotCacheable,
                true,
                pci.ecam,
                pci.ecam + ECAM_BUS_SIZE - 1,
                None,
            );
            &wide
        }
    };
    let crs = ResourceTemplate::new(vec![ecam]);
    let crs = Name::new("_CRS".into(), &crs);
    aml_bytes(&Device::new("_SB_.MRES".into(), vec![&hid, &uid, &crs]))
}

fn com1() -> Vec<u8> {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &aml::ONE);
    let io = IO::new(COM1_PORT, COM1_PORT, 0, 8);
    let irq = Interrupt::new(true, true, false, false, COM1_GSI);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    let crs = Name::new("_CRS".into(), &crs);
    aml_bytes(&Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]))
}

/// The GED (ACPI0013): its interrupt runs `_EVT`, which reads the pending
/// events from the GED status port and notifies the power button.
fn ged_and_power_button() -> Vec<u8> {
    let pwrb_hid = Name::new("_HID".into(), &EISAName::new("PNP0C0C"));
    let pwrb_uid = Name::new("_UID".into(), &aml::ZERO);
    let pwrb = Device::new("_SB_.PWRB".into(), vec![&pwrb_hid, &pwrb_uid]);

    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let irq = Interrupt::new(true, true, false, false, GED_GSI);
    let crs = ResourceTemplate::new(vec![&irq]);
    let crs = Name::new("_CRS".into(), &crs);
    let port = GED_STATUS_PORT as usize;
    let one_byte = 1usize;
    let region = OpRegion::new("GDST".into(), OpRegionSpace::SystemIO, &port, &one_byte);
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GEDS", 8)],
    );
    let geds = Path::new("GEDS");
    let read = Store::new(&Local(0), &geds);
    let button = GED_POWER_BUTTON;
    let masked = aml::And::new(&Local(1), &Local(0), &button);
    let pwrb_path = Path::new("\\_SB_.PWRB");
    let notify_code = 0x80u8;
    let notify = Notify::new(&pwrb_path, &notify_code);
    let pressed = If::new(&masked, vec![&notify]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&read, &pressed]);
    let ged = Device::new(
        "_SB_.GED_".into(),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    );
    let mut v = aml_bytes(&pwrb);
    v.extend(aml_bytes(&ged));
    v
}

fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();
    // The \_SB_ scope exists before devices are put in it.
    body.extend(aml_bytes(&Scope::new("\\_SB_".into(), vec![])));
    if let Some(pci) = &cfg.pci {
        body.extend(pci_host(pci, &cfg.intx));
        body.extend(motherboard_resources(pci));
    }
    if cfg.serial {
        body.extend(com1());
    }
    body.extend(ged_and_power_button());
    // _S5_: SLP_TYPa, SLP_TYPb.
    let s5 = Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE]);
    body.extend(aml_bytes(&Name::new("_S5_".into(), &s5)));
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"RINGDSDT", OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// Every table for `cfg`, placed from [`ACPI_START`] (RSDP first, each
/// table 16-byte aligned). The last entry ends below [`ACPI_END`].
pub fn build_tables(cfg: &AcpiConfig) -> Result<Vec<Placed>, AcpiError> {
    let align = |a: u64| a.next_multiple_of(16);
    let mut next = align(ACPI_START + Rsdp::len() as u64);
    let mut placed: Vec<Placed> = Vec::new();
    let mut put = |bytes: Vec<u8>, placed: &mut Vec<Placed>| {
        let at = next;
        next = align(at + bytes.len() as u64);
        placed.push((at, bytes));
        at
    };
    let dsdt_at = put(dsdt(cfg), &mut placed);
    let mut xsdt = XSDT::new(OEM_ID, *b"RINGXSDT", OEM_REVISION);
    xsdt.add_entry(put(fadt(dsdt_at), &mut placed));
    xsdt.add_entry(put(madt(cfg), &mut placed));
    if let Some(pci) = &cfg.pci {
        xsdt.add_entry(put(mcfg(pci), &mut placed));
    }
    let xsdt_at = put(aml_bytes(&xsdt), &mut placed);
    placed.insert(0, (ACPI_START, aml_bytes(&Rsdp::new(OEM_ID, xsdt_at))));
    let end = placed.last().map(|(a, b)| a + b.len() as u64).unwrap_or(0);
    if end > ACPI_END {
        return Err(AcpiError::TooLarge {
            size: end - ACPI_START,
        });
    }
    Ok(placed)
}

/// Builds the tables for `cfg` and writes them to guest memory; returns
/// the RSDP's address.
pub fn write_tables(mem: &GuestMemoryMmap, cfg: &AcpiConfig) -> Result<u64, AcpiError> {
    for (at, bytes) in build_tables(cfg)? {
        mem.write_slice(&bytes, GuestAddress(at))
            .map_err(AcpiError::Write)?;
    }
    Ok(ACPI_START)
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
