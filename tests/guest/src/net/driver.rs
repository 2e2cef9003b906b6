//! virtio-net driver: device bring-up, the control queue, RX and TX
//! queues, and interrupt-driven waiting.
//!
//! Queue pair `k` is RX queue `2k` and TX queue `2k + 1`; the control
//! queue is queue `2 * max_virtqueue_pairs` (2 without MQ). Ring memory
//! slots and MSI-X entries follow the order RX 0, TX 0, RX 1, TX 1, ...,
//! control (entries shared from the last one down when the table is
//! smaller).
//!
//! Every descriptor owns a fixed 2 KiB buffer ([`super::dma`]), so
//! nothing is allocated per frame: an RX buffer goes back to the driver
//! ring as soon as its used entry is read (the device sees it after the
//! next publish, by which time the frame has been handled), and a TX
//! buffer comes from a per-queue free list refilled from the used ring.

use super::dma;
use super::options::{Options, BUF_BYTES, MAX_PAIRS};
use super::wire::Mac;
use crate::apic::Lapic;
use crate::idt;
use crate::pci::{self, Function};
use crate::virtio::queue::{Desc, Queue, DESC_NEXT, DESC_WRITE, MAX_SIZE};
use crate::virtio::{self, Transport};

/// PCI device IDs of virtio-net: modern and transitional.
const DEVICE_MODERN: u16 = 0x1041;
const DEVICE_TRANSITIONAL: u16 = 0x1000;

// virtio-net feature bits.
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MAC: u64 = 1 << 5;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_CTRL_RX: u64 = 1 << 18;
pub const F_MQ: u64 = 1 << 22;
pub const F_CTRL_MAC_ADDR: u64 = 1 << 23;

/// Bytes of `virtio_net_hdr_v1` before every frame.
pub const HDR_LEN: usize = 12;
/// Header flags: the L4 checksum is partial (`csum_start`,
/// `csum_offset`); the checksum was validated by the device.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
pub const HDR_F_DATA_VALID: u8 = 2;

// Device configuration: mac[6], status u16, max_virtqueue_pairs u16.
const CFG_MAC: u32 = 0;
const CFG_STATUS: u32 = 6;
const CFG_PAIRS: u32 = 8;
const S_LINK_UP: u16 = 1;

// Control queue classes, commands and the ack value.
const CTRL_RX: u8 = 0;
const CTRL_RX_PROMISC: u8 = 0;
const CTRL_RX_ALLMULTI: u8 = 1;
const CTRL_MAC: u8 = 1;
const CTRL_MAC_TABLE_SET: u8 = 0;
const CTRL_MAC_ADDR_SET: u8 = 1;
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_OK: u8 = 0;
/// Watchdog ticks a control command may take.
const CTRL_TIMEOUT: u64 = 5;
/// Watchdog ticks the device may take to complete transmitted frames.
const TX_TIMEOUT: u64 = 5;
/// Largest control queue used (two descriptors are enough).
const CTRL_SIZE: u16 = 16;

/// The MAC used when the device has none (locally administered).
const FALLBACK_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];

/// A bring-up failure: message, and the function when already found.
pub struct Fail(pub Option<Function>, pub &'static str);

/// The `n`th virtio-net function of bus 0.
fn find(n: u32) -> Option<Function> {
    pci::functions()
        .filter(|&(_, id)| {
            id as u16 == virtio::VENDOR
                && matches!((id >> 16) as u16, DEVICE_MODERN | DEVICE_TRANSITIONAL)
        })
        .nth(n as usize)
        .map(|(f, _)| f)
}

/// The largest power of two <= min(`max`, `limit`), or an error when the
/// queue is unavailable.
fn queue_size(max: u16, limit: u16) -> Result<u16, &'static str> {
    if max == 0 {
        return Err("a virtqueue is not available (queue_size 0)");
    }
    Ok(1u16 << (15 - max.min(limit).leading_zeros()))
}

/// A received frame (after the virtio-net header).
pub struct Frame<'a> {
    pub data: &'a [u8],
    /// The header's flags (`HDR_F_*`).
    pub flags: u8,
}

