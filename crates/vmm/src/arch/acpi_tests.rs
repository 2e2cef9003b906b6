use super::*;

fn cfg(cpus: u8, pci: bool) -> AcpiConfig {
    AcpiConfig {
        cpus,
        pic: true,
        serial: true,
        pci: pci.then_some(PciHost {
            ecam: 0xe000_0000,
            mmio32: (0xc000_0000, 0xe000_0000),
            mmio64: (0x1_0000_0000, 0x11_0000_0000),
        }),
        intx: vec![IntxRoute {
            slot: 3,
            pin: 0,
            gsi: 16,
        }],
    }
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// The table at guest address `at` among `placed`.
fn table(placed: &[Placed], at: u64) -> &[u8] {
    &placed
        .iter()
        .find(|(a, _)| *a == at)
        .expect("table at address")
        .1
}

/// Walks RSDP -> XSDT -> tables as a guest does: checksums, lengths and
/// signatures; returns the tables by signature.
fn walk(placed: &[Placed]) -> std::collections::HashMap<String, Vec<u8>> {
    let rsdp = table(placed, ACPI_START);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0);
    assert_eq!(sum(rsdp), 0);
    assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
    let xsdt = table(placed, u64_at(rsdp, 24));
    assert_eq!(&xsdt[..4], b"XSDT");
    assert_eq!(u32_at(xsdt, 4) as usize, xsdt.len());
    assert_eq!(sum(xsdt), 0);
    let mut out = std::collections::HashMap::new();
    for i in (36..xsdt.len()).step_by(8) {
        let t = table(placed, u64_at(xsdt, i));
        assert_eq!(u32_at(t, 4) as usize, t.len());
        assert_eq!(sum(t), 0, "{:?}", std::str::from_utf8(&t[..4]));
        out.insert(String::from_utf8(t[..4].to_vec()).unwrap(), t.to_vec());
    }
    let fadt = &out["FACP"];
    let dsdt = table(placed, u64_at(fadt, 140));
    assert_eq!(&dsdt[..4], b"DSDT");
    assert_eq!(sum(dsdt), 0);
    out.insert("DSDT".into(), dsdt.to_vec());
    out
}

#[test]
fn tables_chain_with_valid_checksums_and_fit_the_bios_area() {
    for (cpus, pci) in [(1, false), (2, true), (254, true)] {
        let placed = build_tables(&cfg(cpus, pci)).unwrap();
        let t = walk(&placed);
        assert_eq!(t.contains_key("MCFG"), pci);
        let end = placed.last().map(|(a, b)| a + b.len() as u64).unwrap();
        assert!(end <= ACPI_END);
        // Tables do not overlap.
        for w in placed.windows(2) {
            assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0);
        }
    }
}

#[test]
fn madt_has_a_local_apic_per_vcpu_the_ioapic_and_overrides() {
    let t = walk(&build_tables(&cfg(3, true)).unwrap());
    let madt = &t["APIC"];
    assert_eq!(u32_at(madt, 36), APIC_START as u32);
    assert_eq!(u32_at(madt, 40), 1, "PCAT_COMPAT with the PICs");
    let mut lapics = Vec::new();
    let mut ioapics = Vec::new();
    let mut isos = Vec::new();
    let mut o = 44;
    while o < madt.len() {
        let (kind, len) = (madt[o], madt[o + 1] as usize);
        assert!(len >= 2);
        match kind {
            0 => lapics.push((madt[o + 2], madt[o + 3], u32_at(madt, o + 4))),
            1 => ioapics.push(u32_at(madt, o + 4)),
            2 => isos.push((madt[o + 3], u32_at(madt, o + 4))),
            _ => {}
        }
        o += len;
    }
    assert_eq!(o, madt.len());
    assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
    assert_eq!(ioapics, vec![IOAPIC_START as u32]);
    assert_eq!(isos, vec![(SCI_IRQ, u32::from(SCI_IRQ))]);
    let mut split = cfg(1, false);
    split.pic = false;
    let t = walk(&build_tables(&split).unwrap());
    assert_eq!(u32_at(&t["APIC"], 40), 0);
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let t = walk(&build_tables(&cfg(1, false)).unwrap());
    let fadt = &t["FACP"];
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    // GAS: space 1 (I/O), 8 bits, address.
    let gas = |o: usize| (fadt[o], fadt[o + 1], u64_at(fadt, o + 4));
    assert_eq!(gas(116), (1, 8, u64::from(RESET_PORT)));
    assert_eq!(fadt[128], RESET_VALUE);
    assert_eq!(gas(244), (1, 8, u64::from(SLEEP_CONTROL_PORT)));
    assert_eq!(gas(256), (1, 8, u64::from(SLEEP_STATUS_PORT)));
}

#[test]
fn mcfg_names_the_ecam_for_bus_0() {
    let t = walk(&build_tables(&cfg(1, true)).unwrap());
    let mcfg = &t["MCFG"];
    assert_eq!(mcfg.len(), 44 + 16);
    assert_eq!(u64_at(mcfg, 44), 0xe000_0000);
    assert_eq!((mcfg[54], mcfg[55]), (0, 0));
}

/// The DSDT disassembled by ACPICA's `iasl`, an independent AML decoder
/// (skipped with a note when it is not installed, failed under CI).
#[test]
fn dsdt_decodes_with_acpica() {
    if std::process::Command::new("iasl")
        .arg("-v")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "iasl (acpica-tools) is needed under CI"
        );
        eprintln!("skipped: iasl (acpica-tools) not installed");
        return;
    }
    let t = walk(&build_tables(&cfg(2, true)).unwrap());
    let dir = std::env::temp_dir().join(format!("ringvm-dsdt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("dsdt.dat");
    std::fs::write(&bin, &t["DSDT"]).unwrap();
    let out = std::process::Command::new("iasl")
        .arg("-d")
        .arg(&bin)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    for want in [
        "Device (_SB.PCI0)",
        "Name (_HID, EisaId (\"PNP0A08\")",
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode,",
        "0xC0000000,",
        "0xDFFFFFFF,",
        "0x0000000100000000,",
        "0x00000010FFFFFFFF,",
        "Name (_PRT, Package (0x01)",
        "0x0003FFFF,",
        // The ECAM reserved as a motherboard resource (else Linux does
        // not use it).
        "Device (_SB.MRES)",
        "EisaId (\"PNP0C02\")",
        "Memory32Fixed (ReadWrite,",
        "0xE0000000,",
        "0x00100000,",
        "Device (_SB.COM1)",
        "EisaId (\"PNP0501\")",
        "0x03F8,",
        "Device (_SB.PWRB)",
        "EisaId (\"PNP0C0C\")",
        "Device (_SB.GED)",
        "0x0000000A,",
        "\"ACPI0013\"",
        "OperationRegion (GDST, SystemIO, 0x0603, One)",
        "Method (_EVT, 1, Serialized)",
        "Notify (\\_SB.PWRB, 0x80)",
        "Name (_S5, Package (0x02)",
    ] {
        assert!(dsl.contains(want), "{want:?} not in:\n{dsl}");
    }
}
