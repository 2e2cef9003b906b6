//! The hardware-reduced ACPI platform registers: the FADT's sleep
//! control/status pair (S5 powers the VM off), its reset register, and the
//! status byte of the Generic Event Device (GED) behind the power button.
//!
//! All four are byte-wide I/O ports from [`ACPI_PM_PORT`]:
//!
//! | port  | register | guest access |
//! |-------|----------|--------------|
//! | +0    | sleep control | write `SLP_TYP << 2 \| SLP_EN`; `SLP_TYP` 5 (the DSDT's `_S5_`) powers off |
//! | +1    | sleep status  | reads 0 (the VM never wakes from a sleep state) |
//! | +2    | reset         | write [`RESET_VALUE`] to reset the VM |
//! | +3    | GED status    | read: pending events (bit 0 power button), cleared by the read |
//!
//! The register logic is [`AcpiPmRegs`], a state machine with no I/O; the
//! bus adapter [`AcpiPm`] turns its actions into VM stops and the GED
//! interrupt.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::stop::{StopReason, VmStop};

/// First port of the block.
pub const ACPI_PM_PORT: u16 = 0x600;
/// Ports in the block.
pub const ACPI_PM_LEN: u16 = 4;
pub const SLEEP_CONTROL_PORT: u16 = ACPI_PM_PORT;
pub const SLEEP_STATUS_PORT: u16 = ACPI_PM_PORT + 1;
pub const RESET_PORT: u16 = ACPI_PM_PORT + 2;
pub const GED_STATUS_PORT: u16 = ACPI_PM_PORT + 3;
/// What the FADT tells the guest to write to the reset register.
pub const RESET_VALUE: u8 = 0x1;
/// The sleep type of S5 (soft off), as the DSDT's `_S5_` object says.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The GSI of the GED's interrupt (an ISA IRQ no other device uses).
pub const GED_GSI: u32 = 10;
/// GED event bit: the power button was pressed.
pub const GED_POWER_BUTTON: u8 = 1 << 0;

const SLP_EN: u8 = 1 << 5;

/// What a register access asks of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmAction {
    None,
    PowerOff,
    Reset,
}

/// The registers' state: the GED's pending events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcpiPmRegs {
    ged_pending: u8,
}

impl AcpiPmRegs {
    /// A byte read of `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        match port {
            GED_STATUS_PORT => std::mem::take(&mut self.ged_pending),
            _ => 0,
        }
    }

    /// A byte write of `value` to `port`.
    pub fn write(&mut self, port: u16, value: u8) -> PmAction {
        match port {
            SLEEP_CONTROL_PORT if value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE => {
                PmAction::PowerOff
            }
            RESET_PORT if value == RESET_VALUE => PmAction::Reset,
            _ => PmAction::None,
        }
    }

    /// Records a GED event; true when the guest should be interrupted.
    pub fn raise(&mut self, event: u8) -> bool {
        self.ged_pending |= event;
        event != 0
    }

    /// Events raised and not yet read by the guest.
    pub fn pending(&self) -> u8 {
        self.ged_pending
    }
}

/// The bus adapter: stops the VM on power-off and reset, and signals the
/// GED interrupt through an irqfd.
pub struct AcpiPm {
    regs: AcpiPmRegs,
    stop: Arc<VmStop>,
    ged_irq: EventFd,
}

impl AcpiPm {
    /// `ged_irq` is an irqfd on [`GED_GSI`].
    pub fn new(stop: Arc<VmStop>, ged_irq: EventFd) -> Self {
        AcpiPm {
            regs: AcpiPmRegs::default(),
            stop,
            ged_irq,
        }
    }

    /// Presses the ACPI power button: the guest's GED handler sees the
    /// event and notifies its power button device (an ACPI-aware guest then
    /// shuts down, as on a physical machine).
    pub fn press_power_button(&mut self) -> std::io::Result<()> {
        if self.regs.raise(GED_POWER_BUTTON) {
            self.ged_irq.write(1)?;
        }
        Ok(())
    }
}

/// The device, shared between the bus and whoever presses the button.
pub type SharedAcpiPm = Arc<Mutex<AcpiPm>>;

/// The GED's pending events (a pressed button the guest has not read).
impl crate::snapshot::Snapshot for AcpiPm {
    fn save(&mut self) -> Result<Vec<u8>, crate::snapshot::SnapshotError> {
        crate::snapshot::encode("acpi-pm", &self.regs.ged_pending)
    }
    fn restore(&mut self, state: &[u8]) -> Result<(), crate::snapshot::SnapshotError> {
        self.regs.ged_pending = crate::snapshot::decode("acpi-pm", state)?;
        Ok(())
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.regs.read((base + offset) as u16);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match self.regs.write((base + offset) as u16, value) {
            PmAction::None => {}
            PmAction::PowerOff => self.stop.request(StopReason::Shutdown),
            PmAction::Reset => self.stop.request(StopReason::Reset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn s5_powers_off_other_sleep_types_do_not() {
        let mut r = AcpiPmRegs::default();
        assert_eq!(
            r.write(SLEEP_CONTROL_PORT, (5 << 2) | SLP_EN),
            PmAction::PowerOff
        );
        // SLP_TYP 5 without SLP_EN, and S3 with it: nothing.
        assert_eq!(r.write(SLEEP_CONTROL_PORT, 5 << 2), PmAction::None);
        assert_eq!(
            r.write(SLEEP_CONTROL_PORT, (3 << 2) | SLP_EN),
            PmAction::None
        );
        assert_eq!(r.write(SLEEP_STATUS_PORT, 0xff), PmAction::None);
        assert_eq!(r.read(SLEEP_STATUS_PORT), 0);
    }

    #[test]
    fn reset_needs_the_reset_value() {
        let mut r = AcpiPmRegs::default();
        assert_eq!(r.write(RESET_PORT, 0x2), PmAction::None);
        assert_eq!(r.write(RESET_PORT, RESET_VALUE), PmAction::Reset);
    }

    #[test]
    fn ged_status_reads_and_clears() {
        let mut r = AcpiPmRegs::default();
        assert_eq!(r.read(GED_STATUS_PORT), 0);
        assert!(r.raise(GED_POWER_BUTTON));
        assert_eq!(r.pending(), GED_POWER_BUTTON);
        assert_eq!(r.read(GED_STATUS_PORT), GED_POWER_BUTTON);
        assert_eq!(r.read(GED_STATUS_PORT), 0);
    }

    #[test]
    fn bus_adapter_stops_the_vm_and_signals_the_ged() {
        let stop = Arc::new(VmStop::new().unwrap());
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut pm = AcpiPm::new(stop.clone(), irq.try_clone().unwrap());
        pm.press_power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8; 1];
        pm.read(u64::from(ACPI_PM_PORT), 3, &mut b);
        assert_eq!(b[0], GED_POWER_BUTTON);
        pm.write(u64::from(ACPI_PM_PORT), 0, &[(5 << 2) | SLP_EN]);
        assert_eq!(stop.reason(), Some(StopReason::Shutdown));
    }
}