/// The RX queues.
pub struct RxQueues {
    q: [Queue; MAX_PAIRS],
    pairs: usize,
    mrg: bool,
    /// Bytes of each RX buffer offered to the device (<= BUF_BYTES).
    buf_len: u32,
}

impl RxQueues {
    /// Reads used buffer `id` (`len` bytes written) of pair `k` and puts
    /// it back in the driver ring at once: the device sees it only after
    /// the next [`RxQueues::publish`], which needs `&mut self`, so the
    /// returned bytes stay valid as long as they are borrowed. `None` for
    /// an id out of range or a length beyond the buffer offered.
    fn take(&mut self, k: usize, id: u16, len: u32) -> Option<&'static [u8]> {
        if id >= self.q[k].size() {
            return None;
        }
        self.q[k].push(id);
        if len > self.buf_len {
            return None;
        }
        // SAFETY: the buffer of descriptor `id`, which the device has
        // returned and sees again only after the next publish; `len` <=
        // `buf_len` <= BUF_BYTES.
        Some(unsafe { core::slice::from_raw_parts(dma::rx(k, usize::from(id)), len as usize) })
    }

    /// The next frame received on pair `k`: `None` when there is none,
    /// `Some(Err(()))` for a malformed completion (bad buffer id, too
    /// short, merged buffers missing or too many bytes). Merged buffers
    /// (MRG_RXBUF, `num_buffers` > 1) are gathered into the scratch
    /// buffer.
    pub fn next(&mut self, k: usize) -> Option<Result<Frame<'_>, ()>> {
        let (id, len) = self.q[k].pop_used()?;
        let Some(first) = self.take(k, id, len) else {
            return Some(Err(()));
        };
        if first.len() < HDR_LEN {
            return Some(Err(()));
        }
        let flags = first[0];
        let buffers = if self.mrg {
            u16::from_le_bytes([first[10], first[11]])
        } else {
            1
        };
        if buffers <= 1 {
            return Some(Ok(Frame {
                data: &first[HDR_LEN..],
                flags,
            }));
        }
        // SAFETY: the scratch buffer is only referenced here and by the
        // frame returned, which borrows `self` until it is dropped.
        let scratch = unsafe { core::slice::from_raw_parts_mut(dma::scratch(), BUF_BYTES) };
        let mut n = first.len() - HDR_LEN;
        scratch[..n].copy_from_slice(&first[HDR_LEN..]);
        let mut ok = true;
        for _ in 1..buffers {
            let Some((id, len)) = self.q[k].pop_used() else {
                return Some(Err(()));
            };
            match self.take(k, id, len) {
                Some(part) if n + part.len() <= BUF_BYTES => {
                    scratch[n..n + part.len()].copy_from_slice(part);
                    n += part.len();
                }
                _ => ok = false,
            }
        }
        if !ok {
            return Some(Err(()));
        }
        Some(Ok(Frame {
            data: &scratch[..n],
            flags,
        }))
    }

    /// Hands the buffers read since the last call back to the device.
    pub fn publish(&mut self) {
        for q in &mut self.q[..self.pairs] {
            q.publish();
        }
    }

    /// Asks for interrupts at the next used entries; true when some are
    /// already pending.
    fn arm(&mut self) -> bool {
        let mut pending = false;
        for q in &mut self.q[..self.pairs] {
            pending |= q.arm();
        }
        pending
    }
}

/// A checksum offload request: `(csum_start, csum_offset)` from the
/// start of the frame.
pub type Offload = Option<(u16, u16)>;

/// The TX queues and their free buffers.
pub struct TxQueues {
    q: [Queue; MAX_PAIRS],
    pairs: usize,
    free: [[u16; MAX_SIZE as usize]; MAX_PAIRS],
    nfree: [usize; MAX_PAIRS],
    /// Frames queued for transmission so far.
    pub sent: u64,
}

