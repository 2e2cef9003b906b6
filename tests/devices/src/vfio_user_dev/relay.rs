//! The front thread: accepts clients one after another and relays whole
//! vfio-user messages (16-byte header, body of `message_size - 16` bytes,
//! and the file descriptors that came with them) between each client and
//! the back thread's server, applying the protocol-level misbehaviours on
//! the way back. Every wait also watches the stop event.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{lock, Behaviour, Stats, Stop};

/// Bytes of a message header.
const HEADER: usize = 16;
/// Largest message relayed: a 1 MiB region access plus its header.
const MAX_MESSAGE: usize = (1 << 20) + 64;
/// Most file descriptors one message may carry.
const MAX_FDS: usize = 16;
/// Header flag: no reply wanted.
const FLAG_NO_REPLY: u32 = 1 << 4;
/// Header flag: the reply is an error.
const FLAG_ERROR: u32 = 1 << 5;
/// Command number of a region read, and the config space region index.
const CMD_REGION_READ: u16 = 9;
const CONFIG_REGION: u32 = 7;

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("stop requested")]
    Stopped,
    #[error("peer closed the connection in the middle of a message")]
    Truncated,
    #[error("message size {0} is out of range")]
    BadSize(usize),
    #[error("a message carries more than {MAX_FDS} file descriptors")]
    TooManyFds,
    #[error("{what} failed")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// One relayed message.
struct Message {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    fn u32_at(&self, off: usize) -> u32 {
        let b = &self.bytes[off..off + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn set_u32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn command(&self) -> u16 {
        self.u16_at(2)
    }

    fn flags(&self) -> u32 {
        self.u32_at(8)
    }
}

/// What `wait` found.
#[derive(PartialEq, Eq)]
enum Ready {
    First,
    Second,
}

/// Waits until `fds[i]` has `events`, or the stop event fires.
fn wait(stop: &Stop, fds: &[(RawFd, i16)]) -> Result<Ready, Error> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    pfds.push(libc::pollfd {
        fd: stop.fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd entries.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io {
                what: "poll",
                source: e,
            });
        }
        if stop.requested() || pfds[pfds.len() - 1].revents != 0 {
            return Err(Error::Stopped);
        }
        // Readiness includes hang-up and error: the next I/O reports them.
        if pfds[0].revents != 0 {
            return Ok(Ready::First);
        }
        if pfds.len() > 2 && pfds[1].revents != 0 {
            return Ok(Ready::Second);
        }
    }
}

/// A non-blocking connection whose I/O waits with the stop event in view.
struct Conn<'a> {
    sock: UnixStream,
    stop: &'a Stop,
}

fn would_block(e: &vmm_sys_util::errno::Error) -> bool {
    matches!(e.errno(), libc::EAGAIN | libc::EINTR)
}

