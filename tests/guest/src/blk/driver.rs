//! virtio-blk driver: device bring-up, request slots, submission and
//! interrupt-driven completion.
//!
//! Request slot `s` (< qd) belongs to queue `s % nq` at local index
//! `j = s / nq`, and owns fixed resources: descriptors `3j..3j+2` of its
//! queue (chained) or descriptor `j` plus the slot's own 3-entry indirect
//! table, its header and status byte, and `bs` bytes of the data pool at
//! `s * bs`. Nothing is allocated per request: [`Blk::prepare`] writes
//! every slot's chain once, and [`Blk::submit`] only fills the header and
//! status and patches the data descriptor's length and direction.

use super::dma::{self, Header};
use super::options::Options;
use crate::apic::Lapic;
use crate::idt;
use crate::pci::{self, Function};
use crate::virtio::queue::{
    Desc, Queue, DESC_INDIRECT, DESC_NEXT, DESC_WRITE, MAX_QUEUES, MAX_SIZE,
};
use crate::virtio::{self, Transport};

/// PCI device IDs of virtio-blk: modern and transitional.
const DEVICE_MODERN: u16 = 0x1042;
const DEVICE_TRANSITIONAL: u16 = 0x1001;

// virtio-blk feature bits.
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

// Device configuration offsets.
const CFG_CAPACITY: u32 = 0x00;
const CFG_NUM_QUEUES: u32 = 0x20; // u16 at 0x22, read as the dword at 0x20

// Request types and status values.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
/// Status byte value before the device writes it.
const S_PENDING: u8 = 0xff;

/// An initialised virtio-blk device.
pub struct Blk {
    pub func: Function,
    transport: Transport,
    queues: [Queue; MAX_QUEUES],
    pub nq: usize,
    pub qsize: u16,
    pub features: u64,
    pub capacity: u64,
    indirect: bool,
    /// Data buffer size of every slot.
    bs: usize,
}

