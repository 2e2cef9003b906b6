//! One virtio-blk queue served on an io_uring iothread.
//!
//! The queue is a future: it keeps one outstanding read on the queue's
//! ioeventfd; when the driver kicks, it drains the avail ring inside
//! virtio-queue's disable/enable-notification loop, parses each chain and
//! starts its I/O on the iothread's ring. Everything started in one turn of
//! the executor goes to the kernel with one `io_uring_enter`. Completions
//! write the status, fill the used ring and, once per turn, interrupt the
//! driver if the used-event rule says so.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use uring_backend::block::BlockFile;
use uring_backend::executor::{yield_now, Executor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::device::ReturnedQueues;
use super::request::{
    parse, Request, RequestKind, RequestLimits, SECTOR_SHIFT, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, WRITE_ZEROES_FLAG_UNMAP,
};
use super::stats::BlockStats;
use crate::ratelimit::RateLimitedLog;
use crate::workers::{WorkerCount, WorkerGuardToken};

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

impl QueueCtx {
    /// Counts a worker as started; it counts as finished when the context
    /// is dropped, whether or not it ever ran.
    pub fn worker_guard(workers: &Arc<WorkerCount>) -> WorkerGuardToken {
        WorkerGuardToken::new(workers)
    }
}

/// Queue state shared by the queue task and its request tasks.
struct Shared {
    queue: Queue,
    /// Shared by every request of the queue (cloning the memory itself
    /// would copy its region list each time).
    mem: Rc<GuestMemoryMmap>,
    interrupt: Option<EventFd>,
    inflight: usize,
    notify_scheduled: bool,
    /// Guest RAM is registered with this iothread's ring: single-buffer
    /// transfers use READ_FIXED/WRITE_FIXED (no page pinning per I/O).
    fixed: bool,
    index: u16,
    log: Arc<RateLimitedLog>,
    stats: Arc<BlockStats>,
}

impl Shared {
    /// Returns a finished chain to the driver.
    fn complete(&mut self, head: u16, len: u32) {
        if let Err(e) = self.queue.add_used(&*self.mem, head, len) {
            self.log
                .warn(format_args!("queue {}: add_used: {e}", self.index));
        }
    }

    fn notify_if_needed(&mut self) {
        self.notify_scheduled = false;
        let needed = match self.queue.needs_notification(&*self.mem) {
            Ok(n) => n,
            Err(e) => {
                self.log.warn(format_args!(
                    "queue {}: reading used_event: {e}",
                    self.index
                ));
                true
            }
        };
        if needed {
            if let Some(irq) = &self.interrupt {
                match irq.write(1) {
                    Ok(()) => {
                        self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => self.log.warn(format_args!(
                        "queue {}: raising the interrupt: {e}",
                        self.index
                    )),
                }
            }
        }
    }
}

/// Coalesces interrupts: at most one check per executor turn.
fn schedule_notify(ex: &Rc<Executor>, shared: &Rc<RefCell<Shared>>) {
    let mut s = shared.borrow_mut();
    if s.notify_scheduled {
        return;
    }
    s.notify_scheduled = true;
    let shared = shared.clone();
    ex.defer(move || shared.borrow_mut().notify_if_needed());
}

/// Serves one queue until the device is reset.
pub async fn serve_queue(ex: Rc<Executor>, ctx: QueueCtx) {
    let _guard = ctx.guard;
    let kick = Arc::new(ctx.kick);
    let mut queue = ctx.queue;
    queue.set_event_idx(ctx.event_idx);
    let shared = Rc::new(RefCell::new(Shared {
        queue,
        mem: Rc::new(ctx.mem.clone()),
        interrupt: ctx.interrupt,
        inflight: 0,
        notify_scheduled: false,
        fixed: false,
        index: ctx.index,
        log: ctx.log.clone(),
        stats: ctx.stats.clone(),
    }));
    let disk = Rc::new(ctx.disk);
    let id = ctx.id;
    let registration = if ctx.fixed_buffers {
        register_guest_memory(&ex, &ctx.mem, &ctx.log)
    } else {
        Registration::None
    };
    shared.borrow_mut().fixed = registration != Registration::None;
    loop {
        if let Err(e) = ex.read_eventfd(kick.clone()).await {
            ctx.log.warn(format_args!(
                "queue {}: reading the kick eventfd: {e}",
                ctx.index
            ));
            break;
        }
        if ctx.stop.load(Ordering::SeqCst) {
            break;
        }
        // A driver can keep the avail ring non-empty forever (a used ring
        // laid over the avail index makes every completion look like a new
        // request): take at most a queue's worth per pass, then let other
        // tasks run and look at `stop` again.
        while drain_avail(&ex, &shared, &disk, &ctx.limits, &id) == Drained::MoreLeft {
            yield_now().await;
            if ctx.stop.load(Ordering::SeqCst) {
                break;
            }
        }
        if ctx.stop.load(Ordering::SeqCst) {
            break;
        }
    }
    // Reset: let in-flight requests finish before the queue goes back.
    while shared.borrow().inflight > 0 {
        if ex.nop().await.is_err() {
            break;
        }
    }
    let queue = shared.borrow().queue.state();
    // Guest memory may be unmapped (and its addresses reused) once the
    // queue is back: the registration must not outlive it.
    if registration == Registration::Made {
        if let Err(e) = ex.unregister_buffers() {
            ctx.log
                .warn(format_args!("unregistering guest RAM from the ring: {e}"));
        }
    }
    ctx.returned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((ctx.index, queue));
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

/// Pops every available chain, inside the disable/enable-notification loop.
/// Whether a pass over the avail ring emptied it.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    Empty,
    MoreLeft,
}

fn drain_avail(
    ex: &Rc<Executor>,
    shared: &Rc<RefCell<Shared>>,
    disk: &Rc<BlockFile>,
    limits: &RequestLimits,
    id: &[u8; VIRTIO_BLK_ID_BYTES],
) -> Drained {
    let mem_rc = shared.borrow().mem.clone();
    let mem: &GuestMemoryMmap = &mem_rc;
    let mut budget = usize::from(shared.borrow().queue.size()).max(1);
    loop {
        if let Err(e) = shared.borrow_mut().queue.disable_notification(mem) {
            shared
                .borrow()
                .log
                .warn(format_args!("disabling notifications: {e}"));
            return Drained::Empty;
        }
        loop {
            if budget == 0 {
                return Drained::MoreLeft;
            }
            budget -= 1;
            let popped = {
                let mut s = shared.borrow_mut();
                let Some(chain) = s.queue.pop_descriptor_chain(mem) else {
                    break;
                };
                let head = chain.head_index();
                (head, parse(chain, mem, limits))
            };
            match popped {
                (head, Ok(req)) => {
                    shared.borrow_mut().inflight += 1;
                    let task =
                        run_request(ex.clone(), shared.clone(), disk.clone(), head, req, *id);
                    ex.spawn(task);
                }
                (head, Err((err, status))) => {
                    shared.borrow().log.warn(format_args!("bad request: {err}"));
                    let mut s = shared.borrow_mut();
                    s.stats.errors.fetch_add(1, Ordering::Relaxed);
                    let len = match status {
                        Some(addr) if mem.write_obj(err.status(), addr).is_ok() => 1,
                        _ => 0,
                    };
                    s.complete(head, len);
                    drop(s);
                    schedule_notify(ex, shared);
                }
            }
        }
        match shared.borrow_mut().queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => return Drained::Empty,
            Err(e) => {
                shared
                    .borrow()
                    .log
                    .warn(format_args!("enabling notifications: {e}"));
                return Drained::Empty;
            }
        }
    }
}

/// Host iovecs for guest segments; None if one leaves guest memory.
fn iovecs(mem: &GuestMemoryMmap, segs: &[(GuestAddress, u32)]) -> Option<Vec<libc::iovec>> {
    segs.iter()
        .map(|&(addr, len)| {
            let slice = mem.get_slice(addr, len as usize).ok()?;
            Some(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: len as usize,
            })
        })
        .collect()
}

