//! MSI-X emulation for the virtio-pci transport. It lives in
//! [`vmm::pci::msix`], shared with PCI passthrough; this module re-exports
//! it under its old path.

pub use vmm::pci::msix::*;
