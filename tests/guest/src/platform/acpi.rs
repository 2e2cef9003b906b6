//! ACPI: RSDP -> RSDT/XSDT -> MADT, counting enabled processors; and the
//! FADT's power-off and reset registers with the DSDT's `_S5_` sleep type.

use super::{checksum_ok, ebda_base, signature_offsets, u32_at, u64_at};
use crate::phys;

const RSDP_SIGNATURE: &[u8; 8] = b"RSD PTR ";
/// Bytes covered by the ACPI 1.0 RSDP checksum.
const RSDP_V1_LEN: usize = 20;
/// Size of the ACPI 2.0+ RSDP.
const RSDP_V2_LEN: usize = 36;
/// Largest extended RSDP length accepted.
const RSDP_MAX_LEN: usize = 4096;
/// Size of a system description table header.
const SDT_HEADER_LEN: usize = 36;
/// Largest table accepted (bounds checksum work on garbage).
const SDT_MAX_LEN: usize = 256 * 1024;

const MADT_SIGNATURE: &[u8; 4] = b"APIC";
/// MADT header: SDT header, local APIC address (u32), flags (u32).
const MADT_HEADER_LEN: usize = 44;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_LOCAL_X2APIC: u8 = 9;
const MADT_ENABLED: u32 = 1;

/// Finds the RSDP by the legacy scan: the first KiB of the EBDA, then the
/// BIOS area 0xE0000..0xFFFFF, on 16-byte boundaries.
pub fn find_rsdp() -> Option<u64> {
    let regions = [(ebda_base(), 1024), (Some(0xe0000), 0x20000)];
    regions.into_iter().find_map(|(base, len)| {
        let base = base?;
        let region = phys::bytes(base, len)?;
        signature_offsets(region, RSDP_SIGNATURE)
            .map(|off| base + off as u64)
            .find(|&addr| phys::bytes(addr, RSDP_V1_LEN).is_some_and(checksum_ok))
    })
}

const FADT_SIGNATURE: &[u8; 4] = b"FACP";
/// FADT offsets (ACPI 6): RESET_REG (GAS), RESET_VALUE, X_DSDT,
/// SLEEP_CONTROL_REG (GAS). A GAS is space id, widths, access, address.
const FADT_RESET_REG: usize = 116;
const FADT_RESET_VALUE: usize = 128;
const FADT_DSDT: usize = 40;
const FADT_X_DSDT: usize = 140;
const FADT_SLEEP_CONTROL_REG: usize = 244;
const GAS_SYSTEM_IO: u8 = 1;

/// How to power off and reset the machine, as the firmware tables say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerRegs {
    /// I/O port of the sleep control register.
    pub sleep_control: u16,
    /// SLP_TYPa of `_S5_`.
    pub s5_type: u8,
    /// I/O port of the reset register and the value to write.
    pub reset: u16,
    pub reset_value: u8,
}

/// The valid root tables (the XSDT first, then the RSDT) with their entry
/// sizes: callers take the first that has what they look for.
fn root_tables(rsdp_addr: u64) -> impl Iterator<Item = (&'static [u8], usize)> {
    let rsdp = phys::bytes(rsdp_addr, RSDP_V1_LEN)
        .filter(|r| r.starts_with(RSDP_SIGNATURE) && checksum_ok(r));
    let roots = rsdp.map(|rsdp| {
        let xsdt = xsdt_address(rsdp_addr, rsdp[15]);
        let rsdt = u32_at(rsdp, 16).map(u64::from).unwrap_or(0);
        [(xsdt, 8), (rsdt, 4)]
    });
    roots
        .into_iter()
        .flatten()
        .filter(|&(addr, _)| addr != 0)
        .filter_map(|(addr, entry_len)| Some((table(addr)?, entry_len)))
}

