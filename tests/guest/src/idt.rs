//! The 64-bit IDT and its handlers.
//!
//! * Vectors 0..31 (exceptions): print `exception: vector N rip=0x..
//!   error=0x..` (plus `cr2=` for page faults) and exit with status 4.
//! * [`IRQ_VECTOR_BASE`] + k, k < [`MAX_IRQ_QUEUES`]: virtqueue k's MSI-X
//!   vector. The stub bumps `RINGVM_IRQ_COUNTS[k]` and writes the local
//!   APIC EOI register; nothing else runs in interrupt context.
//! * [`TIMER_VECTOR`]: the watchdog tick of the local APIC timer, counted
//!   in `RINGVM_IRQ_COUNTS[MAX_IRQ_QUEUES]`, same stub shape.
//! * [`INTX_VECTOR`]: a level-triggered line through the IOAPIC (the `pt`
//!   form's INTx check). The stub bumps `RINGVM_INTX_COUNT`, writes 0 to
//!   the device register at `RINGVM_INTX_DEASSERT` (if set) to deassert
//!   the line, then writes EOI: deassert before EOI, or the EOI's resample
//!   would find the line still high and raise it again. The deassert is
//!   the handler's first device access on purpose: on this host (PVM) the
//!   EOI of a level vector was seen to reach the VMM at the handler's
//!   first VM exit (split irqchip), and KVM's resampler to fire before the
//!   handler's first device access (in-kernel irqchip), rather than at the
//!   EOI write (see tests/passthrough.rs).
//! * [`SPURIOUS_VECTOR`]: `iretq` (spurious APIC interrupts take no EOI).
//!
//! Every gate is a ring-0 interrupt gate (IF cleared on entry) on the
//! current stack. The counter stubs change no register but RAX, which they
//! save; `iretq` restores RFLAGS, so the `inc` flags do not leak. A plain
//! `inc` is atomic with respect to the one vCPU that runs the guest.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

/// First virtqueue interrupt vector.
pub const IRQ_VECTOR_BASE: u8 = 0x40;
/// Number of virtqueue vectors.
pub const MAX_IRQ_QUEUES: usize = 8;
/// Local APIC timer (watchdog) vector.
pub const TIMER_VECTOR: u8 = 0x30;
/// Level-triggered (IOAPIC) line vector.
pub const INTX_VECTOR: u8 = 0x50;
/// Local APIC spurious vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Exit status after an unexpected exception.
pub const STATUS_EXCEPTION: u8 = 4;

/// Interrupt counts: one per virtqueue vector, then the timer.
#[no_mangle]
static RINGVM_IRQ_COUNTS: [AtomicU64; MAX_IRQ_QUEUES + 1] =
    [const { AtomicU64::new(0) }; MAX_IRQ_QUEUES + 1];

/// Linear address of the local APIC EOI register, set by `apic::init`
/// before interrupts are enabled.
#[no_mangle]
pub static RINGVM_APIC_EOI: AtomicU64 = AtomicU64::new(0);

/// Interrupts taken on [`INTX_VECTOR`].
#[no_mangle]
static RINGVM_INTX_COUNT: AtomicU64 = AtomicU64::new(0);

/// Address of the (32-bit) register the INTx stub writes 0 to, to
/// deassert the line; 0 for none.
#[no_mangle]
static RINGVM_INTX_DEASSERT: AtomicU64 = AtomicU64::new(0);

/// Interrupts taken so far on [`INTX_VECTOR`].
pub fn intx_irqs() -> u64 {
    RINGVM_INTX_COUNT.load(Ordering::Relaxed)
}

/// Sets the register the INTx stub writes 0 to (before its EOI).
///
/// # Safety
///
/// `addr` must be a mapped, uncached 32-bit device register whose write of
/// 0 deasserts the line (or 0 for none), for as long as [`INTX_VECTOR`]
/// can fire.
pub unsafe fn set_intx_deassert(addr: u64) {
    RINGVM_INTX_DEASSERT.store(addr, Ordering::Relaxed);
}

/// Interrupts taken so far on virtqueue vector `k`.
pub fn queue_irqs(k: usize) -> u64 {
    RINGVM_IRQ_COUNTS[k].load(Ordering::Relaxed)
}

/// Watchdog timer ticks so far.
pub fn timer_ticks() -> u64 {
    RINGVM_IRQ_COUNTS[MAX_IRQ_QUEUES].load(Ordering::Relaxed)
}

