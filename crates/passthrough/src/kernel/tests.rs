//! Kernel VFIO through the fake: the container/group/device and iommufd
//! setup, and the device model over it (with a real KVM VM for routes,
//! irqfds and memory slots).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use kvm_ioctls::Kvm;
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_IRQ_SET_DATA_NONE,
};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm::interrupts::InterruptRouter;
use vmm::memslots::MemorySlots;
use vmm::pci::PciDevice;

use super::fake::{FakeSys, IrqSetCall, GROUP, REGION_SHIFT, SYSFS};
use super::{KernelError, KernelTransport, VfioSys};
use crate::config::ConfigError;
use crate::device::{DeviceError, IrqMode, PassthroughDevice, VmContext};

fn open(sys: &Arc<FakeSys>) -> Result<KernelTransport, KernelError> {
    let dyn_sys: Arc<dyn VfioSys> = sys.clone();
    KernelTransport::open(dyn_sys, Path::new(SYSFS))
}

#[test]
fn container_group_and_device_are_set_up_in_order_and_torn_down() {
    let sys = Arc::new(FakeSys::new());
    let t = open(&sys).unwrap();
    let group = format!("/dev/vfio/{GROUP}");
    assert_eq!(
        sys.calls(),
        vec![
            format!("read_link {SYSFS}/driver"),
            format!("read_dir {SYSFS}/vfio-dev"),
            format!("read_link {SYSFS}/iommu_group"),
            "open /dev/vfio/vfio".into(),
            "get_api_version".into(),
            "check_extension 3".into(),
            format!("open {group}"),
            "group_status".into(),
            "group_set_container".into(),
            "set_iommu 3".into(),
            "group_device_fd 0000:01:00.0".into(),
        ]
    );
    drop(t);
    // The device fd is closed before the group leaves the container.
    assert_eq!(sys.calls().last().unwrap(), "group_unset_container");
}

#[test]
fn refuses_unbound_devices_unviable_groups_and_other_api_versions() {
    let sys = Arc::new(FakeSys::new());
    sys.state().driver = None;
    let e = open(&sys).err().unwrap();
    assert!(
        matches!(&e, KernelError::NotVfioPci { driver, .. } if driver == "no driver"),
        "{e}"
    );
    sys.state().driver = Some("nvme");
    assert!(e.to_string().contains("vfio-pci"));
    assert!(matches!(open(&sys), Err(KernelError::NotVfioPci { .. })));

    let sys = Arc::new(FakeSys::new());
    sys.state().viable = false;
    let e = open(&sys).err().unwrap();
    assert!(
        matches!(e, KernelError::GroupNotViable { group: GROUP }),
        "{e}"
    );
    assert!(!sys.calls().iter().any(|c| c == "group_set_container"));

    let sys = Arc::new(FakeSys::new());
    sys.state().api_version = 1;
    assert!(matches!(
        open(&sys),
        Err(KernelError::ApiVersion { version: 1 })
    ));

    let dyn_sys: Arc<dyn VfioSys> = Arc::new(FakeSys::new());
    assert!(matches!(
        KernelTransport::open(dyn_sys, Path::new("/sys/bus/pci/devices/nonsense")),
        Err(KernelError::BadPath { .. })
    ));
}

#[test]
fn uses_iommufd_where_the_kernel_has_it() {
    let sys = Arc::new(FakeSys::new());
    sys.state().cdev = true;
    sys.state().iommufd_present = true;
    let mut t = open(&sys).unwrap();
    let calls = sys.calls();
    assert!(
        !calls.iter().any(|c| c.contains("/dev/vfio/vfio")),
        "{calls:?}"
    );
    let pos = |name: &str| calls.iter().position(|c| c.starts_with(name)).unwrap();
    assert!(pos("open /dev/vfio/devices/vfio3") < pos("bind_iommufd"));
    assert!(pos("bind_iommufd") < pos("ioas_alloc"));
    assert!(pos("ioas_alloc") < pos("attach_ioas 2"));
    use crate::transport::{DmaRegion, Transport};
    t.dma_map(&DmaRegion {
        iova: 0x1000,
        size: 0x1000,
        host_addr: 0x7000_0000,
        file: None,
    })
    .unwrap();
    assert_eq!(sys.calls().last().unwrap(), "ioas_map 2 0x1000");
    t.dma_unmap(0x1000, 0x1000).unwrap();
    assert!(sys.state().dma.is_empty());

    // A cdev but no /dev/iommu: the container path.
    let sys = Arc::new(FakeSys::new());
    sys.state().cdev = true;
    open(&sys).unwrap();
    assert!(sys.calls().iter().any(|c| c == "group_set_container"));
}

