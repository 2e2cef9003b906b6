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
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::{have_ping, ping, Background, Netns, GUEST_IP, HOST_IP, TAP};
use common::{kvm_available, qemu, result_fields, run_ringvm, Outcome, TempDir};

/// Until the guest prints `net: up`.
const UP_DEADLINE: Duration = Duration::from_secs(180);
/// Until a VMM that ends by itself has ended.
const RUN_DEADLINE: Duration = Duration::from_secs(900);
/// A host client gives up when no echo came back for this long.
const IDLE_LIMIT: Duration = Duration::from_secs(120);
/// ringvm's exit code when stopped by SIGINT, SIGTERM or SIGHUP.
const EXIT_SIGNALLED: i32 = 106;

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

/// `net.secs`: respond mode answers for that long, then ends by itself
/// with its result line and status 0 (what the soak in
/// benches/density.py relies on).
#[test]
fn respond_mode_with_net_secs_answers_then_ends_by_itself() {
    if !kvm_available() || !have_ping() {
        return;
    }
    let Some(ns) = Netns::new("secs") else {
        return;
    };
    ns.add_tap(1);
    let mut vm = ringvm(
        &ns,
        &format!("net.ip={GUEST_IP}/24 net.secs=20"),
        &format!("tap={TAP}"),
    );
    vm.wait_line("net: up", UP_DEADLINE);
    ping(&ns, 2);
    let out = vm.finish(RUN_DEADLINE);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let r = result_fields(&out.stdout).unwrap_or_else(|| panic!("no result: {out:#?}"));
    assert_eq!(r["mode"], "net-respond", "{out:#?}");
    assert!(r["icmp"].parse::<u64>().unwrap() >= 2, "{out:#?}");
}
