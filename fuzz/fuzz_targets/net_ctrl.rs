//! virtio-net control-queue commands as a guest writes them: a sequence of
//! commands (each a length byte then that many bytes) applied to one
//! receive filter. Checks that no command panics and that the filter never
//! takes a multicast or zero address as the device's own.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::net::ctrl::{handle, CtrlFeatures, RxFilter};

fuzz_target!(|input: &[u8]| {
    let Some((&flags, mut rest)) = input.split_first() else {
        return;
    };
    let features = CtrlFeatures {
        rx: flags & 1 != 0,
        mac_addr: flags & 2 != 0,
        mq: flags & 4 != 0,
        max_pairs: u16::from(flags >> 4) + 1,
    };
    let mut filter = RxFilter::new([0x52, 0x54, 0, 0, 0, 1]);
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (cmd, next) = tail.split_at(n);
        if let Ok(virtio::net::ctrl::Effect::QueuePairs(p)) = handle(cmd, features, &mut filter) {
            assert!(p >= 1 && p <= features.max_pairs);
        }
        assert!(filter.mac[0] & 1 == 0 && filter.mac != [0; 6]);
        assert!(filter.unicast.len() <= virtio::net::ctrl::MAC_TABLE_ENTRIES);
        rest = next;
    }
});
