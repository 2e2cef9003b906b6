//! Seccomp through the real binary: every thread of a running VM with a
//! disk, a NIC and a vfio-user device is filtered, a forbidden system call
//! is reported with its thread and number (exit code 109), and
//! `--seccomp false` installs nothing.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, ringvm_bin, run_ringvm, TempDir};
use ringvm_test_devices::vfio_user_dev::{self, Behaviour};

const DEADLINE: Duration = Duration::from_secs(120);

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// `(thread name, Seccomp mode, filters)` of every thread of `pid`.
fn thread_seccomp(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.filter_map(Result::ok) {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            field("Name:"),
            field("Seccomp:").parse().unwrap_or(99),
            field("Seccomp_filters:").parse().unwrap_or(0),
        ));
    }
    out
}

/// A network namespace for the NIC's TAP, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Option<Netns> {
        // Tests of this binary run in parallel: one name each.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("rvsec-{}-{n}", std::process::id());
        let made = Command::new("ip").args(["netns", "add", &name]).output();
        match made {
            Ok(o) if o.status.success() => Some(Netns(name)),
            other => {
                assert!(
                    !ci(),
                    "cannot create a network namespace under CI: {other:?}"
                );
                eprintln!("skipping: cannot create a network namespace: {other:?}");
                None
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn ringvm_in(ns: &Netns, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.0])
        .arg(ringvm_bin())
        .args(args);
    c
}

