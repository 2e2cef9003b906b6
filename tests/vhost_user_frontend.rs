//! ringvm as a vhost-user front-end for disks: the built-in guest's
//! virtio-blk driver against devices whose queues real backend processes
//! serve: `ringvm-blk` and `qemu-storage-daemon --export
//! type=vhost-user-blk` (an independent backend). The scripted backend of
//! tests/devices lies in the handshake and records the message order. The
//! NIC tests (DPDK's testpmd) are in tests/vhost_user_net.rs. Deadlines are generous: the guest runs under an
//! instruction emulator; nothing asserts on time.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::background::Vm;
use common::{crc32, kvm_available, result_fields, ringvm_bin, run_ringvm, Outcome, TempDir};
use ringvm_test_devices::vhost_user_script::{
    blk_config as script_config, Lie, Received, Script, ScriptedBackend, *,
};

const DEADLINE: Duration = Duration::from_secs(300);
/// ringvm's exit code when stopped by SIGINT, SIGTERM or SIGHUP.
const EXIT_SIGNALLED: i32 = 106;
const QSD: &str = "/usr/bin/qemu-storage-daemon";
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
                    "path={},queues={queues},serial=vhu-serial{}",
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

    // GET_ID is the backend's (ringvm-blk was given serial=vhu-serial).
    if let Backend::RingvmBlk = backend {
        let (out, _) = guest(&spec, "blk.id=1 blk.mode=read blk.count=1");
        assert!(out.stdout.contains("blk: id=vhu-serial"), "{out:#?}");
    }
    // The same backend serves another VM (a new front-end).
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
        dir.path(),
    );
    wait_for_sector(&disk, 5, 2048, &mut vm);
    kill(b);
    vm.wait_for("went away");
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
        dir.path(),
    );
    wait_for_sector(&disk, seed, 2048, &mut vm);
    kill(b);
    vm.wait_for("went away");
    let last = File::open(&disk).unwrap();
    assert!(
        !sector_has_pattern(&last, seed, KILL_LEN / 512 - 1),
        "the workload ended before the backend was killed"
    );
    let b = backend.spawn(&socket, &disk, queues, false);
    vm.wait_for("is back");
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

fn script(lie: Lie) -> Script {
    Script {
        features: F_VERSION_1 | F_PROTOCOL_FEATURES | (1 << 2) | (1 << 6) | (1 << 9) | (1 << 12),
        protocol: PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_INFLIGHT_SHMFD | PF_CONFIGURE_MEM_SLOTS,
        queue_num: 4,
        config: script_config(2048, 512, 4),
        lie,
    }
}

/// Backends that lie or fail during the handshake: one clear error line,
/// exit code 2, no panic, and the guest never runs.
#[test]
fn a_lying_backend_is_refused_at_start_with_exit_code_2() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("vhu-lies");
    let socket = dir.path().join("lie.sock");
    let no_v1 = Script {
        features: F_PROTOCOL_FEATURES | (1 << 6),
        ..script(Lie::None)
    };
    let bad_block = Script {
        config: script_config(2048, 1000, 4),
        ..script(Lie::None)
    };
    let no_config = Script {
        protocol: PF_MQ | PF_REPLY_ACK,
        ..script(Lie::None)
    };
    let one_queue = Script {
        queue_num: 1,
        ..script(Lie::None)
    };
    let cases: Vec<(&str, Option<Script>, &str, &str)> = vec![
        ("no backend", None, "", "connecting to"),
        (
            "no VERSION_1",
            Some(no_v1),
            "",
            "does not offer VIRTIO_F_VERSION_1",
        ),
        ("bad block size", Some(bad_block), "", "block size 1000"),
        ("no CONFIG", Some(no_config), "", "CONFIG protocol feature"),
        (
            "too few queues",
            Some(one_queue),
            ",queues=4",
            "offers 1 queues; 4 are configured",
        ),
        (
            "short config",
            Some(script(Lie::ShortConfig)),
            "",
            "GET_CONFIG",
        ),
        (
            "garbage",
            Some(script(Lie::Garbage(GET_FEATURES))),
            "",
            "GET_FEATURES",
        ),
        (
            "out of order",
            Some(script(Lie::WrongReply(GET_PROTOCOL_FEATURES))),
            "",
            "GET_PROTOCOL_FEATURES",
        ),
        (
            "silent",
            Some(script(Lie::Silent(GET_CONFIG))),
            "",
            "GET_CONFIG",
        ),
    ];
    for (what, script, extra, expect) in cases {
        let _ = std::fs::remove_file(&socket);
        let _backend = script.map(|s| ScriptedBackend::start(&socket, s));
        let out = run_ringvm(
            &[
                "run",
                "--kernel",
                "builtin",
                "--memory",
                "64M",
                "--disk",
                &vhost_disk(&socket, extra),
                "--cmdline",
                "blk.mode=read blk.count=1",
            ],
            DEADLINE,
        );
        assert_eq!(out.code, Some(2), "{what}: {out:#?}");
        let line = out.stderr.lines().find(|l| l.starts_with("ringvm: error:"));
        assert!(
            line.is_some_and(|l| l.contains(expect) && l.contains("vhost-user-blk0")),
            "{what}: expected {expect:?}: {out:#?}"
        );
        assert!(!out.stderr.contains("panicked"), "{what}: {out:#?}");
        assert!(
            !out.stdout.contains("hello"),
            "{what}: the guest ran: {out:#?}"
        );
    }
}

