//! What a vfio-user server answers, as ringvm's client reads it: the
//! version handshake and its capabilities JSON, then device, region
//! (with capability chains, a second round for a larger argsz, and a file
//! descriptor) and interrupt information, region reads and writes,
//! interrupt sets, DMA map/unmap and reset. The fuzzer plays the server on
//! one end of a socket pair; the client is `passthrough::user`'s.
//!
//! Input: one byte `n`, then `n % 16` operations of two bytes (which call,
//! its argument), then the replies, each `mode, len (LE u16), payload`.
//! A reply is framed (a correct header echoing the request's ID and
//! command unless `mode` says to lie about them, with the error flag or
//! without the reply flag if it says so, and a file descriptor attached
//! if it says so) or raw bytes after which the server hangs up. When the
//! replies run out the server hangs up too.
//!
//! Checks that nothing panics or hangs, and that once a call failed
//! fatally (the server is gone or spoke garbage) every later call that
//! would talk to it fails.
#![no_main]

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use passthrough::transport::{DmaRegion, IrqSet, Transport};
use passthrough::user::UserTransport;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;

struct Fds {
    events: Vec<EventFd>,
    memfd: OwnedFd,
}

fn fds() -> &'static Fds {
    static FDS: OnceLock<Fds> = OnceLock::new();
    FDS.get_or_init(|| {
        let events = (0..20).map(|_| EventFd::new(0).unwrap()).collect();
        // SAFETY: memfd_create with a valid NUL-terminated name; the
        // returned fd is owned here.
        let fd = unsafe { libc::memfd_create(c"vfio-user-fuzz".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: `fd` was just created and nothing else owns it.
        let memfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Fds { events, memfd }
    })
}

struct Reply<'a> {
    mode: u8,
    payload: &'a [u8],
}

/// Plays the server: one reply per request, in order.
fn serve(mut s: UnixStream, replies: Vec<Reply<'_>>) {
    for r in replies {
        let mut hdr = [0u8; 16];
        if s.read_exact(&mut hdr).is_err() {
            return;
        }
        let size = u32::from_le_bytes(hdr[4..8].try_into().unwrap()) as usize;
        let mut body = vec![0u8; size.saturating_sub(16)];
        if s.read_exact(&mut body).is_err() {
            return;
        }
        if r.mode & 1 != 0 {
            let _ = s.write_all(r.payload);
            return;
        }
        let mut id = u16::from_le_bytes([hdr[0], hdr[1]]);
        let mut cmd = u16::from_le_bytes([hdr[2], hdr[3]]);
        if r.mode & 2 != 0 {
            id ^= 1;
        }
        if r.mode & 4 != 0 {
            cmd = cmd.wrapping_add(1);
        }
        let mut flags = if r.mode & 8 != 0 { 0 } else { FLAG_REPLY };
        if r.mode & 16 != 0 {
            flags |= FLAG_ERROR;
        }
        let mut msg = Vec::with_capacity(16 + r.payload.len());
        msg.extend_from_slice(&id.to_le_bytes());
        msg.extend_from_slice(&cmd.to_le_bytes());
        msg.extend_from_slice(&((16 + r.payload.len()) as u32).to_le_bytes());
        msg.extend_from_slice(&flags.to_le_bytes());
        msg.extend_from_slice(&22u32.to_le_bytes());
        msg.extend_from_slice(r.payload);
        let sent = if r.mode & 32 != 0 {
            s.send_with_fds(&[&msg[..]], &[fds().memfd.as_raw_fd()])
                .map(drop)
                .map_err(|_| ())
        } else {
            s.write_all(&msg).map_err(|_| ())
        };
        if sent.is_err() {
            return;
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&n, rest)) = input.split_first() else {
        return;
    };
    let n = usize::from(n % 16) * 2;
    if rest.len() < n {
        return;
    }
    let (ops, mut rest) = rest.split_at(n);
    let mut replies = Vec::new();
    while rest.len() >= 3 {
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        replies.push(Reply {
            mode: rest[0],
            payload: &rest[3..3 + len],
        });
        rest = &rest[3 + len..];
    }
    let (client, server) = UnixStream::pair().unwrap();
    std::thread::scope(|scope| {
        scope.spawn(move || serve(server, replies));
        let path = Path::new("/fuzz/vfio-user.sock");
        let Ok(mut t) = UserTransport::over_stream(client, path, Duration::from_secs(5)) else {
            return;
        };
        let fds = fds();
        let raw: Vec<RawFd> = fds.events.iter().map(AsRawFd::as_raw_fd).collect();
        let mut dead = false;
        for op in ops.chunks_exact(2) {
            let arg = op[1];
            let index = u32::from(arg % 12);
            let result = match op[0] % 10 {
                0 => t.device_info().map(drop),
                1 => t.region_info(index).map(|r| {
                    let _ = r.mmap_areas();
                }),
                2 => t.irq_info(index % 6).map(drop),
                3 => {
                    let mut buf = vec![0u8; usize::from(arg % 70)];
                    t.region_read(index, u64::from(arg) * 4, &mut buf)
                }
                4 => t.region_write(index, u64::from(arg), &vec![arg; usize::from(arg % 70)]),
                5 => t.set_irqs(index % 6, IrqSet::Trigger(&raw[..usize::from(arg % 20)])),
                6 => t.set_irqs(index % 6, IrqSet::Disable),
                7 => t.set_irqs(index % 6, IrqSet::UnmaskOn(raw[0])),
                8 => {
                    let region = DmaRegion {
                        iova: u64::from(arg) << 12,
                        size: 0x1000,
                        host_addr: 0,
                        file: (arg & 1 == 0).then(|| (fds.memfd.as_fd(), 0)),
                    };
                    if arg & 2 == 0 {
                        t.dma_map(&region)
                    } else {
                        t.dma_unmap(region.iova, region.size)
                    }
                }
                _ => t.reset(),
            };
            // An empty trigger set sends nothing, so it cannot fail.
            let sends = !(op[0] % 10 == 5 && arg % 20 == 0);
            if dead && sends {
                assert!(result.is_err(), "a call succeeded on a dead connection");
            }
            if let Err(e) = result {
                dead |= e.is_fatal();
            }
        }
    });
});
