//! The device registry: every device by name, with every resource it claims.
//!
//! Devices are created from configuration and added here with the list of
//! resources they need. A claim that overlaps one already held is refused
//! with an error naming both devices; removing a device releases every claim
//! it held and takes it off the buses.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::bus::{Bus, BusError, SharedDevice};
use crate::snapshot::{Section, SharedSnapshot, SnapshotError};

/// Something a device holds exclusively.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// I/O ports `[base, base + len)`.
    Pio { base: u16, len: u16 },
    /// Guest-physical MMIO `[base, base + len)`.
    Mmio { base: u64, len: u64 },
    /// A PCI device number on a bus.
    PciSlot { bus: u8, slot: u8 },
    /// A global system interrupt (IOAPIC pin or MSI route).
    Gsi(u32),
}

impl Resource {
    /// Whether two claims cannot both be held.
    pub fn conflicts_with(&self, other: &Resource) -> bool {
        fn overlap(a: u64, alen: u64, b: u64, blen: u64) -> bool {
            a < b.saturating_add(blen) && b < a.saturating_add(alen)
        }
        match (self, other) {
            (Resource::Pio { base: a, len: al }, Resource::Pio { base: b, len: bl }) => {
                overlap((*a).into(), (*al).into(), (*b).into(), (*bl).into())
            }
            (Resource::Mmio { base: a, len: al }, Resource::Mmio { base: b, len: bl }) => {
                overlap(*a, *al, *b, *bl)
            }
            (x @ Resource::PciSlot { .. }, y @ Resource::PciSlot { .. }) => x == y,
            (Resource::Gsi(a), Resource::Gsi(b)) => a == b,
            _ => false,
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Pio { base, len } => {
                write!(
                    f,
                    "I/O ports {base:#x}-{:#x}",
                    u32::from(*base) + u32::from(*len) - 1
                )
            }
            Resource::Mmio { base, len } => {
                write!(f, "MMIO {base:#x}-{:#x}", base.saturating_add(len - 1))
            }
            Resource::PciSlot { bus, slot } => write!(f, "PCI slot {bus:02x}:{slot:02x}"),
            Resource::Gsi(gsi) => write!(f, "GSI {gsi}"),
        }
    }
}

/// A device as the registry holds it: its bus face (if any) and its claims.
pub struct DeviceEntry {
    /// The device, if it sits on the PIO or MMIO bus.
    pub bus_device: Option<SharedDevice>,
    /// Everything it claimed.
    pub resources: Vec<Resource>,
    /// Its save/restore interface; a device without one has no state.
    pub snapshot: Option<SharedSnapshot>,
}

/// Errors from the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device name {name:?} is already in use")]
    DuplicateName { name: String },
    #[error("device {new:?} claims {claim}, which device {owner:?} already holds ({held})")]
    Conflict {
        new: String,
        claim: Resource,
        owner: String,
        held: Resource,
    },
    #[error("device {name:?} claims {claim} twice")]
    SelfConflict { name: String, claim: Resource },
    #[error("device {name:?} claims {claim}, which is not a valid range")]
    InvalidClaim { name: String, claim: Resource },
    #[error("device {name:?} claims a bus range but has no bus interface")]
    NoBusDevice { name: String },
    #[error("no device named {name:?}")]
    NoSuchDevice { name: String },
    #[error("adding device {name:?} to a bus")]
    Bus {
        name: String,
        #[source]
        source: BusError,
    },
}

/// All devices of a VM and the resources they hold.
pub struct DeviceRegistry {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    devices: BTreeMap<String, DeviceEntry>,
}

impl DeviceRegistry {
    pub fn new(pio: Arc<Bus>, mmio: Arc<Bus>) -> Self {
        DeviceRegistry {
            pio,
            mmio,
            devices: BTreeMap::new(),
        }
    }

    /// Finds who, if anyone, holds a claim that conflicts with `claim`.
    fn holder_of(&self, claim: &Resource) -> Option<(&str, Resource)> {
        self.devices.iter().find_map(|(name, entry)| {
            entry
                .resources
                .iter()
                .find(|held| held.conflicts_with(claim))
                .map(|held| (name.as_str(), *held))
        })
    }

