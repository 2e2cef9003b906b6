//! Boots guests on real KVM through the `ringvm` binary and checks what the
//! guest printed and why ringvm says it stopped.

mod common;

use std::time::Duration;

use common::{kvm_available, run_ringvm, TempDir};
use vmm::boot::elf32::build_test_image;
use vmm::devices::serial::COALESCE_AFTER;

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn builtin_guest_on_one_vcpu_prints_greeting_cmdline_and_exits_with_its_status() {
    if !kvm_available() {
        return;
    }
    let cmdline = "exit=5 marker=one-vcpu";
    let out = run_ringvm(
        &[
            "run",
            "--kernel",
            "builtin",
            "--cpus",
            "1",
            "--memory",
            "64M",
            "--cmdline",
            cmdline,
        ],
        DEADLINE,
    );
    assert_eq!(out.code, Some(5), "{out:#?}");
    assert!(
        out.stdout.contains("hello from the built-in guest"),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains(&format!("cmdline: {cmdline}\n")),
        "{out:#?}"
    );
    assert!(out.stdout.contains("cpus: 1 (from acpi)"), "{out:#?}");
    assert!(
        out.stdout.contains("RINGVM-RESULT mode=boot cpus=1 exit=5"),
        "{out:#?}"
    );
    assert!(
        out.stop_line().contains("guest exited with status 5"),
        "{out:#?}"
    );
}

/// Boots the built-in guest on two vCPUs with `--irqchip irqchip` and
/// checks that it counts both and exits with its status.
fn two_vcpus_count_both(irqchip: &str) {
    if !kvm_available() {
        return;
    }
    let out = run_ringvm(
        &[
            "run",
            "--kernel",
            "builtin",
            "--cpus",
            "2",
            "--memory",
            "64M",
            "--irqchip",
            irqchip,
            "--cmdline",
            "exit=9",
        ],
        DEADLINE,
    );
    assert_eq!(out.code, Some(9), "{out:#?}");
    assert!(out.stdout.contains("cpus: 2 (from acpi)"), "{out:#?}");
    assert!(
        out.stdout.contains("RINGVM-RESULT mode=boot cpus=2 exit=9"),
        "{out:#?}"
    );
}

#[test]
fn in_kernel_irqchip_boots_the_builtin_guest_on_two_vcpus() {
    two_vcpus_count_both("kernel");
}

#[test]
fn split_irqchip_boots_the_builtin_guest_on_two_vcpus() {
    two_vcpus_count_both("split");
}

#[test]
fn bare_ringvm_boots_the_builtin_guest_and_says_what_it_did() {
    if !kvm_available() {
        return;
    }
    let out = run_ringvm(&[], DEADLINE);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stdout.contains("hello from the built-in guest"),
        "{out:#?}"
    );
    // Two VMs on one temporary disk: the first writes, the second verifies.
    assert!(
        out.stderr
            .contains("pass 1 of 2: booting the built-in guest"),
        "{out:#?}"
    );
    assert!(
        out.stderr
            .contains("pass 2 of 2: booting the built-in guest"),
        "{out:#?}"
    );
    let results: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("RINGVM-RESULT"))
        .collect();
    assert_eq!(results.len(), 2, "{out:#?}");
    assert!(
        results[0].contains("mode=write") && results[0].contains("errors=0"),
        "{results:?}"
    );
    assert!(
        results[1].contains("mode=verify") && results[1].contains("errors=0"),
        "{results:?}"
    );
    assert_eq!(
        out.stderr
            .matches("guest exited with status 0 (exit code 0")
            .count(),
        2,
        "{out:#?}"
    );
    assert!(out.stop_line().contains("read it back intact"), "{out:#?}");
    let disk = out
        .stderr
        .split_once(" disk at ")
        .map(|(_, r)| r.split(':').next().unwrap_or(""));
    assert!(
        disk.is_some_and(|d| !std::path::Path::new(d).exists()),
        "the temporary disk is removed"
    );
}

#[test]
fn builtin_guest_boots_with_ram_above_4g() {
    if !kvm_available() {
        return;
    }
    let out = run_ringvm(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "5G",
            "--cmdline",
            "exit=9",
        ],
        DEADLINE,
    );
    assert_eq!(out.code, Some(9), "{out:#?}");
}

