//! virtio-blk end to end: the built-in guest's virtio-pci driver against
//! ringvm's device on io_uring and real files, and the same guest against
//! QEMU's virtio-blk-pci as an independent check of the driver.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    crc32, kvm_available, qemu, result_fields, run_command, run_ringvm, Outcome, TempDir,
};

const DEADLINE: Duration = Duration::from_secs(300);

fn disk(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// Boots the built-in guest on ringvm with `disks` and `cmdline`.
fn ringvm_guest(
    disks: &[String],
    extra: &[&str],
    cmdline: &str,
) -> (Outcome, BTreeMap<String, String>) {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--kernel".into(),
        "builtin".into(),
        "--memory".into(),
        "128M".into(),
    ];
    for d in disks {
        args.push("--disk".into());
        args.push(d.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--cmdline".into());
    args.push(cmdline.into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ringvm(&argv, DEADLINE);
    let fields =
        result_fields(&out.stdout).unwrap_or_else(|| panic!("no RINGVM-RESULT line: {out:#?}"));
    (out, fields)
}

fn path_disk(p: &Path) -> String {
    format!("path={}", p.display())
}

#[test]
fn guest_writes_a_pattern_and_a_second_vm_verifies_it() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-wv");
    let d = disk(&dir, "d0.img", 8 << 20);
    let (out, f) = ringvm_guest(
        &[path_disk(&d)],
        &[],
        "blk.mode=write blk.bs=4096 blk.qd=4 blk.len=1M blk.seed=7 blk.flush=1",
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(
        (
            f["mode"].as_str(),
            f["errors"].as_str(),
            f["bytes"].as_str()
        ),
        ("write", "0", "1048576"),
        "{f:?}"
    );
    let (out, f) = ringvm_guest(
        &[path_disk(&d)],
        &[],
        "blk.mode=verify blk.bs=4096 blk.qd=4 blk.len=1M blk.seed=7",
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(f["errors"], "0", "{f:?}");
    // A different seed does not verify: the check can fail.
    let (out, f) = ringvm_guest(
        &[path_disk(&d)],
        &[],
        "blk.mode=verify blk.bs=4096 blk.qd=4 blk.len=64K blk.seed=8",
    );
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_ne!(f["errors"], "0", "{f:?}");
}

/// `engine=`: a disk in memory (tmpfs) is served synchronously by default,
/// anything else through io_uring, and either can be asked for. What one
/// engine wrote (and flushed) the other reads back, and the host sees it.
#[test]
fn both_engines_serve_the_guest_and_read_each_others_writes() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-engine");
    let shm_dir = PathBuf::from(format!("/dev/shm/ringvm-blk-engine-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&shm_dir);
    std::fs::create_dir_all(&shm_dir).unwrap();
    let in_memory = shm_dir.join("d0.img");
    std::fs::File::create(&in_memory)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let on_disk = disk(&dir, "d1.img", 8 << 20);
    // (disk, engine= value or none, the engine the log must name,
    // the engine that reads it back)
    let cases = [
        (&in_memory, None, "engine auto (sync)", "uring"),
        (&in_memory, Some("uring"), "engine uring (uring)", "sync"),
        (&on_disk, None, "engine auto (uring)", "sync"),
        (&on_disk, Some("sync"), "engine sync (sync)", "uring"),
    ];
    for (i, (path, engine, logged, reader)) in cases.into_iter().enumerate() {
        // fixed_buffers=on: the ring path registers guest RAM, the sync
        // path (which never hands the ring a transfer) must not pin it.
        let mut spec = format!("{},fixed_buffers=on", path_disk(path));
        if let Some(e) = engine {
            spec.push_str(&format!(",engine={e}"));
        }
        let seed = 20 + i;
        let cmd =
            format!("blk.mode=write blk.bs=4096 blk.qd=8 blk.len=1M blk.seed={seed} blk.flush=1");
        let out = run_command(
            Command::new(common::ringvm_bin())
                .env("RINGVM_LOG", "debug")
                .args(["run", "--kernel", "builtin", "--memory", "128M"])
                .args(["--disk", &spec, "--cmdline", &cmd]),
            DEADLINE,
        );
        assert_eq!(out.code, Some(0), "{spec}: {out:#?}");
        assert!(
            out.stderr.contains(logged),
            "{spec}: wants {logged:?}: {out:#?}"
        );
        let ring = logged.ends_with("(uring)");
        assert_eq!(
            out.stderr.contains("guest RAM registered as fixed buffers"),
            ring,
            "{spec}: {out:#?}"
        );
        assert_eq!(
            out.stderr
                .contains("sync engine: guest RAM not registered with the ring"),
            !ring,
            "{spec}: {out:#?}"
        );
        let f = result_fields(&out.stdout).expect("RINGVM-RESULT");
        assert_eq!(f["errors"], "0", "{spec}: {f:?}");
        let verify = format!("blk.mode=verify blk.bs=4096 blk.qd=8 blk.len=1M blk.seed={seed}");
        let (out, f) = ringvm_guest(
            &[format!("{},engine={reader}", path_disk(path))],
            &[],
            &verify,
        );
        assert_eq!(
            out.code,
            Some(0),
            "{spec} read back with {reader}: {out:#?}"
        );
        assert_eq!(f["errors"], "0", "{f:?}");
        let data = std::fs::read(path).unwrap();
        assert!(
            data[..1 << 20].iter().any(|&b| b != 0),
            "{spec}: the host sees the writes"
        );
    }
    std::fs::remove_dir_all(&shm_dir).unwrap();
}

#[test]
fn guest_crc_equals_the_host_crc_of_the_file() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-crc");
    let d = dir.path().join("d0.img");
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&d, &data).unwrap();
    for (qd, bs) in [(1, 4096), (8, 16384)] {
        let cmd = format!("blk.mode=crc blk.bs={bs} blk.qd={qd} blk.offset=4096 blk.len=512K");
        let (out, f) = ringvm_guest(&[path_disk(&d)], &[], &cmd);
        assert_eq!(out.code, Some(0), "{out:#?}");
        assert_eq!(
            f["crc32"],
            format!("{:08x}", crc32(&data[4096..4096 + (512 << 10)])),
            "{f:?}"
        );
    }
}

#[test]
fn multi_queue_disks_on_several_iothreads() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-mq");
    let d0 = disk(&dir, "d0.img", 4 << 20);
    let d1 = disk(&dir, "d1.img", 4 << 20);
    let disks = [
        format!("{},queues=4,iothread=0:1", path_disk(&d0)),
        format!("{},queues=2,serial=second", path_disk(&d1)),
    ];
    for dev in 0..2 {
        let cmd = format!("blk.dev={dev} blk.queues=2 blk.mode=randwrite blk.qd=8 blk.count=200 blk.len=1M blk.seed={}", dev + 3);
        let (out, f) = ringvm_guest(&disks, &["--iothreads", "2"], &cmd);
        assert_eq!(out.code, Some(0), "{out:#?}");
        assert_eq!(
            (
                f["errors"].as_str(),
                f["ops"].as_str(),
                f["queues"].as_str()
            ),
            ("0", "200", "2"),
            "{f:?}"
        );
    }
    // Sequential write of the whole range on both disks, then verify each
    // with all of its queues.
    for (dev, queues) in [(0, 4), (1, 2)] {
        let cmd = format!(
            "blk.dev={dev} blk.queues={queues} blk.mode=write blk.qd=16 blk.len=1M blk.seed=11"
        );
        let (out, _) = ringvm_guest(&disks, &["--iothreads", "2"], &cmd);
        assert_eq!(out.code, Some(0), "{out:#?}");
        let cmd = format!(
            "blk.dev={dev} blk.queues={queues} blk.mode=verify blk.qd=16 blk.len=1M blk.seed=11"
        );
        let (out, f) = ringvm_guest(&disks, &["--iothreads", "2"], &cmd);
        assert_eq!((out.code, f["errors"].as_str()), (Some(0), "0"), "{out:#?}");
    }
}

#[test]
fn read_only_disk_fails_guest_writes_and_the_vm_carries_on() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-ro");
    let d = disk(&dir, "ro.img", 1 << 20);
    let (out, f) = ringvm_guest(
        &[format!("{},readonly=on", path_disk(&d))],
        &[],
        "blk.mode=write blk.qd=2 blk.len=64K blk.seed=1",
    );
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(f["errors"], "16", "every write failed: {f:?}");
    assert!(
        std::fs::read(&d).unwrap().iter().all(|&b| b == 0),
        "nothing reached the file"
    );
}

#[test]
fn acknowledged_and_flushed_writes_survive_killing_the_vmm() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-kill");
    let d = disk(&dir, "d.img", 2 << 20);
    // The guest writes, flushes, reports, then spins until killed.
    let mut child = Command::new(common::ringvm_bin())
        .args([
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "128M",
            "--disk",
            &path_disk(&d),
            "--cmdline",
        ])
        .arg("blk.mode=write blk.qd=4 blk.len=256K blk.seed=21 blk.flush=1 blk.hang=1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        assert!(n > 0, "guest output ended before its result line");
        if line.starts_with("RINGVM-RESULT") {
            break;
        }
    }
    assert!(line.contains("errors=0"), "{line}");
    child.kill().unwrap();
    child.wait().unwrap();
    let (out, f) = ringvm_guest(
        &[path_disk(&d)],
        &[],
        "blk.mode=verify blk.qd=4 blk.len=256K blk.seed=21",
    );
    assert_eq!((out.code, f["errors"].as_str()), (Some(0), "0"), "{out:#?}");
}

