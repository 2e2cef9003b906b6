//! virtio 1.x over PCI ("modern" transport): capability discovery, the
//! common configuration structure, feature negotiation and queue setup.
//!
//! The vendor capabilities (ID 0x09) name a BAR, an offset and a length
//! for each structure: COMMON (1), NOTIFY (2, followed by the notify offset
//! multiplier), ISR (3) and DEVICE (4). The first capability of each type
//! wins; the BARs must be memory BARs that the VMM or firmware assigned.
//! Interrupts come through MSI-X, so the ISR structure is not needed and
//! not required.

pub mod queue;

use crate::mmio;
use crate::msix::{self, Msix};
use crate::paging;
use crate::pci::Function;

/// PCI vendor ID of virtio devices.
pub const VENDOR: u16 = 0x1af4;

// Feature bits (transport level).
pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

// Device status bits.
const S_ACKNOWLEDGE: u8 = 1;
const S_DRIVER: u8 = 2;
const S_DRIVER_OK: u8 = 4;
const S_FEATURES_OK: u8 = 8;
const S_NEEDS_RESET: u8 = 0x40;
const S_FAILED: u8 = 0x80;

/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

// Common configuration structure offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
/// Bytes of the common structure this driver touches.
const COMMON_LEN: u32 = 0x38;

// Vendor capability: ID and cfg_type values.
const CAP_VENDOR: u8 = 0x09;
const TYPE_COMMON: u8 = 1;
const TYPE_NOTIFY: u8 = 2;
const TYPE_DEVICE: u8 = 4;

/// Polls of device_status while waiting for a reset to finish.
const RESET_POLLS: u32 = 1 << 20;

/// A mapped register region.
#[derive(Clone, Copy, Debug, Default)]
struct Region {
    addr: u64,
    len: u32,
}

/// A probed virtio-pci function.
#[derive(Clone, Copy, Debug)]
pub struct Transport {
    common: Region,
    notify: Region,
    notify_mult: u32,
    device: Region,
    pub msix: Msix,
}

/// `(bar, offset, length, extra)` of a vendor capability.
type CapInfo = (u8, u32, u32, u32);

