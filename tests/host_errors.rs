//! Host-side failures through the real binary on real KVM: a disk that
//! fails mid-run, an EAGAIN storm on the TAP, file descriptors and memory
//! running out (low `RLIMIT_NOFILE` / `RLIMIT_AS` set in the child), and
//! `/dev/kvm` that cannot be opened or cannot make a VM. Each ends in one
//! clear error line and exit code 105, or a failure the guest sees as a
//! virtio status while the VMM runs on; never a panic or a hang.
//!
//! The disk and TAP cases use the test-build fault injectors at the
//! backends' system-call seams (`RINGVM_TEST_BLOCK_EIO`,
//! `RINGVM_TEST_TAP_EAGAIN`; this kernel has no device-mapper, and io_uring
//! absorbs a real TAP's EAGAIN by waiting for readiness).

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::netns::{have_ping, ping, Background, Netns, GUEST_IP};
use common::{kvm_available, result_fields, ringvm_bin, run_command, Outcome, TempDir};

const DEADLINE: Duration = Duration::from_secs(300);
/// ringvm's exit code for a host-side error.
const EXIT_HOST_ERROR: i32 = 105;
/// ringvm's exit code when stopped by SIGTERM.
const EXIT_SIGNALLED: i32 = 106;

fn disk(dir: &TempDir, name: &str, size: u64) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn assert_no_panic(out: &Outcome, what: &str) {
    assert!(
        !out.stderr.contains("panicked") && out.code != Some(101),
        "{what}: {out:#?}"
    );
}

#[test]
fn a_disk_failing_mid_run_fails_those_requests_and_the_vm_goes_on() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("host-eio");
    let img = disk(&dir, "d.img", 4 << 20);
    let mut cmd = Command::new(ringvm_bin());
    cmd.args(["run", "--kernel", "builtin", "--memory", "64M", "--disk"])
        .arg(format!("path={}", img.display()))
        .args(["--cmdline", "blk.mode=randwrite blk.count=300 blk.qd=4"])
        // Transfers 51..80 fail with EIO, the rest succeed.
        .env("RINGVM_TEST_BLOCK_EIO", "after=50,count=30");
    let out = run_command(&mut cmd, DEADLINE);
    assert_no_panic(&out, "EIO");
    let r = result_fields(&out.stdout).unwrap_or_else(|| panic!("no result: {out:#?}"));
    // The guest saw VIRTIO_BLK_S_IOERR for exactly those requests, and the
    // device served every request after them.
    assert_eq!(r["ops"], "300", "{out:#?}");
    assert_eq!(r["errors"], "30", "{out:#?}");
    assert_eq!(r["bytes"], (270 * 4096).to_string(), "{out:#?}");
    // The guest's status for failed requests.
    assert_eq!(out.code, Some(1), "{out:#?}");
    let logged = out
        .stderr
        .lines()
        .filter(|l| l.contains("virtio-blk0: write at sector") && l.contains("os error 5"))
        .count();
    // Rate-limited: some lines, not one per failure.
    assert!((1..30).contains(&logged), "{logged} lines: {out:#?}");
}

#[test]
fn an_eagain_storm_on_the_tap_is_counted_and_the_nic_keeps_working() {
    if !kvm_available() || !have_ping() {
        return;
    }
    let Some(ns) = Netns::new("eagain") else {
        return;
    };
    ns.add_tap(1);
    let mut c = ns.command(ringvm_bin());
    c.args(["run", "--kernel", "builtin", "--memory", "64M"])
        .args(["--iothread-stats", "--net", "tap=rvtap0"])
        .args(["--cmdline", &format!("net.ip={GUEST_IP}/24")])
        .env("RINGVM_TEST_TAP_EAGAIN", "rx=20000,tx=5");
    let mut vm = Background::spawn(&mut c);
    vm.wait_line("net: up", Duration::from_secs(180));
    // The first replies may be among the refused writes; then every ping
    // is answered.
    for _ in 0..30 {
        let one = ns
            .command("ping")
            .args(["-c", "1", "-W", "5", GUEST_IP])
            .output()
            .expect("running ping");
        if one.status.success() {
            break;
        }
    }
    ping(&ns, 3);
    let out = vm.terminate(DEADLINE);
    assert_eq!(out.code, Some(EXIT_SIGNALLED), "{out:#?}");
    assert!(
        out.stderr.contains("rx_eagain=20000") && out.stderr.contains("tx_eagain=5"),
        "{out:#?}"
    );
    assert_no_panic(&out, "EAGAIN");
}