#[test]
fn guest_status_above_99_maps_to_exit_code_100() {
    if !kvm_available() {
        return;
    }
    let out = run_ringvm(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "64M",
            "--cmdline",
            "exit=200",
        ],
        DEADLINE,
    );
    assert_eq!(out.code, Some(100), "{out:#?}");
    assert!(out.stop_line().contains("status 200"), "{out:#?}");
}

#[test]
fn builtin_guest_elf_written_out_boots_from_a_file() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("builtin-out");
    let elf = dir.path().join("guest.elf");
    let w = run_ringvm(
        &["builtin-guest", "--output", elf.to_str().unwrap()],
        DEADLINE,
    );
    assert_eq!(w.code, Some(0), "{w:#?}");
    let bytes = std::fs::read(&elf).unwrap();
    assert_eq!(&bytes[..5], b"\x7fELF\x02");
    // Its .bss (DMA pool, stack) must not be file bytes: loading them would
    // cost start-up time and resident memory.
    assert!(
        bytes.len() < 512 << 10,
        "built-in guest ELF is {} bytes",
        bytes.len()
    );
    let out = run_ringvm(
        &[
            "run",
            "--kernel",
            elf.to_str().unwrap(),
            "--memory",
            "64M",
            "--cmdline",
            "exit=3",
        ],
        DEADLINE,
    );
    assert_eq!(out.code, Some(3), "{out:#?}");
    assert!(
        out.stop_line().contains("ELF, PVH boot protocol"),
        "{out:#?}"
    );
}

/// Boots a hand-made 32-bit PVH ELF whose code is `code`.
fn boot_elf32(name: &str, code: &[u8], extra: &[&str]) -> common::Outcome {
    let dir = TempDir::new(name);
    let kernel = dir.file("kernel32.elf", &build_test_image(code, 0x10_0000));
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "16M",
    ];
    args.extend_from_slice(extra);
    run_ringvm(&args, DEADLINE)
}

#[test]
fn a_32bit_pvh_elf_boots_and_exits_through_the_debug_port() {
    if !kvm_available() {
        return;
    }
    // mov al, 42; out 0xf4, al; hlt
    let out = boot_elf32("elf32", &[0xb0, 42, 0xe6, 0xf4, 0xf4], &[]);
    assert_eq!(out.code, Some(42), "{out:#?}");
    assert!(out.stop_line().contains("status 42"), "{out:#?}");
}

#[test]
fn pvh_entry_gets_start_info_in_ebx() {
    if !kvm_available() {
        return;
    }
    // cmp dword [ebx], 0x336ec578; jne bad; mov al, 7; out 0xf4, al;
    // bad: mov al, 1; out 0xf4, al; hlt
    let code = [
        0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33, // cmp dword [ebx], imm32
        0x75, 0x04, // jne +4
        0xb0, 7, 0xe6, 0xf4, // mov al, 7; out 0xf4, al
        0xb0, 1, 0xe6, 0xf4, 0xf4, // mov al, 1; out 0xf4, al; hlt
    ];
    let out = boot_elf32("pvh-ebx", &code, &[]);
    assert_eq!(out.code, Some(7), "{out:#?}");
}

#[test]
fn i8042_reset_stops_the_vm_with_the_reset_code() {
    if !kvm_available() {
        return;
    }
    // mov al, 0xfe; out 0x64, al; hlt
    let out = boot_elf32("reset", &[0xb0, 0xfe, 0xe6, 0x64, 0xf4], &[]);
    assert_eq!(out.code, Some(102), "{out:#?}");
    assert!(out.stop_line().contains("reset"), "{out:#?}");
}

#[test]
fn triple_fault_is_reported_with_its_own_code() {
    if !kvm_available() {
        return;
    }
    // ud2 with an empty IDT: #UD, #DF, then shutdown.
    let out = boot_elf32("triple", &[0x0f, 0x0b], &[]);
    assert_eq!(out.code, Some(103), "{out:#?}");
    assert!(
        out.stop_line().contains("triple fault on vCPU 0"),
        "{out:#?}"
    );
}