/// The power-off and reset registers of a hardware-reduced FADT (both in
/// I/O space) and `_S5_` from the DSDT.
pub fn power_regs(rsdp_addr: u64) -> Option<PowerRegs> {
    let fadt =
        root_tables(rsdp_addr).find_map(|(root, len)| find_table(root, len, FADT_SIGNATURE))?;
    let io_port = |gas: usize| -> Option<u16> {
        (*fadt.get(gas)? == GAS_SYSTEM_IO)
            .then(|| u64_at(fadt, gas + 4))
            .flatten()
            .and_then(|a| u16::try_from(a).ok())
    };
    let dsdt_addr = match u64_at(fadt, FADT_X_DSDT) {
        Some(a) if a != 0 => a,
        _ => u64::from(u32_at(fadt, FADT_DSDT)?),
    };
    Some(PowerRegs {
        sleep_control: io_port(FADT_SLEEP_CONTROL_REG)?,
        s5_type: s5_sleep_type(table(dsdt_addr)?)?,
        reset: io_port(FADT_RESET_REG)?,
        reset_value: *fadt.get(FADT_RESET_VALUE)?,
    })
}

/// SLP_TYPa of the DSDT's `Name (_S5_, Package () { a, b, ... })`, found
/// by a byte scan (as small kernels do): NameOp, `_S5_`, PackageOp, a
/// one-byte PkgLength, the element count, then a Zero, One or BytePrefix
/// constant.
fn s5_sleep_type(dsdt: &[u8]) -> Option<u8> {
    let body = dsdt.get(SDT_HEADER_LEN..)?;
    let at = body.windows(4).position(|w| w == b"_S5_")?;
    if at == 0 || body[at - 1] != 0x08 {
        return None;
    }
    let pkg = body.get(at + 4..at + 9)?;
    if pkg[0] != 0x12 || pkg[1] & 0xc0 != 0 {
        return None;
    }
    match pkg[3] {
        0x00 => Some(0),
        0x01 => Some(1),
        0x0a => Some(pkg[4]),
        _ => None,
    }
}

/// Counts the enabled processors in the MADT reached from the RSDP at
/// `rsdp_addr`. `None` when no valid RSDP, root table or MADT is found.
pub fn count(rsdp_addr: u64) -> Option<u32> {
    root_tables(rsdp_addr)
        .find_map(|(root, len)| find_table(root, len, MADT_SIGNATURE))
        .map(count_madt)
}

/// The XSDT address of an ACPI 2.0+ RSDP, or 0.
fn xsdt_address(rsdp_addr: u64, revision: u8) -> u64 {
    if revision < 2 {
        return 0;
    }
    let extended = || {
        let head = phys::bytes(rsdp_addr, RSDP_V2_LEN)?;
        let len = usize::try_from(u32_at(head, 20)?).ok()?;
        if !(RSDP_V2_LEN..=RSDP_MAX_LEN).contains(&len) {
            return None;
        }
        let full = phys::bytes(rsdp_addr, len)?;
        checksum_ok(full).then(|| u64_at(full, 24)).flatten()
    };
    extended().unwrap_or(0)
}

/// A system description table at `addr` whose length is plausible and
/// whose checksum is valid.
fn table(addr: u64) -> Option<&'static [u8]> {
    let header = phys::bytes(addr, SDT_HEADER_LEN)?;
    let len = usize::try_from(u32_at(header, 4)?).ok()?;
    if !(SDT_HEADER_LEN..=SDT_MAX_LEN).contains(&len) {
        return None;
    }
    let t = phys::bytes(addr, len)?;
    checksum_ok(t).then_some(t)
}

/// Follows the entries (4-byte RSDT or 8-byte XSDT pointers) of `root` to
/// the first valid table with `signature`.
fn find_table(root: &[u8], entry_len: usize, signature: &[u8; 4]) -> Option<&'static [u8]> {
    let entries = root.get(SDT_HEADER_LEN..)?;
    entries.chunks_exact(entry_len).find_map(|e| {
        let addr = match entry_len {
            4 => u64::from(u32_at(e, 0)?),
            _ => u64_at(e, 0)?,
        };
        // Peek at the signature before checksumming the whole table.
        if !phys::bytes(addr, 4)?.starts_with(signature) {
            return None;
        }
        table(addr)
    })
}