/// A KVM VM with an irqchip, guest RAM in two regions and the allocators.
fn vm() -> Option<VmContext> {
    let Ok(kvm) = Kvm::new() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "/dev/kvm is not usable and CI=true"
        );
        eprintln!("skipping: /dev/kvm is not usable");
        return None;
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let memory = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 1 << 20),
        (GuestAddress(1 << 32), 1 << 20),
    ])
    .unwrap();
    Some(VmContext {
        router: InterruptRouter::new(vm.clone()),
        slots: MemorySlots::new(vm, 0, 32),
        memory,
    })
}

fn attach(sys: &Arc<FakeSys>, ctx: &VmContext) -> Result<PassthroughDevice, DeviceError> {
    PassthroughDevice::new("pt0", Box::new(open(sys).unwrap()), ctx.clone())
}

fn rd(d: &mut PassthroughDevice, off: u16, len: usize) -> u32 {
    let mut b = [0u8; 4];
    d.config_read(off, &mut b[..len]);
    u32::from_le_bytes(b)
}

fn wr(d: &mut PassthroughDevice, off: u16, v: u32, len: usize) {
    d.config_write(off, &v.to_le_bytes()[..len]);
}

fn bar_wr(d: &mut PassthroughDevice, bar: u8, off: u64, v: u32) {
    d.bar_write(bar, off, &v.to_le_bytes());
}

fn pba(d: &mut PassthroughDevice) -> u64 {
    let mut b = [0u8; 8];
    d.bar_read(2, 0x3000, &mut b);
    u64::from_le_bytes(b)
}

/// The device's copy of the eventfd of `vector` of interrupt `index`.
fn raise(sys: &FakeSys, index: u32, vector: u32) {
    let s = sys.state();
    let mut f = &s.irq_fds[&(index, vector)];
    std::io::Write::write_all(&mut f, &1u64.to_ne_bytes()).unwrap();
}

#[test]
fn attach_saves_resets_and_maps_dma_and_detach_restores_everything() {
    let Some(ctx) = vm() else { return };
    let sys = Arc::new(FakeSys::new());
    {
        let mut s = sys.state();
        s.config[0x04] = 0x06;
        s.config[0x10..0x14].copy_from_slice(&0xfe00_0000u32.to_le_bytes());
        s.config[0x3c] = 0x0b;
    }
    let saved = sys.state().config;
    let mut d = attach(&sys, &ctx).unwrap();
    assert_eq!(sys.state().resets, 1);
    // Reset after the state was saved.
    let calls = sys.calls();
    let last_config_read = calls.iter().rposition(|c| c == "config read 0xfc").unwrap();
    assert!(calls.iter().position(|c| c == "reset").unwrap() > last_config_read);
    // Every RAM region is mapped at IOVA = guest physical address.
    let dma = sys.state().dma.clone();
    assert_eq!(dma.len(), 2);
    for r in ctx.memory.iter() {
        assert_eq!(
            dma[&r.start_addr().0],
            (r.len(), r.as_ptr() as u64),
            "region at {:#x}",
            r.start_addr().0
        );
    }
    assert_eq!(d.dma_mappings().len(), 2);
    // The guest programs the device.
    wr(&mut d, 0x04, 0x0002, 2);
    wr(&mut d, 0x42, 0x8000, 2);
    assert_eq!(sys.state().config[0x04], 0x02);
    d.detach();
    let s = sys.state();
    assert_eq!(s.resets, 2);
    assert!(s.dma.is_empty(), "DMA maps left: {:?}", s.dma);
    assert_eq!(s.config[0x04..0x06], saved[0x04..0x06]);
    assert_eq!(s.config[0x10..0x28], saved[0x10..0x28]);
    assert_eq!(s.config[0x3c], 0x0b);
    // The command register is restored last.
    let w = &s.config_writes;
    assert_eq!(w.last().unwrap().0, 0x04);
    // Interrupts were switched off before the reset.
    let off = s
        .irq_sets
        .iter()
        .rposition(|c| c.index == 2 && c.count == 0)
        .unwrap();
    assert_eq!(off, s.irq_sets.len() - 1);
    drop(s);
    assert_eq!(ctx.router.msi_routes(), 0);
    assert_eq!(ctx.slots.in_use(), 0);
    // Config reads after detach see no device.
    assert_eq!(rd(&mut d, 0, 4), 0xffff_ffff);
}

