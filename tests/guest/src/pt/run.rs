//! The `pt` checks, in order, and the result line.

use super::device::{self, Caps, Regs, BAR0_LEN, BAR2_LEN, DMA_DONE, ID_VALUE};
use super::intx;
use super::options::{self, OptError, Options};
use crate::apic::Lapic;
use crate::cmdline::Cmdline;
use crate::msix::{self, Msix, Pba};
use crate::pci::{self, Function};
use crate::serial::Serial;
use crate::{apic, finish, idt, paging};
use core::sync::atomic::{compiler_fence, Ordering};

/// Exit status when a check failed, or for a bad option.
const STATUS_FAILED: u8 = 1;
/// Exit status when the device is missing or broken.
const STATUS_BROKEN: u8 = 2;
/// Capability ID of PCI Express, which the VMM must hide.
const CAP_PCIE: u8 = 0x10;
/// BAR2 offset of the word the window test writes (inside the part the
/// VMM maps straight into the guest).
const WINDOW_OFFSET: u32 = 0x100;
const WINDOW_PATTERN: u32 = 0xa55a_c33c;
/// Turns of the interrupts-enabled spin that gives a masked (or stray)
/// interrupt its chance to arrive: 2 instructions each, so about 40 ms
/// at the emulator's ~1M instructions/s.
pub(super) const SPIN: u32 = 20_000;
/// PBA reads while waiting for a pending bit to settle, and the
/// interrupts-enabled spin between two reads (a VMM may update its PBA
/// from another thread).
const PBA_POLLS: u32 = 256;
const PBA_SPIN: u32 = 64;

fn write_bdf(out: &mut Serial, f: Function) {
    out.write_str("00:");
    out.write_hex_digits(f.dev.into(), 2);
    out.write_str(".");
    out.write_dec(f.func.into());
}

/// A piece of an output line.
#[derive(Clone, Copy)]
pub(super) enum P<'a> {
    S(&'a str),
    Dec(u64),
    Hex(u64),
}

