//! Counters of one virtio-blk device, over every activation; read while
//! the device runs (`vm.counters`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Operations and bytes by request type, errors and interrupts.
#[derive(Debug, Default)]
pub struct BlockStats {
    pub read_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_ops: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flush_ops: AtomicU64,
    pub discard_ops: AtomicU64,
    pub discard_bytes: AtomicU64,
    pub write_zeroes_ops: AtomicU64,
    pub write_zeroes_bytes: AtomicU64,
    /// Requests that completed with a status other than OK (malformed
    /// chains included).
    pub errors: AtomicU64,
    /// Interrupts raised to the driver.
    pub interrupts: AtomicU64,
}

impl BlockStats {
    /// Every counter by name, in a fixed order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("read_ops", g(&self.read_ops)),
            ("read_bytes", g(&self.read_bytes)),
            ("write_ops", g(&self.write_ops)),
            ("write_bytes", g(&self.write_bytes)),
            ("flush_ops", g(&self.flush_ops)),
            ("discard_ops", g(&self.discard_ops)),
            ("discard_bytes", g(&self.discard_bytes)),
            ("write_zeroes_ops", g(&self.write_zeroes_ops)),
            ("write_zeroes_bytes", g(&self.write_zeroes_bytes)),
            ("errors", g(&self.errors)),
            ("interrupts", g(&self.interrupts)),
        ]
    }
}
