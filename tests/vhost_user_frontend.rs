//! ringvm as a vhost-user front-end: the built-in guest's virtio-blk and
//! virtio-net drivers against devices whose queues real backend processes
//! serve: `ringvm-blk`, `qemu-storage-daemon --export type=vhost-user-blk`
//! (an independent backend) and DPDK's `dpdk-testpmd` with a `net_vhost`
//! port forwarding to a `net_tap` port. A scripted backend in this file
//! lies in the handshake. Deadlines are generous: the guest runs under an
//! instruction emulator; nothing asserts on time.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{crc32, kvm_available, result_fields, ringvm_bin, run_ringvm, Outcome, TempDir};

const DEADLINE: Duration = Duration::from_secs(300);
/// ringvm's exit code when stopped by SIGINT, SIGTERM or SIGHUP.
const EXIT_SIGNALLED: i32 = 106;
const QSD: &str = "/usr/bin/qemu-storage-daemon";
const TESTPMD: &str = "/usr/bin/dpdk-testpmd";
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A tool the test needs: its absence fails under CI=true, else skips.
fn have(path: &str, package: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    assert!(!ci(), "{path} missing and CI=true (install {package})");
    eprintln!("skipping: {path} is not installed ({package})");
    false
}

/// `ringvm-blk`, next to `ringvm`; built now if the workspace was not.
fn ringvm_blk_bin() -> PathBuf {
    let p = ringvm_bin().with_file_name("ringvm-blk");
    if !p.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "ringvm-blk", "--bin", "ringvm-blk"])
            .status()
            .expect("running cargo build -p ringvm-blk");
        assert!(st.success(), "building ringvm-blk failed");
    }
    p
}