/// The same guest against QEMU's virtio-blk-pci (TCG, SeaBIOS assigns
/// BARs). QEMU's exit code is (status << 1) | 1.
fn qemu_guest(
    qemu: &Path,
    guest: &Path,
    disks: &[(&Path, &str)],
    cmdline: &str,
) -> (i32, BTreeMap<String, String>) {
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-m",
        "128M",
    ])
    .args([
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
    ])
    .arg(guest)
    .args(["-append", cmdline]);
    for (i, (p, props)) in disks.iter().enumerate() {
        cmd.arg("-drive")
            .arg(format!("if=none,id=d{i},file={},format=raw", p.display()));
        cmd.arg("-device")
            .arg(format!("virtio-blk-pci,drive=d{i}{props}"));
    }
    let out = run_command(&mut cmd, DEADLINE);
    let f = result_fields(&out.stdout)
        .unwrap_or_else(|| panic!("no RINGVM-RESULT from QEMU: {out:#?}"));
    (out.code.unwrap_or(-1), f)
}

#[test]
fn the_guest_driver_passes_the_same_workloads_on_qemu_virtio_blk() {
    let Some(qemu) = qemu() else { return };
    let dir = TempDir::new("blk-qemu");
    let guest = dir.path().join("guest.elf");
    let w = run_ringvm(
        &["builtin-guest", "--output", guest.to_str().unwrap()],
        DEADLINE,
    );
    assert_eq!(w.code, Some(0));
    let d = disk(&dir, "q.img", 4 << 20);
    let (code, f) = qemu_guest(
        &qemu,
        &guest,
        &[(&d, "")],
        "blk.mode=write blk.qd=8 blk.len=1M blk.seed=5 blk.flush=1",
    );
    assert_eq!((code, f["errors"].as_str()), (1, "0"), "{f:?}");
    let (code, f) = qemu_guest(
        &qemu,
        &guest,
        &[(&d, ",num-queues=4")],
        "blk.mode=verify blk.queues=4 blk.qd=8 blk.len=1M blk.seed=5",
    );
    assert_eq!((code, f["errors"].as_str()), (1, "0"), "{f:?}");
    let data = std::fs::read(&d).unwrap();
    let (code, f) = qemu_guest(
        &qemu,
        &guest,
        &[(&d, ",event_idx=off,indirect_desc=off")],
        "blk.mode=crc blk.qd=4 blk.len=1M",
    );
    assert_eq!(code, 1);
    assert_eq!(
        f["crc32"],
        format!("{:08x}", crc32(&data[..1 << 20])),
        "{f:?}"
    );
    // And what QEMU wrote verifies on ringvm.
    if kvm_available() {
        let (out, f) = ringvm_guest(
            &[path_disk(&d)],
            &[],
            "blk.mode=verify blk.qd=8 blk.len=1M blk.seed=5",
        );
        assert_eq!((out.code, f["errors"].as_str()), (Some(0), "0"), "{out:#?}");
    }
}