#[test]
fn capabilities_we_cannot_support_are_unlinked_and_emulated_fields_hold() {
    let Some(ctx) = vm() else { return };
    let sys = Arc::new(FakeSys::new());
    let mut d = attach(&sys, &ctx).unwrap();
    assert_eq!(rd(&mut d, 0, 4), 0x7256_1234);
    assert_ne!(rd(&mut d, 0x06, 2) & 0x10, 0);
    // Walk the list as a guest does.
    let mut chain = Vec::new();
    let mut p = rd(&mut d, 0x34, 1) as u16;
    while p != 0 && chain.len() < 64 {
        chain.push((p, rd(&mut d, p, 1)));
        p = rd(&mut d, p + 1, 1) as u16;
    }
    assert_eq!(chain, vec![(0x40, 0x11), (0x50, 0x05), (0x60, 0x09)]);
    // No extended capabilities, no ROM.
    assert_eq!(rd(&mut d, 0x100, 4), 0);
    assert_eq!(rd(&mut d, 0x30, 4), 0);
    // MSI-X: table size 8, BIR/offsets from the device.
    assert_eq!(rd(&mut d, 0x42, 2), 7);
    assert_eq!(rd(&mut d, 0x44, 4), 0x2002);

    let writes_before = sys.state().config_writes.len();
    wr(&mut d, 0x44, 0xdead_0000, 4); // MSI-X table offset/BIR
    wr(&mut d, 0x40, 0xffff, 2); // ID and next pointer
    wr(&mut d, 0x72, 0xffff, 2); // the hidden PCIe capability
    wr(&mut d, 0x00, 0xffff_ffff, 4); // vendor/device
    wr(&mut d, 0x3d, 0xff, 1); // interrupt pin
    assert_eq!(sys.state().config_writes.len(), writes_before);
    assert_eq!(rd(&mut d, 0x44, 4), 0x2002);
    assert_eq!(rd(&mut d, 0x40, 2), 0x5011);
    assert_eq!(rd(&mut d, 0, 4), 0x7256_1234);
    // MSI-X control keeps its read-only table size.
    wr(&mut d, 0x42, 0x3fff, 2);
    assert_eq!(rd(&mut d, 0x42, 2), 7);
    // A kept capability's body and the status register reach the device.
    wr(&mut d, 0x62, 0xab, 1);
    wr(&mut d, 0x06, 0xf900, 2);
    let s = sys.state();
    assert!(s.config_writes.contains(&(0x62, vec![0xab])));
    assert!(s.config_writes.contains(&(0x06, vec![0x00, 0xf9])));
}

