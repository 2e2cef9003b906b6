//! The minimal IPv4 peer: answers ARP, ICMP echo and UDP echo (port 7)
//! on the queue pair a request arrived on, and in udp-flood mode sends
//! numbered datagrams to an echo server and counts what comes back.
//!
//! The loop is batched: drain every RX queue (each frame handled in
//! place, a reply copied into a TX buffer), then publish TX and RX once,
//! then sleep (`sti; hlt`) only when nothing arrived.

use super::dma;
use super::driver::{Frame, Net, Offload, TxQueues, HDR_F_DATA_VALID, HDR_F_NEEDS_CSUM};
use super::options::{Ip, Mode, Options, MAX_PAIRS, MAX_PAYLOAD};
use super::wire::{self, Mac, Reject};
use crate::{idt, tsc};

/// The UDP echo port answered in respond mode.
pub const ECHO_PORT: u16 = 7;
/// The guest's source port for flood datagrams.
pub const FLOOD_PORT: u16 = 49152;

/// What the peer has seen and done.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    /// Frames received (including bad ones).
    pub rx: u64,
    /// ARP requests answered.
    pub arp: u64,
    /// ICMP echo requests answered.
    pub icmp: u64,
    /// UDP datagrams echoed.
    pub udp: u64,
    /// Malformed frames and bad checksums (IP header, ICMP, UDP).
    pub bad: u64,
    /// Frames per RX queue.
    pub rxq: [u64; MAX_PAIRS],
}

/// The state of a udp-flood.
pub struct Flood {
    pub peer: (Ip, u16),
    pub peer_mac: Option<Mac>,
    pub count: u64,
    pub size: u16,
    pub window: u16,
    pub sent: u64,
    /// Distinct sequence numbers echoed.
    pub received: u64,
    /// Echoes of a sequence number already seen.
    pub dup: u64,
    /// Payload bytes of distinct echoes.
    pub bytes: u64,
    seen: &'static mut [u64],
}

/// Payload bytes after the sequence number.
const fn pattern() -> [u8; MAX_PAYLOAD as usize] {
    let mut p = [0u8; MAX_PAYLOAD as usize];
    let mut i = 0;
    while i < p.len() {
        p[i] = (i as u8).wrapping_mul(7).wrapping_add(3);
        i += 1;
    }
    p
}
static PATTERN: [u8; MAX_PAYLOAD as usize] = pattern();

/// The guest's identity on the wire.
#[derive(Clone, Copy)]
struct Me {
    mac: Mac,
    ip: Ip,
    /// Send L4 checksums as partial (VIRTIO_NET_F_CSUM).
    tx_csum: bool,
}

/// Handles one frame received on pair `k`; a reply goes to TX pair `k`
/// (which has room: the caller checked).
fn handle(
    frame: &Frame<'_>,
    k: usize,
    me: Me,
    tx: &mut TxQueues,
    c: &mut Counters,
    flood: Option<&mut Flood>,
) {
    let f = frame.data;
    match wire::ethertype(f) {
        Some(wire::ETHERTYPE_ARP) => {
            let Some(a) = wire::parse_arp(f) else {
                return;
            };
            if let Some(fl) = flood {
                if a.spa == fl.peer.0 {
                    fl.peer_mac = Some(a.sha);
                }
            }
            if a.op == wire::ARP_REQUEST && a.tpa == me.ip {
                let reply = wire::ArpOut {
                    op: wire::ARP_REPLY,
                    eth_dst: a.sha,
                    sha: me.mac,
                    spa: me.ip,
                    tha: a.sha,
                    tpa: a.spa,
                };
                if tx.send(k, |buf| (wire::build_arp(buf, &reply), None)) {
                    c.arp += 1;
                }
            }
        }
        Some(wire::ETHERTYPE_IPV4) => ipv4(frame, k, me, tx, c, flood),
        _ => {}
    }
}