impl TxQueues {
    /// Moves the buffers the device has completed on pair `k` back to
    /// its free list.
    pub fn reclaim(&mut self, k: usize) {
        let size = usize::from(self.q[k].size());
        while let Some((id, _)) = self.q[k].pop_used() {
            if usize::from(id) < size && self.nfree[k] < size {
                self.free[k][self.nfree[k]] = id;
                self.nfree[k] += 1;
            }
        }
    }

    /// Whether pair `k` has a free buffer (reclaiming when it has none).
    pub fn has_room(&mut self, k: usize) -> bool {
        if self.nfree[k] == 0 {
            self.reclaim(k);
        }
        self.nfree[k] > 0
    }

    /// Queues one frame on pair `k`: `fill` writes it into a free buffer
    /// (after the virtio-net header) and returns its length and checksum
    /// offload. Visible to the device after [`TxQueues::publish`]. False
    /// (and `fill` not called) when no buffer is free.
    pub fn send(&mut self, k: usize, fill: impl FnOnce(&mut [u8]) -> (usize, Offload)) -> bool {
        if !self.has_room(k) {
            return false;
        }
        self.nfree[k] -= 1;
        let id = self.free[k][self.nfree[k]];
        // SAFETY: buffer `id` is on the free list: the device does not own
        // it and no other reference to it exists.
        let buf =
            unsafe { core::slice::from_raw_parts_mut(dma::tx(k, usize::from(id)), BUF_BYTES) };
        let (hdr, frame) = buf.split_at_mut(HDR_LEN);
        let (len, offload) = fill(frame);
        let len = len.min(frame.len());
        let (flags, (start, off)) = match offload {
            Some(o) => (HDR_F_NEEDS_CSUM, o),
            None => (0, (0, 0)),
        };
        let s = start.to_le_bytes();
        let o = off.to_le_bytes();
        hdr.copy_from_slice(&[flags, 0, 0, 0, 0, 0, s[0], s[1], o[0], o[1], 0, 0]);
        let d = self.q[k].desc_ptr(id);
        // SAFETY: the descriptor of a free buffer: the device does not
        // read it until the buffer is published.
        unsafe { (&raw mut (*d).len).write_volatile((HDR_LEN + len) as u32) };
        self.q[k].push(id);
        self.sent += 1;
        true
    }

    /// Makes queued frames visible, notifying where the device asks.
    pub fn publish(&mut self) {
        for q in &mut self.q[..self.pairs] {
            q.publish();
        }
    }

    /// Frames queued and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.q[..self.pairs]
            .iter()
            .map(|q| usize::from(q.in_flight()))
            .sum()
    }
}

/// An initialised virtio-net device.
pub struct Net {
    pub func: Function,
    transport: Transport,
    pub features: u64,
    pub mac: Mac,
    /// Link status (`None` without VIRTIO_NET_F_STATUS).
    pub link_up: Option<bool>,
    pub pairs: usize,
    pub rx: RxQueues,
    pub tx: TxQueues,
    ctrl: Option<Queue>,
    /// MSI-X entries (and interrupt counters) in use.
    vectors: usize,
    /// A watchdog-only wake-up found frames the device had not signalled.
    suspect: bool,
}

