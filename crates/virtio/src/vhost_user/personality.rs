//! What differs between a vhost-user disk and NIC: which features the
//! guest may see, where the configuration space comes from and what in it
//! must be checked. Pure functions over what the backend said.

use super::config::{Kind, VhostUserConfig};
use crate::device::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Size of `struct virtio_blk_config` up to the write-zeroes fields.
pub const BLK_CONFIG_LEN: u32 = 60;
/// Offset of `num_queues` in the virtio-blk configuration space.
const BLK_NUM_QUEUES: usize = 34;

const BLK_F_SIZE_MAX: u64 = 1 << 1;
const BLK_F_SEG_MAX: u64 = 1 << 2;
const BLK_F_GEOMETRY: u64 = 1 << 4;
pub const BLK_F_RO: u64 = 1 << 5;
const BLK_F_BLK_SIZE: u64 = 1 << 6;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_F_TOPOLOGY: u64 = 1 << 10;
const BLK_F_CONFIG_WCE: u64 = 1 << 11;
const BLK_F_MQ: u64 = 1 << 12;
const BLK_F_DISCARD: u64 = 1 << 13;
const BLK_F_WRITE_ZEROES: u64 = 1 << 14;

/// Ring features the transport's split queues support.
const RING_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;

const BLK_FEATURES: u64 = BLK_F_SIZE_MAX
    | BLK_F_SEG_MAX
    | BLK_F_GEOMETRY
    | BLK_F_RO
    | BLK_F_BLK_SIZE
    | BLK_F_FLUSH
    | BLK_F_TOPOLOGY
    | BLK_F_CONFIG_WCE
    | BLK_F_MQ
    | BLK_F_DISCARD
    | BLK_F_WRITE_ZEROES
    | RING_FEATURES;

const NET_F_CSUM: u64 = 1 << 0;
const NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const NET_F_MAC: u64 = 1 << 5;
const NET_F_GUEST_TSO4: u64 = 1 << 7;
const NET_F_GUEST_TSO6: u64 = 1 << 8;
const NET_F_GUEST_ECN: u64 = 1 << 9;
const NET_F_GUEST_UFO: u64 = 1 << 10;
const NET_F_HOST_TSO4: u64 = 1 << 11;
const NET_F_HOST_TSO6: u64 = 1 << 12;
const NET_F_HOST_ECN: u64 = 1 << 13;
const NET_F_HOST_UFO: u64 = 1 << 14;
const NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const NET_F_STATUS: u64 = 1 << 16;
pub const NET_F_CTRL_VQ: u64 = 1 << 17;
const NET_F_CTRL_RX: u64 = 1 << 18;
const NET_F_CTRL_VLAN: u64 = 1 << 19;
const NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;
pub const NET_F_MQ: u64 = 1 << 22;
const NET_F_CTRL_MAC_ADDR: u64 = 1 << 23;

/// Size of a NIC's control queue (ringvm's own).
pub const CTRL_QUEUE_SIZE: u16 = 64;

/// Offloads, MRG_RXBUF and MQ pass to the backend; MAC, STATUS and the
/// control queue are ringvm's.
const NET_FEATURES: u64 = NET_F_CSUM
    | NET_F_GUEST_CSUM
    | NET_F_GUEST_TSO4
    | NET_F_GUEST_TSO6
    | NET_F_GUEST_ECN
    | NET_F_GUEST_UFO
    | NET_F_HOST_TSO4
    | NET_F_HOST_TSO6
    | NET_F_HOST_ECN
    | NET_F_HOST_UFO
    | NET_F_MRG_RXBUF
    | RING_FEATURES;

