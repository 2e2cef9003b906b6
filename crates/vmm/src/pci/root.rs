//! The PCI root: bus 0 behind configuration mechanism #1 (ports
//! 0xcf8–0xcff) and ECAM, a host bridge at 00:00.0, BAR placement, and the
//! mapping of decoded BARs onto the MMIO bus.

use std::sync::{Arc, Mutex, Weak};

use super::config::{PciConfigSpace, PciIdentity};
use super::{BarRange, PciDevice};
use crate::bus::BusDevice;
use crate::registry::{DeviceRegistry, RegistryError, Resource};
use crate::snapshot::{decode, encode, Snapshot, SnapshotError};

/// Configuration mechanism #1 ports.
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
pub const PCI_CONFIG_PORTS: u16 = 8;
/// ECAM window for bus 0 (1 MiB: 32 devices × 8 functions × 4 KiB).
pub const ECAM_START: u64 = 0xe000_0000;
pub const ECAM_BUS0_SIZE: u64 = 1 << 20;
/// 32-bit BAR window: the start of the PCI hole up to ECAM.
pub const MMIO32_START: u64 = crate::layout::MMIO_HOLE_START;
pub const MMIO32_END: u64 = ECAM_START;
const SLOTS: usize = 32;

/// Errors from the PCI root.
#[derive(Debug, thiserror::Error)]
pub enum PciRootError {
    #[error("all {SLOTS} PCI slots on bus 0 are in use")]
    NoFreeSlot,
    #[error("no room for a {size:#x}-byte BAR of {name:?} in the PCI windows")]
    NoBarSpace { name: String, size: u64 },
    #[error("registering PCI device {name:?}")]
    Registry {
        name: String,
        #[source]
        source: RegistryError,
    },
}

/// A bump allocator over one address window, for naturally aligned BARs.
struct Window {
    next: u64,
    end: u64,
}

impl Window {
    fn alloc(&mut self, size: u64) -> Option<u64> {
        let addr = self.next.checked_add(size - 1)? & !(size - 1);
        let end = addr.checked_add(size)?;
        (end <= self.end).then(|| {
            self.next = end;
            addr
        })
    }
}

/// Routes MMIO bus accesses to a device's BARs. The root keeps `bars` equal
/// to what is on the bus.
struct BarDispatch {
    dev: Arc<Mutex<dyn PciDevice>>,
    bars: Vec<BarRange>,
}

