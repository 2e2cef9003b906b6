//! One virtio-blk queue served on an io_uring iothread.
//!
//! The queue is a future on the shared queue layer ([`crate::vq`]): one
//! outstanding read of the kick eventfd; on a kick, a pass over the avail
//! ring that parses each chain and starts its I/O. Reads, writes and
//! flushes take a slot of the queue's request table (sized by the queue,
//! reused) and go to the ring as direct operations tagged with the slot:
//! no task, boxed future, iovec array or segment list is allocated per
//! request once the queue is warm. The disk is named by its slot in the
//! ring's registered-file table where the kernel has one, and
//! single-buffer transfers into registered guest RAM use
//! READ_FIXED/WRITE_FIXED. Everything started in one executor turn goes to
//! the kernel with one `io_uring_enter`; completions write the status,
//! fill the used ring and, once per turn, interrupt the driver if the
//! used-event rule says so. Discard and write-zeroes (several operations
//! each, rare) run as tasks.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use uring_backend::block::{advance, BlockFile, DirectIo};
use uring_backend::executor::{Completion, EventFdReader, Executor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::request::{
    parse_pooled, Request, RequestKind, RequestLimits, SegmentPool, SECTOR_SHIFT,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    WRITE_ZEROES_FLAG_UNMAP,
};
use super::stats::BlockStats;
use crate::ratelimit::RateLimitedLog;
use crate::vq::{
    drain, schedule_notify, serve_kicks, settle, Chain, Drained, QueueParts, ReturnedQueues,
    ServedQueue, SharedQueue,
};
use crate::workers::WorkerGuardToken;

/// Everything a queue worker needs; moved to its iothread.
pub struct QueueCtx {
    pub index: u16,
    pub guard: WorkerGuardToken,
    pub queue: Queue,
    pub kick: EventFd,
    pub interrupt: Option<EventFd>,
    pub mem: GuestMemoryMmap,
    pub disk: BlockFile,
    pub limits: RequestLimits,
    pub id: [u8; VIRTIO_BLK_ID_BYTES],
    pub event_idx: bool,
    /// Use guest RAM registered as io_uring fixed buffers.
    pub fixed_buffers: bool,
    pub stop: Arc<AtomicBool>,
    pub log: Arc<RateLimitedLog>,
    /// Receives the queue, in its final state, when the worker stops.
    pub returned: ReturnedQueues,
    pub stats: Arc<BlockStats>,
}

impl crate::vq::InterruptCounter for BlockStats {
    fn interrupt_raised(&self) {
        self.interrupts.fetch_add(1, Ordering::Relaxed);
    }
}

/// A read, write or flush in flight.
struct Slot {
    head: u16,
    /// Some while the slot is taken.
    req: Option<Request>,
    /// The transfer's iovecs (what is left of it after a short transfer);
    /// kept, with its capacity, from one request to the next.
    iov: Vec<libc::iovec>,
    /// Bytes moved so far.
    done: u64,
}

/// The queue's state, shared by its task and, through the op table, by
/// every operation it has in flight (which keeps the slots, their iovec
/// arrays and the guest memory alive until the kernel is done).
struct BlkQueue {
    me: Weak<BlkQueue>,
    ex: Rc<Executor>,
    vq: SharedQueue,
    disk: BlockFile,
    /// The disk's slot in this ring's registered-file table.
    file_slot: Option<u32>,
    /// Guest RAM is registered with this iothread's ring as fixed buffers.
    fixed: bool,
    slots: RefCell<Vec<Slot>>,
    /// The queue's size: no driver has more requests in flight.
    max_slots: usize,
    free: RefCell<Vec<u32>>,
    pool: RefCell<SegmentPool>,
    /// Requests taken from the avail ring and not yet returned.
    inflight: Cell<usize>,
    limits: RequestLimits,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    log: Arc<RateLimitedLog>,
    stats: Arc<BlockStats>,
}

/// Serves one queue until the device is reset or paused.
pub async fn serve_queue(ex: Rc<Executor>, ctx: QueueCtx) {
    let _guard = ctx.guard;
    let size = usize::from(ctx.queue.size()).max(1);
    let vq = ServedQueue::shared(QueueParts {
        index: ctx.index,
        queue: ctx.queue,
        event_idx: ctx.event_idx,
        mem: ctx.mem.clone(),
        interrupt: ctx.interrupt,
        log: ctx.log.clone(),
        counter: ctx.stats.clone(),
    });
    // The `sync` engine never hands the ring a transfer: registering guest
    // RAM (which pins all of it) or the disk would buy nothing.
    let ring_io = !ctx.disk.synchronous();
    let registration = if ctx.fixed_buffers && ring_io {
        register_guest_memory(&ex, &ctx.mem, &ctx.log)
    } else {
        if ctx.fixed_buffers {
            log::debug!(
                "queue {}: sync engine: guest RAM not registered with the ring",
                ctx.index
            );
        }
        Registration::None
    };
    if registration != Registration::None {
        log::debug!("queue {}: guest RAM registered as fixed buffers", ctx.index);
    }
    let file_slot = if ring_io {
        match ex.register_file(&ctx.disk) {
            Ok(slot) => Some(slot),
            Err(e) => {
                log::debug!("queue {}: disk not a registered file: {e}", ctx.index);
                None
            }
        }
    } else {
        None
    };
    let q = Rc::new_cyclic(|me| BlkQueue {
        me: me.clone(),
        ex: ex.clone(),
        vq: vq.clone(),
        disk: ctx.disk,
        file_slot,
        fixed: registration != Registration::None,
        slots: RefCell::new(Vec::with_capacity(size)),
        max_slots: size,
        free: RefCell::new(Vec::with_capacity(size)),
        pool: RefCell::new(SegmentPool::default()),
        inflight: Cell::new(0),
        limits: ctx.limits,
        id: ctx.id,
        log: ctx.log.clone(),
        stats: ctx.stats,
    });
    let kick = EventFdReader::new(Arc::new(ctx.kick));
    serve_kicks(&ex, &kick, &ctx.stop, &vq, || q.drain()).await;
    // Reset or pause: let in-flight requests finish before the queue goes
    // back.
    settle(&ex, || q.inflight.get() == 0).await;
    if let Some(slot) = file_slot {
        ex.unregister_file(slot);
    }
    // Guest memory may be unmapped (and its addresses reused) once the
    // queue is back: the registration must not outlive it.
    if registration == Registration::Made {
        if let Err(e) = ex.unregister_buffers() {
            ctx.log
                .warn(format_args!("unregistering guest RAM from the ring: {e}"));
        }
    }
    vq.borrow().hand_back(&ctx.returned, 0);
}

fn io_status(errno: i32) -> u8 {
    match errno {
        libc::EOPNOTSUPP => VIRTIO_BLK_S_UNSUPP,
        _ => VIRTIO_BLK_S_IOERR,
    }
}

impl BlkQueue {
    /// A pass over the avail ring.
    fn drain(&self) -> Drained {
        drain(&self.vq, |chain| self.take(chain), || false)
    }

    /// Starts the request in one chain, or answers it at once.
    fn take(&self, chain: Chain) {
        let head = chain.head_index();
        let mem = self.vq.borrow().mem.clone();
        let parsed = parse_pooled(chain, &mem, &self.limits, &mut self.pool.borrow_mut());
        let req = match parsed {
            Ok(req) => req,
            Err((err, status)) => {
                self.log.warn(format_args!("bad request: {err}"));
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                let len = match status {
                    Some(addr) if mem.write_obj(err.status(), addr).is_ok() => 1,
                    _ => 0,
                };
                self.vq.borrow_mut().complete(head, len);
                schedule_notify(&self.ex, &self.vq);
                return;
            }
        };
        self.inflight.set(self.inflight.get() + 1);
        match req.kind {
            RequestKind::Read | RequestKind::Write | RequestKind::Flush => self.start(head, req),
            RequestKind::GetId => {
                let res = write_id(&mem, &req, &self.id);
                self.finish_request(head, &req, res);
                self.pool.borrow_mut().give(req.data);
            }
            RequestKind::Discard(_) | RequestKind::WriteZeroes(_) => {
                let Some(me) = self.me.upgrade() else { return };
                self.ex.spawn(run_slow(me, head, req));
            }
        }
    }

    /// Puts a read, write or flush in a free slot and starts it.
    fn start(&self, head: u16, req: Request) {
        let index = {
            let mut slots = self.slots.borrow_mut();
            match self.free.borrow_mut().pop() {
                Some(i) => i,
                None if slots.len() < self.max_slots => {
                    slots.push(Slot {
                        head,
                        req: None,
                        iov: Vec::new(),
                        done: 0,
                    });
                    (slots.len() - 1) as u32
                }
                None => {
                    // Only a driver that made the same head available twice
                    // gets here.
                    drop(slots);
                    let msg = "more requests in flight than the queue holds";
                    self.finish_request(head, &req, Err((VIRTIO_BLK_S_IOERR, msg.into())));
                    self.pool.borrow_mut().give(req.data);
                    return;
                }
            }
        };
        {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[index as usize];
            slot.head = head;
            slot.done = 0;
            slot.iov.clear();
            let mem = self.vq.borrow().mem.clone();
            for &(addr, len) in &req.data {
                // Parsing checked every segment against guest memory.
                if let Ok(s) = mem.get_slice(addr, len as usize) {
                    slot.iov.push(libc::iovec {
                        iov_base: s.ptr_guard_mut().as_ptr().cast(),
                        iov_len: len as usize,
                    });
                }
            }
            slot.req = Some(req);
        }
        self.submit(index);
    }

    /// Submits (the rest of) slot `index`'s operation; answers the request
    /// if it cannot be started.
    fn submit(&self, index: u32) {
        let io = {
            let slots = self.slots.borrow();
            let slot = &slots[index as usize];
            let Some(req) = &slot.req else { return };
            let offset = (req.sector << SECTOR_SHIFT) + slot.done;
            let write = req.kind == RequestKind::Write;
            match (&req.kind, slot.iov.as_slice()) {
                (RequestKind::Flush, _) => DirectIo::Flush,
                (_, [one]) if self.fixed => {
                    let ptr = one.iov_base.cast::<u8>();
                    match self.ex.fixed_index_for(ptr, one.iov_len) {
                        Some(index) => {
                            DirectIo::fixed(write, offset, ptr, one.iov_len as u32, index)
                        }
                        None => DirectIo::rw(write, offset, &slot.iov),
                    }
                }
                _ => DirectIo::rw(write, offset, &slot.iov),
            }
        };
        if self.disk.synchronous() {
            // The `sync` engine (a disk in memory, see IoEngine): done now.
            // SAFETY: the slot's iovecs and the guest RAM they point into
            // (held by `vq`) are valid for the call.
            let result = unsafe { self.disk.run_sync(io) };
            self.finished(index, result);
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        // SAFETY: the slot's iovecs and the guest RAM they point into (held
        // by `vq`) stay put until `index` completes: the op table holds `me`.
        let started = unsafe {
            self.disk
                .start(&self.ex, self.file_slot, me, u64::from(index), io)
        };
        if let Err(e) = started {
            self.finished(index, -e.raw_os_error().unwrap_or(libc::EIO));
        }
    }

    /// A slot's operation completed with `result`.
    fn finished(&self, index: u32, result: i32) {
        let outcome = {
            let mut slots = self.slots.borrow_mut();
            let Some(slot) = slots.get_mut(index as usize) else {
                return;
            };
            let Some(req) = &slot.req else { return };
            let what = match req.kind {
                RequestKind::Write => "write",
                RequestKind::Flush => "flush",
                _ => "read",
            };
            if result == -libc::EINTR {
                None
            } else if result < 0 {
                let e = std::io::Error::from_raw_os_error(-result);
                Some(Err((
                    io_status(-result),
                    format!("{what} at sector {}: {e}", req.sector),
                )))
            } else if req.kind == RequestKind::Flush {
                Some(Ok(0))
            } else if result == 0 {
                Some(Err((
                    VIRTIO_BLK_S_IOERR,
                    format!(
                        "short transfer at sector {}: {} of {}",
                        req.sector, slot.done, req.data_len
                    ),
                )))
            } else {
                slot.done += result as u64;
                if slot.done < req.data_len {
                    advance(&mut slot.iov, result as usize);
                    None
                } else if req.kind == RequestKind::Write {
                    Some(Ok(0))
                } else {
                    Some(Ok(req.data_len as u32))
                }
            }
        };
        let Some(outcome) = outcome else {
            // Interrupted, or short: the rest goes again.
            self.submit(index);
            return;
        };
        let (head, req) = {
            let mut slots = self.slots.borrow_mut();
            let slot = &mut slots[index as usize];
            (slot.head, slot.req.take())
        };
        self.free.borrow_mut().push(index);
        if let Some(req) = req {
            self.finish_request(head, &req, outcome);
            self.pool.borrow_mut().give(req.data);
        }
    }

    /// Writes the status, counts, returns the chain and schedules the
    /// interrupt check.
    fn finish_request(&self, head: u16, req: &Request, outcome: Result<u32, (u8, String)>) {
        let (status, written) = match outcome {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err((status, msg)) => {
                self.log.warn(format_args!("{msg}"));
                (status, 0)
            }
        };
        count(&self.stats, req, status == VIRTIO_BLK_S_OK);
        let mem = self.vq.borrow().mem.clone();
        let len = match mem.write_obj(status, req.status) {
            Ok(()) => written + 1,
            Err(_) => 0,
        };
        self.vq.borrow_mut().complete(head, len);
        self.inflight.set(self.inflight.get() - 1);
        schedule_notify(&self.ex, &self.vq);
    }
}

impl Completion for BlkQueue {
    fn complete(&self, tag: u64, result: i32) {
        self.finished(tag as u32, result);
    }
}

/// Answers GET_ID from the device's serial.
fn write_id(
    mem: &GuestMemoryMmap,
    req: &Request,
    id: &[u8; VIRTIO_BLK_ID_BYTES],
) -> Result<u32, (u8, String)> {
    let mut written = 0u32;
    for &(addr, len) in &req.data {
        let n = (len as usize).min(VIRTIO_BLK_ID_BYTES - written as usize);
        mem.write_slice(&id[written as usize..written as usize + n], addr)
            .map_err(|e| (VIRTIO_BLK_S_IOERR, format!("writing the ID: {e}")))?;
        written += n as u32;
        if written as usize == VIRTIO_BLK_ID_BYTES {
            break;
        }
    }
    Ok(written)
}

/// Carries out a discard or write-zeroes request, one range after another.
async fn run_slow(q: Rc<BlkQueue>, head: u16, req: Request) {
    let ex = q.ex.clone();
    let err = |what: &str, sector: u64, e: std::io::Error| {
        (
            io_status(e.raw_os_error().unwrap_or(libc::EIO)),
            format!("{what} at sector {sector}: {e}"),
        )
    };
    let mut outcome = Ok(0);
    match &req.kind {
        RequestKind::Discard(segs) => {
            for &(sector, sectors, _) in segs {
                let r = q
                    .disk
                    .discard(
                        &ex,
                        sector << SECTOR_SHIFT,
                        u64::from(sectors) << SECTOR_SHIFT,
                    )
                    .await;
                if let Err(e) = r {
                    outcome = Err(err("discard", sector, e));
                    break;
                }
            }
        }
        RequestKind::WriteZeroes(segs) => {
            for &(sector, sectors, flags) in segs {
                let r = q
                    .disk
                    .write_zeroes(
                        &ex,
                        sector << SECTOR_SHIFT,
                        u64::from(sectors) << SECTOR_SHIFT,
                        flags & WRITE_ZEROES_FLAG_UNMAP != 0,
                    )
                    .await;
                if let Err(e) = r {
                    outcome = Err(err("write-zeroes", sector, e));
                    break;
                }
            }
        }
        _ => {}
    }
    q.finish_request(head, &req, outcome);
}

/// Older kernels refuse registered buffers over 1 GiB (this host's 6.18
/// took a 2 GiB one); pieces of at most 1 GiB register everywhere.
const MAX_FIXED_BUFFER: usize = 1 << 30;

/// Guest RAM regions cut into pieces io_uring can register. A request
/// whose buffer straddles two pieces falls back to vectored I/O.
fn fixed_buffer_chunks(regions: impl Iterator<Item = (*mut u8, usize)>) -> Vec<(*mut u8, usize)> {
    let mut out = Vec::new();
    for (ptr, len) in regions {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(MAX_FIXED_BUFFER);
            out.push((ptr.wrapping_add(off), n));
            off += n;
        }
    }
    out
}

/// Whether this queue's ring has guest RAM as fixed buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Registration {
    None,
    /// Registered by this queue's worker, which unregisters it at the end.
    Made,
    /// Registered by another queue of the same iothread.
    Shared,
}

