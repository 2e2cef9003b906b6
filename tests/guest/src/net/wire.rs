//! Ethernet, ARP, IPv4, ICMP echo and UDP: parsing, building, checksums.
//!
//! Frames are byte slices starting at the Ethernet header. Parsers check
//! every length against the slice and return offsets; builders write into
//! a buffer the caller sized (at least the frame length they return).
//! Checksums sum 8 bytes per step (the guest runs under an instruction
//! emulator: no per-byte loops on the packet path).

use super::options::Ip;

/// An Ethernet MAC address.
pub type Mac = [u8; 6];
/// The broadcast MAC address.
pub const BROADCAST: Mac = [0xff; 6];

pub const ETH_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// ARP for IPv4 over Ethernet, after the Ethernet header.
pub const ARP_LEN: usize = 28;
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;
/// IPv4 header without options.
pub const IPV4_LEN: usize = 20;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_UDP: u8 = 17;
pub const UDP_LEN: usize = 8;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// Offset of the UDP checksum in the UDP header.
pub const UDP_CSUM_OFF: usize = 6;
/// Offset of the ICMP checksum in the ICMP header.
const ICMP_CSUM_OFF: usize = 2;
/// TTL of the packets the guest originates.
const TTL: u8 = 64;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn mac_at(b: &[u8], at: usize) -> Mac {
    let mut m = [0; 6];
    m.copy_from_slice(&b[at..at + 6]);
    m
}

fn ip_at(b: &[u8], at: usize) -> Ip {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

/// Adds `data` to the one's-complement accumulator `acc`, 8 bytes per
/// step with end-around carry. Words are summed in memory order read as
/// little-endian, which [`fold`] turns back into the big-endian sum
/// (RFC 1071: the sum is byte-order independent). Every piece summed
/// into one accumulator must start at an even offset of the checksummed
/// data; an odd last byte is padded with zero.
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut add = |w: u64| {
        let (s, carry) = acc.overflowing_add(w);
        acc = s + u64::from(carry);
    };
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        add(u64::from_le_bytes(w));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        add(u64::from_le_bytes(w));
    }
    acc
}

/// Folds an accumulator from [`sum`] to the 16-bit one's-complement sum
/// (not inverted), as a big-endian-valued number.
pub fn fold(acc: u64) -> u16 {
    let mut a = (acc & 0xffff_ffff) + (acc >> 32);
    a = (a & 0xffff_ffff) + (a >> 32);
    a = (a & 0xffff) + (a >> 16);
    a = (a & 0xffff) + (a >> 16);
    (a as u16).swap_bytes()
}

/// The checksum to store for data summing to `acc` (with the checksum
/// field zero).
pub fn checksum(acc: u64) -> u16 {
    !fold(acc)
}

/// RFC 1624 incremental update of checksum `hc` when a 16-bit word of
/// the covered data changes from `old` to `new`.
pub fn adjust(hc: u16, old: u16, new: u16) -> u16 {
    let s = u32::from(!hc) + u32::from(!old) + u32::from(new);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// The sum of the IPv4 pseudo header for `proto` and `len` L4 bytes.
pub fn pseudo_sum(src: Ip, dst: Ip, proto: u8, len: u16) -> u64 {
    let l = len.to_be_bytes();
    let p = [
        src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3], 0, proto, l[0], l[1],
    ];
    sum(&p, 0)
}

/// The ethertype, when the frame has a whole Ethernet header.
pub fn ethertype(frame: &[u8]) -> Option<u16> {
    (frame.len() >= ETH_LEN).then(|| be16(frame, 12))
}

fn write_eth(buf: &mut [u8], dst: Mac, src: Mac, ethertype: u16) {
    buf[..6].copy_from_slice(&dst);
    buf[6..12].copy_from_slice(&src);
    put16(buf, 12, ethertype);
}

/// An ARP packet (IPv4 over Ethernet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sha: Mac,
    pub spa: Ip,
    pub tpa: Ip,
}

/// Parses an ARP frame; `None` when it is not Ethernet/IPv4 ARP.
pub fn parse_arp(frame: &[u8]) -> Option<Arp> {
    let a = frame.get(ETH_LEN..ETH_LEN + ARP_LEN)?;
    if be16(a, 0) != 1 || be16(a, 2) != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4 {
        return None;
    }
    Some(Arp {
        op: be16(a, 6),
        sha: mac_at(a, 8),
        spa: ip_at(a, 14),
        tpa: ip_at(a, 24),
    })
}