#[test]
fn an_instruction_kvm_cannot_emulate_is_reported_with_rip_and_bytes() {
    if !kvm_available() {
        return;
    }
    // rdrand eax; mov al, 51; out 0xf4, al. PVM's emulator lacks RDRAND;
    // hardware KVM runs it and the guest exits with 51.
    let out = boot_elf32("emufail", &[0x0f, 0xc7, 0xf0, 0xb0, 51, 0xe6, 0xf4], &[]);
    match out.code {
        Some(104) => {
            let line = out.stop_line();
            assert!(
                line.contains("emulation failure on vCPU 0 at rip=0x100000"),
                "{line}"
            );
            assert!(line.contains("insn=[0f c7 f0"), "{line}");
        }
        Some(51) => eprintln!("hardware KVM ran RDRAND; nothing to report"),
        _ => panic!("{out:#?}"),
    }
}

#[test]
fn a_guest_halted_with_interrupts_off_is_reported_dead() {
    if !kvm_available() {
        return;
    }
    // cli; hlt on the BSP, the AP never started: nothing can wake them.
    let out = boot_elf32("dead", &[0xfa, 0xf4, 0xeb, 0xfd], &["--cpus", "2"]);
    assert_eq!(out.code, Some(107), "{out:#?}");
    assert!(
        out.stop_line().contains("halted with interrupts disabled"),
        "{out:#?}"
    );
}

#[test]
fn a_guest_waiting_for_interrupts_is_not_dead() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("idle");
    // sti; hlt; jmp back: idle, wakeable, alive.
    let kernel = dir.file(
        "idle.elf",
        &build_test_image(&[0xfb, 0xf4, 0xeb, 0xfd], 0x10_0000),
    );
    let child = std::process::Command::new(common::ringvm_bin())
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "16M",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Several halt probes pass before the signal.
    std::thread::sleep(Duration::from_millis(4500));
    // SAFETY: sending SIGTERM to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(106),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigterm_stops_a_spinning_smp_guest_and_every_vcpu_thread() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("spin");
    // jmp $ (the BSP spins; the AP waits for SIPI inside KVM_RUN)
    let kernel = dir.file("spin.elf", &build_test_image(&[0xeb, 0xfe], 0x10_0000));
    let child = std::process::Command::new(common::ringvm_bin())
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "16M",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: sending SIGTERM to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let start = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(start.elapsed() < DEADLINE);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(106), "{stderr}");
    assert!(stderr.contains("stopped by signal 15"), "{stderr}");
}

#[test]
fn serial_output_goes_to_a_file_or_nowhere() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("serial");
    let log = dir.path().join("console.log");
    let file_arg = format!("file={}", log.display());
    let out = run_ringvm(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "64M",
            "--serial",
            &file_arg,
            "--cmdline",
            "exit=4",
        ],
        DEADLINE,
    );
    assert_eq!(out.code, Some(4), "{out:#?}");
    assert!(!out.stdout.contains("hello"), "{out:#?}");
    let console = std::fs::read_to_string(&log).unwrap();
    assert!(
        console.contains("hello from the built-in guest"),
        "{console}"
    );
    assert!(console.contains("cmdline: exit=4"), "{console}");

    let out = run_ringvm(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "64M",
            "--serial",
            "off",
            "--cmdline",
            "exit=6",
        ],
        DEADLINE,
    );
    assert_eq!(out.code, Some(6), "{out:#?}");
    assert!(out.stdout.is_empty(), "{out:#?}");
}