impl<'a> Conn<'a> {
    fn new(sock: UnixStream, stop: &'a Stop) -> Result<Conn<'a>, Error> {
        sock.set_nonblocking(true)
            .map_err(io_err("set_nonblocking"))?;
        Ok(Conn { sock, stop })
    }

    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Fills `buf`, collecting descriptors into `fds`. Ok(false) when the
    /// peer closed before the first byte.
    fn fill(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<bool, Error> {
        let mut got = 0;
        while got < buf.len() {
            let mut raw = [0 as RawFd; MAX_FDS];
            let mut iov = [libc::iovec {
                iov_base: buf[got..].as_mut_ptr().cast(),
                iov_len: buf.len() - got,
            }];
            // SAFETY: the iovec covers the unfilled, writable part of `buf`.
            let r = unsafe { self.sock.recv_with_fds(&mut iov, &mut raw) };
            match r {
                Ok((0, _)) if got == 0 => return Ok(false),
                Ok((0, _)) => return Err(Error::Truncated),
                Ok((n, nfds)) => {
                    got += n;
                    for &fd in &raw[..nfds] {
                        // SAFETY: recvmsg handed over `nfds` new descriptors
                        // that nothing else owns.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                    if fds.len() > MAX_FDS {
                        return Err(Error::TooManyFds);
                    }
                }
                Err(e) if would_block(&e) => {
                    wait(self.stop, &[(self.fd(), libc::POLLIN)])?;
                }
                Err(e) => {
                    return Err(Error::Io {
                        what: "recvmsg",
                        source: io::Error::from_raw_os_error(e.errno()),
                    })
                }
            }
        }
        Ok(true)
    }

    /// The next whole message, or None when the peer closed between
    /// messages.
    fn recv(&self) -> Result<Option<Message>, Error> {
        let mut bytes = vec![0u8; HEADER];
        let mut fds = Vec::new();
        if !self.fill(&mut bytes, &mut fds)? {
            return Ok(None);
        }
        let size = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        if !(HEADER..=MAX_MESSAGE).contains(&size) {
            return Err(Error::BadSize(size));
        }
        bytes.resize(size, 0);
        if !self.fill(&mut bytes[HEADER..], &mut fds)? {
            return Err(Error::Truncated);
        }
        Ok(Some(Message { bytes, fds }))
    }

    /// Sends `m`, its descriptors with the first bytes.
    fn send(&self, m: &Message) -> Result<(), Error> {
        let raw: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
        let mut sent = 0;
        while sent < m.bytes.len() {
            let fds: &[RawFd] = if sent == 0 { &raw } else { &[] };
            match self.sock.send_with_fds(&[&m.bytes[sent..]], fds) {
                Ok(n) => sent += n,
                Err(e) if would_block(&e) => {
                    wait(self.stop, &[(self.fd(), libc::POLLOUT)])?;
                }
                Err(e) => {
                    return Err(Error::Io {
                        what: "sendmsg",
                        source: io::Error::from_raw_os_error(e.errno()),
                    })
                }
            }
        }
        Ok(())
    }
}

/// The relay's configuration and shared state.
pub struct Relay {
    behaviour: Behaviour,
    stop: Arc<Stop>,
    stats: Arc<Mutex<Stats>>,
    backend: SocketAddr,
}

/// A small deterministic generator for garbage bytes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

impl Relay {
    pub fn new(
        behaviour: Behaviour,
        stop: Arc<Stop>,
        stats: Arc<Mutex<Stats>>,
        backend: SocketAddr,
    ) -> Relay {
        Relay {
            behaviour,
            stop,
            stats,
            backend,
        }
    }

    /// Serves clients of `listener` (non-blocking) until stopped.
    pub fn run(self, listener: UnixListener) {
        loop {
            match wait(&self.stop, &[(listener.as_raw_fd(), libc::POLLIN)]) {
                Ok(_) => {}
                Err(Error::Stopped) => return,
                Err(e) => {
                    log::warn!("test device: {e}");
                    return;
                }
            }
            match listener.accept() {
                Ok((client, _)) => {
                    lock(&self.stats).clients += 1;
                    match self.serve(client) {
                        Ok(()) => {}
                        Err(Error::Stopped) => return,
                        Err(e) => log::debug!("test device: session ended: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    log::warn!("test device: accept failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }

    /// Relays one session. Dropping both connections ends the back
    /// thread's session too.
    fn serve(&self, client: UnixStream) -> Result<(), Error> {
        let client = Conn::new(client, &self.stop)?;
        let server = UnixStream::connect_addr(&self.backend).map_err(io_err("connect"))?;
        let server = Conn::new(server, &self.stop)?;
        let mut requests = 0usize;
        let mut replies = 0usize;
        // Replies owed for requests that asked for one.
        let mut owed = 0usize;
        loop {
            let ready = wait(
                &self.stop,
                &[(client.fd(), libc::POLLIN), (server.fd(), libc::POLLIN)],
            )?;
            if ready == Ready::First {
                if self.behaviour == Behaviour::DisconnectAfter(requests) {
                    // Answer what was asked, then hang up on the next one.
                    while owed > 0 {
                        let Some(reply) = server.recv()? else {
                            return Ok(());
                        };
                        owed -= 1;
                        replies += 1;
                        client.send(&self.transform(reply, replies))?;
                    }
                    return Ok(());
                }
                let Some(request) = client.recv()? else {
                    return Ok(());
                };
                requests += 1;
                if request.flags() & FLAG_NO_REPLY == 0 {
                    owed += 1;
                }
                server.send(&request)?;
            } else {
                let Some(reply) = server.recv()? else {
                    return Ok(());
                };
                owed = owed.saturating_sub(1);
                replies += 1;
                client.send(&self.transform(reply, replies))?;
            }
        }
    }

    /// Applies the behaviour to reply number `n` (from 1) of a session.
    fn transform(&self, mut m: Message, n: usize) -> Message {
        match self.behaviour {
            Behaviour::GarbageReplies if n > 1 => {
                let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ n as u64);
                for b in &mut m.bytes {
                    *b = rng.next() as u8;
                }
                m.fds.clear();
            }
            Behaviour::ShortConfigReads
                if m.command() == CMD_REGION_READ
                    && m.flags() & FLAG_ERROR == 0
                    && m.bytes.len() >= 32
                    && m.u32_at(24) == CONFIG_REGION =>
            {
                let count = m.u32_at(28) as usize;
                let short = count.min(m.bytes.len() - 32) / 2;
                m.set_u32(28, short as u32);
                m.set_u32(4, (32 + short) as u32);
                m.bytes.truncate(32 + short);
            }
            _ => {}
        }
        m
    }
}
