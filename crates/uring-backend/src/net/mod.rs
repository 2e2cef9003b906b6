//! Network backends served through the io_uring executor: TAP devices
//! with the virtio-net header ([`tap`]).

pub mod tap;

pub use tap::{Tap, TapError, TapSpec, VNET_HDR_LEN};
