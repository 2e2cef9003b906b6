//! PVH entry: 32-bit stub, static page tables, GDT, stack and ELF note.
//!
//! The loader (ringvm, QEMU, any PVH-capable VMM) enters `pvh_start32` in
//! 32-bit protected mode with paging off, interrupts off, flat 32-bit CS/DS
//! and EBX = guest-physical address of `struct hvm_start_info`.
//!
//! Everything the switch to long mode needs is assembled at build time, so
//! the boot path runs a couple of dozen instructions before `rust_main`:
//!
//! * Page tables: PML4[0] -> PDPT, PDPT[0..4] -> four page directories
//!   whose 2048 entries identity-map 0..4 GiB with 2 MiB pages. The last
//!   GiB (0xC000_0000..0x1_0000_0000, MMIO space: LAPIC, IOAPIC, device
//!   windows) is mapped cache-disabled (PCD|PWT).
//! * GDT: null, 64-bit code (0x08), flat data (0x10). The accessed bits are
//!   preset so the CPU never writes to the table.
//! * Stack: 64 KiB in .bss (zeroed RAM from the loader, never touched here).
//!
//! The stub saves EBX, loads the GDT and CR3, sets CR4.PAE, EFER.LME and
//! CR0.PG|PE, far-jumps into 64-bit code, loads the data segments and RSP
//! and calls `rust_main(start_info_paddr)` (SysV: first argument in RDI).

/// Size of the boot stack in bytes.
pub const STACK_SIZE: usize = 64 * 1024;

// Selectors in the static GDT below.
// 0x08: 64-bit code, 0x10: flat data.
core::arch::global_asm!(
    r#"
    .section .text.boot, "ax", @progbits
    .code32
    .balign 16
    .global pvh_start32
    .type pvh_start32, @function
pvh_start32:
    cli
    cld
    movl %ebx, %esi                 /* hvm_start_info paddr, kept in ESI */
    lgdtl ringvm_gdt_ptr
    movl $ringvm_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                 /* CR4.PAE */
    movl %eax, %cr4
    movl $0xC0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                /* EFER.LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* CR0.PG | CR0.PE */
    movl %eax, %cr0
    ljmpl $0x08, $ringvm_start64
    .size pvh_start32, . - pvh_start32

    .code64
    .type ringvm_start64, @function
ringvm_start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $ringvm_stack_top, %rsp
    movl %esi, %edi                 /* zero-extends into RDI */
    call rust_main
1:  cli
    hlt
    jmp 1b
    .size ringvm_start64, . - ringvm_start64

    /* ---------------- GDT ---------------- */
    .section .data.ringvm_gdt, "aw", @progbits
    .balign 16
ringvm_gdt:
    .quad 0                         /* null */
    .quad 0x00af9b000000ffff        /* 0x08: code, L=1, P, DPL0, accessed */
    .quad 0x00cf93000000ffff        /* 0x10: data, flat, writable, accessed */
ringvm_gdt_end:
ringvm_gdt_ptr:                     /* lgdt operand: limit, base */
    .word ringvm_gdt_end - ringvm_gdt - 1
    .quad ringvm_gdt

    /* ------------- page tables ------------- */
    .section .data.ringvm_pagetables, "aw", @progbits
    .balign 4096
    .global ringvm_pml4
ringvm_pml4:
    .quad ringvm_pdpt + 0x3         /* present, writable */
    .fill 511, 8, 0
ringvm_pdpt:
    .quad ringvm_pd + 0x0000 + 0x3
    .quad ringvm_pd + 0x1000 + 0x3
    .quad ringvm_pd + 0x2000 + 0x3
    .quad ringvm_pd + 0x3000 + 0x3
    .fill 508, 8, 0
ringvm_pd:
    .set ringvm_pd_addr, 0
    /* 0 .. 3 GiB: RAM, write-back. P | RW | PS */
    .rept 1536
    .quad ringvm_pd_addr | 0x83
    .set ringvm_pd_addr, ringvm_pd_addr + 0x200000
    .endr
    /* 3 .. 4 GiB: MMIO hole, uncached. P | RW | PWT | PCD | PS */
    .rept 512
    .quad ringvm_pd_addr | 0x9b
    .set ringvm_pd_addr, ringvm_pd_addr + 0x200000
    .endr

    /* ---------------- stack ---------------- */
    .section .bss.ringvm_stack, "aw", @nobits
    .balign 16
ringvm_stack_bottom:
    .skip {stack_size}
    .global ringvm_stack_top
ringvm_stack_top:

    /* ------------- PVH ELF note -------------
     * Elf_Nhdr: namesz = 4, descsz = 8, type = 18 (XEN_ELFNOTE_PHYS32_ENTRY),
     * then name "Xen\0" and desc = the physical address of pvh_start32.
     * The entry is a 32-bit address; it is stored zero-extended in 8 bytes
     * (as 64-bit Linux does) because QEMU reads the descriptor of an ELF64
     * note as a 64-bit value, while loaders that read 4 bytes (linux-loader,
     * Xen) take the low half.
     */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
"#,
    stack_size = const STACK_SIZE,
    options(att_syntax)
);
