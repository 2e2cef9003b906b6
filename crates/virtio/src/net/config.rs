//! The `--net` option:
//! `tap=NAME[,mac=MAC][,queues=N][,queue_size=N][,iothread=I[:J...]]` for
//! an existing TAP, or `ip=A.B.C.D,mask=A.B.C.D[,mac=...][,queues=N]...`
//! to create one and give the host side that address.

use std::net::Ipv4Addr;

use uring_backend::net::TapSpec;

/// Most queue pairs a network device may have.
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
const MAX_QUEUE_SIZE: u16 = 1024;

/// One network device as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: TapSpec,
    /// The guest's MAC; a random locally administered one when None.
    pub mac: Option<[u8; 6]>,
    /// Queue pairs (each an RX and a TX queue and one TAP queue).
    pub queue_pairs: u16,
    pub queue_size: u16,
    /// The iothreads its queue pairs go to, round-robin; empty = all.
    pub iothreads: Vec<usize>,
}

/// Errors in a `--net` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error("--net needs tap=NAME (an existing TAP) or ip=A.B.C.D,mask=A.B.C.D (a new one)")]
    NoBackend,
    #[error("--net takes either tap= or ip=/mask=, not both")]
    Both,
    #[error("--net ip= needs mask= as well (and mask= needs ip=)")]
    IpWithoutMask,
    #[error("unknown --net key {0:?} (expected tap, ip, mask, mac, queues, queue_size, iothread)")]
    UnknownKey(String),
    #[error("--net {key}={value:?}: {why}")]
    BadValue {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("--net item {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("--net key {0:?} given twice")]
    Duplicate(String),
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast and all-zero addresses.
pub fn parse_mac(v: &str) -> Result<[u8; 6], NetConfigError> {
    let bad = |why| NetConfigError::BadValue {
        key: "mac",
        value: v.into(),
        why,
    };
    let mut mac = [0u8; 6];
    let mut parts = v.split(':');
    for byte in &mut mac {
        let p = parts.next().ok_or(bad("expected six hex bytes"))?;
        if p.len() != 2 {
            return Err(bad("expected six hex bytes like 52:54:00:12:34:56"));
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad("expected hex bytes"))?;
    }
    if parts.next().is_some() {
        return Err(bad("expected six hex bytes"));
    }
    if mac[0] & 1 != 0 {
        return Err(bad("a multicast address cannot be a device's MAC"));
    }
    if mac == [0; 6] {
        return Err(bad("the all-zero address cannot be a device's MAC"));
    }
    Ok(mac)
}

fn parse_ip(key: &'static str, v: &str) -> Result<Ipv4Addr, NetConfigError> {
    v.parse().map_err(|_| NetConfigError::BadValue {
        key,
        value: v.into(),
        why: "expected an IPv4 address like 10.0.0.1",
    })
}

fn check_mask(v: &str, mask: Ipv4Addr) -> Result<Ipv4Addr, NetConfigError> {
    let bits = u32::from(mask);
    if bits.leading_ones() + bits.trailing_zeros() != 32 || bits == 0 {
        return Err(NetConfigError::BadValue {
            key: "mask",
            value: v.into(),
            why: "expected a contiguous netmask like 255.255.255.0",
        });
    }
    Ok(mask)
}

impl NetConfig {
    pub fn parse(s: &str) -> Result<NetConfig, NetConfigError> {
        let mut tap = None;
        let mut ip = None;
        let mut mask = None;
        let mut cfg = NetConfig {
            tap: TapSpec::Named(String::new()),
            mac: None,
            queue_pairs: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            iothreads: Vec::new(),
        };
        let mut seen: Vec<&str> = Vec::new();
        for item in s.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| NetConfigError::NotKeyValue(item.into()))?;
            if seen.contains(&k) {
                return Err(NetConfigError::Duplicate(k.into()));
            }
            seen.push(k);
            match k {
                "tap" => {
                    if v.is_empty() || v.len() > 15 || v.contains(['/', ' ', '\0']) {
                        return Err(NetConfigError::BadValue {
                            key: "tap",
                            value: v.into(),
                            why: "expected an interface name of 1 to 15 characters",
                        });
                    }
                    tap = Some(v.to_string());
                }
                "ip" => ip = Some(parse_ip("ip", v)?),
                "mask" => mask = Some(check_mask(v, parse_ip("mask", v)?)?),
                "mac" => cfg.mac = Some(parse_mac(v)?),
                "queues" => {
                    cfg.queue_pairs = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUE_PAIRS).contains(n))
                        .ok_or_else(|| NetConfigError::BadValue {
                            key: "queues",
                            value: v.into(),
                            why: "expected 1 to 16 queue pairs",
                        })?
                }
                "queue_size" => {
                    cfg.queue_size = v
                        .parse::<u16>()
                        .ok()
                        .filter(|n| n.is_power_of_two() && (16..=MAX_QUEUE_SIZE).contains(n))
                        .ok_or_else(|| NetConfigError::BadValue {
                            key: "queue_size",
                            value: v.into(),
                            why: "expected a power of two from 16 to 1024",
                        })?
                }
                "iothread" => {
                    cfg.iothreads = v
                        .split(':')
                        .map(|t| t.parse::<usize>())
                        .collect::<Result<_, _>>()
                        .map_err(|_| NetConfigError::BadValue {
                            key: "iothread",
                            value: v.into(),
                            why: "expected I or I:J:...",
                        })?
                }
                other => return Err(NetConfigError::UnknownKey(other.into())),
            }
        }
        cfg.tap = match (tap, ip, mask) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => return Err(NetConfigError::Both),
            (Some(name), None, None) => TapSpec::Named(name),
            (None, Some(ip), Some(mask)) => TapSpec::Create { ip, mask },
            (None, None, None) => return Err(NetConfigError::NoBackend),
            (None, _, _) => return Err(NetConfigError::IpWithoutMask),
        };
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        let c = NetConfig::parse("tap=tap0,mac=52:54:00:12:34:56,queues=2,iothread=1").unwrap();
        assert_eq!(c.tap, TapSpec::Named("tap0".into()));
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!((c.queue_pairs, c.queue_size), (2, 256));
        assert_eq!(c.iothreads, vec![1]);
        let c = NetConfig::parse("ip=10.0.0.1,mask=255.255.255.0").unwrap();
        assert_eq!(
            c.tap,
            TapSpec::Create {
                ip: Ipv4Addr::new(10, 0, 0, 1),
                mask: Ipv4Addr::new(255, 255, 255, 0)
            }
        );
        assert_eq!((c.mac, c.queue_pairs), (None, 1));
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            "",
            "mac=52:54:00:12:34:56",
            "tap=",
            "tap=waytoolonginterfacename",
            "tap=a,ip=10.0.0.1,mask=255.0.0.0",
            "ip=10.0.0.1",
            "mask=255.0.0.0",
            "ip=10.0.0.300,mask=255.0.0.0",
            "ip=10.0.0.1,mask=255.0.255.0",
            "ip=10.0.0.1,mask=0.0.0.0",
            "tap=a,mac=01:00:5e:00:00:01",
            "tap=a,mac=00:00:00:00:00:00",
            "tap=a,mac=52:54:00:12:34",
            "tap=a,mac=52:54:00:12:34:56:78",
            "tap=a,mac=52:54:00:12:34:zz",
            "tap=a,queues=0",
            "tap=a,queues=17",
            "tap=a,queue_size=100",
            "tap=a,tap=b",
            "tap=a,colour=blue",
            "tap=a,junk",
            "tap=a,iothread=x",
        ] {
            assert!(NetConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
