//! Bad input gets one clear error line and exit code 2, never a panic.

mod common;

use std::time::Duration;

use common::{run_ringvm, TempDir};

const DEADLINE: Duration = Duration::from_secs(30);

/// Runs ringvm and checks it failed with exit code 2, one stderr line
/// naming `needle`, and no panic.
fn assert_bad_input(args: &[&str], needle: &str) {
    let out = run_ringvm(args, DEADLINE);
    assert_eq!(out.code, Some(2), "{args:?}: {out:#?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: want one error line, got {:#?}",
        out.stderr
    );
    assert!(
        lines[0].starts_with("ringvm: error: "),
        "{args:?}: {}",
        lines[0]
    );
    assert!(
        lines[0].contains(needle),
        "{args:?}: {:?} lacks {needle:?}",
        lines[0]
    );
    assert!(!out.stderr.contains("panicked"), "{out:#?}");
    assert!(out.stdout.is_empty(), "{out:#?}");
}

#[test]
fn missing_kernel_file() {
    assert_bad_input(
        &["run", "--kernel", "/nonexistent/vmlinuz"],
        "cannot open kernel /nonexistent/vmlinuz",
    );
}

#[test]
fn kernel_that_is_a_directory() {
    assert_bad_input(&["run", "--kernel", "/tmp"], "not a regular file");
}

#[test]
fn file_that_is_no_kernel() {
    let dir = TempDir::new("notakernel");
    let junk = dir.file("junk.bin", &[0x5a; 8192]);
    assert_bad_input(
        &["run", "--kernel", junk.to_str().unwrap()],
        "not a bootable kernel",
    );
    let empty = dir.file("empty", b"");
    assert_bad_input(
        &["run", "--kernel", empty.to_str().unwrap()],
        "not a bootable kernel",
    );
    let text = dir.file("text", b"#!/bin/sh\necho hi\n");
    assert_bad_input(
        &["run", "--kernel", text.to_str().unwrap()],
        "not a bootable kernel",
    );
}

#[test]
fn host_executable_is_refused_as_a_kernel() {
    // A dynamically linked x86-64 ELF: not loadable at guest physical addresses.
    assert_bad_input(&["run", "--kernel", "/bin/true"], "kernel /bin/true");
}

#[test]
fn truncated_32bit_elf_is_refused() {
    let dir = TempDir::new("trunc32");
    let img = vmm::boot::elf32::build_test_image(&[0x90; 32], 0x10_0000);
    let k = dir.file("k.elf", &img[..img.len() - 8]);
    assert_bad_input(
        &["run", "--kernel", k.to_str().unwrap()],
        "segment 0 lies outside the file",
    );
}

#[test]
fn missing_initrd_file() {
    assert_bad_input(
        &[
            "run",
            "--kernel",
            "builtin",
            "--initrd",
            "/nonexistent/initrd",
        ],
        "cannot open initrd",
    );
}

#[test]
fn memory_too_small() {
    assert_bad_input(
        &["run", "--kernel", "builtin", "--memory", "1M"],
        "too small",
    );
}

#[test]
fn memory_larger_than_the_host() {
    assert_bad_input(
        &["run", "--kernel", "builtin", "--memory", "64T"],
        "more than this host has",
    );
}

#[test]
fn malformed_sizes() {
    for bad in ["12X", "lots", "1.5G", "-1G", ""] {
        assert_bad_input(&["run", "--kernel", "builtin", "--memory", bad], "--memory");
    }
    assert_bad_input(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "99999999999999999999G",
        ],
        "too large",
    );
}

#[test]
fn zero_or_too_many_vcpus() {
    assert_bad_input(
        &["run", "--kernel", "builtin", "--cpus", "0"],
        "--cpus must be between 1 and",
    );
    assert_bad_input(
        &["run", "--kernel", "builtin", "--cpus", "300"],
        "--cpus must be between 1 and",
    );
    assert_bad_input(&["run", "--kernel", "builtin", "--cpus", "two"], "--cpus");
}

