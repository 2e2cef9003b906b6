//! Boot parameters: the Linux zero page and the PVH `hvm_start_info`.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::{place_initrd, BootError, BootInputs, Initrd};
use crate::layout::{
    e820_map, low_ram_end, CMDLINE_MAX_SIZE, CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START,
};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Highest initrd address for kernels whose header does not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::GuestMemory { what, source }
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<(), BootError> {
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, CMDLINE_START)
        .map_err(mem_err("command line"))
}

/// Loads the initrd below `limit`; returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: Initrd<'_>,
    limit: u64,
    kernel_end: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let addr = place_initrd(initrd.size, limit, kernel_end)?;
    mem.read_exact_volatile_from(addr, initrd.file, initrd.size as usize)
        .map_err(BootError::InitrdLoad)?;
    Ok((addr, initrd.size))
}

/// Writes the zero page, command line and initrd for the 64-bit Linux boot
/// protocol; returns the zero page's address.
pub fn write_linux_params(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    kernel_end: u64,
    inputs: BootInputs<'_, '_>,
) -> Result<GuestAddress, BootError> {
    let BootInputs {
        mem_size,
        cmdline,
        initrd,
        rsdp,
    } = inputs;
    let mut params = boot_params {
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    let (cmdline_max, initrd_max) = match header {
        Some(hdr) => {
            params.hdr = hdr;
            // cmdline_size exists from protocol 2.06, initrd_addr_max from 2.03.
            let cmax = if hdr.version >= 0x206 {
                hdr.cmdline_size as usize
            } else {
                255
            };
            let imax = if hdr.version >= 0x203 {
                u64::from(hdr.initrd_addr_max)
            } else {
                DEFAULT_INITRD_ADDR_MAX
            };
            (cmax.min(CMDLINE_MAX_SIZE - 1), imax)
        }
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            (CMDLINE_MAX_SIZE - 1, DEFAULT_INITRD_ADDR_MAX)
        }
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    write_cmdline(mem, cmdline, cmdline_max)?;
    params.hdr.cmd_line_ptr = CMDLINE_START.0 as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    if let Some(initrd) = initrd {
        let limit = (initrd_max + 1).min(low_ram_end(mem_size));
        let (addr, size) = load_initrd(mem, initrd, limit, kernel_end)?;
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let map = e820_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, ZERO_PAGE_START)
        .map_err(mem_err("zero page"))?;
    Ok(ZERO_PAGE_START)
}

/// Writes `hvm_start_info`, its memory map, the command line and the initrd
/// (as module 0) for the PVH entry; returns the start info's address.
pub fn write_pvh_params(
    mem: &GuestMemoryMmap,
    kernel_end: u64,
    inputs: BootInputs<'_, '_>,
) -> Result<GuestAddress, BootError> {
    let BootInputs {
        mem_size,
        cmdline,
        initrd,
        rsdp,
    } = inputs;
    write_cmdline(mem, cmdline, CMDLINE_MAX_SIZE - 1)?;
    let map = e820_map(mem_size);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START.0,
        rsdp_paddr: rsdp.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_START.0,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START
            .unchecked_add((i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64);
        mem.write_obj(entry, at)
            .map_err(mem_err("PVH memory map"))?;
    }
    if let Some(initrd) = initrd {
        let (addr, size) = load_initrd(mem, initrd, low_ram_end(mem_size), kernel_end)?;
        let module = hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        };
        mem.write_obj(module, PVH_MODLIST_START)
            .map_err(mem_err("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START.0;
    }
    mem.write_obj(info, PVH_INFO_START)
        .map_err(mem_err("PVH start info"))?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap()
    }

    fn inputs(cmdline: &str, rsdp: Option<u64>) -> BootInputs<'_, 'static> {
        BootInputs {
            mem_size: 32 << 20,
            cmdline,
            initrd: None,
            rsdp,
        }
    }

    #[test]
    fn pvh_start_info_points_at_cmdline_and_memmap() {
        let m = mem();
        let at = write_pvh_params(&m, 0x20_0000, inputs("exit=3 hello", None)).unwrap();
        let info: hvm_start_info = m.read_obj(at).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.rsdp_paddr, 0);
        let at = write_pvh_params(&m, 0x20_0000, inputs("x", Some(0xe0000))).unwrap();
        let with_acpi: hvm_start_info = m.read_obj(at).unwrap();
        assert_eq!(with_acpi.rsdp_paddr, 0xe0000);
        let at = write_pvh_params(&m, 0x20_0000, inputs("exit=3 hello", None)).unwrap();
        let info: hvm_start_info = m.read_obj(at).unwrap();
        assert_eq!(info.memmap_entries, 3);
        let mut cmd = [0u8; 13];
        m.read_slice(&mut cmd, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cmd, b"exit=3 hello\0");
        let last: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .unwrap();
        assert_eq!((last.addr, last.size, last.type_), (1 << 20, 31 << 20, 1));
    }

    #[test]
    fn linux_zero_page_carries_e820_and_cmdline() {
        let m = mem();
        let at = write_linux_params(&m, None, 0x40_0000, inputs("console=ttyS0", Some(0xe0000)))
            .unwrap();
        let p: boot_params = m.read_obj(at).unwrap();
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START.0 as u32);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        let e = p.e820_table[0];
        assert_eq!(({ e.addr }, { e.size }, { e.r#type }), (0, 0x9fc00, 1));
    }

    #[test]
    fn command_line_longer_than_the_kernel_allows_is_refused() {
        let m = mem();
        let hdr = setup_header {
            version: 0x20f,
            cmdline_size: 16,
            ..Default::default()
        };
        let r = write_linux_params(&m, Some(hdr), 0, inputs(&"x".repeat(17), None));
        assert!(matches!(
            r,
            Err(BootError::CmdlineTooLong { len: 17, max: 16 })
        ));
    }
}
