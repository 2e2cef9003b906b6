//! Shared by the virtio-net tests: a TAP in a network namespace of the
//! test thread's own, an AF_PACKET socket on its host side, and the guest
//! side's sends and receives through the test driver.

#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use crate::driver::Driver;
use uring_backend::iothread::IoThread;
use virtio::net::{NetConfig, NetDevice, NetStats};
use vm_memory::{Bytes, GuestAddress};

pub const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01];
pub const F_MQ: u64 = 1 << 22;
pub const F_MRG: u64 = 1 << 15;

pub fn usable() -> bool {
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
pub struct Wire(OwnedFd);

impl Wire {
    pub fn open(ifname: &str) -> Wire {
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

    pub fn send(&self, frame: &[u8]) {
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
    pub fn recv_ours(&self, tries: usize) -> Option<Vec<u8>> {
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

pub fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(payload);
    f
}

pub fn device(cfg: &str, threads: &[Arc<IoThread>]) -> (NetDevice, String, Arc<NetStats>) {
    let cfg = NetConfig::parse(cfg).unwrap();
    let dev = NetDevice::new("net-test", &cfg, threads).unwrap();
    let name = dev.tap_name().to_string();
    let stats = dev.stats_handle();
    (dev, name, stats)
}

pub const RX_BUF: u64 = Driver::BUFFERS + 0x10_0000;
pub const TX_BUF: u64 = Driver::BUFFERS;

/// Posts `n` RX buffers of `len` bytes on queue `q`, one descriptor each.
pub fn post_rx(drv: &mut Driver, q: u16, n: u16, len: u32) {
    for i in 0..n {
        drv.post(q, i, &[(RX_BUF + u64::from(i) * 0x1_0000, len, true)]);
    }
}

/// Sends `frame` from the guest on TX queue `q`; returns the used length.
pub fn guest_send(drv: &mut Driver, q: u16, frame: &[u8]) -> u32 {
    let mem = drv.memory().clone();
    mem.write_slice(&[0u8; 12], GuestAddress(TX_BUF)).unwrap();
    mem.write_slice(frame, GuestAddress(TX_BUF + 12)).unwrap();
    drv.post(q, 0, &[(TX_BUF, 12 + frame.len() as u32, false)]);
    drv.wait_used(q, Duration::from_secs(10))
        .expect("TX completes")
        .1
}

/// The next RX frame of our ethertype on queue `q`: (num_buffers, frame).
pub fn guest_recv(drv: &mut Driver, q: u16) -> Option<(u16, Vec<u8>)> {
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
pub fn ctrl(drv: &mut Driver, q: u16, cmd: &[u8]) -> u8 {
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