    /// Adds a device named `name` holding `resources`. Either every claim is
    /// granted and the device is on its buses, or nothing changes.
    pub fn add(
        &mut self,
        name: &str,
        bus_device: Option<SharedDevice>,
        resources: Vec<Resource>,
    ) -> Result<(), RegistryError> {
        if self.devices.contains_key(name) {
            return Err(RegistryError::DuplicateName { name: name.into() });
        }
        for (i, claim) in resources.iter().enumerate() {
            let empty = match claim {
                Resource::Pio { base, len } => {
                    *len == 0 || u32::from(*base) + u32::from(*len) > 0x1_0000
                }
                Resource::Mmio { base, len } => *len == 0 || base.checked_add(*len - 1).is_none(),
                _ => false,
            };
            if empty {
                return Err(RegistryError::InvalidClaim {
                    name: name.into(),
                    claim: *claim,
                });
            }
            if resources[..i].iter().any(|c| c.conflicts_with(claim)) {
                return Err(RegistryError::SelfConflict {
                    name: name.into(),
                    claim: *claim,
                });
            }
            if let Some((owner, held)) = self.holder_of(claim) {
                return Err(RegistryError::Conflict {
                    new: name.into(),
                    claim: *claim,
                    owner: owner.into(),
                    held,
                });
            }
        }
        let on_bus = resources
            .iter()
            .any(|r| matches!(r, Resource::Pio { .. } | Resource::Mmio { .. }));
        if on_bus && bus_device.is_none() {
            return Err(RegistryError::NoBusDevice { name: name.into() });
        }
        if let Some(dev) = &bus_device {
            let mut inserted = Vec::new();
            for claim in &resources {
                let result = match *claim {
                    Resource::Pio { base, len } => self
                        .pio
                        .insert(base.into(), len.into(), dev.clone())
                        .map(|_| (true, u64::from(base))),
                    Resource::Mmio { base, len } => self
                        .mmio
                        .insert(base, len, dev.clone())
                        .map(|_| (false, base)),
                    _ => continue,
                };
                match result {
                    Ok(done) => inserted.push(done),
                    Err(source) => {
                        // The registry and the buses disagree (someone used
                        // the bus directly): undo what this call inserted.
                        for (pio, base) in inserted {
                            self.bus(pio).remove(base);
                        }
                        return Err(RegistryError::Bus {
                            name: name.into(),
                            source,
                        });
                    }
                }
            }
        }
        self.devices.insert(
            name.into(),
            DeviceEntry {
                bus_device,
                resources,
                snapshot: None,
            },
        );
        Ok(())
    }

    fn bus(&self, pio: bool) -> &Bus {
        if pio {
            &self.pio
        } else {
            &self.mmio
        }
    }

    /// Removes a device, releasing all it claimed; returns its entry.
    pub fn remove(&mut self, name: &str) -> Result<DeviceEntry, RegistryError> {
        let entry = self
            .devices
            .remove(name)
            .ok_or_else(|| RegistryError::NoSuchDevice { name: name.into() })?;
        for claim in &entry.resources {
            match *claim {
                Resource::Pio { base, .. } => {
                    self.pio.remove(base.into());
                }
                Resource::Mmio { base, .. } => {
                    self.mmio.remove(base);
                }
                _ => {}
            }
        }
        Ok(entry)
    }

    /// Adds one more claim to device `name` (a PCI BAR being decoded). A
    /// bus range goes on the bus with the device's bus interface.
    pub fn claim(&mut self, name: &str, claim: Resource) -> Result<(), RegistryError> {
        if !self.devices.contains_key(name) {
            return Err(RegistryError::NoSuchDevice { name: name.into() });
        }
        if let Some((owner, held)) = self.holder_of(&claim) {
            return Err(RegistryError::Conflict {
                new: name.into(),
                claim,
                owner: owner.into(),
                held,
            });
        }
        let entry = &self.devices[name];
        let inserted = match (claim, &entry.bus_device) {
            (Resource::Pio { base, len }, Some(dev)) => {
                self.pio.insert(base.into(), len.into(), dev.clone())
            }
            (Resource::Mmio { base, len }, Some(dev)) => self.mmio.insert(base, len, dev.clone()),
            (Resource::Pio { .. } | Resource::Mmio { .. }, None) => {
                return Err(RegistryError::NoBusDevice { name: name.into() })
            }
            _ => Ok(()),
        };
        inserted.map_err(|source| RegistryError::Bus {
            name: name.into(),
            source,
        })?;
        if let Some(e) = self.devices.get_mut(name) {
            e.resources.push(claim);
        }
        Ok(())
    }