/// Counts enabled Local APIC (type 0) and Local x2APIC (type 9) entries of
/// a checksum-validated MADT.
fn count_madt(madt: &[u8]) -> u32 {
    let mut cpus = 0;
    let mut off = MADT_HEADER_LEN;
    // Every entry is at least 2 bytes long, so this ends within len/2 steps.
    while let Some(header) = madt.get(off..off + 2) {
        let (kind, len) = (header[0], usize::from(header[1]));
        if len < 2 {
            break;
        }
        let Some(entry) = madt.get(off..off + len) else {
            break;
        };
        let flags = match kind {
            MADT_LOCAL_APIC => u32_at(entry, 4),
            MADT_LOCAL_X2APIC => u32_at(entry, 8),
            _ => None,
        };
        if flags.is_some_and(|f| f & MADT_ENABLED != 0) {
            cpus += 1;
        }
        off += len;
    }
    cpus
}

#[cfg(test)]
mod tests {
    use super::*;

    fn madt(entries: &[&[u8]]) -> Vec<u8> {
        let mut t = vec![0u8; MADT_HEADER_LEN];
        t[..4].copy_from_slice(MADT_SIGNATURE);
        for e in entries {
            t.extend_from_slice(e);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        t
    }

    fn lapic(id: u8, flags: u32) -> Vec<u8> {
        let mut e = vec![MADT_LOCAL_APIC, 8, id, id];
        e.extend_from_slice(&flags.to_le_bytes());
        e
    }

    fn x2apic(id: u32, flags: u32) -> Vec<u8> {
        let mut e = vec![MADT_LOCAL_X2APIC, 16, 0, 0];
        e.extend_from_slice(&id.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&id.to_le_bytes());
        e
    }

    #[test]
    fn counts_enabled_lapics_and_x2apics() {
        let ioapic = [1u8, 12, 0, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0];
        let t = madt(&[
            &lapic(0, 1),
            &lapic(1, 1),
            &lapic(2, 2), // online-capable but not enabled
            &lapic(3, 0),
            &ioapic,
            &x2apic(300, 1),
            &x2apic(301, 0),
        ]);
        assert_eq!(count_madt(&t), 3);
    }

    fn dsdt_with(body: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; SDT_HEADER_LEN];
        t.extend_from_slice(body);
        t
    }

    #[test]
    fn finds_s5_sleep_types() {
        let pkg = |first: &[u8]| {
            let mut b = vec![0x10, 0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x02];
            b.extend_from_slice(first);
            b.extend_from_slice(&[0x0a, 0x05]);
            b
        };
        assert_eq!(s5_sleep_type(&dsdt_with(&pkg(&[0x0a, 0x05]))), Some(5));
        assert_eq!(s5_sleep_type(&dsdt_with(&pkg(&[0x00]))), Some(0));
        assert_eq!(s5_sleep_type(&dsdt_with(&pkg(&[0x01]))), Some(1));
        // A method call or other term: not understood.
        assert_eq!(s5_sleep_type(&dsdt_with(&pkg(&[0x14]))), None);
        // Not a Name.
        let mut b = pkg(&[0x0a, 0x05]);
        b[1] = 0x70;
        assert_eq!(s5_sleep_type(&dsdt_with(&b)), None);
        // Truncated.
        assert_eq!(
            s5_sleep_type(&dsdt_with(&[0x08, b'_', b'S', b'5', b'_', 0x12])),
            None
        );
        assert_eq!(s5_sleep_type(&dsdt_with(b"no sleep here")), None);
    }

    #[test]
    fn stops_on_malformed_entries() {
        let mut t = madt(&[&lapic(0, 1), &lapic(1, 1)]);
        t[MADT_HEADER_LEN + 1] = 0; // zero length: would loop forever
        assert_eq!(count_madt(&t), 0);
        let mut t = madt(&[&lapic(0, 1), &lapic(1, 1)]);
        t[MADT_HEADER_LEN + 9] = 200; // runs past the end
        assert_eq!(count_madt(&t), 1);
        let t = madt(&[&[0u8, 4, 0, 0]]); // too short for flags
        assert_eq!(count_madt(&t), 0);
    }
}
