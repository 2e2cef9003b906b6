//! A minimal virtio-pci driver for tests: it talks to a `VirtioPciDevice`
//! through the same config-space and BAR accesses a guest makes, with rings
//! in a real KVM VM's memory.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use virtio::device::VirtioDevice;
use virtio::transport::common::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use virtio::transport::VirtioPciDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm::interrupts::InterruptRouter;
use vmm::pci::config::{COMMAND_BUS_MASTER, COMMAND_MEMORY, PCI_COMMAND};
use vmm::pci::PciDevice;

pub const MEM_SIZE: usize = 16 << 20;
const BAR: u64 = 0xc000_0000;
const RINGS: u64 = 0x10_0000;
const BUFFERS: u64 = 0x80_0000;
const QSIZE: u16 = 16;

pub struct TestVm {
    _kvm: Kvm,
    pub fd: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub router: Arc<InterruptRouter>,
}

impl TestVm {
    pub fn new() -> TestVm {
        Self::with_memory(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        )
    }

    /// Guest RAM in a memfd, as for vhost-user devices.
    #[allow(dead_code)]
    pub fn new_shared() -> TestVm {
        Self::with_memory(vmm::vm::create_shared_guest_memory(MEM_SIZE as u64).unwrap())
    }

    fn with_memory(mem: GuestMemoryMmap) -> TestVm {
        let kvm = Kvm::new().unwrap();
        let fd = Arc::new(kvm.create_vm().unwrap());
        for (slot, r) in mem.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: `mem` outlives the VM in this struct's drop order.
            unsafe { fd.set_user_memory_region(region) }.unwrap();
        }
        fd.create_irq_chip().unwrap();
        let router = InterruptRouter::new(fd.clone());
        TestVm {
            _kvm: kvm,
            fd,
            mem,
            router,
        }
    }
}

pub struct Driver {
    pub dev: VirtioPciDevice,
    mem: GuestMemoryMmap,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
    queue_sizes: Vec<u16>,
}

impl Driver {
    pub fn new(vm: &TestVm, device: Box<dyn VirtioDevice>) -> Driver {
        let mut dev =
            VirtioPciDevice::new("test", device, vm.fd.clone(), &vm.router, vm.mem.clone())
                .unwrap();
        dev.set_bar_address(0, BAR);
        dev.config_write(
            PCI_COMMAND,
            &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        let bars = dev.decoded_bars();
        dev.bars_changed(&[], &bars);
        Driver {
            dev,
            mem: vm.mem.clone(),
            avail_idx: Vec::new(),
            used_seen: Vec::new(),
            queue_sizes: Vec::new(),
        }
    }

    /// Writes the PCI command register.
    pub fn set_command(&mut self, bits: u16) {
        self.dev.config_write(PCI_COMMAND, &bits.to_le_bytes());
    }

    fn cfg8(&mut self, off: u16) -> u8 {
        let mut b = [0u8];
        self.dev.config_read(off, &mut b);
        b[0]
    }

    /// cfg_type of every vendor capability.
    pub fn vendor_caps(&mut self) -> Vec<u8> {
        let mut types = Vec::new();
        let mut p = self.cfg8(0x34);
        for _ in 0..48 {
            if p == 0 {
                break;
            }
            if self.cfg8(u16::from(p)) == 0x09 {
                types.push(self.cfg8(u16::from(p) + 3));
            }
            p = self.cfg8(u16::from(p) + 1);
        }
        types
    }

    pub fn has_msix(&mut self) -> bool {
        let mut p = self.cfg8(0x34);
        while p != 0 {
            if self.cfg8(u16::from(p)) == 0x11 {
                return true;
            }
            p = self.cfg8(u16::from(p) + 1);
        }
        false
    }

    fn msix_cap(&mut self) -> u16 {
        let mut p = self.cfg8(0x34);
        while self.cfg8(u16::from(p)) != 0x11 {
            p = self.cfg8(u16::from(p) + 1);
        }
        u16::from(p)
    }

    fn w(&mut self, off: u64, v: &[u8]) {
        self.dev.bar_write(0, off, v);
    }

    fn r(&mut self, off: u64, n: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(0, off, &mut b[..n]);
        u64::from_le_bytes(b)
    }

    pub fn status(&mut self) -> u8 {
        self.r(0x14, 1) as u8
    }

    fn set_status(&mut self, s: u8) {
        self.w(0x14, &[s]);
    }

    pub fn device_features(&mut self) -> u64 {
        self.w(0x00, &0u32.to_le_bytes());
        let lo = self.r(0x04, 4);
        self.w(0x00, &1u32.to_le_bytes());
        let hi = self.r(0x04, 4);
        lo | (hi << 32)
    }

    pub fn reset(&mut self) {
        self.set_status(0);
    }

    fn negotiate(&mut self, features: u64) -> Result<(), String> {
        self.set_status(0);
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.w(0x08, &0u32.to_le_bytes());
        self.w(0x0c, &(features as u32).to_le_bytes());
        self.w(0x08, &1u32.to_le_bytes());
        self.w(0x0c, &((features >> 32) as u32).to_le_bytes());
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return Err("FEATURES_OK did not stick".into());
        }
        Ok(())
    }

