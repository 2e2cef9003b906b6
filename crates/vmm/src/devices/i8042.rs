//! The i8042 keyboard controller, for its CPU-reset command only.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::stop::{StopReason, VmStop};

/// The data port; the command/status port is at `I8042_DATA_PORT + 4`.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// Turns the controller's reset pulse into a VM stop.
pub struct ResetLine(Arc<VmStop>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(StopReason::Reset);
        Ok(())
    }
}

pub struct I8042 {
    inner: I8042Device<ResetLine>,
}

impl I8042 {
    pub fn new(stop: Arc<VmStop>) -> Self {
        I8042 {
            inner: I8042Device::new(ResetLine(stop)),
        }
    }
}

/// vm-superio's i8042 keeps no state beyond its reset line: its section
/// is empty, so that a snapshot still names it.
impl crate::snapshot::Snapshot for I8042 {
    fn save(&mut self) -> Result<Vec<u8>, crate::snapshot::SnapshotError> {
        crate::snapshot::save_stateless("i8042")
    }
    fn restore(&mut self, state: &[u8]) -> Result<(), crate::snapshot::SnapshotError> {
        crate::snapshot::decode::<crate::snapshot::Stateless>("i8042", state).map(|_| ())
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let reg = (base + offset - u64::from(I8042_DATA_PORT)) as u8;
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.inner.read(reg);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let reg = (base + offset - u64::from(I8042_DATA_PORT)) as u8;
        if let Some(&b) = data.first() {
            // ResetLine cannot fail.
            let _ = self.inner.write(reg, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_on_port_0x64_requests_reset() {
        let stop = Arc::new(VmStop::new().unwrap());
        let mut dev = I8042::new(stop.clone());
        dev.write(0x60, 0, &[0xfe]);
        assert!(!stop.is_stopping());
        dev.write(0x64, 0, &[0xfe]);
        assert_eq!(stop.reason(), Some(StopReason::Reset));
    }
}
