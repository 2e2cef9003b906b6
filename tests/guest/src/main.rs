//! ringvm built-in test guest.
//!
//! A tiny PVH guest for x86_64 that reports what the VMM gave it (command
//! line, vCPU count) on COM1 and exits with a status through the debug-exit
//! port. It is built to execute as few instructions as possible: the boot
//! path is static data plus a short 32-bit stub (see [`boot`]).
//!
//! Output (one line each):
//!
//! ```text
//! ringvm-guest 0.1.0: hello from the built-in guest
//! cmdline: <command line>
//! cpus: N (from mptable|from acpi)      or   cpus: 0 (no mptable or acpi)
//! RINGVM-RESULT mode=boot cpus=N exit=S
//! ```
//!
//! Options: `exit=N` (0..=255, default 0) is the exit status.
//!
//! With any `blk.*` option the guest runs its second form instead: a
//! virtio-blk workload over virtio-pci with MSI-X interrupts (see [`blk`]
//! and README.md). Without one, nothing touches PCI or interrupts.
//! With any `net.*` option it runs its third form: a virtio-net driver and
//! a minimal IPv4 peer (see [`net`]).

#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
// Host unit tests only exercise the pure parsers.
#![cfg_attr(test, allow(dead_code, unused_imports))]

#[cfg(not(test))]
mod apic;
mod blk;
#[cfg(not(test))]
mod boot;
mod cmdline;
mod crc;
mod exit;
#[cfg(not(test))]
mod idt;
#[cfg(not(test))]
mod ioapic;
mod mmio;
mod msix;
mod net;
mod paging;
mod pattern;
mod pci;
mod phys;
mod platform;
mod port;
mod pt;
mod pvh;
mod serial;
mod tsc;
mod virtio;

use cmdline::Cmdline;
use platform::Source;
use serial::Serial;

/// Greeting line, first thing printed.
const GREETING: &str = concat!(
    "ringvm-guest ",
    env!("CARGO_PKG_VERSION"),
    ": hello from the built-in guest\n"
);

/// Exit status for a bad command line.
const STATUS_USAGE: u8 = 1;
/// Exit status after a panic.
const STATUS_PANIC: u8 = 3;

/// Rust entry point, called by the boot stub with the guest-physical address
/// of `hvm_start_info` (from EBX), on the boot stack, in 64-bit mode.
#[cfg(not(test))]
#[no_mangle]
pub extern "C" fn rust_main(start_info_paddr: u64) -> ! {
    let mut out = Serial::init(serial::COM1);
    out.write_str(GREETING);

    let info = match pvh::StartInfo::read(start_info_paddr) {
        Ok(info) => info,
        Err(e) => {
            out.write_str("warning: no usable hvm_start_info (");
            match e {
                pvh::Error::Unreadable => out.write_str("unreadable"),
                pvh::Error::BadMagic => out.write_str("bad magic"),
            }
            out.write_str(")\n");
            pvh::StartInfo::default()
        }
    };

    let raw_cmdline = info.cmdline();
    out.write_str("cmdline: ");
    out.write_bytes(raw_cmdline);
    out.write_str("\n");

    let cpus = platform::count_cpus(info.rsdp_paddr);
    out.write_str("cpus: ");
    out.write_dec(cpus.cpus.into());
    out.write_str(match cpus.source {
        Source::MpTable => " (from mptable)\n",
        Source::Acpi => " (from acpi)\n",
        Source::None => " (no mptable or acpi)\n",
    });

    let args = Cmdline::new(raw_cmdline);
    let boot = args.boot();
    if let Some(list) = boot.cpuid {
        print_cpuid(&mut out, list);
    }
    if let Some(action) = boot.acpi {
        acpi_action(&mut out, action, info.rsdp_paddr);
    }
    let explicit_status = match boot.exit {
        None => None,
        Some(value) => match cmdline::parse_u64(value).and_then(|n| u8::try_from(n).ok()) {
            Some(status) => Some(status),
            None => {
                out.write_str("error: bad exit=");
                out.write_str(value);
                out.write_str("\n");
                finish(&mut out, STATUS_USAGE)
            }
        },
    };

    // Second form: a virtio-blk workload. Without `blk.*` options nothing
    // touches PCI or interrupts.
    if boot.blk {
        blk::run(&mut out, &args, explicit_status);
    }
    // Third form: a virtio-net driver and a minimal IPv4 peer.
    if boot.net {
        net::run(&mut out, &args, explicit_status);
    }
    // Fourth form: checks of a passed-through PCI function (`pt.*`).
    if boot.pt {
        pt::run(&mut out, &args, explicit_status);
    }
    let status = explicit_status.unwrap_or(0);

    out.write_str("RINGVM-RESULT mode=boot cpus=");
    out.write_dec(cpus.cpus.into());
    out.write_str(" exit=");
    out.write_dec(status.into());
    out.write_str("\n");
    finish(&mut out, status)
}