impl Net {
    /// Finds device `o.dev`, negotiates features, wires its queues to
    /// MSI-X vectors on `apic`, brings it to DRIVER_OK, posts every RX
    /// buffer and runs the control commands (queue pairs, RX filter).
    /// Needs the watchdog running (control command timeout).
    pub fn open(o: &Options, apic: &Lapic) -> Result<Net, Fail> {
        let func = find(o.dev).ok_or(Fail(None, "no such virtio-net device"))?;
        let fail = |msg| Fail(Some(func), msg);
        let t = Transport::probe(func).map_err(fail)?;
        // SAFETY: the device may DMA only into rings and buffers the driver
        // hands it; INTx is replaced by MSI-X.
        unsafe { func.enable(pci::CMD_MEMORY | pci::CMD_BUS_MASTER | pci::CMD_INTX_DISABLE) };
        t.reset().map_err(fail)?;

        let offered = t.offered();
        let mut wanted = virtio::F_VERSION_1 | F_MAC | F_STATUS;
        if o.mrg {
            wanted |= F_MRG_RXBUF;
        }
        if o.event_idx {
            wanted |= virtio::F_EVENT_IDX;
        }
        if o.csum {
            wanted |= F_CSUM | F_GUEST_CSUM;
        }
        // The control queue's features only with the control queue.
        if offered & F_CTRL_VQ != 0 {
            wanted |= F_CTRL_VQ | F_CTRL_RX | F_CTRL_MAC_ADDR;
            if o.queues > 1 {
                wanted |= F_MQ;
            }
        }
        let features = t.negotiate(wanted).map_err(fail)?;
        let has = |f: u64| features & f != 0;
        if o.queues > 1 && !has(F_MQ) {
            return Err(fail(
                "net.queues > 1 but the device offers no VIRTIO_NET_F_MQ with a control queue",
            ));
        }
        // 16-bit reads: the configuration may end right after any field.
        let cfg16 = |off: u32| {
            t.config16(off)
                .ok_or(fail("device configuration too short"))
        };
        let mut mac = FALLBACK_MAC;
        if has(F_MAC) {
            for (i, off) in [CFG_MAC, CFG_MAC + 2, CFG_MAC + 4].into_iter().enumerate() {
                mac[2 * i..2 * i + 2].copy_from_slice(&cfg16(off)?.to_le_bytes());
            }
        }
        let link_up = if has(F_STATUS) {
            Some(cfg16(CFG_STATUS)? & S_LINK_UP != 0)
        } else {
            None
        };
        let max_pairs = if has(F_MQ) {
            cfg16(CFG_PAIRS)?.max(1)
        } else {
            1
        };
        let pairs = usize::from(o.queues);
        if pairs > usize::from(max_pairs) {
            return Err(fail("net.queues exceeds the device's max_virtqueue_pairs"));
        }
        let ctrl_index = has(F_CTRL_VQ).then(|| max_pairs.saturating_mul(2));
        let highest = ctrl_index.unwrap_or(0).max(2 * pairs as u16 - 1);
        if highest >= t.num_queues() || ctrl_index == Some(u16::MAX) {
            return Err(fail(
                "device has fewer virtqueues than its features promise",
            ));
        }

        // MSI-X before the queue vectors, as a device may check that it is
        // enabled when a vector is assigned.
        let slots = 2 * pairs + usize::from(ctrl_index.is_some());
        let vectors = slots.min(usize::from(t.msix.size)).min(idt::MAX_IRQ_QUEUES);
        t.msix.enable_masked();
        for e in 0..vectors {
            t.msix
                .set_entry(e as u16, apic.id, idt::IRQ_VECTOR_BASE + e as u8);
        }
        t.msix.unmask_function();
        t.disable_config_vector();
        let entry = |slot: usize| slot.min(vectors - 1) as u16;

        let ev = has(virtio::F_EVENT_IDX);
        let mut rx: [Queue; MAX_PAIRS] = core::array::from_fn(|k| Queue::new_in(2 * k, 0, 0, ev));
        let mut tx: [Queue; MAX_PAIRS] =
            core::array::from_fn(|k| Queue::new_in(2 * k + 1, 0, 0, ev));
        for k in 0..pairs {
            for (slot, q) in [(2 * k, &mut rx[k]), (2 * k + 1, &mut tx[k])] {
                let index = slot as u16;
                let size = queue_size(t.queue_max(index), MAX_SIZE).map_err(fail)?;
                *q = Queue::new_in(slot, index, size, ev);
                let notify = t
                    .setup_queue(index, size, q.ring_addresses(), entry(slot))
                    .map_err(fail)?;
                q.set_notify(notify);
            }
        }
        let ctrl = match ctrl_index {
            None => None,
            Some(index) => {
                let slot = 2 * pairs;
                let size = queue_size(t.queue_max(index), CTRL_SIZE).map_err(fail)?;
                let mut q = Queue::new_in(slot, index, size, ev);
                let notify = t
                    .setup_queue(index, size, q.ring_addresses(), entry(slot))
                    .map_err(fail)?;
                q.set_notify(notify);
                Some(q)
            }
        };
        t.driver_ok().map_err(fail)?;

        // Every RX buffer to the device; TX descriptors point at their
        // buffers once, and TX completions raise no interrupt unless a
        // sender waits for one.
        let rx_len = if has(F_MRG_RXBUF) {
            o.rxbuf
        } else {
            BUF_BYTES as u32
        };
        let mut free = [[0u16; MAX_SIZE as usize]; MAX_PAIRS];
        let mut nfree = [0; MAX_PAIRS];
        for k in 0..pairs {
            for i in 0..rx[k].size() {
                let addr = dma::rx(k, usize::from(i)) as u64;
                rx[k].set_desc(
                    i,
                    Desc {
                        addr,
                        len: rx_len,
                        flags: DESC_WRITE,
                        next: 0,
                    },
                );
                rx[k].push(i);
            }
            rx[k].publish();
            for i in 0..tx[k].size() {
                let addr = dma::tx(k, usize::from(i)) as u64;
                tx[k].set_desc(
                    i,
                    Desc {
                        addr,
                        len: 0,
                        flags: 0,
                        next: 0,
                    },
                );
                free[k][usize::from(i)] = i;
            }
            nfree[k] = usize::from(tx[k].size());
            tx[k].set_no_interrupt(true);
        }
        let mut net = Net {
            func,
            transport: t,
            features,
            mac,
            link_up,
            pairs,
            rx: RxQueues {
                q: rx,
                pairs,
                mrg: has(F_MRG_RXBUF),
                buf_len: rx_len,
            },
            tx: TxQueues {
                q: tx,
                pairs,
                free,
                nfree,
                sent: 0,
            },
            ctrl,
            vectors,
            suspect: false,
        };
        net.configure().map_err(fail)?;
        Ok(net)
    }

