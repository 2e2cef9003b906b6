//! PCI passthrough end to end: the built-in guest's `pt.*` form drives the
//! vfio-user test device (tests/devices) through ringvm's passthrough
//! device model: found on the PCI bus with PCI Express hidden, MSI-X
//! vectors raised by the doorbell and taken through the guest's IDT, a
//! masked vector that stays silent and shows in the PBA, the mmapped BAR
//! window, a DMA copy, and level-triggered INTx through the IOAPIC under
//! both irqchips. The misbehaving variants of the device end in
//! a clear attach error or a guest that finds the device gone, never in a
//! crash. With `RINGVM_TEST_VFIO_DEVICE` naming a function bound to
//! vfio-pci, an ignored test attaches a real device.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{kvm_available, result_fields, run_ringvm, Outcome, TempDir};
use ringvm_test_devices::vfio_user_dev::{self, Behaviour, TestDevice};

const DEADLINE: Duration = Duration::from_secs(300);

fn device(dir: &TempDir, behaviour: Behaviour) -> (TestDevice, PathBuf) {
    let socket = dir.path().join("dev.sock");
    let dev = vfio_user_dev::spawn(&socket, behaviour).expect("starting the test device");
    (dev, socket)
}

/// Boots the built-in guest with the device at `socket` and `cmdline`,
/// with the default irqchip (split).
fn boot(socket: &std::path::Path, cmdline: &str) -> Outcome {
    boot_args(socket, cmdline, &[])
}

/// As [`boot`], with the given `--irqchip`.
fn boot_with(socket: &std::path::Path, cmdline: &str, irqchip: &str) -> Outcome {
    boot_args(socket, cmdline, &["--irqchip", irqchip])
}

fn boot_args(socket: &std::path::Path, cmdline: &str, extra: &[&str]) -> Outcome {
    let spec = format!("socket={}", socket.display());
    let mut args = vec![
        "run",
        "--kernel",
        "builtin",
        "--memory",
        "128M",
        "--user-device",
        &spec,
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    run_ringvm(&args, DEADLINE)
}

/// The one error line of a refused attach.
fn attach_error(out: &Outcome) -> &str {
    assert_eq!(out.code, Some(2), "{out:#?}");
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("ringvm: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "{out:#?}");
    assert!(
        !out.stdout.contains("RINGVM-RESULT"),
        "the guest must not run: {out:#?}"
    );
    lines[0]
}

#[test]
fn guest_drives_the_test_device_through_msix_the_bar_window_and_dma() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pt-good");
    let (dev, socket) = device(&dir, Behaviour::Good);
    let out = boot(&socket, "pt.vectors=4 pt.mask=1 pt.dma=4096 pt.timeout=30");
    assert_eq!(out.code, Some(0), "{out:#?}");
    let f = result_fields(&out.stdout).unwrap_or_else(|| panic!("no RINGVM-RESULT: {out:#?}"));
    for (k, v) in [
        ("mode", "pt"),
        ("vectors", "4"),
        ("masked_silent", "1"),
        ("pending_delivered", "1"),
        ("bar2", "ok"),
        ("dma", "ok"),
        ("caps", "0x11,0x05,0x09"),
        ("errors", "0"),
    ] {
        assert_eq!(
            f.get(k).map(String::as_str),
            Some(v),
            "{k} in {f:?}\n{out:#?}"
        );
    }
    let s = dev.stats();
    assert!(s.doorbells >= 4, "{s:?}");
    assert_eq!(s.dma_copies, 1, "{s:?}");
    // Reset on attach and again on detach, when the VM stopped.
    assert_eq!(s.resets, 2, "{s:?}");
    assert!(s.dma_maps >= 1, "{s:?}");
}

#[test]
fn every_vector_reaches_the_guest() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pt-all");
    let (_dev, socket) = device(&dir, Behaviour::Good);
    let out = boot(&socket, "pt.vectors=8 pt.mask=7 pt.dma=0 pt.timeout=30");
    assert_eq!(out.code, Some(0), "{out:#?}");
    let f = result_fields(&out.stdout).unwrap();
    assert_eq!(f["vectors"], "8", "{f:?}");
    assert_eq!(f["masked_silent"], "1", "{f:?}");
    assert_eq!(f["errors"], "0", "{f:?}");
}

#[test]
fn msix_passthrough_works_with_the_in_kernel_irqchip() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("pt-kernel");
    let (_dev, socket) = device(&dir, Behaviour::Good);
    let out = boot_with(&socket, "pt.vectors=4 pt.mask=2 pt.timeout=30", "kernel");
    assert_eq!(out.code, Some(0), "{out:#?}");
    let f = result_fields(&out.stdout).unwrap();
    assert_eq!(
        (f["masked_silent"].as_str(), f["pending_delivered"].as_str()),
        ("1", "1"),
        "{f:?}"
    );
    assert_eq!(
        (f["dma"].as_str(), f["errors"].as_str()),
        ("ok", "0"),
        "{f:?}"
    );
    // The test device's INTx pin is wired.
    assert!(!out.stderr.contains("INTx"), "{out:#?}");
}