#[test]
fn o_direct_disk_round_trips() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-direct");
    let d = disk(&dir, "direct.img", 4 << 20);
    let direct = format!("{},direct=on", path_disk(&d));
    let (out, f) = ringvm_guest(
        std::slice::from_ref(&direct),
        &[],
        "blk.mode=write blk.qd=8 blk.len=1M blk.seed=17 blk.flush=1",
    );
    assert_eq!((out.code, f["errors"].as_str()), (Some(0), "0"), "{out:#?}");
    // Read back without O_DIRECT, and with it at 512-byte granularity.
    let (out, f) = ringvm_guest(
        &[path_disk(&d)],
        &[],
        "blk.mode=verify blk.qd=8 blk.len=1M blk.seed=17",
    );
    assert_eq!((out.code, f["errors"].as_str()), (Some(0), "0"), "{out:#?}");
    let (out, f) = ringvm_guest(
        &[direct],
        &[],
        "blk.mode=verify blk.qd=4 blk.bs=512 blk.len=64K blk.seed=17",
    );
    assert_eq!((out.code, f["errors"].as_str()), (Some(0), "0"), "{out:#?}");
}

#[test]
fn fixed_buffer_disk_round_trips_with_o_direct_and_polling() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-fixed");
    let d = disk(&dir, "fixed.img", 4 << 20);
    let fixed = format!("{},direct=on,fixed_buffers=on", path_disk(&d));
    // Written through READ_FIXED/WRITE_FIXED on a polling iothread...
    let (out, f) = ringvm_guest(
        std::slice::from_ref(&fixed),
        &["--iothread-poll-us", "50"],
        "blk.mode=write blk.qd=8 blk.len=1M blk.seed=23 blk.flush=1",
    );
    assert_eq!((out.code, f["errors"].as_str()), (Some(0), "0"), "{out:#?}");
    // ...read back by the plain path, and the other way round.
    let (out, f) = ringvm_guest(
        &[path_disk(&d)],
        &[],
        "blk.mode=verify blk.qd=8 blk.len=1M blk.seed=23",
    );
    assert_eq!((out.code, f["errors"].as_str()), (Some(0), "0"), "{out:#?}");
    let (out, f) = ringvm_guest(&[fixed], &[], "blk.mode=crc blk.qd=4 blk.len=1M");
    assert_eq!((out.code, f["errors"].as_str()), (Some(0), "0"), "{out:#?}");
    let bytes = std::fs::read(&d).unwrap();
    assert_eq!(
        f["crc32"],
        format!("{:08x}", crc32(&bytes[..1 << 20])),
        "{out:#?}"
    );
}

