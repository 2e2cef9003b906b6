//! `blk.*` command line options and the request plan they describe.

use crate::cmdline::{parse_u64, Cmdline};
use crate::pattern::{Rng, SECTOR};

/// Size of the static data buffer pool (all in-flight requests).
pub const POOL_BYTES: usize = 4 << 20;
/// Most requests in flight.
pub const MAX_QD: u32 = 256;
/// Most queues used.
pub const MAX_QUEUES: u32 = crate::virtio::queue::MAX_QUEUES as u32;

/// The workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Read,
    Write,
    RandRead,
    RandWrite,
    Verify,
    Crc,
}

impl Mode {
    const ALL: [Mode; 6] = [
        Mode::Read,
        Mode::Write,
        Mode::RandRead,
        Mode::RandWrite,
        Mode::Verify,
        Mode::Crc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Read => "read",
            Mode::Write => "write",
            Mode::RandRead => "randread",
            Mode::RandWrite => "randwrite",
            Mode::Verify => "verify",
            Mode::Crc => "crc",
        }
    }

    /// The device writes to guest memory (a read request).
    pub fn reads(self) -> bool {
        !matches!(self, Mode::Write | Mode::RandWrite)
    }

    pub fn random(self) -> bool {
        matches!(self, Mode::RandRead | Mode::RandWrite)
    }
}

/// Parsed `blk.*` options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    pub dev: u32,
    pub bs: u32,
    pub qd: u32,
    pub count: Option<u64>,
    pub secs: Option<u64>,
    pub offset: u64,
    pub len: Option<u64>,
    pub seed: u64,
    pub queues: u32,
    pub event_idx: bool,
    pub indirect: bool,
    pub flush: bool,
    pub id: bool,
    /// Watchdog: fail after this many APIC timer ticks (about 1 s each)
    /// without a completion; 0 disables.
    pub timeout: u64,
    /// After the result line, spin forever instead of exiting (tests that
    /// kill the VMM after acknowledged writes).
    pub hang: bool,
    /// After the result line, stay idle (halted, woken by the watchdog
    /// about once a second) for this many ticks, then exit: a VM that is
    /// up but quiet (density measurements); 0 = exit at once.
    pub linger: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Read,
            dev: 0,
            bs: 4096,
            qd: 1,
            count: None,
            secs: None,
            offset: 0,
            len: None,
            seed: 1,
            queues: 1,
            event_idx: true,
            indirect: true,
            flush: false,
            id: false,
            timeout: 10,
            hang: false,
            linger: 0,
        }
    }
}

/// What is wrong with the options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptError<'a> {
    /// `blk.<key>` is not an option.
    Unknown(&'a str),
    /// `blk.<key>=<value>` has a bad value.
    Bad(&'a str, &'a str),
    /// blk.qd * blk.bs exceeds the buffer pool.
    PoolTooSmall,
}

