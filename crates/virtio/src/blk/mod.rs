//! virtio-blk: the device (configuration space, features, lifecycle), its
//! request parser, and the worker that serves each queue on an io_uring
//! iothread.

pub mod config;
pub mod request;

pub use config::{DiskConfig, DiskConfigError};
pub mod device;
pub mod stats;
mod worker;

pub use device::{BlockDevice, BlockDeviceError};
pub use stats::BlockStats;
