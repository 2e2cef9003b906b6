//! `ringvm-blk` against QEMU's vhost-user-blk-pci, with ringvm's built-in
//! guest as the virtio-blk driver (TCG, so no KVM is needed). QEMU's exit
//! code is (status << 1) | 1: 1 means the guest's status 0.

use ringvm_test_devices::kvm_available;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(120);

fn daemon_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ringvm-blk"))
}

/// The `ringvm` binary: next to ours when the workspace was built (as
/// `cargo test --workspace` does), else built now.
fn ringvm_bin() -> PathBuf {
    let next = daemon_bin().with_file_name("ringvm");
    if !next.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "ringvm", "--bin", "ringvm"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build -p ringvm");
        assert!(st.success(), "building ringvm failed");
    }
    assert!(next.exists(), "no ringvm binary at {}", next.display());
    next
}

fn qemu() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin/qemu-system-x86_64");
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "qemu-system-x86_64 missing and CI=true (.ci/run installs qemu-system-x86)"
    );
    eprintln!("skipping: qemu-system-x86_64 is not installed");
    None
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("vhu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn disk(&self, name: &str, size: u64) -> PathBuf {
        let p = self.0.join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    fn guest(&self) -> PathBuf {
        let p = self.0.join("guest.elf");
        let st = Command::new(ringvm_bin())
            .args(["builtin-guest", "--output"])
            .arg(&p)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Output of a finished process.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn wait_deadline(mut child: Child, what: &str) -> Outcome {
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} still running after {DEADLINE:?}\n{}\n{}",
                t_out.join().unwrap(),
                t_err.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Outcome {
        code: status.code(),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

fn run(cmd: &mut Command, what: &str) -> Outcome {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    wait_deadline(child, what)
}

/// A running `ringvm-blk`; killed if the test ends without stopping it.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
}

impl Daemon {
    fn start(dir: &TempDir, name: &str, disk: &str) -> Daemon {
        Self::start_with(dir, name, disk, &[])
    }

    fn start_with(dir: &TempDir, name: &str, disk: &str, extra: &[&str]) -> Daemon {
        let socket = dir.0.join(format!("{name}.sock"));
        let child = Command::new(daemon_bin())
            .arg("--socket")
            .arg(&socket)
            .args(["--disk", disk, "--iothread-stats"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            child: Some(child),
            socket,
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits for the daemon to end.
    fn terminate(mut self) -> Outcome {
        let child = self.child.take().unwrap();
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) on the pid of a child we started and have not
        // reaped, so the pid cannot have been reused.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        wait_deadline(child, "ringvm-blk")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn result_fields(stdout: &str) -> Option<BTreeMap<String, String>> {
    let line = stdout.lines().find(|l| l.starts_with("RINGVM-RESULT"))?;
    Some(
        line.split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Boots the guest under QEMU with a vhost-user-blk device on `socket`.
fn qemu_guest(
    qemu: &Path,
    guest: &Path,
    socket: &Path,
    queues: u16,
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
    ])
    .args(["-nographic", "-serial", "stdio", "-m", "128M"])
    .args(["-object", "memory-backend-memfd,id=mem,size=128M,share=on"])
    .args(["-numa", "node,memdev=mem", "-chardev"])
    .arg(format!("socket,id=c0,path={}", socket.display()))
    .arg("-device")
    .arg(format!("vhost-user-blk-pci,chardev=c0,num-queues={queues}"))
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .arg("-kernel")
    .arg(guest)
    .args(["-append", cmdline]);
    let out = run(&mut cmd, "qemu");
    let f = result_fields(&out.stdout)
        .unwrap_or_else(|| panic!("no RINGVM-RESULT from QEMU: {out:#?}"));
    (out.code.unwrap_or(-1), f)
}

fn write_verify_terminate(queues: u16) {
    let Some(qemu) = qemu() else { return };
    let dir = TempDir::new(&format!("q{queues}"));
    let guest = dir.guest();
    let disk = dir.disk("d.img", 4 << 20);
    let spec = format!("path={},queues={queues}", disk.display());
    let d = Daemon::start(&dir, "blk", &spec);
    let q = format!("blk.queues={queues} blk.qd=8 blk.len=1M blk.seed=5");
    let (code, f) = qemu_guest(
        &qemu,
        &guest,
        &d.socket,
        queues,
        &format!("blk.mode=write blk.flush=1 {q}"),
    );
    assert_eq!((code, f["errors"].as_str()), (1, "0"), "{f:?}");
    assert_eq!(f["queues"], queues.to_string());
    // A second front-end on the same daemon: reconnect.
    let (code, f) = qemu_guest(
        &qemu,
        &guest,
        &d.socket,
        queues,
        &format!("blk.mode=verify {q}"),
    );
    assert_eq!((code, f["errors"].as_str()), (1, "0"), "{f:?}");
    let out = d.terminate();
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("ringvm-blk: stopped"), "{out:#?}");
    // `--iothread-stats`: one line per iothread, and the guests' requests
    // went through the ring (1 MiB written, then read back: well over 256
    // operations).
    let sqes: Vec<u64> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("ringvm-blk: iothread"))
        .map(|l| {
            let v = l.split("sqes=").nth(1).and_then(|r| r.split(' ').next());
            v.and_then(|v| v.parse().ok()).expect(l)
        })
        .collect();
    assert_eq!(sqes.len(), 1, "{out:#?}");
    assert!(sqes[0] > 256, "{out:#?}");
    // The file holds the data: ringvm's own virtio-blk reads it back.
    if kvm_available() {
        let out = run(
            Command::new(ringvm_bin())
                .args(["run", "--kernel", "builtin", "--serial", "stdio"])
                .arg("--disk")
                .arg(format!("path={}", disk.display()))
                .args([
                    "--cmdline",
                    "blk.mode=verify blk.qd=8 blk.len=1M blk.seed=5",
                ]),
            "ringvm",
        );
        let f = result_fields(&out.stdout).unwrap_or_default();
        assert_eq!(out.code, Some(0), "{out:#?}");
        assert_eq!(f.get("errors").map(String::as_str), Some("0"), "{out:#?}");
    }
}

#[test]
fn one_queue_write_then_verify_on_reconnect_and_sigterm() {
    write_verify_terminate(1);
}

#[test]
fn four_queues_write_then_verify_on_reconnect_and_sigterm() {
    write_verify_terminate(4);
}

#[test]
fn readonly_export_fails_writes_and_serves_reads() {
    let Some(qemu) = qemu() else { return };
    let dir = TempDir::new("ro");
    let guest = dir.guest();
    let disk = dir.disk("ro.img", 4 << 20);
    let d = Daemon::start(&dir, "ro", &format!("path={},readonly=on", disk.display()));
    let (code, f) = qemu_guest(
        &qemu,
        &guest,
        &d.socket,
        1,
        "blk.mode=write blk.qd=4 blk.len=64K blk.seed=3",
    );
    assert_eq!(code, 3, "{f:?}");
    assert_ne!(f["errors"], "0", "{f:?}");
    let (code, f) = qemu_guest(
        &qemu,
        &guest,
        &d.socket,
        1,
        "blk.mode=read blk.qd=4 blk.len=64K",
    );
    assert_eq!((code, f["errors"].as_str()), (1, "0"), "{f:?}");
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0));
    assert_eq!(d.terminate().code, Some(0));
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let dir = TempDir::new("bad");
    let socket = dir.0.join("bad.sock");
    for disk in [
        "path=x,queues=0".to_string(),
        "readonly=on".to_string(),
        format!("path={}", dir.0.join("missing.img").display()),
    ] {
        let out = run(
            Command::new(daemon_bin())
                .arg("--socket")
                .arg(&socket)
                .args(["--disk", &disk]),
            "ringvm-blk",
        );
        assert_eq!(out.code, Some(2), "{disk}: {out:#?}");
        assert_eq!(out.stderr.lines().count(), 1, "{disk}: {out:#?}");
        assert!(out.stderr.starts_with("ringvm-blk: "), "{out:#?}");
    }
    let out = run(
        Command::new(daemon_bin()).args(["--disk", "path=x"]),
        "ringvm-blk",
    );
    assert_eq!(
        (out.code, out.stderr.lines().count()),
        (Some(2), 1),
        "{out:#?}"
    );
    let disk = dir.disk("d.img", 1 << 20);
    for (pin, says) in [
        (
            "2@0",
            "iothread 2 is given an affinity, but there are 2 iothreads",
        ),
        ("0@0-", "expected INDEX@CPUS"),
    ] {
        let out = run(
            Command::new(daemon_bin())
                .arg("--socket")
                .arg(&socket)
                .args(["--disk", &format!("path={}", disk.display())])
                .args(["--iothreads", "2", "--iothread-affinity", pin]),
            "ringvm-blk",
        );
        assert_eq!(
            (out.code, out.stderr.lines().count()),
            (Some(2), 1),
            "{out:#?}"
        );
        assert!(out.stderr.contains(says), "{pin}: {out:#?}");
    }
}

/// `--iothread-affinity`: the iothread named runs only on the host CPU
/// given, the other keeps the process's CPUs.
#[test]
fn an_iothread_is_pinned_where_asked() {
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let all = own
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    // The last CPU of the list ("0-1", "0,2-3", "5").
    let cpu = all.rsplit([',', '-']).next().unwrap().to_string();
    let dir = TempDir::new("affinity");
    let disk = dir.disk("d.img", 1 << 20);
    let spec = format!("path={},queues=2", disk.display());
    let pin = format!("1@{cpu}");
    let daemon = Daemon::start_with(
        &dir,
        "pin",
        &spec,
        &["--iothreads", "2", "--iothread-affinity", &pin],
    );
    let pid = daemon.child.as_ref().unwrap().id();
    let placed = |name: &str| -> String {
        thread_field(pid, "Cpus_allowed_list:")
            .into_iter()
            .find_map(|(n, v)| (n == name).then_some(v))
            .unwrap_or_else(|| panic!("no thread {name}"))
    };
    assert_eq!(placed("iothread1"), cpu);
    assert_eq!(placed("iothread0"), all);
    let out = daemon.terminate();
    assert_eq!(out.code, Some(0), "{out:?}");
}

/// A vhost-user message header: request, flags (version 1), payload size.
fn header(request: u32, size: u32) -> Vec<u8> {
    [request, 1, size]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

#[test]
fn malformed_messages_end_the_connection_not_the_daemon() {
    let dir = TempDir::new("fuzz");
    let disk = dir.disk("m.img", 1 << 20);
    let mut d = Daemon::start(&dir, "m", &format!("path={}", disk.display()));
    let bad: [Vec<u8>; 5] = [
        b"not a vhost-user message at all".to_vec(),
        header(0xffff, 0),
        // SET_VRING_ADDR before any memory table, then an absurd size.
        [header(9, 40), vec![0u8; 40]].concat(),
        header(5, 0xffff_fff0),
        // SET_MEM_TABLE claiming regions but sending no fds.
        [header(5, 40), 1u32.to_le_bytes().to_vec(), vec![0xaa; 36]].concat(),
    ];
    for msg in bad {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&msg);
        let mut buf = [0u8; 64];
        // The daemon closes the connection (or answers with an error).
        let _ = s.read(&mut buf);
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
        assert!(d.alive(), "daemon died on {msg:?}");
    }
    // Still serving: GET_FEATURES (1) is answered with VERSION_1 set.
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&header(1, 0)).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    let features = u64::from_le_bytes(reply[12..20].try_into().unwrap());
    assert_ne!(features & (1 << 32), 0, "{features:#x}");
    drop(s);
    assert_eq!(d.terminate().code, Some(0));
}

