//! A vhost-user NIC's control queue, kept in ringvm (as QEMU keeps it for
//! vhost-user backends): one thread per active device reads the queue's
//! kick eventfd, runs each command through [`crate::net::ctrl`], and turns
//! "use N queue pairs" into SET_VRING_ENABLE of the backend's data vrings.
//! Only MQ commands are accepted (CTRL_RX and CTRL_MAC_ADDR are not
//! offered: a backend's receive filter cannot be programmed).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::net::ctrl::{handle, CtrlFeatures, Effect, RxFilter, VIRTIO_NET_ERR, VIRTIO_NET_OK};
use crate::ratelimit::RateLimitedLog;

/// Largest command read (MQ commands are 4 bytes).
const MAX_COMMAND: usize = 4096;

/// Applies a number of active queue pairs; false when it failed.
pub type SetPairs = Box<dyn Fn(u16) -> bool + Send>;

/// The running control-queue thread.
pub struct CtrlQueue {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

struct Ctx {
    mem: GuestMemoryMmap,
    queue: Queue,
    kick: EventFd,
    call: Option<EventFd>,
    features: CtrlFeatures,
    set_pairs: SetPairs,
    log: Arc<RateLimitedLog>,
}

/// What the control queue is served with.
pub struct CtrlSetup {
    /// Where refused commands are logged (guest-caused: rate-limited).
    pub log: Arc<RateLimitedLog>,
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub kick: EventFd,
    /// The queue's MSI-X vector eventfd, if the driver gave it one.
    pub call: Option<EventFd>,
    pub max_pairs: u16,
    pub set_pairs: SetPairs,
}

impl CtrlQueue {
    pub fn start(name: &str, setup: CtrlSetup) -> std::io::Result<CtrlQueue> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let ctx = Ctx {
            mem: setup.mem,
            queue: setup.queue,
            kick: setup.kick,
            call: setup.call,
            features: CtrlFeatures {
                rx: false,
                mac_addr: false,
                mq: true,
                max_pairs: setup.max_pairs,
            },
            set_pairs: setup.set_pairs,
            log: setup.log,
        };
        let thread = {
            let stop = stop.clone();
            let wake = wake.try_clone()?;
            std::thread::Builder::new()
                .name(format!("{name}-ctrl"))
                .spawn(move || serve(ctx, &stop, &wake))?
        };
        Ok(CtrlQueue {
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for CtrlQueue {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for a kick or the wake-up; false on wake-up (stop).
fn wait(kick: &EventFd, wake: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if fds[1].revents != 0 || n < 0 {
            return false;
        }
        let _ = kick.read();
        return true;
    }
}

/// One command: the readable part, then a writable ack byte.
fn command(
    ctx: &mut Ctx,
    filter: &mut RxFilter,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> (u16, u32) {
    let head = chain.head_index();
    let mut bytes = Vec::new();
    let mut ack = None;
    let mut malformed = false;
    for desc in chain {
        if desc.is_write_only() {
            if desc.len() > 0 {
                ack = Some(desc.addr().unchecked_add(u64::from(desc.len()) - 1));
            }
        } else if ack.is_some() || bytes.len() + desc.len() as usize > MAX_COMMAND {
            malformed = true;
        } else {
            let start = bytes.len();
            bytes.resize(start + desc.len() as usize, 0);
            malformed |= ctx
                .mem
                .read_slice(&mut bytes[start..], desc.addr())
                .is_err();
        }
    }
    let status = if malformed {
        Err("malformed chain".to_string())
    } else {
        match handle(&bytes, ctx.features, filter) {
            Ok(Effect::None) => Ok(()),
            Ok(Effect::QueuePairs(n)) if (ctx.set_pairs)(n) => Ok(()),
            Ok(Effect::QueuePairs(n)) => {
                Err(format!("the backend did not switch to {n} queue pairs"))
            }
            Err(e) => Err(e.to_string()),
        }
    };
    let code = match status {
        Ok(()) => VIRTIO_NET_OK,
        Err(why) => {
            ctx.log.warn(format_args!("control command refused: {why}"));
            VIRTIO_NET_ERR
        }
    };
    let written = match ack {
        Some(addr) if ctx.mem.write_obj(code, addr).is_ok() => 1,
        _ => 0,
    };
    (head, written)
}

fn serve(mut ctx: Ctx, stop: &AtomicBool, wake: &EventFd) {
    uring_backend::iothread::block_process_signals();
    let mut filter = RxFilter::new([0; 6]);
    while wait(&ctx.kick, wake) {
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let mem = ctx.mem.clone();
            if ctx.queue.disable_notification(&mem).is_err() {
                return;
            }
            let mut done = Vec::new();
            while let Some(chain) = ctx.queue.pop_descriptor_chain(&mem) {
                done.push(command(&mut ctx, &mut filter, chain));
            }
            for (head, len) in done {
                if ctx.queue.add_used(&mem, head, len).is_err() {
                    ctx.log
                        .warn(format_args!("control queue: used ring not writable"));
                }
            }
            if ctx.queue.needs_notification(&mem).unwrap_or(true) {
                if let Some(call) = &ctx.call {
                    let _ = call.write(1);
                }
            }
            match ctx.queue.enable_notification(&mem) {
                Ok(false) | Err(_) => break,
                Ok(true) => {}
            }
        }
    }
}
