//! Intel MultiProcessor Specification 1.4: floating pointer and
//! configuration table.

use super::{checksum_ok, ebda_base, signature_offsets, u16_at, u32_at};
use crate::phys;

const FLOATING_SIGNATURE: &[u8; 4] = b"_MP_";
const TABLE_SIGNATURE: &[u8; 4] = b"PCMP";
/// Size of the configuration table header; entries follow it.
const HEADER_LEN: usize = 44;

// Entry types and their sizes.
const ENTRY_PROCESSOR: u8 = 0;
const PROCESSOR_LEN: usize = 20;
const OTHER_LEN: usize = 8; // bus, I/O APIC, I/O interrupt, local interrupt
const CPU_FLAG_ENABLED: u8 = 1;

/// Processors in the MP "default configurations" (no table present).
const DEFAULT_CONFIG_CPUS: u32 = 2;

/// Counts the enabled processors of the MP configuration table, or `None`
/// when there is no valid MP floating pointer or table.
pub fn count() -> Option<u32> {
    let floating = find_floating_pointer()?;
    let feature1 = floating[11];
    if feature1 != 0 {
        // One of the MP spec default configurations: always two CPUs.
        return Some(DEFAULT_CONFIG_CPUS);
    }
    let table_addr = u64::from(u32_at(floating, 4)?);
    let header = phys::bytes(table_addr, HEADER_LEN)?;
    if !header.starts_with(TABLE_SIGNATURE) {
        return None;
    }
    let base_len = usize::from(u16_at(header, 4)?);
    count_processors(phys::bytes(table_addr, base_len)?)
}

/// Searches, on 16-byte boundaries, the first KiB of the EBDA, then the
/// last KiB of base memory, then the BIOS ROM area 0xF0000..0xFFFFF.
fn find_floating_pointer() -> Option<&'static [u8]> {
    let ebda = ebda_base();
    if let Some(fp) = ebda.and_then(|base| scan(base, 1024)) {
        return Some(fp);
    }
    // Base memory size in KiB (BDA word 0x413); assume 640 KiB when unset
    // or implausible.
    let kib = match phys::read_u16(0x413) {
        Some(k @ 2..=640) => u64::from(k),
        _ => 640,
    };
    let base_top = (kib - 1) * 1024;
    if ebda != Some(base_top) {
        if let Some(fp) = scan(base_top, 1024) {
            return Some(fp);
        }
    }
    scan(0xf0000, 0x10000)
}

/// Returns the first floating pointer structure in `[start, start + len)`
/// whose checksum over its declared length is valid.
fn scan(start: u64, len: usize) -> Option<&'static [u8]> {
    let region = phys::bytes(start, len)?;
    signature_offsets(region, FLOATING_SIGNATURE).find_map(|off| {
        let paragraphs = usize::from(*region.get(off + 8)?);
        if paragraphs == 0 {
            return None;
        }
        let fp = phys::bytes(start + off as u64, paragraphs * 16)?;
        checksum_ok(fp).then_some(fp)
    })
}

/// Validates a configuration table (signature, base length, checksum) and
/// counts its enabled processor entries. `table` is the base table.
fn count_processors(table: &[u8]) -> Option<u32> {
    if table.len() < HEADER_LEN
        || !table.starts_with(TABLE_SIGNATURE)
        || usize::from(u16_at(table, 4)?) != table.len()
        || !checksum_ok(table)
    {
        return None;
    }
    // Walk the entries by the base table length, not by the header's entry
    // count: some firmware (qboot) leaves the count at 0. Every entry is at
    // least 8 bytes, so the walk ends within len / 8 steps.
    let mut off = HEADER_LEN;
    let mut cpus = 0;
    while let Some(&kind) = table.get(off) {
        let size = match kind {
            ENTRY_PROCESSOR => PROCESSOR_LEN,
            1..=4 => OTHER_LEN,
            _ => break, // unknown entry: its size is unknown, stop
        };
        let Some(entry) = table.get(off..off + size) else {
            break;
        };
        if kind == ENTRY_PROCESSOR && entry[3] & CPU_FLAG_ENABLED != 0 {
            cpus += 1;
        }
        off += size;
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[&[u8]]) -> Vec<u8> {
        let mut t = vec![0u8; HEADER_LEN];
        t[..4].copy_from_slice(TABLE_SIGNATURE);
        t[6] = 4; // spec revision 1.4
        for e in entries {
            t.extend_from_slice(e);
        }
        let len = t.len() as u16;
        t[4..6].copy_from_slice(&len.to_le_bytes());
        t[34..36].copy_from_slice(&(entries.len() as u16).to_le_bytes());
        let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
        t[7] = 0u8.wrapping_sub(sum);
        t
    }

    fn cpu(apic_id: u8, flags: u8) -> [u8; 20] {
        let mut e = [0u8; 20];
        e[1] = apic_id;
        e[3] = flags;
        e
    }

    #[test]
    fn counts_enabled_processors() {
        let bus = [1u8, 0, b'I', b'S', b'A', b' ', b' ', b' '];
        let ioapic = [2u8, 4, 0x11, 1, 0, 0, 0xc0, 0xfe];
        let t = table(&[
            &cpu(0, 3),
            &cpu(1, 1),
            &cpu(2, 0),
            &bus,
            &ioapic,
            &cpu(3, 1),
        ]);
        assert_eq!(count_processors(&t), Some(3));
    }

    #[test]
    fn rejects_bad_tables() {
        let mut t = table(&[&cpu(0, 3)]);
        assert_eq!(count_processors(&t), Some(1));
        t[50] ^= 1;
        assert_eq!(count_processors(&t), None, "checksum");
        let mut t = table(&[&cpu(0, 3)]);
        t[0] = b'X';
        assert_eq!(count_processors(&t), None, "signature");
        assert_eq!(count_processors(&t[..40]), None, "short");
    }

    #[test]
    fn stops_at_unknown_or_truncated_entries() {
        let junk = [9u8; 8];
        let t = table(&[&cpu(0, 1), &junk, &cpu(1, 1)]);
        assert_eq!(count_processors(&t), Some(1));
        // The entry count is ignored (qboot leaves it 0); the length rules.
        for count in [0u8, 200] {
            let mut t = table(&[&cpu(0, 1), &cpu(1, 1)]);
            t[34] = count;
            let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
            t[7] = t[7].wrapping_sub(sum);
            assert_eq!(count_processors(&t), Some(2));
        }
        // Truncated last entry: not counted.
        let mut t = table(&[&cpu(0, 1), &cpu(1, 1)]);
        t.truncate(t.len() - 4);
        let len = t.len() as u16;
        t[4..6].copy_from_slice(&len.to_le_bytes());
        let sum = t.iter().fold(0u8, |s, &b| s.wrapping_add(b));
        t[7] = t[7].wrapping_sub(sum);
        assert_eq!(count_processors(&t), Some(1));
    }
}
