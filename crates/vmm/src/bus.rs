//! Address-range buses for PIO and MMIO exits.
//!
//! A bus maps non-overlapping `[base, base + len)` ranges to devices. vCPU
//! threads look up the range holding an exit's address and call the device
//! with the offset into that range. Claims are checked by the
//! [`DeviceRegistry`](crate::registry::DeviceRegistry) before anything is
//! inserted here, so the bus itself only refuses what would corrupt the map.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a bus.
///
/// `base` is the start of the range the access hit (a device may sit on
/// several ranges, like the i8042 at 0x60 and 0x64), `offset` the distance
/// from it. Reads fill all of `data`.
pub trait BusDevice: Send {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A shared, lockable bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from inserting into a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("range {base:#x}+{len:#x} overlaps an existing range at {existing:#x}")]
    Overlap { base: u64, len: u64, existing: u64 },
}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A range map from addresses to devices.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `device` at `[base, base + len)`.
    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        if let Some((&start, entry)) = ranges.range(..base + len).next_back() {
            if start + entry.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    existing: start,
                });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the range starting at `base`; returns whether one was there.
    pub fn remove(&self, base: u64) -> bool {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges.remove(&base).is_some()
    }

    fn lookup(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&start, entry) = ranges.range(..=addr).next_back()?;
        (addr - start < entry.len).then(|| (start, entry.device.clone()))
    }

    /// Dispatches a read; returns false (leaving `data` untouched) if no
    /// device covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Number of ranges on the bus.
    pub fn len(&self) -> usize {
        self.ranges.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x60, 1, dev.clone()).unwrap();
        bus.insert(0x64, 1, dev.clone()).unwrap();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x64, &[0xfe]));
        assert!(!bus.write(0x61, &[0]));
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(dev.lock().unwrap().0, vec![(0x64, 0, vec![0xfe])]);
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x10f, 1, dev.clone()),
            Err(BusError::Overlap {
                existing: 0x100,
                ..
            })
        ));
        assert!(matches!(
            bus.insert(0xf8, 0x10, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(0x110, 1, dev.clone()).is_ok());
        assert!(bus.insert(0, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        assert!(bus.remove(0x100));
        assert!(bus.insert(0x10f, 1, dev).is_ok());
    }
}
