//! A scripted vhost-user-blk backend for front-end tests: it answers the
//! control messages from a script (features, protocol features, queue
//! count, configuration space, an inflight region) without serving any
//! queue, records every message it got (and the identity of every file it
//! was sent), and can lie: garbage, a reply to the wrong request, a short
//! configuration reply, silence, or a hangup after a given request.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub const GET_FEATURES: u32 = 1;
pub const SET_FEATURES: u32 = 2;
pub const SET_OWNER: u32 = 3;
pub const SET_MEM_TABLE: u32 = 5;
pub const SET_VRING_NUM: u32 = 8;
pub const SET_VRING_ADDR: u32 = 9;
pub const SET_VRING_BASE: u32 = 10;
pub const GET_VRING_BASE: u32 = 11;
pub const SET_VRING_KICK: u32 = 12;
pub const SET_VRING_CALL: u32 = 13;
pub const GET_PROTOCOL_FEATURES: u32 = 15;
pub const SET_PROTOCOL_FEATURES: u32 = 16;
pub const GET_QUEUE_NUM: u32 = 17;
pub const SET_VRING_ENABLE: u32 = 18;
pub const GET_CONFIG: u32 = 24;
pub const GET_INFLIGHT_FD: u32 = 31;
pub const SET_INFLIGHT_FD: u32 = 32;
pub const GET_MAX_MEM_SLOTS: u32 = 36;
pub const ADD_MEM_REG: u32 = 37;

pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_VERSION_1: u64 = 1 << 32;
pub const PF_MQ: u64 = 1 << 0;
pub const PF_REPLY_ACK: u64 = 1 << 3;
pub const PF_CONFIG: u64 = 1 << 9;
pub const PF_INFLIGHT_SHMFD: u64 = 1 << 12;
pub const PF_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;

const NEED_REPLY: u32 = 0x8;
const REPLY: u32 = 0x4;
const VERSION: u32 = 0x1;
const INFLIGHT_SIZE: u64 = 4096;

/// How the backend misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lie {
    None,
    /// Answers request `code` with 64 bytes of garbage.
    Garbage(u32),
    /// Answers request `code` as if it were another request.
    WrongReply(u32),
    /// Answers GET_CONFIG with fewer bytes than asked for.
    ShortConfig,
    /// Never answers request `code` (the front-end's deadline must fire).
    Silent(u32),
    /// Closes the first connection after handling request `code` (later
    /// connections behave).
    HangupAfter(u32),
}

/// What the backend says.
#[derive(Clone, Debug)]
pub struct Script {
    pub features: u64,
    pub protocol: u64,
    pub queue_num: u64,
    pub config: Vec<u8>,
    pub lie: Lie,
}

/// One message received.
#[derive(Clone, Debug)]
pub struct Received {
    /// Which connection (0 = the first).
    pub conn: usize,
    pub code: u32,
    pub body: Vec<u8>,
    /// (st_dev, st_ino) of each file that came with it.
    pub files: Vec<(u64, u64)>,
}

/// The running backend; it stops when the socket is gone and the
/// front-end has hung up.
pub struct ScriptedBackend {
    log: Arc<Mutex<Vec<Received>>>,
    _thread: JoinHandle<()>,
    /// The inflight memfd handed out (its identity, for checks).
    pub inflight: (u64, u64),
}

fn identity(fd: RawFd) -> (u64, u64) {
    // SAFETY: fstat writes only the struct passed; `fd` is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return (0, 0);
    }
    (st.st_dev, st.st_ino)
}

/// Receives `buf.len()` bytes and any fds that came with them.
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<Vec<OwnedFd>> {
    let mut cmsg = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; the fields set below are valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: `msg` points at live buffers for the whole call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_WAITALL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != buf.len() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control buffer the kernel filled, with the
    // CMSG macros and within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok(fds)
}

/// Sends `data` with one fd attached.
fn send_with_fd(sock: &UnixStream, data: &[u8], fd: RawFd) -> io::Result<()> {
    let mut cmsg = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; the fields set below are valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
    // SAFETY: the control buffer holds one cmsg with one fd.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        libc::CMSG_DATA(c).cast::<RawFd>().write_unaligned(fd);
    }
    // SAFETY: `msg` points at live buffers for the whole call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n as usize != data.len() {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn header(code: u32, size: usize) -> Vec<u8> {
    let mut h = code.to_le_bytes().to_vec();
    h.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
    h.extend_from_slice(&(size as u32).to_le_bytes());
    h
}

fn reply(code: u32, body: &[u8]) -> Vec<u8> {
    let mut m = header(code, body.len());
    m.extend_from_slice(body);
    m
}

struct Conn<'a> {
    script: &'a Script,
    inflight: &'a File,
    first: bool,
}