impl Transport {
    /// Walks the capability list, resolves and maps the structures and the
    /// MSI-X table. Reads only configuration space and BAR registers.
    pub fn probe(func: Function) -> Result<Transport, &'static str> {
        // Indexed by cfg_type (slots 0 and 3, ISR, stay empty).
        let mut found: [Option<CapInfo>; 5] = [None; 5];
        let mut msix_cap = None;
        for (at, id) in func.capabilities() {
            match id {
                CAP_VENDOR => {
                    let cfg_type = (func.read32(at) >> 24) as u8;
                    let bar = func.read8(at + 4);
                    let slot = match cfg_type {
                        TYPE_COMMON | TYPE_NOTIFY | TYPE_DEVICE => {
                            &mut found[usize::from(cfg_type)]
                        }
                        _ => continue,
                    };
                    if bar > 5 || slot.is_some() {
                        continue;
                    }
                    let extra = if cfg_type == TYPE_NOTIFY {
                        func.read32(at + 16)
                    } else {
                        0
                    };
                    *slot = Some((bar, func.read32(at + 8), func.read32(at + 12), extra));
                }
                msix::CAP_ID if msix_cap.is_none() => msix_cap = Some(at),
                _ => {}
            }
        }
        // BAR registers are read once each.
        let mut bars: [Option<u64>; 6] = [None; 6];
        let mut bar = |i: u8| -> Result<u64, &'static str> {
            let cached = &mut bars[usize::from(i)];
            if cached.is_none() {
                *cached = Some(func.bar(i).map_err(|e| e.describe())?);
            }
            Ok(cached.unwrap_or(0))
        };
        let mut region = |info: Option<CapInfo>,
                          min: u32,
                          missing: &'static str|
         -> Result<Region, &'static str> {
            let (b, offset, len, _) = info.ok_or(missing)?;
            if len < min {
                return Err("virtio capability region too short");
            }
            let addr = bar(b)?
                .checked_add(u64::from(offset))
                .ok_or("virtio capability overflows")?;
            paging::map_uncached(addr, u64::from(len)).map_err(|_| "cannot map a virtio BAR")?;
            Ok(Region { addr, len })
        };
        let common = region(
            found[1],
            COMMON_LEN,
            "no virtio common configuration capability",
        )?;
        let notify = region(found[2], 2, "no virtio notify capability")?;
        let device = region(found[4], 8, "no virtio device configuration capability")?;
        let notify_mult = found[2].map_or(0, |c| c.3);
        let msix = Msix::probe(func, msix_cap.ok_or("no MSI-X capability")?, bar)?;
        Ok(Transport {
            common,
            notify,
            notify_mult,
            device,
            msix,
        })
    }

    fn read8(&self, off: u64) -> u8 {
        // SAFETY: `off` is inside the mapped common structure (COMMON_LEN
        // was checked); reads of it have no side effects.
        unsafe { mmio::read8(self.common.addr + off) }
    }
    fn read16(&self, off: u64) -> u16 {
        // SAFETY: as for `read8`; offsets are naturally aligned.
        unsafe { mmio::read16(self.common.addr + off) }
    }
    fn read32(&self, off: u64) -> u32 {
        // SAFETY: as for `read8`; offsets are naturally aligned.
        unsafe { mmio::read32(self.common.addr + off) }
    }
    fn write8(&self, off: u64, v: u8) {
        // SAFETY: inside the mapped common structure. The device only
        // starts DMA after DRIVER_OK, into rings and buffers the driver
        // owns for that purpose.
        unsafe { mmio::write8(self.common.addr + off, v) }
    }
    fn write16(&self, off: u64, v: u16) {
        // SAFETY: as for `write8`; offsets are naturally aligned.
        unsafe { mmio::write16(self.common.addr + off, v) }
    }
    fn write32(&self, off: u64, v: u32) {
        // SAFETY: as for `write8`; offsets are naturally aligned.
        unsafe { mmio::write32(self.common.addr + off, v) }
    }

    pub fn status(&self) -> u8 {
        self.read8(DEVICE_STATUS)
    }

    fn add_status(&self, bits: u8) {
        self.write8(DEVICE_STATUS, self.status() | bits);
    }

    /// Resets the device (status 0, then waits until it reads back 0) and
    /// announces the driver (ACKNOWLEDGE, DRIVER).
    pub fn reset(&self) -> Result<(), &'static str> {
        self.write8(DEVICE_STATUS, 0);
        if !(0..RESET_POLLS).any(|_| self.status() == 0) {
            return Err("device reset did not complete");
        }
        self.add_status(S_ACKNOWLEDGE);
        self.add_status(S_DRIVER);
        Ok(())
    }

    /// The feature bits the device offers (reads both halves).
    pub fn offered(&self) -> u64 {
        self.write32(DEVICE_FEATURE_SELECT, 0);
        let low = self.read32(DEVICE_FEATURE);
        self.write32(DEVICE_FEATURE_SELECT, 1);
        let high = self.read32(DEVICE_FEATURE);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// Offers the intersection of the device features and `wanted`, sets
    /// FEATURES_OK and checks that it stuck. VERSION_1 is required.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, &'static str> {
        self.write32(DEVICE_FEATURE_SELECT, 0);
        let low = self.read32(DEVICE_FEATURE);
        self.write32(DEVICE_FEATURE_SELECT, 1);
        let high = self.read32(DEVICE_FEATURE);
        let offered = u64::from(low) | (u64::from(high) << 32);
        if offered & F_VERSION_1 == 0 {
            self.add_status(S_FAILED);
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        let accepted = offered & wanted;
        self.write32(DRIVER_FEATURE_SELECT, 0);
        self.write32(DRIVER_FEATURE, accepted as u32);
        self.write32(DRIVER_FEATURE_SELECT, 1);
        self.write32(DRIVER_FEATURE, (accepted >> 32) as u32);
        self.add_status(S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            self.add_status(S_FAILED);
            return Err("device rejected the features (FEATURES_OK did not stick)");
        }
        Ok(accepted)
    }

    /// Number of virtqueues the device has.
    pub fn num_queues(&self) -> u16 {
        self.read16(NUM_QUEUES)
    }

    /// Routes configuration-change interrupts nowhere.
    pub fn disable_config_vector(&self) {
        self.write16(CONFIG_MSIX_VECTOR, NO_VECTOR);
    }

    /// The maximum size of queue `index` (0: queue unavailable).
    pub fn queue_max(&self, index: u16) -> u16 {
        self.write16(QUEUE_SELECT, index);
        self.read16(QUEUE_SIZE)
    }

    /// Configures and enables queue `index`: `size` entries, rings at the
    /// given guest-physical addresses, interrupts on MSI-X entry `vector`.
    /// Returns the queue's notify register address.
    pub fn setup_queue(
        &self,
        index: u16,
        size: u16,
        rings: [u64; 3],
        vector: u16,
    ) -> Result<u64, &'static str> {
        self.write16(QUEUE_SELECT, index);
        self.write16(QUEUE_SIZE, size);
        self.write16(QUEUE_MSIX_VECTOR, vector);
        let got = self.read16(QUEUE_MSIX_VECTOR);
        if got == NO_VECTOR {
            return Err("device refused the queue's MSI-X vector (reads NO_VECTOR)");
        }
        if got != vector {
            return Err("queue MSI-X vector reads back wrong");
        }
        for (off, addr) in [QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE]
            .into_iter()
            .zip(rings)
        {
            // SAFETY: 64-bit fields inside the mapped common structure; the
            // addresses are the driver's own ring memory.
            unsafe { mmio::write64_split(self.common.addr + off, addr) };
        }
        let off = u64::from(self.read16(QUEUE_NOTIFY_OFF)) * u64::from(self.notify_mult);
        if off + 2 > u64::from(self.notify.len) {
            return Err("queue notify address outside the notify region");
        }
        self.write16(QUEUE_ENABLE, 1);
        Ok(self.notify.addr + off)
    }

    /// Sets DRIVER_OK and checks that the device is happy.
    pub fn driver_ok(&self) -> Result<(), &'static str> {
        self.add_status(S_DRIVER_OK);
        let s = self.status();
        if s & (S_NEEDS_RESET | S_FAILED) != 0 || s & S_DRIVER_OK == 0 {
            return Err("device signals DEVICE_NEEDS_RESET after DRIVER_OK");
        }
        Ok(())
    }

    /// Reads device configuration bytes `[off, off + 4)` (aligned), or
    /// `None` beyond the structure.
    pub fn config32(&self, off: u32) -> Option<u32> {
        if off + 4 > self.device.len {
            return None;
        }
        // SAFETY: inside the mapped device configuration structure.
        Some(unsafe { mmio::read32(self.device.addr + u64::from(off)) })
    }

    /// Reads device configuration bytes `[off, off + 2)` (aligned), or
    /// `None` beyond the structure. For fields at the end of a device's
    /// configuration, where a wider read would cross its end.
    pub fn config16(&self, off: u32) -> Option<u16> {
        if off + 2 > self.device.len {
            return None;
        }
        // SAFETY: inside the mapped device configuration structure.
        Some(unsafe { mmio::read16(self.device.addr + u64::from(off)) })
    }

    /// Reads a 64-bit configuration field consistently (retrying while the
    /// configuration generation changes).
    pub fn config64(&self, off: u32) -> Option<u64> {
        loop {
            let before = self.read8(CONFIG_GENERATION);
            let low = self.config32(off)?;
            let high = self.config32(off + 4)?;
            if self.read8(CONFIG_GENERATION) == before {
                return Some(u64::from(low) | (u64::from(high) << 32));
            }
        }
    }
}
