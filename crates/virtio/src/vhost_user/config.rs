//! The vhost-user forms of `--disk` and `--net`:
//! `vhost_user=on,socket=PATH[,queues=N][,queue_size=N][,reconnect=on]`
//! (and `mac=MAC` for a NIC), Cloud Hypervisor's spelling.

use std::path::PathBuf;

use crate::net::config::parse_mac;

/// Most queues (disk) or queue pairs (NIC) a vhost-user device may have.
pub const MAX_QUEUES: u16 = 16;
/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
const MAX_QUEUE_SIZE: u16 = 1024;

/// Which virtio device the backend serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Blk,
    Net,
}

impl Kind {
    fn option(self) -> &'static str {
        match self {
            Kind::Blk => "--disk",
            Kind::Net => "--net",
        }
    }
}

/// One vhost-user device as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserConfig {
    pub kind: Kind,
    pub socket: PathBuf,
    /// Queues (disk) or queue pairs (NIC).
    pub queues: u16,
    pub queue_size: u16,
    /// Wait for the backend to come back when it goes away, and replay
    /// the memory table and vring state to it.
    pub reconnect: bool,
    /// NIC only: the guest's MAC (random when None).
    pub mac: Option<[u8; 6]>,
}

/// Errors in a vhost-user `--disk`/`--net` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VhostUserConfigError {
    #[error("{option} vhost_user=on needs socket=PATH")]
    NoSocket { option: &'static str },
    #[error("unknown {option} key {key:?} with vhost_user=on (expected {expected})")]
    UnknownKey {
        option: &'static str,
        key: String,
        expected: &'static str,
    },
    #[error("{option} {key}={value:?}: {why}")]
    BadValue {
        option: &'static str,
        key: &'static str,
        value: String,
        why: String,
    },
    #[error("{option} item {item:?} is not key=value")]
    NotKeyValue { option: &'static str, item: String },
    #[error("{option} key {key:?} given twice")]
    Duplicate { option: &'static str, key: String },
}

/// Whether a `--disk`/`--net` value asks for a vhost-user device.
pub fn is_vhost_user(spec: &str) -> bool {
    spec.split(',')
        .any(|item| matches!(item.split_once('='), Some(("vhost_user", v)) if on(v) == Some(true)))
}

fn on(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

impl VhostUserConfig {
    /// Parses a `--disk` (`Kind::Blk`) or `--net` (`Kind::Net`) value
    /// that has `vhost_user=on`.
    pub fn parse(kind: Kind, s: &str) -> Result<VhostUserConfig, VhostUserConfigError> {
        let option = kind.option();
        let expected = match kind {
            Kind::Blk => "vhost_user, socket, queues, queue_size, reconnect",
            Kind::Net => "vhost_user, socket, mac, queues (pairs), queue_size, reconnect",
        };
        let bad = |key: &'static str, value: &str, why: String| VhostUserConfigError::BadValue {
            option,
            key,
            value: value.into(),
            why,
        };
        let mut cfg = VhostUserConfig {
            kind,
            socket: PathBuf::new(),
            queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            reconnect: false,
            mac: None,
        };
        let mut seen: Vec<&str> = Vec::new();
        for item in s.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| VhostUserConfigError::NotKeyValue {
                    option,
                    item: item.into(),
                })?;
            if seen.contains(&k) {
                return Err(VhostUserConfigError::Duplicate {
                    option,
                    key: k.into(),
                });
            }
            seen.push(k);
            match k {
                "vhost_user" => {
                    if on(v) != Some(true) {
                        return Err(bad("vhost_user", v, "expected on".into()));
                    }
                }
                "socket" => {
                    if v.is_empty() {
                        return Err(bad("socket", v, "expected a path".into()));
                    }
                    cfg.socket = v.into();
                }
                "queues" => {
                    cfg.queues = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUES).contains(n))
                        .ok_or_else(|| bad("queues", v, format!("expected 1 to {MAX_QUEUES}")))?;
                }
                "queue_size" => {
                    cfg.queue_size = v
                        .parse()
                        .ok()
                        .filter(|n: &u16| n.is_power_of_two() && (2..=MAX_QUEUE_SIZE).contains(n))
                        .ok_or_else(|| {
                            bad(
                                "queue_size",
                                v,
                                format!("expected a power of two from 2 to {MAX_QUEUE_SIZE}"),
                            )
                        })?;
                }
                "reconnect" => {
                    cfg.reconnect =
                        on(v).ok_or_else(|| bad("reconnect", v, "expected on or off".into()))?;
                }
                "mac" if kind == Kind::Net => {
                    cfg.mac = Some(parse_mac(v).map_err(|e| bad("mac", v, e.to_string()))?);
                }
                _ => {
                    return Err(VhostUserConfigError::UnknownKey {
                        option,
                        key: k.into(),
                        expected,
                    })
                }
            }
        }
        if cfg.socket.as_os_str().is_empty() {
            return Err(VhostUserConfigError::NoSocket { option });
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_forms() {
        let c = VhostUserConfig::parse(
            Kind::Blk,
            "vhost_user=on,socket=/tmp/s,queues=4,queue_size=128,reconnect=on",
        )
        .unwrap();
        assert_eq!(
            (c.socket.to_str(), c.queues, c.queue_size, c.reconnect),
            (Some("/tmp/s"), 4, 128, true)
        );
        assert!(is_vhost_user("socket=/x,vhost_user=on"));
        assert!(!is_vhost_user("path=/x"));
        assert!(!is_vhost_user("path=/x,vhost_user=off"));
        for bad in [
            "vhost_user=on",
            "vhost_user=on,socket=",
            "vhost_user=on,socket=/s,queues=0",
            "vhost_user=on,socket=/s,queues=17",
            "vhost_user=on,socket=/s,queue_size=100",
            "vhost_user=on,socket=/s,reconnect=maybe",
            "vhost_user=on,socket=/s,mac=52:54:00:00:00:01",
            "vhost_user=on,socket=/s,path=/x",
            "vhost_user=on,socket=/s,socket=/t",
            "vhost_user=on,socket",
        ] {
            assert!(VhostUserConfig::parse(Kind::Blk, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn net_forms() {
        let c = VhostUserConfig::parse(Kind::Net, "vhost_user=on,socket=/s,mac=52:54:00:12:34:56")
            .unwrap();
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert!(
            VhostUserConfig::parse(Kind::Net, "vhost_user=on,socket=/s,mac=01:00:00:00:00:00")
                .is_err()
        );
    }
}
