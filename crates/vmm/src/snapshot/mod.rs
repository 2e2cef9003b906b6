//! Snapshots: a paused VM saved to a directory and rebuilt from it in
//! another process.
//!
//! One interface, [`Snapshot`], is what every device implements: it saves
//! its own state as a byte string and loads such a string into a device
//! built anew from the same configuration. The device registry holds each
//! device's [`Snapshot`] handle under the device's name and drives them
//! all ([`crate::registry::DeviceRegistry::save_sections`]); a new device
//! gets snapshot support by implementing the trait and registering its
//! handle. A device that cannot be saved (a passed-through PCI function)
//! answers [`SnapshotError::Unsupported`], and the whole snapshot is
//! refused before anything is written.
//!
//! The vCPUs ([`cpu`]) and the VM's own KVM state ([`vmstate`]) are saved
//! here in `vmm`; guest memory goes to one file per RAM region
//! ([`memory`]); [`format`] is the `state` file (header with a magic
//! number, a format version and a CRC-32, then the postcard-encoded
//! [`SnapshotState`]). [`dir`] writes and reads a snapshot directory.
//!
//! Interrupt wiring (GSI routes, irqfds, ioeventfds) is never stored as
//! numbers: each device's restore replays the guest-visible registers
//! (MSI-X table, IOAPIC redirection entries, BAR addresses) through the
//! same code paths a guest write takes, which rebuilds the wiring.

pub mod cpu;
pub mod dir;
pub mod format;
pub mod memory;
pub mod vmstate;

use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use format::{SnapshotState, FORMAT_VERSION};

/// Errors from saving or restoring state.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("device {device} cannot be saved: {reason}")]
    Unsupported { device: String, reason: String },
    #[error("encoding the state of {what}")]
    Encode {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("the saved state of {what} is malformed")]
    Decode {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("the saved state of {what} does not match this VM: {detail}")]
    Mismatch { what: String, detail: String },
    #[error("KVM {op} failed on {what}")]
    Kvm {
        op: &'static str,
        what: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("restoring {what}: {detail}")]
    Apply { what: String, detail: String },
    #[error("{0}")]
    Other(String),
}

impl SnapshotError {
    pub fn mismatch(what: impl Into<String>, detail: impl Into<String>) -> SnapshotError {
        SnapshotError::Mismatch {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// Whether the error is in the snapshot the user gave (exit code 2)
    /// rather than on the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            SnapshotError::Decode { .. } | SnapshotError::Mismatch { .. }
        )
    }
}

/// The save/restore interface every device implements.
pub trait Snapshot: Send {
    /// The device's state (the VM is paused: no vCPU runs and the device
    /// has nothing in flight). Encode it with [`encode`].
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError>;
    /// Loads a state [`Snapshot::save`] made into this device, built anew
    /// from the same configuration and not yet seen by the guest. It
    /// comes up paused: a device with work of its own starts it on the
    /// VM's resume.
    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError>;
}

/// A device's snapshot handle, as the registry holds it.
pub type SharedSnapshot = Arc<Mutex<dyn Snapshot>>;

/// One device's saved state, under its registry name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub name: String,
    pub data: Vec<u8>,
}

/// Encodes a device's state (postcard: compact, varint integers).
pub fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_stdvec(value).map_err(|source| SnapshotError::Encode {
        what: what.into(),
        source,
    })
}

/// Decodes a device's state; trailing bytes are malformed too.
pub fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, SnapshotError> {
    let (value, rest) =
        postcard::take_from_bytes(bytes).map_err(|source| SnapshotError::Decode {
            what: what.into(),
            source,
        })?;
    if !rest.is_empty() {
        return Err(SnapshotError::mismatch(
            what,
            format!("{} bytes after the end of its state", rest.len()),
        ));
    }
    Ok(value)
}

/// The state of a device that has none (its registers are constants):
/// kept as a section so that a snapshot names every device.
#[derive(Serialize, Deserialize)]
pub struct Stateless;

/// A [`Snapshot`] for a device with no state.
pub fn save_stateless(what: &str) -> Result<Vec<u8>, SnapshotError> {
    encode(what, &Stateless)
}