impl BusDevice for BarDispatch {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        match self.bars.iter().find(|b| b.addr == base) {
            Some(b) => lock(&self.dev).bar_read(b.index, offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        if let Some(b) = self.bars.iter().find(|b| b.addr == base) {
            lock(&self.dev).bar_write(b.index, offset, data);
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Slot {
    name: String,
    dev: Arc<Mutex<dyn PciDevice>>,
    dispatch: Arc<Mutex<BarDispatch>>,
}

/// The host bridge at 00:00.0: identity only.
struct HostBridge(PciConfigSpace);

/// A PCI function's face in the registry's snapshot: the function's own
/// [`PciDevice::save_state`], with its name on a refusal.
struct PciFunctionSnapshot {
    name: String,
    dev: Arc<Mutex<dyn PciDevice>>,
}

impl PciFunctionSnapshot {
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
}

impl Snapshot for PciFunctionSnapshot {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        lock(&self.dev).save_state().map_err(|e| self.named(e))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        lock(&self.dev)
            .restore_state(state)
            .map_err(|e| self.named(e))
    }
}

/// The root's own state, under the name of its configuration ports: the
/// address last written to 0xcf8 (a vCPU may be between its two halves
/// of a configuration access).
pub struct PciRootSnapshot(pub Weak<Mutex<PciRoot>>);

impl Snapshot for PciRootSnapshot {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        let addr = self
            .0
            .upgrade()
            .map(|r| lock(&r).config_address)
            .unwrap_or(0);
        encode("pci-config-io", &addr)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let addr: u32 = decode("pci-config-io", state)?;
        if let Some(root) = self.0.upgrade() {
            lock(&root).config_address = addr;
        }
        Ok(())
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.0.write(offset, data)
    }
    fn decoded_bars(&self) -> Vec<BarRange> {
        Vec::new()
    }
    fn bar_read(&mut self, _: u8, _: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
    fn set_bar_address(&mut self, _: u8, _: u64) {}
    fn bar_requests(&self) -> Vec<(u8, u64, bool)> {
        Vec::new()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, SnapshotError> {
        encode("pci-host-bridge", &self.0.state())
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let s = decode("pci-host-bridge", state)?;
        self.0
            .set_state(&s)
            .map_err(|d| SnapshotError::mismatch("pci-host-bridge", d))
    }
}

/// Bus 0 and its devices.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    registry: Arc<Mutex<DeviceRegistry>>,
    mmio32: Window,
    mmio64: Window,
    /// Last address written to 0xcf8.
    config_address: u32,
}

impl PciRoot {
    /// A root whose 64-bit BAR window starts at `mmio64_start`.
    pub fn new(registry: Arc<Mutex<DeviceRegistry>>, mmio64_start: u64, mmio64_size: u64) -> Self {
        let mut root = PciRoot {
            slots: (0..SLOTS).map(|_| None).collect(),
            registry,
            mmio32: Window {
                next: MMIO32_START,
                end: MMIO32_END,
            },
            mmio64: Window {
                next: mmio64_start,
                end: mmio64_start + mmio64_size,
            },
            config_address: 0,
        };
        let bridge = HostBridge(PciConfigSpace::new(PciIdentity {
            vendor: 0x8086,
            device: 0x0d57,
            subsystem_vendor: 0,
            subsystem: 0,
            class: 0x06,
            subclass: 0x00,
            prog_if: 0,
            revision: 0,
        }));
        // Slot 0 is free at this point; the registry is empty of PCI slots.
        let _ = root.add_device_at(0, "pci-host-bridge", Arc::new(Mutex::new(bridge)));
        root
    }

    /// Plugs `dev` into the first free slot, places its BARs and returns
    /// the slot number.
    pub fn add_device(
        &mut self,
        name: &str,
        dev: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<u8, PciRootError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciRootError::NoFreeSlot)?;
        self.add_device_at(slot, name, dev)?;
        Ok(slot as u8)
    }

    fn add_device_at(
        &mut self,
        slot: usize,
        name: &str,
        dev: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), PciRootError> {
        let requests = lock(&dev).bar_requests();
        let mut placed = Vec::new();
        for (index, size, is64) in requests {
            let addr = self
                .mmio32
                .alloc(size)
                .or_else(|| is64.then(|| self.mmio64.alloc(size)).flatten())
                .ok_or_else(|| PciRootError::NoBarSpace {
                    name: name.into(),
                    size,
                })?;
            placed.push((index, addr));
        }
        for (index, addr) in placed {
            lock(&dev).set_bar_address(index, addr);
        }
        let dispatch = Arc::new(Mutex::new(BarDispatch {
            dev: dev.clone(),
            bars: Vec::new(),
        }));
        let bus_dev: Arc<Mutex<dyn BusDevice>> = dispatch.clone();
        lock(&self.registry)
            .add(
                name,
                Some(bus_dev),
                vec![Resource::PciSlot {
                    bus: 0,
                    slot: slot as u8,
                }],
            )
            .map_err(|source| PciRootError::Registry {
                name: name.into(),
                source,
            })?;
        let snap = Arc::new(Mutex::new(PciFunctionSnapshot {
            name: name.into(),
            dev: dev.clone(),
        }));
        // The device was added just above under this name.
        let _ = lock(&self.registry).set_snapshot(name, snap);
        self.slots[slot] = Some(Slot {
            name: name.into(),
            dev,
            dispatch,
        });
        self.update_decoding(slot);
        Ok(())
    }

    /// Every device on the bus with its name, in slot order.
    pub fn devices(&self) -> Vec<(String, Arc<Mutex<dyn PciDevice>>)> {
        self.slots
            .iter()
            .flatten()
            .map(|s| (s.name.clone(), s.dev.clone()))
            .collect()
    }

    /// Unplugs the device in `slot`, releasing its slot and BAR claims.
    pub fn remove_device(&mut self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        let s = self.slots.get_mut(usize::from(slot))?.take()?;
        if let Err(e) = lock(&self.registry).remove(&s.name) {
            log::warn!("removing PCI device {:?}: {e}", s.name);
        }
        Some(s.dev)
    }

    /// After a restore: maps every function's BARs where its restored
    /// configuration space has them (and so moves its ioeventfds there).
    pub fn refresh_decoding(&mut self) {
        for slot in 0..self.slots.len() {
            self.update_decoding(slot);
        }
    }

    /// Brings the bus mapping of `slot`'s BARs in line with what the device
    /// decodes, and tells the device what changed.
    fn update_decoding(&mut self, slot: usize) {
        let Some(s) = &self.slots[slot] else { return };
        let wanted = lock(&s.dev).decoded_bars();
        let old = lock(&s.dispatch).bars.clone();
        if wanted == old {
            return;
        }
        let mut registry = lock(&self.registry);
        for b in old.iter().filter(|b| !wanted.contains(b)) {
            registry.release(
                &s.name,
                Resource::Mmio {
                    base: b.addr,
                    len: b.size,
                },
            );
        }
        let mut now: Vec<BarRange> = old.iter().filter(|b| wanted.contains(b)).copied().collect();
        for b in wanted.iter().filter(|b| !old.contains(b)) {
            match registry.claim(
                &s.name,
                Resource::Mmio {
                    base: b.addr,
                    len: b.size,
                },
            ) {
                Ok(()) => now.push(*b),
                Err(e) => log::warn!("PCI {}: BAR{} not decoded: {e}", s.name, b.index),
            }
        }
        drop(registry);
        lock(&s.dispatch).bars = now.clone();
        lock(&s.dev).bars_changed(&old, &now);
    }

    /// A configuration read of bus 0 device `dev`, function `func`.
    pub fn config_read(&mut self, bus: u8, dev: u8, func: u8, offset: u16, data: &mut [u8]) {
        match self.function(bus, dev, func) {
            Some(s) => lock(&s.dev).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; BAR decoding follows it.
    pub fn config_write(&mut self, bus: u8, dev: u8, func: u8, offset: u16, data: &[u8]) {
        if let Some(s) = self.function(bus, dev, func) {
            lock(&s.dev).config_write(offset, data);
            self.update_decoding(usize::from(dev));
        }
    }

    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<&Slot> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(usize::from(dev))?.as_ref()
    }
}

/// Configuration mechanism #1 on ports 0xcf8–0xcff. It holds the root
/// weakly: the root holds the registry, whose buses hold this device, and
/// a strong reference would keep every PCI device alive forever (the
/// machine owns the root; when it goes, the devices are dropped and reset).
pub struct PciConfigIo(Weak<Mutex<PciRoot>>);

impl PciConfigIo {
    pub fn new(root: &Arc<Mutex<PciRoot>>) -> PciConfigIo {
        PciConfigIo(Arc::downgrade(root))
    }
}

/// Decodes an 0xcf8 address: enabled, bus, device, function, register.
fn conf1_target(address: u32) -> Option<(u8, u8, u8, u16)> {
    (address & 0x8000_0000 != 0).then_some((
        (address >> 16) as u8,
        ((address >> 11) & 0x1f) as u8,
        ((address >> 8) & 0x7) as u8,
        // Bits 27:24 extend the register number (AMD's extended access).
        (((address >> 16) & 0xf00) | (address & 0xfc)) as u16,
    ))
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let Some(root) = self.0.upgrade() else {
            data.fill(0xff);
            return;
        };
        let mut root = lock(&root);
        if offset < 4 {
            let v = root.config_address.to_le_bytes();
            let o = offset as usize;
            let n = data.len().min(4 - o);
            data[..n].copy_from_slice(&v[o..o + n]);
            return;
        }
        match conf1_target(root.config_address) {
            Some((bus, dev, func, reg)) if offset as usize + data.len() <= 8 => {
                root.config_read(bus, dev, func, reg + (offset as u16 - 4), data)
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(root) = self.0.upgrade() else {
            return;
        };
        let mut root = lock(&root);
        if offset == 0 && data.len() == 4 {
            root.config_address = u32::from_le_bytes(data.try_into().unwrap());
            return;
        }
        if offset < 4 {
            return;
        }
        if let Some((bus, dev, func, reg)) = conf1_target(root.config_address) {
            if offset as usize + data.len() <= 8 {
                root.config_write(bus, dev, func, reg + (offset as u16 - 4), data);
            }
        }
    }
}

/// ECAM: each function's 4 KiB configuration space memory-mapped. Holds
/// the root weakly, as [`PciConfigIo`] does.
pub struct PciEcam(Weak<Mutex<PciRoot>>);

impl PciEcam {
    pub fn new(root: &Arc<Mutex<PciRoot>>) -> PciEcam {
        PciEcam(Arc::downgrade(root))
    }
}

fn ecam_target(offset: u64, len: usize) -> Option<(u8, u8, u8, u16)> {
    let reg = (offset & 0xfff) as u16;
    (len <= 4 && (reg as usize) % len == 0).then_some((
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        reg,
    ))
}

impl BusDevice for PciEcam {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (ecam_target(offset, data.len()), self.0.upgrade()) {
            (Some((b, d, f, r)), Some(root)) => lock(&root).config_read(b, d, f, r, data),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some((b, d, f, r)), Some(root)) =
            (ecam_target(offset, data.len()), self.0.upgrade())
        {
            lock(&root).config_write(b, d, f, r, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::pci::config::{BarKind, COMMAND_MEMORY, PCI_COMMAND};

    struct TestDev {
        cfg: PciConfigSpace,
        writes: Vec<(u8, u64, Vec<u8>)>,
        changes: usize,
    }

    impl PciDevice for TestDev {
        fn config_read(&mut self, o: u16, d: &mut [u8]) {
            self.cfg.read(o, d)
        }
        fn config_write(&mut self, o: u16, d: &[u8]) {
            self.cfg.write(o, d)
        }
        fn decoded_bars(&self) -> Vec<BarRange> {
            self.cfg.decoded_bars()
        }
        fn bar_read(&mut self, bar: u8, off: u64, d: &mut [u8]) {
            d.fill(bar * 16 + off as u8)
        }
        fn bar_write(&mut self, bar: u8, off: u64, d: &[u8]) {
            self.writes.push((bar, off, d.to_vec()))
        }
        fn bars_changed(&mut self, _: &[BarRange], _: &[BarRange]) {
            self.changes += 1;
        }
        fn set_bar_address(&mut self, i: u8, a: u64) {
            self.cfg.set_bar_addr(i, a)
        }
        fn bar_requests(&self) -> Vec<(u8, u64, bool)> {
            self.cfg.bar_requests()
        }
    }

    fn setup() -> (Arc<Mutex<PciRoot>>, Arc<Bus>, Arc<Mutex<TestDev>>) {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let registry = Arc::new(Mutex::new(DeviceRegistry::new(pio, mmio.clone())));
        let root = Arc::new(Mutex::new(PciRoot::new(registry, 1 << 40, 1 << 30)));
        let mut cfg = PciConfigSpace::new(PciIdentity {
            vendor: 0x1af4,
            device: 0x1042,
            subsystem_vendor: 0x1af4,
            subsystem: 2,
            class: 1,
            subclass: 0,
            prog_if: 0,
            revision: 1,
        });
        cfg.add_bar(
            0,
            0x4000,
            BarKind::Mem64 {
                prefetchable: false,
            },
        );
        let dev = Arc::new(Mutex::new(TestDev {
            cfg,
            writes: vec![],
            changes: 0,
        }));
        let slot = root
            .lock()
            .unwrap()
            .add_device("virtio-blk0", dev.clone())
            .unwrap();
        assert_eq!(slot, 1);
        (root, mmio, dev)
    }

    fn conf1_read(io: &mut PciConfigIo, dev: u8, reg: u8) -> u32 {
        io.write(
            0xcf8,
            0,
            &(0x8000_0000u32 | (u32::from(dev) << 11) | u32::from(reg)).to_le_bytes(),
        );
        let mut b = [0u8; 4];
        io.read(0xcf8, 4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn enumerates_host_bridge_and_device_through_conf1_and_ecam() {
        let (root, _, _) = setup();
        let mut io = PciConfigIo::new(&root);
        assert_eq!(conf1_read(&mut io, 0, 0), 0x0d57_8086);
        assert_eq!(conf1_read(&mut io, 1, 0), 0x1042_1af4);
        assert_eq!(conf1_read(&mut io, 2, 0), 0xffff_ffff);
        let mut ecam = PciEcam::new(&root);
        let mut b = [0u8; 2];
        ecam.read(ECAM_START, (1 << 15) + 2, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x1042);
        // Misaligned ECAM reads return ones rather than reaching the device.
        ecam.read(ECAM_START, (1 << 15) + 1, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn bars_are_placed_in_the_32bit_window_and_decoded_on_memory_enable() {
        let (root, mmio, dev) = setup();
        let bar = conf1_read(&mut PciConfigIo::new(&root), 1, 0x10);
        assert_eq!(u64::from(bar & !0xf), MMIO32_START);
        let mut b = [0u8];
        assert!(!mmio.read(MMIO32_START, &mut b));
        root.lock()
            .unwrap()
            .config_write(0, 1, 0, PCI_COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert!(mmio.read(MMIO32_START + 3, &mut b));
        assert_eq!(b[0], 3);
        // The guest moves the BAR: the old range is gone, the new one works.
        let new = 0xd000_0000u32;
        root.lock()
            .unwrap()
            .config_write(0, 1, 0, 0x10, &new.to_le_bytes());
        assert!(!mmio.read(MMIO32_START, &mut b));
        assert!(mmio.write(u64::from(new) + 8, &[7]));
        assert_eq!(dev.lock().unwrap().writes, vec![(0, 8, vec![7])]);
        assert_eq!(dev.lock().unwrap().changes, 2);
        // Disabling memory space unmaps it.
        root.lock()
            .unwrap()
            .config_write(0, 1, 0, PCI_COMMAND, &0u16.to_le_bytes());
        assert!(!mmio.write(u64::from(new) + 8, &[7]));
    }

    #[test]
    fn a_bar_moved_onto_another_device_is_not_decoded() {
        let (root, mmio, dev) = setup();
        {
            let r = root.lock().unwrap();
            let mut reg = r.registry.lock().unwrap();
            struct Nothing;
            impl BusDevice for Nothing {
                fn read(&mut self, _: u64, _: u64, d: &mut [u8]) {
                    d.fill(0x11)
                }
                fn write(&mut self, _: u64, _: u64, _: &[u8]) {}
            }
            reg.add(
                "other",
                Some(Arc::new(Mutex::new(Nothing))),
                vec![Resource::Mmio {
                    base: 0xd000_0000,
                    len: 0x1000,
                }],
            )
            .unwrap();
        }
        let mut r = root.lock().unwrap();
        r.config_write(0, 1, 0, 0x10, &0xd000_0000u32.to_le_bytes());
        r.config_write(0, 1, 0, PCI_COMMAND, &COMMAND_MEMORY.to_le_bytes());
        drop(r);
        let mut b = [0u8];
        assert!(mmio.read(0xd000_0000, &mut b));
        assert_eq!(b[0], 0x11, "the other device keeps its range");
        assert!(dev.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn removing_a_device_frees_its_slot_and_bars() {
        let (root, mmio, _) = setup();
        root.lock()
            .unwrap()
            .config_write(0, 1, 0, PCI_COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert!(root.lock().unwrap().remove_device(1).is_some());
        let mut b = [0u8];
        assert!(!mmio.read(MMIO32_START, &mut b));
        assert_eq!(conf1_read(&mut PciConfigIo::new(&root), 1, 0), 0xffff_ffff);
    }
}
