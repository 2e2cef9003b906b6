//! The device side of virtio: what a device is and how it is started and
//! stopped.
//!
//! Lifecycle (driven by the transport):
//!
//! ```text
//!   created --activate(mem, features, queues)--> active
//!   active  --reset()--> created   (workers stopped, queues returned)
//!   active  --pause()--> paused    (workers stopped, queue positions kept)
//!   paused  --resume()--> active   (workers restarted where they stopped)
//!   paused  --reset()--> created
//! ```
//! `activate` is called once the driver set DRIVER_OK with valid queues;
//! `reset` when the driver writes 0 to the status register or the VM goes
//! away. After `reset` returns, the device no longer touches guest memory.

use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm::snapshot::SnapshotError;
use vmm_sys_util::eventfd::EventFd;

/// Feature bits common to every device (virtio 1.2 §6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// One queue handed to a device on activation.
pub struct QueueInit {
    pub index: u16,
    /// The queue as the driver configured it (addresses, size, event idx).
    pub queue: Queue,
    /// Signalled when the driver notifies the queue (an ioeventfd).
    pub kick: EventFd,
    /// Written to interrupt the driver for this queue (an irqfd behind an
    /// MSI-X vector), or None when the driver gave the queue no vector.
    pub interrupt: Option<EventFd>,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled {got} queues; the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("queue {index} is not valid in guest memory")]
    InvalidQueue { index: u16 },
    #[error("duplicating an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("starting the device's worker")]
    Worker(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Why a device could not pause or resume.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("this device cannot be paused")]
    Unsupported,
    #[error("queue {index} cannot be restarted")]
    Queue {
        index: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("duplicating an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 = block, 1 = network).
    fn device_type(&self) -> u32;
    /// The largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (most fields are
    /// read-only; bad writes are ignored with a log line).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving `queues` with the negotiated `features`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<QueueInit>,
    ) -> Result<(), ActivateError>;
    /// Stops serving; waits for in-flight requests to complete.
    fn reset(&mut self);
    /// The VM pauses (its vCPUs are parked): an active device stops
    /// taking requests, waits until every one in flight has reached the
    /// used ring, and keeps each queue's position. Until `resume` it
    /// touches neither guest memory nor its backend. Only called on an
    /// active device. A device that cannot do this says so (the default),
    /// and the VM is not paused.
    fn pause(&mut self) -> Result<(), PauseError> {
        Err(PauseError::Unsupported)
    }
    /// Continues after `pause`, from the kept queue positions.
    fn resume(&mut self) -> Result<(), PauseError> {
        Err(PauseError::Unsupported)
    }
    /// While paused: each queue the device served, where its worker
    /// stopped (`next_avail`, `next_used`), for a snapshot.
    fn paused_queues(&self) -> Vec<(u16, QueueState)> {
        Vec::new()
    }
    /// The device's own state for a snapshot (paused, or never
    /// activated): configuration and whatever the driver programmed
    /// beyond the transport. The default: it cannot be saved.
    fn save_state(&self) -> Result<Vec<u8>, SnapshotError> {
        Err(SnapshotError::Unsupported {
            device: String::new(),
            reason: "its virtio device model has no snapshot support".into(),
        })
    }
    /// Loads a [`VirtioDevice::save_state`] into this device, built anew
    /// from the same configuration. `active` holds what
    /// [`VirtioDevice::activate`] would get when the saved device was
    /// running (its queues at their saved positions): the device then
    /// comes up paused, starting its workers on `resume`.
    fn restore_state(
        &mut self,
        _state: &[u8],
        _active: Option<(GuestMemoryMmap, u64, Vec<QueueInit>)>,
    ) -> Result<(), SnapshotError> {
        Err(SnapshotError::Unsupported {
            device: String::new(),
            reason: "its virtio device model has no snapshot support".into(),
        })
    }
}

/// Reads a device's configuration space the way both virtio-pci and
/// vhost-user hand reads to it: bytes past its end read as zero.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    let src = usize::try_from(offset)
        .ok()
        .and_then(|o| space.get(o..o.checked_add(data.len())?));
    match src {
        Some(src) => data.copy_from_slice(src),
        None => data.fill(0),
    }
}
