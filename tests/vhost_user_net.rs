//! ringvm as a vhost-user front-end for NICs: the built-in guest's
//! virtio-net driver and IPv4 peer against DPDK's `dpdk-testpmd` (package
//! dpdk-dev), run without hugepages, with a `net_vhost` port forwarding
//! to a `net_tap` port in a network namespace of the test's own.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::background::Vm;
use common::{kvm_available, result_fields, ringvm_bin, TempDir};

const TESTPMD: &str = "/usr/bin/dpdk-testpmd";

/// testpmd busy-polls two lcores: one at a time, whatever the test
/// harness runs in parallel.
static ONE_TESTPMD: std::sync::Mutex<()> = std::sync::Mutex::new(());

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

/// A network namespace for one test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Option<Netns> {
        let name = format!("rvvhu-{tag}-{}", std::process::id());
        let made = Command::new("ip").args(["netns", "add", &name]).output();
        if !made.as_ref().is_ok_and(|o| o.status.success()) {
            assert!(
                !ci(),
                "cannot create a network namespace and CI=true: {made:?}"
            );
            eprintln!("skipping: cannot create a network namespace: {made:?}");
            return None;
        }
        let ns = Netns(name);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        Some(ns)
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }

    fn run(&self, argv: &[&str]) -> std::process::Output {
        let out = self
            .command(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{argv:?} in {}: {out:?}", self.0);
        out
    }

    /// Runs `f` on a thread that joined this namespace.
    fn thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap();
            // SAFETY: setns(2) on a valid namespace fd moves only the
            // calling thread, which makes its sockets afterwards.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// `dpdk-testpmd` without hugepages: port 0 a vhost-user server on
/// `socket`, port 1 a TAP `tap` in `ns`, frames forwarded between them
/// unchanged (io mode). Its stdin is held open: it runs until dropped.
struct Testpmd {
    child: Child,
    /// DPDK's runtime directory of this instance (--file-prefix).
    runtime: std::path::PathBuf,
}

impl Testpmd {
    fn start(ns: &Netns, socket: &Path, tap: &str, queues: u16, log: &Path) -> Testpmd {
        let child = ns
            .command(TESTPMD)
            .args(["--no-huge", "-m", "512", "--no-pci", "-l", "0-1"])
            // One DPDK runtime directory per test.
            .arg(format!("--file-prefix={}", ns.0))
            .arg(format!(
                "--vdev=net_vhost0,iface={},client=0,queues={queues}",
                socket.display()
            ))
            .arg(format!("--vdev=net_tap0,iface={tap}"))
            .args(["--", "--forward-mode=io", "--auto-start", "--nb-cores=1"])
            .arg(format!("--rxq={queues}"))
            .arg(format!("--txq={queues}"))
            .arg("--total-num-mbufs=8192")
            .stdin(Stdio::piped())
            .stdout(File::create(log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dpdk-testpmd");
        let tp = Testpmd {
            child,
            runtime: Path::new("/var/run/dpdk").join(&ns.0),
        };
        let start = Instant::now();
        let up = || {
            socket.exists()
                && ns
                    .command("ip")
                    .args(["link", "show", "dev", tap])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        };
        while !up() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "testpmd did not come up: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        tp
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        // DPDK leaves it behind.
        let _ = std::fs::remove_dir_all(&self.runtime);
    }
}

/// Sends `count` numbered datagrams to the guest's echo port, at most
/// `window` unanswered; returns how many distinct ones came back. Runs
/// inside the namespace.
fn udp_echoes(count: u64, window: u64) -> u64 {
    let s = std::net::UdpSocket::bind(("10.0.0.1", 0)).unwrap();
    s.connect(("10.0.0.2", 7)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut seen = vec![false; count as usize];
    let (mut sent, mut got) = (0u64, 0u64);
    let mut buf = [0u8; 2048];
    while got < count {
        while sent < count && sent - got < window {
            let mut payload = [0x5au8; 64];
            payload[..8].copy_from_slice(&sent.to_le_bytes());
            s.send(&payload).unwrap();
            sent += 1;
        }
        match s.recv(&mut buf) {
            Ok(64) => {
                let seq = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
                if seq < seen.len() && !seen[seq] {
                    seen[seq] = true;
                    got += 1;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    got
}

/// Ping and UDP echoes through testpmd with `pairs` queue pairs (more
/// than one: the guest switches them on through ringvm's control queue).
fn through_testpmd(pairs: u16) {
    if !kvm_available() || !have(TESTPMD, "dpdk-dev") || !have("/usr/bin/ping", "iputils-ping") {
        return;
    }
    let Some(ns) = Netns::new(&format!("tpmd{pairs}")) else {
        return;
    };
    let dir = TempDir::new(&format!("vhu-testpmd-{pairs}"));
    let socket = dir.path().join("net.sock");
    let tap = "rvdtap0";
    let _one = ONE_TESTPMD.lock().unwrap_or_else(|e| e.into_inner());
    let tp = Testpmd::start(&ns, &socket, tap, pairs, &dir.path().join("testpmd.log"));
    ns.run(&["ip", "addr", "add", "10.0.0.1/24", "dev", tap]);
    ns.run(&["ip", "link", "set", tap, "up"]);
    let count = 200;
    let net = format!(
        "vhost_user=on,socket={},mac=52:54:00:12:34:58,queues={pairs}",
        socket.display()
    );
    let cmdline =
        format!("net.ip=10.0.0.2/24 net.mode=respond net.count={count} net.queues={pairs}");
    let mut vm = Vm::spawn(
        ns.command(ringvm_bin()).args([
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "128M",
            "--net",
            &net,
            "--cmdline",
            &cmdline,
        ]),
        dir.path(),
    );
    vm.wait_for(" link=");
    let up = vm.stdout();
    assert!(up.contains("mac=52:54:00:12:34:58"), "{up}");
    assert!(up.contains(&format!("queues={pairs}")), "{up}");
    let ping = ns
        .command("ping")
        .args(["-c", "3", "-i", "0.5", "-W", "30", "10.0.0.2"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success() && text.contains(" 3 received"),
        "{ping:?}"
    );
    let got = ns.thread(move || udp_echoes(count, 16)).join().unwrap();
    let (code, stdout, stderr) = vm.finish();
    drop(tp);
    assert_eq!(got, count, "{stdout}\n{stderr}");
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let f = result_fields(&stdout).unwrap();
    assert_eq!(
        (f["udp"].as_str(), f["bad"].as_str()),
        (count.to_string().as_str(), "0"),
        "{f:?}"
    );
    assert!(!stderr.contains("control command refused"), "{stderr}");
}

#[test]
fn ping_and_udp_echo_through_dpdk_testpmd_vhost_user() {
    through_testpmd(1);
}

#[test]
fn two_queue_pairs_through_dpdk_testpmd_with_the_control_queue_in_ringvm() {
    through_testpmd(2);
}

/// testpmd killed under a `reconnect=on` NIC and started again: the
/// guest answers pings and UDP echoes through the new one.
#[test]
fn nic_reconnects_to_a_restarted_testpmd() {
    if !kvm_available() || !have(TESTPMD, "dpdk-dev") || !have("/usr/bin/ping", "iputils-ping") {
        return;
    }
    let Some(ns) = Netns::new("tpmdre") else {
        return;
    };
    let dir = TempDir::new("vhu-testpmd-re");
    let socket = dir.path().join("net.sock");
    let tap = "rvdtap0";
    let log = dir.path().join("testpmd.log");
    let up_tap = || {
        ns.run(&["ip", "addr", "add", "10.0.0.1/24", "dev", tap]);
        ns.run(&["ip", "link", "set", tap, "up"]);
    };
    let ping = || {
        let out = ns
            .command("ping")
            .args(["-c", "3", "-i", "0.5", "-W", "30", "10.0.0.2"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains(" 3 received"),
            "{out:?}"
        );
    };
    let _one = ONE_TESTPMD.lock().unwrap_or_else(|e| e.into_inner());
    let tp = Testpmd::start(&ns, &socket, tap, 1, &log);
    up_tap();
    let count = 100;
    let net = format!("vhost_user=on,socket={},reconnect=on", socket.display());
    let cmdline = format!("net.ip=10.0.0.2/24 net.mode=respond net.count={count}");
    let mut vm = Vm::spawn(
        ns.command(ringvm_bin()).args([
            "run",
            "--kernel",
            "builtin",
            "--memory",
            "128M",
            "--net",
            &net,
            "--cmdline",
            &cmdline,
        ]),
        dir.path(),
    );
    vm.wait_for(" link=");
    ping();
    drop(tp);
    vm.wait_for("went away");
    let _ = std::fs::remove_file(&socket);
    let tp = Testpmd::start(&ns, &socket, tap, 1, &log);
    up_tap();
    vm.wait_for("is back");
    ping();
    let got = ns.thread(move || udp_echoes(count, 16)).join().unwrap();
    let (code, stdout, stderr) = vm.finish();
    drop(tp);
    assert_eq!((got, code), (count, Some(0)), "{stdout}\n{stderr}");
    assert_eq!(stderr.matches("went away").count(), 1, "{stderr}");
}
