//! ringvm's virtio devices and their PCI transport.
//!
//! A device implements [`VirtioDevice`]: a pure description (type, queues,
//! features, config space) plus `activate`/`reset`, which hand its queues to
//! and take them back from the worker that serves them. The virtio-pci
//! transport ([`transport::VirtioPciDevice`]) turns guest accesses into that
//! lifecycle: feature negotiation, queue setup, the device-status machine,
//! MSI-X and the ioeventfds on each queue's notify address.

pub mod blk;
pub mod device;
pub mod msix;
pub mod net;
pub mod ratelimit;
pub mod transport;
pub mod vhost_user;
pub mod vq;
pub mod workers;

pub use device::{ActivateError, PauseError, QueueInit, VirtioDevice};