/// Every `--cpuid-hide` name, as (name, leaf, subleaf, register index
/// eax=0..edx=3, bit): written out here independently of ringvm's table.
const HIDEABLE: &[(&str, u32, u32, usize, u32)] = &[
    ("sse3", 1, 0, 2, 0),
    ("pclmulqdq", 1, 0, 2, 1),
    ("vmx", 1, 0, 2, 5),
    ("ssse3", 1, 0, 2, 9),
    ("fma", 1, 0, 2, 12),
    ("cx16", 1, 0, 2, 13),
    ("pcid", 1, 0, 2, 17),
    ("sse4.1", 1, 0, 2, 19),
    ("sse4.2", 1, 0, 2, 20),
    ("x2apic", 1, 0, 2, 21),
    ("movbe", 1, 0, 2, 22),
    ("popcnt", 1, 0, 2, 23),
    ("tsc-deadline", 1, 0, 2, 24),
    ("aes", 1, 0, 2, 25),
    ("xsave", 1, 0, 2, 26),
    ("avx", 1, 0, 2, 28),
    ("f16c", 1, 0, 2, 29),
    ("rdrand", 1, 0, 2, 30),
    ("mtrr", 1, 0, 3, 12),
    ("sse", 1, 0, 3, 25),
    ("sse2", 1, 0, 3, 26),
    ("fsgsbase", 7, 0, 1, 0),
    ("bmi1", 7, 0, 1, 3),
    ("avx2", 7, 0, 1, 5),
    ("smep", 7, 0, 1, 7),
    ("bmi2", 7, 0, 1, 8),
    ("erms", 7, 0, 1, 9),
    ("invpcid", 7, 0, 1, 10),
    ("avx512f", 7, 0, 1, 16),
    ("rdseed", 7, 0, 1, 18),
    ("smap", 7, 0, 1, 20),
    ("sha", 7, 0, 1, 29),
    ("umip", 7, 0, 2, 2),
    ("pku", 7, 0, 2, 3),
    ("la57", 7, 0, 2, 16),
    ("rdpid", 7, 0, 2, 22),
    ("pdpe1gb", 0x8000_0001, 0, 3, 26),
    ("rdtscp", 0x8000_0001, 0, 3, 27),
];

/// The guest's `cpuid:` lines: (leaf, subleaf) -> [eax, ebx, ecx, edx].
fn guest_cpuid(stdout: &str) -> std::collections::HashMap<(u32, u32), [u32; 4]> {
    let hex = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("cpuid: "))
        .map(|l| {
            let mut f = l.split_whitespace();
            let (leaf, sub) = f.next().unwrap().split_once('.').unwrap();
            let regs: Vec<u32> = f.map(|kv| hex(kv.split_once('=').unwrap().1)).collect();
            (
                (hex(leaf), sub.parse().unwrap()),
                [regs[0], regs[1], regs[2], regs[3]],
            )
        })
        .collect()
}

fn cpuid_run(hide: Option<&str>) -> common::Outcome {
    let mut args = vec![
        "run",
        "--kernel",
        "builtin",
        "--memory",
        "64M",
        "--cmdline",
        "cpuid=1,7.0,0x80000001",
    ];
    if let Some(h) = hide {
        args.extend(["--cpuid-hide", h]);
    }
    run_ringvm(&args, DEADLINE)
}

/// `--cpuid-hide NAME` either hides the bit from the guest's own CPUID
/// instruction, or (on a KVM that puts host features back, such as this
/// PVM host's) refuses to start with an error naming it: never a guest
/// that still sees what the user hid. Bits that KVM itself provides
/// (x2APIC, TSC deadline, CMPXCHG16B on this host's emulator) must really
/// be hidden on every KVM.
#[test]
fn cpuid_hide_hides_each_name_in_the_guest_or_refuses() {
    if !kvm_available() {
        return;
    }
    let base = cpuid_run(None);
    assert_eq!(base.code, Some(0), "{base:#?}");
    let base = guest_cpuid(&base.stdout);
    let mut hidden = Vec::new();
    for &(name, leaf, sub, reg, bit) in HIDEABLE {
        let out = cpuid_run(Some(name));
        match out.code {
            Some(0) => {
                let regs = guest_cpuid(&out.stdout)[&(leaf, sub)];
                assert_eq!(regs[reg] & (1 << bit), 0, "{name} still visible: {out:#?}");
                hidden.push(name);
            }
            Some(2) => {
                assert!(
                    out.stderr.contains(&format!("--cpuid-hide {name} (")),
                    "{name}: {out:#?}"
                );
                // Refused only because the guest would really see it.
                assert_ne!(base[&(leaf, sub)][reg] & (1 << bit), 0, "{name}: {out:#?}");
            }
            _ => panic!("{name}: {out:#?}"),
        }
    }
    for name in ["x2apic", "tsc-deadline"] {
        assert!(hidden.contains(&name), "{name} not hidden: {hidden:?}");
    }
    // Raw bits and several at once take the same path.
    let out = cpuid_run(Some("x2apic,0x1.ecx:24"));
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(
        guest_cpuid(&out.stdout)[&(1, 0)][2] & ((1 << 21) | (1 << 24)),
        0,
        "{out:#?}"
    );
}

