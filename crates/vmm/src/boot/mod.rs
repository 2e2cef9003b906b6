//! Loading a kernel and writing what its boot protocol expects: the 64-bit
//! Linux boot protocol for bzImage and ELF vmlinux, PVH for ELF images that
//! carry a PVH entry note (32-bit or 64-bit).

pub mod elf32;
mod params;
mod source;

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub use params::{write_linux_params, write_pvh_params};
pub use source::SliceReader;

use crate::arch::regs::EntryMode;
use crate::layout::HIMEM_START;

/// Errors from loading a kernel or writing its boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("reading the kernel image")]
    Read(#[source] std::io::Error),
    #[error("not a bootable kernel: neither an ELF file nor a bzImage")]
    NotAKernel,
    #[error("loading the ELF kernel")]
    Elf(#[source] linux_loader::loader::Error),
    #[error("loading the 32-bit PVH kernel")]
    Elf32(#[source] elf32::Elf32Error),
    #[error("loading the bzImage")]
    BzImage(#[source] linux_loader::loader::Error),
    #[error("the bzImage has no 64-bit entry point (boot protocol {version:#x}, xloadflags {xloadflags:#x})")]
    No64BitEntry { version: u16, xloadflags: u16 },
    #[error("the kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel (which ends at {kernel_end:#x})")]
    InitrdTooLarge {
        size: u64,
        limit: u64,
        kernel_end: u64,
    },
    #[error("reading the initrd")]
    InitrdRead(#[source] std::io::Error),
    #[error("writing the initrd to guest memory")]
    InitrdLoad(#[source] vm_memory::GuestMemoryError),
    #[error("writing the boot {what} to guest memory")]
    GuestMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// What loading the kernel found, before the boot parameters are written.
#[derive(Debug, Clone, Copy)]
pub enum LoadedKernel {
    /// 64-bit Linux boot protocol; `header` is the bzImage setup header.
    Linux {
        entry: u64,
        kernel_end: u64,
        header: Option<setup_header>,
    },
    /// PVH entry at `entry` (32-bit protected mode).
    Pvh { entry: u64, kernel_end: u64 },
}

impl LoadedKernel {
    pub fn protocol(&self) -> &'static str {
        match self {
            LoadedKernel::Linux {
                header: Some(_), ..
            } => "bzImage, 64-bit Linux boot protocol",
            LoadedKernel::Linux { .. } => "ELF vmlinux, 64-bit Linux boot protocol",
            LoadedKernel::Pvh { .. } => "ELF, PVH boot protocol",
        }
    }
}

const XLF_KERNEL_64: u16 = 1;

/// Loads a kernel image (ELF32 PVH, ELF64 with or without PVH, bzImage).
pub fn load_kernel<F>(mem: &GuestMemoryMmap, image: &mut F) -> Result<LoadedKernel, BootError>
where
    F: Read + Seek + vm_memory::ReadVolatile,
{
    let mut magic = [0u8; 5];
    image.seek(SeekFrom::Start(0)).map_err(BootError::Read)?;
    let n = read_up_to(image, &mut magic).map_err(BootError::Read)?;
    let magic = &magic[..n];
    if elf32::is_elf32(magic) {
        let img = elf32::load(mem, image).map_err(BootError::Elf32)?;
        return Ok(LoadedKernel::Pvh {
            entry: img.pvh_entry,
            kernel_end: img.kernel_end,
        });
    }
    if magic.starts_with(b"\x7fELF") {
        image.seek(SeekFrom::Start(0)).map_err(BootError::Read)?;
        let r = Elf::load(mem, None, image, Some(HIMEM_START)).map_err(BootError::Elf)?;
        return Ok(match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => LoadedKernel::Pvh {
                entry: addr.0,
                kernel_end: r.kernel_end,
            },
            _ => LoadedKernel::Linux {
                entry: r.kernel_load.0,
                kernel_end: r.kernel_end,
                header: None,
            },
        });
    }
    image.seek(SeekFrom::Start(0)).map_err(BootError::Read)?;
    let r = match BzImage::load(mem, None, image, Some(HIMEM_START)) {
        Ok(r) => r,
        Err(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage
            | linux_loader::loader::bzimage::Error::ReadBzImageHeader
            | linux_loader::loader::bzimage::Error::SeekBzImageHeader,
        )) => return Err(BootError::NotAKernel),
        Err(e) => return Err(BootError::BzImage(e)),
    };
    let header = r.setup_header.ok_or(BootError::NotAKernel)?;
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry {
            version: header.version,
            xloadflags: header.xloadflags,
        });
    }
    // The kernel decompresses in place and needs init_size bytes from its
    // load address (boot protocol 2.10+).
    let init_end = if header.version >= 0x20a {
        r.kernel_load.0 + u64::from(header.init_size)
    } else {
        0
    };
    Ok(LoadedKernel::Linux {
        entry: r.kernel_load.0 + 0x200,
        kernel_end: r.kernel_end.max(init_end),
        header: Some(header),
    })
}

fn read_up_to<R: Read>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// An initrd to load.
pub struct Initrd<'a> {
    pub file: &'a mut std::fs::File,
    pub size: u64,
}

