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