/// `pt.intx=5`: MSI-X off, INTx on; the device asserts its level line
/// five times and the guest's handler deasserts it and EOIs. Every
/// interrupt after the first needs the EOI to reach the device as an
/// unmask (VFIO masks INTx on each assertion): KVM's resample irqfd with
/// the in-kernel irqchip, the EOI exit and the router with split. Then an
/// assertion while the IOAPIC entry is masked must arrive on unmask.
fn intx_reaches_the_guest(irqchip: &str) {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new(&format!("pt-intx-{irqchip}"));
    let (dev, socket) = device(&dir, Behaviour::Good);
    let cmdline = "pt.vectors=1 pt.mask=none pt.dma=0 pt.intx=5 pt.timeout=30";
    let out = boot_with(&socket, cmdline, irqchip);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let f = result_fields(&out.stdout).unwrap_or_else(|| panic!("no RINGVM-RESULT: {out:#?}"));
    for (k, v) in [("intx_unmask", "1"), ("vectors", "1"), ("errors", "0")] {
        assert_eq!(
            f.get(k).map(String::as_str),
            Some(v),
            "{k} in {f:?}\n{out:#?}"
        );
    }
    // The guest fails the run when fewer than five arrive. More: an
    // assertion delivered twice, because the device was unmasked before
    // the handler deasserted the line. With split the router resamples
    // only on the EOI exit, which this host's PVM reports at the handler's
    // first VM exit (its deassert write): never early, so exactly five.
    // With the in-kernel irqchip KVM's resampler has been seen to fire
    // before that write reached the device (about once in five), so there
    // the count is a lower bound. Harmless to a driver either way.
    let intx: u64 = f["intx"].parse().expect("a count");
    if irqchip == "split" {
        assert_eq!(intx, 5, "{f:?}\n{out:#?}");
    } else {
        assert!(intx >= 5, "{f:?}\n{out:#?}");
    }
    let s = dev.stats();
    // Six assertions signalled, each unmasked through the eventfd the
    // VMM handed the device.
    assert!(s.intx_signals >= 6, "{s:?}");
    assert!(s.intx_unmasks >= 6, "{s:?}");
}

#[test]
fn intx_reaches_the_guest_with_the_in_kernel_irqchip() {
    intx_reaches_the_guest("kernel");
}

#[test]
fn intx_reaches_the_guest_with_the_split_irqchip() {
    intx_reaches_the_guest("split");
}

#[test]
fn a_bar_size_that_is_not_a_power_of_two_is_refused() {
    let dir = TempDir::new("pt-barsize");
    let (dev, socket) = device(&dir, Behaviour::BadBarSize);
    let out = boot(&socket, "pt.timeout=5");
    let line = attach_error(&out);
    assert!(
        line.contains("BAR0") && line.contains("power of two"),
        "{line}"
    );
    // Refused before it was touched.
    assert_eq!(dev.stats().resets, 0);
}

#[test]
fn a_capability_list_that_loops_is_refused() {
    let dir = TempDir::new("pt-caploop");
    let (_dev, socket) = device(&dir, Behaviour::CapLoop);
    let out = boot(&socket, "pt.timeout=5");
    let line = attach_error(&out);
    assert!(line.contains("loops"), "{line}");
}

#[test]
fn short_configuration_reads_are_refused() {
    let dir = TempDir::new("pt-short");
    let (_dev, socket) = device(&dir, Behaviour::ShortConfigReads);
    let out = boot(&socket, "pt.timeout=5");
    let line = attach_error(&out);
    assert!(line.contains("configuration space"), "{line}");
}

#[test]
fn a_server_that_answers_garbage_is_refused() {
    let dir = TempDir::new("pt-garbage");
    let (_dev, socket) = device(&dir, Behaviour::GarbageReplies);
    let out = boot(&socket, "pt.timeout=5");
    let line = attach_error(&out);
    assert!(line.contains("malformed reply"), "{line}");
}

#[test]
fn a_server_that_disconnects_during_attach_is_refused() {
    let dir = TempDir::new("pt-disc-early");
    let (_dev, socket) = device(&dir, Behaviour::DisconnectAfter(5));
    let out = boot(&socket, "pt.timeout=5");
    let line = attach_error(&out);
    assert!(line.contains("closed the connection"), "{line}");
}