/// The guest's pattern word for absolute sector `sector`.
fn tag(seed: u64, sector: u64) -> u64 {
    let mut z = (seed.wrapping_mul(GOLDEN) ^ sector).wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether sector `sector` of `file` holds the guest's pattern for `seed`.
fn sector_has_pattern(file: &File, seed: u64, sector: u64) -> bool {
    let mut buf = [0u8; 512];
    if file.read_exact_at(&mut buf, sector * 512).is_err() {
        return false;
    }
    buf.chunks_exact(8)
        .all(|w| u64::from_le_bytes(w.try_into().unwrap()) == tag(seed, sector))
}

/// Sectors of `[0, len)` that do not hold the pattern.
fn bad_sectors(path: &Path, seed: u64, len: u64) -> u64 {
    let f = File::open(path).unwrap();
    (0..len / 512)
        .filter(|&s| !sector_has_pattern(&f, seed, s))
        .count() as u64
}

/// A vhost-user-blk backend process.
#[derive(Clone, Copy, Debug)]
enum Backend {
    RingvmBlk,
    Qsd,
}

impl Backend {
    fn available(self) -> bool {
        match self {
            Backend::RingvmBlk => true,
            Backend::Qsd => have(QSD, "qemu-system-x86"),
        }
    }

    /// Serves `disk` on `socket` with `queues` queues; returns once the
    /// socket is there.
    fn spawn(self, socket: &Path, disk: &Path, queues: u16, readonly: bool) -> Child {
        let _ = std::fs::remove_file(socket);
        let mut cmd = match self {
            Backend::RingvmBlk => {
                let mut c = Command::new(ringvm_blk_bin());
                c.arg("--socket").arg(socket).arg("--disk").arg(format!(
                    "path={},queues={queues}{}",
                    disk.display(),
                    if readonly { ",readonly=on" } else { "" }
                ));
                c
            }
            Backend::Qsd => {
                let mut c = Command::new(QSD);
                c.arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=f,filename={}{}",
                        disk.display(),
                        if readonly { ",read-only=on" } else { "" }
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={},num-queues={queues}",
                        socket.display(),
                        if readonly { "off" } else { "on" }
                    ));
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {self:?}: {e}"));
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{self:?} made no socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }
}

/// Kills a backend process and reaps it.
fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Stops a backend with SIGTERM and reaps it.
fn terminate(mut child: Child) {
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

fn vhost_disk(socket: &Path, extra: &str) -> String {
    format!("vhost_user=on,socket={}{extra}", socket.display())
}

/// Boots the built-in guest with one `--disk` and `cmdline` to its end.
fn guest(disk: &str, cmdline: &str) -> (Outcome, BTreeMap<String, String>) {
    let out = run_ringvm(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "128M",
            "--disk",
            disk,
            "--cmdline",
            cmdline,
        ],
        DEADLINE,
    );
    let f = result_fields(&out.stdout).unwrap_or_else(|| panic!("no RINGVM-RESULT: {out:#?}"));
    (out, f)
}

/// The guest writes a seeded pattern with `queues` queues through
/// `backend`, the host file holds it, and the guest's CRC of a range
/// through the backend equals the host's.
fn pattern_and_crc(backend: Backend, queues: u16) {
    let dir = TempDir::new(&format!("vhu-{backend:?}-{queues}"));
    let disk = dir.path().join("d.img");
    File::create(&disk).unwrap().set_len(4 << 20).unwrap();
    let socket = dir.path().join("blk.sock");
    let seed = 11 + u64::from(queues);
    let spec = vhost_disk(&socket, &format!(",queues={queues}"));

    let b = backend.spawn(&socket, &disk, queues, false);
    let (out, f) = guest(
        &spec,
        &format!("blk.mode=write blk.bs=4096 blk.qd=8 blk.queues={queues} blk.len=2M blk.seed={seed} blk.flush=1"),
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(
        (
            f["errors"].as_str(),
            f["ops"].as_str(),
            f["queues"].as_str()
        ),
        ("0", "512", queues.to_string().as_str()),
        "{f:?}"
    );
    // The flush completed: the pattern is in the host file.
    assert_eq!(bad_sectors(&disk, seed, 2 << 20), 0);

    // The same backend serves a second VM (a new front-end).
    let (out, f) = guest(
        &spec,
        &format!(
            "blk.mode=crc blk.bs=8192 blk.qd=4 blk.queues={queues} blk.offset=4096 blk.len=1M"
        ),
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    let data = std::fs::read(&disk).unwrap();
    assert_eq!(
        f["crc32"],
        format!("{:08x}", crc32(&data[4096..4096 + (1 << 20)])),
        "{f:?}"
    );
    // A wrong seed does not verify: the check can fail.
    let (out, f) = guest(
        &spec,
        &format!(
            "blk.mode=verify blk.qd=4 blk.queues={queues} blk.len=64K blk.seed={}",
            seed + 1
        ),
    );
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_ne!(f["errors"], "0", "{f:?}");
    terminate(b);
}

#[test]
fn ringvm_blk_one_queue_pattern_and_crc() {
    if kvm_available() {
        pattern_and_crc(Backend::RingvmBlk, 1);
    }
}

#[test]
fn ringvm_blk_four_queues_pattern_and_crc() {
    if kvm_available() {
        pattern_and_crc(Backend::RingvmBlk, 4);
    }
}

#[test]
fn qemu_storage_daemon_one_queue_pattern_and_crc() {
    if kvm_available() && Backend::Qsd.available() {
        pattern_and_crc(Backend::Qsd, 1);
    }
}

#[test]
fn qemu_storage_daemon_four_queues_pattern_and_crc() {
    if kvm_available() && Backend::Qsd.available() {
        pattern_and_crc(Backend::Qsd, 4);
    }
}

#[test]
fn read_only_exports_offer_ro_and_fail_writes_with_ioerr() {
    if !kvm_available() {
        return;
    }
    for backend in [Backend::RingvmBlk, Backend::Qsd] {
        if !backend.available() {
            continue;
        }
        let dir = TempDir::new(&format!("vhu-ro-{backend:?}"));
        let disk = dir.path().join("ro.img");
        std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
        let socket = dir.path().join("ro.sock");
        let b = backend.spawn(&socket, &disk, 1, true);
        let (out, f) = guest(
            &vhost_disk(&socket, ""),
            "blk.mode=randwrite blk.count=16 blk.qd=4 blk.len=512K",
        );
        terminate(b);
        let features = out
            .stdout
            .lines()
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("features=0x"))
            })
            .map(|h| u64::from_str_radix(h, 16).unwrap())
            .unwrap_or_else(|| panic!("no features line: {out:#?}"));
        assert_ne!(
            features & (1 << 5),
            0,
            "{backend:?}: RO not negotiated: {features:#x}"
        );
        assert_eq!(out.code, Some(1), "{backend:?}: {out:#?}");
        assert_eq!(f["errors"], "16", "{backend:?}: every write failed: {f:?}");
        assert!(
            std::fs::read(&disk).unwrap().iter().all(|&b| b == 0x5a),
            "{backend:?}: the file changed"
        );
    }
}

/// A `ringvm` run in the background with stderr in a file.
struct Vm {
    child: Child,
    stdout: std::thread::JoinHandle<String>,
    stderr: PathBuf,
}