/// Waits until `pid` has `want` threads (the VM is up), or the deadline.
fn wait_threads(pid: u32, want: usize) -> Vec<(String, u32, u32)> {
    let start = Instant::now();
    loop {
        let t = thread_seccomp(pid);
        if t.len() >= want || start.elapsed() > Duration::from_secs(60) {
            return t;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_thread_of_a_vm_with_disk_net_and_vfio_user_device_is_filtered() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = Netns::new() else {
        return;
    };
    let dir = TempDir::new("seccomp-all");
    let disk = dir.file("d0.img", &vec![0u8; 4 << 20]);
    let socket = dir.path().join("dev.sock");
    let _dev = vfio_user_dev::spawn(&socket, Behaviour::Good).expect("test device");
    let disk_arg = format!("path={}", disk.display());
    let dev_arg = format!("socket={}", socket.display());
    for (mode, want_mode) in [("true", 2), ("log", 2), ("false", 0)] {
        let mut child = ringvm_in(
            &ns,
            &[
                "run",
                "--kernel",
                "builtin",
                "--memory",
                "128M",
                "--cpus",
                "2",
                "--iothreads",
                "2",
                "--seccomp",
                mode,
                "--disk",
                &disk_arg,
                "--net",
                "ip=10.9.0.1,mask=255.255.255.0",
                "--user-device",
                &dev_arg,
                "--cmdline",
                "blk.mode=randwrite blk.secs=4 blk.qd=4",
            ],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ringvm");
        // main + 2 vCPUs + 2 iothreads.
        let threads = wait_threads(child.id(), 5);
        let mut stdout = String::new();
        let mut stderr = String::new();
        let status = child.wait().expect("waiting for ringvm");
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "--seccomp {mode}: {stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("errors=0"),
            "--seccomp {mode}: {stdout}\n{stderr}"
        );
        let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
        for want in ["vcpu0", "vcpu1", "iothread0", "iothread1"] {
            assert!(names.contains(&want), "{want} missing: {threads:?}");
        }
        for (name, seccomp, filters) in &threads {
            assert_eq!(*seccomp, want_mode, "--seccomp {mode}: {name}: {threads:?}");
            if want_mode == 2 {
                assert!(*filters >= 1, "{name}: {threads:?}");
            }
        }
    }
}

#[test]
fn a_forbidden_call_names_the_thread_and_the_call() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("seccomp-trap");
    let disk = dir.file("d0.img", &vec![0u8; 1 << 20]);
    let disk_arg = format!("path={}", disk.display());
    // socket(2) is on no list.
    for (kind, thread) in [
        ("vcpu", "vcpu0"),
        ("iothread", "iothread0"),
        ("vmm", "main"),
    ] {
        let mut cmd = Command::new(ringvm_bin());
        cmd.args([
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "64M",
            "--disk",
            &disk_arg,
            "--cmdline",
            "blk.mode=read blk.secs=2",
        ])
        .env(
            "RINGVM_TEST_SECCOMP_CALL",
            format!("{kind}:{}", libc::SYS_socket),
        );
        let out = common::run_command(&mut cmd, DEADLINE);
        assert_eq!(out.code, Some(109), "{kind}: {out:#?}");
        assert!(
            out.stderr.contains(&format!(
                "ringvm: seccomp: thread {thread} made system call {} (socket)",
                libc::SYS_socket
            )),
            "{kind}: {out:#?}"
        );
    }
    // The same call with seccomp off is just a call.
    let out = {
        let mut cmd = Command::new(ringvm_bin());
        cmd.args([
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "64M",
            "--seccomp",
            "false",
            "--cmdline",
            "exit=4",
        ])
        .env(
            "RINGVM_TEST_SECCOMP_CALL",
            format!("vcpu:{}", libc::SYS_socket),
        );
        common::run_command(&mut cmd, DEADLINE)
    };
    assert_eq!(out.code, Some(4), "{out:#?}");
    let out = run_ringvm(
        &["run", "--kernel", "builtin", "--seccomp", "maybe"],
        DEADLINE,
    );
    assert_eq!(out.code, Some(2), "{out:#?}");
}

fn api_request(sock: &std::path::Path, method: &str, endpoint: &str, body: &str) -> (u16, String) {
    common::http::request(sock, method, endpoint, body.as_bytes())
}

/// Waits for ringvm's API socket; fails at once, with ringvm's stderr, if
/// ringvm ends first (a forbidden system call, say).
fn wait_for_socket(path: &std::path::Path, child: &mut std::process::Child) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        if let Some(status) = child.try_wait().expect("polling ringvm") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("ringvm ended ({status}) before its API socket {path:?} came up:\n{err}");
        }
        assert!(start.elapsed() < DEADLINE, "no API socket at {path:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The threads of `pid` while an idle client holds an API connection open
/// (so that a connection thread exists), once there are `want` of them.
fn threads_with_a_connection(
    pid: u32,
    sock: &std::path::Path,
    want: usize,
) -> Vec<(String, u32, u32)> {
    let _idle = std::os::unix::net::UnixStream::connect(sock).expect("connecting to the API");
    // A new thread names itself once it runs: until then it shows its
    // parent's name (a second "api" or "vm-build"); every name here is
    // distinct once all have run.
    let start = Instant::now();
    loop {
        let threads = wait_threads(pid, want);
        let mut names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        let all_named = names.len() == before && names.contains(&"api-conn");
        if all_named || start.elapsed() > DEADLINE {
            return threads;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn assert_all_filtered(threads: &[(String, u32, u32)], names: &[&str], what: &str) {
    let have: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
    for want in names {
        assert!(have.contains(want), "{what}: {want} missing: {threads:?}");
    }
    for (name, seccomp, filters) in threads {
        assert_eq!(*seccomp, 2, "{what}: {name}: {threads:?}");
        assert!(*filters >= 1, "{what}: {name}: {threads:?}");
    }
}

#[test]
fn every_thread_under_the_api_is_filtered_including_the_api_threads() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = Netns::new() else {
        return;
    };
    let dir = TempDir::new("seccomp-api");
    let disk = dir.file("d0.img", &vec![0u8; 4 << 20]);
    let disk_arg = format!("path={}", disk.display());
    let names = ["vcpu0", "iothread0", "api", "api-conn", "vm-build"];

    // ringvm run --api-socket: the VM is built on the worker thread.
    let sock = dir.path().join("run.sock");
    let sock_arg = sock.display().to_string();
    let child = ringvm_in(
        &ns,
        &[
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "64M",
            "--api-socket",
            &sock_arg,
            "--disk",
            &disk_arg,
            "--net",
            "ip=10.9.1.1,mask=255.255.255.0",
            "--cmdline",
            "blk.mode=randwrite blk.secs=4 blk.qd=4",
        ],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("starting ringvm");
    let mut child = child;
    wait_for_socket(&sock, &mut child);
    assert_eq!(api_request(&sock, "GET", "vm.info", "").0, 200);
    // main, vm-build, api, api-conn, vCPU, iothread.
    let threads = threads_with_a_connection(child.id(), &sock, 6);
    let out = child.wait_with_output().expect("waiting for ringvm");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("errors=0"), "{stdout}\n{stderr}");
    assert_all_filtered(&threads, &names, "run --api-socket");

    // ringvm serve: the VM made by vm.create and vm.boot.
    let sock = dir.path().join("serve.sock");
    let sock_arg = sock.display().to_string();
    let child = ringvm_in(&ns, &["serve", "--api-socket", &sock_arg])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ringvm serve");
    let mut child = child;
    wait_for_socket(&sock, &mut child);
    let config = format!(
        r#"{{"payload":{{"kernel":"builtin","cmdline":"blk.mode=randwrite blk.secs=4 blk.qd=4"}},"memory":{{"size":67108864}},"disks":[{{"path":"{}"}}],"net":[{{"ip":"10.9.2.1","mask":"255.255.255.0"}}]}}"#,
        disk.display()
    );
    assert_eq!(api_request(&sock, "PUT", "vm.create", &config).0, 204);
    assert_eq!(api_request(&sock, "PUT", "vm.boot", "").0, 204);
    let threads = threads_with_a_connection(child.id(), &sock, 6);
    let (status, counters) = api_request(&sock, "GET", "vm.counters", "");
    assert_eq!(status, 200, "{counters}");
    assert_eq!(api_request(&sock, "PUT", "vmm.shutdown", "").0, 204);
    let out = child.wait_with_output().expect("waiting for ringvm serve");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_all_filtered(&threads, &names, "serve");
}

#[test]
fn a_forbidden_call_on_the_api_or_vm_building_thread_is_reported() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("seccomp-api-trap");
    let sock = dir.path().join("api.sock");
    let sock_arg = sock.display().to_string();
    // socket(0, 0, 0): on neither list (the VM-building thread's socket
    // rule takes AF_UNIX and AF_INET only).
    for (kind, thread) in [("api", "api"), ("vm-build", "vm-build")] {
        let mut cmd = Command::new(ringvm_bin());
        cmd.args(["serve", "--api-socket", &sock_arg]).env(
            "RINGVM_TEST_SECCOMP_CALL",
            format!("{kind}:{}", libc::SYS_socket),
        );
        let out = common::run_command(&mut cmd, DEADLINE);
        assert_eq!(out.code, Some(109), "{kind}: {out:#?}");
        assert!(
            out.stderr.contains(&format!(
                "ringvm: seccomp: thread {thread} made system call {} (socket)",
                libc::SYS_socket
            )),
            "{kind}: {out:#?}"
        );
    }
}
