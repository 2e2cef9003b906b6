//! The whole virtio-pci transport under a guest's accesses: PCI
//! configuration space (command register, BARs, the MSI-X capability's
//! message control, the VIRTIO_PCI_CAP_PCI_CFG access window), and BAR0:
//! common configuration, ISR, device configuration, notify, the MSI-X
//! vector table and the pending-bit array. MSI-X vectors are real GSI
//! routes and irqfds on a KVM VM (one VM for every input), so this target
//! needs /dev/kvm. The device behind the transport is a fixed two-queue
//! device whose activation succeeds or fails as the input says.
//!
//! Input: a flags byte, then 13-byte operations: kind (its top bit picks
//! BAR 1, which does not exist, over BAR 0), offset (3 bytes LE), length
//! code (1, 2, 4 or 8 bytes), then 8 value bytes.
#![no_main]

use std::sync::{Arc, OnceLock};

use kvm_ioctls::{Kvm, VmFd};
use libfuzzer_sys::fuzz_target;
use virtio::device::{read_config_space, ActivateError, QueueInit, VirtioDevice};
use virtio::transport::VirtioPciDevice;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::interrupts::InterruptRouter;
use vmm::pci::config::{COMMAND_BUS_MASTER, COMMAND_MEMORY, PCI_COMMAND};
use vmm::pci::PciDevice;

const BAR: u64 = 0xc000_0000;

struct Vm {
    _kvm: Kvm,
    fd: Arc<VmFd>,
    router: Arc<InterruptRouter>,
    mem: GuestMemoryMmap,
}

fn vm() -> &'static Vm {
    static VM: OnceLock<Vm> = OnceLock::new();
    VM.get_or_init(|| {
        let kvm = Kvm::new().expect("/dev/kvm");
        let fd = Arc::new(kvm.create_vm().expect("creating a VM"));
        fd.create_irq_chip().expect("creating the irqchip");
        let router = InterruptRouter::new(fd.clone());
        // Rings are checked against this memory; it is never given to KVM
        // (no vCPU runs).
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Vm {
            _kvm: kvm,
            fd,
            router,
            mem,
        }
    })
}

/// A device that only records what the transport hands it.
struct Harness {
    config: Vec<u8>,
    fail_activate: bool,
    active: bool,
}

impl VirtioDevice for Harness {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 64]
    }
    fn features(&self) -> u64 {
        (1 << 28) | (1 << 29) | (1 << 6)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<QueueInit>,
    ) -> Result<(), ActivateError> {
        assert!(!self.active, "activated twice without a reset");
        assert!(queues.len() <= 2);
        if self.fail_activate {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: 2,
            });
        }
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.active = false;
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&first, ops)) = input.split_first() else {
        return;
    };
    let vm = vm();
    let device = Harness {
        config: (0u8..60).collect(),
        fail_activate: first & 1 != 0,
        active: false,
    };
    let mut dev = VirtioPciDevice::new(
        "fuzz",
        Box::new(device),
        vm.fd.clone(),
        &vm.router,
        vm.mem.clone(),
    )
    .expect("building the transport");
    if first & 2 == 0 {
        // As the firmware leaves it: BAR0 placed, memory and DMA on.
        dev.set_bar_address(0, BAR);
        dev.config_write(
            PCI_COMMAND,
            &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes(),
        );
        let bars = dev.decoded_bars();
        dev.bars_changed(&[], &bars);
    }
    let mut bars = dev.decoded_bars();
    for op in ops.chunks_exact(13) {
        let offset = u32::from_le_bytes([op[1], op[2], op[3], 0]);
        let len = [1usize, 2, 4, 8][usize::from(op[4] % 4)];
        let value = &op[5..13][..len];
        let bar = op[0] >> 7;
        let mut buf = [0u8; 8];
        match (op[0] & 0x7f) % 6 {
            0 => {
                let offset = (offset % 0x100) as u16;
                let len = len.min(4);
                dev.config_write(offset, &value[..len]);
                let now = dev.decoded_bars();
                if now != bars {
                    dev.bars_changed(&bars, &now);
                    bars = now;
                }
            }
            1 => dev.config_read((offset % 0x1000) as u16, &mut buf[..len.min(4)]),
            2 => dev.bar_write(bar, u64::from(offset % 0x8000), value),
            3 => dev.bar_read(bar, u64::from(offset % 0x8000), &mut buf[..len]),
            4 => {
                // Straight at the MSI-X table and PBA, where most of the
                // guest's writes land.
                let o = 0x4000 + u64::from(offset % 0x2100);
                if bar == 0 {
                    dev.bar_write(0, o, value);
                } else {
                    dev.bar_read(0, o, &mut buf[..len]);
                }
            }
            _ => {
                let _ = dev.pause();
                let _ = dev.resume();
            }
        }
    }
});