/// Registers guest RAM with this iothread's ring, once per executor; on
/// refusal the queue works with ordinary vectored I/O.
fn register_guest_memory(
    ex: &Rc<Executor>,
    mem: &GuestMemoryMmap,
    log: &RateLimitedLog,
) -> Registration {
    let regions = fixed_buffer_chunks(mem.iter().map(|r| (r.as_ptr(), r.len() as usize)));
    if regions
        .iter()
        .all(|&(p, l)| ex.fixed_index_for(p, l.min(1)).is_some())
    {
        return Registration::Shared;
    }
    match ex.register_buffers(&regions) {
        Ok(()) => Registration::Made,
        Err(e) => {
            log.warn(format_args!(
                "guest RAM not registered as fixed buffers, using vectored I/O: {e}"
            ));
            Registration::None
        }
    }
}

/// Counts a finished request.
fn count(stats: &BlockStats, req: &Request, ok: bool) {
    let add = |c: &std::sync::atomic::AtomicU64, n: u64| {
        c.fetch_add(n, Ordering::Relaxed);
    };
    if !ok {
        add(&stats.errors, 1);
        return;
    }
    let sectors = |segs: &[(u64, u32, u32)]| -> u64 {
        segs.iter()
            .map(|&(_, n, _)| u64::from(n) << SECTOR_SHIFT)
            .sum()
    };
    match &req.kind {
        RequestKind::Read => {
            add(&stats.read_ops, 1);
            add(&stats.read_bytes, req.data_len);
        }
        RequestKind::Write => {
            add(&stats.write_ops, 1);
            add(&stats.write_bytes, req.data_len);
        }
        RequestKind::Flush => add(&stats.flush_ops, 1),
        RequestKind::Discard(segs) => {
            add(&stats.discard_ops, 1);
            add(&stats.discard_bytes, sectors(segs));
        }
        RequestKind::WriteZeroes(segs) => {
            add(&stats.write_zeroes_ops, 1);
            add(&stats.write_zeroes_bytes, sectors(segs));
        }
        RequestKind::GetId => {}
    }
}

#[cfg(test)]
mod chunk_tests {
    use super::*;

    #[test]
    fn regions_larger_than_a_gib_are_cut_into_registrable_pieces() {
        let base = 0x1000_0000usize as *mut u8;
        let chunks = fixed_buffer_chunks(
            [(base, (5 << 29) + 4096), (base.wrapping_add(8 << 30), 4096)].into_iter(),
        );
        let got: Vec<(usize, usize)> = chunks
            .iter()
            .map(|&(p, l)| (p as usize - base as usize, l))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 1 << 30),
                (1 << 30, 1 << 30),
                (2 << 30, (1 << 29) + 4096),
                (8 << 30, 4096),
            ]
        );
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod slab_tests;