#[test]
fn msix_disk_io_works_with_the_in_kernel_irqchip() {
    if !kvm_available() {
        return;
    }
    // The default is split; this keeps `kernel` covered.
    let dir = TempDir::new("blk-kernel");
    let d = disk(&dir, "kernel.img", 4 << 20);
    let kernel = ["--irqchip", "kernel"];
    let (out, f) = ringvm_guest(
        &[format!("{},queues=2", path_disk(&d))],
        &kernel,
        "blk.mode=write blk.qd=8 blk.len=1M blk.seed=31 blk.queues=2 blk.flush=1",
    );
    assert_eq!((out.code, f["errors"].as_str()), (Some(0), "0"), "{out:#?}");
    assert_ne!(
        f["irqs"], "0",
        "completions came as MSI-X interrupts: {f:?}"
    );
    let (out, f) = ringvm_guest(
        &[path_disk(&d)],
        &kernel,
        "blk.mode=verify blk.qd=8 blk.len=1M blk.seed=31",
    );
    assert_eq!((out.code, f["errors"].as_str()), (Some(0), "0"), "{out:#?}");
}

/// `blk.linger`: after its result line the guest stays up, idle, for that
/// many watchdog ticks, then exits with its status (benches/density.py
/// keeps 50 quiet VMs up this way).
#[test]
fn blk_linger_keeps_the_guest_up_and_idle_after_its_result() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-linger");
    let img = disk(&dir, "d.img", 1 << 20);
    let disk_arg = format!("path={}", img.display());
    let mut vm = common::background::Vm::start(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "64M",
            "--disk",
            &disk_arg,
            "--cmdline",
            "blk.mode=write blk.count=4 blk.linger=20",
        ],
        dir.path(),
    );
    vm.wait_for("RINGVM-RESULT");
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "ended at its result line: {}",
        vm.stdout()
    );
    let (code, stdout, stderr) = vm.finish();
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("errors=0"), "{stdout}");
}