/// A bring-up failure: message, and the function when already found.
pub struct Fail(pub Option<Function>, pub &'static str);

/// The `n`th virtio-blk function of bus 0.
fn find(n: u32) -> Option<Function> {
    pci::functions()
        .filter(|&(_, id)| {
            id as u16 == virtio::VENDOR
                && matches!((id >> 16) as u16, DEVICE_MODERN | DEVICE_TRANSITIONAL)
        })
        .nth(n as usize)
        .map(|(f, _)| f)
}

impl Blk {
    /// Finds device `o.dev`, wires its queues to MSI-X vectors on `apic`
    /// and brings it to DRIVER_OK.
    pub fn open(o: &Options, apic: &Lapic) -> Result<Blk, Fail> {
        let func = find(o.dev).ok_or(Fail(None, "no such virtio-blk device"))?;
        let fail = |msg| Fail(Some(func), msg);
        let t = Transport::probe(func).map_err(fail)?;
        // SAFETY: the device may DMA only into rings and buffers the driver
        // hands it; INTx is replaced by MSI-X.
        unsafe { func.enable(pci::CMD_MEMORY | pci::CMD_BUS_MASTER | pci::CMD_INTX_DISABLE) };
        t.reset().map_err(fail)?;

        let mut wanted = virtio::F_VERSION_1
            | F_SEG_MAX
            | F_RO
            | F_BLK_SIZE
            | F_FLUSH
            | F_MQ
            | F_DISCARD
            | F_WRITE_ZEROES;
        if o.event_idx {
            wanted |= virtio::F_EVENT_IDX;
        }
        if o.indirect {
            wanted |= virtio::F_INDIRECT_DESC;
        }
        let features = t.negotiate(wanted).map_err(fail)?;
        let capacity = t
            .config64(CFG_CAPACITY)
            .ok_or(fail("device configuration too short"))?;
        let dev_queues = if features & F_MQ != 0 {
            t.config32(CFG_NUM_QUEUES)
                .map_or(1, |d| (d >> 16) as u16)
                .max(1)
        } else {
            1
        };
        let nq = [
            o.queues as usize,
            usize::from(dev_queues),
            usize::from(t.num_queues()),
            usize::from(t.msix.size),
            MAX_QUEUES,
        ]
        .into_iter()
        .min()
        .unwrap_or(1);
        if nq == 0 {
            return Err(fail("device has no virtqueues"));
        }

        // MSI-X before the queue vectors, as a device may check that it is
        // enabled when a vector is assigned.
        t.msix.enable_masked();
        for k in 0..nq {
            t.msix
                .set_entry(k as u16, apic.id, idt::IRQ_VECTOR_BASE + k as u8);
        }
        t.msix.unmask_function();
        t.disable_config_vector();

        let mut max = MAX_SIZE;
        for k in 0..nq {
            let m = t.queue_max(k as u16);
            if m == 0 {
                return Err(fail("a virtqueue is not available (queue_size 0)"));
            }
            max = max.min(m);
        }
        let qsize = 1u16 << (15 - max.leading_zeros()); // power of two <= max
        let event_idx = features & virtio::F_EVENT_IDX != 0;
        let mut queues: [Queue; MAX_QUEUES] = core::array::from_fn(|k| {
            Queue::new(k as u16, if k < nq { qsize } else { 0 }, event_idx)
        });
        for (k, q) in queues.iter_mut().enumerate().take(nq) {
            let notify = t
                .setup_queue(k as u16, qsize, q.ring_addresses(), k as u16)
                .map_err(fail)?;
            q.set_notify(notify);
        }
        t.driver_ok().map_err(fail)?;
        Ok(Blk {
            func,
            transport: t,
            queues,
            nq,
            qsize,
            features,
            capacity,
            indirect: features & virtio::F_INDIRECT_DESC != 0,
            bs: o.bs as usize,
        })
    }

    /// Most requests in flight: per queue, one ring descriptor each with
    /// indirect tables, three without.
    pub fn max_qd(&self) -> usize {
        let per_queue = if self.indirect {
            self.qsize
        } else {
            self.qsize / 3
        };
        usize::from(per_queue) * self.nq
    }

    /// Queue index and ring-local index of slot `slot`.
    fn place(&self, slot: usize) -> (usize, u16) {
        (slot % self.nq, (slot / self.nq) as u16)
    }

    /// Writes slot `slot`'s descriptor chain `chain` (header first, status
    /// last): into its indirect table plus one ring descriptor, or into
    /// ring descriptors `3j..` linked by `next`. Returns the chain head.
    fn write_chain(&mut self, slot: usize, chain: &[Desc]) -> u16 {
        let (k, j) = self.place(slot);
        let q = &mut self.queues[k];
        if self.indirect {
            let table = dma::slot(slot).cast::<Desc>();
            for (i, d) in chain.iter().enumerate() {
                let next = i as u16 + 1;
                // SAFETY: `table` is the slot's 3-entry indirect table and
                // `i < chain.len() <= 3`; the slot is not in flight.
                unsafe { table.add(i).write_volatile(Desc { next, ..*d }) };
            }
            let len = 16 * chain.len() as u32;
            q.set_desc(
                j,
                Desc {
                    addr: table as u64,
                    len,
                    flags: DESC_INDIRECT,
                    next: 0,
                },
            );
            j
        } else {
            let base = 3 * j;
            for (i, d) in chain.iter().enumerate() {
                q.set_desc(
                    base + i as u16,
                    Desc {
                        next: base + i as u16 + 1,
                        ..*d
                    },
                );
            }
            base
        }
    }

    /// The chain of slot `slot` for a request with `data_len` bytes of its
    /// buffer (0: header and status only); `device_writes`: a read.
    fn chain(slot: usize, bs: usize, data_len: u32, device_writes: bool) -> ([Desc; 3], usize) {
        let s = dma::slot(slot);
        // SAFETY: only the addresses of the header and status are taken.
        let (header, status) =
            unsafe { (&raw const (*s).header as u64, &raw const (*s).status as u64) };
        let header = Desc {
            addr: header,
            len: 16,
            flags: DESC_NEXT,
            next: 0,
        };
        let status = Desc {
            addr: status,
            len: 1,
            flags: DESC_WRITE,
            next: 0,
        };
        if data_len == 0 {
            return ([header, status, status], 2);
        }
        let flags = if device_writes {
            DESC_NEXT | DESC_WRITE
        } else {
            DESC_NEXT
        };
        let data = Desc {
            addr: dma::buffer_addr(slot, bs),
            len: data_len,
            flags,
            next: 0,
        };
        ([header, data, status], 3)
    }

    /// Writes the standard 3-descriptor chains of slots `0..qd` once, so
    /// that [`Blk::submit`] only patches the data length and direction.
    pub fn prepare(&mut self, qd: usize) {
        for slot in 0..qd {
            let (chain, n) = Self::chain(slot, self.bs, self.bs as u32, true);
            self.write_chain(slot, &chain[..n]);
        }
    }

    /// Queues request `kind` (T_IN or T_OUT) at `sector` for `len` bytes
    /// on prepared slot `slot`. Not visible to the device until
    /// [`Blk::kick`].
    pub fn submit(&mut self, slot: usize, kind: u32, sector: u64, len: u32) {
        let s = dma::slot(slot);
        let flags = if kind == T_OUT {
            DESC_NEXT
        } else {
            DESC_NEXT | DESC_WRITE
        };
        let (k, j) = self.place(slot);
        // The data descriptor of the prepared chain.
        let (data, head) = if self.indirect {
            // SAFETY: entry 1 of the slot's indirect table.
            (unsafe { s.cast::<Desc>().add(1) }, j)
        } else {
            (self.queues[k].desc_ptr(3 * j + 1), 3 * j)
        };
        // SAFETY: the slot is not in flight (callers track that), so the
        // device does not access its header, status or descriptors.
        unsafe {
            (&raw mut (*s).header).write_volatile(Header {
                kind,
                reserved: 0,
                sector,
            });
            (&raw mut (*s).status).write_volatile(S_PENDING);
            (&raw mut (*data).len).write_volatile(len);
            (&raw mut (*data).flags).write_volatile(flags);
        }
        self.queues[k].push(head);
    }

    /// Publishes queued requests on every queue, notifying where needed.
    pub fn kick(&mut self) {
        for k in 0..self.nq {
            self.queues[k].publish();
        }
    }

    /// The next completed request `(slot, status)`, from any queue.
    pub fn pop(&mut self) -> Option<(usize, u8)> {
        let nq = self.nq;
        let per_chain = if self.indirect { 1 } else { 3 };
        for k in 0..nq {
            if let Some((id, _len)) = self.queues[k].pop_used() {
                let slot = usize::from(id / per_chain) * nq + k;
                // SAFETY: the device returned the chain and wrote the
                // status before moving used.idx.
                let status = unsafe { (&raw const (*dma::slot(slot)).status).read_volatile() };
                return Some((slot, status));
            }
        }
        None
    }

    /// Interrupts taken on this device's queues.
    pub fn irqs(&self) -> u64 {
        (0..self.nq).map(idt::queue_irqs).sum()
    }

    /// Sleeps until a completion is pending. Fails after `timeout` watchdog
    /// ticks without one (0: never), or when completions show up only on
    /// watchdog ticks, twice in a row with no queue interrupt in between
    /// (the MSI-X messages never arrive).
    pub fn wait(&mut self, timeout: u64) -> Result<(), &'static str> {
        let start = idt::timer_ticks();
        let irqs = self.irqs();
        let mut suspect = None;
        loop {
            let mut pending = false;
            for k in 0..self.nq {
                pending |= self.queues[k].arm();
            }
            // Ticks only advance inside `wait_for_interrupt`.
            let now = idt::timer_ticks();
            if pending {
                if now == start || self.irqs() != irqs {
                    return Ok(());
                }
                // Only a watchdog tick woke us: give an MSI that is still
                // on its way one more tick to arrive.
                match suspect {
                    None => suspect = Some(now),
                    Some(t) if now > t => {
                        return Err("completions arrive but their MSI-X interrupts do not")
                    }
                    Some(_) => {}
                }
            } else if timeout != 0 && now - start >= timeout {
                return Err("timeout: no completion within blk.timeout watchdog ticks");
            }
            idt::wait_for_interrupt();
        }
    }

    /// Runs one request of type `kind` with `data_len` device-written
    /// bytes (0: none) on slot 0, with nothing else in flight, and returns
    /// its status. Slot 0 needs [`Blk::prepare`] again afterwards.
    pub fn run_one(&mut self, kind: u32, data_len: u32, timeout: u64) -> Result<u8, &'static str> {
        let s = dma::slot(0);
        // SAFETY: slot 0 is idle.
        unsafe {
            (&raw mut (*s).header).write_volatile(Header {
                kind,
                reserved: 0,
                sector: 0,
            });
            (&raw mut (*s).status).write_volatile(S_PENDING);
        }
        let (chain, n) = Self::chain(0, self.bs, data_len, true);
        let head = self.write_chain(0, &chain[..n]);
        self.queues[0].push(head);
        self.kick();
        loop {
            if let Some((_, status)) = self.pop() {
                return Ok(status);
            }
            self.wait(timeout)?;
        }
    }

    /// The device status register (for diagnostics).
    pub fn device_status(&self) -> u8 {
        self.transport.status()
    }
}
