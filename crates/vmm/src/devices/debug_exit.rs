//! The debug-exit port: a guest writes a status to it to end the VM.
//!
//! It sits at port 0xf4, where QEMU's `isa-debug-exit` usually lives, so a
//! test guest ends the same way under both. QEMU exits with `(status << 1) |
//! 1`; ringvm exits with the status itself (see the README's exit codes).

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::stop::{StopReason, VmStop};

/// Default I/O port of the debug-exit device.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Ports it decodes (a 1-, 2- or 4-byte write at the base).
pub const DEBUG_EXIT_LEN: u16 = 4;

pub struct DebugExit {
    stop: Arc<VmStop>,
}

impl DebugExit {
    pub fn new(stop: Arc<VmStop>) -> Self {
        DebugExit { stop }
    }
}

/// The port has no registers: an empty section.
impl crate::snapshot::Snapshot for DebugExit {
    fn save(&mut self) -> Result<Vec<u8>, crate::snapshot::SnapshotError> {
        crate::snapshot::save_stateless("debug-exit")
    }
    fn restore(&mut self, state: &[u8]) -> Result<(), crate::snapshot::SnapshotError> {
        crate::snapshot::decode::<crate::snapshot::Stateless>("debug-exit", state).map(|_| ())
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != 0 || data.is_empty() {
            return;
        }
        let mut le = [0u8; 4];
        let n = data.len().min(4);
        le[..n].copy_from_slice(&data[..n]);
        self.stop.request(StopReason::DebugExit {
            status: u32::from_le_bytes(le),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_at_base_stops_with_status() {
        let stop = Arc::new(VmStop::new().unwrap());
        let mut dev = DebugExit::new(stop.clone());
        dev.write(0xf4, 1, &[9]);
        assert!(!stop.is_stopping());
        dev.write(0xf4, 0, &[0x2a]);
        assert_eq!(stop.reason(), Some(StopReason::DebugExit { status: 42 }));
    }

    #[test]
    fn wide_writes_carry_the_whole_value() {
        let stop = Arc::new(VmStop::new().unwrap());
        let mut dev = DebugExit::new(stop.clone());
        dev.write(0xf4, 0, &0x1234u32.to_le_bytes());
        assert_eq!(
            stop.reason(),
            Some(StopReason::DebugExit { status: 0x1234 })
        );
    }
}