    /// Releases one claim of device `name`; returns whether it was held.
    pub fn release(&mut self, name: &str, claim: Resource) -> bool {
        let Some(entry) = self.devices.get_mut(name) else {
            return false;
        };
        let Some(pos) = entry.resources.iter().position(|r| *r == claim) else {
            return false;
        };
        entry.resources.remove(pos);
        match claim {
            Resource::Pio { base, .. } => {
                self.pio.remove(base.into());
            }
            Resource::Mmio { base, .. } => {
                self.mmio.remove(base);
            }
            _ => {}
        }
        true
    }

    /// Gives device `name` its save/restore interface: from now on its
    /// state is a section of every snapshot, under its name.
    pub fn set_snapshot(
        &mut self,
        name: &str,
        handle: SharedSnapshot,
    ) -> Result<(), RegistryError> {
        let entry = self
            .devices
            .get_mut(name)
            .ok_or_else(|| RegistryError::NoSuchDevice { name: name.into() })?;
        entry.snapshot = Some(handle);
        Ok(())
    }

    /// Every device's save/restore interface, by name (sorted). Take them
    /// and drop the registry's lock before calling [`save_all`] or
    /// [`restore_all`]: a device's save or restore may take other locks.
    pub fn snapshot_handles(&self) -> Vec<(String, SharedSnapshot)> {
        self.devices
            .iter()
            .filter_map(|(n, e)| e.snapshot.clone().map(|h| (n.clone(), h)))
            .collect()
    }

    /// The claims of the device called `name`.
    pub fn resources(&self, name: &str) -> Option<&[Resource]> {
        self.devices.get(name).map(|e| e.resources.as_slice())
    }

    /// Names of all devices, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.devices.keys().map(String::as_str)
    }

    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio
    }

    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio
    }
}

/// Every device's state, by name: the first device that cannot be saved
/// fails the whole call.
pub fn save_all(handles: Vec<(String, SharedSnapshot)>) -> Result<Vec<Section>, SnapshotError> {
    handles
        .into_iter()
        .map(|(name, h)| {
            let data = h.lock().unwrap_or_else(|e| e.into_inner()).save()?;
            Ok(Section { name, data })
        })
        .collect()
}