/// A backend that answers garbage once the guest starts the device: the
/// failure is logged and contained (the device asks for a reset; the
/// guest, seeing no completion, gives up), and ringvm ends normally with
/// the guest's status.
#[test]
fn garbage_from_the_backend_at_activation_is_a_logged_contained_failure() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("vhu-late-lie");
    let socket = dir.path().join("late.sock");
    let _backend = ScriptedBackend::start(&socket, script(Lie::Garbage(SET_VRING_KICK)));
    let out = run_ringvm(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "64M",
            "--disk",
            &vhost_disk(&socket, ""),
            "--cmdline",
            "blk.mode=read blk.count=1 blk.timeout=2",
        ],
        DEADLINE,
    );
    assert!(out.stdout.contains("hello"), "the guest ran: {out:#?}");
    assert!(
        out.stderr.contains("starting the queues: SET_VRING_KICK"),
        "{out:#?}"
    );
    assert!(
        out.stop_line().contains("guest exited with status"),
        "{out:#?}"
    );
    assert!(!out.stderr.contains("panicked"), "{out:#?}");
}

/// The order of a vring's setup, the inflight region, and its replay:
/// the scripted backend hangs up once the guest's queue is running, the
/// watcher reconnects, and the second connection gets the memory table,
/// the same inflight region (not a new one) and the vring again.
#[test]
fn vring_setup_order_and_inflight_region_replayed_on_reconnect() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("vhu-order");
    let socket = dir.path().join("order.sock");
    let backend = ScriptedBackend::start(&socket, script(Lie::HangupAfter(SET_VRING_ENABLE)));
    // The scripted backend serves no request: the guest's watchdog ends
    // the run.
    let out = run_ringvm(
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "64M",
            "--disk",
            &vhost_disk(&socket, ",reconnect=on"),
            "--cmdline",
            "blk.mode=read blk.count=1 blk.timeout=3",
        ],
        DEADLINE,
    );
    assert!(
        out.stderr.contains("went away") && out.stderr.contains("is back"),
        "{out:#?}"
    );
    assert!(!out.stderr.contains("panicked"), "{out:#?}");
    let got = backend.received();
    let codes = |conn: usize| -> Vec<u32> {
        got.iter()
            .filter(|m| m.conn == conn)
            .map(|m| m.code)
            .collect()
    };
    let handshake = [
        SET_OWNER,
        GET_FEATURES,
        GET_PROTOCOL_FEATURES,
        SET_PROTOCOL_FEATURES,
        GET_QUEUE_NUM,
    ];
    let vring = [
        SET_VRING_NUM,
        SET_VRING_BASE,
        SET_VRING_ADDR,
        SET_VRING_CALL,
        SET_VRING_KICK,
        SET_VRING_ENABLE,
    ];
    let first: Vec<u32> = handshake
        .iter()
        .chain(&[GET_CONFIG, GET_MAX_MEM_SLOTS, ADD_MEM_REG])
        .chain(&[SET_FEATURES, GET_INFLIGHT_FD, SET_INFLIGHT_FD])
        .chain(&vring)
        .copied()
        .collect();
    assert_eq!(codes(0), first, "{got:#?}");
    let second: Vec<u32> = handshake
        .iter()
        .chain(&[GET_MAX_MEM_SLOTS, ADD_MEM_REG])
        .chain(&[SET_FEATURES, SET_INFLIGHT_FD])
        .chain(&vring)
        .copied()
        .collect();
    assert_eq!(&codes(1)[..second.len()], &second[..], "{got:#?}");
    // Both SET_INFLIGHT_FDs carry the region the first backend made.
    let inflight: Vec<&Received> = got.iter().filter(|m| m.code == SET_INFLIGHT_FD).collect();
    assert_eq!(inflight.len(), 2);
    for m in inflight {
        assert_eq!(m.files, vec![backend.inflight], "{m:?}");
    }
    // Guest RAM went over as a file both times.
    for m in got.iter().filter(|m| m.code == ADD_MEM_REG) {
        assert_eq!(m.files.len(), 1, "{m:?}");
    }
}

/// ringvm-blk on a disk that fails mid-run (the test-build injector,
/// `RINGVM_TEST_BLOCK_EIO`): those requests reach the guest as
/// VIRTIO_BLK_S_IOERR through the vhost-user back-end, the rest complete,
/// and the daemon keeps serving.
#[test]
fn ringvm_blk_on_a_failing_disk_fails_those_requests_and_keeps_serving() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("vhu-eio");
    let disk = dir.path().join("eio.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let socket = dir.path().join("eio.sock");
    let mut b = Command::new(ringvm_blk_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .env("RINGVM_TEST_BLOCK_EIO", "after=40,count=25")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting ringvm-blk");
    let start = Instant::now();
    while !socket.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (out, f) = guest(
        &vhost_disk(&socket, ""),
        "blk.mode=randwrite blk.count=200 blk.qd=4",
    );
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_eq!(
        (f["ops"].as_str(), f["errors"].as_str()),
        ("200", "25"),
        "{f:?}"
    );
    assert!(b.try_wait().unwrap().is_none(), "ringvm-blk ended");
    terminate(b);
}