/// `ringvm run` (built-in guest, a disk and a NIC whose TAP it creates in
/// `ns`) with `limit` applied in the child just before exec.
fn run_limited(
    ns: &Netns,
    img: &std::path::Path,
    limit: (libc::__rlimit_resource_t, u64),
) -> Outcome {
    let netns = std::fs::File::open(format!("/run/netns/{}", ns.name)).expect("opening the netns");
    let ns_fd = netns.as_raw_fd();
    let mut cmd = Command::new(ringvm_bin());
    cmd.args(["run", "--kernel", "builtin", "--memory", "64M", "--disk"])
        .arg(format!("path={}", img.display()))
        .args(["--net", "ip=10.0.0.1,mask=255.255.255.0"])
        .args(["--cmdline", "blk.mode=read blk.count=8"]);
    let (resource, value) = limit;
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe system calls (setns, setrlimit); the
    // namespace descriptor stays open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rl = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = run_command(&mut cmd, DEADLINE);
    drop(netns);
    out
}

/// Raises `limit`'s value by `step` from `start` until the VM runs; every
/// run before ends with one error line naming `cause` and exit code 105,
/// or with the guest seeing a device fail; returns the error lines.
fn sweep(
    ns: &Netns,
    img: &std::path::Path,
    resource: libc::__rlimit_resource_t,
    (start, step, end): (u64, u64, u64),
    causes: &[&str],
) -> Vec<String> {
    let mut errors = Vec::new();
    let mut value = start;
    loop {
        assert!(value <= end, "the VM never ran below {end}: {errors:#?}");
        let out = run_limited(ns, img, (resource, value));
        assert_no_panic(&out, &format!("limit {value}"));
        if out.code == Some(0) && out.stdout.contains("errors=0") {
            return errors;
        }
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.starts_with("ringvm: error:"))
            .collect();
        match out.code {
            Some(EXIT_HOST_ERROR) => {
                assert_eq!(lines.len(), 1, "limit {value}: {out:#?}");
                assert!(
                    causes.iter().any(|c| lines[0].contains(c)),
                    "limit {value}: {out:#?}"
                );
                errors.push(lines[0].to_string());
            }
            // A device that could not start: the guest sees it fail
            // (DEVICE_NEEDS_RESET, status 2) and the VMM says why.
            Some(2) => assert!(
                out.stdout.contains("DEVICE_NEEDS_RESET")
                    && causes.iter().any(|c| out.stderr.contains(c)),
                "limit {value}: {out:#?}"
            ),
            _ => panic!("limit {value}: {out:#?}"),
        }
        value += step;
    }
}

#[test]
fn running_out_of_file_descriptors_or_memory_is_one_error_line() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = Netns::new("rlimit") else {
        return;
    };
    let dir = TempDir::new("host-rlimit");
    let img = disk(&dir, "d.img", 1 << 20);
    let emfile = "Too many open files (os error 24)";
    let errors = sweep(&ns, &img, libc::RLIMIT_NOFILE, (3, 1, 256), &[emfile]);
    // /dev/kvm unopenable (only stdin, stdout and stderr fit), then
    // KVM_CREATE_VM failing, then eventfds, io_uring set-up, vCPUs.
    assert!(
        errors[0].starts_with("ringvm: error: creating the VM: cannot open /dev/kvm: "),
        "{errors:#?}"
    );
    assert!(errors[1].contains("KVM_CREATE_VM failed"), "{errors:#?}");
    for want in ["eventfd", "io_uring", "KVM_CREATE_VCPU", "TAP"] {
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{want}: {errors:#?}"
        );
    }
    // Address space: guest RAM, thread stacks, rings.
    let errors = sweep(
        &ns,
        &img,
        libc::RLIMIT_AS,
        (16 << 20, 1 << 20, 512 << 20),
        &["Cannot allocate memory", "Resource temporarily unavailable"],
    );
    assert!(
        errors.iter().any(|e| e.contains("guest memory")),
        "{errors:#?}"
    );
}
