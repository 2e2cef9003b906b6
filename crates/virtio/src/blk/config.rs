//! The `--disk` option, shared by `ringvm run` and the `ringvm-blk` daemon:
//! `path=PATH[,readonly=on|off][,direct=on|off][,fixed_buffers=on|off]
//! [,queues=N][,queue_size=N][,serial=ID][,iothread=I[:J...]]
//! [,engine=auto|uring|sync]`.

use std::path::PathBuf;

pub use uring_backend::block::IoEngine;

/// Most queues a disk may have.
pub const MAX_QUEUES: u16 = 64;
/// Default and largest queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
const MAX_QUEUE_SIZE: u16 = 1024;

/// One disk as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    pub direct: bool,
    pub queues: u16,
    pub queue_size: u16,
    /// The device's ID (GET_ID), at most 20 bytes.
    pub serial: Option<String>,
    /// The iothreads its queues go to, round-robin; empty = all, spread.
    pub iothreads: Vec<usize>,
    /// Register guest RAM with each serving iothread's io_uring as fixed
    /// buffers (pins, and so allocates, all of guest RAM).
    pub fixed_buffers: bool,
    /// Reads and writes through io_uring or on the iothread itself.
    pub engine: IoEngine,
}

/// Errors in a `--disk` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskConfigError {
    #[error("--disk needs path=PATH")]
    NoPath,
    #[error("unknown --disk key {0:?} (expected path, readonly, direct, fixed_buffers, queues, queue_size, serial, iothread, engine)")]
    UnknownKey(String),
    #[error("--disk {key}={value:?}: {why}")]
    BadValue {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("--disk item {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("--disk key {0:?} given twice")]
    Duplicate(String),
}

fn on_off(key: &'static str, v: &str) -> Result<bool, DiskConfigError> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(DiskConfigError::BadValue {
            key,
            value: v.into(),
            why: "expected on or off",
        }),
    }
}

impl DiskConfig {
    pub fn parse(s: &str) -> Result<DiskConfig, DiskConfigError> {
        Self::parse_with_fixed_buffers(s, false)
    }

    /// As [`DiskConfig::parse`], with `fixed_buffers` defaulting to
    /// `fixed_default` when the value does not say (the vhost-user daemon
    /// registers the front-end's memory unless told not to).
    pub fn parse_with_fixed_buffers(
        s: &str,
        fixed_default: bool,
    ) -> Result<DiskConfig, DiskConfigError> {
        let mut cfg = DiskConfig {
            path: PathBuf::new(),
            readonly: false,
            direct: false,
            queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            serial: None,
            iothreads: Vec::new(),
            fixed_buffers: fixed_default,
            engine: IoEngine::Auto,
        };
        let mut seen: Vec<&str> = Vec::new();
        let mut have_path = false;
        for item in s.split(',') {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| DiskConfigError::NotKeyValue(item.into()))?;
            if seen.contains(&k) {
                return Err(DiskConfigError::Duplicate(k.into()));
            }
            seen.push(k);
            match k {
                "path" => {
                    if v.is_empty() {
                        return Err(DiskConfigError::NoPath);
                    }
                    cfg.path = v.into();
                    have_path = true;
                }
                "readonly" => cfg.readonly = on_off("readonly", v)?,
                "direct" => cfg.direct = on_off("direct", v)?,
                "fixed_buffers" => cfg.fixed_buffers = on_off("fixed_buffers", v)?,
                "engine" => {
                    cfg.engine = match v {
                        "auto" => IoEngine::Auto,
                        "uring" => IoEngine::Uring,
                        "sync" => IoEngine::Sync,
                        _ => {
                            return Err(DiskConfigError::BadValue {
                                key: "engine",
                                value: v.into(),
                                why: "expected auto, uring or sync",
                            })
                        }
                    }
                }
                "queues" => {
                    cfg.queues = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUES).contains(n))
                        .ok_or_else(|| DiskConfigError::BadValue {
                            key: "queues",
                            value: v.into(),
                            why: "expected 1 to 64",
                        })?
                }
                "queue_size" => {
                    cfg.queue_size = v
                        .parse::<u16>()
                        .ok()
                        .filter(|n| n.is_power_of_two() && (2..=MAX_QUEUE_SIZE).contains(n))
                        .ok_or_else(|| DiskConfigError::BadValue {
                            key: "queue_size",
                            value: v.into(),
                            why: "expected a power of two from 2 to 1024",
                        })?
                }
                "serial" => {
                    if v.len() > 20 || !v.is_ascii() {
                        return Err(DiskConfigError::BadValue {
                            key: "serial",
                            value: v.into(),
                            why: "at most 20 ASCII characters",
                        });
                    }
                    cfg.serial = Some(v.into());
                }
                "iothread" => {
                    cfg.iothreads = v
                        .split(':')
                        .map(|t| t.parse::<usize>())
                        .collect::<Result<_, _>>()
                        .map_err(|_| DiskConfigError::BadValue {
                            key: "iothread",
                            value: v.into(),
                            why: "expected I or I:J:...",
                        })?
                }
                other => return Err(DiskConfigError::UnknownKey(other.into())),
            }
        }
        if !have_path {
            return Err(DiskConfigError::NoPath);
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let c = DiskConfig::parse("path=/tmp/d.img,readonly=on,direct=off,queues=4,queue_size=128,serial=abc,iothread=0:1").unwrap();
        assert_eq!(c.path, PathBuf::from("/tmp/d.img"));
        assert!(c.readonly && !c.direct);
        assert_eq!(
            (c.queues, c.queue_size, c.serial.as_deref()),
            (4, 128, Some("abc"))
        );
        assert_eq!(c.iothreads, vec![0, 1]);
        let d = DiskConfig::parse("path=x").unwrap();
        assert_eq!((d.queues, d.queue_size, d.readonly), (1, 256, false));
        assert_eq!(d.engine, IoEngine::Auto);
        for (v, e) in [
            ("auto", IoEngine::Auto),
            ("uring", IoEngine::Uring),
            ("sync", IoEngine::Sync),
        ] {
            let c = DiskConfig::parse(&format!("path=x,engine={v}")).unwrap();
            assert_eq!(c.engine, e);
        }
    }

    #[test]
    fn fixed_buffers_default_can_be_overridden() {
        assert!(
            DiskConfig::parse_with_fixed_buffers("path=x", true)
                .unwrap()
                .fixed_buffers
        );
        assert!(
            !DiskConfig::parse_with_fixed_buffers("path=x,fixed_buffers=off", true)
                .unwrap()
                .fixed_buffers
        );
        assert!(!DiskConfig::parse("path=x").unwrap().fixed_buffers);
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            "",
            "readonly=on",
            "path=",
            "path=x,queues=0",
            "path=x,engine=threads",
            "path=x,queues=65",
            "path=x,queue_size=100",
            "path=x,readonly=maybe",
            "path=x,serial=123456789012345678901",
            "path=x,colour=blue",
            "path=x,path=y",
            "path=x,iothread=a",
            "path=x,junk",
        ] {
            assert!(DiskConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
