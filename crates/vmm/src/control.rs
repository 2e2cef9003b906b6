//! The control thread's loop: wait for a stop request, a termination signal
//! or serial input; then bring every vCPU thread home.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::devices::SerialConsole;
use crate::stop::{StopReason, VmStop};
use crate::vcpu::{HaltWatch, VcpuHandle};

/// Errors from the control loop.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("blocking termination signals")]
    SigMask(#[source] std::io::Error),
    #[error("creating a signalfd")]
    SignalFd(#[source] std::io::Error),
    #[error("waiting for events")]
    Poll(#[source] std::io::Error),
}

/// SIGINT, SIGTERM and SIGHUP, blocked in this thread (and threads it
/// starts afterwards) and read from a signalfd instead.
pub struct Signals {
    fd: OwnedFd,
    old_mask: libc::sigset_t,
}

const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

impl Signals {
    pub fn block() -> Result<Signals, ControlError> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t for these libc calls.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in STOP_SIGNALS {
                libc::sigaddset(&mut set, s);
            }
        }
        // SAFETY: both pointers are valid sigset_t.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old_mask) };
        if rc != 0 {
            return Err(ControlError::SigMask(std::io::Error::from_raw_os_error(rc)));
        }
        // SAFETY: `set` is valid; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            // SAFETY: restoring the mask we saved.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
            return Err(ControlError::SignalFd(err));
        }
        // SAFETY: signalfd returned a new fd that we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Signals { fd, old_mask })
    }

    /// The signalfd, readable when a signal is pending.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Reads one pending signal number, if any.
    pub fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `size` bytes into `info`.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        // SAFETY: restoring the mask saved in `block`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}

/// How often a quiet control thread checks whether the guest is dead.
const HALT_PROBE_MS: i32 = 1000;

/// Waits until the VM stops; meanwhile forwards stdin to `serial_input`
/// and turns termination signals into a stop.
pub fn wait_for_stop(
    stop: &VmStop,
    signals: Option<&Signals>,
    serial_input: Option<&Arc<Mutex<SerialConsole>>>,
    vcpus: (&HaltWatch, &[VcpuHandle]),
) -> Result<(), ControlError> {
    let mut stdin_open = serial_input.is_some();
    let (halt, handles) = vcpus;
    let mut dead_probes = 0;
    let mut buf = [0u8; 64];
    while !stop.is_stopping() {
        let mut fds = [
            libc::pollfd {
                fd: stop.eventfd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.map_or(-1, |s| s.fd.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if stdin_open { libc::STDIN_FILENO } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, HALT_PROBE_MS) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ControlError::Poll(err));
        }
        if n == 0 {
            // Quiet for a while: is the guest dead? Two probes in a row
            // must find every vCPU unable to run.
            dead_probes = if halt.all_dead() { dead_probes + 1 } else { 0 };
            if dead_probes >= 2 {
                stop.request(StopReason::Halted);
                break;
            }
            halt.request_probe();
            for h in handles {
                h.kick();
            }
            continue;
        }
        if fds[1].revents != 0 {
            if let Some(signal) = signals.and_then(Signals::read) {
                stop.request(StopReason::Signal { signal });
            }
        }
        if fds[2].revents != 0 {
            // SAFETY: reading into a valid buffer of its length.
            let got = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
            match (got, serial_input) {
                (n, Some(serial)) if n > 0 => {
                    serial
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(&buf[..n as usize]);
                }
                _ => stdin_open = false,
            }
        }
    }
    Ok(())
}

/// Kicks every vCPU out of `KVM_RUN` until its thread has finished, then
/// joins them all. The VM must already be stopping. The checks start 10 µs
/// apart and back off to 200 µs: a vCPU that stopped the VM itself (the
/// guest's exit) is usually done within the first.
pub fn stop_vcpus(handles: Vec<VcpuHandle>) {
    let mut pause = Duration::from_micros(10);
    loop {
        let running: Vec<&VcpuHandle> = handles.iter().filter(|h| !h.is_finished()).collect();
        if running.is_empty() {
            break;
        }
        for h in running {
            h.kick();
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_micros(200));
    }
    for h in handles {
        h.join();
    }
}