/// What the backend told us that the device cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PersonalityError {
    #[error("the backend does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    #[error("the backend does not offer the CONFIG protocol feature; a vhost-user disk needs GET_CONFIG")]
    NoConfig,
    #[error("the backend's configuration space is {got} bytes; {want} were asked for")]
    ConfigSize { got: usize, want: u32 },
    #[error("the backend's block size {0} is not a power of two from 512 to 64 KiB")]
    BlockSize(u32),
    #[error("the backend's seg_max is 0")]
    SegMax,
    #[error("the backend offers {offered} queues (num_queues); {wanted} are configured")]
    Queues { offered: u16, wanted: u16 },
    #[error("{wanted} queues need VIRTIO_BLK_F_MQ, which the backend does not offer")]
    NoMq { wanted: u16 },
    #[error("the backend's topology is bad: physical_block_exp {0}")]
    Topology(u8),
    #[error("the backend offers DISCARD with max_discard_seg 0")]
    DiscardSeg,
    #[error("the backend offers WRITE_ZEROES with max_write_zeroes_seg 0")]
    WriteZeroesSeg,
    #[error("{pairs} queue pairs need VIRTIO_NET_F_MQ, which the backend does not offer")]
    NetMq { pairs: u16 },
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// The number of vrings a device of `cfg` has.
pub fn vrings(cfg: &VhostUserConfig) -> u16 {
    match cfg.kind {
        Kind::Blk => cfg.queues,
        Kind::Net => 2 * cfg.queues,
    }
}

/// Checks the backend's features and returns what the guest is offered.
pub fn guest_features(cfg: &VhostUserConfig, backend: u64) -> Result<u64, PersonalityError> {
    if backend & VIRTIO_F_VERSION_1 == 0 {
        return Err(PersonalityError::NoVersion1(backend));
    }
    Ok(match cfg.kind {
        Kind::Blk => {
            if cfg.queues > 1 && backend & BLK_F_MQ == 0 {
                return Err(PersonalityError::NoMq { wanted: cfg.queues });
            }
            backend & BLK_FEATURES
        }
        Kind::Net => {
            let mut f = (backend & NET_FEATURES) | NET_F_MAC | NET_F_STATUS | NET_F_CTRL_VQ;
            if cfg.queues > 1 {
                if backend & NET_F_MQ == 0 {
                    return Err(PersonalityError::NetMq { pairs: cfg.queues });
                }
                f |= NET_F_MQ;
            }
            f
        }
    })
}

/// What of the driver's features goes to the backend: never what ringvm
/// does itself (the control queue and its commands).
pub fn backend_features(kind: Kind, driver: u64) -> u64 {
    match kind {
        Kind::Blk => driver,
        Kind::Net => {
            driver
                & !(NET_F_CTRL_VQ
                    | NET_F_CTRL_RX
                    | NET_F_CTRL_VLAN
                    | NET_F_GUEST_ANNOUNCE
                    | NET_F_CTRL_MAC_ADDR)
        }
    }
}

/// Checks a disk backend's configuration space (`features` as offered to
/// the guest) and returns the one the guest sees: `num_queues` is ours.
pub fn blk_config(
    cfg: &VhostUserConfig,
    features: u64,
    mut space: Vec<u8>,
) -> Result<Vec<u8>, PersonalityError> {
    if space.len() != BLK_CONFIG_LEN as usize {
        return Err(PersonalityError::ConfigSize {
            got: space.len(),
            want: BLK_CONFIG_LEN,
        });
    }
    if features & BLK_F_BLK_SIZE != 0 {
        let bs = u32_at(&space, 20);
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(PersonalityError::BlockSize(bs));
        }
    }
    if features & BLK_F_SEG_MAX != 0 && u32_at(&space, 12) == 0 {
        return Err(PersonalityError::SegMax);
    }
    if features & BLK_F_TOPOLOGY != 0 && space[24] > 15 {
        return Err(PersonalityError::Topology(space[24]));
    }
    if features & BLK_F_MQ != 0 {
        let offered = u16_at(&space, BLK_NUM_QUEUES);
        if offered < cfg.queues {
            return Err(PersonalityError::Queues {
                offered,
                wanted: cfg.queues,
            });
        }
        space[BLK_NUM_QUEUES..BLK_NUM_QUEUES + 2].copy_from_slice(&cfg.queues.to_le_bytes());
    }
    if features & BLK_F_DISCARD != 0 && u32_at(&space, 40) == 0 {
        return Err(PersonalityError::DiscardSeg);
    }
    if features & BLK_F_WRITE_ZEROES != 0 && u32_at(&space, 52) == 0 {
        return Err(PersonalityError::WriteZeroesSeg);
    }
    Ok(space)
}