fn write_parts(out: &mut Serial, parts: &[P<'_>]) {
    for p in parts {
        match *p {
            P::S(s) => out.write_str(s),
            P::Dec(v) => out.write_dec(v),
            P::Hex(v) => out.write_hex(v),
        }
    }
    out.write_str("\n");
}

/// Prints `error: pt: [00:DD.F: ]<parts>` and exits with status 2.
fn broken(out: &mut Serial, func: Option<Function>, parts: &[P<'_>]) -> ! {
    out.write_str("error: pt: ");
    if let Some(f) = func {
        write_bdf(out, f);
        out.write_str(": ");
    }
    write_parts(out, parts);
    finish(out, STATUS_BROKEN)
}

fn usage(out: &mut Serial, parts: &[&str]) -> ! {
    out.write_str("error: ");
    for p in parts {
        out.write_str(p);
    }
    out.write_str("\n");
    finish(out, STATUS_FAILED)
}

/// Prints `pt: <parts>` for a failed check and counts it.
pub(super) fn failed(out: &mut Serial, errors: &mut u64, parts: &[P<'_>]) {
    out.write_str("pt: ");
    write_parts(out, parts);
    *errors += 1;
}

/// The first function on bus 0 with `vendor`/`device`.
fn find(vendor: u16, device: u16) -> Option<Function> {
    let want = u32::from(vendor) | (u32::from(device) << 16);
    pci::functions().find(|&(_, id)| id == want).map(|(f, _)| f)
}

/// Sleeps until vector `k` has taken `want` interrupts; false after
/// `timeout` watchdog ticks (0: never).
fn wait_irqs(k: usize, want: u64, timeout: u64) -> bool {
    wait_until(|| idt::queue_irqs(k) >= want, timeout)
}

/// Sleeps (interrupts on for each `hlt`) until `done` holds; false after
/// `timeout` watchdog ticks (0: never).
pub(super) fn wait_until(done: impl Fn() -> bool, timeout: u64) -> bool {
    let start = idt::timer_ticks();
    loop {
        if done() {
            return true;
        }
        if timeout != 0 && idt::timer_ticks() - start >= timeout {
            return false;
        }
        idt::wait_for_interrupt();
    }
}

/// Reads the pending bit of `index` until it equals `want` (bounded).
fn pba_settles(pba: &Pba, index: u16, want: bool) -> bool {
    for _ in 0..PBA_POLLS {
        if pba.pending(index) == want {
            return true;
        }
        idt::spin_with_interrupts(PBA_SPIN);
    }
    false
}

/// What the interrupt checks found.
struct IrqResult {
    masked_silent: Option<bool>,
    pending_delivered: Option<bool>,
    irqs: u64,
}

/// MSI-X: every vector but the masked one rings and interrupts once; the
/// masked one stays silent with its pending bit set, then arrives once
/// unmasked and its bit clears.
fn interrupts(
    out: &mut Serial,
    errors: &mut u64,
    (o, regs, msix, pba, lapic): (&Options, Regs, &Msix, &Pba, &Lapic),
) -> IrqResult {
    let n = o.vectors as usize;
    msix.enable_masked();
    for k in 0..n {
        msix.set_entry(k as u16, lapic.id, idt::IRQ_VECTOR_BASE + k as u8);
    }
    msix.unmask_function();

    let masked = o.mask.map(|m| m as usize);
    for k in (0..n).filter(|&k| Some(k) != masked) {
        regs.ring(k as u32);
        if !wait_irqs(k, 1, o.timeout) {
            failed(
                out,
                errors,
                &[P::S("no interrupt on vector "), P::Dec(k as u64)],
            );
        }
    }

    let (mut masked_silent, mut pending_delivered) = (None, None);
    if let Some(v) = masked {
        let index = v as u16;
        msix.set_masked(index, true);
        regs.ring(v as u32);
        idt::spin_with_interrupts(SPIN);
        let silent = idt::queue_irqs(v) == 0;
        if !silent {
            failed(
                out,
                errors,
                &[
                    P::S("masked vector "),
                    P::Dec(v as u64),
                    P::S(" interrupted"),
                ],
            );
        }
        let was_pending = pba_settles(pba, index, true);
        if !was_pending {
            failed(
                out,
                errors,
                &[P::S("PBA bit not set for masked vector "), P::Dec(v as u64)],
            );
        }
        let before = idt::queue_irqs(v);
        msix.set_masked(index, false);
        let arrived = wait_irqs(v, before + 1, o.timeout);
        if !arrived {
            failed(
                out,
                errors,
                &[
                    P::S("no interrupt after unmasking vector "),
                    P::Dec(v as u64),
                ],
            );
        }
        let cleared = pba_settles(pba, index, false);
        if !cleared {
            failed(
                out,
                errors,
                &[P::S("PBA bit still set for vector "), P::Dec(v as u64)],
            );
        }
        masked_silent = Some(silent);
        pending_delivered = Some(was_pending && arrived && cleared);
    }

    // Late or duplicate messages get a window too, then every vector must
    // have interrupted exactly once.
    idt::spin_with_interrupts(SPIN);
    let mut irqs = 0;
    for k in 0..n {
        let got = idt::queue_irqs(k);
        irqs += got;
        if got != 1 {
            let parts = [
                P::S("vector "),
                P::Dec(k as u64),
                P::S(": interrupts (expected 1): "),
                P::Dec(got),
            ];
            failed(out, errors, &parts);
        }
    }
    IrqResult {
        masked_silent,
        pending_delivered,
        irqs,
    }
}

/// BAR2: a word written through the guest's mapping is what the device
/// reads from its own memory.
fn window(out: &mut Serial, errors: &mut u64, regs: Regs, bar2: u64) -> bool {
    let at = bar2 + u64::from(WINDOW_OFFSET);
    // SAFETY: inside the mapped BAR2 window; plain memory on the device.
    unsafe { crate::mmio::write32(at, WINDOW_PATTERN) };
    let peek = regs.peek(WINDOW_OFFSET);
    // SAFETY: as above.
    let back = unsafe { crate::mmio::read32(at) };
    let ok = peek == WINDOW_PATTERN && back == WINDOW_PATTERN;
    if !ok {
        let parts = [
            P::S("BAR2 window: wrote "),
            P::Hex(WINDOW_PATTERN.into()),
            P::S(", device peeks "),
            P::Hex(peek.into()),
            P::S(", reads back "),
            P::Hex(back.into()),
        ];
        failed(out, errors, &parts);
    }
    ok
}

/// DMA: the device copies a pattern between two buffers in guest RAM.
fn dma(out: &mut Serial, errors: &mut u64, regs: Regs, len: u32) -> bool {
    device::prepare(len);
    let (src, dst) = device::dma_addresses();
    compiler_fence(Ordering::SeqCst);
    // SAFETY: the destination buffer is only accessed through raw pointers,
    // none of them live now.
    let status = unsafe { regs.dma(src, dst, len) };
    compiler_fence(Ordering::SeqCst);
    let bad = device::check(len);
    let ok = status == DMA_DONE && bad.is_none();
    if !ok {
        let parts = [P::S("DMA status="), P::Dec(status.into())];
        match bad {
            Some(at) => failed(
                out,
                errors,
                &[
                    parts[0],
                    parts[1],
                    P::S(", first bad byte "),
                    P::Dec(at as u64),
                ],
            ),
            None => failed(out, errors, &[parts[0], parts[1], P::S(", data ok")]),
        }
    }
    ok
}

fn write_caps(out: &mut Serial, caps: &Caps, with_offsets: bool) {
    let mut first = true;
    for (at, id) in caps.iter() {
        if !first {
            out.write_str(if with_offsets { " " } else { "," });
        }
        first = false;
        out.write_str("0x");
        out.write_hex_digits(id.into(), 2);
        if with_offsets {
            out.write_str("@0x");
            out.write_hex_digits(at.into(), 2);
        }
    }
    if first {
        out.write_str("none");
    }
}

fn flag(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "1",
        Some(false) => "0",
        None => "skip",
    }
}

/// Runs the checks the `pt.*` options describe and exits. `exit` is the
/// explicit `exit=N`, which overrides the 0/1 result status.
pub fn run(out: &mut Serial, args: &Cmdline<'_>, exit: Option<u8>) -> ! {
    let o = match options::parse(args) {
        Ok(o) => o,
        Err(OptError::Unknown(k)) => usage(out, &["unknown option pt.", k]),
        Err(OptError::Bad(k, v)) => usage(out, &["bad pt.", k, "=", v]),
        Err(OptError::MaskOutOfRange) => usage(out, &["pt.mask must be below pt.vectors"]),
    };
    let Some(func) = find(o.vendor, o.device) else {
        let parts = [
            P::S("no PCI function with vendor "),
            P::Hex(o.vendor.into()),
            P::S(" device "),
            P::Hex(o.device.into()),
            P::S(" on bus 0"),
        ];
        broken(out, None, &parts);
    };
    let f = Some(func);
    let mut errors = 0;

    let caps = Caps::read(func);
    out.write_str("pt: caps ");
    write_caps(out, &caps, true);
    out.write_str(if caps.looped { " (loops)\n" } else { "\n" });
    if caps.looped {
        broken(out, f, &[P::S("capability list loops")]);
    }
    if caps.find(CAP_PCIE).is_some() {
        failed(
            out,
            &mut errors,
            &[P::S("PCI Express capability is visible")],
        );
    }
    let msix_cap = caps
        .find(msix::CAP_ID)
        .unwrap_or_else(|| broken(out, f, &[P::S("no MSI-X capability")]));

    let bar = |i: u8| func.bar(i).map_err(|e| e.describe());
    let bar0 = bar(0).unwrap_or_else(|m| broken(out, f, &[P::S("BAR0: "), P::S(m)]));
    let bar2 = bar(2).unwrap_or_else(|m| broken(out, f, &[P::S("BAR2: "), P::S(m)]));
    for (addr, len) in [(bar0, BAR0_LEN), (bar2, BAR2_LEN)] {
        if paging::map_uncached(addr, len).is_err() {
            broken(out, f, &[P::S("cannot map BAR at "), P::Hex(addr)]);
        }
    }
    // SAFETY: the device DMAs only where the guest tells it to, into its
    // own buffers; INTx is replaced by MSI-X.
    unsafe { func.enable(pci::CMD_MEMORY | pci::CMD_BUS_MASTER | pci::CMD_INTX_DISABLE) };
    // SAFETY: BAR0 is mapped for BAR0_LEN bytes and decoding is on.
    let regs = unsafe { Regs::new(bar0) };
    let id = regs.id();
    if id != ID_VALUE {
        let parts = [
            P::S("ID register reads "),
            P::Hex(id.into()),
            P::S(", expected "),
            P::Hex(ID_VALUE.into()),
        ];
        broken(out, f, &parts);
    }
    let msix = Msix::probe(func, msix_cap, bar).unwrap_or_else(|m| broken(out, f, &[P::S(m)]));
    if u32::from(msix.size) < o.vectors {
        broken(out, f, &[P::S("fewer MSI-X vectors than pt.vectors")]);
    }
    let pba = msix.pba(bar).unwrap_or_else(|m| broken(out, f, &[P::S(m)]));

    out.write_str("pt: ");
    write_bdf(out, func);
    out.write_str(" bar0=");
    out.write_hex(bar0);
    out.write_str(" bar2=");
    out.write_hex(bar2);
    out.write_str(" msix=");
    out.write_dec(msix.size.into());
    out.write_str("\n");

    idt::load();
    let lapic = apic::init().unwrap_or_else(|m| broken(out, None, &[P::S(m)]));
    lapic.start_watchdog();
    let irq = interrupts(out, &mut errors, (&o, regs, &msix, &pba, &lapic));
    let intx = (o.intx != 0).then(|| {
        msix.disable();
        let args = (func, regs, &lapic, o.intx, o.timeout);
        intx::check(out, &mut errors, args)
    });
    lapic.stop_watchdog();
    let bar2_ok = window(out, &mut errors, regs, bar2);
    let dma_ok = (o.dma != 0).then(|| dma(out, &mut errors, regs, o.dma));

    out.write_str("RINGVM-RESULT mode=pt vectors=");
    out.write_dec(o.vectors.into());
    out.write_str(" irqs=");
    out.write_dec(irq.irqs);
    out.write_str(" masked_silent=");
    out.write_str(flag(irq.masked_silent));
    out.write_str(" pending_delivered=");
    out.write_str(flag(irq.pending_delivered));
    out.write_str(if bar2_ok { " bar2=ok" } else { " bar2=bad" });
    out.write_str(match dma_ok {
        Some(true) => " dma=ok",
        Some(false) => " dma=bad",
        None => " dma=skip",
    });
    match intx {
        Some(r) => {
            out.write_str(" intx=");
            out.write_dec(r.irqs);
            out.write_str(" intx_unmask=");
            out.write_str(flag(Some(r.unmask)));
        }
        None => out.write_str(" intx=skip intx_unmask=skip"),
    }
    out.write_str(" caps=");
    write_caps(out, &caps, false);
    out.write_str(" errors=");
    out.write_dec(errors);
    out.write_str("\n");
    let status = exit.unwrap_or(if errors == 0 { 0 } else { STATUS_FAILED });
    finish(out, status)
}
