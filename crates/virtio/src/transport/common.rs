//! The virtio-pci common configuration structure (virtio 1.2 §4.1.4.3) as a
//! state machine: feature windows, queue selection and setup, the device
//! status register. Pure: no guest memory, no file descriptors.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use crate::device::VIRTIO_F_VERSION_1;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

/// One queue's registers.
pub struct QueueRegs {
    pub queue: Queue,
    pub msix_vector: u16,
}

/// What a write did to the device status.
#[derive(Debug, PartialEq, Eq)]
pub enum StatusChange {
    None,
    /// The driver wrote 0: reset the device.
    Reset,
    /// The driver set DRIVER_OK.
    DriverOk,
}

/// One queue's registers and ring positions, as a snapshot keeps them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QueueSection {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub msix_vector: u16,
}

/// The common configuration as a snapshot keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommonSection {
    pub device_features: u64,
    pub driver_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub config_msix_vector: u16,
    pub status: u8,
    pub config_generation: u8,
    pub queue_select: u16,
    pub queues: Vec<QueueSection>,
}

pub struct CommonConfig {
    device_features: u64,
    driver_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    config_msix_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    pub queues: Vec<QueueRegs>,
}

fn new_queue(max: u16) -> Queue {
    // Sizes come from the device (powers of two, ≤ 32768).
    Queue::new(max).unwrap_or_default()
}

impl CommonConfig {
    pub fn new(queue_max_sizes: &[u16], device_features: u64) -> Self {
        CommonConfig {
            device_features,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            config_msix_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: queue_max_sizes
                .iter()
                .map(|&m| QueueRegs {
                    queue: new_queue(m),
                    msix_vector: NO_VECTOR,
                })
                .collect(),
        }
    }