/// True when the command line has any `blk.*` option.
fn num(v: &str, min: u64, max: u64) -> Option<u64> {
    parse_u64(v).filter(|n| (min..=max).contains(n))
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// Parses every `blk.*` option (the last one of a key wins).
pub fn parse<'a>(args: &Cmdline<'a>) -> Result<Options, OptError<'a>> {
    let mut o = Options::default();
    for (key, v) in args.options() {
        let Some(k) = key.strip_prefix("blk.") else {
            continue;
        };
        let bad = OptError::Bad(k, v);
        let sectors = |v| num(v, 0, u64::MAX).filter(|n| n % SECTOR as u64 == 0);
        match k {
            "mode" => o.mode = Mode::ALL.into_iter().find(|m| m.name() == v).ok_or(bad)?,
            "dev" => o.dev = num(v, 0, 255).ok_or(bad)? as u32,
            "bs" => {
                o.bs = sectors(v)
                    .filter(|&n| n != 0 && n <= POOL_BYTES as u64)
                    .ok_or(bad)? as u32
            }
            "qd" => o.qd = num(v, 1, MAX_QD.into()).ok_or(bad)? as u32,
            "count" => o.count = Some(num(v, 0, u64::MAX).ok_or(bad)?),
            "secs" => o.secs = Some(num(v, 1, 1 << 20).ok_or(bad)?),
            "offset" => o.offset = sectors(v).ok_or(bad)?,
            "len" => o.len = Some(sectors(v).filter(|&n| n != 0).ok_or(bad)?),
            "seed" => o.seed = num(v, 0, u64::MAX).ok_or(bad)?,
            "queues" => o.queues = num(v, 1, MAX_QUEUES.into()).ok_or(bad)? as u32,
            "event_idx" => o.event_idx = boolean(v).ok_or(bad)?,
            "indirect" => o.indirect = boolean(v).ok_or(bad)?,
            "flush" => o.flush = boolean(v).ok_or(bad)?,
            "id" => o.id = boolean(v).ok_or(bad)?,
            "timeout" => o.timeout = num(v, 0, 1 << 20).ok_or(bad)?,
            "hang" => o.hang = boolean(v).ok_or(bad)?,
            "linger" => o.linger = num(v, 0, 1 << 20).ok_or(bad)?,
            _ => return Err(OptError::Unknown(k)),
        }
    }
    if u64::from(o.qd) * u64::from(o.bs) > POOL_BYTES as u64 {
        return Err(OptError::PoolTooSmall);
    }
    Ok(o)
}

/// The byte range a workload covers and how many requests it issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// First byte (absolute, sector aligned).
    pub start: u64,
    /// Bytes in the range (sector multiple, > 0).
    pub len: u64,
    pub bs: u64,
    /// Requests per pass over the range: ceil(len / bs); the last one may
    /// be short.
    pub per_pass: u64,
    /// Requests to issue (`None`: until `secs` runs out).
    pub total: Option<u64>,
}