/// What the boot parameters describe besides the kernel.
pub struct BootInputs<'a, 'f> {
    /// Guest RAM in bytes (for the memory map).
    pub mem_size: u64,
    pub cmdline: &'a str,
    pub initrd: Option<Initrd<'f>>,
    /// Where the ACPI RSDP is, if the VM has ACPI tables.
    pub rsdp: Option<u64>,
}

/// Loads `kernel`'s boot parameters and the initrd; returns the vCPU entry.
pub fn setup_boot(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    inputs: BootInputs<'_, '_>,
) -> Result<EntryMode, BootError> {
    if inputs.cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    match *kernel {
        LoadedKernel::Linux {
            entry,
            kernel_end,
            header,
        } => {
            let zero_page = write_linux_params(mem, header, kernel_end, inputs)?;
            Ok(EntryMode::Linux64 {
                entry,
                zero_page: zero_page.0,
            })
        }
        LoadedKernel::Pvh { entry, kernel_end } => {
            let start_info = write_pvh_params(mem, kernel_end, inputs)?;
            Ok(EntryMode::Pvh {
                entry,
                start_info: start_info.0,
            })
        }
    }
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as `limit`
/// allows, above `kernel_end`.
pub(crate) fn place_initrd(
    size: u64,
    limit: u64,
    kernel_end: u64,
) -> Result<GuestAddress, BootError> {
    let err = BootError::InitrdTooLarge {
        size,
        limit,
        kernel_end,
    };
    let addr = limit.checked_sub(size).ok_or(err)? & !0xfff;
    if addr < kernel_end {
        return Err(BootError::InitrdTooLarge {
            size,
            limit,
            kernel_end,
        });
    }
    Ok(GuestAddress(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_goes_high_and_page_aligned_above_the_kernel() {
        assert_eq!(
            place_initrd(0x1800, 0x400_0000, 0x20_0000).unwrap(),
            GuestAddress(0x3ffe000)
        );
        assert!(place_initrd(0x400_0000, 0x400_0000, 0x20_0000).is_err());
        assert!(place_initrd(u64::MAX, 0x400_0000, 0).is_err());
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        for junk in [&b""[..], b"hello", &[0u8; 4096][..]] {
            let r = load_kernel(&mem, &mut SliceReader::new(junk));
            assert!(matches!(r, Err(BootError::NotAKernel)), "{r:?}");
        }
        let r = load_kernel(&mem, &mut SliceReader::new(b"\x7fELF\x02\x01\x01"));
        assert!(matches!(r, Err(BootError::Elf(_))), "{r:?}");
    }
}
