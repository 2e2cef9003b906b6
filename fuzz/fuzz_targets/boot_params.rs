//! Booting a kernel image with a command line and an initrd: the kernel is
//! loaded (ELF32 PVH, ELF64, bzImage, as in `kernel_image`), then its boot
//! parameters are written (the zero page from the bzImage's own setup
//! header, or PVH's start info) and the initrd is placed where the
//! kernel's header allows and copied into guest memory. The initrd's
//! bytes are not parsed (the guest kernel unpacks it); its size and the
//! kernel's header decide where it goes.
//!
//! Input: flags (1 byte), the initrd size (3 bytes LE), the command line
//! length (1 byte) and the command line, then the kernel image. Checks
//! that nothing panics and that an initrd that was placed lies in guest RAM
//! above the kernel.
#![no_main]

use std::io::{Seek, SeekFrom};
use std::os::fd::FromRawFd;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::regs::EntryMode;
use vmm::boot::{load_kernel, setup_boot, BootInputs, Initrd, LoadedKernel, SliceReader};
use vmm::layout::{PVH_MODLIST_START, ZERO_PAGE_START};

const MEM: u64 = 8 << 20;

static INITRD: Mutex<Option<std::fs::File>> = Mutex::new(None);

fuzz_target!(|input: &[u8]| {
    if input.len() < 5 {
        return;
    }
    let flags = input[0];
    let size = u64::from(u32::from_le_bytes([input[1], input[2], input[3], 0]));
    let cmd_len = usize::from(input[4]).min(input.len() - 5);
    let cmdline = String::from_utf8_lossy(&input[5..5 + cmd_len]);
    let image = &input[5 + cmd_len..];

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let Ok(kernel) = load_kernel(&mem, &mut SliceReader::new(image)) else {
        return;
    };
    let kernel_end = match kernel {
        LoadedKernel::Linux { kernel_end, .. } | LoadedKernel::Pvh { kernel_end, .. } => kernel_end,
    };
    let mut guard = INITRD.lock().unwrap_or_else(|e| e.into_inner());
    let file = guard.get_or_insert_with(|| {
        // SAFETY: a valid NUL-terminated name; the new fd is owned by the
        // File.
        let fd = unsafe { libc::memfd_create(c"initrd-fuzz".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: `fd` was just created and nothing else owns it.
        unsafe { std::fs::File::from_raw_fd(fd) }
    });
    let with_initrd = flags & 1 != 0;
    if with_initrd {
        file.set_len(size).unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
    }
    let inputs = BootInputs {
        mem_size: MEM,
        cmdline: &cmdline,
        initrd: with_initrd.then_some(Initrd { file, size }),
        rsdp: (flags & 2 != 0).then_some(0xe_0000),
    };
    let Ok(entry) = setup_boot(&mem, &kernel, inputs) else {
        return;
    };
    if !with_initrd {
        return;
    }
    let (addr, len) = match entry {
        EntryMode::Linux64 { zero_page, .. } => {
            assert_eq!(zero_page, ZERO_PAGE_START.0);
            let a: u32 = mem.read_obj(ZERO_PAGE_START.unchecked_add(0x218)).unwrap();
            let l: u32 = mem.read_obj(ZERO_PAGE_START.unchecked_add(0x21c)).unwrap();
            (u64::from(a), u64::from(l))
        }
        EntryMode::Pvh { .. } => {
            let a: u64 = mem.read_obj(PVH_MODLIST_START).unwrap();
            let l: u64 = mem.read_obj(PVH_MODLIST_START.unchecked_add(8)).unwrap();
            (a, l)
        }
    };
    assert_eq!(len, size);
    assert!(
        addr >= kernel_end && addr + len <= MEM,
        "initrd {addr:#x}+{len:#x}, kernel ends {kernel_end:#x}"
    );
});