impl Plan {
    /// Resolves offset/len/count against a disk of `capacity` sectors.
    /// `crc` always makes exactly one pass; the other modes make one pass
    /// unless `count` or `secs` is given (both may limit).
    pub fn new(o: &Options, capacity: u64) -> Result<Plan, &'static str> {
        let disk = capacity.saturating_mul(SECTOR as u64);
        if o.offset >= disk {
            return Err("blk.offset is beyond the end of the disk");
        }
        let len = o.len.unwrap_or(u64::MAX).min(disk - o.offset);
        let bs = u64::from(o.bs);
        let per_pass = len.div_ceil(bs);
        let total = match (o.mode, o.count, o.secs) {
            (Mode::Crc, _, _) => Some(per_pass),
            (_, Some(n), _) => Some(n),
            (_, None, Some(_)) => None,
            (_, None, None) => Some(per_pass),
        };
        Ok(Plan {
            start: o.offset,
            len,
            bs,
            per_pass,
            total,
        })
    }

    /// Absolute byte offset and length of request number `n`: sequential
    /// (wrapping) or a random block of the range.
    pub fn request(&self, n: u64, random: Option<&mut Rng>) -> (u64, u32) {
        let block = match random {
            Some(rng) => rng.below(self.per_pass),
            None => n % self.per_pass,
        };
        let off = block * self.bs;
        (self.start + off, self.bs.min(self.len - off) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Result<Options, OptError<'_>> {
        parse(&Cmdline::new(s.as_bytes()))
    }

    #[test]
    fn defaults_and_detection() {
        assert_eq!(opts("exit=2").unwrap(), Options::default());
    }

    #[test]
    fn values() {
        let o = opts(
            "blk.mode=randwrite blk.dev=1 blk.bs=64K blk.qd=32 blk.count=100 blk.secs=2 \
             blk.offset=1M blk.len=0x200000 blk.seed=7 blk.queues=4 blk.event_idx=0 \
             blk.indirect=0 blk.flush=1 blk.id=1 blk.timeout=0 blk.qd=16",
        )
        .unwrap();
        assert_eq!(o.mode, Mode::RandWrite);
        assert_eq!((o.dev, o.bs, o.qd, o.queues), (1, 65536, 16, 4));
        assert_eq!((o.count, o.secs), (Some(100), Some(2)));
        assert_eq!((o.offset, o.len, o.seed), (1 << 20, Some(2 << 20), 7));
        assert!(!o.event_idx && !o.indirect && o.flush && o.id);
        assert_eq!((o.timeout, o.linger), (0, 0));
        assert_eq!(opts("blk.linger=120").unwrap().linger, 120);
        for m in Mode::ALL {
            let s = format!("blk.mode={}", m.name());
            assert_eq!(opts(&s).unwrap().mode, m);
        }
    }

    #[test]
    fn errors() {
        assert_eq!(opts("blk.mod=read"), Err(OptError::Unknown("mod")));
        assert_eq!(opts("blk.mode=fast"), Err(OptError::Bad("mode", "fast")));
        for bad in [
            "blk.bs=0",
            "blk.bs=1000",
            "blk.bs=8M",
            "blk.qd=0",
            "blk.qd=257",
            "blk.offset=100",
            "blk.len=0",
            "blk.queues=9",
            "blk.flush=yes",
            "blk.secs=0",
            "blk.count=-1",
            "blk.linger=x",
            "blk.linger=2097152",
        ] {
            assert!(matches!(opts(bad), Err(OptError::Bad(..))), "{bad}");
        }
        assert_eq!(opts("blk.qd=64 blk.bs=128K"), Err(OptError::PoolTooSmall));
        assert!(opts("blk.qd=32 blk.bs=128K").is_ok());
    }

    #[test]
    fn plans() {
        let mut o = opts("blk.mode=write blk.bs=4K").unwrap();
        // 16 MiB disk.
        let p = Plan::new(&o, 32768).unwrap();
        assert_eq!(
            (p.start, p.len, p.per_pass, p.total),
            (0, 16 << 20, 4096, Some(4096))
        );
        o.offset = 1 << 20;
        o.len = Some(10 * 512);
        let p = Plan::new(&o, 32768).unwrap();
        assert_eq!((p.per_pass, p.total), (2, Some(2)));
        assert_eq!(p.request(0, None), (1 << 20, 4096));
        assert_eq!(p.request(1, None), ((1 << 20) + 4096, 1024));
        assert_eq!(p.request(2, None), (1 << 20, 4096));
        // len is capped at the end of the disk.
        o.len = Some(1 << 30);
        assert_eq!(Plan::new(&o, 32768).unwrap().len, 15 << 20);
        o.offset = 16 << 20;
        assert!(Plan::new(&o, 32768).is_err());
        // count / secs.
        let o = opts("blk.count=10 blk.secs=1").unwrap();
        assert_eq!(Plan::new(&o, 32768).unwrap().total, Some(10));
        let o = opts("blk.secs=1").unwrap();
        assert_eq!(Plan::new(&o, 32768).unwrap().total, None);
        let o = opts("blk.mode=crc blk.count=3 blk.len=64K").unwrap();
        assert_eq!(Plan::new(&o, 32768).unwrap().total, Some(16));
    }

    #[test]
    fn random_requests_stay_in_range() {
        let o = opts("blk.mode=randread blk.bs=4K blk.offset=8K blk.len=40K").unwrap();
        let p = Plan::new(&o, 1 << 20).unwrap();
        let mut rng = Rng::new(o.seed);
        let mut seen = [false; 10];
        for n in 0..1000 {
            let (pos, len) = p.request(n, Some(&mut rng));
            assert_eq!(len, 4096);
            assert!(pos >= 8192 && pos + 4096 <= 8192 + 40960);
            assert_eq!(pos % 4096, 0);
            seen[((pos - 8192) / 4096) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