    fn setup_queues(&mut self, rings_at: u64) {
        let n = self.r(0x12, 2) as u16;
        self.avail_idx = vec![0; usize::from(n)];
        self.used_seen = vec![0; usize::from(n)];
        self.queue_sizes = vec![QSIZE; usize::from(n)];
        for q in 0..n {
            self.w(0x16, &q.to_le_bytes());
            self.w(0x18, &QSIZE.to_le_bytes());
            let base = rings_at + u64::from(q) * 0x4000;
            // Rings may deliberately lie outside memory; zero what exists.
            let _ = self.mem.write_slice(&[0u8; 0x3000], GuestAddress(base));
            self.w(0x20, &base.to_le_bytes());
            self.w(0x28, &(base + 0x1000).to_le_bytes());
            self.w(0x30, &(base + 0x2000).to_le_bytes());
            self.w(0x1a, &(q + 1).to_le_bytes());
            self.w(0x1c, &1u16.to_le_bytes());
        }
        self.w(0x10, &0u16.to_le_bytes());
        // MSI-X on, every vector left masked: raised interrupts stay
        // pending in the PBA, where the test can see them.
        let ctrl = self.msix_cap() + 2;
        for v in 0..=u64::from(n) {
            self.w(0x4000 + v * 16, &0xfee0_0000u32.to_le_bytes());
            self.w(0x4000 + v * 16 + 8, &(0x40 + v as u32).to_le_bytes());
        }
        // As the built-in guest does: a dword write at the capability's
        // start, message control in its upper half.
        self.dev
            .config_write(ctrl - 2, &(0x8000u32 << 16 | 0x11).to_le_bytes());
        let mut c = [0u8; 2];
        self.dev.config_read(ctrl, &mut c);
        assert_eq!(u16::from_le_bytes(c) & 0x8000, 0x8000, "MSI-X enabled");
    }

    /// Full initialisation with `features`; Err if the device refused.
    pub fn init(&mut self, features: u64) -> Result<(), String> {
        self.negotiate(features)?;
        self.setup_queues(RINGS);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        let s = self.status();
        if s & STATUS_DRIVER_OK == 0 || s & 0x40 != 0 {
            return Err(format!("device status {s:#x}"));
        }
        Ok(())
    }

    /// Initialises accepting every offered feature.
    pub fn init_all(&mut self) -> Result<(), String> {
        let f = self.device_features();
        self.init(f)
    }

    /// Initialises with rings past the end of guest memory.
    pub fn init_with_bad_rings(&mut self, features: u64) {
        self.negotiate(features).unwrap();
        self.setup_queues(MEM_SIZE as u64 - 0x100);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    /// Random writes all over the device's registers.
    pub fn scribble(&mut self) {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..4000 {
            let len = [1usize, 2, 4, 8][(next() % 4) as usize];
            let v = next().to_le_bytes();
            let off = match next() % 4 {
                0 => next() % 0x40,
                1 => 0x2000 + next() % 0x1100,
                2 => next() % 0x8000,
                _ => 0x4000 + next() % 0x2100,
            };
            if off == 0x14 && v[0] & STATUS_DRIVER_OK != 0 {
                continue; // keep it to garbage, not a real start
            }
            self.w(off, &v[..len]);
            let mut b = [0u8; 8];
            self.dev.bar_read(0, next() % 0x9000, &mut b[..len]);
            let coff = (next() % 0x1000) as u16;
            if !(0x04..0x28).contains(&coff) {
                self.dev.config_write(coff, &v[..len.min(4)]);
            }
            self.dev
                .config_read((next() % 0x1100) as u16, &mut b[..len.min(4)]);
        }
    }

    /// Posts a chain of (addr, len, writable) buffers on `q`, kicks, and
    /// waits for it to come back; returns the used length.
    fn submit(&mut self, q: u16, bufs: &[(u64, u32, bool)]) -> u32 {
        self.post(q, 0, bufs);
        self.wait_used(q, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("request on queue {q} never completed"))
            .1
    }

    /// Writes a chain into descriptors `first..` of `q`, makes it available
    /// and kicks, without waiting.
    pub fn post(&mut self, q: u16, first: u16, bufs: &[(u64, u32, bool)]) {
        let base = RINGS + u64::from(q) * 0x4000;
        let size = self.queue_sizes[usize::from(q)];
        for (i, &(addr, len, wr)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let index = first + i as u16;
            let flags: u16 = if last { 0 } else { 1 } | if wr { 2 } else { 0 };
            let d = base + u64::from(index) * 16;
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem
                .write_obj(if last { 0u16 } else { index + 1 }, GuestAddress(d + 14))
                .unwrap();
        }
        let idx = self.avail_idx[usize::from(q)];
        self.mem
            .write_obj(
                first,
                GuestAddress(base + 0x1000 + 4 + u64::from(idx % size) * 2),
            )
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(base + 0x1002))
            .unwrap();
        self.avail_idx[usize::from(q)] = idx.wrapping_add(1);
        self.w(0x3000 + u64::from(q) * 4, &q.to_le_bytes());
    }

