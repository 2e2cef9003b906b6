//! virtio-net over a TAP, served on the iothreads' io_uring executors: one
//! RX and one TX task per queue pair and a control-queue task.

pub mod config;
pub mod ctrl;
mod ctrlq;
pub mod device;
mod queue;
mod rx;
mod tx;

pub use config::{NetConfig, NetConfigError};
pub use device::{NetDevice, NetDeviceError, NetStats};
#[doc(hidden)]
pub use queue::ChainError;
#[doc(hidden)]
pub use tx::{tx_frame, TxDrop, TxFrame};