/// Without ACPI the MP table still describes the vCPUs.
#[test]
fn acpi_off_leaves_the_mp_table() {
    if !kvm_available() {
        return;
    }
    let out = run_ringvm(
        &[
            "run",
            "--kernel",
            "builtin",
            "--cpus",
            "2",
            "--memory",
            "64M",
            "--acpi",
            "off",
            "--cmdline",
            "acpi=poweroff",
        ],
        DEADLINE,
    );
    assert!(out.stdout.contains("cpus: 2 (from mptable)"), "{out:#?}");
    assert!(
        out.stdout
            .contains("error: no ACPI power-off/reset registers"),
        "{out:#?}"
    );
    assert_eq!(out.code, Some(1), "{out:#?}");
}

/// The guest finds the FADT's sleep control and reset registers and the
/// DSDT's `_S5_` through the PVH RSDP pointer and uses them as an ACPI
/// kernel does: S5 ends ringvm with "guest shut down", the reset register
/// with "reset", under both irqchips.
#[test]
fn acpi_power_off_and_reset_end_the_vm() {
    if !kvm_available() {
        return;
    }
    for irqchip in ["kernel", "split"] {
        for (action, code, line) in [
            ("poweroff", 101, "guest shut down"),
            ("reset", 102, "guest requested a reset"),
        ] {
            let cmdline = format!("acpi={action}");
            let out = run_ringvm(
                &[
                    "run",
                    "--kernel",
                    "builtin",
                    "--cpus",
                    "2",
                    "--memory",
                    "64M",
                    "--irqchip",
                    irqchip,
                    "--cmdline",
                    &cmdline,
                ],
                DEADLINE,
            );
            assert_eq!(out.code, Some(code), "{irqchip} {action}: {out:#?}");
            assert!(out.stop_line().contains(line), "{out:#?}");
            assert!(
                out.stdout.contains(&format!("acpi: {action}: writing")),
                "{out:#?}"
            );
        }
    }
}

/// With no UART interrupt enabled, and once the guest has printed
/// COALESCE_AFTER bytes, KVM buffers the guest's transmit writes and the
/// vCPU threads hand them to the serial port at their next exit: every
/// byte still arrives, in order, on one vCPU and on two.
#[test]
fn coalesced_serial_output_arrives_whole_and_in_order() {
    if !kvm_available() {
        return;
    }
    // About 2 KB of output: many times the ring's 170 entries.
    let leaves: Vec<String> = (0..24).map(|i| format!("{}", i % 2)).collect();
    let cmdline = format!("exit=0 cpuid={}", leaves.join(","));
    for cpus in ["1", "2"] {
        let out = common::run_command(
            std::process::Command::new(common::ringvm_bin())
                .env("RINGVM_LOG", "debug")
                .args(["run", "--kernel", "builtin", "--memory", "64M"])
                .args(["--cpus", cpus, "--cmdline", &cmdline]),
            DEADLINE,
        );
        assert_eq!(out.code, Some(0), "{out:#?}");
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert!(
            lines[0].ends_with("hello from the built-in guest"),
            "{out:#?}"
        );
        assert_eq!(lines[1], format!("cmdline: {cmdline}"), "{out:#?}");
        let cpuid: Vec<&&str> = lines.iter().filter(|l| l.starts_with("cpuid: ")).collect();
        assert_eq!(cpuid.len(), 24, "{out:#?}");
        for (i, line) in cpuid.iter().enumerate() {
            assert!(
                line.starts_with(&format!("cpuid: 0x{}.0 eax=", i % 2)),
                "{line}"
            );
        }
        assert_eq!(
            lines.last().copied(),
            Some(format!("RINGVM-RESULT mode=boot cpus={cpus} exit=0").as_str()),
            "{out:#?}"
        );
        // Every transmitted byte after the first COALESCE_AFTER went
        // through the ring.
        let drained: u64 = out
            .stderr
            .lines()
            .filter_map(|l| l.split("coalesced writes drained so far: ").nth(1))
            .filter_map(|n| n.trim().parse().ok())
            .max()
            .unwrap_or(0);
        let coalesced = out.stdout.len() as u64 - u64::from(COALESCE_AFTER);
        assert!(
            drained >= coalesced,
            "drained {drained} of the last {coalesced} bytes: {out:#?}"
        );
    }
}