impl Vm {
    fn start(args: &[&str], stderr: PathBuf) -> Vm {
        let mut child = Command::new(ringvm_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("starting ringvm");
        let mut out = child.stdout.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        Vm {
            child,
            stdout,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until stderr contains `text`; panics if ringvm ends first.
    fn wait_stderr(&mut self, text: &str) {
        let start = Instant::now();
        while !self.stderr().contains(text) {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "ringvm ended: {}",
                self.stderr()
            );
            assert!(start.elapsed() < DEADLINE, "no {text:?}: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(mut self) -> (Option<i32>, String, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > DEADLINE {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("ringvm still running: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = self.stderr();
        let stdout = self.stdout.join().unwrap();
        (status.code(), stdout, stderr)
    }
}

/// Waits until the guest's sequential write reached sector `sector`.
fn wait_for_sector(disk: &Path, seed: u64, sector: u64, vm: &mut Vm) {
    let f = File::open(disk).unwrap();
    let start = Instant::now();
    while !sector_has_pattern(&f, seed, sector) {
        assert!(
            vm.child.try_wait().unwrap().is_none(),
            "ringvm ended: {}",
            vm.stderr()
        );
        assert!(start.elapsed() < DEADLINE, "the workload did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
}

const KILL_LEN: u64 = 16 << 20;

fn kill_cmdline(seed: u64, qd: u32, queues: u16) -> String {
    // No guest watchdog: it waits for its completions however long the
    // backend is away.
    format!("blk.mode=write blk.bs=4096 blk.qd={qd} blk.queues={queues} blk.len=16M blk.seed={seed} blk.timeout=0 blk.flush=1")
}

#[test]
fn backend_killed_mid_workload_vm_survives_and_stops_on_sigterm() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("vhu-kill");
    let disk = dir.path().join("d.img");
    File::create(&disk).unwrap().set_len(KILL_LEN).unwrap();
    let socket = dir.path().join("blk.sock");
    let b = Backend::RingvmBlk.spawn(&socket, &disk, 1, false);
    let spec = vhost_disk(&socket, "");
    let cmdline = kill_cmdline(5, 4, 1);
    let mut vm = Vm::start(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "128M",
            "--disk",
            &spec,
            "--cmdline",
            &cmdline,
        ],
        dir.path().join("vm.err"),
    );
    wait_for_sector(&disk, 5, 2048, &mut vm);
    kill(b);
    vm.wait_stderr("went away");
    // Still running, with its vCPU and control thread alive.
    std::thread::sleep(Duration::from_millis(500));
    assert!(vm.child.try_wait().unwrap().is_none(), "{}", vm.stderr());
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let (code, stdout, stderr) = vm.finish();
    assert_eq!(code, Some(EXIT_SIGNALLED), "{stdout}\n{stderr}");
    assert_eq!(
        stderr.matches("went away").count(),
        1,
        "logged once: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !stdout.contains("RINGVM-RESULT"),
        "the workload cannot finish: {stdout}"
    );
}

/// Kills `backend` mid-workload under a `reconnect=on` disk, restarts it,
/// and checks the workload finishes and the file holds the pattern.
fn reconnect(backend: Backend, qd: u32, queues: u16) {
    let dir = TempDir::new(&format!("vhu-reconnect-{backend:?}"));
    let disk = dir.path().join("d.img");
    File::create(&disk).unwrap().set_len(KILL_LEN).unwrap();
    let socket = dir.path().join("blk.sock");
    let seed = 21;
    let b = backend.spawn(&socket, &disk, queues, false);
    let spec = vhost_disk(&socket, &format!(",queues={queues},reconnect=on"));
    let cmdline = kill_cmdline(seed, qd, queues);
    let mut vm = Vm::start(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "128M",
            "--disk",
            &spec,
            "--cmdline",
            &cmdline,
        ],
        dir.path().join("vm.err"),
    );
    wait_for_sector(&disk, seed, 2048, &mut vm);
    kill(b);
    vm.wait_stderr("went away");
    let last = File::open(&disk).unwrap();
    assert!(
        !sector_has_pattern(&last, seed, KILL_LEN / 512 - 1),
        "the workload ended before the backend was killed"
    );
    let b = backend.spawn(&socket, &disk, queues, false);
    vm.wait_stderr("is back");
    let (code, stdout, stderr) = vm.finish();
    terminate(b);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let f = result_fields(&stdout).unwrap();
    assert_eq!(
        (f["errors"].as_str(), f["ops"].as_str()),
        ("0", "4096"),
        "{f:?}"
    );
    assert_eq!(bad_sectors(&disk, seed, KILL_LEN), 0, "{stderr}");
}

/// Neither ringvm-blk (vhost-user-backend does not implement inflight
/// tracking) nor qemu-storage-daemon 7.2 (its export offers CONFIG but not
/// INFLIGHT_SHMFD) keeps an inflight region, so the vrings restart at the
/// guest's used index: exact when the backend completes in order, hence
/// one request in flight. The inflight path is checked against the
/// scripted backend below.
#[test]
fn reconnect_to_a_restarted_ringvm_blk_finishes_the_workload() {
    if kvm_available() {
        reconnect(Backend::RingvmBlk, 1, 1);
    }
}

#[test]
fn reconnect_to_a_restarted_qemu_storage_daemon_finishes_the_workload() {
    if kvm_available() && Backend::Qsd.available() {
        reconnect(Backend::Qsd, 1, 2);
    }
}
