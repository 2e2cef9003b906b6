//! Transports that put a [`VirtioDevice`](crate::VirtioDevice) in front of a
//! guest.

pub mod common;
pub mod pci;

pub use pci::{TransportError, VirtioPciDevice};