#[test]
fn bars_are_sized_from_regions_and_mappings_follow_relocation() {
    let Some(ctx) = vm() else { return };
    let sys = Arc::new(FakeSys::new());
    sys.backing()
        .write_at(&0x5256_4d31u32.to_le_bytes(), 0)
        .unwrap();
    let mut d = attach(&sys, &ctx).unwrap();
    assert_eq!(
        d.bar_requests(),
        vec![(0, 0x1000, false), (2, 0x4000, true)]
    );
    wr(&mut d, 0x10, 0xffff_ffff, 4);
    assert_eq!(rd(&mut d, 0x10, 4), 0xffff_f000);
    wr(&mut d, 0x18, 0xffff_ffff, 4);
    wr(&mut d, 0x1c, 0xffff_ffff, 4);
    assert_eq!(rd(&mut d, 0x18, 4), 0xffff_c004);
    assert_eq!(rd(&mut d, 0x1c, 4), 0xffff_ffff);
    // Unimplemented BARs read zero.
    wr(&mut d, 0x20, 0xffff_ffff, 4);
    assert_eq!(rd(&mut d, 0x20, 4), 0);

    wr(&mut d, 0x10, 0xd000_0000, 4);
    wr(&mut d, 0x18, 0xd010_0000, 4);
    wr(&mut d, 0x1c, 0, 4);
    assert!(d.decoded_bars().is_empty());
    wr(&mut d, 0x04, 0x0002, 2);
    let now = d.decoded_bars();
    assert_eq!(now.len(), 2);
    d.bars_changed(&[], &now);
    // BAR2's mmappable area, without the MSI-X table and PBA pages.
    assert_eq!(d.mapped_ranges(), vec![(0xd010_0000, 0x2000)]);
    assert_eq!(ctx.slots.in_use(), 1);
    // The guest moves BAR2: the slot follows.
    wr(&mut d, 0x18, 0xd020_0000, 4);
    let moved = d.decoded_bars();
    d.bars_changed(&now, &moved);
    assert_eq!(d.mapped_ranges(), vec![(0xd020_0000, 0x2000)]);
    assert_eq!(ctx.slots.in_use(), 1);
    // BAR0 is region read/write.
    let mut b = [0u8; 4];
    d.bar_read(0, 0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x5256_4d31);
    bar_wr(&mut d, 0, 4, 7);
    let mut back = [0u8; 4];
    sys.backing().read_at(&mut back, 4).unwrap();
    assert_eq!(u32::from_le_bytes(back), 7);
    // BAR2's mapped part is the device's memory.
    bar_wr(&mut d, 2, 0x10, 0x1234_5678);
    sys.backing()
        .read_at(&mut back, (2 << REGION_SHIFT) + 0x10)
        .unwrap();
    assert_eq!(u32::from_le_bytes(back), 0x1234_5678);
    // Memory space off: nothing mapped.
    wr(&mut d, 0x04, 0, 2);
    d.bars_changed(&moved, &d.decoded_bars());
    assert!(d.mapped_ranges().is_empty());
    assert_eq!(ctx.slots.in_use(), 0);
}

#[test]
fn msix_table_writes_route_vectors_and_masks_keep_them_silent() {
    let Some(ctx) = vm() else { return };
    let sys = Arc::new(FakeSys::new());
    let mut d = attach(&sys, &ctx).unwrap();
    wr(&mut d, 0x42, 0x8000, 2);
    assert_eq!(d.irq_mode(), IrqMode::Msix);
    assert_eq!(
        sys.state().irq_sets.last().unwrap(),
        &IrqSetCall {
            index: 2,
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            start: 0,
            count: 8,
            fds: 8
        }
    );
    // Vector 0 unmasked, vector 1 programmed but masked.
    for (v, unmask) in [(0u64, true), (1, false)] {
        bar_wr(&mut d, 2, 0x2000 + 16 * v, 0xfee0_0000);
        bar_wr(&mut d, 2, 0x2004 + 16 * v, 0);
        bar_wr(&mut d, 2, 0x2008 + 16 * v, 0x40 + v as u32);
        if unmask {
            bar_wr(&mut d, 2, 0x200c + 16 * v, 0);
        }
    }
    assert_eq!(ctx.router.msi_routes(), 2);
    let mut e = [0u8; 4];
    d.bar_read(2, 0x2008, &mut e);
    assert_eq!(u32::from_le_bytes(e), 0x40);
    // The device raises both: vector 0 goes to KVM, vector 1 is pending.
    raise(&sys, 2, 0);
    raise(&sys, 2, 1);
    assert_eq!(pba(&mut d), 0b10);
    // Unmasking vector 1 delivers it: no longer pending.
    bar_wr(&mut d, 2, 0x201c, 0);
    assert_eq!(pba(&mut d), 0);
    // The function mask silences every vector.
    wr(&mut d, 0x42, 0xc000, 2);
    raise(&sys, 2, 0);
    assert_eq!(pba(&mut d), 0b01);
    wr(&mut d, 0x42, 0x8000, 2);
    assert_eq!(pba(&mut d), 0);
    // A garbage table address removes the route.
    bar_wr(&mut d, 2, 0x2000, 0x1234_0000);
    assert_eq!(ctx.router.msi_routes(), 1);
    // PBA writes are ignored; accesses past the table read ones.
    bar_wr(&mut d, 2, 0x3000, 0xffff_ffff);
    assert_eq!(pba(&mut d), 0);
    // Disabling MSI-X takes the eventfds back from the device.
    wr(&mut d, 0x42, 0, 2);
    assert_eq!(d.irq_mode(), IrqMode::None);
    assert_eq!(
        sys.state().irq_sets.last().unwrap(),
        &IrqSetCall {
            index: 2,
            flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
            start: 0,
            count: 0,
            fds: 0
        }
    );
    drop(d);
    assert_eq!(ctx.router.msi_routes(), 0);
}

