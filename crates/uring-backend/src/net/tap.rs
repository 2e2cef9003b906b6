//! TAP devices with the virtio-net header (`IFF_VNET_HDR`).
//!
//! A [`Tap`] is one TAP interface opened with one file descriptor per
//! queue (`IFF_MULTI_QUEUE` when there is more than one). Every frame read
//! or written is preceded by the 12-byte `virtio_net_hdr_v1`, the same
//! header the guest puts in front of its frames, so frames move between
//! guest memory and the TAP without being copied or rewritten.
//!
//! The file descriptors are non-blocking: reads and writes go through the
//! io_uring executor, which waits for readiness with poll internally.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

/// Size of `virtio_net_hdr_v1` (with `num_buffers`), the vnet header size
/// we give the TAP.
pub const VNET_HDR_LEN: usize = 12;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;

const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
const IFF_MULTI_QUEUE: u16 = 0x0100;
const IFF_ATTACH_QUEUE: u16 = 0x0200;
const IFF_DETACH_QUEUE: u16 = 0x0400;

/// `TUNSETOFFLOAD` flags: what the reader of the TAP (the guest) accepts.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;

const IFNAMSIZ: usize = 16;

/// `struct ifreq`: a name and a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        let n = name.len().min(IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        req
    }

    fn set_flags(&mut self, flags: u16) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.data[0], self.data[1]])
    }

    /// Puts a `sockaddr_in` with `addr` in the union.
    fn set_ipv4(&mut self, addr: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Errors from opening or configuring a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {name:?} is empty, too long (max 15 bytes) or has a NUL byte")]
    BadName { name: String },
    #[error("opening /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("attaching to TAP {name:?} (TUNSETIFF; a TAP made without multi_queue cannot take queues > 1, and an existing TAP needs its owner's permission)")]
    SetIff {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("TAP {name}: {what} failed")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("a TAP needs between 1 and 256 queues, not {queues}")]
    QueueCount { queues: usize },
}

/// How to get a TAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapSpec {
    /// Attach to an existing TAP (or create a transient one) by name.
    Named(String),
    /// Create a new TAP (named `ringvm%d` by the kernel) and give the host
    /// side this address.
    Create { ip: Ipv4Addr, mask: Ipv4Addr },
}

/// One TAP interface with one fd per queue.
#[derive(Clone)]
pub struct Tap {
    name: Arc<str>,
    queues: Vec<Arc<File>>,
}

fn ioctl_err(name: &str, what: &'static str) -> TapError {
    TapError::Ioctl {
        name: name.into(),
        what,
        source: io::Error::last_os_error(),
    }
}