    /// The control commands: the number of queue pairs, then the RX
    /// filter (no promiscuous or all-multicast mode, unicast table = own
    /// MAC, empty multicast table; broadcast stays on) and the MAC.
    fn configure(&mut self) -> Result<(), &'static str> {
        if self.pairs > 1 {
            let n = (self.pairs as u16).to_le_bytes();
            self.command(
                CTRL_MQ,
                CTRL_MQ_VQ_PAIRS_SET,
                &n,
                "device refused VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET",
            )?;
        }
        if self.features & F_CTRL_RX != 0 {
            self.command(
                CTRL_RX,
                CTRL_RX_PROMISC,
                &[0],
                "device refused VIRTIO_NET_CTRL_RX_PROMISC off",
            )?;
            self.command(
                CTRL_RX,
                CTRL_RX_ALLMULTI,
                &[0],
                "device refused VIRTIO_NET_CTRL_RX_ALLMULTI off",
            )?;
            let m = self.mac;
            let table = [1, 0, 0, 0, m[0], m[1], m[2], m[3], m[4], m[5], 0, 0, 0, 0];
            self.command(
                CTRL_MAC,
                CTRL_MAC_TABLE_SET,
                &table,
                "device refused VIRTIO_NET_CTRL_MAC_TABLE_SET",
            )?;
        }
        if self.features & F_CTRL_MAC_ADDR != 0 {
            let m = self.mac;
            self.command(
                CTRL_MAC,
                CTRL_MAC_ADDR_SET,
                &m,
                "device refused VIRTIO_NET_CTRL_MAC_ADDR_SET",
            )?;
        }
        Ok(())
    }

    /// Runs one control command and checks its ack (`refused` is the
    /// error when the device answers anything but OK).
    fn command(
        &mut self,
        class: u8,
        command: u8,
        data: &[u8],
        refused: &'static str,
    ) -> Result<(), &'static str> {
        let q = self.ctrl.as_mut().ok_or("no control queue")?;
        let area = dma::ctrl();
        assert!(data.len() + 2 <= dma::CTRL_ACK);
        // SAFETY: the control area is not in flight: commands run one at a
        // time and each waits for its completion below.
        let a = unsafe { core::slice::from_raw_parts_mut(area, dma::CTRL_ACK + 1) };
        a[0] = class;
        a[1] = command;
        a[2..2 + data.len()].copy_from_slice(data);
        a[dma::CTRL_ACK] = 0xff;
        q.set_desc(
            0,
            Desc {
                addr: area as u64,
                len: 2 + data.len() as u32,
                flags: DESC_NEXT,
                next: 1,
            },
        );
        q.set_desc(
            1,
            Desc {
                addr: area as u64 + dma::CTRL_ACK as u64,
                len: 1,
                flags: DESC_WRITE,
                next: 0,
            },
        );
        q.push(0);
        q.publish();
        let start = idt::timer_ticks();
        while q.pop_used().is_none() {
            if !q.arm() {
                if idt::timer_ticks() - start >= CTRL_TIMEOUT {
                    return Err("timeout: a control queue command was not completed");
                }
                idt::wait_for_interrupt();
            }
        }
        // SAFETY: the device wrote the ack before returning the chain.
        let ack = unsafe { area.add(dma::CTRL_ACK).read_volatile() };
        if ack != CTRL_OK {
            return Err(refused);
        }
        Ok(())
    }

    /// Interrupts taken on this device's queue vectors.
    pub fn irqs(&self) -> u64 {
        (0..self.vectors).map(idt::queue_irqs).sum()
    }

    /// Hands RX buffers back and sends queued frames.
    pub fn kick(&mut self) {
        self.tx.publish();
        self.rx.publish();
    }

    /// Sleeps until a queue has used entries (RX queues with `rx`, TX
    /// queues with `tx`) or any interrupt arrives: the watchdog ticks
    /// about once a second. Returns at once when entries are pending.
    /// Fails when frames keep showing up on watchdog wake-ups alone, twice
    /// in a row (the MSI-X messages never arrive).
    pub fn sleep(&mut self, rx: bool, tx: bool) -> Result<(), &'static str> {
        let mut pending = rx && self.rx.arm();
        if tx {
            for q in &mut self.tx.q[..self.pairs] {
                q.set_no_interrupt(false);
                pending |= q.arm();
            }
        }
        if !pending {
            let irqs = self.irqs();
            let tick = idt::timer_ticks();
            idt::wait_for_interrupt();
            if self.irqs() == irqs && idt::timer_ticks() != tick {
                // Only the watchdog woke us: did the device skip one?
                if rx && self.rx.arm() {
                    if self.suspect {
                        return Err("frames arrive but their MSI-X interrupts do not");
                    }
                    self.suspect = true;
                } else {
                    self.suspect = false;
                }
            } else {
                self.suspect = false;
            }
        }
        if tx {
            for q in &mut self.tx.q[..self.pairs] {
                q.set_no_interrupt(true);
            }
        }
        Ok(())
    }

    /// Sends what is queued and waits until pair `k` has a free TX buffer.
    pub fn wait_tx_room(&mut self, k: usize) -> Result<(), &'static str> {
        self.tx.publish();
        let start = idt::timer_ticks();
        while !self.tx.has_room(k) {
            if idt::timer_ticks() - start >= TX_TIMEOUT {
                return Err("timeout: transmitted frames are not completed");
            }
            self.sleep(false, true)?;
        }
        Ok(())
    }

    /// Sends what is queued and waits until the device has completed
    /// every transmitted frame.
    pub fn drain_tx(&mut self) -> Result<(), &'static str> {
        self.kick();
        let start = idt::timer_ticks();
        loop {
            for k in 0..self.pairs {
                self.tx.reclaim(k);
            }
            if self.tx.in_flight() == 0 {
                return Ok(());
            }
            if idt::timer_ticks() - start >= TX_TIMEOUT {
                return Err("timeout: transmitted frames are not completed");
            }
            self.sleep(false, true)?;
        }
    }

    /// The device status register (for diagnostics).
    pub fn device_status(&self) -> u8 {
        self.transport.status()
    }
}