#[test]
fn bad_thread_affinities() {
    assert_bad_input(
        &[
            "run",
            "--kernel",
            "builtin",
            "--cpus",
            "2",
            "--vcpu-affinity",
            "2@0",
        ],
        "--vcpu-affinity: vCPU 2 is given an affinity, but there are 2 vCPUs (0 to 1)",
    );
    assert_bad_input(
        &[
            "run",
            "--kernel",
            "builtin",
            "--vcpu-affinity",
            "0@1",
            "--vcpu-affinity",
            "0@0",
        ],
        "vCPU 0 is given an affinity twice",
    );
    assert_bad_input(
        &["run", "--kernel", "builtin", "--vcpu-affinity", "0@1-x"],
        "expected INDEX@CPUS",
    );
    assert_bad_input(
        &[
            "run",
            "--kernel",
            "builtin",
            "--iothread-affinity",
            "0@4096",
        ],
        "--iothread-affinity: host CPU 4096 in \"0@4096\" is out of range",
    );
    assert_bad_input(
        &[
            "run",
            "--kernel",
            "builtin",
            "--iothreads",
            "2",
            "--iothread-affinity",
            "2@0",
        ],
        "iothread 2 is given an affinity, but there are 2 iothreads",
    );
}

#[test]
fn bad_serial_and_cpuid_options() {
    assert_bad_input(
        &["run", "--kernel", "builtin", "--serial", "tty"],
        "invalid --serial",
    );
    assert_bad_input(
        &["run", "--kernel", "builtin", "--cpuid-hide", "avx9"],
        "unknown CPUID feature",
    );
}

#[test]
fn command_line_too_long_for_the_kernel() {
    let long = "x".repeat(70_000);
    assert_bad_input(
        &["run", "--kernel", "builtin", "--cmdline", &long],
        "command line is 70000 bytes",
    );
}

#[test]
fn usage_errors() {
    assert_bad_input(&["run"], "--kernel");
    assert_bad_input(
        &["run", "--kernel", "builtin", "--frobnicate"],
        "--frobnicate",
    );
    assert_bad_input(&["launch"], "launch");
    assert_bad_input(&["builtin-guest"], "--output");
    assert_bad_input(
        &["builtin-guest", "--output", "/nonexistent/dir/guest.elf"],
        "writing /nonexistent/dir/guest.elf",
    );
}

#[test]
fn help_and_version_succeed_and_document_exit_codes() {
    let out = run_ringvm(&["--help"], DEADLINE);
    assert_eq!(out.code, Some(0));
    assert!(
        out.stdout.contains("Exit codes:") && out.stdout.contains("106"),
        "{}",
        out.stdout
    );
    let out = run_ringvm(&["run", "--help"], DEADLINE);
    assert_eq!(out.code, Some(0));
    for opt in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--memory",
        "--cpus",
        "--serial",
        "--cpuid-hide",
    ] {
        assert!(out.stdout.contains(opt), "{opt} missing from run --help");
    }
    let out = run_ringvm(&["--version"], DEADLINE);
    assert_eq!(out.code, Some(0));
    assert!(out.stdout.starts_with("ringvm "), "{}", out.stdout);
}

#[test]
fn bad_net_options() {
    for (value, needle) in [
        ("", "--net"),
        ("mac=52:54:00:12:34:56", "tap=NAME"),
        ("tap=a,ip=10.0.0.1,mask=255.0.0.0", "not both"),
        ("ip=10.0.0.1", "mask="),
        ("ip=10.0.0.1,mask=255.0.255.0", "netmask"),
        ("tap=t0,mac=01:00:5e:00:00:01", "multicast"),
        ("tap=t0,queues=0", "queue pairs"),
        ("tap=t0,speed=fast", "unknown --net key"),
    ] {
        assert_bad_input(&["run", "--kernel", "builtin", "--net", value], needle);
    }
    // An interface that is not a TAP cannot be attached.
    assert_bad_input(&["run", "--kernel", "builtin", "--net", "tap=lo"], "TAP");
}
