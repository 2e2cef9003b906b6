//! The virtio-pci common configuration state machine under arbitrary
//! driver reads and writes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::transport::common::{CommonConfig, StatusChange};

fuzz_target!(|input: &[u8]| {
    let mut c = CommonConfig::new(&[256, 128, 64], (1 << 32) | (1 << 29) | (1 << 9));
    for op in input.chunks_exact(10) {
        let offset = u64::from(op[0] % 0x48);
        let len = [1usize, 2, 4, 8][usize::from(op[1] % 4)];
        if op[1] & 0x80 != 0 {
            let mut b = [0u8; 8];
            c.read(offset, &mut b[..len]);
        } else if c.write(offset, &op[2..2 + len]) == StatusChange::Reset {
            c.reset();
        }
    }
});