impl Conn<'_> {
    /// Handles one connection; returns when it ends.
    fn serve(&self, mut sock: UnixStream, conn: usize, log: &Mutex<Vec<Received>>) {
        let mut acked_protocol = 0u64;
        loop {
            let mut hdr = [0u8; 12];
            let Ok(hdr_fds) = recv_with_fds(&sock, &mut hdr) else {
                return;
            };
            let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
            let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
            let mut body = vec![0u8; size.min(4096)];
            let body_fds = if size > 0 {
                match recv_with_fds(&sock, &mut body) {
                    Ok(f) => f,
                    Err(_) => return,
                }
            } else {
                Vec::new()
            };
            let files = hdr_fds
                .iter()
                .chain(&body_fds)
                .map(|f| identity(f.as_raw_fd()))
                .collect();
            log.lock().unwrap().push(Received {
                conn,
                code,
                body: body.clone(),
                files,
            });
            let lie = if self.first || !matches!(self.script.lie, Lie::HangupAfter(_)) {
                self.script.lie
            } else {
                Lie::None
            };
            match lie {
                Lie::Silent(c) if c == code => {
                    // Hold the connection open without answering.
                    let mut sink = [0u8; 64];
                    while sock.read(&mut sink).is_ok_and(|n| n > 0) {}
                    return;
                }
                Lie::Garbage(c) if c == code => {
                    let _ = sock.write_all(&[0xa5; 64]);
                    continue;
                }
                Lie::WrongReply(c) if c == code => {
                    let _ = sock.write_all(&reply(code + 1, &0u64.to_le_bytes()));
                    continue;
                }
                _ => {}
            }
            let u64_reply = |v: u64| reply(code, &v.to_le_bytes());
            let answered = match code {
                GET_FEATURES => Some(u64_reply(self.script.features)),
                GET_PROTOCOL_FEATURES => Some(u64_reply(self.script.protocol)),
                SET_PROTOCOL_FEATURES => {
                    acked_protocol = u64::from_le_bytes(body[..8].try_into().unwrap_or([0; 8]));
                    None
                }
                GET_QUEUE_NUM => Some(u64_reply(self.script.queue_num)),
                GET_MAX_MEM_SLOTS => Some(u64_reply(8)),
                GET_VRING_BASE => {
                    let mut b = body[..4.min(body.len())].to_vec();
                    b.resize(8, 0);
                    Some(reply(code, &b))
                }
                GET_CONFIG => {
                    let mut cfg = self.script.config.clone();
                    if lie == Lie::ShortConfig {
                        cfg.truncate(cfg.len() / 2);
                    }
                    let mut b = 0u32.to_le_bytes().to_vec();
                    b.extend_from_slice(&(cfg.len() as u32).to_le_bytes());
                    b.extend_from_slice(&0u32.to_le_bytes());
                    b.extend_from_slice(&cfg);
                    Some(reply(code, &b))
                }
                GET_INFLIGHT_FD => {
                    let mut b = INFLIGHT_SIZE.to_le_bytes().to_vec();
                    b.extend_from_slice(&0u64.to_le_bytes());
                    b.extend_from_slice(&body[16..20.min(body.len())]);
                    b.resize(24, 0);
                    if send_with_fd(&sock, &reply(code, &b), self.inflight.as_raw_fd()).is_err() {
                        return;
                    }
                    continue;
                }
                _ if flags & NEED_REPLY != 0 && acked_protocol & PF_REPLY_ACK != 0 => {
                    Some(u64_reply(0))
                }
                _ => None,
            };
            if let Some(r) = answered {
                if sock.write_all(&r).is_err() {
                    return;
                }
            }
            if self.first && lie == Lie::HangupAfter(code) {
                return;
            }
        }
    }
}

impl ScriptedBackend {
    /// Listens on `path` and serves front-ends one after another.
    pub fn start(path: &Path, script: Script) -> ScriptedBackend {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("binding the scripted backend");
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"vhu-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let inflight = unsafe { File::from_raw_fd(fd) };
        inflight.set_len(INFLIGHT_SIZE).unwrap();
        let id = identity(inflight.as_raw_fd());
        let log = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let log = log.clone();
            std::thread::spawn(move || {
                for (conn, sock) in listener.incoming().enumerate() {
                    let Ok(sock) = sock else { return };
                    let c = Conn {
                        script: &script,
                        inflight: &inflight,
                        first: conn == 0,
                    };
                    c.serve(sock, conn, &log);
                }
            })
        };
        ScriptedBackend {
            log,
            _thread: thread,
            inflight: id,
        }
    }

    /// Every message received so far.
    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }
}

/// A plausible virtio-blk configuration space (60 bytes): `sectors`,
/// seg_max 126, blk_size `block_size`, num_queues `queues`.
pub fn blk_config(sectors: u64, block_size: u32, queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&sectors.to_le_bytes());
    c[12..16].copy_from_slice(&126u32.to_le_bytes());
    c[20..24].copy_from_slice(&block_size.to_le_bytes());
    c[34..36].copy_from_slice(&queues.to_le_bytes());
    c
}