/// Whether the guest got to run with a device that disconnects after `n`
/// messages (that is, the attach took at most `n`).
fn attach_survives(n: usize) -> bool {
    let dir = TempDir::new(&format!("pt-disc-{n}"));
    let (_dev, socket) = device(&dir, Behaviour::DisconnectAfter(n));
    let out = boot(&socket, "pt.timeout=1");
    let ran = out.stdout.contains("hello from the built-in guest");
    if !ran {
        attach_error(&out);
    }
    ran
}

#[test]
fn a_server_that_disconnects_while_the_guest_runs_is_seen_as_gone() {
    if !kvm_available() {
        return;
    }
    // The fewest messages the attach needs (found by bisection: the
    // attach is one fixed sequence of requests).
    let (mut lo, mut hi) = (1, 512);
    assert!(
        attach_survives(hi),
        "the attach needs more than {hi} messages"
    );
    while lo < hi {
        let mid = (lo + hi) / 2;
        if attach_survives(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    // A few guest accesses later the server goes away.
    let dir = TempDir::new("pt-disc-late");
    let (_dev, socket) = device(&dir, Behaviour::DisconnectAfter(lo + 2));
    let out = boot(&socket, "pt.timeout=5");
    eprintln!(
        "attach takes {lo} messages; disconnecting after {}:\n{out:#?}",
        lo + 2
    );
    assert_eq!(
        out.stderr.matches("the device is gone").count(),
        1,
        "ringvm logs the loss once: {out:#?}"
    );
    // The VM kept running; the guest found all-ones and said so.
    assert!(out.stdout.contains("error: pt:"), "{out:#?}");
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(out.stop_line().contains("status 2"), "{out:#?}");
}

#[test]
fn a_missing_socket_and_malformed_options_are_one_error_line() {
    let dir = TempDir::new("pt-cli");
    let missing = dir.path().join("nobody.sock");
    let out = boot(&missing, "exit=0");
    let line = attach_error(&out);
    assert!(line.contains("nobody.sock"), "{line}");
    for args in [
        ["--user-device", "sock=/tmp/x"],
        ["--user-device", "socket="],
        ["--device", "/sys/bus/pci/devices/0000:01:00.0"],
        ["--device", "path=/sys/x,path=/sys/y"],
    ] {
        let out = run_ringvm(&["run", "--kernel", "builtin", args[0], args[1]], DEADLINE);
        let line = attach_error(&out);
        assert!(line.contains(args[0]), "{line}");
    }
    // A path that is no PCI function.
    let out = run_ringvm(
        &["run", "--kernel", "builtin", "--device", "path=/tmp"],
        DEADLINE,
    );
    let line = attach_error(&out);
    assert!(line.contains("/tmp"), "{line}");
}

/// Runs against a real function bound to vfio-pci:
/// `RINGVM_TEST_VFIO_DEVICE=/sys/bus/pci/devices/0000:01:00.0 cargo test
/// --test passthrough -- --ignored` (see README.md, "Passing a host PCI
/// device through"). The built-in guest finds the function on its PCI
/// bus by vendor and device ID and walks its capabilities; ringvm
/// attaches it (container/group or iommufd, DMA maps of all guest RAM,
/// reset) and detaches it when the guest exits.
#[test]
#[ignore = "needs a PCI function bound to vfio-pci in RINGVM_TEST_VFIO_DEVICE"]
fn a_real_vfio_device_is_attached_and_found_by_the_guest() {
    let Ok(path) = std::env::var("RINGVM_TEST_VFIO_DEVICE") else {
        panic!("set RINGVM_TEST_VFIO_DEVICE to /sys/bus/pci/devices/DDDD:BB:DD.F");
    };
    if !kvm_available() {
        return;
    }
    let read_id = |file: &str| {
        let s = std::fs::read_to_string(format!("{path}/{file}")).expect("reading sysfs");
        u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).expect("a hex ID")
    };
    let (vendor, device) = (read_id("vendor"), read_id("device"));
    let spec = format!("path={path}");
    // pt.vectors=1 pt.dma=0: the guest's register checks are the test
    // device's, so only discovery and the capability walk are meaningful
    // here; the run must end with a guest status, not a ringvm error.
    let cmdline = format!("pt.vendor={vendor:#x} pt.device={device:#x} pt.dma=0 pt.timeout=2");
    let out = run_ringvm(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "256M",
            "--device",
            &spec,
            "--cmdline",
            &cmdline,
        ],
        DEADLINE,
    );
    assert!(
        !out.stderr.contains("ringvm: error:"),
        "attach failed: {out:#?}"
    );
    let caps = out
        .stdout
        .lines()
        .find(|l| l.starts_with("pt: caps"))
        .unwrap_or_else(|| panic!("the guest did not find it: {out:#?}"));
    assert!(
        !caps.contains("0x10@"),
        "PCI Express must be hidden: {caps}"
    );
}
