//! The guest physical address map of an x86 ringvm VM.
//!
//! ```text
//! 0x0000_0000  real-mode IVT and BIOS data area (RAM)
//! 0x0000_0500  GDT used for the 64-bit Linux and the PVH entries
//! 0x0000_6000  PVH `hvm_start_info`, followed by its memory map and module list
//! 0x0000_7000  Linux zero page (`boot_params`)
//! 0x0000_9000  identity page tables for the 64-bit Linux entry (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE)
//! 0x0009_fc00  EBDA: MP floating pointer and MP configuration table
//! 0x000a_0000  legacy VGA / option ROM hole (reserved in e820)
//! 0x0010_0000  kernel image (HIMEM_START)
//! ...          RAM up to min(size, 3 GiB); initrd at the top of low RAM
//! 0xc000_0000  32-bit hole: PCI MMIO window, ECAM, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 4 GiB (whatever did not fit below the hole)
//! ```

use vm_memory::GuestAddress;

/// Where the GDT for the boot entries lives.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// PVH module list (the initrd), right after `hvm_start_info`.
pub const PVH_MODLIST_START: GuestAddress = GuestAddress(0x6040);
/// PVH memory map, after the module list.
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x6100);
/// Linux zero page.
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Initial stack pointer for the 64-bit Linux entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit Linux entry.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Largest command line we accept (the Linux x86 limit is 2 KiB by default,
/// but the boot protocol allows up to `cmdline_size` from the setup header).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the EBDA, where the MP tables go.
pub const EBDA_START: GuestAddress = GuestAddress(0x9fc00);
/// End of usable low memory (start of the VGA hole).
pub const LOW_RAM_END: u64 = 0xa0000;
/// Kernels load here.
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);

/// The 32-bit PCI hole: RAM stops here below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above 4 GiB.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Size of the 32-bit hole.
pub const MMIO_HOLE_SIZE: u64 = HIGH_RAM_START - MMIO_HOLE_START;

/// IOAPIC MMIO base (in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;

/// Smallest guest we agree to build: room for the boot structures below
/// 1 MiB plus a small kernel.
pub const MIN_MEMORY: u64 = 8 << 20;

/// The RAM regions for a guest of `size` bytes: everything below the hole
/// first, the rest above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut regions = vec![(GuestAddress(0), low)];
    if size > low {
        regions.push((GuestAddress(HIGH_RAM_START), size - low));
    }
    regions
}

/// The kind of an e820 entry, as the BIOS interface defines them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the e820 map given to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// The e820 map for a guest of `size` bytes: low RAM up to the EBDA, the
/// EBDA/VGA/BIOS area reserved, RAM from 1 MiB to the hole, RAM above 4 GiB.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START.0,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: EBDA_START.0,
            size: HIMEM_START.0 - EBDA_START.0,
            kind: E820Kind::Reserved,
        },
    ];
    for (start, len) in ram_regions(size) {
        let (start, len) = if start.0 == 0 {
            (HIMEM_START.0, len.saturating_sub(HIMEM_START.0))
        } else {
            (start.0, len)
        };
        if len > 0 {
            map.push(E820Entry {
                addr: start,
                size: len,
                kind: E820Kind::Ram,
            });
        }
    }
    map
}

/// Highest guest-physical address of low RAM (exclusive).
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_below_the_hole() {
        assert_eq!(ram_regions(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
    }

    #[test]
    fn large_guest_is_split_around_the_hole() {
        let r = ram_regions(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START));
        assert_eq!(
            r[1],
            (GuestAddress(HIGH_RAM_START), (4 << 30) - MMIO_HOLE_START)
        );
    }

    #[test]
    fn e820_reserves_the_bios_area_and_covers_all_ram() {
        let size = 5u64 << 30;
        let map = e820_map(size);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        // Everything but the EBDA..1 MiB window is RAM.
        assert_eq!(ram, size - (HIMEM_START.0 - EBDA_START.0));
        assert!(map
            .iter()
            .any(|e| e.kind == E820Kind::Reserved && e.addr == EBDA_START.0));
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= HIGH_RAM_START));
    }
}
