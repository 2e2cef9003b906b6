//! Attach and detach on a real machine: a vmm `Machine` (real KVM, guest
//! RAM in a memfd) with the vfio-user test device attached through
//! `passthrough::attach`, driven the way a guest would, through ECAM and
//! the MMIO bus; then detached, and checked for every resource it took:
//! memory slots, MSI routes (and so irqfds), DMA maps, the device's
//! eventfds, registry claims.

use ringvm_test_devices::kvm_available;
use std::path::PathBuf;

use passthrough::{attach, Source};
use ringvm_test_devices::vfio_user_dev::{self, reg, Behaviour, Stats};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::SerialOutput;
use vmm::machine::Machine;
use vmm::pci::root::ECAM_START;
use vmm::registry::Resource;
use vmm::{KernelSource, VmConfig};

/// The smallest kernel the loader takes: an ELF64 with one byte (`hlt`)
/// loaded at 1 MiB. The VM is never run.
fn tiny_kernel() -> &'static [u8] {
    let mut e = vec![0u8; 121];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little-endian
    e[6] = 1; // version
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // executable
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = 64;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
    e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // offset
    e[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes());
    e[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    e[ph + 32..ph + 40].copy_from_slice(&1u64.to_le_bytes());
    e[ph + 40..ph + 48].copy_from_slice(&1u64.to_le_bytes());
    e[120] = 0xf4;
    Box::leak(e.into_boxed_slice())
}

fn machine(shared: bool) -> Machine {
    Machine::build(&VmConfig {
        kernel: KernelSource::Builtin(tiny_kernel()),
        initrd: None,
        cmdline: String::new(),
        memory: 64 << 20,
        cpus: 1,
        serial: SerialOutput::Off,
        serial_input: false,
        cpuid_hide: Vec::new(),
        shared_memory: shared,
        irqchip: Default::default(),
        acpi: true,
        seccomp: vmm::seccomp::SeccompMode::Off,
        vcpu_affinity: Vec::new(),
    })
    .expect("building the machine")
}

fn socket(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("pt-machine-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// The guest's view: configuration space through ECAM, BARs through the
/// MMIO bus.
struct Guest<'a> {
    m: &'a Machine,
    slot: u8,
}

impl Guest<'_> {
    fn cfg_addr(&self, off: u16) -> u64 {
        ECAM_START + (u64::from(self.slot) << 15) + u64::from(off)
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let bus = self.m.registry().lock().unwrap().mmio_bus().clone();
        bus.write(addr, data)
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let bus = self.m.registry().lock().unwrap().mmio_bus().clone();
        bus.read(addr, data)
    }

    fn cfg_read32(&self, off: u16) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.mmio_read(self.cfg_addr(off), &mut b));
        u32::from_le_bytes(b)
    }

    fn cfg_write(&self, off: u16, data: &[u8]) {
        assert!(self.mmio_write(self.cfg_addr(off), data));
    }

    fn w32(&self, addr: u64, v: u32) {
        assert!(
            self.mmio_write(addr, &v.to_le_bytes()),
            "no device at {addr:#x}"
        );
    }

    fn r32(&self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.mmio_read(addr, &mut b), "no device at {addr:#x}");
        u32::from_le_bytes(b)
    }
}