/// What an ARP frame the guest sends says.
#[derive(Clone, Copy, Debug)]
pub struct ArpOut {
    pub op: u16,
    /// Ethernet destination (broadcast for a request).
    pub eth_dst: Mac,
    pub sha: Mac,
    pub spa: Ip,
    /// Target hardware address (zero in a request).
    pub tha: Mac,
    pub tpa: Ip,
}

/// Writes an ARP frame; returns its length.
pub fn build_arp(buf: &mut [u8], a: &ArpOut) -> usize {
    write_eth(buf, a.eth_dst, a.sha, ETHERTYPE_ARP);
    let p = &mut buf[ETH_LEN..ETH_LEN + ARP_LEN];
    p[..6].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    put16(p, 6, a.op);
    p[8..14].copy_from_slice(&a.sha);
    p[14..18].copy_from_slice(&a.spa);
    p[18..24].copy_from_slice(&a.tha);
    p[24..28].copy_from_slice(&a.tpa);
    ETH_LEN + ARP_LEN
}

/// Why an IPv4 packet is not processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Truncated or inconsistent lengths, bad version, or a bad checksum:
    /// counted as bad.
    Bad,
    /// Valid but not handled (a fragment, another protocol, not ours).
    Ignored,
}

/// The IPv4 header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    /// Header bytes (with options).
    pub hlen: usize,
    /// Total length (header and payload), from the header.
    pub total: usize,
    pub proto: u8,
    pub src: Ip,
    pub dst: Ip,
}

impl Ipv4 {
    /// Offset of the L4 header in the frame.
    pub fn l4(&self) -> usize {
        ETH_LEN + self.hlen
    }

    /// Frame bytes up to the end of the IP packet (Ethernet padding
    /// excluded).
    pub fn frame_len(&self) -> usize {
        ETH_LEN + self.total
    }
}

/// Parses and checks the IPv4 header (version, lengths, header checksum);
/// fragments are ignored.
pub fn parse_ipv4(frame: &[u8]) -> Result<Ipv4, Reject> {
    let h = frame.get(ETH_LEN..).ok_or(Reject::Bad)?;
    if h.len() < IPV4_LEN || h[0] >> 4 != 4 {
        return Err(Reject::Bad);
    }
    let hlen = usize::from(h[0] & 0xf) * 4;
    let total = usize::from(be16(h, 2));
    if hlen < IPV4_LEN || total < hlen || total > h.len() {
        return Err(Reject::Bad);
    }
    if fold(sum(&h[..hlen], 0)) != 0xffff {
        return Err(Reject::Bad);
    }
    // More-fragments flag or a fragment offset.
    if be16(h, 6) & 0x3fff != 0 {
        return Err(Reject::Ignored);
    }
    Ok(Ipv4 {
        hlen,
        total,
        proto: h[9],
        src: ip_at(h, 12),
        dst: ip_at(h, 16),
    })
}

/// Swaps the Ethernet and IPv4 source and destination addresses in
/// place (the IP header checksum is unchanged by the swap).
fn swap_addresses(frame: &mut [u8]) {
    let (dst, rest) = frame.split_at_mut(6);
    dst.swap_with_slice(&mut rest[..6]);
    let ip = &mut frame[ETH_LEN + 12..ETH_LEN + 20];
    let (src, dst) = ip.split_at_mut(4);
    src.swap_with_slice(dst);
}

/// Checks an ICMP message: `Ok(true)` for a well-formed echo request.
/// `verify`: check the ICMP checksum.
pub fn is_echo_request(frame: &[u8], ip: &Ipv4, verify: bool) -> Result<bool, Reject> {
    let m = &frame[ip.l4()..ip.frame_len()];
    if m.len() < 8 {
        return Err(Reject::Bad);
    }
    if verify && fold(sum(m, 0)) != 0xffff {
        return Err(Reject::Bad);
    }
    Ok(m[0] == ICMP_ECHO_REQUEST && m[1] == 0)
}