    /// Features the driver accepted (valid once FEATURES_OK stuck).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn set_needs_reset(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// The state for a snapshot; `positions` are the ring positions of
    /// queues a device served (the others are where the driver left them).
    pub fn state(&self, positions: &[(u16, QueueState)]) -> CommonSection {
        CommonSection {
            device_features: self.device_features,
            driver_features: self.driver_features,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            config_msix_vector: self.config_msix_vector,
            status: self.status,
            config_generation: self.config_generation,
            queue_select: self.queue_select,
            queues: self
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    let st = positions
                        .iter()
                        .find(|(idx, _)| usize::from(*idx) == i)
                        .map(|(_, s)| *s)
                        .unwrap_or_else(|| q.queue.state());
                    QueueSection {
                        size: q.queue.size(),
                        ready: q.queue.ready(),
                        desc_table: q.queue.desc_table(),
                        avail_ring: q.queue.avail_ring(),
                        used_ring: q.queue.used_ring(),
                        next_avail: st.next_avail,
                        next_used: st.next_used,
                        msix_vector: q.msix_vector,
                    }
                })
                .collect(),
        }
    }

    /// Loads a saved state into the common configuration of the same
    /// device (same features offered, same queues).
    pub fn set_state(&mut self, s: &CommonSection) -> Result<(), String> {
        if s.device_features != self.device_features {
            return Err(format!(
                "the device offered features {:#x}, this one offers {:#x}",
                s.device_features, self.device_features
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (q, saved)) in self.queues.iter().zip(&s.queues).enumerate() {
            let state = QueueState {
                max_size: q.queue.max_size(),
                next_avail: saved.next_avail,
                next_used: saved.next_used,
                event_idx_enabled: false,
                size: saved.size,
                ready: saved.ready,
                desc_table: saved.desc_table,
                avail_ring: saved.avail_ring,
                used_ring: saved.used_ring,
            };
            let queue = Queue::try_from(state).map_err(|e| format!("queue {i}: {e}"))?;
            queues.push(QueueRegs {
                queue,
                msix_vector: saved.msix_vector,
            });
        }
        *self = CommonConfig {
            device_features: s.device_features,
            driver_features: s.driver_features,
            device_feature_select: s.device_feature_select,
            driver_feature_select: s.driver_feature_select,
            config_msix_vector: s.config_msix_vector,
            status: s.status,
            config_generation: s.config_generation,
            queue_select: s.queue_select,
            queues,
        };
        Ok(())
    }

    /// Back to the reset state (queue sizes return to their maximum).
    pub fn reset(&mut self) {
        let sizes: Vec<u16> = self.queues.iter().map(|q| q.queue.max_size()).collect();
        *self = CommonConfig {
            config_generation: self.config_generation,
            ..CommonConfig::new(&sizes, self.device_features)
        };
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// The 0x40-byte register file as the driver sees it now.
    fn snapshot(&self) -> [u8; 0x40] {
        let mut r = [0u8; 0x40];
        let put = |r: &mut [u8; 0x40], off: usize, bytes: &[u8]| {
            r[off..off + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut r, 0x00, &self.device_feature_select.to_le_bytes());
        let feat = match self.device_feature_select {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        };
        put(&mut r, 0x04, &feat.to_le_bytes());
        put(&mut r, 0x08, &self.driver_feature_select.to_le_bytes());
        let dfeat = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(&mut r, 0x0c, &dfeat.to_le_bytes());
        put(&mut r, 0x10, &self.config_msix_vector.to_le_bytes());
        put(&mut r, 0x12, &(self.queues.len() as u16).to_le_bytes());
        r[0x14] = self.status;
        r[0x15] = self.config_generation;
        put(&mut r, 0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            put(&mut r, 0x18, &q.queue.size().to_le_bytes());
            put(&mut r, 0x1a, &q.msix_vector.to_le_bytes());
            put(&mut r, 0x1c, &u16::from(q.queue.ready()).to_le_bytes());
            put(&mut r, 0x1e, &self.queue_select.to_le_bytes());
            put(&mut r, 0x20, &q.queue.desc_table().to_le_bytes());
            put(&mut r, 0x28, &q.queue.avail_ring().to_le_bytes());
            put(&mut r, 0x30, &q.queue.used_ring().to_le_bytes());
        }
        r
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let snap = self.snapshot();
        let o = offset as usize;
        match snap.get(o..o + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    /// Applies a driver write; says whether the device must reset or start.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> StatusChange {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let v32 = u32::from_le_bytes(v[..4].try_into().unwrap());
        let v16 = v32 as u16;
        let live = self.status & STATUS_DRIVER_OK != 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v32,
            (0x08, 4) => self.driver_feature_select = v32,
            (0x0c, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(v32)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32)
                    }
                    _ => {}
                }
            }
            (0x10, 2) => self.config_msix_vector = v16,
            (0x14, 1) => return self.write_status(v[0]),
            (0x16, 2) => self.queue_select = v16,
            (0x18, 2) if !live => {
                if let Some(q) = self.selected() {
                    if q.queue.try_set_size(v16).is_err() {
                        log::warn!("virtio: driver wrote invalid queue size {v16}");
                    }
                }
            }
            (0x1a, 2) => {
                if let Some(q) = self.selected() {
                    q.msix_vector = v16;
                }
            }
            (0x1c, 2) if !live && v16 == 1 => {
                if let Some(q) = self.selected() {
                    q.queue.set_ready(true);
                }
            }
            (0x20..=0x37, 4 | 8) if !live => self.write_queue_address(offset, data.len(), v),
            _ => log::debug!(
                "virtio: ignored common config write at {offset:#x} ({} bytes)",
                data.len()
            ),
        }
        StatusChange::None
    }

    fn write_queue_address(&mut self, offset: u64, len: usize, v: [u8; 8]) {
        let lo = u32::from_le_bytes(v[..4].try_into().unwrap());
        let hi = u32::from_le_bytes(v[4..].try_into().unwrap());
        let (low, high) = match (offset % 8, len) {
            (0, 8) => (Some(lo), Some(hi)),
            (0, 4) => (Some(lo), None),
            (4, 4) => (None, Some(lo)),
            _ => return,
        };
        let Some(q) = self.selected() else { return };
        match offset & !7 {
            0x20 => q.queue.set_desc_table_address(low, high),
            0x28 => q.queue.set_avail_ring_address(low, high),
            _ => q.queue.set_used_ring_address(low, high),
        }
    }

    fn write_status(&mut self, value: u8) -> StatusChange {
        if value == 0 {
            return StatusChange::Reset;
        }
        let mut value = value | (self.status & STATUS_DEVICE_NEEDS_RESET);
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 {
            let unknown = self.driver_features & !self.device_features;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                log::warn!(
                    "virtio: refusing features {:#x} (offered {:#x})",
                    self.driver_features,
                    self.device_features
                );
                value &= !STATUS_FEATURES_OK;
            }
        }
        // DRIVER_OK only counts after FEATURES_OK.
        if value & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK == 0 {
            value &= !STATUS_DRIVER_OK;
        }
        let driver_ok = newly & STATUS_DRIVER_OK != 0 && value & STATUS_DRIVER_OK != 0;
        self.status = value;
        if driver_ok {
            StatusChange::DriverOk
        } else {
            StatusChange::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(c: &mut CommonConfig, off: u64, v: &[u8]) -> StatusChange {
        c.write(off, v)
    }

    fn r32(c: &CommonConfig, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn feature_windows_and_negotiation() {
        let mut c = CommonConfig::new(&[256, 256], VIRTIO_F_VERSION_1 | (1 << 9));
        w(&mut c, 0x00, &1u32.to_le_bytes());
        assert_eq!(r32(&c, 0x04), 1);
        w(&mut c, 0x00, &0u32.to_le_bytes());
        assert_eq!(r32(&c, 0x04), 1 << 9);
        assert_eq!(r32(&c, 0x12) & 0xffff, 2);
        // Accept an unoffered feature: FEATURES_OK does not stick.
        w(&mut c, 0x0c, &((1u32 << 9) | (1 << 3)).to_le_bytes());
        w(&mut c, 0x08, &1u32.to_le_bytes());
        w(&mut c, 0x0c, &1u32.to_le_bytes());
        w(
            &mut c,
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        );
        assert_eq!(c.status() & STATUS_FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK does not start the device.
        assert_eq!(
            w(
                &mut c,
                0x14,
                &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK]
            ),
            StatusChange::None
        );
        assert_eq!(w(&mut c, 0x14, &[0]), StatusChange::Reset);
        c.reset();
        w(&mut c, 0x08, &0u32.to_le_bytes());
        w(&mut c, 0x0c, &(1u32 << 9).to_le_bytes());
        w(&mut c, 0x08, &1u32.to_le_bytes());
        w(&mut c, 0x0c, &1u32.to_le_bytes());
        w(
            &mut c,
            0x14,
            &[STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK],
        );
        assert_ne!(c.status() & STATUS_FEATURES_OK, 0);
        assert_eq!(c.driver_features(), VIRTIO_F_VERSION_1 | (1 << 9));
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        assert_eq!(w(&mut c, 0x14, &[s]), StatusChange::DriverOk);
        assert_eq!(w(&mut c, 0x14, &[s]), StatusChange::None);
    }

    #[test]
    fn queue_registers_and_bad_sizes() {
        let mut c = CommonConfig::new(&[256], VIRTIO_F_VERSION_1);
        w(&mut c, 0x16, &0u16.to_le_bytes());
        w(&mut c, 0x18, &100u16.to_le_bytes()); // not a power of two
        assert_eq!(r32(&c, 0x18) & 0xffff, 256);
        w(&mut c, 0x18, &512u16.to_le_bytes()); // above the maximum
        assert_eq!(r32(&c, 0x18) & 0xffff, 256);
        w(&mut c, 0x18, &64u16.to_le_bytes());
        assert_eq!(r32(&c, 0x18) & 0xffff, 64);
        w(&mut c, 0x20, &0x1_2345_6000u64.to_le_bytes());
        w(&mut c, 0x28, &0x7000u32.to_le_bytes());
        w(&mut c, 0x2c, &1u32.to_le_bytes());
        w(&mut c, 0x1a, &3u16.to_le_bytes());
        w(&mut c, 0x1c, &1u16.to_le_bytes());
        let mut b = [0u8; 8];
        c.read(0x20, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x1_2345_6000);
        c.read(0x28, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x1_0000_7000);
        assert_eq!(c.queues[0].msix_vector, 3);
        assert!(c.queues[0].queue.ready());
        // A selector past the last queue reads as zero and ignores writes.
        w(&mut c, 0x16, &5u16.to_le_bytes());
        assert_eq!(r32(&c, 0x18), 0);
        w(&mut c, 0x1c, &1u16.to_le_bytes());
        c.reset();
        assert!(!c.queues[0].queue.ready());
        assert_eq!(c.queues[0].queue.size(), 256);
        assert_eq!(c.queues[0].msix_vector, NO_VECTOR);
    }
}