fn wait_for(dev: &vfio_user_dev::TestDevice, what: &str, ok: impl Fn(&Stats) -> bool) -> Stats {
    // The device updates its counters before it answers the message that
    // caused them; the loop only covers the session-end bookkeeping.
    for _ in 0..1000 {
        let s = dev.stats();
        if ok(&s) {
            return s;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    panic!("{what}: {:?}", dev.stats());
}

#[test]
fn attach_then_detach_gives_back_everything_it_took() {
    if !kvm_available() {
        return;
    }
    let path = socket("detach");
    let dev = vfio_user_dev::spawn(&path, Behaviour::Good).unwrap();
    let mut m = machine(true);
    let attached = attach(&mut m, "pt0", &Source::User(path.clone())).expect("attach");
    let slot = attached.slot();
    let s = dev.stats();
    assert_eq!((s.clients, s.resets, s.dma_mappings), (1, 1, 1), "{s:?}");
    {
        let reg = m.registry().lock().unwrap();
        let claims = reg.resources("pt0").unwrap();
        assert!(claims.contains(&Resource::PciSlot { bus: 0, slot }));
        if let Some(gsi) = attached.intx_gsi() {
            assert!(claims.contains(&Resource::Gsi(gsi)));
        }
    }

    let g = Guest { m: &m, slot };
    assert_eq!(g.cfg_read32(0), 0x7256_1234);
    let bar0 = u64::from(g.cfg_read32(0x10) & !0xf);
    let bar2 = u64::from(g.cfg_read32(0x18) & !0xf) | (u64::from(g.cfg_read32(0x1c)) << 32);
    // Memory space and bus mastering on: BAR2's window is a KVM slot.
    g.cfg_write(0x04, &0x0006u16.to_le_bytes());
    assert_eq!(m.memory_slots().in_use(), 1);
    assert_eq!(g.r32(bar0 + reg::ID), vfio_user_dev::ID_VALUE);

    // MSI-X on; three vectors routed.
    g.cfg_write(0x42, &0x8000u16.to_le_bytes());
    for v in 0..3u64 {
        let e = bar2 + 0x2000 + 16 * v;
        g.w32(e, 0xfee0_0000);
        g.w32(e + 4, 0);
        g.w32(e + 8, 0x50 + v as u32);
        g.w32(e + 12, 0);
    }
    assert_eq!(m.interrupts().msi_routes(), 3);
    let s = dev.stats();
    assert_eq!(s.irq_fds[2], 8, "every MSI-X eventfd given: {s:?}");
    assert_eq!(s.irq_fds[0], 0, "INTx taken back first: {s:?}");
    g.w32(bar0 + reg::DOORBELL, 1);
    assert_eq!(dev.stats().interrupts, 1);

    // DMA through the memfd-backed guest RAM.
    let mem = m.memory().clone();
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(0x20_0000)).unwrap();
    g.w32(bar0 + reg::DMA_SRC_LO, 0x20_0000);
    g.w32(bar0 + reg::DMA_SRC_HI, 0);
    g.w32(bar0 + reg::DMA_DST_LO, 0x30_0000);
    g.w32(bar0 + reg::DMA_DST_HI, 0);
    g.w32(bar0 + reg::DMA_LEN, 4096);
    g.w32(bar0 + reg::DMA_CMD, reg::DMA_CMD_COPY);
    assert_eq!(g.r32(bar0 + reg::DMA_STATUS), reg::DMA_DONE);
    let mut copy = vec![0u8; 4096];
    mem.read_slice(&mut copy, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(copy, pattern);

    // Detach the device model while the session is still up: what it
    // gave the device comes back through the protocol.
    attached.device().lock().unwrap().detach();
    let s = dev.stats();
    assert_eq!(s.dma_unmaps, 1, "{s:?}");
    assert_eq!(s.dma_mappings, 0, "{s:?}");
    assert_eq!(s.irq_fds, [0; 5], "{s:?}");
    assert_eq!(s.resets, 2, "reset on detach: {s:?}");
    assert_eq!(m.memory_slots().in_use(), 0);
    assert_eq!(m.interrupts().msi_routes(), 0);
    // Then unplug it: slot, BARs and GSI claims go.
    attached.detach(&mut m);
    assert!(m.registry().lock().unwrap().resources("pt0").is_none());
    let g = Guest { m: &m, slot };
    assert_eq!(g.cfg_read32(0), 0xffff_ffff);
    let mut b = [0u8; 4];
    assert!(!g.mmio_write(bar0, &b));
    assert!(!g.mmio_read(bar2 + 0x2000, &mut b));
    // The device model is gone too: the session ends.
    wait_for(&dev, "session end", |s| s.sessions_ended == 1);
}

#[test]
fn vfio_user_needs_shared_guest_memory() {
    if !kvm_available() {
        return;
    }
    let path = socket("anon");
    let dev = vfio_user_dev::spawn(&path, Behaviour::Good).unwrap();
    let mut m = machine(false);
    let e = attach(&mut m, "pt0", &Source::User(path)).err().unwrap();
    let chain: String = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    assert!(chain.contains("shared guest memory"), "{chain}");
    assert!(e.is_bad_input());
    // Refused before the device was touched; nothing left behind.
    assert!(m.registry().lock().unwrap().resources("pt0").is_none());
    assert_eq!(m.interrupts().msi_routes(), 0);
    assert_eq!(m.memory_slots().in_use(), 0);
    let s = wait_for(&dev, "session end", |s| s.sessions_ended == 1);
    assert_eq!((s.resets, s.dma_maps), (0, 0), "{s:?}");
}
