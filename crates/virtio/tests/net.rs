//! virtio-net through the virtio-pci transport on a real KVM VM, over a
//! real TAP in a network namespace of its own (each test thread unshares
//! one, so no frame leaves it). The host side of the TAP is an AF_PACKET
//! socket: what it sends the guest receives, and what the guest sends it
//! reads.

mod driver;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use driver::{Driver, TestVm};
use uring_backend::iothread::IoThread;
use virtio::device::VirtioDevice;
use virtio::net::{NetConfig, NetDevice, NetStats};
use vm_memory::{Bytes, GuestAddress};

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01];
const F_MQ: u64 = 1 << 22;
const F_MRG: u64 = 1 << 15;

fn usable() -> bool {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let tun = std::path::Path::new("/dev/net/tun").exists();
    if !(kvm && tun) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "/dev/kvm or /dev/net/tun is not usable and CI=true"
        );
        eprintln!("skipping: /dev/kvm or /dev/net/tun is not usable");
        return false;
    }
    // SAFETY: moves only this thread into a new network namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "cannot make a network namespace (not root?) and CI=true"
        );
        eprintln!("skipping: cannot make a network namespace");
        return false;
    }
    true
}

/// An AF_PACKET socket on one interface.
struct Wire(OwnedFd);

impl Wire {
    fn open(ifname: &str) -> Wire {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh fd nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: binding with a sockaddr_ll of the right size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Wire(fd)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: sending from a valid buffer.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// The next frame of our test ethertype, within `tries` timeouts.
    fn recv_ours(&self, tries: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70000];
        for _ in 0..tries {
            // SAFETY: receiving into a valid buffer of its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 14 && buf[12..14] == ETHERTYPE {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(payload);
    f
}

fn device(cfg: &str, threads: &[Arc<IoThread>]) -> (NetDevice, String, Arc<NetStats>) {
    let cfg = NetConfig::parse(cfg).unwrap();
    let dev = NetDevice::new("net-test", &cfg, threads).unwrap();
    let name = dev.tap_name().to_string();
    let stats = dev.stats_handle();
    (dev, name, stats)
}

const RX_BUF: u64 = Driver::BUFFERS + 0x10_0000;
const TX_BUF: u64 = Driver::BUFFERS;

/// Posts `n` RX buffers of `len` bytes on queue `q`, one descriptor each.
fn post_rx(drv: &mut Driver, q: u16, n: u16, len: u32) {
    for i in 0..n {
        drv.post(q, i, &[(RX_BUF + u64::from(i) * 0x1_0000, len, true)]);
    }
}

/// Sends `frame` from the guest on TX queue `q`; returns the used length.
fn guest_send(drv: &mut Driver, q: u16, frame: &[u8]) -> u32 {
    let mem = drv.memory().clone();
    mem.write_slice(&[0u8; 12], GuestAddress(TX_BUF)).unwrap();
    mem.write_slice(frame, GuestAddress(TX_BUF + 12)).unwrap();
    drv.post(q, 0, &[(TX_BUF, 12 + frame.len() as u32, false)]);
    drv.wait_used(q, Duration::from_secs(10))
        .expect("TX completes")
        .1
}

/// The next RX frame of our ethertype on queue `q`: (num_buffers, frame).
fn guest_recv(drv: &mut Driver, q: u16) -> Option<(u16, Vec<u8>)> {
    let mem = drv.memory().clone();
    while let Some((id, len)) = drv.wait_used(q, Duration::from_secs(3)) {
        let addr = RX_BUF + u64::from(id) * 0x1_0000;
        let mut data = vec![0u8; len as usize];
        mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
        // Give the buffer back.
        drv.post(q, id as u16, &[(addr, 0x1_0000, true)]);
        if data.len() >= 26 && data[24..26] == ETHERTYPE {
            return Some((
                u16::from_le_bytes([data[10], data[11]]),
                data[12..].to_vec(),
            ));
        }
    }
    None
}

/// Sends a control command; returns the ack byte.
fn ctrl(drv: &mut Driver, q: u16, cmd: &[u8]) -> u8 {
    let mem = drv.memory().clone();
    let at = Driver::BUFFERS + 0x8000;
    mem.write_slice(cmd, GuestAddress(at)).unwrap();
    mem.write_obj(0xeeu8, GuestAddress(at + 0x800)).unwrap();
    drv.post(
        q,
        0,
        &[(at, cmd.len() as u32, false), (at + 0x800, 1, true)],
    );
    drv.wait_used(q, Duration::from_secs(10))
        .expect("control completes");
    mem.read_obj(GuestAddress(at + 0x800)).unwrap()
}

#[test]
fn virtio_net_keeps_the_device_contract() {
    if !usable() {
        return;
    }
    let threads = vec![Arc::new(IoThread::spawn("net-contract", 64).unwrap())];
    let (dev, _, _) = device("ip=10.9.0.1,mask=255.255.255.0,queues=2", &threads);
    let vm = TestVm::new();
    let mut drv = Driver::new(&vm, Box::new(dev));
    drv.init_all().expect("activation");
    drv.reset();
    drv.init_all().expect("re-activation");
    drv.scribble();
    drv.reset();
    drv.init_all().expect("activation after garbage");
    drv.reset();
}

#[test]
fn frames_cross_the_tap_both_ways_and_the_filter_and_bad_chains_behave() {
    if !usable() {
        return;
    }
    let threads = vec![Arc::new(IoThread::spawn("net-io", 64).unwrap())];
    let (dev, tap, stats) = device(
        "ip=10.9.1.1,mask=255.255.255.0,mac=52:54:00:aa:bb:01",
        &threads,
    );
    let vm = TestVm::new();
    let mut drv = Driver::new(&vm, Box::new(dev));
    let all = drv.device_features();
    assert_eq!(all & F_MQ, 0, "one queue pair: no MQ");
    // Without MRG_RXBUF each frame lands in one buffer.
    drv.init(all & !F_MRG).unwrap();
    let wire = Wire::open(&tap);

    // Guest to host.
    let out = frame([0xff; 6], GUEST_MAC, b"hello from the guest");
    assert_eq!(guest_send(&mut drv, 1, &out), 0);
    assert_eq!(wire.recv_ours(25).expect("the host saw the frame"), out);

    // Host to guest.
    post_rx(&mut drv, 0, 8, 0x1_0000);
    let inbound = frame(GUEST_MAC, [0x52, 0x54, 0, 0, 0, 9], &[0x5a; 300]);
    wire.send(&inbound);
    let (nbuf, got) = guest_recv(&mut drv, 0).expect("the guest got the frame");
    assert_eq!((nbuf, got), (1, inbound.clone()));

    // The MAC filter: no promiscuous mode, empty tables.
    assert_eq!(ctrl(&mut drv, 2, &[0, 0, 0]), 0, "PROMISC off");
    assert_eq!(ctrl(&mut drv, 2, &[0, 1, 0]), 0, "ALLMULTI off");
    assert_eq!(
        ctrl(&mut drv, 2, &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        0,
        "empty MAC tables"
    );
    assert_eq!(ctrl(&mut drv, 2, &[9, 9]), 1, "unknown class refused");
    assert_eq!(ctrl(&mut drv, 2, &[4, 0, 2, 0]), 1, "MQ not negotiated");
    let stranger = frame(
        [0x52, 0x54, 0, 9, 9, 9],
        [0x52, 0, 0, 0, 0, 2],
        b"not yours",
    );
    let mine = frame(GUEST_MAC, [0x52, 0, 0, 0, 0, 2], b"yours");
    wire.send(&stranger);
    wire.send(&mine);
    let (_, got) = guest_recv(&mut drv, 0).expect("own frame arrives");
    assert_eq!(got, mine, "the stranger's frame was filtered");
    assert!(stats.rx_filtered.load(Ordering::Relaxed) >= 1);

    // A receive chain the device may not write (a driver bug): returned
    // unused and counted; frames keep arriving.
    drv.post(0, 8, &[(RX_BUF + 8 * 0x1_0000, 2048, false)]);
    let after_bad = frame(GUEST_MAC, [0x52, 0, 0, 0, 0, 2], b"after a bad RX chain");
    wire.send(&after_bad);
    let (_, got) = guest_recv(&mut drv, 0).expect("RX goes on");
    assert_eq!(got, after_bad);
    assert_eq!(stats.rx_bad_chains.load(Ordering::Relaxed), 1);

    // Bad TX chains: device-writable buffers, a runt, a giant; each is
    // dropped and counted, and the queue keeps working.
    let mem = drv.memory().clone();
    drv.post(1, 0, &[(TX_BUF, 100, true)]);
    assert_eq!(drv.wait_used(1, Duration::from_secs(10)).unwrap().1, 0);
    drv.post(1, 0, &[(TX_BUF, 20, false)]);
    assert_eq!(drv.wait_used(1, Duration::from_secs(10)).unwrap().1, 0);
    drv.post(1, 0, &[(TX_BUF, 0x2_0000, false)]);
    assert_eq!(drv.wait_used(1, Duration::from_secs(10)).unwrap().1, 0);
    drv.post(1, 0, &[(0xffff_0000, 64, false)]);
    assert_eq!(drv.wait_used(1, Duration::from_secs(10)).unwrap().1, 0);
    assert!(stats.tx_dropped.load(Ordering::Relaxed) >= 4);
    let again = frame([0xff; 6], GUEST_MAC, b"still alive");
    mem.write_slice(&[0u8; 12], GuestAddress(TX_BUF)).unwrap();
    assert_eq!(guest_send(&mut drv, 1, &again), 0);
    assert_eq!(
        wire.recv_ours(25).expect("TX works after bad chains"),
        again
    );

    // Reset and start again: frames still flow.
    drv.reset();
    drv.init(all).unwrap();
    post_rx(&mut drv, 0, 8, 0x1_0000);
    let after = frame(
        GUEST_MAC,
        [0x52, 0, 0, 0, 0, 3],
        b"after reset, with MRG_RXBUF",
    );
    wire.send(&after);
    let (nbuf, got) = guest_recv(&mut drv, 0).expect("RX after reset");
    assert_eq!((nbuf, got), (1, after));
}

#[test]
fn two_queue_pairs_serve_both_tap_queues() {
    if !usable() {
        return;
    }
    let threads = vec![Arc::new(IoThread::spawn("net-mq", 64).unwrap())];
    let (dev, tap, stats) = device(
        "ip=10.9.2.1,mask=255.255.255.0,mac=52:54:00:aa:bb:01,queues=2",
        &threads,
    );
    let vm = TestVm::new();
    let mut drv = Driver::new(&vm, Box::new(dev));
    let all = drv.device_features();
    assert_ne!(all & F_MQ, 0, "MQ offered");
    drv.init(all).unwrap();
    assert_eq!(ctrl(&mut drv, 4, &[4, 0, 3, 0]), 1, "3 pairs refused");
    assert_eq!(ctrl(&mut drv, 4, &[4, 0, 2, 0]), 0, "2 pairs");
    let wire = Wire::open(&tap);
    for q in [1u16, 3] {
        let f = frame(
            [0xff; 6],
            GUEST_MAC,
            format!("from TX queue {q}").as_bytes(),
        );
        assert_eq!(guest_send(&mut drv, q, &f), 0);
        assert_eq!(wire.recv_ours(25).expect("frame from each TX queue"), f);
    }
    assert_eq!(stats.tx_packets.load(Ordering::Relaxed), 2);
}

#[test]
fn a_deleted_tap_is_survived() {
    if !usable() {
        return;
    }
    let threads = vec![Arc::new(IoThread::spawn("net-gone", 64).unwrap())];
    let (dev, tap, stats) = device("ip=10.9.3.1,mask=255.255.255.0", &threads);
    let vm = TestVm::new();
    let mut drv = Driver::new(&vm, Box::new(dev));
    drv.init_all().unwrap();
    post_rx(&mut drv, 0, 8, 0x1_0000);
    let ok = std::process::Command::new("ip")
        .args(["link", "del", &tap])
        .status()
        .unwrap();
    assert!(ok.success());
    let f = frame([0xff; 6], GUEST_MAC, b"into the void");
    for _ in 0..3 {
        assert_eq!(guest_send(&mut drv, 1, &f), 0, "TX completes, dropped");
    }
    assert!(stats.tx_errors.load(Ordering::Relaxed) >= 1);
    // The device still resets and restarts.
    drv.reset();
    drv.init_all().unwrap();
    drv.reset();
}

#[test]
fn the_device_describes_itself() {
    if !usable() {
        return;
    }
    let threads = vec![Arc::new(IoThread::spawn("net-desc", 64).unwrap())];
    let (dev, _, _) = device(
        "ip=10.9.4.1,mask=255.255.255.0,mac=52:54:00:aa:bb:01,queues=4",
        &threads,
    );
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes().len(), 9);
    let mut cfg = [0u8; 10];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 4, "max pairs");
}