core::arch::global_asm!(
    r#"
    .section .text.ringvm_idt, "ax", @progbits
    /* Exceptions: push a zero error code where the CPU pushes none (all
     * but 8, 10-14, 17, 21, 29, 30: mask 0x60227d00), then the vector. */
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
ringvm_exc_\v:
    .if ((0x60227d00 >> \v) & 1) == 0
    pushq $0
    .endif
    pushq $\v
    jmp ringvm_exc_common
    .endr

ringvm_exc_common:
    movq (%rsp), %rdi               /* vector */
    movq 8(%rsp), %rsi              /* error code */
    movq 16(%rsp), %rdx             /* RIP of the faulting instruction */
    movq %cr2, %rcx
    andq $-16, %rsp
    call ringvm_exception
    ud2

    /* Counter stubs: queue vectors 0..7, then the timer (8). */
    .irp q, 0,1,2,3,4,5,6,7,8
    .balign 16
ringvm_irq_\q:
    incq RINGVM_IRQ_COUNTS+8*\q(%rip)
    pushq %rax
    movq RINGVM_APIC_EOI(%rip), %rax
    movl $0, (%rax)
    popq %rax
    iretq
    .endr

    .balign 16
ringvm_intx:
    incq RINGVM_INTX_COUNT(%rip)
    pushq %rax
    movq RINGVM_INTX_DEASSERT(%rip), %rax
    testq %rax, %rax
    jz 1f
    movl $0, (%rax)
1:
    movq RINGVM_APIC_EOI(%rip), %rax
    movl $0, (%rax)
    popq %rax
    iretq

    .balign 16
ringvm_spurious:
    iretq

    .section .rodata.ringvm_idt, "a", @progbits
    .balign 8
ringvm_exc_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad ringvm_exc_\v
    .endr
ringvm_irq_stubs:
    .irp q, 0,1,2,3,4,5,6,7,8
    .quad ringvm_irq_\q
    .endr
ringvm_spurious_stub:
    .quad ringvm_spurious
ringvm_intx_stub:
    .quad ringvm_intx
"#,
    options(att_syntax)
);

extern "C" {
    static ringvm_exc_stubs: [u64; 32];
    static ringvm_irq_stubs: [u64; MAX_IRQ_QUEUES + 1];
    static ringvm_spurious_stub: u64;
    static ringvm_intx_stub: u64;
}

/// 256 gates of 16 bytes.
#[repr(C, align(16))]
struct Table(UnsafeCell<[u64; 512]>);

// SAFETY: written only by `load` on the single vCPU before `lidt`; the CPU
// reads it afterwards.
unsafe impl Sync for Table {}

static IDT: Table = Table(UnsafeCell::new([0; 512]));

/// The 16-byte interrupt gate for `handler`: selector 0x08, DPL 0, present,
/// type 0xE (64-bit interrupt gate), no IST.
const fn gate(handler: u64) -> [u64; 2] {
    let low =
        (handler & 0xffff) | (0x08 << 16) | (0x8e00 << 32) | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

/// Fills the IDT (exceptions, queue and timer vectors, spurious) and loads
/// it. Other vectors stay not-present: taking one raises #NP, reported as
/// exception 11 with the vector in the error code.
pub fn load() {
    let idt = IDT.0.get().cast::<u64>();
    let set = |vector: u8, handler: u64| {
        let [low, high] = gate(handler);
        // SAFETY: `vector * 2 + 1 < 512`: inside the table, which nothing
        // else references while it is written (interrupts are off).
        unsafe {
            idt.add(usize::from(vector) * 2).write(low);
            idt.add(usize::from(vector) * 2 + 1).write(high);
        }
    };
    // SAFETY: the stub tables are read-only data defined above.
    let (exc, irq, spurious, intx) = unsafe {
        (
            &ringvm_exc_stubs,
            &ringvm_irq_stubs,
            ringvm_spurious_stub,
            ringvm_intx_stub,
        )
    };
    for (v, &h) in exc.iter().enumerate() {
        set(v as u8, h);
    }
    for (k, &h) in irq[..MAX_IRQ_QUEUES].iter().enumerate() {
        set(IRQ_VECTOR_BASE + k as u8, h);
    }
    set(TIMER_VECTOR, irq[MAX_IRQ_QUEUES]);
    set(SPURIOUS_VECTOR, spurious);
    set(INTX_VECTOR, intx);

    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let ptr = Pointer {
        limit: 16 * 256 - 1,
        base: idt as u64,
    };
    // SAFETY: the table holds valid gates for every vector that can fire
    // (interrupts are still off), and lives forever.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags))
    };
}

/// Called by the exception stubs; never returns.
#[no_mangle]
extern "C" fn ringvm_exception(vector: u64, error: u64, rip: u64, cr2: u64) -> ! {
    let mut out = crate::serial::Serial::attach(crate::serial::COM1);
    out.write_str("exception: vector ");
    out.write_dec(vector);
    out.write_str(" rip=");
    out.write_hex(rip);
    out.write_str(" error=");
    out.write_hex(error);
    if vector == 14 {
        out.write_str(" cr2=");
        out.write_hex(cr2);
    }
    out.write_str("\n");
    crate::finish(&mut out, STATUS_EXCEPTION)
}

/// Enables interrupts for exactly one `hlt`: `sti` delays interrupt
/// recognition by one instruction, so an interrupt that became pending
/// before the `sti` still wakes the `hlt`. Returns with interrupts off.
pub fn wait_for_interrupt() {
    // Not `nomem`: the asm is a compiler barrier for what the handlers and
    // the device wrote meanwhile.
    // SAFETY: the IDT is loaded; handlers only bump counters and write EOI.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nostack)) };
}

/// Runs a bounded empty loop of `iterations` turns (at least one) with
/// interrupts enabled, then disables them again: a window in which pending
/// interrupts are taken without waiting for one (unlike `hlt`). Each turn
/// is two instructions.
pub fn spin_with_interrupts(iterations: u32) {
    // Not `nomem`: a compiler barrier for what the handlers wrote.
    // SAFETY: the IDT is loaded; handlers only bump counters and write EOI.
    // The loop only counts a register down.
    unsafe {
        core::arch::asm!(
            "sti",
            "2:",
            "dec {n:e}",
            "jnz 2b",
            "cli",
            n = inout(reg) iterations.max(1) => _,
            options(nostack)
        )
    };
}