/// Turns a copy of an echo request frame into its reply, in place:
/// addresses swapped, type 0. `partial`: the request's checksum was not
/// complete (device checksum offload), so it is recomputed instead of
/// adjusted. Returns the reply's length.
pub fn echo_reply_in_place(frame: &mut [u8], ip: &Ipv4, partial: bool) -> usize {
    swap_addresses(frame);
    let m = &mut frame[ip.l4()..ip.frame_len()];
    m[0] = ICMP_ECHO_REPLY;
    let c = if partial {
        put16(m, ICMP_CSUM_OFF, 0);
        checksum(sum(m, 0))
    } else {
        let old = u16::from(ICMP_ECHO_REQUEST) << 8;
        adjust(be16(m, ICMP_CSUM_OFF), old, u16::from(ICMP_ECHO_REPLY) << 8)
    };
    put16(m, ICMP_CSUM_OFF, c);
    ip.frame_len()
}

/// A UDP datagram of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Udp {
    pub sport: u16,
    pub dport: u16,
    /// Offset of the payload in the frame.
    pub payload: usize,
    pub payload_len: usize,
    /// The checksum field (0: none).
    pub csum: u16,
}

/// Parses the UDP header; `verify`: check a non-zero checksum (with the
/// pseudo header).
pub fn parse_udp(frame: &[u8], ip: &Ipv4, verify: bool) -> Result<Udp, Reject> {
    let l4 = ip.l4();
    let seg = &frame[l4..ip.frame_len()];
    if seg.len() < UDP_LEN {
        return Err(Reject::Bad);
    }
    let len = usize::from(be16(seg, 4));
    if len < UDP_LEN || len > seg.len() {
        return Err(Reject::Bad);
    }
    let csum = be16(seg, UDP_CSUM_OFF);
    if verify && csum != 0 {
        let acc = pseudo_sum(ip.src, ip.dst, PROTO_UDP, len as u16);
        if fold(sum(&seg[..len], acc)) != 0xffff {
            return Err(Reject::Bad);
        }
    }
    Ok(Udp {
        sport: be16(seg, 0),
        dport: be16(seg, 2),
        payload: l4 + UDP_LEN,
        payload_len: len - UDP_LEN,
        csum,
    })
}

/// Turns a copy of a UDP datagram's frame into its echo, in place:
/// Ethernet, IP and port numbers swapped. Neither checksum changes (a
/// swap keeps one's-complement sums, pseudo header included), so a
/// partial checksum stays a valid partial checksum too. Returns the
/// echo's length.
pub fn udp_echo_in_place(frame: &mut [u8], ip: &Ipv4) -> usize {
    swap_addresses(frame);
    let (sport, rest) = frame[ip.l4()..].split_at_mut(2);
    sport.swap_with_slice(&mut rest[..2]);
    ip.frame_len()
}

/// Addresses and ports of a datagram the guest sends.
#[derive(Clone, Copy, Debug)]
pub struct UdpOut {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: Ip,
    pub dst: Ip,
    pub sport: u16,
    pub dport: u16,
    /// IPv4 identification.
    pub ident: u16,
}

/// Writes the Ethernet, IPv4 (with checksum) and UDP headers of a
/// datagram with `payload_len` bytes (written by the caller at
/// [`UDP_PAYLOAD`]); the UDP checksum is left 0 ("none"). Returns the
/// frame length.
pub fn build_udp_headers(buf: &mut [u8], u: &UdpOut, payload_len: usize) -> usize {
    let udp_len = UDP_LEN + payload_len;
    let total = IPV4_LEN + udp_len;
    write_eth(buf, u.dst_mac, u.src_mac, ETHERTYPE_IPV4);
    let h = &mut buf[ETH_LEN..ETH_LEN + IPV4_LEN + UDP_LEN];
    h[0] = 0x45;
    h[1] = 0;
    put16(h, 2, total as u16);
    put16(h, 4, u.ident);
    put16(h, 6, 0x4000); // don't fragment
    h[8] = TTL;
    h[9] = PROTO_UDP;
    put16(h, 10, 0);
    h[12..16].copy_from_slice(&u.src);
    h[16..20].copy_from_slice(&u.dst);
    let c = checksum(sum(&h[..IPV4_LEN], 0));
    put16(h, 10, c);
    let d = &mut h[IPV4_LEN..];
    put16(d, 0, u.sport);
    put16(d, 2, u.dport);
    put16(d, 4, udp_len as u16);
    put16(d, UDP_CSUM_OFF, 0);
    ETH_LEN + total
}

