//! The virtio-pci transport, modern (virtio 1.x) interface only.
//!
//! BAR0 (64-bit memory) layout:
//!
//! | offset | size   | what |
//! |--------|--------|------|
//! | 0x0000 | 0x40   | common configuration |
//! | 0x1000 | 1      | ISR status |
//! | 0x2000 | 0x1000 | device configuration |
//! | 0x3000 | 4 × n  | notify: queue `i` at `0x3000 + 4 i` (an ioeventfd each) |
//! | 0x4000 | 16 × v | MSI-X table |
//! | 0x6000 | 8 × ⌈v/64⌉ | MSI-X pending-bit array |
//!
//! Capabilities: common, notify (multiplier 4), ISR, device, the PCI
//! configuration access window, and MSI-X with one vector per queue plus one
//! for configuration changes.

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm::interrupts::{InterruptError, InterruptRouter};
use vmm::pci::config::{PciIdentity, COMMAND_BUS_MASTER, PCI_COMMAND};
use vmm::pci::{BarKind, BarRange, PciConfigSpace, PciDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use serde::{Deserialize, Serialize};
use vmm::pci::config::PciConfigState;
use vmm::pci::msix::MsixState;
use vmm::snapshot::{decode, encode, SnapshotError};

use super::common::{CommonConfig, CommonSection, StatusChange};
use crate::device::{QueueInit, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::msix::Msix;

const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
const PCI_CAP_ID_VENDOR: u8 = 0x09;
const PCI_CAP_ID_MSIX: u8 = 0x11;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

const BAR0: u8 = 0;
const BAR0_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x40;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;

/// Errors from building the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("allocating MSI-X vectors")]
    Msix(#[source] InterruptError),
    #[error("creating a queue notify eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("the device has {0} queues; at most 1024 are supported")]
    TooManyQueues(usize),
}

/// Writes one of the virtio vendor capabilities.
fn vendor_cap(
    config: &mut PciConfigSpace,
    cfg_type: u8,
    offset: u64,
    length: u64,
    extra: &[u8],
) -> u16 {
    // cap_len counts from cap_vndr: 16 bytes plus any extra.
    let mut body = vec![(16 + extra.len()) as u8, cfg_type, BAR0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body.extend_from_slice(extra);
    config.add_capability(PCI_CAP_ID_VENDOR, &body, &[])
}

/// A virtio-pci function's snapshot section: the transport's registers
/// and queues, then the device's own state.
#[derive(Serialize, Deserialize)]
struct VirtioPciSection {
    device_type: u32,
    config: PciConfigState,
    msix: MsixState,
    common: CommonSection,
    /// The device was running (DRIVER_OK, bus mastering on).
    active: bool,
    device: Vec<u8>,
}

/// One virtio device on the PCI bus.
pub struct VirtioPciDevice {
    name: String,
    config: PciConfigSpace,
    device: Box<dyn VirtioDevice>,
    common: CommonConfig,
    msix: Msix,
    msix_cap: u16,
    pci_cfg_cap: u16,
    kicks: Vec<EventFd>,
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    /// Where BAR0 is decoded now (for the notify ioeventfds).
    bar0: Option<u64>,
    active: bool,
    /// The VM is paused and the device with it.
    paused: bool,
}

impl VirtioPciDevice {
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        vm: Arc<VmFd>,
        router: &Arc<InterruptRouter>,
        mem: GuestMemoryMmap,
    ) -> Result<VirtioPciDevice, TransportError> {
        let sizes = device.queue_max_sizes();
        if sizes.len() > 1024 {
            return Err(TransportError::TooManyQueues(sizes.len()));
        }
        let (class, subclass) = match device.device_type() {
            1 => (0x02, 0x00),
            2 => (0x01, 0x80),
            _ => (0xff, 0x00),
        };
        let mut config = PciConfigSpace::new(PciIdentity {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + device.device_type() as u16,
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x1100,
            class,
            subclass,
            prog_if: 0,
            revision: 1,
        });
        config.add_bar(
            BAR0,
            BAR0_SIZE,
            BarKind::Mem64 {
                prefetchable: false,
            },
        );
        let vectors = sizes.len() as u16 + 1;
        let msix = Msix::new(router, vectors).map_err(TransportError::Msix)?;
        let mut msix_body = Vec::new();
        msix_body.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_TABLE_OFFSET as u32 | u32::from(BAR0)).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA_OFFSET as u32 | u32::from(BAR0)).to_le_bytes());
        let msix_cap = config.add_capability(PCI_CAP_ID_MSIX, &msix_body, &[]);
        vendor_cap(&mut config, CAP_COMMON, COMMON_OFFSET, COMMON_SIZE, &[]);
        vendor_cap(
            &mut config,
            CAP_NOTIFY,
            NOTIFY_OFFSET,
            4 * sizes.len() as u64,
            &NOTIFY_MULTIPLIER.to_le_bytes(),
        );
        vendor_cap(&mut config, CAP_ISR, ISR_OFFSET, 1, &[]);
        vendor_cap(&mut config, CAP_DEVICE, DEVICE_OFFSET, DEVICE_SIZE, &[]);
        // The access window: bar (1), offset (4), length (4) and the data
        // dword are writable.
        let pci_cfg_cap = vendor_cap(&mut config, CAP_PCI_CFG, 0, 0, &[0; 4]);
        let kicks = (0..sizes.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let common = CommonConfig::new(&sizes, device.features() | VIRTIO_F_VERSION_1);
        Ok(VirtioPciDevice {
            name: name.into(),
            config,
            device,
            common,
            msix,
            msix_cap,
            pci_cfg_cap,
            kicks,
            vm,
            mem,
            bar0: None,
            active: false,
            paused: false,
        })
    }

    fn notify_addr(base: u64, queue: usize) -> u64 {
        base + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
    }

    fn unregister_ioeventfds(&mut self, base: u64) {
        for (i, kick) in self.kicks.iter().enumerate() {
            let addr = IoEventAddress::Mmio(Self::notify_addr(base, i));
            if let Err(e) = self.vm.unregister_ioevent(kick, &addr, NoDatamatch) {
                log::warn!(
                    "{}: unregistering the ioeventfd of queue {i}: {e}",
                    self.name
                );
            }
        }
    }

    fn register_ioeventfds(&mut self, base: u64) {
        for (i, kick) in self.kicks.iter().enumerate() {
            let addr = IoEventAddress::Mmio(Self::notify_addr(base, i));
            if let Err(e) = self.vm.register_ioevent(kick, &addr, NoDatamatch) {
                log::error!("{}: registering the ioeventfd of queue {i}: {e}", self.name);
            }
        }
    }

    /// The queues to hand the device on activation, or None (the device
    /// then needs a reset; the reason is logged).
    fn queue_inits(&mut self) -> Option<Vec<QueueInit>> {
        let features = self.common.driver_features();
        let event_idx = features & crate::device::VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (i, q) in self.common.queues.iter().enumerate() {
            if !q.queue.ready() {
                continue;
            }
            if !q.queue.is_valid(&self.mem) {
                log::warn!(
                    "{}: queue {i} is not valid in guest memory; device needs reset",
                    self.name
                );
                return None;
            }
            let mut state = q.queue.state();
            state.event_idx_enabled = event_idx;
            let queue = match Queue::try_from(state) {
                Ok(queue) => queue,
                Err(e) => {
                    log::warn!("{}: queue {i}: {e}; device needs reset", self.name);
                    return None;
                }
            };
            let kick = match self.kicks[i].try_clone() {
                Ok(k) => k,
                Err(e) => {
                    log::error!("{}: duplicating the kick eventfd: {e}", self.name);
                    return None;
                }
            };
            let interrupt = match q.msix_vector {
                v if v < self.msix.count() => self.msix.eventfd(v).and_then(Result::ok),
                _ => None,
            };
            queues.push(QueueInit {
                index: i as u16,
                queue,
                kick,
                interrupt,
            });
        }
        Some(queues)
    }

    /// Starts the device on DRIVER_OK; a failure sets DEVICE_NEEDS_RESET.
    fn activate(&mut self) {
        let features = self.common.driver_features();
        let Some(queues) = self.queue_inits() else {
            self.common.set_needs_reset();
            return;
        };
        match self.device.activate(self.mem.clone(), features, queues) {
            Ok(()) => {
                self.active = true;
                vmm::events::emit("device", "activated", &[("id", &self.name)]);
            }
            Err(e) => {
                // With its causes: a host out of descriptors or memory
                // says so here.
                let why = vmm::error_line(&e);
                log::warn!(
                    "{}: activation failed: {why}; device needs reset",
                    self.name
                );
                self.common.set_needs_reset();
            }
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
            self.paused = false;
            vmm::events::emit("device", "reset", &[("id", &self.name)]);
        }
        // Kicks that arrived while stopped belong to the old queues.
        for k in &self.kicks {
            let _ = k.read();
        }
        self.common.reset();
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        match self.common.write(offset, data) {
            StatusChange::None => {}
            StatusChange::Reset => self.reset(),
            StatusChange::DriverOk => {
                if !self.active {
                    if self.bus_master() {
                        self.activate();
                    } else {
                        // A device does DMA only once the guest let it:
                        // started when bus mastering is enabled.
                        log::debug!(
                            "{}: DRIVER_OK with bus mastering off; waiting for it",
                            self.name
                        );
                    }
                }
            }
        }
    }

    /// Whether the guest enabled bus mastering (DMA) in the command
    /// register.
    fn bus_master(&self) -> bool {
        self.config.u16_at(PCI_COMMAND) & COMMAND_BUS_MASTER != 0
    }

    /// Follows the command register's bus-master bit: a device whose
    /// driver is ready starts when it is set; a running device stops when
    /// it is cleared, and asks for a reset (its queues' progress is gone).
    fn bus_master_changed(&mut self) {
        let driver_ok = self.common.status() & super::common::STATUS_DRIVER_OK != 0;
        match (self.bus_master(), self.active) {
            (true, false) if driver_ok => self.activate(),
            (false, true) => {
                log::warn!(
                    "{}: the guest disabled bus mastering under a running device; \
                     stopped, device needs reset",
                    self.name
                );
                self.device.reset();
                self.active = false;
                self.common.set_needs_reset();
            }
            _ => {}
        }
    }

    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.common.read(o, data),
            ISR_OFFSET => {
                // No INTx: nothing is ever pending here; reading clears it.
                data.fill(0);
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if o >= MSIX_PBA_OFFSET => self.msix.read_pba(o - MSIX_PBA_OFFSET, data),
            _ => data.fill(0),
        }
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_SIZE => self.common_write(o, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Reaches us only when the ioeventfd is not registered yet.
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(k) = self.kicks.get(q) {
                    let _ = k.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    /// The VIRTIO_PCI_CAP_PCI_CFG window: `(bar, offset, length)` and the
    /// data field's config offset.
    fn pci_cfg_window(&self) -> (u8, u32, u32, u16) {
        let c = self.pci_cfg_cap;
        let mut bar = [0u8];
        self.config.read(c + 4, &mut bar);
        (
            bar[0],
            self.config.u32_at(c + 8),
            self.config.u32_at(c + 12),
            c + 16,
        )
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
        // Message control is live state.
        let ctrl = self.msix_cap + 2;
        if offset <= ctrl + 1 && offset + data.len() as u16 > ctrl {
            let v = self.msix.control().to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                let o = offset + i as u16;
                if o == ctrl || o == ctrl + 1 {
                    *b = v[usize::from(o - ctrl)];
                }
            }
        }
        let (bar, off, len, data_off) = self.pci_cfg_window();
        if offset == data_off
            && bar == BAR0
            && matches!(len, 1 | 2 | 4)
            && data.len() >= len as usize
        {
            let mut buf = [0u8; 4];
            self.bar0_read(u64::from(off), &mut buf[..len as usize]);
            data[..len as usize].copy_from_slice(&buf[..len as usize]);
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        // Message control may be written as a word at cap+2, a byte, or
        // within a dword at cap+0 (ID and next pointer are read-only).
        let ctrl = self.msix_cap + 2;
        let end = offset + data.len() as u16;
        if offset < ctrl + 2 && end > ctrl {
            let mut v = self.msix.control().to_le_bytes();
            for (i, b) in data.iter().enumerate() {
                let o = offset + i as u16;
                if o == ctrl || o == ctrl + 1 {
                    v[usize::from(o - ctrl)] = *b;
                }
            }
            self.msix.write_control(u16::from_le_bytes(v));
            return;
        }
        let c = self.pci_cfg_cap;
        let (_, _, _, data_off) = self.pci_cfg_window();
        if offset == data_off {
            let (bar, off, len, _) = self.pci_cfg_window();
            if bar == BAR0 && matches!(len, 1 | 2 | 4) && data.len() >= len as usize {
                self.bar0_write(u64::from(off), &data[..len as usize]);
            }
            return;
        }
        // The window's bar, offset and length fields are guest-writable.
        if (c + 4..c + 16).contains(&offset) {
            let o = offset as usize;
            let dst = self
                .config
                .bytes_mut(offset, data.len().min(c as usize + 16 - o));
            let n = dst.len();
            dst.copy_from_slice(&data[..n]);
            return;
        }
        let master = self.bus_master();
        self.config.write(offset, data);
        if self.bus_master() != master {
            self.bus_master_changed();
        }
    }

    fn decoded_bars(&self) -> Vec<BarRange> {
        self.config.decoded_bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar == BAR0 {
            self.bar0_read(offset, data)
        } else {
            data.fill(0xff)
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == BAR0 {
            self.bar0_write(offset, data)
        }
    }

    fn bars_changed(&mut self, _old: &[BarRange], new: &[BarRange]) {
        let now = new.iter().find(|b| b.index == BAR0).map(|b| b.addr);
        if now == self.bar0 {
            return;
        }
        if let Some(old) = self.bar0.take() {
            self.unregister_ioeventfds(old);
        }
        if let Some(base) = now {
            self.register_ioeventfds(base);
        }
        self.bar0 = now;
    }

    fn set_bar_address(&mut self, index: u8, addr: u64) {
        self.config.set_bar_addr(index, addr);
    }

    fn bar_requests(&self) -> Vec<(u8, u64, bool)> {
        self.config.bar_requests()
    }

    fn pause(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // A device the driver has not started has nothing running.
        if self.active && !self.paused {
            self.device.pause()?;
            self.paused = true;
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.paused {
            self.device.resume()?;
            self.paused = false;
        }
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, SnapshotError> {
        self.snapshot_save()
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        self.snapshot_restore(state)
    }
}

impl VirtioPciDevice {
    fn named(&self, e: SnapshotError) -> SnapshotError {
        match e {
            SnapshotError::Unsupported { device, reason } if device.is_empty() => {
                SnapshotError::Unsupported {
                    device: self.name.clone(),
                    reason,
                }
            }
            e => e,
        }
    }

    fn snapshot_save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        if self.active && !self.paused {
            return Err(SnapshotError::Other(format!(
                "{}: the device is running (the VM is not paused)",
                self.name
            )));
        }
        let device = self.device.save_state().map_err(|e| self.named(e))?;
        let positions = if self.active {
            self.device.paused_queues()
        } else {
            Vec::new()
        };
        encode(
            &self.name,
            &VirtioPciSection {
                device_type: self.device.device_type(),
                config: self.config.state(),
                msix: self.msix.state(),
                common: self.common.state(&positions),
                active: self.active,
                device,
            },
        )
    }

    fn snapshot_restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let s: VirtioPciSection = decode(&self.name, state)?;
        let name = self.name.clone();
        let mismatch = |d: String| SnapshotError::mismatch(name.clone(), d);
        if s.device_type != self.device.device_type() {
            return Err(mismatch(format!(
                "it was virtio device type {}, this is type {}",
                s.device_type,
                self.device.device_type()
            )));
        }
        self.config.set_state(&s.config).map_err(mismatch)?;
        self.common.set_state(&s.common).map_err(mismatch)?;
        // Routes and irqfds follow the restored table.
        self.msix.set_state(&s.msix).map_err(mismatch)?;
        if s.active {
            let features = self.common.driver_features();
            let queues = self.queue_inits().ok_or_else(|| {
                mismatch("its queues are not valid in the restored guest memory".into())
            })?;
            self.device
                .restore_state(&s.device, Some((self.mem.clone(), features, queues)))
                .map_err(|e| self.named(e))?;
            self.active = true;
            self.paused = true;
        } else {
            self.device
                .restore_state(&s.device, None)
                .map_err(|e| self.named(e))?;
        }
        Ok(())
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
            vmm::events::emit("device", "reset", &[("id", &self.name)]);
        }
        if let Some(base) = self.bar0.take() {
            self.unregister_ioeventfds(base);
        }
    }
}
