//! vhost-user front-ends: a virtio-blk or virtio-net PCI device whose
//! queues an external backend (ringvm-blk, qemu-storage-daemon, SPDK,
//! DPDK) serves over a Unix socket, through the rust-vmm `vhost` crate's
//! front-end side. Guest RAM is a shared memfd handed over with the memory
//! table; the queue kicks are the transport's ioeventfds and the calls
//! the MSI-X vectors' irqfds, so requests and completions never pass
//! through ringvm.

pub mod config;
pub mod ctrl;
pub mod device;
pub mod personality;
pub mod session;

pub use config::{is_vhost_user, Kind, VhostUserConfig, VhostUserConfigError};
pub use device::{VhostUserDevice, VhostUserError};