/// Loads `sections` into the devices of the same names; both sides must
/// name exactly the same devices.
pub fn restore_all(
    handles: Vec<(String, SharedSnapshot)>,
    sections: &[Section],
) -> Result<(), SnapshotError> {
    let have: Vec<&str> = handles.iter().map(|(n, _)| n.as_str()).collect();
    let saved: Vec<&str> = sections.iter().map(|s| s.name.as_str()).collect();
    let missing: Vec<&str> = have
        .iter()
        .filter(|n| !saved.contains(n))
        .copied()
        .collect();
    let extra: Vec<&str> = saved
        .iter()
        .filter(|n| !have.contains(n))
        .copied()
        .collect();
    if !missing.is_empty() || !extra.is_empty() || have.len() != saved.len() {
        let mut detail = Vec::new();
        if !extra.is_empty() {
            detail.push(format!(
                "the snapshot has device(s) {} that the configuration lacks",
                extra.join(", ")
            ));
        }
        if !missing.is_empty() {
            detail.push(format!(
                "the configuration has device(s) {} that the snapshot lacks",
                missing.join(", ")
            ));
        }
        if detail.is_empty() {
            detail.push("a device appears twice in the snapshot".into());
        }
        return Err(SnapshotError::mismatch("the devices", detail.join("; ")));
    }
    for (name, h) in handles {
        if let Some(s) = sections.iter().find(|s| s.name == name) {
            h.lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(&s.data)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use std::sync::Mutex;

    struct Dummy;
    impl BusDevice for Dummy {
        fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
            data.fill(0x42);
        }
        fn write(&mut self, _: u64, _: u64, _: &[u8]) {}
    }

    fn registry() -> DeviceRegistry {
        DeviceRegistry::new(Arc::new(Bus::new()), Arc::new(Bus::new()))
    }

    fn dev() -> Option<SharedDevice> {
        Some(Arc::new(Mutex::new(Dummy)))
    }

    #[test]
    fn overlapping_claim_is_refused_naming_both_devices() {
        let mut r = registry();
        r.add(
            "serial0",
            dev(),
            vec![
                Resource::Pio {
                    base: 0x3f8,
                    len: 8,
                },
                Resource::Gsi(4),
            ],
        )
        .unwrap();
        let err = r
            .add(
                "uart-b",
                dev(),
                vec![Resource::Pio {
                    base: 0x3fc,
                    len: 8,
                }],
            )
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("\"uart-b\"") && msg.contains("\"serial0\""),
            "{msg}"
        );
        assert!(msg.contains("0x3fc") && msg.contains("0x3f8"), "{msg}");
        // GSIs, PCI slots and MMIO conflict too.
        assert!(r.add("x", dev(), vec![Resource::Gsi(4)]).is_err());
        r.add("p", dev(), vec![Resource::PciSlot { bus: 0, slot: 3 }])
            .unwrap();
        assert!(r
            .add("q", dev(), vec![Resource::PciSlot { bus: 0, slot: 3 }])
            .is_err());
        r.add(
            "m",
            dev(),
            vec![Resource::Mmio {
                base: 0xd000_0000,
                len: 0x1000,
            }],
        )
        .unwrap();
        assert!(r
            .add(
                "n",
                dev(),
                vec![Resource::Mmio {
                    base: 0xd000_0fff,
                    len: 1
                }]
            )
            .is_err());
        // A refused device leaves nothing behind.
        assert!(r.resources("uart-b").is_none());
        assert!(r.resources("x").is_none());
        assert_eq!(r.pio_bus().len(), 1);
    }

    #[test]
    fn adjacent_claims_and_different_kinds_do_not_conflict() {
        let mut r = registry();
        r.add("a", dev(), vec![Resource::Pio { base: 0x60, len: 1 }])
            .unwrap();
        r.add("b", dev(), vec![Resource::Pio { base: 0x61, len: 1 }])
            .unwrap();
        r.add("c", dev(), vec![Resource::Mmio { base: 0x60, len: 1 }])
            .unwrap();
        r.add("d", dev(), vec![Resource::Gsi(0x60)]).unwrap();
    }

    #[test]
    fn removal_frees_every_resource() {
        let mut r = registry();
        let claims = vec![
            Resource::Pio { base: 0x60, len: 1 },
            Resource::Pio { base: 0x64, len: 1 },
            Resource::Mmio {
                base: 0xd000_0000,
                len: 0x1000,
            },
            Resource::Gsi(1),
            Resource::PciSlot { bus: 0, slot: 1 },
        ];
        r.add("i8042", dev(), claims.clone()).unwrap();
        let mut b = [0u8];
        assert!(r.pio_bus().read(0x64, &mut b));
        let entry = r.remove("i8042").unwrap();
        assert_eq!(entry.resources, claims);
        assert!(r.pio_bus().is_empty() && r.mmio_bus().is_empty());
        assert!(!r.pio_bus().read(0x64, &mut b));
        // Every claim can now be taken by another device.
        r.add("other", dev(), claims).unwrap();
        assert!(matches!(
            r.remove("i8042"),
            Err(RegistryError::NoSuchDevice { .. })
        ));
    }

    #[test]
    fn claims_can_be_added_and_released_one_at_a_time() {
        let mut r = registry();
        r.add("pci0", dev(), vec![Resource::PciSlot { bus: 0, slot: 1 }])
            .unwrap();
        r.add(
            "other",
            dev(),
            vec![Resource::Mmio {
                base: 0x2000,
                len: 0x1000,
            }],
        )
        .unwrap();
        let bar = Resource::Mmio {
            base: 0x1000,
            len: 0x1000,
        };
        r.claim("pci0", bar).unwrap();
        let mut b = [0u8];
        assert!(r.mmio_bus().read(0x1800, &mut b));
        let moved = Resource::Mmio {
            base: 0x1800,
            len: 0x1000,
        };
        assert!(matches!(
            r.claim("pci0", moved),
            Err(RegistryError::Conflict { .. })
        ));
        assert!(r.release("pci0", bar));
        assert!(!r.release("pci0", bar));
        assert!(!r.mmio_bus().read(0x1800, &mut b));
        assert!(matches!(
            r.claim(
                "pci0",
                Resource::Mmio {
                    base: 0x2800,
                    len: 0x1000
                }
            ),
            Err(RegistryError::Conflict { .. })
        ));
        assert!(matches!(
            r.claim("nobody", bar),
            Err(RegistryError::NoSuchDevice { .. })
        ));
    }

    struct Counter(u8);
    impl crate::snapshot::Snapshot for Counter {
        fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
            crate::snapshot::encode("counter", &self.0)
        }
        fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
            self.0 = crate::snapshot::decode("counter", state)?;
            Ok(())
        }
    }

    #[test]
    fn sections_are_saved_and_restored_by_name_and_must_match() {
        let mut r = registry();
        let (a, b) = (
            Arc::new(Mutex::new(Counter(7))),
            Arc::new(Mutex::new(Counter(9))),
        );
        r.add("b", dev(), vec![]).unwrap();
        r.add("a", dev(), vec![]).unwrap();
        r.add("stateless", dev(), vec![]).unwrap();
        r.set_snapshot("a", a.clone()).unwrap();
        r.set_snapshot("b", b.clone()).unwrap();
        assert!(r.set_snapshot("nobody", a.clone()).is_err());
        let sections = save_all(r.snapshot_handles()).unwrap();
        let names: Vec<&str> = sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        a.lock().unwrap().0 = 0;
        b.lock().unwrap().0 = 0;
        restore_all(r.snapshot_handles(), &sections).unwrap();
        assert_eq!((a.lock().unwrap().0, b.lock().unwrap().0), (7, 9));
        // A section for a device this registry lacks, or one missing.
        let mut extra = sections.clone();
        extra.push(Section {
            name: "virtio-blk9".into(),
            data: vec![],
        });
        let e = restore_all(r.snapshot_handles(), &extra).unwrap_err();
        assert!(e.to_string().contains("virtio-blk9"), "{e}");
        let e = restore_all(r.snapshot_handles(), &sections[..1]).unwrap_err();
        assert!(
            e.to_string().contains("the configuration has device(s) b"),
            "{e}"
        );
        // A malformed section is an error, not a panic.
        let mut bad = sections;
        bad[0].data = vec![0xff, 0xff, 0xff];
        assert!(restore_all(r.snapshot_handles(), &bad).is_err());
    }

    #[test]
    fn refuses_duplicate_names_self_overlap_and_empty_ranges() {
        let mut r = registry();
        r.add("a", dev(), vec![]).unwrap();
        assert!(matches!(
            r.add("a", dev(), vec![]),
            Err(RegistryError::DuplicateName { .. })
        ));
        assert!(matches!(
            r.add("b", dev(), vec![Resource::Gsi(3), Resource::Gsi(3)]),
            Err(RegistryError::SelfConflict { .. })
        ));
        assert!(matches!(
            r.add(
                "c",
                dev(),
                vec![Resource::Pio {
                    base: 0xffff,
                    len: 2
                }]
            ),
            Err(RegistryError::InvalidClaim { .. })
        ));
        assert!(matches!(
            r.add("d", None, vec![Resource::Pio { base: 0x80, len: 1 }]),
            Err(RegistryError::NoBusDevice { .. })
        ));
    }
}
