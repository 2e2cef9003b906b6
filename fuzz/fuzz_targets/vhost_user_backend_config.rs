//! What a vhost-user-blk backend reports at start: its virtio features and
//! its configuration space (GET_CONFIG), checked before a guest sees them.
//! Input: 8 bytes of features (LE), one byte of configured queues, then
//! the configuration space. Checks that nothing panics and that what is
//! accepted is what the guest can use.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::vhost_user::personality::{blk_config, guest_features, BLK_CONFIG_LEN};
use virtio::vhost_user::{Kind, VhostUserConfig};

fuzz_target!(|input: &[u8]| {
    if input.len() < 9 {
        return;
    }
    let features = u64::from_le_bytes(input[..8].try_into().unwrap());
    let queues = u16::from(input[8] % 17).max(1);
    let cfg = VhostUserConfig::parse(
        Kind::Blk,
        &format!("vhost_user=on,socket=/nonexistent,queues={queues}"),
    )
    .unwrap();
    let Ok(offered) = guest_features(&cfg, features) else {
        return;
    };
    assert_eq!(offered & !features, 0, "only what the backend offers");
    assert_ne!(offered & (1 << 32), 0, "VERSION_1");
    if let Ok(space) = blk_config(&cfg, offered, input[9..].to_vec()) {
        assert_eq!(space.len(), BLK_CONFIG_LEN as usize);
        if offered & (1 << 12) != 0 {
            assert_eq!(u16::from_le_bytes([space[34], space[35]]), queues);
        }
        if offered & (1 << 6) != 0 {
            let bs = u32::from_le_bytes(space[20..24].try_into().unwrap());
            assert!(bs.is_power_of_two() && (512..=65536).contains(&bs));
        }
    }
});
