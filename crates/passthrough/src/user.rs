//! The vfio-user transport: a PCI function served by another process on a
//! Unix socket (the vfio-user protocol, version 0.1).
//!
//! This is a client of our own rather than `vfio_user::Client`, because a
//! VMM must survive the server: every reply is checked (message ID,
//! command, reply flag, error flag, sizes, counts) before any field is
//! used, the socket has read and write deadlines so a silent server cannot
//! hang a vCPU, and the first broken exchange (a disconnect, garbage, a
//! timeout) marks the connection dead so later requests fail at once.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::transport::{
    parse_region_info, region_info_request, sparse_areas, DeviceInfo, DmaRegion, IrqInfo, IrqSet,
    MmapSource, RegionInfo, Transport, TransportError, REGION_INFO_SIZE,
};

const HEADER_SIZE: usize = 16;
const CMD_VERSION: u16 = 1;
const CMD_DMA_MAP: u16 = 2;
const CMD_DMA_UNMAP: u16 = 3;
const CMD_DEVICE_GET_INFO: u16 = 4;
const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
const CMD_DEVICE_GET_IRQ_INFO: u16 = 7;
const CMD_DEVICE_SET_IRQS: u16 = 8;
const CMD_REGION_READ: u16 = 9;
const CMD_REGION_WRITE: u16 = 10;
const CMD_DEVICE_RESET: u16 = 13;
const FLAG_TYPE_MASK: u32 = 0xf;
const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;
const DMA_READ_WRITE: u32 = 3;
/// The largest data transfer we offer and accept.
const MAX_DATA_XFER: usize = 1 << 20;
/// The largest reply we read: one transfer plus its header and room for
/// region capabilities.
const MAX_REPLY: usize = MAX_DATA_XFER + 4096;
/// A region info reply with capabilities may be at most this long.
const MAX_REGION_INFO: u32 = 64 << 10;
/// Bounds on what a device may claim.
const MAX_REGIONS: u32 = 64;
const MAX_IRQS: u32 = 16;
const MAX_IRQ_COUNT: u32 = 2048;
/// How long a request may take before the device counts as gone.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Finds `"key": <number>` in the server's capabilities JSON. We only need
/// two numbers, and a missing or odd one keeps the protocol's default.
fn json_number(json: &str, key: &str) -> Option<u64> {
    let at = json.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = json[at..].trim_start().strip_prefix(':')?.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A reply: its payload and the file descriptor that came with it.
struct Reply {
    payload: Vec<u8>,
    fd: Option<File>,
}

/// A connection to a vfio-user device server.
pub struct UserTransport {
    path: PathBuf,
    stream: UnixStream,
    next_id: u16,
    /// File descriptors the server accepts per message.
    max_fds: usize,
    /// Bytes the server accepts per region access.
    max_xfer: usize,
    /// Why the connection is unusable, once it is.
    dead: Option<&'static str>,
}

impl UserTransport {
    /// Connects to the server on `path` and negotiates the protocol.
    pub fn connect(path: &Path, timeout: Duration) -> Result<UserTransport, TransportError> {
        let io = |source| TransportError::Io {
            op: "connecting",
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        Self::over_stream(stream, path, timeout)
    }

    /// Negotiates over an already connected `stream` (`path` names the
    /// server in messages). Public (hidden) for the fuzz target, which
    /// plays the server on one end of a socket pair.
    #[doc(hidden)]
    pub fn over_stream(
        stream: UnixStream,
        path: &Path,
        timeout: Duration,
    ) -> Result<UserTransport, TransportError> {
        let io = |source| TransportError::Io {
            op: "connecting",
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let mut t = UserTransport {
            path: path.into(),
            stream,
            next_id: 0,
            max_fds: 1,
            max_xfer: MAX_DATA_XFER,
            dead: None,
        };
        t.negotiate()?;
        Ok(t)
    }

    fn negotiate(&mut self) -> Result<(), TransportError> {
        let op = "version negotiation";
        let json = format!(
            "{{\"capabilities\":{{\"max_msg_fds\":16,\"max_data_xfer_size\":{MAX_DATA_XFER}}}}}"
        );
        let mut payload = Vec::new();
        payload.extend_from_slice(&0u16.to_le_bytes());
        payload.extend_from_slice(&1u16.to_le_bytes());
        payload.extend_from_slice(json.as_bytes());
        payload.push(0);
        let reply = self.request(op, CMD_VERSION, &payload, &[])?;
        let p = &reply.payload;
        let major = u16_at(p, 0).ok_or_else(|| self.garbage(op, "no version numbers"))?;
        if major != 0 {
            return Err(self.garbage(op, format!("server speaks version {major}, not 0")));
        }
        let caps = String::from_utf8_lossy(p.get(4..).unwrap_or_default());
        let caps = caps.trim_end_matches('\0');
        if let Some(n) = json_number(caps, "max_msg_fds") {
            self.max_fds = (n as usize).clamp(1, 16);
        }
        if let Some(n) = json_number(caps, "max_data_xfer_size") {
            self.max_xfer = (n as usize).clamp(8, MAX_DATA_XFER);
        }
        Ok(())
    }

    /// Marks the connection dead with a protocol error.
    fn garbage(&mut self, op: &'static str, detail: impl Into<String>) -> TransportError {
        self.kill("sent a malformed reply");
        TransportError::Protocol {
            op,
            detail: detail.into(),
        }
    }

    fn kill(&mut self, why: &'static str) {
        if self.dead.is_none() {
            self.dead = Some(why);
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn io_error(&mut self, op: &'static str, source: std::io::Error) -> TransportError {
        use std::io::ErrorKind;
        if matches!(
            source.kind(),
            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
        ) {
            self.kill("disconnected");
            return TransportError::Disconnected { op };
        }
        self.kill("failed with an I/O error");
        TransportError::Io { op, source }
    }

    /// Sends one command and reads its reply, checking the header.
    fn request(
        &mut self,
        op: &'static str,
        command: u16,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<Reply, TransportError> {
        if let Some(why) = self.dead {
            return Err(TransportError::Dead { op, why });
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let size = HEADER_SIZE + payload.len();
        let mut msg = Vec::with_capacity(size);
        msg.extend_from_slice(&id.to_le_bytes());
        msg.extend_from_slice(&command.to_le_bytes());
        msg.extend_from_slice(&(size as u32).to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes());
        msg.extend_from_slice(&0u32.to_le_bytes());
        msg.extend_from_slice(payload);
        let sent = if fds.is_empty() {
            self.stream.write_all(&msg).map(|()| msg.len())
        } else {
            self.stream
                .send_with_fds(&[&msg[..]], fds)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        };
        match sent {
            Ok(n) if n < msg.len() => {
                if let Err(e) = self.stream.write_all(&msg[n..]) {
                    return Err(self.io_error(op, e));
                }
            }
            Ok(_) => {}
            Err(e) => return Err(self.io_error(op, e)),
        }

        let mut header = [0u8; HEADER_SIZE];
        let (n, fd) = match self.stream.recv_with_fd(&mut header) {
            Ok(r) => r,
            Err(e) => {
                let e = std::io::Error::from_raw_os_error(e.errno());
                return Err(self.io_error(op, e));
            }
        };
        if n == 0 {
            self.kill("disconnected");
            return Err(TransportError::Disconnected { op });
        }
        if let Err(e) = self.stream.read_exact(&mut header[n..]) {
            return Err(self.io_error(op, e));
        }
        let r_id = u16::from_le_bytes([header[0], header[1]]);
        let r_cmd = u16::from_le_bytes([header[2], header[3]]);
        let r_size = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default()) as usize;
        let r_flags = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
        let r_error = u32::from_le_bytes(header[12..16].try_into().unwrap_or_default());
        if r_id != id || r_cmd != command || r_flags & FLAG_TYPE_MASK != FLAG_REPLY {
            return Err(self.garbage(
                op,
                format!(
                    "expected the reply to message {id} (command {command}), got id {r_id}, \
                     command {r_cmd}, flags {r_flags:#x}"
                ),
            ));
        }
        if !(HEADER_SIZE..=MAX_REPLY).contains(&r_size) {
            return Err(self.garbage(op, format!("reply size {r_size}")));
        }
        let mut payload = vec![0u8; r_size - HEADER_SIZE];
        if let Err(e) = self.stream.read_exact(&mut payload) {
            return Err(self.io_error(op, e));
        }
        if r_flags & FLAG_ERROR != 0 {
            return Err(TransportError::Refused { op, errno: r_error });
        }
        Ok(Reply { payload, fd })
    }

    fn region_info_once(
        &mut self,
        index: u32,
        argsz: u32,
    ) -> Result<(Vec<u8>, Option<File>), TransportError> {
        let op = "DEVICE_GET_REGION_INFO";
        let reply = self.request(
            op,
            CMD_DEVICE_GET_REGION_INFO,
            &region_info_request(index, argsz),
            &[],
        )?;
        if reply.payload.len() < REGION_INFO_SIZE {
            return Err(self.garbage(op, format!("{} bytes", reply.payload.len())));
        }
        Ok((reply.payload, reply.fd))
    }

    fn set_irqs_raw(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
    ) -> Result<(), TransportError> {
        let mut p = Vec::with_capacity(20);
        for v in [20, flags, index, start, count] {
            p.extend_from_slice(&u32::to_le_bytes(v));
        }
        self.request("DEVICE_SET_IRQS", CMD_DEVICE_SET_IRQS, &p, fds)
            .map(drop)
    }

    fn check_len(&mut self, op: &'static str, len: usize) -> Result<(), TransportError> {
        if len == 0 || len > self.max_xfer {
            return Err(TransportError::Invalid {
                op,
                detail: format!(
                    "{len}-byte access (the server takes 1 to {})",
                    self.max_xfer
                ),
            });
        }
        Ok(())
    }
}

impl Transport for UserTransport {
    fn describe(&self) -> String {
        format!("vfio-user device at {}", self.path.display())
    }

    fn device_info(&mut self) -> Result<DeviceInfo, TransportError> {
        let op = "DEVICE_GET_INFO";
        let mut p = Vec::with_capacity(16);
        for v in [16u32, 0, 0, 0] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        let reply = self.request(op, CMD_DEVICE_GET_INFO, &p, &[])?;
        let r = &reply.payload;
        let (Some(flags), Some(num_regions), Some(num_irqs)) =
            (u32_at(r, 4), u32_at(r, 8), u32_at(r, 12))
        else {
            return Err(self.garbage(op, format!("{} bytes", r.len())));
        };
        if num_regions > MAX_REGIONS || num_irqs > MAX_IRQS {
            return Err(self.garbage(
                op,
                format!("{num_regions} regions and {num_irqs} interrupt indexes"),
            ));
        }
        Ok(DeviceInfo {
            flags,
            num_regions,
            num_irqs,
        })
    }

    fn region_info(&mut self, index: u32) -> Result<RegionInfo, TransportError> {
        let op = "DEVICE_GET_REGION_INFO";
        let mut argsz = (REGION_INFO_SIZE + 256) as u32;
        let (mut info, mut fd) = self.region_info_once(index, argsz)?;
        let mut raw = parse_region_info(&info).ok_or_else(|| self.garbage(op, "short reply"))?;
        if raw.argsz > argsz && raw.argsz <= MAX_REGION_INFO {
            argsz = raw.argsz;
            (info, fd) = self.region_info_once(index, argsz)?;
            raw = parse_region_info(&info).ok_or_else(|| self.garbage(op, "short reply"))?;
        }
        if raw.index != index {
            return Err(self.garbage(op, format!("asked for region {index}, got {}", raw.index)));
        }
        let sparse = match sparse_areas(&info, &raw) {
            Ok(s) => s,
            Err(detail) => return Err(self.garbage(op, detail)),
        };
        Ok(RegionInfo {
            index,
            flags: raw.flags,
            size: raw.size,
            offset: raw.offset,
            sparse,
            mmap: fd.map(|f| MmapSource {
                fd: Arc::new(OwnedFd::from(f)),
                offset: raw.offset,
            }),
        })
    }

    fn irq_info(&mut self, index: u32) -> Result<IrqInfo, TransportError> {
        let op = "DEVICE_GET_IRQ_INFO";
        let mut p = Vec::with_capacity(16);
        for v in [16u32, 0, index, 0] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        let reply = self.request(op, CMD_DEVICE_GET_IRQ_INFO, &p, &[])?;
        let r = &reply.payload;
        let (Some(flags), Some(r_index), Some(count)) = (u32_at(r, 4), u32_at(r, 8), u32_at(r, 12))
        else {
            return Err(self.garbage(op, format!("{} bytes", r.len())));
        };
        if r_index != index || count > MAX_IRQ_COUNT {
            return Err(self.garbage(
                op,
                format!("asked for index {index}, got index {r_index} with {count} vectors"),
            ));
        }
        Ok(IrqInfo {
            index,
            flags,
            count,
        })
    }

    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), TransportError> {
        let op = "REGION_READ";
        self.check_len(op, data.len())?;
        let mut p = Vec::with_capacity(16);
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&index.to_le_bytes());
        p.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let reply = self.request(op, CMD_REGION_READ, &p, &[])?;
        let r = &reply.payload;
        let (r_off, r_region, r_count) = (u64_at(r, 0), u32_at(r, 8), u32_at(r, 12));
        if r_off != Some(offset)
            || r_region != Some(index)
            || r_count != Some(data.len() as u32)
            || r.len() != 16 + data.len()
        {
            let detail = format!(
                "asked for {} bytes of region {index} at {offset:#x}, got {:?} bytes ({} in the reply)",
                data.len(),
                r_count,
                r.len().saturating_sub(16)
            );
            return Err(self.garbage(op, detail));
        }
        data.copy_from_slice(&r[16..]);
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), TransportError> {
        let op = "REGION_WRITE";
        self.check_len(op, data.len())?;
        let mut p = Vec::with_capacity(16 + data.len());
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&index.to_le_bytes());
        p.extend_from_slice(&(data.len() as u32).to_le_bytes());
        p.extend_from_slice(data);
        let reply = self.request(op, CMD_REGION_WRITE, &p, &[])?;
        let r = &reply.payload;
        if u32_at(r, 12) != Some(data.len() as u32) || u32_at(r, 8) != Some(index) {
            return Err(self.garbage(op, format!("{} bytes", r.len())));
        }
        Ok(())
    }

    fn set_irqs(&mut self, index: u32, set: IrqSet<'_>) -> Result<(), TransportError> {
        let trigger = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        match set {
            IrqSet::Trigger(fds) => {
                // As many eventfds per message as the server takes.
                for (k, chunk) in fds.chunks(self.max_fds).enumerate() {
                    let start = (k * self.max_fds) as u32;
                    self.set_irqs_raw(index, trigger, start, chunk.len() as u32, chunk)?;
                }
                Ok(())
            }
            IrqSet::Disable => self.set_irqs_raw(
                index,
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                0,
                &[],
            ),
            IrqSet::UnmaskOn(fd) => self.set_irqs_raw(
                index,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
                0,
                1,
                &[fd],
            ),
        }
    }

    fn dma_needs_fd(&self) -> bool {
        true
    }

    fn dma_map(&mut self, region: &DmaRegion<'_>) -> Result<(), TransportError> {
        let op = "DMA_MAP";
        let Some((fd, offset)) = region.file else {
            return Err(TransportError::Invalid {
                op,
                detail: "guest memory has no file descriptor to share".into(),
            });
        };
        let mut p = Vec::with_capacity(32);
        p.extend_from_slice(&32u32.to_le_bytes());
        p.extend_from_slice(&DMA_READ_WRITE.to_le_bytes());
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&region.iova.to_le_bytes());
        p.extend_from_slice(&region.size.to_le_bytes());
        self.request(op, CMD_DMA_MAP, &p, &[fd.as_raw_fd()])
            .map(drop)
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), TransportError> {
        let mut p = Vec::with_capacity(24);
        p.extend_from_slice(&24u32.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&iova.to_le_bytes());
        p.extend_from_slice(&size.to_le_bytes());
        self.request("DMA_UNMAP", CMD_DMA_UNMAP, &p, &[]).map(drop)
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        self.request("DEVICE_RESET", CMD_DEVICE_RESET, &[], &[])
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn finds_numbers_in_the_capabilities_json() {
        let j = r#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size": 1048576,"migration":{"pgsize":4096}}}"#;
        assert_eq!(json_number(j, "max_msg_fds"), Some(1));
        assert_eq!(json_number(j, "max_data_xfer_size"), Some(1 << 20));
        assert_eq!(json_number(j, "absent"), None);
        assert_eq!(json_number(r#"{"max_msg_fds":"x"}"#, "max_msg_fds"), None);
    }

    /// A server that answers the version handshake, then runs `then` on
    /// the stream.
    fn server(
        then: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (PathBuf, std::thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!(
            "pt-user-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&dir);
        let listener = UnixListener::bind(&dir).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut hdr = [0u8; 16];
            s.read_exact(&mut hdr).unwrap();
            let size = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
            let mut body = vec![0u8; size - 16];
            s.read_exact(&mut body).unwrap();
            let json = b"{\"capabilities\":{\"max_msg_fds\":4}}\0";
            let mut reply = Vec::new();
            reply.extend_from_slice(&hdr[0..4]);
            reply.extend_from_slice(&((16 + 4 + json.len()) as u32).to_le_bytes());
            reply.extend_from_slice(&FLAG_REPLY.to_le_bytes());
            reply.extend_from_slice(&0u32.to_le_bytes());
            reply.extend_from_slice(&[0, 0, 0, 0]);
            reply.extend_from_slice(json);
            s.write_all(&reply).unwrap();
            then(s);
        });
        (dir, h)
    }

    #[test]
    fn a_reply_to_another_message_kills_the_connection() {
        let (path, h) = server(|mut s| {
            let mut hdr = [0u8; 32];
            s.read_exact(&mut hdr).unwrap();
            // Reply with the wrong message ID.
            let mut reply = hdr;
            reply[0] ^= 0x55;
            reply[4..8].copy_from_slice(&32u32.to_le_bytes());
            reply[8..12].copy_from_slice(&FLAG_REPLY.to_le_bytes());
            s.write_all(&reply).unwrap();
        });
        let mut t = UserTransport::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(t.max_fds, 4);
        let e = t.device_info().unwrap_err();
        assert!(e.is_fatal(), "{e}");
        // Dead: the next request fails without touching the socket.
        assert!(t.reset().unwrap_err().is_fatal());
        h.join().unwrap();
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_silent_server_times_out_and_a_closed_one_is_disconnected() {
        let (path, h) = server(|s| {
            std::thread::sleep(Duration::from_millis(300));
            drop(s);
        });
        let mut t = UserTransport::connect(&path, Duration::from_millis(50)).unwrap();
        let e = t.reset().unwrap_err();
        assert!(matches!(e, TransportError::Io { .. }), "{e}");
        h.join().unwrap();
        let _ = std::fs::remove_file(&path);

        let (path, h) = server(drop);
        let mut t = UserTransport::connect(&path, Duration::from_secs(5)).unwrap();
        h.join().unwrap();
        let mut b = [0u8; 4];
        let e = t.region_read(7, 0, &mut b).unwrap_err();
        assert!(e.is_fatal(), "{e}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn an_error_reply_is_a_refusal_not_a_dead_device() {
        let (path, h) = server(|mut s| {
            let mut hdr = [0u8; 16];
            s.read_exact(&mut hdr).unwrap();
            let mut reply = hdr;
            reply[4..8].copy_from_slice(&16u32.to_le_bytes());
            reply[8..12].copy_from_slice(&(FLAG_REPLY | FLAG_ERROR).to_le_bytes());
            reply[12..16].copy_from_slice(&22u32.to_le_bytes());
            s.write_all(&reply).unwrap();
            let mut hdr = [0u8; 16];
            s.read_exact(&mut hdr).unwrap();
            let mut reply = hdr;
            reply[8..12].copy_from_slice(&FLAG_REPLY.to_le_bytes());
            s.write_all(&reply).unwrap();
        });
        let mut t = UserTransport::connect(&path, Duration::from_secs(5)).unwrap();
        let e = t.reset().unwrap_err();
        assert!(
            matches!(e, TransportError::Refused { errno: 22, .. }),
            "{e}"
        );
        assert!(!e.is_fatal());
        t.reset().unwrap();
        h.join().unwrap();
        let _ = std::fs::remove_file(path);
    }
}
