//! Feeds arbitrary bytes to the daemon as a vhost-user front-end would:
//! over a real connection to a [`Listener`], served by
//! [`crate::serve_connection`] exactly as `ringvm-blk` serves one, with a
//! real [`BlockDevice`] (on a scratch file) and io_uring iothread behind it.
//! The `vhost_user_messages` fuzz target and the tests use it.
//!
//! # Input format
//!
//! ```text
//! fill: u16 LE, then `fill` bytes   copied to the start of the shared memory
//! then, repeated to the end:
//!   control: u8                     bits 0-1: copies of the shared-memory fd
//!                                   bits 2-3: fresh eventfds
//!                                   bit 4: after sending, write 1 to every
//!                                          eventfd sent so far (a kick)
//!                                   bit 5: then wait (up to the
//!                                          replayer's wait time) until the
//!                                          u16 at offset 0x3002 of the
//!                                          shared memory is not 0 (the used
//!                                          index of [`sample_session`]'s
//!                                          ring): a front-end waiting for
//!                                          its request
//!   header: 12 bytes                request, flags, size (u32 LE each)
//!   body: `size` bytes              (or what is left of the input)
//! ```
//!
//! The fds ride on the header (SCM_RIGHTS), which is how a front-end sends
//! them. Once the input is exhausted the writing half of the connection is
//! shut down; the replies are read and thrown away, and the call returns
//! when the daemon has ended the connection and stopped the device.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use uring_backend::iothread::IoThread;
use vhost::vhost_user::Listener;
use virtio::blk::{BlockDevice, DiskConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Size of the memfd offered as front-end memory.
pub const SHARED_MEMORY: u64 = 256 << 10;
/// Size of the scratch disk.
const DISK: u64 = 1 << 20;
const HEADER: usize = 12;
/// The most fds one message may carry (vhost-user's limit is 32).
const MAX_FDS: usize = 6;

static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// A daemon (device, iothread, listening socket) that takes one replayed
/// connection after another, as `ringvm-blk` takes front-ends.
pub struct Replayer {
    dir: PathBuf,
    socket: PathBuf,
    listener: Listener,
    device: Arc<Mutex<BlockDevice>>,
    memory: File,
    wait: Duration,
    _iothreads: Vec<Arc<IoThread>>,
}

impl Replayer {
    /// A daemon on a scratch disk (2 queues) in a fresh directory under
    /// the system's temporary directory.
    pub fn new() -> Result<Replayer> {
        let dir = std::env::temp_dir().join(format!(
            "ringvm-blk-replay-{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let disk = dir.join("disk.img");
        File::create(&disk)
            .and_then(|f| f.set_len(DISK))
            .with_context(|| format!("creating {}", disk.display()))?;
        let config = DiskConfig::parse(&format!("path={},queues=2,serial=replay", disk.display()))?;
        let iothreads = vec![Arc::new(
            IoThread::spawn("replay-io", 64).context("starting the iothread")?,
        )];
        let device = BlockDevice::new("vhost-user-blk", &config, &iothreads)?;
        let socket = dir.join("vhost.sock");
        let listener = Listener::new(&socket, true).context("listening")?;
        // SAFETY: the name is a valid NUL-terminated string; the returned
        // fd (checked below) is owned by nothing else.
        let fd = unsafe { libc::memfd_create(c"replay-memory".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("memfd_create");
        }
        // SAFETY: `fd` is a fresh fd this File becomes the only owner of.
        let memory = unsafe { File::from_raw_fd(fd) };
        Ok(Replayer {
            dir,
            socket,
            listener,
            device: Arc::new(Mutex::new(device)),
            memory,
            wait: Duration::from_secs(1),
            _iothreads: iothreads,
        })
    }

    /// How long a message with control bit 5 waits at most (default 1 s).
    pub fn set_wait(&mut self, wait: Duration) {
        self.wait = wait;
    }

    /// Replays one input (see the module doc) as one front-end connection.
    pub fn feed(&mut self, input: &[u8]) -> Result<()> {
        // Fresh, zeroed shared memory, then the input's fill.
        self.memory.set_len(0)?;
        self.memory.set_len(SHARED_MEMORY)?;
        let (fill, mut rest) = match input {
            [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
            _ => (0, &[][..]),
        };
        let fill = fill.min(rest.len());
        std::os::unix::fs::FileExt::write_all_at(&self.memory, &rest[..fill], 0)?;
        rest = &rest[fill..];
        let messages = rest.to_vec();

        let stream = UnixStream::connect(&self.socket).context("connecting")?;
        let mut replies = stream.try_clone()?;
        let memory = self.memory.try_clone()?;
        let wait = self.wait;
        let reader = std::thread::spawn(move || {
            let mut sink = [0u8; 4096];
            while matches!(replies.read(&mut sink), Ok(n) if n > 0) {}
        });
        let writer = std::thread::spawn(move || {
            let _ = send_messages(&stream, &memory, &messages, wait);
            let _ = stream.shutdown(std::net::Shutdown::Write);
        });
        let served = crate::serve_connection(&mut self.listener, &self.device, |_| {});
        let _ = writer.join();
        let _ = reader.join();
        served
    }
}

impl Replayer {
    /// The scratch disk the device serves.
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
}

impl Drop for Replayer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends the messages part of an input; stops at the first failed send
/// (the daemon has closed the connection).
fn send_messages(
    stream: &UnixStream,
    memory: &File,
    mut input: &[u8],
    wait: Duration,
) -> io::Result<()> {
    let mut eventfds: Vec<EventFd> = Vec::new();
    while let [control, rest @ ..] = input {
        let header = &rest[..rest.len().min(HEADER)];
        let size = match header {
            [_, _, _, _, _, _, _, _, a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]) as usize,
            _ => 0,
        };
        let body = &rest[header.len()..];
        let body = &body[..body.len().min(size)];
        input = &rest[header.len() + body.len()..];

        let mut fds: Vec<RawFd> = Vec::new();
        for _ in 0..(control & 3) {
            fds.push(memory.as_raw_fd());
        }
        for _ in 0..((control >> 2) & 3) {
            let e = EventFd::new(EFD_NONBLOCK)?;
            fds.push(e.as_raw_fd());
            eventfds.push(e);
        }
        send(stream, header, &fds)?;
        if !body.is_empty() {
            send(stream, body, &[])?;
        }
        if control & 0x10 != 0 {
            for e in &eventfds {
                let _ = e.write(1);
            }
        }
        if control & 0x20 != 0 {
            let deadline = Instant::now() + wait;
            let mut idx = [0u8; 2];
            while std::os::unix::fs::FileExt::read_exact_at(memory, &mut idx, USED + 2).is_ok()
                && idx == [0, 0]
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    Ok(())
}

/// One `sendmsg` of all of `data` (retried for the rest on a short write)
/// with `fds` attached to its first byte; never raises SIGPIPE.
fn send(stream: &UnixStream, mut data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let fds = &fds[..fds.len().min(MAX_FDS)];
    let mut first = true;
    while !data.is_empty() {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // Room for MAX_FDS ints, aligned for cmsghdr.
        let mut control = [0u64; 8];
        // SAFETY: msghdr is plain data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if first && !fds.is_empty() {
            let payload = std::mem::size_of_val(fds) as u32;
            // SAFETY: CMSG_SPACE only computes a size.
            let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: `msg` points at `control`, which is at least `space`
            // (<= 64) bytes long, so the first header and its `payload`
            // bytes of data lie inside it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        // SAFETY: `msg` describes `data` (read-only for sendmsg) and, when
        // set, `control`; both outlive the call.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        first = false;
        data = &data[(n as usize).min(data.len())..];
    }
    Ok(())
}

/// Where [`sample_session`] puts things in the shared memory (guest
/// physical address = offset in the memfd).
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const REQ_HEADER: u64 = 0x4000;
const DATA: u64 = 0x5000;
const STATUS: u64 = 0x6000;
/// The front-end's virtual address of guest physical 0.
const USER_BASE: u64 = 0x7f00_0000_0000;

/// The byte [`sample_session`] writes to sector 1 of the disk.
pub const SAMPLE_PATTERN: u8 = 0xa5;

fn message(out: &mut Vec<u8>, control: u8, request: u32, body: &[u8]) {
    out.push(control);
    out.extend_from_slice(&request.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes()); // version 1, no reply flag
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

fn words(values: &[u64], u32s: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in u32s {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for v in values {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// A well-formed input: the handshake a front-end does (features, memory
/// table, queue 0's size, addresses, base, kick, call, enable), with one
/// virtio-blk write of a sector of [`SAMPLE_PATTERN`] to sector 1 in the
/// shared memory, then `GET_VRING_BASE`. The seed of the fuzz corpus, and
/// the test that the replayed path reaches the disk.
pub fn sample_session() -> Vec<u8> {
    let mut mem = vec![0u8; 0x6001];
    let desc = |mem: &mut Vec<u8>, i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let at = (DESC + 16 * i) as usize;
        mem[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        mem[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        mem[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        mem[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    };
    desc(&mut mem, 0, REQ_HEADER, 16, 1, 1); // NEXT
    desc(&mut mem, 1, DATA, 512, 1, 2); // NEXT
    desc(&mut mem, 2, STATUS, 1, 2, 0); // WRITE
    let h = REQ_HEADER as usize;
    mem[h..h + 4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
    mem[h + 8..h + 16].copy_from_slice(&1u64.to_le_bytes()); // sector 1
    mem[DATA as usize..DATA as usize + 512].fill(SAMPLE_PATTERN);
    let a = AVAIL as usize;
    mem[a + 2..a + 4].copy_from_slice(&1u16.to_le_bytes()); // idx 1
    mem[STATUS as usize] = 0xff;

    let mut out = (mem.len() as u16).to_le_bytes().to_vec();
    out.extend_from_slice(&mem);
    const VERSION_1: u64 = 1 << 32;
    const PROTOCOL_FEATURES: u64 = 1 << 30;
    message(&mut out, 0, 3, &[]); // SET_OWNER
    message(&mut out, 0, 1, &[]); // GET_FEATURES
    message(
        &mut out,
        0,
        2,
        &words(&[VERSION_1 | PROTOCOL_FEATURES], &[]),
    ); // SET_FEATURES
    message(&mut out, 0, 15, &[]); // GET_PROTOCOL_FEATURES
    message(&mut out, 0, 16, &words(&[0x200], &[])); // SET_PROTOCOL_FEATURES: CONFIG
    let mut get_config = words(&[], &[0, 60, 0]); // GET_CONFIG, 60 bytes at 0
    get_config.resize(12 + 60, 0);
    message(&mut out, 0, 24, &get_config);
    // SET_MEM_TABLE: one region, guest 0, the whole memfd.
    message(
        &mut out,
        1,
        5,
        &words(&[0, SHARED_MEMORY, USER_BASE, 0], &[1, 0]),
    );
    message(&mut out, 0, 8, &words(&[], &[0, 16])); // SET_VRING_NUM 16
    message(
        &mut out,
        0,
        9,
        &words(
            &[USER_BASE + DESC, USER_BASE + USED, USER_BASE + AVAIL, 0],
            &[0, 0],
        ),
    ); // SET_VRING_ADDR
    message(&mut out, 0, 10, &words(&[], &[0, 0])); // SET_VRING_BASE 0
    message(&mut out, 1 << 2, 12, &words(&[0], &[])); // SET_VRING_KICK + eventfd
    message(&mut out, 1 << 2, 13, &words(&[0], &[])); // SET_VRING_CALL + eventfd
                                                      // SET_VRING_ENABLE, then kick and wait for the request to complete.
    message(&mut out, 0x30, 18, &words(&[], &[0, 1]));
    message(&mut out, 0, 11, &words(&[], &[0, 0])); // GET_VRING_BASE
    out
}
