//! The device's INTx line, with VFIO's semantics for a level-triggered
//! interrupt: while the line is asserted and INTx is unmasked, the device
//! signals the trigger eventfd once and masks INTx itself (automask); an
//! unmask (`SET_IRQS` `ACTION_UNMASK | DATA_NONE`, or a write to the
//! unmask eventfd stored with `ACTION_UNMASK | DATA_EVENTFD`) clears the
//! mask and signals again if the line is still asserted.
//!
//! The unmask eventfd is watched by a thread of its own, because the
//! server thread waits on the socket: it takes the line's lock, as the
//! server thread does for register writes and `SET_IRQS`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::{lock, Stats};

/// The line's state, shared with the unmask watcher.
struct Line {
    asserted: bool,
    masked: bool,
    trigger: Option<File>,
    stats: Arc<Mutex<Stats>>,
}

impl Line {
    /// Signals the trigger if the line is asserted and INTx unmasked, and
    /// masks INTx (VFIO's automask) when it did.
    fn fire(&mut self) {
        if !self.asserted || self.masked {
            return;
        }
        let Some(fd) = &self.trigger else {
            return;
        };
        let mut f: &File = fd;
        match f.write_all(&1u64.to_ne_bytes()) {
            Ok(()) => {
                self.masked = true;
                let mut s = lock(&self.stats);
                s.interrupts += 1;
                s.intx_signals += 1;
            }
            Err(e) => log::warn!("test device: cannot signal INTx: {e}"),
        }
    }

    fn unmask(&mut self) {
        self.masked = false;
        self.fire();
    }
}

/// The thread that unmasks INTx when the unmask eventfd is written.
struct Watcher {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // Never read: the counter cannot overflow with one write.
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(unmask: File, stop: &EventFd, line: &Mutex<Line>) {
    let mut fds = [
        libc::pollfd {
            fd: unmask.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two valid pollfds that live across the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::warn!(
                "test device: INTx unmask watcher: {}",
                io::Error::last_os_error()
            );
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            log::warn!("test device: the INTx unmask eventfd failed");
            return;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let mut buf = [0u8; 8];
            // The eventfd may be non-blocking and drained by someone else
            // meanwhile: then there is nothing to do.
            if (&unmask).read(&mut buf).is_ok() {
                let mut l = lock(line);
                lock(&l.stats).intx_unmasks += 1;
                l.unmask();
            }
        }
    }
}

/// INTx: the line, its eventfds and the unmask watcher.
pub(crate) struct Intx {
    line: Arc<Mutex<Line>>,
    watcher: Option<Watcher>,
}

impl Intx {
    pub(crate) fn new(stats: Arc<Mutex<Stats>>) -> Intx {
        Intx {
            line: Arc::new(Mutex::new(Line {
                asserted: false,
                masked: false,
                trigger: None,
                stats,
            })),
            watcher: None,
        }
    }

    /// Eventfds held (trigger and unmask).
    pub(crate) fn held(&self) -> usize {
        usize::from(lock(&self.line).trigger.is_some()) + usize::from(self.watcher.is_some())
    }

    /// The INTX register: bit 0 the level, bit 1 the mask.
    pub(crate) fn status(&self) -> u32 {
        let l = lock(&self.line);
        u32::from(l.asserted) | (u32::from(l.masked) << 1)
    }

    /// Asserts (`true`) or deasserts the line.
    pub(crate) fn set_level(&mut self, asserted: bool) {
        let mut l = lock(&self.line);
        l.asserted = asserted;
        l.fire();
    }

    /// `ACTION_TRIGGER | DATA_EVENTFD`: the trigger eventfd (an asserted,
    /// unmasked line signals it at once).
    pub(crate) fn set_trigger(&mut self, fd: File) {
        let mut l = lock(&self.line);
        l.trigger = Some(fd);
        l.fire();
    }

    /// `ACTION_TRIGGER | DATA_NONE`, count 1: signals the trigger
    /// (loopback), whatever the line and the mask.
    pub(crate) fn loopback(&mut self) {
        let l = lock(&self.line);
        let sent = l.trigger.as_ref().map(|fd| {
            let mut f: &File = fd;
            f.write_all(&1u64.to_ne_bytes()).is_ok()
        });
        let mut s = lock(&l.stats);
        if sent == Some(true) {
            s.interrupts += 1;
            s.intx_signals += 1;
        } else {
            s.interrupts_dropped += 1;
        }
    }

    pub(crate) fn mask(&mut self) {
        lock(&self.line).masked = true;
    }

    pub(crate) fn unmask(&mut self) {
        lock(&self.line).unmask();
    }

    /// `ACTION_UNMASK | DATA_EVENTFD`: INTx is unmasked whenever `fd` is
    /// written (replacing an earlier unmask eventfd).
    pub(crate) fn unmask_on(&mut self, fd: File) -> io::Result<()> {
        self.watcher = None;
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let stop_watch = stop.try_clone()?;
        let line = self.line.clone();
        let thread = std::thread::Builder::new()
            .name("vfio-user-intx".into())
            .spawn(move || watch(fd, &stop_watch, &line))?;
        self.watcher = Some(Watcher {
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    /// `ACTION_TRIGGER | DATA_NONE`, count 0, or the end of a session:
    /// both eventfds go and INTx is unmasked (the level stays).
    pub(crate) fn disable(&mut self) {
        self.watcher = None;
        let mut l = lock(&self.line);
        l.trigger = None;
        l.masked = false;
    }

    /// Device reset: the line is deasserted and unmasked; eventfds stay.
    pub(crate) fn reset(&mut self) {
        let mut l = lock(&self.line);
        l.asserted = false;
        l.masked = false;
    }
}
