//! `net.*` command line options.

use crate::cmdline::{parse_u64, Cmdline};

/// Most queue pairs used (each pair and the control queue take a ring
/// memory slot and an interrupt vector: 2 * 3 + 1 <= 8).
pub const MAX_PAIRS: usize = 3;
/// Most datagrams a flood sends (one bit each in the received bitmap).
pub const MAX_COUNT: u64 = 1 << 20;
/// Largest UDP payload: a 1500-byte IPv4 packet, no fragmentation.
pub const MAX_PAYLOAD: u16 = 1472;
/// Smallest flood payload: it carries a 64-bit sequence number.
pub const MIN_FLOOD_PAYLOAD: u16 = 8;
/// Size of each RX and TX buffer in guest memory.
pub const BUF_BYTES: usize = 2048;
/// Smallest RX buffer the device is given (with MRG_RXBUF).
pub const MIN_RXBUF: u32 = 64;
/// Most datagrams in flight in a flood.
pub const MAX_WINDOW: u16 = 256;

/// What the guest does on the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Answer ARP, ICMP echo and UDP echo (port 7).
    Respond,
    /// Send datagrams to a peer and count the echoes.
    UdpFlood,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Respond => "respond",
            Mode::UdpFlood => "udp-flood",
        }
    }
}

/// An IPv4 address, network byte order.
pub type Ip = [u8; 4];

/// Parsed `net.*` options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub ip: Ip,
    /// Prefix length of `ip`'s subnet.
    pub prefix: u8,
    pub mode: Mode,
    /// The flood's echo server.
    pub peer: Option<(Ip, u16)>,
    /// Respond: stop after this many UDP echoes; flood: datagrams to send.
    pub count: Option<u64>,
    /// UDP payload bytes of a flood datagram.
    pub size: u16,
    /// Most flood datagrams in flight.
    pub window: u16,
    /// Queue pairs to use.
    pub queues: u8,
    pub mrg: bool,
    pub csum: bool,
    pub event_idx: bool,
    /// Bytes of each RX buffer offered to the device.
    pub rxbuf: u32,
    /// Give up after this many watchdog ticks (about 1 s each) without
    /// progress; 0 = never.
    pub timeout: u64,
    /// Respond: stop after this many watchdog ticks (about 1 s each), with
    /// the result line and status 0 (a soak's fixed length); None = no
    /// time limit.
    pub secs: Option<u64>,
    pub dev: u32,
}

/// Default flood count.
pub const DEFAULT_FLOOD_COUNT: u64 = 1000;
/// Default idle limit of a flood (and of its ARP resolution).
pub const DEFAULT_FLOOD_TIMEOUT: u64 = 10;

impl Options {
    /// Datagrams to send (flood) or echoes to answer (respond; `None`:
    /// forever).
    pub fn count(&self) -> Option<u64> {
        match self.mode {
            Mode::Respond => self.count,
            Mode::UdpFlood => Some(self.count.unwrap_or(DEFAULT_FLOOD_COUNT)),
        }
    }

    /// The subnet mask of `ip`.
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }
}

/// What is wrong with the options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptError<'a> {
    /// `net.<key>` is not an option.
    Unknown(&'a str),
    /// `net.<key>=<value>` has a bad value.
    Bad(&'a str, &'a str),
    /// A required option is missing (its key).
    Missing(&'static str),
    /// Options that do not fit together.
    Conflict(&'static str),
}

/// True when the command line has any `net.*` option.
fn num(v: &str, min: u64, max: u64) -> Option<u64> {
    parse_u64(v).filter(|n| (min..=max).contains(n))
}

fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "1" => Some(true),
        "off" | "0" => Some(false),
        _ => None,
    }
}

