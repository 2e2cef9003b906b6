//! Ending the guest with a status.

use crate::port::outb;

/// Debug-exit port. QEMU's `isa-debug-exit,iobase=0xf4` ends QEMU with exit
/// code `(status << 1) | 1`; ringvm ends with `status`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// i8042 keyboard controller command port; command 0xFE pulses CPU reset.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Exits with `status` via the debug-exit port; falls back to an i8042
/// reset and finally halts forever.
pub fn exit(status: u8) -> ! {
    // SAFETY: port 0xf4 is the debug-exit device (or nothing); a one-byte
    // write there ends the VM and has no other effect.
    unsafe { outb(DEBUG_EXIT_PORT, status) };
    // Still running: no debug-exit device. Ask the keyboard controller to
    // reset the machine.
    // SAFETY: a reset request loses no memory safety: nothing runs after it.
    unsafe { outb(I8042_COMMAND, I8042_RESET) };
    loop {
        // SAFETY: disabling interrupts and halting touches no memory.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Stops doing anything, for good, without ending the VM: interrupts off,
/// halted (with an in-kernel irqchip this never returns to the VMM).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: disabling interrupts and halting touches no memory.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
