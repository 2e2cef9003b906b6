//! Why a VM stopped, and the one place every part of the VMM reports it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The reason a VM stopped. Each has its own process exit code
/// ([`StopReason::exit_code`]), documented in the README.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote `status` to the debug-exit port.
    DebugExit { status: u32 },
    /// The guest powered itself off.
    Shutdown,
    /// The guest asked for a reset (i8042 pulse or a KVM reset event).
    Reset,
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault { vcpu: usize, rip: u64 },
    /// KVM could not go on with this vCPU, typically an instruction its
    /// emulator does not know.
    InternalError {
        vcpu: usize,
        suberror: u32,
        rip: u64,
        /// Bytes at the faulting instruction, when they could be read.
        insn: Vec<u8>,
    },
    /// Something failed on the host side after the VM started.
    HostError { message: String },
    /// ringvm was asked to stop by a signal.
    Signal { signal: i32 },
    /// Every vCPU is halted with interrupts disabled (or, for APs, was
    /// never started): the guest can never run again.
    Halted,
    /// A control-plane request stopped the VM (`vm.shutdown`, `vm.reboot`,
    /// `vmm.shutdown`).
    Requested { request: &'static str },
}

/// Exit codes. 0..=99 are the guest's own debug-exit status.
pub mod exit_code {
    /// Bad command line, configuration or kernel file (before boot).
    pub const BAD_INPUT: i32 = 2;
    /// Guest debug-exit status above 99.
    pub const GUEST_STATUS_OUT_OF_RANGE: i32 = 100;
    pub const SHUTDOWN: i32 = 101;
    pub const RESET: i32 = 102;
    pub const TRIPLE_FAULT: i32 = 103;
    pub const INTERNAL_ERROR: i32 = 104;
    pub const HOST_ERROR: i32 = 105;
    pub const SIGNAL: i32 = 106;
    pub const HALTED: i32 = 107;
    pub const REQUESTED: i32 = 108;
}

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

impl StopReason {
    /// The process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::DebugExit { status } if *status <= 99 => *status as i32,
            StopReason::DebugExit { .. } => exit_code::GUEST_STATUS_OUT_OF_RANGE,
            StopReason::Shutdown => exit_code::SHUTDOWN,
            StopReason::Reset => exit_code::RESET,
            StopReason::TripleFault { .. } => exit_code::TRIPLE_FAULT,
            StopReason::InternalError { .. } => exit_code::INTERNAL_ERROR,
            StopReason::HostError { .. } => exit_code::HOST_ERROR,
            StopReason::Signal { .. } => exit_code::SIGNAL,
            StopReason::Halted => exit_code::HALTED,
            StopReason::Requested { .. } => exit_code::REQUESTED,
        }
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::DebugExit { status } => write!(f, "guest exited with status {status}"),
            StopReason::Shutdown => write!(f, "guest shut down"),
            StopReason::Reset => write!(f, "guest requested a reset"),
            StopReason::TripleFault { vcpu, rip } => {
                write!(f, "triple fault on vCPU {vcpu} at rip={rip:#x}")
            }
            StopReason::InternalError {
                vcpu,
                suberror,
                rip,
                insn,
            } => {
                if *suberror == KVM_INTERNAL_ERROR_EMULATION {
                    write!(f, "emulation failure on vCPU {vcpu} at rip={rip:#x}")?;
                } else {
                    write!(
                        f,
                        "KVM internal error (suberror {suberror}) on vCPU {vcpu} at rip={rip:#x}"
                    )?;
                }
                write!(f, " insn=[")?;
                for (i, b) in insn.iter().enumerate() {
                    write!(f, "{}{b:02x}", if i > 0 { " " } else { "" })?;
                }
                write!(f, "]")
            }
            StopReason::HostError { message } => write!(f, "host error: {message}"),
            StopReason::Signal { signal } => write!(f, "stopped by signal {signal}"),
            StopReason::Halted => write!(f, "guest halted with interrupts disabled on every vCPU"),
            StopReason::Requested { request } => write!(f, "stopped by the API ({request})"),
        }
    }
}

/// Shared by devices, vCPU threads and the control thread: the first
/// reported reason wins, and the control thread is woken through an eventfd.
pub struct VmStop {
    reason: Mutex<Option<StopReason>>,
    stopping: AtomicBool,
    evt: EventFd,
}

impl VmStop {
    pub fn new() -> std::io::Result<Self> {
        Ok(VmStop {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the
    /// control thread.
    pub fn request(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.stopping.store(true, Ordering::SeqCst);
        // An eventfd write only fails if the counter would overflow, in which
        // case it is already readable.
        let _ = self.evt.write(1);
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Readable once a stop was requested.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_per_reason() {
        let reasons = [
            StopReason::DebugExit { status: 100 },
            StopReason::Shutdown,
            StopReason::Reset,
            StopReason::TripleFault { vcpu: 0, rip: 0 },
            StopReason::InternalError {
                vcpu: 0,
                suberror: 1,
                rip: 0,
                insn: vec![],
            },
            StopReason::HostError {
                message: String::new(),
            },
            StopReason::Signal { signal: 15 },
            StopReason::Halted,
            StopReason::Requested {
                request: "vm.shutdown",
            },
        ];
        let mut codes: Vec<i32> = reasons.iter().map(StopReason::exit_code).collect();
        codes.push(exit_code::BAD_INPUT);
        let n = codes.len();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), n);
        assert!(codes.iter().all(|&c| c == exit_code::BAD_INPUT || c >= 100));
        assert_eq!(StopReason::DebugExit { status: 7 }.exit_code(), 7);
    }

    #[test]
    fn first_reason_wins() {
        let stop = VmStop::new().unwrap();
        assert!(!stop.is_stopping());
        stop.request(StopReason::Reset);
        stop.request(StopReason::Shutdown);
        assert!(stop.is_stopping());
        assert_eq!(stop.reason(), Some(StopReason::Reset));
        assert_eq!(stop.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn emulation_failure_line_carries_rip_and_bytes() {
        let r = StopReason::InternalError {
            vcpu: 0,
            suberror: 1,
            rip: 0x1000,
            insn: vec![0x0f, 0x01, 0xd9],
        };
        assert_eq!(
            r.to_string(),
            "emulation failure on vCPU 0 at rip=0x1000 insn=[0f 01 d9]"
        );
    }
}
