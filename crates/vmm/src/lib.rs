//! ringvm's VM core: a KVM virtual machine with guest memory, vCPU threads,
//! PIO/MMIO buses with a device registry, x86 boot (Linux 64-bit and PVH),
//! legacy devices and the reason the guest stopped.

pub mod affinity;
pub mod arch;
pub mod boot;
pub mod bus;
pub mod coalesced;
pub mod config;
pub mod control;
pub mod devices;
pub mod events;
pub mod interrupts;
pub mod layout;
pub mod lifecycle;
pub mod machine;
pub mod memslots;
pub mod pci;
pub mod registry;
pub mod seccomp;
pub mod snapshot;
pub mod stop;
pub mod vcpu;
pub mod vm;

pub use config::{parse_size, KernelSource, VmConfig};
pub use lifecycle::{LifecycleError, VmControl, VmState};
pub use machine::{run, MachineError, RunReport, RunningMachine};
pub use stop::{exit_code, StopReason};

/// An error and its causes on one line, `: `-separated (for a stop
/// reason, an API answer or a log line).
pub fn error_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("pinning vCPU 1")]
        Pin(#[source] std::io::Error),
    }

    #[test]
    fn an_error_line_has_every_cause() {
        let e = Outer::Pin(std::io::Error::from_raw_os_error(libc::EINVAL));
        assert_eq!(
            super::error_line(&e),
            "pinning vCPU 1: Invalid argument (os error 22)"
        );
        let alone = std::io::Error::other("no cause");
        assert_eq!(super::error_line(&alone), "no cause");
    }
}
