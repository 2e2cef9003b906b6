//! The control queue's commands (virtio 1.2 §5.1.6.5) and the receive
//! filter they program: a pure state machine, fed with the bytes of one
//! command and answering OK or ERR.

/// Command classes and commands.
const CLASS_RX: u8 = 0;
const RX_PROMISC: u8 = 0;
const RX_ALLMULTI: u8 = 1;
const CLASS_MAC: u8 = 1;
const MAC_TABLE_SET: u8 = 0;
const MAC_ADDR_SET: u8 = 1;
const CLASS_MQ: u8 = 4;
const MQ_VQ_PAIRS_SET: u8 = 0;

pub const VIRTIO_NET_OK: u8 = 0;
pub const VIRTIO_NET_ERR: u8 = 1;

/// Largest MAC table we keep (per table); bigger tables turn the filter
/// into "accept that class", as a NIC with a small filter would.
pub const MAC_TABLE_ENTRIES: usize = 64;

/// What a frame's destination must be for the guest to receive it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFilter {
    pub mac: [u8; 6],
    pub promisc: bool,
    pub allmulti: bool,
    /// Unicast table overflowed: accept all unicast.
    pub alluni: bool,
    pub unicast: Vec<[u8; 6]>,
    pub multicast: Vec<[u8; 6]>,
}

impl RxFilter {
    /// The reset state: promiscuous until the driver programs the filter
    /// (drivers without the control queue never do).
    pub fn new(mac: [u8; 6]) -> RxFilter {
        RxFilter {
            mac,
            promisc: true,
            allmulti: true,
            alluni: false,
            unicast: Vec::new(),
            multicast: Vec::new(),
        }
    }

    /// Whether the guest wants a frame sent to `dst`.
    pub fn accepts(&self, dst: &[u8; 6]) -> bool {
        if self.promisc || *dst == [0xff; 6] {
            return true;
        }
        if dst[0] & 1 != 0 {
            return self.allmulti || self.multicast.contains(dst);
        }
        *dst == self.mac || self.alluni || self.unicast.contains(dst)
    }
}

/// What a command asks of the device beyond the filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Use this many queue pairs.
    QueuePairs(u16),
}

/// Why a command was refused (the driver gets VIRTIO_NET_ERR).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CtrlError {
    #[error("command shorter than its 2-byte header")]
    Short,
    #[error("class {class} command {cmd} is not supported")]
    Unsupported { class: u8, cmd: u8 },
    #[error("class {class} command {cmd}: {len} bytes of data is wrong")]
    BadLength { class: u8, cmd: u8, len: usize },
    #[error("MAC table entry count {count} does not match the data")]
    BadTable { count: u64 },
    #[error("{pairs} queue pairs asked for; the device has 1 to {max}")]
    BadPairs { pairs: u16, max: u16 },
    #[error("{0} is not a unicast MAC address")]
    BadMac(String),
}

/// Negotiated features that enable command classes.
#[derive(Clone, Copy, Debug, Default)]
pub struct CtrlFeatures {
    pub rx: bool,
    pub mac_addr: bool,
    pub mq: bool,
    pub max_pairs: u16,
}

/// One MAC table: its entries, whether it overflowed, and what follows.
type MacList<'a> = (Vec<[u8; 6]>, bool, &'a [u8]);

fn mac_list(data: &[u8]) -> Result<MacList<'_>, CtrlError> {
    let count_bytes: [u8; 4] = data
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(CtrlError::BadTable { count: 0 })?;
    let count = u64::from(u32::from_le_bytes(count_bytes));
    let len = count
        .checked_mul(6)
        .and_then(|l| usize::try_from(l).ok())
        .filter(|&l| l <= data.len() - 4)
        .ok_or(CtrlError::BadTable { count })?;
    let entries = &data[4..4 + len];
    let overflow = count as usize > MAC_TABLE_ENTRIES;
    let list = if overflow {
        Vec::new()
    } else {
        entries
            .chunks_exact(6)
            .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
            .collect()
    };
    Ok((list, overflow, &data[4 + len..]))
}

fn flag(class: u8, cmd: u8, data: &[u8]) -> Result<bool, CtrlError> {
    match data {
        [v] => Ok(*v != 0),
        _ => Err(CtrlError::BadLength {
            class,
            cmd,
            len: data.len(),
        }),
    }
}

