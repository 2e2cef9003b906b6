//! The split irqchip on a real KVM VM: an IOAPIC pin programmed through the
//! userspace IOAPIC's registers reaches the local APIC when its irqfd is
//! written, and stops reaching it when the entry is masked.

use std::sync::Arc;

use kvm_bindings::{kvm_enable_cap, KVM_CAP_SPLIT_IRQCHIP};
use kvm_ioctls::{Kvm, VcpuFd};
use vmm::bus::BusDevice;
use vmm::devices::ioapic::Ioapic;
use vmm::interrupts::InterruptRouter;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const SVR: usize = 0xf0;
const IRR: usize = 0x200;

fn lapic_reg(vcpu: &VcpuFd, off: usize) -> u32 {
    let l = vcpu.get_lapic().unwrap();
    let b: Vec<u8> = l.regs[off..off + 4].iter().map(|&c| c as u8).collect();
    u32::from_le_bytes(b.try_into().unwrap())
}

fn irr_has(vcpu: &VcpuFd, vector: u8) -> bool {
    let v = usize::from(vector);
    lapic_reg(vcpu, IRR + (v / 32) * 0x10) & (1 << (v % 32)) != 0
}

fn write_entry(io: &mut Ioapic, pin: u32, entry: u64) {
    io.write(0xfec0_0000, 0x00, &(0x10 + 2 * pin).to_le_bytes());
    io.write(0xfec0_0000, 0x10, &(entry as u32).to_le_bytes());
    io.write(0xfec0_0000, 0x00, &(0x11 + 2 * pin).to_le_bytes());
    io.write(0xfec0_0000, 0x10, &((entry >> 32) as u32).to_le_bytes());
}

#[test]
fn a_pin_programmed_in_the_userspace_ioapic_reaches_the_local_apic() {
    if !ringvm_test_devices::kvm_available() {
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    cap.args[0] = 24;
    vm.enable_cap(&cap).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    // Software-enable the local APIC (SVR bit 8), as a guest would.
    let mut lapic = vcpu.get_lapic().unwrap();
    let svr = 0x1ffu32.to_le_bytes();
    for (i, b) in svr.iter().enumerate() {
        lapic.regs[SVR + i] = *b as _;
    }
    vcpu.set_lapic(&lapic).unwrap();

    let router = InterruptRouter::new_split(vm.clone());
    let mut ioapic = Ioapic::new(router.clone());
    let line = EventFd::new(EFD_NONBLOCK).unwrap();
    // As the serial port does: the irqfd first, before any route exists.
    vm.register_irqfd(&line, 4).unwrap();
    line.write(1).unwrap();
    assert!(!irr_has(&vcpu, 0x34), "no route yet: nothing delivered");

    // Pin 4 -> vector 0x34, fixed, physical, edge, to APIC 0.
    write_entry(&mut ioapic, 4, 0x34);
    assert_eq!(router.msi_routes(), 1);
    line.write(1).unwrap();
    assert!(irr_has(&vcpu, 0x34), "the interrupt reached the LAPIC");

    // Masked: the route goes and the next write is not delivered.
    write_entry(&mut ioapic, 5, 0x35);
    write_entry(&mut ioapic, 5, 0x1_0035);
    let other = EventFd::new(EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&other, 5).unwrap();
    other.write(1).unwrap();
    assert!(!irr_has(&vcpu, 0x35), "a masked pin stays silent");
    assert_eq!(router.msi_routes(), 1);
}

fn split_vm() -> Arc<kvm_ioctls::VmFd> {
    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    cap.args[0] = 24;
    vm.enable_cap(&cap).unwrap();
    vm
}

/// Reads (and so clears) an eventfd; false if it was not signalled.
fn took(e: &EventFd) -> bool {
    e.read().is_ok()
}

#[test]
fn level_lines_are_resampled_on_eoi_of_their_vector_and_on_unmask() {
    if !ringvm_test_devices::kvm_available() {
        return;
    }
    let vm = split_vm();
    let _vcpu = vm.create_vcpu(0).unwrap();
    let router = InterruptRouter::new_split(vm.clone());
    let mut ioapic = Ioapic::new(router.clone());
    let line = router.intx_irqfd(16).expect("a level line under split");
    let other = router.intx_irqfd(17).unwrap();
    assert_eq!(router.level_sources(), 2);
    assert!(!took(line.resample()));

    // Pin 16: level, vector 0x60, masked, then unmasked: the unmask
    // resamples the line (an assertion meanwhile was dropped by KVM).
    write_entry(&mut ioapic, 16, 0x1_8060);
    assert!(!took(line.resample()), "a masked entry does not resample");
    write_entry(&mut ioapic, 16, 0x8060);
    assert!(took(line.resample()), "unmasking resamples");
    assert!(!took(other.resample()), "only the pin's own sources");

    // The guest's EOI of the pin's vector resamples it; other vectors do
    // not, nor does an EOI of an edge pin's vector.
    router.end_of_interrupt(0x61);
    assert!(!took(line.resample()));
    router.end_of_interrupt(0x60);
    assert!(took(line.resample()), "EOI of the pin's vector resamples");
    write_entry(&mut ioapic, 17, 0x61);
    assert!(took(other.resample()), "routing pin 17 resamples it");
    router.end_of_interrupt(0x61);
    assert!(!took(other.resample()), "edge entries take no EOI");

    // Masked again: no route, and an EOI of the old vector finds nothing.
    write_entry(&mut ioapic, 16, 0x1_8060);
    router.end_of_interrupt(0x60);
    assert!(!took(line.resample()));

    // Dropping a line takes it off the router.
    drop(line);
    assert_eq!(router.level_sources(), 1);
}