/// Offset of the payload of a datagram from [`build_udp_headers`].
pub const UDP_PAYLOAD: usize = ETH_LEN + IPV4_LEN + UDP_LEN;

/// Offset of the UDP header of a datagram from [`build_udp_headers`].
pub const UDP_HEADER: usize = ETH_LEN + IPV4_LEN;

/// Fills in the full UDP checksum of a datagram from
/// [`build_udp_headers`] whose payload is written.
pub fn finish_udp_checksum(frame: &mut [u8], u: &UdpOut, payload_len: usize) {
    let len = UDP_LEN + payload_len;
    let seg = &mut frame[UDP_HEADER..UDP_HEADER + len];
    let c = checksum(sum(seg, pseudo_sum(u.src, u.dst, PROTO_UDP, len as u16)));
    // A computed 0 is sent as all ones (0 means "no checksum").
    put16(seg, UDP_CSUM_OFF, if c == 0 { 0xffff } else { c });
}

/// Prepares a datagram from [`build_udp_headers`] for checksum offload:
/// stores the folded pseudo-header sum in the checksum field. The device
/// sums from the UDP header to the end and stores the result there.
pub fn partial_udp_checksum(frame: &mut [u8], u: &UdpOut, payload_len: usize) {
    let len = (UDP_LEN + payload_len) as u16;
    let c = fold(pseudo_sum(u.src, u.dst, PROTO_UDP, len));
    put16(frame, UDP_HEADER + UDP_CSUM_OFF, c);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth_src(frame: &[u8]) -> Mac {
        mac_at(frame, 6)
    }

    /// The textbook checksum: 16-bit big-endian words, 32-bit sum.
    fn naive(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for (i, &b) in data.iter().enumerate() {
            s += if i % 2 == 0 {
                u32::from(b) << 8
            } else {
                u32::from(b)
            };
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    fn bytes(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed).rotate_left(7) as u8)
            .collect()
    }

    #[test]
    fn sum_matches_the_naive_sum() {
        for n in 0..80 {
            for seed in [0, 0xffff_ffff, 12345] {
                let d = bytes(n, seed);
                assert_eq!(fold(sum(&d, 0)), naive(&d), "n={n} seed={seed}");
            }
        }
        // All ones: carries everywhere.
        let d = [0xffu8; 37];
        assert_eq!(fold(sum(&d, 0)), naive(&d));
        // Accumulating pieces at even offsets equals one pass.
        let d = bytes(61, 9);
        assert_eq!(fold(sum(&d[20..], sum(&d[..20], 0))), naive(&d));
        // RFC 1071's example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        assert_eq!(
            fold(sum(&[0, 1, 0xf2, 3, 0xf4, 0xf5, 0xf6, 0xf7], 0)),
            0xddf2
        );
    }

    #[test]
    fn incremental_update_equals_recomputation() {
        for seed in 0..50 {
            let mut d = bytes(40, seed);
            d[2] = 0;
            d[3] = 0;
            let c = !naive(&d);
            d[2..4].copy_from_slice(&c.to_be_bytes());
            assert_eq!(naive(&d), 0xffff);
            let old = be16(&d, 10);
            let new = (seed as u16).wrapping_mul(7919);
            put16(&mut d, 10, new);
            let adjusted = adjust(c, old, new);
            put16(&mut d, 2, 0);
            let fresh = !naive(&d);
            // One's complement has two zeros; both verify.
            put16(&mut d, 2, adjusted);
            assert_eq!(naive(&d), 0xffff, "seed={seed} {adjusted:x} {fresh:x}");
        }
    }

    const MAC_A: Mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const MAC_B: Mac = [0x02, 0, 0, 0, 0, 1];
    const IP_A: Ip = [10, 0, 0, 2];
    const IP_B: Ip = [10, 0, 0, 1];

    #[test]
    fn arp_round_trip() {
        let mut buf = [0u8; 64];
        let n = build_arp(
            &mut buf,
            &ArpOut {
                op: ARP_REQUEST,
                eth_dst: BROADCAST,
                sha: MAC_B,
                spa: IP_B,
                tha: [0; 6],
                tpa: IP_A,
            },
        );
        assert_eq!(n, 42);
        assert_eq!(ethertype(&buf[..n]), Some(ETHERTYPE_ARP));
        assert_eq!(&buf[..6], &BROADCAST);
        assert_eq!(eth_src(&buf), MAC_B);
        let a = parse_arp(&buf[..n]).unwrap();
        assert_eq!(
            a,
            Arp {
                op: ARP_REQUEST,
                sha: MAC_B,
                spa: IP_B,
                tpa: IP_A
            }
        );
        // Wire bytes of the ARP header.
        assert_eq!(&buf[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(parse_arp(&buf[..41]), None);
        buf[18] = 8; // hardware length
        assert_eq!(parse_arp(&buf[..n]), None);
        assert_eq!(ethertype(&buf[..13]), None);
    }

    /// A datagram as the host would send it, with a full checksum.
    fn datagram(payload: &[u8]) -> (Vec<u8>, UdpOut) {
        let u = UdpOut {
            src_mac: MAC_B,
            dst_mac: MAC_A,
            src: IP_B,
            dst: IP_A,
            sport: 40000,
            dport: 7,
            ident: 0x1234,
        };
        let mut f = vec![0u8; 1600];
        let n = build_udp_headers(&mut f, &u, payload.len());
        f[UDP_PAYLOAD..n].copy_from_slice(payload);
        finish_udp_checksum(&mut f, &u, payload.len());
        f.truncate(n);
        (f, u)
    }

    #[test]
    fn udp_build_parse_echo() {
        let payload = bytes(61, 3);
        let (mut f, _) = datagram(&payload);
        assert_eq!(f.len(), 14 + 20 + 8 + 61);
        assert_eq!(naive(&f[14..34]), 0xffff, "IP header checksum");
        // Ethernet padding after the IP packet is ignored.
        f.extend_from_slice(&[0xee; 5]);
        let ip = parse_ipv4(&f).unwrap();
        assert_eq!(
            (ip.hlen, ip.total, ip.proto, ip.src, ip.dst),
            (20, 89, PROTO_UDP, IP_B, IP_A)
        );
        let d = parse_udp(&f, &ip, true).unwrap();
        assert_eq!((d.sport, d.dport, d.payload_len), (40000, 7, 61));
        assert_eq!(&f[d.payload..d.payload + 61], &payload[..]);
        assert_ne!(d.csum, 0);

        let n = udp_echo_in_place(&mut f, &ip);
        assert_eq!(n, 103);
        assert_eq!(eth_src(&f), MAC_A);
        let ip2 = parse_ipv4(&f).unwrap();
        assert_eq!((ip2.src, ip2.dst), (IP_A, IP_B));
        let d2 = parse_udp(&f, &ip2, true).unwrap();
        assert_eq!((d2.sport, d2.dport), (7, 40000));

        // Corruption anywhere is caught.
        for at in [20, 40, 60, 100] {
            let mut g = f.clone();
            g[at] ^= 0x10;
            let r = parse_ipv4(&g).and_then(|ip| parse_udp(&g, &ip, true));
            assert_eq!(r.err(), Some(Reject::Bad), "at {at}");
            // Not verifying accepts it.
            if at >= 34 {
                let ip = parse_ipv4(&g).unwrap();
                assert!(parse_udp(&g, &ip, false).is_ok());
            }
        }
        // No checksum (0) is accepted.
        let mut g = f.clone();
        put16(&mut g, 40, 0);
        g[60] ^= 1;
        let ip = parse_ipv4(&g).unwrap();
        assert!(parse_udp(&g, &ip, true).is_ok());
    }

    #[test]
    fn partial_checksum_completes_like_a_device() {
        let payload = bytes(64, 5);
        let (full, u) = datagram(&payload);
        let mut p = full.clone();
        partial_udp_checksum(&mut p, &u, 64);
        // What the device does: sum from csum_start, store the inverse.
        let c = checksum(sum(&p[UDP_HEADER..], 0));
        put16(&mut p, UDP_HEADER + UDP_CSUM_OFF, c);
        assert_eq!(p, full);
        // The partial sum survives an echo's swap.
        let mut p = full.clone();
        partial_udp_checksum(&mut p, &u, 64);
        let ip = parse_ipv4(&p).unwrap();
        udp_echo_in_place(&mut p, &ip);
        let c = checksum(sum(&p[UDP_HEADER..], 0));
        put16(&mut p, UDP_HEADER + UDP_CSUM_OFF, c);
        let ip = parse_ipv4(&p).unwrap();
        assert!(parse_udp(&p, &ip, true).is_ok());
    }

    #[test]
    fn ip_header_checks() {
        let (f, _) = datagram(&[1, 2, 3]);
        assert!(parse_ipv4(&f).is_ok());
        assert_eq!(parse_ipv4(&f[..33]), Err(Reject::Bad));
        // Total length beyond the frame.
        assert_eq!(parse_ipv4(&f[..f.len() - 1]), Err(Reject::Bad));
        let mut g = f.clone();
        g[14] = 0x65; // version 6
        assert_eq!(parse_ipv4(&g), Err(Reject::Bad));
        let mut g = f.clone();
        g[14] = 0x44; // IHL 4
        assert_eq!(parse_ipv4(&g), Err(Reject::Bad));
        // A fragment, with a correct checksum: ignored, not bad.
        let mut g = f.clone();
        let old = be16(&g, 20);
        put16(&mut g, 20, 0x2000);
        let c = adjust(be16(&g, 24), old, 0x2000);
        put16(&mut g, 24, c);
        assert_eq!(parse_ipv4(&g), Err(Reject::Ignored));
        // Options: IHL 6 with a 4-byte NOP option.
        let mut g = f[..34].to_vec();
        g.extend_from_slice(&[1, 1, 1, 1]);
        g.extend_from_slice(&f[34..]);
        g[14] = 0x46;
        put16(&mut g, 16, (f.len() - 14 + 4) as u16);
        put16(&mut g, 24, 0);
        let c = checksum(sum(&g[14..38], 0));
        put16(&mut g, 24, c);
        let ip = parse_ipv4(&g).unwrap();
        assert_eq!((ip.hlen, ip.l4()), (24, 38));
        let d = parse_udp(&g, &ip, true).unwrap();
        assert_eq!((d.payload, d.payload_len), (46, 3));
    }

    /// An echo request as ping sends it.
    fn ping(payload: &[u8]) -> Vec<u8> {
        let (mut f, _) = datagram(payload);
        // Re-label the UDP datagram as ICMP: fix the protocol and the IP
        // checksum, write an ICMP header over the UDP one.
        f[23] = PROTO_ICMP;
        put16(&mut f, 24, 0);
        let c = checksum(sum(&f[14..34], 0));
        put16(&mut f, 24, c);
        f[34..42].copy_from_slice(&[8, 0, 0, 0, 0x12, 0x34, 0, 1]);
        let c = checksum(sum(&f[34..], 0));
        put16(&mut f, 36, c);
        f
    }

    #[test]
    fn icmp_echo() {
        let f = ping(&bytes(56, 1));
        let ip = parse_ipv4(&f).unwrap();
        assert_eq!(ip.proto, PROTO_ICMP);
        assert_eq!(is_echo_request(&f, &ip, true), Ok(true));
        for partial in [false, true] {
            let mut r = f.clone();
            let n = echo_reply_in_place(&mut r, &ip, partial);
            assert_eq!(n, f.len());
            let rip = parse_ipv4(&r).unwrap();
            assert_eq!((rip.src, rip.dst), (IP_A, IP_B));
            assert_eq!(&r[..6], &MAC_B);
            assert_eq!(r[34], ICMP_ECHO_REPLY);
            assert_eq!(naive(&r[34..]), 0xffff, "partial={partial}");
            assert_eq!(&r[38..], &f[38..], "identifier, sequence, data kept");
            assert_eq!(is_echo_request(&r, &rip, true), Ok(false));
        }
        let mut g = f.clone();
        g[50] ^= 4;
        assert_eq!(is_echo_request(&g, &ip, true), Err(Reject::Bad));
        assert_eq!(is_echo_request(&g, &ip, false), Ok(true));
    }
}