    /// Waits up to `timeout` for the next used entry of `q`: (id, len).
    pub fn wait_used(&mut self, q: u16, timeout: Duration) -> Option<(u32, u32)> {
        let base = RINGS + u64::from(q) * 0x4000;
        let size = self.queue_sizes[usize::from(q)];
        let start = Instant::now();
        loop {
            let used: u16 = self.mem.read_obj(GuestAddress(base + 0x2002)).unwrap();
            let seen = self.used_seen[usize::from(q)];
            if used != seen {
                let slot = u64::from(seen % size);
                self.used_seen[usize::from(q)] = seen.wrapping_add(1);
                let id = self
                    .mem
                    .read_obj(GuestAddress(base + 0x2004 + slot * 8))
                    .unwrap();
                let len = self
                    .mem
                    .read_obj(GuestAddress(base + 0x2004 + slot * 8 + 4))
                    .unwrap();
                return Some((id, len));
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Guest memory, for buffers.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Scratch buffers start here in guest memory.
    pub const BUFFERS: u64 = BUFFERS;

    fn header(&mut self, kind: u32, sector: u64) -> u64 {
        let h = BUFFERS;
        self.mem.write_obj(kind, GuestAddress(h)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(h + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(h + 8)).unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(BUFFERS + 0x100))
            .unwrap();
        h
    }

    fn status_byte(&self) -> u8 {
        self.mem.read_obj(GuestAddress(BUFFERS + 0x100)).unwrap()
    }

    pub fn blk_write(&mut self, q: u16, sector: u64, data: &[u8]) -> u8 {
        let h = self.header(1, sector);
        self.mem
            .write_slice(data, GuestAddress(BUFFERS + 0x1000))
            .unwrap();
        self.submit(
            q,
            &[
                (h, 16, false),
                (BUFFERS + 0x1000, data.len() as u32, false),
                (BUFFERS + 0x100, 1, true),
            ],
        );
        self.status_byte()
    }

    /// Posts a write of `data` at `sector` without waiting for it.
    pub fn blk_post_write(&mut self, q: u16, sector: u64, data: &[u8]) {
        let h = self.header(1, sector);
        self.mem
            .write_slice(data, GuestAddress(BUFFERS + 0x1000))
            .unwrap();
        self.post(
            q,
            0,
            &[
                (h, 16, false),
                (BUFFERS + 0x1000, data.len() as u32, false),
                (BUFFERS + 0x100, 1, true),
            ],
        );
    }

    pub fn blk_read(&mut self, q: u16, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let h = self.header(0, sector);
        self.mem
            .write_slice(&vec![0x5a; len], GuestAddress(BUFFERS + 0x1000))
            .unwrap();
        self.submit(
            q,
            &[
                (h, 16, false),
                (BUFFERS + 0x1000, len as u32, true),
                (BUFFERS + 0x100, 1, true),
            ],
        );
        let mut out = vec![0u8; len];
        self.mem
            .read_slice(&mut out, GuestAddress(BUFFERS + 0x1000))
            .unwrap();
        (self.status_byte(), out)
    }

    pub fn blk_flush(&mut self, q: u16) -> u8 {
        let h = self.header(4, 0);
        self.submit(q, &[(h, 16, false), (BUFFERS + 0x100, 1, true)]);
        self.status_byte()
    }

    pub fn blk_get_id(&mut self, q: u16) -> Vec<u8> {
        let h = self.header(8, 0);
        self.submit(
            q,
            &[
                (h, 16, false),
                (BUFFERS + 0x1000, 20, true),
                (BUFFERS + 0x100, 1, true),
            ],
        );
        let mut out = vec![0u8; 20];
        self.mem
            .read_slice(&mut out, GuestAddress(BUFFERS + 0x1000))
            .unwrap();
        out
    }

    /// DISCARD (11) or WRITE_ZEROES (13) of one range.
    pub fn blk_ranges(&mut self, q: u16, kind: u32, sector: u64, sectors: u32, flags: u32) -> u8 {
        let h = self.header(kind, 0);
        let seg = BUFFERS + 0x800;
        self.mem.write_obj(sector, GuestAddress(seg)).unwrap();
        self.mem.write_obj(sectors, GuestAddress(seg + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(seg + 12)).unwrap();
        self.submit(
            q,
            &[(h, 16, false), (seg, 16, false), (BUFFERS + 0x100, 1, true)],
        );
        self.status_byte()
    }

    pub fn blk_raw_type(&mut self, q: u16, kind: u32) -> u8 {
        let h = self.header(kind, 0);
        self.submit(q, &[(h, 16, false), (BUFFERS + 0x100, 1, true)]);
        self.status_byte()
    }

    /// Whether queue `q`'s vector has an interrupt pending in the PBA.
    pub fn interrupts(&mut self, q: u16) -> u32 {
        let v = u64::from(q) + 1;
        let word = self.r(0x6000 + (v / 64) * 8, 8);
        ((word >> (v % 64)) & 1) as u32
    }
}
