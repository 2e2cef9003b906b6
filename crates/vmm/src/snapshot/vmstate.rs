//! The VM's own KVM state: the KVM clock and, with the in-kernel irqchip,
//! the two 8259 PICs, the IOAPIC and the PIT. (With `--irqchip split` the
//! IOAPIC is a device, `ioapic`, with its own section; there is no PIC
//! and no PIT.)

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;
use crate::config::IrqChip;

/// The in-kernel interrupt controllers and timer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelIrqchip {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmKvmState {
    /// The clock as saved when the VM paused; set again on resume.
    pub clock: kvm_clock_data,
    /// Present with `--irqchip kernel`.
    pub irqchip: Option<KernelIrqchip>,
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm {
        op,
        what: "the VM".into(),
        source,
    }
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Saves the VM's KVM state; `clock` is the clock the pause saved.
pub fn save_vm(
    vm: &VmFd,
    irqchip: IrqChip,
    clock: kvm_clock_data,
) -> Result<VmKvmState, SnapshotError> {
    let irqchip = match irqchip {
        IrqChip::Split => None,
        IrqChip::Kernel => Some(KernelIrqchip {
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
        }),
    };
    Ok(VmKvmState { clock, irqchip })
}

/// Loads the interrupt controllers and timer of `state` into a new VM
/// built with `irqchip` (the clock is set when the VM resumes).
pub fn restore_vm(vm: &VmFd, irqchip: IrqChip, state: &VmKvmState) -> Result<(), SnapshotError> {
    match (irqchip, &state.irqchip) {
        (IrqChip::Split, None) => Ok(()),
        (IrqChip::Kernel, Some(k)) => {
            for (c, id) in [
                (&k.pic_master, KVM_IRQCHIP_PIC_MASTER),
                (&k.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
                (&k.ioapic, KVM_IRQCHIP_IOAPIC),
            ] {
                if c.chip_id != id {
                    return Err(SnapshotError::mismatch(
                        "the in-kernel irqchip",
                        format!("chip {} saved where chip {id} belongs", c.chip_id),
                    ));
                }
                vm.set_irqchip(c).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
            }
            vm.set_pit2(&k.pit).map_err(kvm_err("KVM_SET_PIT2"))
        }
        (IrqChip::Split, Some(_)) => Err(SnapshotError::mismatch(
            "the VM",
            "it was saved with --irqchip kernel, the configuration says split",
        )),
        (IrqChip::Kernel, None) => Err(SnapshotError::mismatch(
            "the VM",
            "it was saved with --irqchip split, the configuration says kernel",
        )),
    }
}