fn io_status(e: &std::io::Error) -> u8 {
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => VIRTIO_BLK_S_UNSUPP,
        _ => VIRTIO_BLK_S_IOERR,
    }
}

/// Carries out one request; returns (status, bytes written to the driver).
async fn execute(
    ex: &Rc<Executor>,
    disk: &BlockFile,
    (mem, fixed): (&Rc<GuestMemoryMmap>, bool),
    req: &Request,
    id: &[u8; VIRTIO_BLK_ID_BYTES],
) -> Result<u32, (u8, String)> {
    let offset = req.sector << SECTOR_SHIFT;
    let err = |what: &str, e: std::io::Error| {
        (
            io_status(&e),
            format!("{what} at sector {}: {e}", req.sector),
        )
    };
    match &req.kind {
        RequestKind::Read | RequestKind::Write => {
            let write = req.kind == RequestKind::Write;
            let keep = Box::new(Rc::clone(mem));
            // One buffer in registered guest RAM: READ_FIXED/WRITE_FIXED.
            let fixed_buf = match req.data.as_slice() {
                [(addr, len)] if fixed => mem.get_slice(*addr, *len as usize).ok().and_then(|s| {
                    let ptr = s.ptr_guard_mut().as_ptr();
                    let index = ex.fixed_index_for(ptr, *len as usize)?;
                    Some((ptr, *len as usize, index))
                }),
                _ => None,
            };
            let done = match fixed_buf {
                Some((ptr, len, index)) if write => {
                    disk.write_fixed(ex, offset, ptr, len, index, keep).await
                }
                Some((ptr, len, index)) => disk.read_fixed(ex, offset, ptr, len, index, keep).await,
                None => {
                    let iov = iovecs(mem, &req.data)
                        .ok_or((VIRTIO_BLK_S_IOERR, "data outside guest memory".to_string()))?;
                    if write {
                        disk.writev(ex, offset, iov, keep).await
                    } else {
                        disk.readv(ex, offset, iov, keep).await
                    }
                }
            }
            .map_err(|e| err(if write { "write" } else { "read" }, e))?;
            if done as u64 != req.data_len {
                return Err((
                    VIRTIO_BLK_S_IOERR,
                    format!(
                        "short transfer at sector {}: {done} of {}",
                        req.sector, req.data_len
                    ),
                ));
            }
            Ok(if write { 0 } else { req.data_len as u32 })
        }
        RequestKind::Flush => {
            disk.flush(ex).await.map_err(|e| err("flush", e))?;
            Ok(0)
        }
        RequestKind::GetId => {
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
        RequestKind::Discard(segs) => {
            for &(sector, sectors, _) in segs {
                disk.discard(
                    ex,
                    sector << SECTOR_SHIFT,
                    u64::from(sectors) << SECTOR_SHIFT,
                )
                .await
                .map_err(|e| err("discard", e))?;
            }
            Ok(0)
        }
        RequestKind::WriteZeroes(segs) => {
            for &(sector, sectors, flags) in segs {
                disk.write_zeroes(
                    ex,
                    sector << SECTOR_SHIFT,
                    u64::from(sectors) << SECTOR_SHIFT,
                    flags & WRITE_ZEROES_FLAG_UNMAP != 0,
                )
                .await
                .map_err(|e| err("write-zeroes", e))?;
            }
            Ok(0)
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

async fn run_request(
    ex: Rc<Executor>,
    shared: Rc<RefCell<Shared>>,
    disk: Rc<BlockFile>,
    head: u16,
    req: Request,
    id: [u8; VIRTIO_BLK_ID_BYTES],
) {
    let (mem, fixed) = {
        let s = shared.borrow();
        (s.mem.clone(), s.fixed)
    };
    let (status, written) = match execute(&ex, &disk, (&mem, fixed), &req, &id).await {
        Ok(n) => (VIRTIO_BLK_S_OK, n),
        Err((status, msg)) => {
            shared.borrow().log.warn(format_args!("{msg}"));
            (status, 0)
        }
    };
    let mut s = shared.borrow_mut();
    count(&s.stats, &req, status == VIRTIO_BLK_S_OK);
    let len = match mem.write_obj(status, req.status) {
        Ok(()) => written + 1,
        Err(_) => 0,
    };
    s.complete(head, len);
    s.inflight -= 1;
    drop(s);
    schedule_notify(&ex, &shared);
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