/// Applies one command (`bytes` = class, command, data) to `filter`.
pub fn handle(
    bytes: &[u8],
    features: CtrlFeatures,
    filter: &mut RxFilter,
) -> Result<Effect, CtrlError> {
    let [class, cmd, data @ ..] = bytes else {
        return Err(CtrlError::Short);
    };
    let (class, cmd) = (*class, *cmd);
    let unsupported = CtrlError::Unsupported { class, cmd };
    match (class, cmd) {
        (CLASS_RX, RX_PROMISC) if features.rx => filter.promisc = flag(class, cmd, data)?,
        (CLASS_RX, RX_ALLMULTI) if features.rx => filter.allmulti = flag(class, cmd, data)?,
        (CLASS_MAC, MAC_TABLE_SET) if features.rx => {
            let (unicast, uni_overflow, rest) = mac_list(data)?;
            let (multicast, multi_overflow, rest) = mac_list(rest)?;
            if !rest.is_empty() {
                return Err(CtrlError::BadLength {
                    class,
                    cmd,
                    len: data.len(),
                });
            }
            filter.unicast = unicast;
            filter.alluni = uni_overflow;
            filter.multicast = multicast;
            if multi_overflow {
                filter.allmulti = true;
            }
        }
        (CLASS_MAC, MAC_ADDR_SET) if features.mac_addr => {
            let mac: [u8; 6] = data.try_into().map_err(|_| CtrlError::BadLength {
                class,
                cmd,
                len: data.len(),
            })?;
            if mac[0] & 1 != 0 || mac == [0; 6] {
                return Err(CtrlError::BadMac(format!("{mac:02x?}")));
            }
            filter.mac = mac;
        }
        (CLASS_MQ, MQ_VQ_PAIRS_SET) if features.mq => {
            let pairs: [u8; 2] = data.try_into().map_err(|_| CtrlError::BadLength {
                class,
                cmd,
                len: data.len(),
            })?;
            let pairs = u16::from_le_bytes(pairs);
            if pairs == 0 || pairs > features.max_pairs {
                return Err(CtrlError::BadPairs {
                    pairs,
                    max: features.max_pairs,
                });
            }
            return Ok(Effect::QueuePairs(pairs));
        }
        _ => return Err(unsupported),
    }
    Ok(Effect::None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];
    const ALL: CtrlFeatures = CtrlFeatures {
        rx: true,
        mac_addr: true,
        mq: true,
        max_pairs: 4,
    };

    fn table(uni: &[[u8; 6]], multi: &[[u8; 6]]) -> Vec<u8> {
        let mut v = vec![CLASS_MAC, MAC_TABLE_SET];
        for t in [uni, multi] {
            v.extend_from_slice(&(t.len() as u32).to_le_bytes());
            for m in t {
                v.extend_from_slice(m);
            }
        }
        v
    }

    #[test]
    fn filter_follows_rx_mode_and_tables() {
        let mut f = RxFilter::new(MAC);
        let other = [0x52, 0x54, 0, 9, 9, 9];
        let mcast = [0x01, 0x00, 0x5e, 0, 0, 1];
        assert!(f.accepts(&other), "promiscuous after reset");
        handle(&[CLASS_RX, RX_PROMISC, 0], ALL, &mut f).unwrap();
        handle(&[CLASS_RX, RX_ALLMULTI, 0], ALL, &mut f).unwrap();
        assert!(f.accepts(&MAC) && f.accepts(&[0xff; 6]));
        assert!(!f.accepts(&other) && !f.accepts(&mcast));
        handle(&table(&[other], &[mcast]), ALL, &mut f).unwrap();
        assert!(f.accepts(&other) && f.accepts(&mcast));
        handle(&table(&[], &[]), ALL, &mut f).unwrap();
        assert!(!f.accepts(&other));
        let new_mac = [0x52, 0x54, 0, 7, 7, 7];
        let mut cmd = vec![CLASS_MAC, MAC_ADDR_SET];
        cmd.extend_from_slice(&new_mac);
        handle(&cmd, ALL, &mut f).unwrap();
        assert!(f.accepts(&new_mac) && !f.accepts(&MAC));
        let big: Vec<[u8; 6]> = (0..=MAC_TABLE_ENTRIES as u8)
            .map(|i| [0x52, 0, 0, 0, 0, i])
            .collect();
        handle(&table(&big, &[]), ALL, &mut f).unwrap();
        assert!(f.accepts(&other), "overflowed table accepts all unicast");
    }

    #[test]
    fn queue_pairs_are_checked() {
        let mut f = RxFilter::new(MAC);
        assert_eq!(
            handle(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 2, 0], ALL, &mut f),
            Ok(Effect::QueuePairs(2))
        );
        for bad in [[0u8, 0], [5, 0], [0xff, 0xff]] {
            assert!(matches!(
                handle(&[CLASS_MQ, MQ_VQ_PAIRS_SET, bad[0], bad[1]], ALL, &mut f),
                Err(CtrlError::BadPairs { .. })
            ));
        }
    }

    #[test]
    fn malformed_and_unnegotiated_commands_are_refused() {
        let mut f = RxFilter::new(MAC);
        let before = f.clone();
        let none = CtrlFeatures::default();
        for bad in [
            &[][..],
            &[CLASS_RX],
            &[CLASS_RX, RX_PROMISC],
            &[CLASS_RX, RX_PROMISC, 1, 1],
            &[CLASS_RX, 9, 1],
            &[CLASS_MAC, MAC_TABLE_SET, 1, 0, 0, 0],
            &[CLASS_MAC, MAC_TABLE_SET, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0],
            &[CLASS_MAC, MAC_ADDR_SET, 1, 2, 3],
            &[CLASS_MAC, MAC_ADDR_SET, 1, 0, 0, 0, 0, 1],
            &[CLASS_MQ, MQ_VQ_PAIRS_SET, 1],
            &[7, 0],
        ] {
            assert!(handle(bad, ALL, &mut f).is_err(), "{bad:?}");
        }
        let mut trailing = table(&[], &[]);
        trailing.push(0);
        assert!(handle(&trailing, ALL, &mut f).is_err());
        assert!(handle(&[CLASS_RX, RX_PROMISC, 0], none, &mut f).is_err());
        assert!(handle(&[CLASS_MQ, MQ_VQ_PAIRS_SET, 1, 0], none, &mut f).is_err());
        assert_eq!(f, before, "refused commands change nothing");
    }

    #[test]
    fn random_commands_never_panic() {
        let mut seed = 0x1234_5678u32;
        let mut f = RxFilter::new(MAC);
        for _ in 0..5000 {
            let mut v = Vec::new();
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let len = (seed % 40) as usize;
            for i in 0..len {
                v.push((seed >> (i % 24)) as u8 % 6);
            }
            let _ = handle(&v, ALL, &mut f);
        }
    }
}
