//! virtio-net end to end: the built-in guest's virtio-net driver and IPv4
//! peer (its third form, `net.*` options) against ringvm's device on a
//! TAP, and the same guest on QEMU's virtio-net-pci as an independent
//! check of the driver.
//!
//! Every test makes its own network namespace (deleted on drop, also when
//! the test fails) and keeps all traffic inside it: the VMM runs there
//! through `ip netns exec`, and host-side sockets are made on a thread that
//! joined the namespace with `setns(2)` (which moves that thread only).
//! The guest runs under an instruction emulator where KVM is software
//! (thousands of instructions per frame), so deadlines are generous and
//! nothing asserts on time.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{kvm_available, qemu, result_fields, run_ringvm, Outcome, TempDir};

/// The TAP's name inside each test's namespace.
const TAP: &str = "rvtap0";
const HOST_IP: &str = "10.0.0.1";
const GUEST_IP: &str = "10.0.0.2";
/// Until the guest prints `net: up`.
const UP_DEADLINE: Duration = Duration::from_secs(180);
/// Until a VMM that ends by itself has ended.
const RUN_DEADLINE: Duration = Duration::from_secs(900);
/// A host client gives up when no echo came back for this long.
const IDLE_LIMIT: Duration = Duration::from_secs(120);
/// ringvm's exit code when stopped by SIGINT, SIGTERM or SIGHUP.
const EXIT_SIGNALLED: i32 = 106;

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A network namespace of this test run, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    /// Makes a namespace with loopback up. Without the rights or tools for
    /// that the test fails under `CI=true` and is skipped otherwise.
    fn new(tag: &str) -> Option<Netns> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "rvnet-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let made = Command::new("ip").args(["netns", "add", &name]).output();
        match made {
            Ok(o) if o.status.success() => {}
            other => {
                assert!(
                    !ci(),
                    "cannot create a network namespace (root and iproute2 needed) and CI=true: {other:?}"
                );
                eprintln!("skipping: cannot create a network namespace: {other:?}");
                return None;
            }
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `program` run inside the namespace.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program args` inside the namespace; panics unless it succeeds.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed in {}: {out:?}",
            self.name
        );
        out
    }

    fn ip(&self, args: &[&str]) {
        self.run("ip", args);
    }

    /// Creates the TAP (multi-queue for more than one pair) with the host
    /// address 10.0.0.1/24, up.
    fn add_tap(&self, queues: u32) {
        let mut args = vec!["tuntap", "add", "dev", TAP, "mode", "tap"];
        if queues > 1 {
            args.push("multi_queue");
        }
        self.ip(&args);
        self.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
        self.ip(&["link", "set", TAP, "up"]);
    }

    /// Runs `f` on a new thread that has joined this namespace.
    fn thread<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns(2) on a valid namespace descriptor changes the
            // network namespace of the calling thread only; the thread
            // creates its sockets afterwards and touches no other state.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output();
    }
}

/// A program running in the background whose output is collected; killed
/// on drop if it still runs.
struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    start: Instant,
}

fn collect(
    from: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
    lines: Option<mpsc::Sender<String>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    into.lock().unwrap().push_str(&line);
                    if let Some(tx) = &lines {
                        let _ = tx.send(line.trim_end().to_string());
                    }
                }
            }
        }
    })
}

impl Background {
    fn spawn(cmd: &mut Command) -> Background {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning a background program");
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone(), Some(tx)),
            collect(child.stderr.take().unwrap(), stderr.clone(), None),
        ];
        Background {
            child,
            lines,
            stdout,
            stderr,
            readers,
            start: Instant::now(),
        }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits for a stdout line starting with `prefix` and returns it.
    fn wait_line(&mut self, prefix: &str, deadline: Duration) -> String {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(500)))
            {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    panic!("output ended before a line `{prefix}`:\n{}", self.output());
                }
                Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                    panic!("no line `{prefix}` within {deadline:?}:\n{}", self.output())
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Lines on stderr so far.
    fn stderr_lines(&self) -> usize {
        self.stderr.lock().unwrap().lines().count()
    }

    /// Waits until stderr has a line after the first `skip` for which
    /// `pred` holds.
    fn wait_stderr(&self, skip: usize, pred: impl Fn(&str) -> bool, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if self.stderr.lock().unwrap().lines().skip(skip).any(&pred) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Waits for the program to end (killing it, and failing, after
    /// `deadline`).
    fn finish(mut self, deadline: Duration) -> Outcome {
        let end = Instant::now() + deadline;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("waiting for a child") {
                break s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("still running after {deadline:?}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Outcome {
            code: status.code(),
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr.lock().unwrap().clone(),
            elapsed: self.start.elapsed(),
        }
    }

    /// Sends SIGTERM and waits for the program to end.
    fn terminate(self, deadline: Duration) -> Outcome {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: signals our own child, which has not been reaped yet (so
        // the pid cannot have been reused).
        let r = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
        self.finish(deadline)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// ringvm running the built-in guest with `cmdline` and `--net net`
/// inside `ns`.
fn ringvm(ns: &Netns, cmdline: &str, net: &str) -> Background {
    let mut c = ns.command(common::ringvm_bin());
    c.args([
        "run",
        "--kernel",
        "builtin",
        "--memory",
        "64M",
        "--cmdline",
        cmdline,
        "--net",
        net,
    ]);
    Background::spawn(&mut c)
}

/// QEMU running `guest` on a virtio-net-pci over the namespace's TAP.
fn qemu_net(ns: &Netns, qemu: &Path, guest: &Path, cmdline: &str, queues: u32) -> Background {
    let mut c = ns.command(qemu);
    c.args([
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
        "64M",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
    ])
    .arg(guest)
    .args(["-append", cmdline]);
    let (netdev, device) = if queues > 1 {
        (
            format!(",queues={queues}"),
            format!(",mq=on,vectors={}", 2 * queues + 2),
        )
    } else {
        (String::new(), String::new())
    };
    c.arg("-netdev").arg(format!(
        "tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off{netdev}"
    ));
    // No option ROM: SeaBIOS would run iPXE's driver on the device first.
    c.arg("-device")
        .arg(format!("virtio-net-pci,netdev=n0,romfile={device}"));
    Background::spawn(&mut c)
}

/// Pings the guest `n` times from the namespace; asserts every reply came.
fn ping(ns: &Netns, n: u32) {
    let out = ns
        .command("ping")
        .args(["-c", &n.to_string(), "-i", "0.5", "-W", "30", GUEST_IP])
        .stdin(Stdio::null())
        .output()
        .expect("running ping (iputils-ping)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!(" {n} received")),
        "ping: {out:?}"
    );
}

/// The system `ping`, required under CI.
fn have_ping() -> bool {
    let ok = Command::new("ping")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(!ci(), "ping missing and CI=true (install iputils-ping)");
        eprintln!("skipping: ping is not installed");
    }
    ok
}

/// What a UDP echo client saw.
#[derive(Debug, Default)]
struct EchoStats {
    sent: u64,
    received: u64,
    dup: u64,
    /// Echoes with a wrong length or a sequence number never sent.
    wrong: u64,
}

fn recv_ready(fds: &mut [libc::pollfd], timeout_ms: i32) {
    // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    assert!(r >= 0, "poll: {}", std::io::Error::last_os_error());
}

/// Sends `count` datagrams of `size` bytes (a little-endian sequence
/// number first) to the guest's echo port from `ports` sockets in turn,
/// with at most `window` unanswered, never retransmitting; stops when all
/// came back or none came back for [`IDLE_LIMIT`]. Must run inside the
/// namespace.
fn udp_echo_client(count: u64, window: u64, ports: usize, size: usize) -> EchoStats {
    let sockets: Vec<UdpSocket> = (0..ports)
        .map(|_| {
            let s = UdpSocket::bind((HOST_IP, 0)).expect("binding a UDP socket");
            s.connect((GUEST_IP, 7)).expect("connecting a UDP socket");
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut seen = vec![false; count as usize];
    let mut st = EchoStats::default();
    let mut payload = vec![0xa5u8; size];
    let mut buf = vec![0u8; 2048];
    let mut last_progress = Instant::now();
    while st.received < count && last_progress.elapsed() < IDLE_LIMIT {
        while st.sent < count && st.sent - st.received < window {
            payload[..8].copy_from_slice(&st.sent.to_le_bytes());
            match sockets[st.sent as usize % ports].send(&payload) {
                Ok(n) => assert_eq!(n, size),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("sending datagram {}: {e}", st.sent),
            }
            st.sent += 1;
        }
        recv_ready(&mut fds, 200);
        for s in &sockets {
            loop {
                match s.recv(&mut buf) {
                    Ok(n) => {
                        let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
                        if n != size || seq >= st.sent {
                            st.wrong += 1;
                        } else if seen[seq as usize] {
                            st.dup += 1;
                        } else {
                            seen[seq as usize] = true;
                            st.received += 1;
                            last_progress = Instant::now();
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("receiving an echo: {e} ({st:?})"),
                }
            }
        }
    }
    st
}

/// Runs a UDP echo server on port `port` of every address in the
/// namespace until `stop`; returns how many datagrams it echoed.
fn udp_echo_server(port: u16, stop: Arc<AtomicBool>) -> u64 {
    let s = UdpSocket::bind(("0.0.0.0", port)).expect("binding the echo server");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let mut echoed = 0;
    while !stop.load(Ordering::Relaxed) {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                s.send_to(&buf[..n], from).expect("echoing");
                echoed += 1;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("echo server: {e}"),
        }
    }
    echoed
}

fn fields(out: &Outcome) -> BTreeMap<String, String> {
    result_fields(&out.stdout).unwrap_or_else(|| panic!("no RINGVM-RESULT line: {out:#?}"))
}

fn num(f: &BTreeMap<String, String>, key: &str) -> u64 {
    f.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key}= in {f:?}"))
}

/// 1. The guest answers ping and echoes UDP on QEMU's virtio-net-pci,
///    with one and with two queue pairs.
#[test]
fn the_guest_driver_answers_ping_and_udp_on_qemu_virtio_net() {
    let Some(qemu) = qemu() else { return };
    if !have_ping() {
        return;
    }
    let dir = TempDir::new("net-qemu");
    let guest = dir.path().join("guest.elf");
    let w = run_ringvm(
        &["builtin-guest", "--output", guest.to_str().unwrap()],
        UP_DEADLINE,
    );
    assert_eq!(w.code, Some(0), "{w:#?}");
    for queues in [1u32, 2] {
        let Some(ns) = Netns::new("qemu") else { return };
        ns.add_tap(queues);
        let count = 2000;
        // The two-pair run also takes checksum offload and 64-byte RX
        // buffers (every frame spans merged buffers).
        let extra = if queues > 1 {
            " net.csum=on net.rxbuf=64"
        } else {
            ""
        };
        let cmdline = format!("net.ip={GUEST_IP}/24 net.queues={queues} net.count={count}{extra}");
        let mut vm = qemu_net(&ns, &qemu, &guest, &cmdline, queues);
        let up = vm.wait_line("net: up", UP_DEADLINE);
        assert!(up.contains(&format!("queues={queues}")), "{up}");
        ping(&ns, 3);
        let client = ns.thread(move || udp_echo_client(count, 64, 16, 64));
        let st = client.join().expect("UDP client");
        let out = vm.finish(RUN_DEADLINE);
        assert_eq!(
            (st.received, st.dup, st.wrong),
            (count, 0, 0),
            "{st:?} {out:#?}"
        );
        // QEMU's debug-exit: (0 << 1) | 1.
        assert_eq!(out.code, Some(1), "{out:#?}");
        let f = fields(&out);
        assert_eq!(f["mode"], "net-respond", "{f:?}");
        assert_eq!((num(&f, "udp"), num(&f, "bad")), (count, 0), "{f:?}");
        assert!(num(&f, "icmp") >= 3 && num(&f, "arp") >= 1, "{f:?}");
        if queues == 2 {
            assert!(num(&f, "rxq0") > 0 && num(&f, "rxq1") > 0, "{f:?}");
        }
    }
}

/// 2. The host pings the guest through the TAP (so the guest answered
///    ARP) and gets every reply; the VM keeps running until SIGTERM.
#[test]
fn host_pings_the_guest_through_a_tap() {
    if !kvm_available() || !have_ping() {
        return;
    }
    let Some(ns) = Netns::new("ping") else { return };
    ns.add_tap(1);
    let mut vm = ringvm(
        &ns,
        &format!("net.ip={GUEST_IP}/24"),
        &format!("tap={TAP},mac=52:54:00:12:34:57"),
    );
    let up = vm.wait_line("net: up", UP_DEADLINE);
    assert!(up.contains("mac=52:54:00:12:34:57"), "{up}");
    ping(&ns, 5);
    assert!(vm.running(), "{}", vm.output());
    let out = vm.terminate(RUN_DEADLINE);
    assert_eq!(out.code, Some(EXIT_SIGNALLED), "{out:#?}");
}

/// Echoes `count` datagrams through ringvm with `queues` pairs and the
/// guest options `extra`; returns the guest's `net: up` line and result.
fn ringvm_udp_echo(
    queues: u32,
    count: u64,
    extra: &str,
) -> Option<(String, BTreeMap<String, String>)> {
    let ns = Netns::new("udp")?;
    ns.add_tap(queues);
    let mut vm = ringvm(
        &ns,
        &format!("net.ip={GUEST_IP}/24 net.queues={queues} net.count={count} {extra}"),
        &format!("tap={TAP},queues={queues}"),
    );
    let up = vm.wait_line("net: up", UP_DEADLINE);
    // Several source ports, so that a multi-queue TAP spreads the flows.
    let client = ns.thread(move || udp_echo_client(count, 64, 16, 64));
    let st = client.join().expect("UDP client");
    let out = vm.finish(RUN_DEADLINE);
    assert_eq!(
        (st.sent, st.received, st.dup, st.wrong),
        (count, count, 0, 0),
        "{st:?} {out:#?}"
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    let f = fields(&out);
    assert_eq!(f["mode"], "net-respond", "{f:?}");
    assert_eq!((num(&f, "udp"), num(&f, "bad")), (count, 0), "{f:?}");
    Some((up, f))
}

/// 3. 10,000 UDP datagrams echoed by the guest, none lost, with one queue
///    pair.
#[test]
fn ten_thousand_udp_echoes_through_ringvm() {
    if !kvm_available() {
        return;
    }
    ringvm_udp_echo(1, 10_000, "");
}

/// 3b. The same with two queue pairs: both RX queues carry traffic.
#[test]
fn ten_thousand_udp_echoes_on_two_queue_pairs() {
    if !kvm_available() {
        return;
    }
    let Some((_, f)) = ringvm_udp_echo(2, 10_000, "") else {
        return;
    };
    assert!(
        num(&f, "rxq0") > 0 && num(&f, "rxq1") > 0,
        "both RX queues used: {f:?}"
    );
    assert_eq!(num(&f, "rxq0") + num(&f, "rxq1"), num(&f, "rx"), "{f:?}");
}

/// 3c. Checksum offload both ways (partial checksums from the host's
///     sockets reach the guest as NEEDS_CSUM and go back out that way),
///     64-byte RX buffers so every frame spans merged buffers, and no
///     event index: the echoes still all come back intact.
#[test]
fn udp_echoes_with_checksum_offload_and_merged_rx_buffers() {
    if !kvm_available() {
        return;
    }
    let Some((up, _)) = ringvm_udp_echo(1, 2000, "net.csum=on net.rxbuf=64 net.event_idx=off")
    else {
        return;
    };
    let features = up
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("features=0x"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("no features in {up}"));
    // CSUM, GUEST_CSUM and MRG_RXBUF negotiated, EVENT_IDX not.
    assert_eq!(
        features & (1 << 0 | 1 << 1 | 1 << 15 | 1 << 29),
        0b11 | 1 << 15,
        "{up}"
    );
}

/// 4. The guest floods a host echo server; every datagram comes back.
///    ringvm creates the TAP itself here (`--net ip=,mask=`).
#[test]
fn guest_udp_flood_against_a_host_echo_server() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = Netns::new("flood") else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        ns.thread(move || udp_echo_server(7777, stop))
    };
    let count = 2000;
    let vm = ringvm(
        &ns,
        &format!(
            "net.ip={GUEST_IP}/24 net.mode=udp-flood net.peer={HOST_IP}:7777 \
             net.count={count} net.size=200 net.window=32 net.timeout=60"
        ),
        &format!("ip={HOST_IP},mask=255.255.255.0"),
    );
    let out = vm.finish(RUN_DEADLINE);
    stop.store(true, Ordering::Relaxed);
    let echoed = server.join().expect("echo server");
    assert_eq!(out.code, Some(0), "{out:#?}");
    let f = fields(&out);
    assert_eq!(f["mode"], "net-flood", "{f:?}");
    assert_eq!(
        (
            num(&f, "sent"),
            num(&f, "received"),
            num(&f, "lost"),
            num(&f, "dup")
        ),
        (count, count, 0, 0),
        "{f:?}"
    );
    assert_eq!(num(&f, "bytes"), count * 200, "{f:?}");
    assert_eq!(echoed, count, "the server echoed each datagram once");
}

/// 5. The TAP disappears under a running guest: ringvm reports it, keeps
///    running, and still stops normally on SIGTERM.
#[test]
fn deleting_the_tap_under_a_running_guest_is_logged_and_survived() {
    if !kvm_available() || !have_ping() {
        return;
    }
    let Some(ns) = Netns::new("tapdel") else {
        return;
    };
    ns.add_tap(1);
    let mut vm = ringvm(&ns, &format!("net.ip={GUEST_IP}/24"), &format!("tap={TAP}"));
    vm.wait_line("net: up", UP_DEADLINE);
    ping(&ns, 2);
    let before = vm.stderr_lines();
    ns.ip(&["link", "del", TAP]);
    // A warning or error log line (not the stop line) about the TAP.
    let names_the_tap = |l: &str| {
        let l = l.to_ascii_lowercase();
        (l.starts_with("ringvm: warn") || l.starts_with("ringvm: error")) && l.contains("tap")
    };
    let logged = vm.wait_stderr(before, names_the_tap, Duration::from_secs(60));
    assert!(vm.running(), "ringvm ended with its TAP:\n{}", vm.output());
    let out = vm.terminate(RUN_DEADLINE);
    assert_eq!(out.code, Some(EXIT_SIGNALLED), "{out:#?}");
    assert!(logged, "no stderr line about the TAP: {out:#?}");
}