/// A NIC's configuration space: MAC, status (link up), one queue pair.
pub fn net_config(mac: [u8; 6], pairs: u16) -> Vec<u8> {
    let mut space = mac.to_vec();
    space.extend_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
    space.extend_from_slice(&pairs.to_le_bytes());
    space
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn cfg(kind: Kind, queues: u16) -> VhostUserConfig {
        VhostUserConfig {
            kind,
            socket: PathBuf::from("/s"),
            queues,
            queue_size: 256,
            reconnect: false,
            mac: None,
        }
    }

    fn space() -> Vec<u8> {
        let mut s = vec![0u8; 60];
        s[0..8].copy_from_slice(&2048u64.to_le_bytes());
        s[12..16].copy_from_slice(&126u32.to_le_bytes());
        s[20..24].copy_from_slice(&512u32.to_le_bytes());
        s[34..36].copy_from_slice(&8u16.to_le_bytes());
        s[40..44].copy_from_slice(&1u32.to_le_bytes());
        s[52..56].copy_from_slice(&1u32.to_le_bytes());
        s
    }

    #[test]
    fn features_are_masked_and_checked() {
        let backend =
            VIRTIO_F_VERSION_1 | BLK_F_RO | BLK_F_FLUSH | (1 << 30) | (1 << 34) | (1 << 33);
        assert_eq!(
            guest_features(&cfg(Kind::Blk, 1), backend).unwrap(),
            VIRTIO_F_VERSION_1 | BLK_F_RO | BLK_F_FLUSH
        );
        assert!(guest_features(&cfg(Kind::Blk, 1), BLK_F_RO).is_err());
        assert_eq!(
            guest_features(&cfg(Kind::Blk, 4), backend),
            Err(PersonalityError::NoMq { wanted: 4 })
        );
        let net = guest_features(
            &cfg(Kind::Net, 1),
            VIRTIO_F_VERSION_1 | NET_F_MRG_RXBUF | NET_F_CTRL_RX | NET_F_MQ,
        )
        .unwrap();
        assert_eq!(
            net,
            VIRTIO_F_VERSION_1 | NET_F_MRG_RXBUF | NET_F_MAC | NET_F_STATUS | NET_F_CTRL_VQ
        );
        assert_eq!(
            guest_features(&cfg(Kind::Net, 2), VIRTIO_F_VERSION_1),
            Err(PersonalityError::NetMq { pairs: 2 })
        );
        // The control queue is ringvm's: the backend never hears of it.
        assert_eq!(
            backend_features(Kind::Net, net | NET_F_MQ | NET_F_CTRL_RX),
            VIRTIO_F_VERSION_1 | NET_F_MRG_RXBUF | NET_F_MAC | NET_F_STATUS | NET_F_MQ
        );
    }

    #[test]
    fn blk_config_is_checked_and_num_queues_is_ours() {
        let all = BLK_F_BLK_SIZE | BLK_F_SEG_MAX | BLK_F_MQ | BLK_F_DISCARD | BLK_F_WRITE_ZEROES;
        let s = blk_config(&cfg(Kind::Blk, 4), all, space()).unwrap();
        assert_eq!(u16_at(&s, 34), 4);
        assert!(blk_config(&cfg(Kind::Blk, 9), all, space()).is_err());
        assert!(blk_config(&cfg(Kind::Blk, 1), all, vec![0; 59]).is_err());
        let mut bad = space();
        bad[20..24].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            blk_config(&cfg(Kind::Blk, 1), all, bad.clone()),
            Err(PersonalityError::BlockSize(1000))
        );
        // Without the feature the field is not looked at.
        assert!(blk_config(&cfg(Kind::Blk, 1), 0, bad).is_ok());
        let mut bad = space();
        bad[12..16].fill(0);
        assert_eq!(
            blk_config(&cfg(Kind::Blk, 1), all, bad),
            Err(PersonalityError::SegMax)
        );
    }
}