/// `--vcpu-affinity` and `--iothread-affinity`: the named threads run
/// only on the host CPU given (as `/proc/PID/task/TID/status` shows
/// while the guest runs), the others keep the process's CPUs, and the
/// guest's disk I/O goes on as before.
#[test]
fn vcpus_and_iothreads_are_pinned_where_asked() {
    if !kvm_available() {
        return;
    }
    let (all, cpu) = common::own_cpus();
    let dir = TempDir::new("blk-affinity");
    let img = disk(&dir, "d.img", 1 << 20);
    let disk_arg = format!("path={}", img.display());
    let (vcpu_pin, iothread_pin) = (format!("1@{cpu}"), format!("0@{cpu}"));
    let mut vm = common::background::Vm::start(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "64M",
            "--cpus",
            "2",
            "--iothreads",
            "2",
            "--vcpu-affinity",
            &vcpu_pin,
            "--iothread-affinity",
            &iothread_pin,
            "--disk",
            &disk_arg,
            "--cmdline",
            "blk.mode=write blk.count=4 blk.linger=20",
        ],
        dir.path(),
    );
    vm.wait_for("RINGVM-RESULT");
    let placed: BTreeMap<String, String> = common::thread_cpus(vm.child.id()).into_iter().collect();
    let (code, stdout, stderr) = vm.finish();
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("errors=0"), "{stdout}");
    let get = |name: &str| {
        placed
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} thread: {placed:?}"))
    };
    assert_eq!(get("vcpu1"), cpu.to_string(), "{placed:?}");
    assert_eq!(get("iothread0"), cpu.to_string(), "{placed:?}");
    assert_eq!(get("vcpu0"), all, "{placed:?}");
    assert_eq!(get("iothread1"), all, "{placed:?}");
}

/// A placement the host cannot give (no CPU 1000 here) stops the VM with
/// a host error naming the thread, for a vCPU and for an iothread.
#[test]
fn an_impossible_affinity_is_a_host_error_naming_the_thread() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("blk-affinity-bad");
    let img = disk(&dir, "d.img", 1 << 20);
    let disk_arg = format!("path={}", img.display());
    // A vCPU that stops before its first KVM_RUN used to leave its
    // kvm_run pointer to the kick handler, which the stopping side's kick
    // then wrote through after the mapping was gone (a SIGSEGV in about
    // a third of the runs): several runs each.
    let cases = [
        ("--vcpu-affinity", "pinning vCPU 0 to host CPUs 1000"),
        (
            "--iothread-affinity",
            "pinning iothread 0 to host CPUs 1000",
        ),
    ];
    for (flag, says) in cases.into_iter().flat_map(|c| std::iter::repeat_n(c, 8)) {
        let out = common::run_ringvm(
            &[
                "run",
                "--kernel",
                "builtin",
                "--memory",
                "64M",
                "--serial",
                "off",
                "--disk",
                &disk_arg,
                flag,
                "0@1000",
                "--cmdline",
                "exit=0",
            ],
            Duration::from_secs(60),
        );
        assert_eq!(out.code, Some(105), "{flag}: {out:#?}");
        assert!(out.stderr.contains(says), "{flag}: {out:#?}");
        assert!(!out.stderr.contains("panicked"), "{out:#?}");
    }
}
