//! PCI: the root bus (configuration mechanism #1 and ECAM), the type-0
//! configuration space helper devices build on, and BAR placement.
//!
//! A [`PciDevice`] answers configuration and BAR accesses. The root owns
//! which BAR ranges are decoded: a BAR is on the MMIO bus only while the
//! device's Memory Space Enable bit is set, and it follows the guest when
//! the guest moves it. Every decoded BAR is a claim in the device registry,
//! so a BAR moved over another device's range is refused (and stays
//! undecoded) rather than silently shadowing it.

pub mod config;
pub mod msix;
pub mod root;

pub use config::{BarKind, PciConfigSpace, PciIdentity};
pub use msix::Msix;
pub use root::{PciRoot, PciRootError};

/// Where a device's BAR is, as decoded now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRange {
    pub index: u8,
    pub addr: u64,
    pub size: u64,
}

/// A device on the PCI bus.
pub trait PciDevice: Send {
    /// Reads `data.len()` (1, 2 or 4) bytes of configuration space at
    /// `offset` (< 4096, naturally aligned).
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes configuration space.
    fn config_write(&mut self, offset: u16, data: &[u8]);
    /// The memory BARs the device currently decodes (Memory Space Enable
    /// set, address programmed). The root maps exactly these.
    fn decoded_bars(&self) -> Vec<BarRange>;
    /// A read within memory BAR `bar`.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// A write within memory BAR `bar`.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
    /// Called after the root changed what is decoded (a BAR moved, was
    /// enabled or disabled), so the device can move what hangs off its
    /// BARs (ioeventfds, mapped memory).
    fn bars_changed(&mut self, _old: &[BarRange], _new: &[BarRange]) {}
    /// Called once when the root assigns BAR `index` its initial address.
    fn set_bar_address(&mut self, index: u8, addr: u64);
    /// The memory BARs it needs: (index, size, 64-bit).
    fn bar_requests(&self) -> Vec<(u8, u64, bool)>;
    /// The VM is pausing (every vCPU is parked): stop taking new work and
    /// wait until what is in flight is done, so that neither guest memory
    /// nor the device's backend changes until [`PciDevice::resume`].
    /// A device with no work of its own outside vCPU accesses has nothing
    /// to do (the default).
    fn pause(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
    /// The VM resumes: continue exactly where [`PciDevice::pause`] stopped.
    fn resume(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
    /// The function's state for a snapshot (the VM is paused), as
    /// [`crate::snapshot::Snapshot::save`]: configuration space with the
    /// BARs the guest programmed, MSI-X, and whatever the device model
    /// keeps. The default: it cannot be saved.
    fn save_state(&mut self) -> Result<Vec<u8>, crate::snapshot::SnapshotError> {
        Err(crate::snapshot::SnapshotError::Unsupported {
            device: String::new(),
            reason: "its device model has no snapshot support".into(),
        })
    }
    /// Loads a state [`PciDevice::save_state`] made into a function built
    /// anew from the same configuration; it stays paused until
    /// [`PciDevice::resume`]. The root maps the restored BARs afterwards.
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), crate::snapshot::SnapshotError> {
        Err(crate::snapshot::SnapshotError::Unsupported {
            device: String::new(),
            reason: "its device model has no snapshot support".into(),
        })
    }
}