/// Prints one `cpuid: LEAF.SUBLEAF eax=.. ebx=.. ecx=.. edx=..` line for
/// each `LEAF[.SUBLEAF]` of the comma-separated `list` (the `cpuid=`
/// option), so the host can check what the guest sees.
#[cfg(not(test))]
fn print_cpuid(out: &mut Serial, list: &str) {
    for item in list.split(',') {
        let (leaf, sub) = match item.split_once('.') {
            Some((l, s)) => (cmdline::parse_u64(l), cmdline::parse_u64(s)),
            None => (cmdline::parse_u64(item), Some(0)),
        };
        let (Some(leaf), Some(sub)) = (leaf, sub) else {
            out.write_str("error: bad cpuid=");
            out.write_str(item);
            out.write_str("\n");
            continue;
        };
        let r = core::arch::x86_64::__cpuid_count(leaf as u32, sub as u32);
        out.write_str("cpuid: ");
        out.write_hex(leaf);
        out.write_str(".");
        out.write_dec(sub);
        for (name, v) in [
            (" eax=", r.eax),
            (" ebx=", r.ebx),
            (" ecx=", r.ecx),
            (" edx=", r.edx),
        ] {
            out.write_str(name);
            out.write_hex(v.into());
        }
        out.write_str("\n");
    }
}

#[cfg(test)]
fn print_cpuid(_out: &mut Serial, _list: &str) {}

/// `acpi=poweroff` enters S5 and `acpi=reset` resets through the FADT's
/// registers (found from the PVH RSDP pointer, else by the legacy scan),
/// as an ACPI kernel does. Prints what it writes; if the VM is still
/// running afterwards, says so and exits with 1.
#[cfg(not(test))]
fn acpi_action(out: &mut Serial, action: &str, rsdp_hint: u64) {
    use platform::acpi;
    let rsdp = match rsdp_hint {
        0 => acpi::find_rsdp(),
        a => Some(a),
    };
    let Some(regs) = rsdp.and_then(acpi::power_regs) else {
        out.write_str("error: no ACPI power-off/reset registers\n");
        finish(out, STATUS_USAGE)
    };
    if action == "button" {
        wait_for_power_button(out);
    }
    let (port, value) = match action {
        "poweroff" | "button" => (regs.sleep_control, (regs.s5_type << 2) | (1 << 5)),
        "reset" => (regs.reset, regs.reset_value),
        _ => {
            out.write_str("error: bad acpi=");
            out.write_str(action);
            out.write_str("\n");
            finish(out, STATUS_USAGE)
        }
    };
    out.write_str("acpi: ");
    out.write_str(action);
    out.write_str(": writing ");
    out.write_hex(value.into());
    out.write_str(" to port ");
    out.write_hex(port.into());
    out.write_str("\n");
    out.flush();
    // SAFETY: a port write to the register the firmware tables name; the
    // VMM stops the VM on it.
    unsafe { port::outb(port, value) };
    out.write_str("error: the VM is still running after acpi=");
    out.write_str(action);
    out.write_str("\n");
    finish(out, STATUS_USAGE)
}

/// ringvm's GED: its interrupt (GSI) and status port, as its DSDT
/// describes them (`_CRS` and the `GDST` operation region).
#[cfg(not(test))]
const GED_GSI: u32 = 10;
#[cfg(not(test))]
const GED_STATUS_PORT: u16 = 0x603;

/// `acpi=button`: routes the GED's interrupt through the IOAPIC (edge,
/// active high, to this CPU), waits for it, reads the GED status (bit 0:
/// power button) and returns when the button was pressed, as an ACPI
/// kernel's GED handler and power-button driver do.
#[cfg(not(test))]
fn wait_for_power_button(out: &mut Serial) {
    idt::load();
    let lapic = match apic::init() {
        Ok(l) => l,
        Err(m) => {
            out.write_str("error: ");
            out.write_str(m);
            out.write_str("\n");
            finish(out, STATUS_USAGE)
        }
    };
    let Ok(io) = ioapic::Ioapic::map() else {
        out.write_str("error: cannot map the IOAPIC\n");
        finish(out, STATUS_USAGE)
    };
    // Fixed, physical, edge, active high, unmasked.
    io.set_entry(
        GED_GSI,
        (u64::from(lapic.id) << 56) | u64::from(idt::INTX_VECTOR),
    );
    out.write_str("acpi: waiting for the power button\n");
    out.flush();
    loop {
        idt::wait_for_interrupt();
        if idt::intx_irqs() == 0 {
            continue;
        }
        // SAFETY: reading the GED status port only clears its events.
        let status = unsafe { port::inb(GED_STATUS_PORT) };
        out.write_str("acpi: GED interrupt, status ");
        out.write_hex(status.into());
        out.write_str("\n");
        if status & 1 != 0 {
            return;
        }
    }
}

#[cfg(test)]
fn acpi_action(_out: &mut Serial, _action: &str, _rsdp_hint: u64) {}

/// Drains the UART and exits with `status`.
pub(crate) fn finish(out: &mut Serial, status: u8) -> ! {
    out.flush();
    exit::exit(status)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write;
    let mut out = Serial::attach(serial::COM1);
    let _ = write!(out, "panic: {}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(out, " at {}:{}:{}", loc.file(), loc.line(), loc.column());
    }
    out.write_str("\n");
    finish(&mut out, STATUS_PANIC)
}
