//! PCI device assignment: one passthrough device model
//! ([`device::PassthroughDevice`]) over two VFIO transports, the kernel's
//! VFIO ([`kernel`]) and vfio-user ([`user`]), plugged into vmm's PCI
//! root, device registry and interrupt routing ([`attach`]).

pub mod attach;
pub mod bars;
pub mod config;
pub mod device;
pub mod kernel;
pub mod transport;
pub mod user;

pub use attach::{attach, AttachError, Attached, Source};
pub use device::{DeviceError, IrqMode, PassthroughDevice, VmContext};
pub use transport::{Transport, TransportError};
