//! The Intel MultiProcessor Specification 1.4 tables, which tell a guest
//! how many vCPUs there are, where the IOAPIC is and how ISA IRQs reach it.
//! They go in the EBDA, where the spec says to look first, and the BIOS data
//! area points at the EBDA.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{APIC_START, EBDA_START, HIMEM_START, IOAPIC_START};

/// Errors from writing the MP tables.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{cpus} vCPUs do not fit in an MP table (at most {max})")]
    TooManyCpus { cpus: usize, max: usize },
    #[error("writing the MP table to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Most vCPUs we describe: APIC IDs are 8 bits and the IOAPIC takes the
/// ID after the last vCPU.
pub const MAX_CPUS: usize = 254;

const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;
const ISA_IRQS: u8 = 16;
const BUS_ISA: u8 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the configuration table (header and entries) for `cpus` vCPUs.
fn config_table(cpus: usize) -> Vec<u8> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.push(0); // processor
        entries.push(id as u8);
        entries.push(LAPIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, BUS_ISA, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    let ioapic_id = cpus as u8;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    let mut io_int = |kind: u8, src_irq: u8, pin: u8| {
        entries.extend_from_slice(&[3, kind, 0, 0, BUS_ISA, src_irq, ioapic_id, pin]);
        count += 1;
    };
    // KVM's in-kernel irqchip wires GSI n to IOAPIC pin n, the PIT
    // included (GSI 0), so ISA IRQs map to pins one to one; pin 0 also
    // carries the 8259's ExtINT for virtual-wire mode.
    io_int(IRQ_TYPE_EXTINT, 0, 0);
    for irq in 0..ISA_IRQS {
        if irq == 2 {
            continue; // the cascade
        }
        io_int(IRQ_TYPE_INT, irq, irq);
    }
    // LINT0 is ExtINT, LINT1 NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[4, IRQ_TYPE_EXTINT, 0, 0, BUS_ISA, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, IRQ_TYPE_NMI, 0, 0, BUS_ISA, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"RINGVM  ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Writes the floating pointer and configuration table at the EBDA for
/// `cpus` vCPUs, and points the BIOS data area at the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: usize) -> Result<(), MptableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus {
            cpus,
            max: MAX_CPUS,
        });
    }
    let table_addr = EBDA_START.unchecked_add(16);
    let table = config_table(cpus);
    debug_assert!(table_addr.0 + table.len() as u64 <= HIMEM_START.0);

    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(table_addr.0 as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4; // spec revision 1.4
    fp[10] = checksum(&fp);

    mem.write_slice(&fp, EBDA_START)
        .map_err(MptableError::GuestMemory)?;
    mem.write_slice(&table, table_addr)
        .map_err(MptableError::GuestMemory)?;
    // BIOS data area: EBDA segment at 0x40e, base memory in KiB at 0x413.
    mem.write_obj((EBDA_START.0 >> 4) as u16, GuestAddress(0x40e))
        .map_err(MptableError::GuestMemory)?;
    mem.write_obj((EBDA_START.0 >> 10) as u16, GuestAddress(0x413))
        .map_err(MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    /// Walks the tables as a guest would and counts enabled processors.
    fn count_cpus(mem: &GuestMemoryMmap) -> usize {
        let seg: u16 = mem.read_obj(GuestAddress(0x40e)).unwrap();
        let ebda = u64::from(seg) << 4;
        let mut fp = [0u8; 16];
        mem.read_slice(&mut fp, GuestAddress(ebda)).unwrap();
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(fp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = u64::from(u32::from_le_bytes(fp[4..8].try_into().unwrap()));
        let mut hdr = [0u8; 44];
        mem.read_slice(&mut hdr, GuestAddress(table)).unwrap();
        assert_eq!(&hdr[0..4], b"PCMP");
        let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
        let mut all = vec![0u8; len];
        mem.read_slice(&mut all, GuestAddress(table)).unwrap();
        assert_eq!(all.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([hdr[34], hdr[35]]);
        let (mut off, mut cpus) = (44, 0);
        for _ in 0..count {
            match all[off] {
                0 => {
                    cpus += usize::from(all[off + 3] & CPU_ENABLED);
                    off += 20;
                }
                _ => off += 8,
            }
        }
        assert_eq!(off, len);
        cpus
    }

    #[test]
    fn describes_every_vcpu_with_valid_checksums() {
        for cpus in [1, 2, 7, MAX_CPUS] {
            let m = mem();
            setup_mptable(&m, cpus).unwrap();
            assert_eq!(count_cpus(&m), cpus);
        }
    }

    #[test]
    fn refuses_zero_or_too_many_cpus() {
        assert!(setup_mptable(&mem(), 0).is_err());
        assert!(setup_mptable(&mem(), MAX_CPUS + 1).is_err());
    }
}