/// Parses a dotted quad `A.B.C.D` (decimal, 0..=255 each).
pub fn parse_ip(s: &str) -> Option<Ip> {
    let mut ip = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut ip {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *b = p.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

fn parse_cidr(s: &str) -> Option<(Ip, u8)> {
    let (ip, prefix) = s.split_once('/')?;
    let prefix = num(prefix, 1, 32)? as u8;
    let ip = parse_ip(ip)?;
    let host = u32::from_be_bytes(ip) & !(u32::MAX << (32 - u32::from(prefix)));
    // Neither the network nor (where the subnet has one) the broadcast
    // address is a host.
    let hosts = prefix < 31 && (host == 0 || host == !(u32::MAX << (32 - u32::from(prefix))));
    (!hosts).then_some((ip, prefix))
}

fn parse_endpoint(s: &str) -> Option<(Ip, u16)> {
    let (ip, port) = s.split_once(':')?;
    Some((parse_ip(ip)?, num(port, 1, 65535)? as u16))
}

/// Parses every `net.*` option (the last one of a key wins) and checks
/// that they fit together.
pub fn parse<'a>(args: &Cmdline<'a>) -> Result<Options, OptError<'a>> {
    let mut ip = None;
    let mut o = Options {
        ip: [0; 4],
        prefix: 0,
        mode: Mode::Respond,
        peer: None,
        count: None,
        size: 64,
        window: 32,
        queues: 1,
        mrg: true,
        csum: false,
        event_idx: true,
        rxbuf: BUF_BYTES as u32,
        timeout: 0,
        secs: None,
        dev: 0,
    };
    let mut timeout = None;
    for (key, v) in args.options() {
        let Some(k) = key.strip_prefix("net.") else {
            continue;
        };
        let bad = OptError::Bad(k, v);
        match k {
            "ip" => ip = Some(parse_cidr(v).ok_or(bad)?),
            "mode" => {
                o.mode = [Mode::Respond, Mode::UdpFlood]
                    .into_iter()
                    .find(|m| m.name() == v)
                    .ok_or(bad)?
            }
            "peer" => o.peer = Some(parse_endpoint(v).ok_or(bad)?),
            "count" => o.count = Some(num(v, 1, u64::MAX).ok_or(bad)?),
            "size" => o.size = num(v, 0, MAX_PAYLOAD.into()).ok_or(bad)? as u16,
            "window" => o.window = num(v, 1, MAX_WINDOW.into()).ok_or(bad)? as u16,
            "queues" => o.queues = num(v, 1, MAX_PAIRS as u64).ok_or(bad)? as u8,
            "mrg" => o.mrg = on_off(v).ok_or(bad)?,
            "csum" => o.csum = on_off(v).ok_or(bad)?,
            "event_idx" => o.event_idx = on_off(v).ok_or(bad)?,
            "rxbuf" => o.rxbuf = num(v, MIN_RXBUF.into(), BUF_BYTES as u64).ok_or(bad)? as u32,
            "timeout" => timeout = Some(num(v, 0, 1 << 20).ok_or(bad)?),
            "secs" => o.secs = Some(num(v, 1, 1 << 32).ok_or(bad)?),
            "dev" => o.dev = num(v, 0, 255).ok_or(bad)? as u32,
            _ => return Err(OptError::Unknown(k)),
        }
    }
    (o.ip, o.prefix) = ip.ok_or(OptError::Missing("net.ip"))?;
    if o.mode == Mode::UdpFlood && o.secs.is_some() {
        return Err(OptError::Conflict("net.secs is for net.mode=respond"));
    }
    if o.mode == Mode::UdpFlood {
        let (peer, _) = o.peer.ok_or(OptError::Missing("net.peer"))?;
        if (u32::from_be_bytes(peer) ^ u32::from_be_bytes(o.ip)) & o.mask() != 0 {
            return Err(OptError::Conflict("net.peer is not on the net.ip subnet"));
        }
        if peer == o.ip {
            return Err(OptError::Conflict("net.peer is the guest's own address"));
        }
        if o.count.is_some_and(|n| n > MAX_COUNT) {
            return Err(OptError::Conflict(
                "net.count is above 1048576 for udp-flood",
            ));
        }
        if o.size < MIN_FLOOD_PAYLOAD {
            return Err(OptError::Conflict("net.size is below 8 for udp-flood"));
        }
    }
    if o.rxbuf < BUF_BYTES as u32 && !o.mrg {
        return Err(OptError::Conflict("net.rxbuf below 2048 needs net.mrg=on"));
    }
    o.timeout = timeout.unwrap_or(match o.mode {
        Mode::Respond => 0,
        Mode::UdpFlood => DEFAULT_FLOOD_TIMEOUT,
    });
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Result<Options, OptError<'_>> {
        parse(&Cmdline::new(s.as_bytes()))
    }

    #[test]
    fn detection_and_defaults() {
        let o = opts("net.ip=10.0.0.2/24").unwrap();
        assert_eq!((o.ip, o.prefix, o.mask()), ([10, 0, 0, 2], 24, 0xffff_ff00));
        assert_eq!((o.mode, o.peer, o.count()), (Mode::Respond, None, None));
        assert_eq!((o.size, o.window, o.queues), (64, 32, 1));
        assert!(o.mrg && !o.csum && o.event_idx);
        assert_eq!((o.rxbuf, o.timeout, o.dev), (2048, 0, 0));
        assert_eq!(o.secs, None);
        assert_eq!(opts("exit=1"), Err(OptError::Missing("net.ip")));
    }

    #[test]
    fn secs_limits_respond_only() {
        let o = opts("net.ip=10.0.0.2/24 net.secs=600 net.count=9").unwrap();
        assert_eq!((o.secs, o.count()), (Some(600), Some(9)));
        assert_eq!(
            opts("net.ip=10.0.0.2/24 net.secs=0"),
            Err(OptError::Bad("secs", "0"))
        );
        assert_eq!(
            opts("net.ip=10.0.0.2/24 net.mode=udp-flood net.peer=10.0.0.1:7 net.secs=5"),
            Err(OptError::Conflict("net.secs is for net.mode=respond"))
        );
    }

    #[test]
    fn flood_values() {
        let o = opts(
            "net.ip=192.168.7.9/16 net.mode=udp-flood net.peer=192.168.1.1:7 net.size=1472 \
             net.window=256 net.queues=3 net.mrg=off net.csum=on net.event_idx=0 net.dev=1 \
             net.count=5 net.count=0x10",
        )
        .unwrap();
        assert_eq!(o.mode, Mode::UdpFlood);
        assert_eq!(o.peer, Some(([192, 168, 1, 1], 7)));
        assert_eq!(
            (o.count(), o.size, o.window, o.queues),
            (Some(16), 1472, 256, 3)
        );
        assert!(!o.mrg && o.csum && !o.event_idx);
        assert_eq!((o.dev, o.timeout), (1, DEFAULT_FLOOD_TIMEOUT));
        let o =
            opts("net.ip=10.1.1.1/8 net.mode=udp-flood net.peer=10.9.9.9:9 net.timeout=0").unwrap();
        assert_eq!((o.count(), o.timeout), (Some(DEFAULT_FLOOD_COUNT), 0));
        let o = opts("net.ip=10.0.0.2/24 net.rxbuf=128").unwrap();
        assert_eq!(o.rxbuf, 128);
    }

    #[test]
    fn errors() {
        assert_eq!(
            opts("net.ip=10.0.0.2/24 net.foo=1"),
            Err(OptError::Unknown("foo"))
        );
        for bad in [
            "net.ip=10.0.0.2",
            "net.ip=10.0.0/24",
            "net.ip=10.0.0.256/24",
            "net.ip=10.0.0.2/33",
            "net.ip=10.0.0.2/0",
            "net.ip=10.0.0.0/24",
            "net.ip=10.0.0.255/24",
            "net.ip=10.0.0.2.1/24",
            "net.ip=10.0.0.+2/24",
            "net.ip=10.0.0.2/24 net.mode=flood",
            "net.ip=10.0.0.2/24 net.peer=10.0.0.1",
            "net.ip=10.0.0.2/24 net.peer=10.0.0.1:0",
            "net.ip=10.0.0.2/24 net.peer=10.0.0.1:65536",
            "net.ip=10.0.0.2/24 net.count=0",
            "net.ip=10.0.0.2/24 net.size=1473",
            "net.ip=10.0.0.2/24 net.window=0",
            "net.ip=10.0.0.2/24 net.window=257",
            "net.ip=10.0.0.2/24 net.queues=0",
            "net.ip=10.0.0.2/24 net.queues=4",
            "net.ip=10.0.0.2/24 net.mrg=yes",
            "net.ip=10.0.0.2/24 net.rxbuf=32",
            "net.ip=10.0.0.2/24 net.rxbuf=4096",
        ] {
            assert!(matches!(opts(bad), Err(OptError::Bad(..))), "{bad}");
        }
        // /31 and /32 have no network or broadcast address.
        assert!(opts("net.ip=10.0.0.0/31").is_ok());
        assert!(opts("net.ip=10.0.0.255/32").is_ok());
        assert_eq!(
            opts("net.ip=10.0.0.2/24 net.mode=udp-flood"),
            Err(OptError::Missing("net.peer"))
        );
        for conflict in [
            "net.ip=10.0.0.2/24 net.mode=udp-flood net.peer=10.0.1.1:7",
            "net.ip=10.0.0.2/24 net.mode=udp-flood net.peer=10.0.0.2:7",
            "net.ip=10.0.0.2/24 net.mode=udp-flood net.peer=10.0.0.1:7 net.count=2M",
            "net.ip=10.0.0.2/24 net.mode=udp-flood net.peer=10.0.0.1:7 net.size=7",
            "net.ip=10.0.0.2/24 net.rxbuf=1024 net.mrg=off",
        ] {
            assert!(
                matches!(opts(conflict), Err(OptError::Conflict(_))),
                "{conflict}"
            );
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(parse_ip("0.0.0.0"), Some([0; 4]));
        assert_eq!(parse_ip("255.255.255.255"), Some([255; 4]));
        for bad in [
            "",
            "1.2.3",
            "1.2.3.4.",
            "1..3.4",
            "1.2.3.0400",
            "a.b.c.d",
            "1.2.3.-4",
        ] {
            assert_eq!(parse_ip(bad), None, "{bad}");
        }
        assert_eq!(parse_endpoint("10.0.0.1:7"), Some(([10, 0, 0, 1], 7)));
        assert_eq!(parse_endpoint("10.0.0.1:"), None);
    }
}