fn ipv4(
    frame: &Frame<'_>,
    k: usize,
    me: Me,
    tx: &mut TxQueues,
    c: &mut Counters,
    flood: Option<&mut Flood>,
) {
    let f = frame.data;
    let ip = match wire::parse_ipv4(f) {
        Ok(ip) if ip.dst == me.ip => ip,
        Ok(_) | Err(Reject::Ignored) => return,
        Err(Reject::Bad) => {
            c.bad += 1;
            return;
        }
    };
    let partial = frame.flags & HDR_F_NEEDS_CSUM != 0;
    let verify = frame.flags & (HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID) == 0;
    let n = ip.frame_len();
    match ip.proto {
        wire::PROTO_ICMP => match wire::is_echo_request(f, &ip, verify) {
            Ok(true) => {
                let sent = tx.send(k, |buf| {
                    buf[..n].copy_from_slice(&f[..n]);
                    (wire::echo_reply_in_place(buf, &ip, partial), None)
                });
                c.icmp += u64::from(sent);
            }
            Ok(false) => {}
            Err(_) => c.bad += 1,
        },
        wire::PROTO_UDP => {
            let u = match wire::parse_udp(f, &ip, verify) {
                Ok(u) => u,
                Err(_) => {
                    c.bad += 1;
                    return;
                }
            };
            if let Some(fl) = flood {
                if (ip.src, u.sport, u.dport) == (fl.peer.0, fl.peer.1, FLOOD_PORT) {
                    fl.echo(&f[u.payload..u.payload + u.payload_len], c);
                    return;
                }
            }
            if u.dport != ECHO_PORT {
                return;
            }
            let l4 = ip.l4();
            let sent = tx.send(k, |buf| {
                buf[..n].copy_from_slice(&f[..n]);
                let len = wire::udp_echo_in_place(buf, &ip);
                let offload = match (partial, me.tx_csum) {
                    // The pseudo-header sum in the field survives the swap.
                    (true, true) => Some((l4 as u16, wire::UDP_CSUM_OFF as u16)),
                    // A partial checksum cannot go out as it is: none.
                    (true, false) => {
                        buf[l4 + wire::UDP_CSUM_OFF..l4 + wire::UDP_CSUM_OFF + 2]
                            .copy_from_slice(&[0, 0]);
                        None
                    }
                    _ => None,
                };
                (len, offload)
            });
            c.udp += u64::from(sent);
        }
        _ => {}
    }
}

impl Flood {
    /// Accounts for an echo with `payload`.
    fn echo(&mut self, payload: &[u8], c: &mut Counters) {
        if payload.len() != usize::from(self.size) {
            c.bad += 1;
            return;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&payload[..8]);
        let seq = u64::from_le_bytes(b);
        if seq >= self.sent {
            c.bad += 1;
            return;
        }
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if self.seen[word] & bit != 0 {
            self.dup += 1;
        } else {
            self.seen[word] |= bit;
            self.received += 1;
            self.bytes += u64::from(self.size);
        }
    }

    /// Whether another datagram may go out now.
    fn may_send(&self) -> bool {
        self.sent < self.count && self.sent - self.received < u64::from(self.window)
    }
}

/// The peer: device, options and counters.
pub struct Peer<'a> {
    pub net: &'a mut Net,
    o: &'a Options,
    pub c: Counters,
    pub flood: Option<Flood>,
    me: Me,
}

impl<'a> Peer<'a> {
    pub fn new(net: &'a mut Net, o: &'a Options) -> Self {
        let me = Me {
            mac: net.mac,
            ip: o.ip,
            tx_csum: net.features & super::driver::F_CSUM != 0,
        };
        let flood = match (o.mode, o.peer) {
            (Mode::UdpFlood, Some(peer)) => Some(Flood {
                peer,
                peer_mac: None,
                count: o.count().unwrap_or(0),
                size: o.size,
                window: o.window,
                sent: 0,
                received: 0,
                dup: 0,
                bytes: 0,
                // SAFETY: the only flood of this run takes the bitmap.
                seen: unsafe { dma::seen_bitmap() },
            }),
            _ => None,
        };
        Peer {
            net,
            o,
            c: Counters::default(),
            flood,
            me,
        }
    }