#[test]
fn msi_and_intx_take_turns_with_msix() {
    let Some(ctx) = vm() else { return };
    let sys = Arc::new(FakeSys::new());
    let mut d = attach(&sys, &ctx).unwrap();
    assert!(d.wants_intx());
    // No INTx line until one is given: the pin reads 0.
    assert_eq!(rd(&mut d, 0x3d, 1), 0);
    d.enable_intx(20).unwrap();
    assert_eq!(d.irq_mode(), IrqMode::Intx);
    assert_eq!((rd(&mut d, 0x3c, 1), rd(&mut d, 0x3d, 1)), (20, 1));
    {
        let s = sys.state();
        let n = s.irq_sets.len();
        assert_eq!(
            s.irq_sets[n - 2..],
            [
                IrqSetCall {
                    index: 0,
                    flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                    start: 0,
                    count: 1,
                    fds: 1
                },
                IrqSetCall {
                    index: 0,
                    flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
                    start: 0,
                    count: 1,
                    fds: 1
                }
            ]
        );
    }
    // INTx disabled in the command register: nothing signalled.
    wr(&mut d, 0x04, 0x0400, 2);
    assert_eq!(d.irq_mode(), IrqMode::None);
    wr(&mut d, 0x04, 0, 2);
    assert_eq!(d.irq_mode(), IrqMode::Intx);
    // MSI: INTx goes first, then the vector is routed and given.
    wr(&mut d, 0x54, 0xfee0_0000, 4);
    wr(&mut d, 0x58, 0, 4);
    wr(&mut d, 0x5c, 0x45, 2);
    wr(&mut d, 0x52, 1, 2);
    assert_eq!(d.irq_mode(), IrqMode::Msi);
    assert_eq!(rd(&mut d, 0x52, 2), 0x81);
    assert_eq!(ctx.router.msi_routes(), 1);
    {
        let s = sys.state();
        let n = s.irq_sets.len();
        assert_eq!((s.irq_sets[n - 2].index, s.irq_sets[n - 2].count), (0, 0));
        assert_eq!((s.irq_sets[n - 1].index, s.irq_sets[n - 1].count), (1, 1));
    }
    // MSI-X wins over MSI.
    wr(&mut d, 0x42, 0x8000, 2);
    assert_eq!(d.irq_mode(), IrqMode::Msix);
    wr(&mut d, 0x42, 0, 2);
    assert_eq!(d.irq_mode(), IrqMode::Msi);
    wr(&mut d, 0x52, 0, 2);
    assert_eq!(d.irq_mode(), IrqMode::Intx);
    d.detach();
    assert_eq!(sys.state().irq_sets.last().unwrap().count, 0);
    assert_eq!(ctx.router.msi_routes(), 0);
}

#[test]
fn a_device_that_lies_is_refused_before_it_is_touched() {
    let Some(ctx) = vm() else { return };
    let sys = Arc::new(FakeSys::new());
    sys.state().regions[0].size = 0x1800;
    let e = attach(&sys, &ctx).err().unwrap();
    assert!(
        matches!(
            &e,
            DeviceError::Config {
                source: ConfigError::BarSize {
                    index: 0,
                    size: 0x1800
                },
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("pt0"), "{e}");
    let s = sys.state();
    assert_eq!(s.resets, 0);
    assert!(s.dma.is_empty());
    drop(s);

    let sys = Arc::new(FakeSys::new());
    sys.state().config[0x61] = 0x40;
    assert!(matches!(
        attach(&sys, &ctx),
        Err(DeviceError::Config {
            source: ConfigError::CapLoop { .. },
            ..
        })
    ));
    let sys = Arc::new(FakeSys::new());
    sys.state().irq_counts[2] = 4;
    assert!(matches!(
        attach(&sys, &ctx),
        Err(DeviceError::MsixCount { .. })
    ));
    assert_eq!(sys.state().resets, 0);
    assert_eq!(ctx.router.msi_routes(), 0);
    assert_eq!(ctx.slots.in_use(), 0);
}
