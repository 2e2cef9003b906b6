//! The INTx check: the device's level-triggered line through the IOAPIC.
//!
//! MSI-X is disabled and INTx enabled in the command register; the
//! IOAPIC entry of the pin in the interrupt line register is programmed
//! level-triggered, active high, fixed, to this CPU, on
//! [`idt::INTX_VECTOR`]. The device then asserts the line `pt.intx` times,
//! one after the other; the handler deasserts it through the device's
//! INTX register and EOIs. Each interrupt after the first arrives only if
//! the VMM turned the EOI into an unmask of the device's INTx (VFIO masks
//! it on every assertion). Then the entry is masked, the line asserted
//! (the interrupt must not arrive) and the entry unmasked: the interrupt
//! must arrive now, whether the IOAPIC kept it pending (in-kernel) or the
//! VMM resampled the line on the unmask (split irqchip).
//!
//! Fewer interrupts than assertions is a failure; more is reported in the
//! count, not failed: a level interrupt delivered twice for one assertion
//! (the resample ran before the handler deasserted the line) is harmless
//! to a driver, and with the in-kernel irqchip on this host it happens.

use super::device::Regs;
use super::run::{failed, wait_until, P, SPIN};
use crate::apic::Lapic;
use crate::idt;
use crate::ioapic::{level_entry, Ioapic};
use crate::pci::{self, Function};
use crate::serial::Serial;

const INTERRUPT_LINE: u8 = 0x3c;
const INTERRUPT_PIN: u8 = 0x3d;

/// What the INTx check found.
pub struct IntxResult {
    /// Interrupts taken for the `pt.intx` assertions (more than asked
    /// when an assertion was delivered twice; see the module comment).
    pub irqs: u64,
    /// The assertion made while the entry was masked stayed silent and
    /// arrived on unmask.
    pub unmask: bool,
}

/// Runs the check with `count` assertions (MSI-X is disabled first).
pub fn check(
    out: &mut Serial,
    errors: &mut u64,
    (func, regs, lapic, count, timeout): (Function, Regs, &Lapic, u32, u64),
) -> IntxResult {
    let mut result = IntxResult {
        irqs: 0,
        unmask: false,
    };
    let (line, pin) = (func.read8(INTERRUPT_LINE), func.read8(INTERRUPT_PIN));
    if pin == 0 {
        failed(
            out,
            errors,
            &[P::S("INTx: the function has no interrupt pin")],
        );
        return result;
    }
    let ioapic = match Ioapic::map() {
        Ok(io) => io,
        Err(m) => {
            failed(out, errors, &[P::S("INTx: "), P::S(m)]);
            return result;
        }
    };
    let gsi = u32::from(line);
    if gsi >= ioapic.pins() {
        let parts = [
            P::S("INTx: interrupt line "),
            P::Dec(line.into()),
            P::S(" is not an IOAPIC pin"),
        ];
        failed(out, errors, &parts);
        return result;
    }
    let entry = level_entry(idt::INTX_VECTOR, lapic.id, false);
    let masked = level_entry(idt::INTX_VECTOR, lapic.id, true);
    // SAFETY: BAR0 is mapped uncached and decoded; writing 0 to INTX
    // deasserts the line and does nothing else.
    unsafe { idt::set_intx_deassert(regs.intx_register()) };
    ioapic.set_entry(gsi, entry);
    // SAFETY: INTx replaces MSI-X, which is disabled; the handler is in
    // place.
    unsafe { func.disable(pci::CMD_INTX_DISABLE) };

    for k in 1..=u64::from(count) {
        regs.set_intx(true);
        if !wait_until(|| idt::intx_irqs() >= k, timeout) {
            let parts = [P::S("INTx: interrupt "), P::Dec(k), P::S(" never arrived")];
            failed(out, errors, &parts);
            break;
        }
    }
    // A duplicate gets its window too.
    idt::spin_with_interrupts(SPIN);
    result.irqs = idt::intx_irqs();
    if result.irqs < u64::from(count) {
        let parts = [
            P::S("INTx: interrupts (expected "),
            P::Dec(count.into()),
            P::S("): "),
            P::Dec(result.irqs),
        ];
        failed(out, errors, &parts);
    }

    // Asserted while the entry is masked: silent until unmasked.
    ioapic.set_entry(gsi, masked);
    let before = idt::intx_irqs();
    regs.set_intx(true);
    idt::spin_with_interrupts(SPIN);
    let silent = idt::intx_irqs() == before;
    if !silent {
        failed(
            out,
            errors,
            &[P::S("INTx: a masked IOAPIC entry interrupted")],
        );
    }
    ioapic.set_entry(gsi, entry);
    let arrived = wait_until(|| idt::intx_irqs() > before, timeout);
    if !arrived {
        let parts = [P::S("INTx: no interrupt after unmasking the IOAPIC entry")];
        failed(out, errors, &parts);
    }
    result.unmask = silent && arrived;

    ioapic.set_entry(gsi, masked);
    // SAFETY: turning INTx off again has no other effect.
    unsafe { func.enable(pci::CMD_INTX_DISABLE) };
    regs.set_intx(false);
    // SAFETY: 0 means "no register".
    unsafe { idt::set_intx_deassert(0) };
    result
}
