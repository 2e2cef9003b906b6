//! Snapshot and restore end to end (real KVM, io_uring, files): the
//! built-in guest's 2-vCPU disk workload is paused and snapshotted in the
//! middle, its process SIGKILLed, and a new process restores it and
//! finishes the workload with the same operation count as an
//! uninterrupted run; a verify pass finds every byte. An interrupt
//! pending at snapshot time (a disk completion raised while the VM
//! paused) reaches the guest after restore. One snapshot restores twice
//! against disk copies, under both irqchips, lazily and by copy, from
//! `ringvm run --restore` and from `ringvm serve`'s `vm.restore`. Damaged
//! snapshots are one error line and exit code 2 before any vCPU runs; a VM
//! with a passed-through device refuses `vm.snapshot` naming it.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, ringvm_bin, TempDir};

const DEADLINE: Duration = Duration::from_secs(300);
/// 4096 sequential 4 KiB writes, several seconds under the emulator.
const WORKLOAD_LEN: u64 = 16 << 20;
const BS: u64 = 4096;

/// A ringvm process with stderr in a file (the guest's console goes to
/// a serial file).
struct Vmm {
    child: Child,
    stderr: PathBuf,
}

impl Vmm {
    fn spawn(args: &[&str], dir: &Path, tag: &str) -> Vmm {
        let stderr = dir.join(format!("{tag}.err"));
        let child = Command::new(ringvm_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("spawning ringvm");
        Vmm { child, stderr }
    }

    fn err(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            if start.elapsed() > DEADLINE {
                let _ = self.child.kill();
                panic!("ringvm still running:\n{}", self.err());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash would.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_socket(path: &Path, vmm: &mut Vmm) {
    let start = Instant::now();
    while UnixStream::connect(path).is_err() {
        if let Some(st) = vmm.child.try_wait().unwrap() {
            panic!("ringvm ended ({st}) before its API came up:\n{}", vmm.err());
        }
        assert!(start.elapsed() < DEADLINE, "no API socket at {path:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `ringvm remote`: (exit code, stdout, stderr).
fn remote(sock: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(ringvm_bin())
        .arg("remote")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One raw `PUT` with a JSON body; (status, body).
fn request(sock: &Path, endpoint: &str, body: &[u8]) -> (u16, String) {
    common::http::request(sock, "PUT", endpoint, body)
}

/// Waits until `vm.info` says `state` (the API may answer before the VM
/// is built).
fn wait_state(sock: &Path, state: &str) {
    let start = Instant::now();
    loop {
        let (code, out, err) = remote(sock, &["info"]);
        if code == Some(0) && out.contains(&format!("\"state\":\"{state}\"")) {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "never {state}: {out} {err}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn remote_ok(sock: &Path, args: &[&str]) -> String {
    let (code, out, err) = remote(sock, args);
    assert_eq!(code, Some(0), "remote {args:?}: {err}");
    out
}

fn disk(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn block_written(path: &Path, offset: u64) -> bool {
    let mut buf = vec![0u8; BS as usize];
    let f = File::open(path).unwrap();
    f.read_exact_at(&mut buf, offset).unwrap();
    buf.iter().any(|&b| b != 0)
}

/// Waits until the guest's sequential write reached `offset`.
fn wait_written(path: &Path, offset: u64, vmm: &mut Vmm) {
    let start = Instant::now();
    while !block_written(path, offset) {
        if let Some(st) = vmm.child.try_wait().unwrap() {
            panic!("ringvm ended ({st}) early:\n{}", vmm.err());
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the guest never wrote {offset:#x}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fields of the whole RINGVM-RESULT line in a serial file.
fn serial_result(path: &Path) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text
        .split_inclusive('\n')
        .find(|l| l.starts_with("RINGVM-RESULT") && l.ends_with('\n'))?;
    Some(
        line.split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn workload(seed: u32, mode: &str) -> String {
    format!("blk.mode={mode} blk.qd=4 blk.bs={BS} blk.len={WORKLOAD_LEN} blk.seed={seed}")
}

/// Runs the built-in guest to its end; its result fields.
fn run_guest(
    dir: &Path,
    tag: &str,
    disk: &Path,
    cmdline: &str,
    irqchip: &str,
) -> BTreeMap<String, String> {
    let serial = dir.join(format!("{tag}.serial"));
    let (serial_arg, disk_arg) = (
        format!("file={}", serial.display()),
        format!("path={}", disk.display()),
    );
    let mut vmm = Vmm::spawn(
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
            "--serial",
            &serial_arg,
            "--disk",
            &disk_arg,
            "--cmdline",
            cmdline,
        ],
        dir,
        tag,
    );
    let code = vmm.wait();
    let f = serial_result(&serial)
        .unwrap_or_else(|| panic!("{tag}: no result line (exit {code:?}):\n{}", vmm.err()));
    assert_eq!(code, Some(0), "{tag}: {f:?}\n{}", vmm.err());
    f
}

/// The vectors pending in any vCPU's local APIC (IRR) in a snapshot.
fn pending_vectors(snapshot: &Path) -> Vec<u8> {
    let bytes = std::fs::read(snapshot.join("state")).unwrap();
    let state = vmm::snapshot::format::decode_state(&bytes).unwrap();
    let mut out = Vec::new();
    for v in &state.vcpus {
        for reg in 0..8usize {
            let off = 0x200 + 0x10 * reg;
            let word = u32::from_le_bytes(std::array::from_fn(|i| v.lapic.regs[off + i] as u8));
            for bit in 0..32 {
                if word & (1 << bit) != 0 {
                    out.push((reg * 32 + bit) as u8);
                }
            }
        }
    }
    out
}

/// Starts the 2-vCPU workload under an API socket, waits until it is in
/// the middle, and snapshots it paused into `snap` at a moment when a
/// disk completion interrupt (vector 0x40, queue 0's MSI-X vector in the
/// guest) is pending in a local APIC. Returns the process (still paused).
fn snapshot_mid_workload(dir: &Path, disk: &Path, snap: &Path, irqchip: &str, seed: u32) -> Vmm {
    let sock = dir.join("orig.sock");
    let serial = dir.join("orig.serial");
    let (serial_arg, disk_arg) = (
        format!("file={}", serial.display()),
        format!("path={}", disk.display()),
    );
    let cmdline = workload(seed, "write");
    let mut vmm = Vmm::spawn(
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
            "--serial",
            &serial_arg,
            "--disk",
            &disk_arg,
            "--cmdline",
            &cmdline,
            "--api-socket",
            sock.to_str().unwrap(),
        ],
        dir,
        "orig",
    );
    wait_for_socket(&sock, &mut vmm);
    wait_written(disk, WORKLOAD_LEN / 8, &mut vmm);
    // Snapshotting a running VM is refused.
    let url = format!("file://{}", snap.display());
    let (code, _, err) = remote(&sock, &["snapshot", &url]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("HTTP 409") && err.contains("Running"), "{err}");
    assert!(!snap.exists(), "a refused snapshot wrote nothing");
    let mut tries = 0;
    // A failed request says what the VMM did (it exited? its log?).
    let checked = |vmm: &mut Vmm, args: &[&str], tries: u64| {
        let (code, _, err) = remote(&sock, args);
        if code != Some(0) {
            let exited = vmm.child.try_wait().ok().flatten();
            panic!(
                "remote {args:?} (try {tries}): {err}\nringvm exited: {exited:?}\nits stderr:\n{}",
                vmm.err()
            );
        }
    };
    loop {
        checked(&mut vmm, &["pause"], tries);
        checked(&mut vmm, &["snapshot", &url], tries);
        let pending = pending_vectors(snap);
        eprintln!("snapshot {tries}: vectors pending in the local APICs: {pending:x?}");
        if pending.contains(&0x40) {
            break;
        }
        // A completion is pending only when the pause caught requests in
        // flight: try again a little later in the workload, up to 3/4 of
        // it.
        tries += 1;
        let next = WORKLOAD_LEN / 8 + tries * (64 << 10);
        assert!(
            next < WORKLOAD_LEN * 3 / 4,
            "no snapshot in {tries} caught a pending disk interrupt"
        );
        checked(&mut vmm, &["resume"], tries);
        // Let the guest get on with it before the next try.
        wait_written(disk, next, &mut vmm);
    }
    // In the middle: the last block is not written yet.
    assert!(
        !block_written(disk, WORKLOAD_LEN - BS),
        "the workload finished before the snapshot"
    );
    assert!(
        serial_result(&serial).is_none(),
        "no result line before the snapshot"
    );
    vmm
}

/// `ringvm run --restore`, resumed at once; the result fields.
fn restore_and_finish(
    dir: &Path,
    tag: &str,
    spec: &str,
    extra: &[&str],
) -> BTreeMap<String, String> {
    let serial = dir.join(format!("{tag}.serial"));
    let serial_arg = format!("file={}", serial.display());
    let mut args = vec!["run", "--restore", spec, "--serial", &serial_arg];
    args.extend_from_slice(extra);
    let mut vmm = Vmm::spawn(&args, dir, tag);
    let code = vmm.wait();
    let f = serial_result(&serial)
        .unwrap_or_else(|| panic!("{tag}: no result line (exit {code:?}):\n{}", vmm.err()));
    assert_eq!(code, Some(0), "{tag}: {f:?}\n{}", vmm.err());
    assert!(
        vmm.err().contains("restored from a snapshot"),
        "{}",
        vmm.err()
    );
    f
}

fn assert_finished_like(restored: &BTreeMap<String, String>, reference: &BTreeMap<String, String>) {
    assert_eq!(restored["errors"], "0", "{restored:?}");
    assert_eq!(
        restored["ops"], reference["ops"],
        "{restored:?} vs {reference:?}"
    );
    assert_eq!(
        restored["bytes"], reference["bytes"],
        "{restored:?} vs {reference:?}"
    );
    assert_eq!(restored["ops"], (WORKLOAD_LEN / BS).to_string());
}

#[test]
fn a_disk_workload_snapshotted_mid_run_finishes_in_a_new_process_after_sigkill() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("snap-sigkill");
    let d = dir.path();
    // The uninterrupted run, for its counts.
    let reference_disk = disk(d, "ref.img", 64 << 20);
    let reference = run_guest(d, "ref", &reference_disk, &workload(7, "write"), "split");
    let disk_path = disk(d, "d.img", 64 << 20);
    let snap = d.join("snap");
    let vmm = snapshot_mid_workload(d, &disk_path, &snap, "split", 7);
    vmm.kill();
    for f in ["config.json", "state", "memory0"] {
        assert!(snap.join(f).is_file(), "{f} missing");
    }
    // Sparse: far fewer blocks than the 64 MiB of RAM.
    let meta = std::fs::metadata(snap.join("memory0")).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 32 << 20,
        "memory0 is not sparse: {} blocks",
        std::os::unix::fs::MetadataExt::blocks(&meta)
    );
    let spec = format!("source={},resume=on", snap.display());
    let restored = restore_and_finish(d, "restored", &spec, &[]);
    assert_finished_like(&restored, &reference);
    // A new VM on the same disk finds every byte.
    let verify = run_guest(d, "verify", &disk_path, &workload(7, "verify"), "split");
    assert_eq!(verify["errors"], "0", "{verify:?}");
    assert_eq!(verify["ops"], reference["ops"]);
}

#[test]
fn one_snapshot_restores_twice_onto_disk_copies_with_the_in_kernel_irqchip() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("snap-twice");
    let d = dir.path();
    let reference_disk = disk(d, "ref.img", 64 << 20);
    let reference = run_guest(d, "ref", &reference_disk, &workload(11, "write"), "kernel");
    let disk_path = disk(d, "d.img", 64 << 20);
    let snap = d.join("snap");
    snapshot_mid_workload(d, &disk_path, &snap, "kernel", 11).kill();
    let copies: Vec<PathBuf> = ["a.img", "b.img"]
        .iter()
        .map(|n| {
            let p = d.join(n);
            std::fs::copy(&disk_path, &p).unwrap();
            p
        })
        .collect();
    // First: `ringvm run --restore` mapping memory copy-on-write.
    let spec = format!("source={},resume=on", snap.display());
    let override_a = format!("virtio-blk0={}", copies[0].display());
    let a = restore_and_finish(d, "a", &spec, &["--disk-path", &override_a]);
    assert_finished_like(&a, &reference);
    // Second: `ringvm serve` restores it paused, copying memory in, and
    // `vm.resume` lets it finish.
    let sock = d.join("serve.sock");
    let mut serve = Vmm::spawn(
        &["serve", "--api-socket", sock.to_str().unwrap()],
        d,
        "serve",
    );
    wait_for_socket(&sock, &mut serve);
    let body = serde_json::json!({
        "source_url": format!("file://{}", snap.display()),
        "memory_restore_mode": "copy",
        "disk_paths": {"virtio-blk0": copies[1].display().to_string()},
    });
    let (status, resp) = request(&sock, "vm.restore", body.to_string().as_bytes());
    assert_eq!(status, 204, "{resp}\n{}", serve.err());
    let info = remote_ok(&sock, &["info"]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["state"], "Paused", "{info}");
    assert_eq!(v["config"]["irqchip"], "kernel", "{info}");
    assert_eq!(
        v["config"]["disks"][0]["path"],
        copies[1].display().to_string(),
        "{info}"
    );
    // Paused means paused: the disk copy does not change.
    let before = std::fs::read(&copies[1]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        std::fs::read(&copies[1]).unwrap() == before,
        "a paused VM wrote its disk"
    );
    remote_ok(&sock, &["resume"]);
    // The console is the snapshot's: the original's serial file.
    let serial = d.join("orig.serial");
    let start = Instant::now();
    let b = loop {
        if let Some(f) = serial_result(&serial) {
            break f;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no result after vm.restore:\n{}",
            serve.err()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_finished_like(&b, &reference);
    remote_ok(&sock, &["shutdown-vmm"]);
    assert_eq!(serve.wait(), Some(0), "{}", serve.err());
    for copy in &copies {
        let verify = run_guest(d, "verify", copy, &workload(11, "verify"), "kernel");
        assert_eq!(verify["errors"], "0", "{verify:?}");
    }
}

/// A small paused VM's snapshot in `dir/snap` (the guest wrote a little
/// and spins): the base for the damaged copies.
fn small_snapshot(dir: &Path, extra: &[&str]) -> (PathBuf, Vmm, PathBuf) {
    let sock = dir.join("small.sock");
    let serial = dir.join("small.serial");
    let d = disk(dir, "small.img", 4 << 20);
    let (serial_arg, disk_arg) = (
        format!("file={}", serial.display()),
        format!("path={}", d.display()),
    );
    let mut args = vec![
        "run",
        "--kernel",
        "builtin",
        "--memory",
        "32M",
        "--serial",
        &serial_arg,
        "--disk",
        &disk_arg,
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "blk.mode=write blk.qd=2 blk.len=64K blk.seed=3 blk.hang=1",
    ];
    args.extend_from_slice(extra);
    let mut vmm = Vmm::spawn(&args, dir, "small");
    wait_for_socket(&sock, &mut vmm);
    let start = Instant::now();
    while serial_result(&serial).is_none() {
        if let Some(st) = vmm.child.try_wait().unwrap() {
            panic!("ringvm ended ({st}) early:\n{}", vmm.err());
        }
        assert!(start.elapsed() < DEADLINE, "no result line");
        std::thread::sleep(Duration::from_millis(20));
    }
    remote_ok(&sock, &["pause"]);
    (sock, vmm, serial)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// `ringvm run --restore` of `snap`: exit code 2, one error line that
/// contains `expect`, and no vCPU ran (no guest output, no `restored`
/// event).
fn assert_refused(dir: &Path, snap: &Path, expect: &str) {
    let tag = snap.file_name().unwrap().to_str().unwrap().to_string();
    let serial = dir.join(format!("{tag}.serial"));
    let events = dir.join(format!("{tag}.events"));
    let spec = format!("source={},resume=on", snap.display());
    let (serial_arg, events_arg) = (
        format!("file={}", serial.display()),
        format!("path={}", events.display()),
    );
    let mut vmm = Vmm::spawn(
        &[
            "run",
            "--restore",
            &spec,
            "--serial",
            &serial_arg,
            "--event-monitor",
            &events_arg,
        ],
        dir,
        &tag,
    );
    let code = vmm.wait();
    let err = vmm.err();
    assert_eq!(code, Some(2), "{tag}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{tag}: one line: {err}");
    assert!(lines[0].starts_with("ringvm: error: "), "{tag}: {err}");
    assert!(lines[0].contains(expect), "{tag}: {expect:?} not in {err}");
    eprintln!("{tag}: {}", lines[0]);
    assert!(!err.contains("panicked"), "{tag}: {err}");
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(out.is_empty(), "{tag}: the guest ran: {out}");
    let ev = std::fs::read_to_string(&events).unwrap_or_default();
    assert!(
        !ev.contains("restored") && !ev.contains("booted"),
        "{tag}: {ev}"
    );
}

#[test]
fn damaged_snapshots_are_one_error_line_and_exit_code_2_before_any_vcpu_runs() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("snap-bad");
    let d = dir.path();
    let (sock, vmm, _) = small_snapshot(d, &[]);
    let good = d.join("good");
    // Not a file:// URL: 400.
    let (code, _, err) = remote(&sock, &["snapshot", "/tmp/x"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("HTTP 400") && err.contains("file://"), "{err}");
    remote_ok(&sock, &["snapshot", &format!("file://{}", good.display())]);
    vmm.kill();
    let variant = |name: &str, damage: &dyn Fn(&Path)| -> PathBuf {
        let p = d.join(name);
        copy_dir(&good, &p);
        damage(&p);
        p
    };
    let state = |p: &Path| p.join("state");
    let edit_state = |p: &Path, f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = std::fs::read(state(p)).unwrap();
        f(&mut b);
        std::fs::write(state(p), b).unwrap();
    };
    let edit_config = |p: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let path = p.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    };
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            variant("no-state", &|p| std::fs::remove_file(state(p)).unwrap()),
            "state",
        ),
        (
            variant("no-memory", &|p| {
                std::fs::remove_file(p.join("memory0")).unwrap()
            }),
            "memory0",
        ),
        (
            variant("no-config", &|p| {
                std::fs::remove_file(p.join("config.json")).unwrap()
            }),
            "config.json",
        ),
        (
            variant("truncated", &|p| {
                edit_state(p, &|b| b.truncate(b.len() - 100))
            }),
            "truncated",
        ),
        (
            variant("corrupted", &|p| {
                edit_state(p, &|b| {
                    let i = b.len() / 2;
                    b[i] ^= 0x5a;
                })
            }),
            "checksum",
        ),
        (
            variant("version", &|p| edit_state(p, &|b| b[8] = 77)),
            "format version 77",
        ),
        (
            variant("not-a-snapshot", &|p| {
                std::fs::write(state(p), b"hello").unwrap()
            }),
            "shorter than",
        ),
        (
            variant("device-mismatch", &|p| {
                edit_config(p, &|v| v["disks"] = serde_json::json!([]))
            }),
            "virtio-blk0",
        ),
        (
            variant("memory-size", &|p| {
                edit_config(p, &|v| v["memory"]["size"] = serde_json::json!(64 << 20))
            }),
            "RAM regions",
        ),
        (
            variant("memory-file-size", &|p| {
                File::options()
                    .write(true)
                    .open(p.join("memory0"))
                    .unwrap()
                    .set_len(16 << 20)
                    .unwrap()
            }),
            "memory file",
        ),
        (
            variant("cpus", &|p| {
                edit_config(p, &|v| v["cpus"]["boot_vcpus"] = serde_json::json!(2))
            }),
            "vCPUs",
        ),
        (
            variant("bad-config", &|p| {
                std::fs::write(p.join("config.json"), b"{").unwrap()
            }),
            "not a VM configuration",
        ),
    ];
    for (snap, expect) in &cases {
        assert_refused(d, snap, expect);
    }
    // A disk override that names no device of the snapshot.
    let spec = format!("source={},resume=on", good.display());
    let mut vmm = Vmm::spawn(
        &[
            "run",
            "--restore",
            &spec,
            "--disk-path",
            "virtio-blk5=/tmp/x",
        ],
        d,
        "bad-override",
    );
    assert_eq!(vmm.wait(), Some(2), "{}", vmm.err());
    assert!(vmm.err().contains("virtio-blk5"), "{}", vmm.err());
    // The undamaged snapshot restores, Paused, and resumes.
    let sock2 = d.join("good.sock");
    let spec = format!("source={}", good.display());
    let mut vmm = Vmm::spawn(
        &[
            "run",
            "--restore",
            &spec,
            "--serial",
            &format!("file={}", d.join("good.serial").display()),
            "--api-socket",
            sock2.to_str().unwrap(),
        ],
        d,
        "good",
    );
    wait_for_socket(&sock2, &mut vmm);
    wait_state(&sock2, "Paused");
    // A VM whose memory is mapped from `good` snapshots into `good`
    // itself (the files it reads from are replaced, not truncated).
    remote_ok(&sock2, &["snapshot", &format!("file://{}", good.display())]);
    remote_ok(&sock2, &["resume"]);
    assert!(remote_ok(&sock2, &["info"]).contains("\"Running\""));
    remote_ok(&sock2, &["shutdown"]);
    assert_eq!(vmm.wait(), Some(108), "{}", vmm.err());
    // And that snapshot restores.
    let mut vmm = Vmm::spawn(
        &[
            "run",
            "--restore",
            &spec,
            "--serial",
            &format!("file={}", d.join("again.serial").display()),
            "--api-socket",
            sock2.to_str().unwrap(),
        ],
        d,
        "again",
    );
    wait_for_socket(&sock2, &mut vmm);
    wait_state(&sock2, "Paused");
    // A restored VM reboots into a fresh boot of its configuration: the
    // guest runs its workload from the start and prints its result again.
    remote_ok(&sock2, &["reboot"]);
    wait_state(&sock2, "Running");
    let again = d.join("again.serial");
    let start = Instant::now();
    while serial_result(&again).is_none() {
        assert!(
            start.elapsed() < DEADLINE,
            "no result after the reboot: {}",
            vmm.err()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    remote_ok(&sock2, &["shutdown"]);
    assert_eq!(vmm.wait(), Some(108), "{}", vmm.err());
    // Without resume=on or an API nobody could resume it.
    let mut vmm = Vmm::spawn(&["run", "--restore", &spec], d, "no-api");
    assert_eq!(vmm.wait(), Some(2), "{}", vmm.err());
    assert!(vmm.err().contains("--api-socket"), "{}", vmm.err());
}

#[test]
fn a_vm_with_a_passed_through_device_refuses_vm_snapshot_naming_it() {
    if !kvm_available() {
        return;
    }
    use ringvm_test_devices::vfio_user_dev::{self, Behaviour};
    let dir = TempDir::new("snap-pt");
    let d = dir.path();
    let socket = d.join("dev.sock");
    let _dev = vfio_user_dev::spawn(&socket, Behaviour::Good).expect("starting the test device");
    let spec = format!("socket={}", socket.display());
    let (sock, vmm, _) = small_snapshot(d, &["--user-device", &spec]);
    let snap = d.join("snap");
    let (code, _, err) = remote(&sock, &["snapshot", &format!("file://{}", snap.display())]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("HTTP 409"), "{err}");
    assert!(err.contains("passthrough0"), "names the device: {err}");
    assert!(!snap.exists(), "nothing written");
    // The VM is still paused and fine.
    let info = remote_ok(&sock, &["info"]);
    assert!(info.contains("\"Paused\""), "{info}");
    vmm.kill();
}

/// Sends `count` numbered datagrams to the guest's echo port one at a
/// time (no retransmission) and counts the echoes; runs inside the
/// namespace.
fn echo_one_by_one(first: u64, count: u64) -> u64 {
    use common::netns::{GUEST_IP, HOST_IP};
    let s = std::net::UdpSocket::bind((HOST_IP, 0)).expect("binding a UDP socket");
    s.connect((GUEST_IP, 7)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 64];
    let mut answered = 0;
    for seq in first..first + count {
        let mut payload = [0x5au8; 64];
        payload[..8].copy_from_slice(&seq.to_le_bytes());
        s.send(&payload).unwrap();
        match s.recv(&mut buf) {
            Ok(64) if buf[..8] == seq.to_le_bytes() => answered += 1,
            other => panic!("datagram {seq}: {other:?}"),
        }
    }
    answered
}

#[test]
fn udp_echoes_continue_after_restore_onto_a_different_tap() {
    use common::netns::{Netns, HOST_IP, TAP};
    if !kvm_available() {
        return;
    }
    let Some(ns) = Netns::new("snap") else {
        return;
    };
    ns.add_tap(1);
    let dir = TempDir::new("snap-net");
    let d = dir.path();
    let sock = d.join("net.sock");
    let serial = d.join("net.serial");
    let spawn_in_ns = |args: &[String], tag: &str| -> Vmm {
        let stderr = d.join(format!("{tag}.err"));
        let child = ns
            .command(ringvm_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Vmm { child, stderr }
    };
    let s = |v: &str| v.to_string();
    let mut vmm = spawn_in_ns(
        &[
            s("run"),
            s("--kernel"),
            s("builtin"),
            s("--memory"),
            s("64M"),
            s("--serial"),
            format!("file={}", serial.display()),
            s("--net"),
            format!("tap={TAP}"),
            s("--api-socket"),
            sock.display().to_string(),
            s("--cmdline"),
            s("net.ip=10.0.0.2/24 net.count=60"),
        ],
        "net",
    );
    wait_for_socket(&sock, &mut vmm);
    let start = Instant::now();
    while !std::fs::read_to_string(&serial)
        .unwrap_or_default()
        .contains("net: up")
    {
        assert!(vmm.child.try_wait().unwrap().is_none(), "{}", vmm.err());
        assert!(start.elapsed() < DEADLINE, "no net: up");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ns.thread(|| echo_one_by_one(0, 30)).join().unwrap(), 30);
    remote_ok(&sock, &["pause"]);
    let snap = d.join("snap");
    remote_ok(&sock, &["snapshot", &format!("file://{}", snap.display())]);
    vmm.kill();
    // A different TAP, with the host address, replaces the old one.
    ns.ip(&["link", "del", TAP]);
    let tap2 = "rvtap1";
    ns.ip(&["tuntap", "add", "dev", tap2, "mode", "tap"]);
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", tap2]);
    ns.ip(&["link", "set", tap2, "up"]);
    let serial2 = d.join("net2.serial");
    let events = d.join("net2.events");
    let mut vmm = spawn_in_ns(
        &[
            s("run"),
            s("--restore"),
            format!("source={},resume=on", snap.display()),
            s("--net-tap"),
            format!("virtio-net0={tap2}"),
            s("--serial"),
            format!("file={}", serial2.display()),
            s("--event-monitor"),
            format!("path={}", events.display()),
        ],
        "net2",
    );
    // Traffic sent before the TAP has its reader would be lost to ARP.
    let start = Instant::now();
    while !std::fs::read_to_string(&events)
        .unwrap_or_default()
        .contains("\"resumed\"")
    {
        assert!(vmm.child.try_wait().unwrap().is_none(), "{}", vmm.err());
        assert!(start.elapsed() < DEADLINE, "the restored VM never resumed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ns.thread(|| echo_one_by_one(30, 30)).join().unwrap(), 30);
    assert_eq!(vmm.wait(), Some(0), "{}", vmm.err());
    let f = serial_result(&serial2).expect("a result line after 60 echoes");
    assert_eq!((f["udp"].as_str(), f["bad"].as_str()), ("60", "0"), "{f:?}");
}

/// The threads' host placement (`--vcpu-affinity`, `--iothread-affinity`)
/// is part of the VM's configuration: the snapshot's `config.json` carries
/// it and a restore pins the vCPU and iothreads the same way, unless the
/// restoring command names its own.
#[test]
fn a_restored_vm_keeps_its_thread_placement() {
    if !kvm_available() {
        return;
    }
    let (_, cpu) = common::own_cpus();
    let dir = TempDir::new("snap-affinity");
    let d = dir.path();
    let (pin, io_pin) = (format!("1@{cpu}"), format!("0@{cpu}"));
    let (sock, vmm, _) = small_snapshot(
        d,
        &[
            "--cpus",
            "2",
            "--vcpu-affinity",
            &pin,
            "--iothread-affinity",
            &io_pin,
        ],
    );
    let snap = d.join("snap");
    remote_ok(&sock, &["snapshot", &format!("file://{}", snap.display())]);
    vmm.kill();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["cpus"]["affinity"],
        serde_json::json!([{"vcpu": 1, "host_cpus": [cpu]}]),
        "{config}"
    );
    assert_eq!(
        config["iothread_affinity"],
        serde_json::json!([{"iothread": 0, "host_cpus": [cpu]}]),
        "{config}"
    );
    // Restored paused: the vCPU threads are up and parked. (vcpu1's CPUs,
    // iothread0's CPUs.)
    let placement = |extra: &[&str], tag: &str| -> (String, String) {
        let sock = d.join(format!("{tag}.sock"));
        let spec = format!("source={}", snap.display());
        let serial = format!("file={}", d.join(format!("{tag}.serial")).display());
        let mut args = vec![
            "run",
            "--restore",
            &spec,
            "--serial",
            &serial,
            "--api-socket",
        ];
        args.push(sock.to_str().unwrap());
        args.extend_from_slice(extra);
        let mut vmm = Vmm::spawn(&args, d, tag);
        wait_for_socket(&sock, &mut vmm);
        wait_state(&sock, "Paused");
        let pid = vmm.child.id();
        let start = Instant::now();
        loop {
            let threads = common::thread_cpus(pid);
            let cpus_of = |want: &str| {
                threads
                    .iter()
                    .find_map(|(name, cpus)| (name == want).then(|| cpus.clone()))
            };
            if let (Some(vcpu), Some(io)) = (cpus_of("vcpu1"), cpus_of("iothread0")) {
                vmm.kill();
                return (vcpu, io);
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no vcpu1 or iothread0 thread:\n{}",
                vmm.err()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(placement(&[], "kept"), (cpu.to_string(), cpu.to_string()));
    // The restoring command's own placement wins.
    let other = format!("1@0-{cpu}");
    let want = if cpu == 0 {
        "0".to_string()
    } else {
        format!("0-{cpu}")
    };
    let other_io = format!("0@0-{cpu}");
    assert_eq!(
        placement(&["--vcpu-affinity", &other], "vcpus-moved"),
        (want.clone(), cpu.to_string())
    );
    assert_eq!(
        placement(
            &["--vcpu-affinity", &other, "--iothread-affinity", &other_io],
            "moved"
        ),
        (want.clone(), want)
    );
}