    /// Handles every frame the RX queues hold (not published yet).
    /// Returns whether there were any.
    fn poll(&mut self) -> Result<bool, &'static str> {
        let mut any = false;
        let net = &mut *self.net;
        for k in 0..net.pairs {
            loop {
                if !net.tx.has_room(k) {
                    net.wait_tx_room(k)?;
                }
                let Some(frame) = net.rx.next(k) else {
                    break;
                };
                any = true;
                self.c.rx += 1;
                self.c.rxq[k] += 1;
                match frame {
                    Ok(frame) => handle(
                        &frame,
                        k,
                        self.me,
                        &mut net.tx,
                        &mut self.c,
                        self.flood.as_mut(),
                    ),
                    Err(()) => self.c.bad += 1,
                }
            }
        }
        Ok(any)
    }

    /// Respond mode: answers until `count` UDP echoes were sent (then
    /// returns the TSC ticks it ran), or forever. Fails after
    /// `net.timeout` watchdog ticks without a frame.
    pub fn respond(&mut self) -> Result<u64, &'static str> {
        let start = tsc::now();
        let first_tick = idt::timer_ticks();
        let mut idle_since = first_tick;
        loop {
            let got = self.poll()?;
            self.net.kick();
            let out_of_time = self
                .o
                .secs
                .is_some_and(|s| idt::timer_ticks() - first_tick >= s);
            if out_of_time || self.o.count().is_some_and(|n| self.c.udp >= n) {
                self.net.drain_tx()?;
                return Ok(tsc::now() - start);
            }
            if got {
                idle_since = idt::timer_ticks();
                continue;
            }
            if self.o.timeout != 0 && idt::timer_ticks() - idle_since >= self.o.timeout {
                return Err("timeout: no frame within net.timeout seconds");
            }
            self.net.sleep(true, false)?;
        }
    }

    /// Resolves the flood peer's MAC: an ARP request per watchdog tick
    /// until a reply (or request) from the peer arrives.
    pub fn resolve_peer(&mut self) -> Result<(), &'static str> {
        let start = idt::timer_ticks();
        let mut asked = None;
        loop {
            self.poll()?;
            let Some(fl) = self.flood.as_ref() else {
                return Err("no flood peer");
            };
            if fl.peer_mac.is_some() {
                return Ok(());
            }
            let now = idt::timer_ticks();
            if self.o.timeout != 0 && now - start >= self.o.timeout {
                return Err("timeout: no ARP reply from net.peer");
            }
            if asked != Some(now) && self.net.tx.has_room(0) {
                let req = wire::ArpOut {
                    op: wire::ARP_REQUEST,
                    eth_dst: wire::BROADCAST,
                    sha: self.me.mac,
                    spa: self.me.ip,
                    tha: [0; 6],
                    tpa: fl.peer.0,
                };
                self.net
                    .tx
                    .send(0, |buf| (wire::build_arp(buf, &req), None));
                asked = Some(now);
            }
            self.net.kick();
            self.net.sleep(true, false)?;
        }
    }

    /// Queues the next flood datagram on pair 0 (which has room).
    fn send_datagram(&mut self) {
        let Some(fl) = self.flood.as_mut() else {
            return;
        };
        let seq = fl.sent;
        let u = wire::UdpOut {
            src_mac: self.me.mac,
            dst_mac: fl.peer_mac.unwrap_or(wire::BROADCAST),
            src: self.me.ip,
            dst: fl.peer.0,
            sport: FLOOD_PORT,
            dport: fl.peer.1,
            ident: seq as u16,
        };
        let size = usize::from(fl.size);
        let offload = self.me.tx_csum;
        let sent = self.net.tx.send(0, |buf| {
            let n = wire::build_udp_headers(buf, &u, size);
            let p = &mut buf[wire::UDP_PAYLOAD..n];
            p[..8].copy_from_slice(&seq.to_le_bytes());
            p[8..].copy_from_slice(&PATTERN[8..size]);
            let o: Offload = if offload {
                wire::partial_udp_checksum(buf, &u, size);
                Some((wire::UDP_HEADER as u16, wire::UDP_CSUM_OFF as u16))
            } else {
                wire::finish_udp_checksum(buf, &u, size);
                None
            };
            (n, o)
        });
        fl.sent += u64::from(sent);
    }

    /// udp-flood mode after [`Peer::resolve_peer`]: keeps at most
    /// `window` datagrams in flight until every one is back or nothing
    /// came back for `net.timeout` watchdog ticks. Returns TSC ticks.
    pub fn flood(&mut self) -> Result<u64, &'static str> {
        let start = tsc::now();
        let mut idle_since = idt::timer_ticks();
        loop {
            let before = self.flood.as_ref().map_or(0, |f| f.received);
            let got = self.poll()?;
            self.net.tx.reclaim(0);
            let mut sent_any = false;
            let mut tx_full = false;
            while self.flood.as_ref().is_some_and(Flood::may_send) {
                if !self.net.tx.has_room(0) {
                    tx_full = true;
                    break;
                }
                self.send_datagram();
                sent_any = true;
            }
            self.net.kick();
            let Some(fl) = self.flood.as_ref() else {
                return Err("no flood peer");
            };
            if fl.received == fl.count {
                return Ok(tsc::now() - start);
            }
            if fl.received != before {
                idle_since = idt::timer_ticks();
            } else if self.o.timeout != 0 && idt::timer_ticks() - idle_since >= self.o.timeout {
                return Ok(tsc::now() - start);
            }
            if !got && !sent_any {
                self.net.sleep(true, tx_full)?;
            }
        }
    }
}
