//! Initial vCPU state for the boot entries: segments, control registers,
//! MSRs, FPU and local APIC LINT pins.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use crate::layout::{BOOT_GDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START};

/// Errors from setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing the boot {what} to guest memory")]
    GuestMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { op, source }
}

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit Linux boot protocol: long mode, paging on, RSI = zero page.
    Linux64 { entry: u64, zero_page: u64 },
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh { entry: u64, start_info: u64 },
}

// GDT descriptors: flags in bits 52..55 (G, D/B, L), access byte in 40..47.
const fn gdt_entry(flags: u64, access: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf) << 52)
        | ((limit & 0xf_0000) << 32)
        | ((access & 0xff) << 40)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

fn segment(gdt: &[u64], index: usize) -> kvm_segment {
    let e = gdt[index];
    kvm_segment {
        base: ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000),
        limit: {
            let raw = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
            if (e >> 55) & 1 == 1 {
                (raw << 12) | 0xfff
            } else {
                raw
            }
        },
        selector: (index * 8) as u16,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g: ((e >> 55) & 1) as u8,
        avl: ((e >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// GDT for the 64-bit Linux entry: `__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18.
const GDT_LINUX64: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa, 0x9b, 0, 0xfffff), // 64-bit code
    gdt_entry(0xc, 0x93, 0, 0xfffff), // data
    gdt_entry(0x0, 0x8b, 0, 0x67),    // TSS
];
/// GDT for the PVH entry: flat 32-bit code and data, a TSS.
const GDT_PVH: [u64; 4] = [
    0,
    gdt_entry(0xc, 0x9b, 0, 0xfffff), // 32-bit code
    gdt_entry(0xc, 0x93, 0, 0xfffff), // data
    gdt_entry(0x0, 0x8b, 0, 0x67),    // TSS
];

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, BOOT_GDT_START.unchecked_add(i as u64 * 8))
            .map_err(|source| RegsError::GuestMemory {
                what: "GDT",
                source,
            })?;
    }
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages for the Linux entry.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let err = |source| RegsError::GuestMemory {
        what: "page tables",
        source,
    };
    mem.write_obj(PDPTE_START.0 | 0x03, PML4_START)
        .map_err(err)?;
    mem.write_obj(PDE_START.0 | 0x03, PDPTE_START)
        .map_err(err)?;
    let mut pd = [0u64; 512];
    for (i, e) in pd.iter_mut().enumerate() {
        *e = ((i as u64) << 21) | 0x83;
    }
    // SAFETY: [u64; 512] is plain old data; viewing it as bytes is sound.
    let bytes = unsafe { std::slice::from_raw_parts(pd.as_ptr().cast::<u8>(), 4096) };
    mem.write_slice(bytes, PDE_START).map_err(err)
}

/// Sets segments, control registers and general registers for `mode`.
pub fn setup_entry(vcpu: &VcpuFd, mem: &GuestMemoryMmap, mode: EntryMode) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    let gdt: &[u64] = match mode {
        EntryMode::Linux64 { .. } => &GDT_LINUX64,
        EntryMode::Pvh { .. } => &GDT_PVH,
    };
    write_gdt(mem, gdt)?;
    sregs.gdt.base = BOOT_GDT_START.0;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let (code, data, tss) = match mode {
        EntryMode::Linux64 { .. } => (2, 3, 4),
        EntryMode::Pvh { .. } => (1, 2, 3),
    };
    sregs.cs = segment(gdt, code);
    let ds = segment(gdt, data);
    sregs.ds = ds;
    sregs.es = ds;
    sregs.fs = ds;
    sregs.gs = ds;
    sregs.ss = ds;
    sregs.tr = segment(gdt, tss);
    match mode {
        EntryMode::Linux64 { entry, zero_page } => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START.0;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = zero_page;
        }
        EntryMode::Pvh { entry, start_info } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WB_DEFAULT: u64 = (1 << 11) | 6;

/// Boot MSRs: syscall MSRs cleared, TSC at zero, fast strings on, MTRRs
/// enabled with write-back as the default type.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB_DEFAULT),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &mut kvm_lapic_state, off: usize) -> u32 {
    let b = &state.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        state.regs[off + i] = *b as _;
    }
}

/// LINT0 as ExtINT (the PIC), LINT1 as NMI, as a PC's BIOS leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut state = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let v = lapic_reg(&mut state, off);
        set_lapic_reg(&mut state, off, (v & !0x700) | (mode << 8));
    }
    vcpu.set_lapic(&state).map_err(kvm_err("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let cs = segment(&GDT_LINUX64, 2);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.g, cs.type_),
            (0, 0xffff_ffff, 1, 0, 1, 0xb)
        );
        assert_eq!(cs.selector, 0x10);
        let cs32 = segment(&GDT_PVH, 1);
        assert_eq!((cs32.l, cs32.db, cs32.limit), (0, 1, 0xffff_ffff));
        let tss = segment(&GDT_PVH, 3);
        assert_eq!(
            (tss.type_, tss.limit, tss.s, tss.present),
            (0xb, 0x67, 0, 1)
        );
        assert_eq!(GDT_LINUX64[2], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_PVH[1], 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn linux_page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(PML4_START).unwrap();
        assert_eq!(pml4, PDPTE_START.0 | 3);
        let last: u64 = mem.read_obj(PDE_START.unchecked_add(511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }
}