/// A `/proc/PID/task/TID/status` field (`"Seccomp:"`) of every thread of
/// `pid`: (name, value).
fn thread_field(pid: u32, key: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field(key)));
    }
    out
}

/// `Seccomp:` of every thread of `pid` (name, mode).
fn thread_seccomp(pid: u32) -> Vec<(String, String)> {
    thread_field(pid, "Seccomp:")
}

/// Every thread of the daemon runs under a seccomp filter once it serves,
/// the front-end's session included (the tests above run with the default
/// `--seccomp true`); a forbidden call on the protocol thread is reported.
#[test]
fn every_daemon_thread_is_filtered_and_a_forbidden_call_is_named() {
    let dir = TempDir::new("seccomp");
    let disk = dir.disk("d.img", 1 << 20);
    let spec = format!("path={},queues=2", disk.display());
    let daemon = Daemon::start(&dir, "sc", &spec);
    let pid = daemon.child.as_ref().unwrap().id();
    // The signal thread sandboxes itself as it starts waiting.
    let start = Instant::now();
    let threads = loop {
        let t = thread_seccomp(pid);
        if t.iter().all(|(_, s)| s == "2") || start.elapsed() > Duration::from_secs(10) {
            break t;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(threads.len() >= 3, "{threads:?}");
    assert!(threads.iter().all(|(_, s)| s == "2"), "{threads:?}");
    assert!(threads.iter().any(|(n, _)| n == "iothread0"), "{threads:?}");
    assert!(threads.iter().any(|(n, _)| n == "signals"), "{threads:?}");
    let out = daemon.terminate();
    assert_eq!(out.code, Some(0), "{out:?}");

    let out = run(
        Command::new(daemon_bin())
            .arg("--socket")
            .arg(dir.0.join("sc2.sock"))
            .args(["--disk", &spec])
            .env(
                "RINGVM_TEST_SECCOMP_CALL",
                format!("vhost-user:{}", libc::SYS_socket),
            ),
        "ringvm-blk",
    );
    assert_eq!(out.code, Some(109), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "made system call {} (socket), which its allow-list forbids",
            libc::SYS_socket
        )),
        "{out:?}"
    );
}