fn open_queue(name: &str, flags: u16) -> Result<(File, String), TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let mut req = IfReq::new(name);
    req.set_flags(flags);
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` is
    // (same size and layout); the fd is valid.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(TapError::SetIff {
            name: name.into(),
            source: io::Error::last_os_error(),
        });
    }
    let hdr = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) };
    if rc < 0 {
        return Err(ioctl_err(name, "TUNSETVNETHDRSZ"));
    }
    Ok((file, req.name()))
}

impl Tap {
    /// Opens the TAP `spec` names (or creates one) with `queues` fds.
    pub fn open(spec: &TapSpec, queues: usize) -> Result<Tap, TapError> {
        if queues == 0 || queues > 256 {
            return Err(TapError::QueueCount { queues });
        }
        let requested = match spec {
            TapSpec::Named(n) => {
                if n.is_empty() || n.len() >= IFNAMSIZ || n.contains('\0') {
                    return Err(TapError::BadName { name: n.clone() });
                }
                n.clone()
            }
            TapSpec::Create { .. } => "ringvm%d".to_string(),
        };
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let (first, name) = open_queue(&requested, flags)?;
        let mut files = vec![Arc::new(first)];
        for _ in 1..queues {
            files.push(Arc::new(open_queue(&name, flags)?.0));
        }
        let tap = Tap {
            name: name.into(),
            queues: files,
        };
        if let TapSpec::Create { ip, mask } = spec {
            tap.configure_host_side(*ip, *mask)?;
        }
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of queue fds.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The fd of queue `index`, shared with in-flight operations.
    pub fn queue(&self, index: usize) -> Option<Arc<File>> {
        self.queues.get(index).cloned()
    }

    /// Tells the kernel which offloads the reader accepts (`TUN_F_*`),
    /// following the features the guest negotiated.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        let fd = self.queues[0].as_raw_fd();
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe { libc::ioctl(fd, TUNSETOFFLOAD, flags as libc::c_ulong) };
        if rc < 0 {
            return Err(ioctl_err(&self.name, "TUNSETOFFLOAD"));
        }
        Ok(())
    }

    /// Attaches or detaches queue `index` (multi-queue TAPs only), so the
    /// kernel steers no frames to queues the guest does not use.
    pub fn set_queue_enabled(&self, index: usize, enabled: bool) -> Result<(), TapError> {
        if self.queues.len() < 2 {
            return Ok(());
        }
        let Some(file) = self.queues.get(index) else {
            return Ok(());
        };
        let mut req = IfReq::new("");
        req.set_flags(if enabled {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        });
        // SAFETY: TUNSETQUEUE reads a `struct ifreq`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETQUEUE, &mut req) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            // Attaching an attached queue (or detaching a detached one)
            // fails with EINVAL; that is the state we want.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(TapError::Ioctl {
                name: self.name.to_string(),
                what: "TUNSETQUEUE",
                source: e,
            });
        }
        Ok(())
    }

    /// Whether queue `index` still belongs to a live interface (false once
    /// the TAP was deleted).
    pub fn is_alive(&self, index: usize) -> bool {
        let Some(file) = self.queues.get(index) else {
            return false;
        };
        let mut req = IfReq::new("");
        // SAFETY: TUNGETIFF writes a `struct ifreq`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF, &mut req) };
        rc == 0 && req.flags() & IFF_TAP != 0
    }

    /// Gives the host side `ip`/`mask` and brings the interface up.
    fn configure_host_side(&self, ip: Ipv4Addr, mask: Ipv4Addr) -> Result<(), TapError> {
        // SAFETY: creating a socket has no memory effects; the result is
        // checked and owned right away.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(ioctl_err(&self.name, "socket(AF_INET)"));
        }
        // SAFETY: `raw` is a fresh fd nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let set = |req: &mut IfReq, op: libc::c_ulong, what: &'static str| {
            // SAFETY: the SIOCSIF* requests read a `struct ifreq`.
            let rc = unsafe { libc::ioctl(sock.as_raw_fd(), op, req as *mut IfReq) };
            if rc < 0 {
                Err(ioctl_err(&self.name, what))
            } else {
                Ok(())
            }
        };
        let mut req = IfReq::new(&self.name);
        req.set_ipv4(ip);
        set(&mut req, libc::SIOCSIFADDR, "setting the address")?;
        req.set_ipv4(mask);
        set(&mut req, libc::SIOCSIFNETMASK, "setting the netmask")?;
        let mut req = IfReq::new(&self.name);
        // SAFETY: SIOCGIFFLAGS writes a `struct ifreq`.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
        if rc < 0 {
            return Err(ioctl_err(&self.name, "reading the flags"));
        }
        let flags = req.flags() | libc::IFF_UP as u16 | libc::IFF_RUNNING as u16;
        req.set_flags(flags);
        set(&mut req, libc::SIOCSIFFLAGS, "bringing it up")
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.queues[0].as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "0123456789abcdef", "a\0b"] {
            assert!(matches!(
                Tap::open(&TapSpec::Named(bad.into()), 1),
                Err(TapError::BadName { .. })
            ));
        }
        assert!(matches!(
            Tap::open(&TapSpec::Named("x".into()), 0),
            Err(TapError::QueueCount { queues: 0 })
        ));
    }

    #[test]
    fn ifreq_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        let mut r = IfReq::new("tap0");
        r.set_flags(IFF_TAP | IFF_VNET_HDR);
        assert_eq!(r.flags(), 0x4002);
        assert_eq!(r.name(), "tap0");
        r.set_ipv4(Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(&r.data[4..8], &[10, 0, 0, 1]);
    }
}
