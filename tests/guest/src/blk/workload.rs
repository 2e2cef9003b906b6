//! The `blk.mode` workloads and the result line.
//!
//! Up to `qd` requests are in flight. Slot `s` always carries the next
//! request as soon as its previous one completes, except in `crc` mode:
//! there request `n` runs on slot `n % qd` and a slot is refilled only
//! after its data has been folded into the CRC, which happens strictly in
//! request (= offset) order whatever order the device completes in.

use super::dma;
use super::driver::{Blk, Fail, S_OK, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use super::options::{self, Mode, OptError, Options, Plan, MAX_QD};
use crate::cmdline::Cmdline;
use crate::crc::Crc32;
use crate::pattern::{self, Mismatch, Rng, SECTOR};
use crate::pci::Function;
use crate::serial::Serial;
use crate::{apic, finish, idt, tsc};

/// Exit status when requests failed or data did not verify.
const STATUS_ERRORS: u8 = 1;
/// Exit status for a bad `blk.*` option (same as a bad `exit=`).
const STATUS_USAGE: u8 = 1;
/// Exit status for a device or transport failure.
const STATUS_FAIL: u8 = 2;
/// Bytes of a GET_ID answer.
const ID_BYTES: u32 = 20;

fn write_bdf(out: &mut Serial, f: Function) {
    out.write_str("00:");
    out.write_hex_digits(f.dev.into(), 2);
    out.write_str(".");
    out.write_dec(f.func.into());
}

/// Prints `error: [00:DD.F: ]<msg>` and exits with status 2.
fn fail(out: &mut Serial, func: Option<Function>, msg: &str) -> ! {
    out.write_str("error: ");
    if let Some(f) = func {
        write_bdf(out, f);
        out.write_str(": ");
    }
    out.write_str(msg);
    out.write_str("\n");
    finish(out, STATUS_FAIL)
}

/// [`fail`] for a failure while requests run, with the device status.
fn fail_status(out: &mut Serial, func: Option<Function>, msg: &str, status: u8) -> ! {
    out.write_str("error: ");
    if let Some(f) = func {
        write_bdf(out, f);
        out.write_str(": ");
    }
    out.write_str(msg);
    out.write_str(" (device status ");
    out.write_hex(status.into());
    out.write_str(")\n");
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

/// Runs the workload the `blk.*` options describe and exits. `exit` is
/// the explicit `exit=N`, which overrides the 0/1 result status.
pub fn run(out: &mut Serial, args: &Cmdline<'_>, exit: Option<u8>) -> ! {
    let o = match options::parse(args) {
        Ok(o) => o,
        Err(OptError::Unknown(k)) => usage(out, &["unknown option blk.", k]),
        Err(OptError::Bad(k, v)) => usage(out, &["bad blk.", k, "=", v]),
        Err(OptError::PoolTooSmall) => {
            usage(out, &["blk.qd * blk.bs exceeds the 4 MiB buffer pool"])
        }
    };
    idt::load();
    let lapic = apic::init().unwrap_or_else(|m| fail(out, None, m));
    let mut dev = Blk::open(&o, &lapic).unwrap_or_else(|Fail(f, m)| fail(out, f, m));

    out.write_str("blk: ");
    write_bdf(out, dev.func);
    out.write_str(" capacity=");
    out.write_dec(dev.capacity);
    out.write_str(" features=");
    out.write_hex(dev.features);
    out.write_str(" queues=");
    out.write_dec(dev.nq as u64);
    out.write_str(" qsize=");
    out.write_dec(dev.qsize.into());
    out.write_str(" msix=yes\n");

    if o.qd as usize > dev.max_qd() {
        usage(out, &["blk.qd exceeds what the virtqueues hold"]);
    }
    let plan = Plan::new(&o, dev.capacity).unwrap_or_else(|m| usage(out, &[m]));
    let tsc_hz = o.secs.map(|_| {
        tsc::frequency().unwrap_or_else(|| fail(out, None, "cannot determine the TSC frequency"))
    });
    lapic.start_watchdog();
    let mut errors = 0;

    if o.id {
        let status = dev
            .run_one(T_GET_ID, ID_BYTES, o.timeout)
            .unwrap_or_else(|m| fail_status(out, Some(dev.func), m, dev.device_status()));
        if status == S_OK {
            // SAFETY: slot 0 is idle again; nothing else borrows its buffer.
            let words = unsafe { dma::buffer(0, o.bs as usize) };
            let mut id = [0u8; ID_BYTES as usize];
            for (i, b) in id.iter_mut().enumerate() {
                *b = (words[i / 8] >> (8 * (i % 8))) as u8;
            }
            let len = id.iter().position(|&b| b == 0).unwrap_or(id.len());
            for b in &mut id[..len] {
                if !b.is_ascii_graphic() {
                    *b = b'?';
                }
            }
            out.write_str("blk: id=");
            out.write_bytes(&id[..len]);
            out.write_str("\n");
        } else {
            errors += 1;
            out.write_str("blk: id unavailable, status=");
            out.write_dec(status.into());
            out.write_str("\n");
        }
    }

    let func = Some(dev.func);
    dev.prepare(o.qd as usize);
    let mut w = Workload::new(&mut dev, &o, plan);
    let deadline =
        tsc_hz.map(|hz| tsc::now().saturating_add(hz.saturating_mul(o.secs.unwrap_or(0))));
    let ticks = match w.run(deadline) {
        Ok(t) => t,
        Err(m) => fail_status(out, func, m, dev.device_status()),
    };
    let stats = w.stats;
    errors += stats.errors;

    if o.flush {
        let status = dev
            .run_one(T_FLUSH, 0, o.timeout)
            .unwrap_or_else(|m| fail_status(out, func, m, dev.device_status()));
        if status != S_OK {
            errors += 1;
            out.write_str("blk: flush failed, status=");
            out.write_dec(status.into());
            out.write_str("\n");
        }
    }
    lapic.stop_watchdog();

    if let Some(m) = stats.first_bad {
        out.write_str("blk: verify mismatch sector=");
        out.write_dec(m.sector);
        out.write_str(" word=");
        out.write_dec(m.word as u64);
        out.write_str(" expected=");
        out.write_hex(m.expected);
        out.write_str(" found=");
        out.write_hex(m.found);
        out.write_str("\n");
    }
    out.write_str("RINGVM-RESULT mode=");
    out.write_str(o.mode.name());
    for (key, v) in [
        ("dev", o.dev.into()),
        ("ops", stats.ops),
        ("bytes", stats.bytes),
        ("errors", errors),
    ] {
        out.write_str(" ");
        out.write_str(key);
        out.write_str("=");
        out.write_dec(v);
    }
    if o.mode == Mode::Crc {
        out.write_str(" crc32=");
        out.write_hex_digits(stats.crc.value().into(), 8);
    }
    let irqs = dev.irqs();
    for (key, v) in [
        ("ticks", ticks),
        ("qd", o.qd.into()),
        ("bs", o.bs.into()),
        ("queues", dev.nq as u64),
        ("irqs", irqs),
    ] {
        out.write_str(" ");
        out.write_str(key);
        out.write_str("=");
        out.write_dec(v);
    }
    if let Some(m) = stats.first_bad {
        out.write_str(" mismatch_sector=");
        out.write_dec(m.sector);
    }
    out.write_str("\n");
    if o.hang {
        out.flush();
        crate::exit::halt_forever();
    }
    if o.linger > 0 {
        out.flush();
        lapic.start_watchdog();
        let start = idt::timer_ticks();
        while idt::timer_ticks() - start < o.linger {
            idt::wait_for_interrupt();
        }
        lapic.stop_watchdog();
    }
    let status = exit.unwrap_or(if errors == 0 { 0 } else { STATUS_ERRORS });
    finish(out, status)
}

/// What one slot is doing.
#[derive(Clone, Copy, Default)]
struct SlotState {
    /// Absolute byte offset and length of its request.
    pos: u64,
    len: u32,
    /// Request number.
    seq: u64,
    /// Completed, data not yet folded (crc mode).
    done: bool,
}

#[derive(Clone, Copy, Default)]
struct Stats {
    ops: u64,
    bytes: u64,
    errors: u64,
    crc: Crc32,
    first_bad: Option<Mismatch>,
}

struct Workload<'a> {
    dev: &'a mut Blk,
    o: &'a Options,
    plan: Plan,
    rng: Rng,
    slots: [SlotState; MAX_QD as usize],
    issued: u64,
    stopped: bool,
    stats: Stats,
}

impl<'a> Workload<'a> {
    fn new(dev: &'a mut Blk, o: &'a Options, plan: Plan) -> Self {
        Workload {
            dev,
            o,
            plan,
            rng: Rng::new(o.seed),
            slots: [SlotState::default(); MAX_QD as usize],
            issued: 0,
            stopped: false,
            stats: Stats::default(),
        }
    }

    fn can_issue(&self) -> bool {
        !self.stopped && self.plan.total.is_none_or(|t| self.issued < t)
    }

    /// Starts the next request on idle slot `s`.
    fn issue(&mut self, s: usize) {
        let seq = self.issued;
        self.issued += 1;
        let random = self.o.mode.random().then_some(&mut self.rng);
        let (pos, len) = self.plan.request(seq, random);
        let bs = self.o.bs as usize;
        let kind = if self.o.mode.reads() {
            T_IN
        } else {
            // SAFETY: slot `s` is idle: the device does not own its buffer.
            let buf = unsafe { dma::buffer(s, bs) };
            pattern::fill_sectors(
                &mut buf[..len as usize / 8],
                pos / SECTOR as u64,
                self.o.seed,
            );
            T_OUT
        };
        self.dev.submit(s, kind, pos / SECTOR as u64, len);
        self.slots[s] = SlotState {
            pos,
            len,
            seq,
            done: false,
        };
    }

    /// Accounts for the completion of slot `s` (verify mode: checks data).
    fn account(&mut self, s: usize, status: u8) {
        let st = self.slots[s];
        self.stats.ops += 1;
        if status != S_OK {
            self.stats.errors += 1;
            return;
        }
        self.stats.bytes += u64::from(st.len);
        if self.o.mode == Mode::Verify {
            // SAFETY: the device returned slot `s`; its buffer is ours.
            let buf = unsafe { dma::buffer(s, self.o.bs as usize) };
            let (bad, first) = pattern::check_sectors(
                &buf[..st.len as usize / 8],
                st.pos / SECTOR as u64,
                self.o.seed,
            );
            self.stats.errors += bad;
            if let Some(m) = first {
                if self.stats.first_bad.is_none_or(|b| m.sector < b.sector) {
                    self.stats.first_bad = Some(m);
                }
            }
        }
    }

    /// crc mode: folds completed slots in request order, refilling each.
    fn fold(&mut self, folded: &mut u64) {
        let qd = self.o.qd as u64;
        loop {
            let s = (*folded % qd) as usize;
            let st = self.slots[s];
            if !st.done || st.seq != *folded {
                return;
            }
            // SAFETY: the device returned slot `s`; its buffer is ours.
            let buf = unsafe { dma::buffer(s, self.o.bs as usize) };
            // SAFETY: viewing initialised u64s as bytes.
            let bytes =
                unsafe { core::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), st.len as usize) };
            self.stats.crc.update(bytes);
            self.slots[s].done = false;
            *folded += 1;
            if self.can_issue() {
                self.issue(s);
            }
        }
    }

    /// Runs to the end of the plan (or the deadline); returns TSC ticks.
    fn run(&mut self, deadline: Option<u64>) -> Result<u64, &'static str> {
        let start = tsc::now();
        let crc = self.o.mode == Mode::Crc;
        for s in 0..self.o.qd as usize {
            if !self.can_issue() {
                break;
            }
            self.issue(s);
        }
        self.dev.kick();
        let mut completed = 0;
        let mut folded = 0;
        while completed < self.issued {
            self.dev.wait(self.o.timeout)?;
            if deadline.is_some_and(|d| tsc::now() >= d) {
                self.stopped = true;
            }
            while let Some((s, status)) = self.dev.pop() {
                completed += 1;
                self.account(s, status);
                if crc {
                    self.slots[s].done = true;
                    self.fold(&mut folded);
                } else if self.can_issue() {
                    self.issue(s);
                }
            }
            self.dev.kick();
        }
        Ok(tsc::now() - start)
    }
}
