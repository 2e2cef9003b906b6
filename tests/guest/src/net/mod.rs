//! The third guest form: a virtio-net driver (virtio-pci, MSI-X) and a
//! minimal IPv4 peer.
//!
//! Entered when the command line has any `net.*` option. Prints
//!
//! ```text
//! net: up mac=52:54:00:12:34:56 ip=10.0.0.2/24 queues=1 features=0x.. dev=00:03.0 link=up
//! ```
//!
//! once the device is ready (every RX buffer posted, control commands
//! done), then in `net.mode=respond` answers ARP, ICMP echo and UDP echo
//! (port 7) until `net.count` UDP echoes or `net.secs` watchdog ticks (about
//! 1 s each; then
//! `RINGVM-RESULT mode=net-respond ...`, exit 0) or forever; in
//! `net.mode=udp-flood` sends `net.count` numbered datagrams to
//! `net.peer` and prints `RINGVM-RESULT mode=net-flood ...` (exit 0 when
//! every one came back, 1 otherwise). A device or transport failure or a
//! timeout prints `error: ...` and exits with 2; a bad option exits with 1.

pub mod options;
pub mod wire;

#[cfg(not(test))]
mod dma;
#[cfg(not(test))]
mod driver;
#[cfg(not(test))]
mod peer;

#[cfg(not(test))]
pub use run::run;

#[cfg(not(test))]
mod run {
    use super::driver::{Fail, Net};
    use super::options::{self, Mode, OptError, Options};
    use super::peer::Peer;
    use crate::cmdline::Cmdline;
    use crate::pci::Function;
    use crate::serial::Serial;
    use crate::{apic, finish, idt};

    /// Exit status when flood datagrams were lost.
    const STATUS_LOST: u8 = 1;
    /// Exit status for a bad `net.*` option (same as a bad `exit=`).
    const STATUS_USAGE: u8 = 1;
    /// Exit status for a device or transport failure or a timeout.
    const STATUS_FAIL: u8 = 2;

    fn write_bdf(out: &mut Serial, f: Function) {
        out.write_str("00:");
        out.write_hex_digits(f.dev.into(), 2);
        out.write_str(".");
        out.write_dec(f.func.into());
    }

    /// Prints `error: [00:DD.F: ]<msg>[ (device status 0x..)]` and exits
    /// with status 2.
    fn fail(out: &mut Serial, func: Option<Function>, msg: &str, status: Option<u8>) -> ! {
        out.write_str("error: ");
        if let Some(f) = func {
            write_bdf(out, f);
            out.write_str(": ");
        }
        out.write_str(msg);
        if let Some(s) = status {
            out.write_str(" (device status ");
            out.write_hex(s.into());
            out.write_str(")");
        }
        out.write_str("\n");
        finish(out, STATUS_FAIL)
    }

    fn usage(out: &mut Serial, parts: &[&str]) -> ! {
        out.write_str("error: ");
        for p in parts {
            out.write_str(p);
        }
        out.write_str("\n");
        finish(out, STATUS_USAGE)
    }

    fn write_ip(out: &mut Serial, ip: [u8; 4]) {
        for (i, b) in ip.iter().enumerate() {
            if i > 0 {
                out.write_str(".");
            }
            out.write_dec((*b).into());
        }
    }

    fn write_fields(out: &mut Serial, fields: &[(&str, u64)]) {
        for (key, v) in fields {
            out.write_str(" ");
            out.write_str(key);
            out.write_str("=");
            out.write_dec(*v);
        }
    }

    fn up_line(out: &mut Serial, net: &Net, o: &Options) {
        out.write_str("net: up mac=");
        for (i, b) in net.mac.iter().enumerate() {
            if i > 0 {
                out.write_str(":");
            }
            out.write_hex_digits((*b).into(), 2);
        }
        out.write_str(" ip=");
        write_ip(out, o.ip);
        out.write_str("/");
        out.write_dec(o.prefix.into());
        out.write_str(" queues=");
        out.write_dec(net.pairs as u64);
        out.write_str(" features=");
        out.write_hex(net.features);
        out.write_str(" dev=");
        write_bdf(out, net.func);
        out.write_str(match net.link_up {
            Some(true) => " link=up\n",
            Some(false) => " link=down\n",
            None => " link=unknown\n",
        });
    }

    /// Runs the mode the `net.*` options describe and exits. `exit` is the
    /// explicit `exit=N`, which overrides the 0/1 result status.
    pub fn run(out: &mut Serial, args: &Cmdline<'_>, exit: Option<u8>) -> ! {
        let o = match options::parse(args) {
            Ok(o) => o,
            Err(OptError::Unknown(k)) => usage(out, &["unknown option net.", k]),
            Err(OptError::Bad(k, v)) => usage(out, &["bad net.", k, "=", v]),
            Err(OptError::Missing(k)) => usage(out, &["missing option ", k]),
            Err(OptError::Conflict(m)) => usage(out, &[m]),
        };
        idt::load();
        let lapic = apic::init().unwrap_or_else(|m| fail(out, None, m, None));
        // The watchdog ticks (about 1 s) time the control commands and
        // `net.timeout`, and wake the idle loop.
        lapic.start_watchdog();
        let mut net = Net::open(&o, &lapic).unwrap_or_else(|Fail(f, m)| fail(out, f, m, None));
        up_line(out, &net, &o);
        let func = Some(net.func);
        let mut peer = Peer::new(&mut net, &o);
        let status = match o.mode {
            Mode::Respond => {
                let ticks = match peer.respond() {
                    Ok(t) => t,
                    Err(m) => {
                        let s = peer.net.device_status();
                        fail(out, func, m, Some(s))
                    }
                };
                let c = peer.c;
                out.write_str("RINGVM-RESULT mode=net-respond");
                write_fields(
                    out,
                    &[
                        ("rx", c.rx),
                        ("tx", peer.net.tx.sent),
                        ("arp", c.arp),
                        ("icmp", c.icmp),
                        ("udp", c.udp),
                        ("bad", c.bad),
                    ],
                );
                for (k, n) in c.rxq.iter().enumerate().take(peer.net.pairs) {
                    out.write_str(" rxq");
                    out.write_dec(k as u64);
                    out.write_str("=");
                    out.write_dec(*n);
                }
                write_fields(out, &[("irqs", peer.net.irqs()), ("ticks", ticks)]);
                out.write_str("\n");
                0
            }
            Mode::UdpFlood => {
                let r = peer.resolve_peer().and_then(|()| peer.flood());
                let ticks = match r {
                    Ok(t) => t,
                    Err(m) => {
                        let s = peer.net.device_status();
                        fail(out, func, m, Some(s))
                    }
                };
                let (sent, received, dup, bytes, count) = match &peer.flood {
                    Some(f) => (f.sent, f.received, f.dup, f.bytes, f.count),
                    None => (0, 0, 0, 0, 0),
                };
                let lost = count - received;
                out.write_str("RINGVM-RESULT mode=net-flood");
                write_fields(
                    out,
                    &[
                        ("sent", sent),
                        ("received", received),
                        ("lost", lost),
                        ("dup", dup),
                        ("bytes", bytes),
                        ("ticks", ticks),
                        ("irqs", peer.net.irqs()),
                        ("bad", peer.c.bad),
                    ],
                );
                out.write_str("\n");
                if lost == 0 {
                    0
                } else {
                    STATUS_LOST
                }
            }
        };
        lapic.stop_watchdog();
        finish(out, exit.unwrap_or(status))
    }
}
