//! The virtio-blk device: configuration space, features, and starting and
//! stopping one worker per queue on the iothreads it was given.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use uring_backend::block::{BlockFile, BlockOpenOptions};
use uring_backend::iothread::IoThread;
use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::config::DiskConfig;
use super::request::{RequestLimits, MAX_DISCARD_SEGMENTS, SECTOR_SHIFT, VIRTIO_BLK_ID_BYTES};
use super::stats::BlockStats;
use super::worker::{serve_queue, QueueCtx};
use crate::device::{
    read_config_space, ActivateError, PauseError, QueueInit, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::ratelimit::RateLimitedLog;
use crate::workers::{spread_over_iothreads, WorkerCount};
use vmm::snapshot::{decode, encode, SnapshotError};

pub const VIRTIO_ID_BLOCK: u32 = 2;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const CONFIG_SIZE: usize = 0x3c;

/// Errors from creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockDeviceError {
    #[error("opening disk {path}")]
    Open {
        path: String,
        #[source]
        source: uring_backend::block::BlockError,
    },
    #[error("disk {path} is smaller than one 512-byte sector")]
    TooSmall { path: String },
    #[error("disk {path} names iothread {index}, but there are only {count}")]
    NoSuchIothread {
        path: String,
        index: usize,
        count: usize,
    },
}

/// Where each queue worker leaves its queue when it stops.
pub(super) type ReturnedQueues = Arc<Mutex<Vec<(u16, QueueState)>>>;

struct Active {
    stop: Arc<AtomicBool>,
    workers: Arc<WorkerCount>,
    kicks: Vec<EventFd>,
    returned: ReturnedQueues,
    mem: GuestMemoryMmap,
    features: u64,
    /// Each served queue's kick and interrupt, to restart it after a pause.
    wiring: Vec<(u16, EventFd, Option<EventFd>)>,
    /// While paused: each stopped queue where its worker left it.
    paused: Option<Vec<(u16, QueueState)>>,
}

/// A queue to serve: index, the queue, its kick and its interrupt.
type QueueStart = (u16, Queue, EventFd, Option<EventFd>);

/// What a snapshot keeps of a virtio-blk device: its configuration as the
/// driver saw it. The restored device must present the same (a disk of
/// another size is refused).
#[derive(serde::Serialize, serde::Deserialize)]
struct BlkSection {
    capacity: u64,
    features: u64,
    queues: u16,
    queue_size: u16,
    readonly: bool,
    id: Vec<u8>,
}

/// A virtio-blk device over a raw file or block device.
pub struct BlockDevice {
    name: String,
    disk: BlockFile,
    config: DiskConfig,
    capacity: u64,
    features: u64,
    config_space: [u8; CONFIG_SIZE],
    /// Which iothread serves each queue.
    queue_threads: Vec<Arc<IoThread>>,
    active: Option<Active>,
    log: Arc<RateLimitedLog>,
    stats: Arc<BlockStats>,
}

impl BlockDevice {
    /// Opens the disk; `iothreads` are all the VM's iothreads, and the
    /// disk's `iothread=` list (or all of them) serves its queues in turn.
    pub fn new(
        name: &str,
        config: &DiskConfig,
        iothreads: &[Arc<IoThread>],
    ) -> Result<BlockDevice, BlockDeviceError> {
        let path = config.path.display().to_string();
        let disk = BlockFile::open(
            &config.path,
            BlockOpenOptions {
                readonly: config.readonly,
                direct: config.direct,
            },
        )
        .map_err(|source| BlockDeviceError::Open {
            path: path.clone(),
            source,
        })?;
        let capacity = disk.size() >> SECTOR_SHIFT;
        if capacity == 0 {
            return Err(BlockDeviceError::TooSmall { path });
        }
        let queue_threads =
            spread_over_iothreads(&config.iothreads, iothreads, usize::from(config.queues))
                .map_err(|(index, count)| BlockDeviceError::NoSuchIothread {
                    path,
                    index,
                    count,
                })?;
        let discard = disk.supports_discard();
        let mut features = VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_WRITE_ZEROES;
        if config.queues > 1 {
            features |= VIRTIO_BLK_F_MQ;
        }
        if config.readonly {
            features |= VIRTIO_BLK_F_RO;
        }
        if discard {
            features |= VIRTIO_BLK_F_DISCARD;
        }
        let mut dev = BlockDevice {
            name: name.into(),
            disk,
            config: config.clone(),
            capacity,
            features,
            config_space: [0; CONFIG_SIZE],
            queue_threads,
            active: None,
            log: Arc::new(RateLimitedLog::new(name)),
            stats: Arc::new(BlockStats::default()),
        };
        dev.build_config_space();
        Ok(dev)
    }

    fn build_config_space(&mut self) {
        let c = &mut self.config_space;
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0x00, &self.capacity.to_le_bytes());
        // seg_max: a chain holds the header and status besides the data.
        put(0x0c, &u32::from(self.config.queue_size - 2).to_le_bytes());
        put(0x14, &512u32.to_le_bytes());
        put(0x22, &self.config.queues.to_le_bytes());
        let max_sectors = u32::MAX >> SECTOR_SHIFT;
        put(0x24, &max_sectors.to_le_bytes());
        put(0x28, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(0x2c, &1u32.to_le_bytes());
        put(0x30, &max_sectors.to_le_bytes());
        put(0x34, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(0x38, &[1]);
    }

    fn limits(&self) -> RequestLimits {
        RequestLimits {
            capacity_sectors: self.capacity,
            readonly: self.config.readonly,
            discard: self.features & VIRTIO_BLK_F_DISCARD != 0,
            write_zeroes: true,
        }
    }

    fn id(&self) -> [u8; VIRTIO_BLK_ID_BYTES] {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        if let Some(s) = &self.config.serial {
            let n = s.len().min(VIRTIO_BLK_ID_BYTES);
            id[..n].copy_from_slice(&s.as_bytes()[..n]);
        }
        id
    }

    /// The device's counters, readable while it runs.
    pub fn stats_handle(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    /// Starts one worker per queue in `queues` on its iothread.
    fn spawn_workers(&self, active: &Active, queues: Vec<QueueStart>) {
        for (index, queue, kick, interrupt) in queues {
            let Some(thread) = self.queue_threads.get(usize::from(index)).cloned() else {
                continue;
            };
            let ctx = QueueCtx {
                index,
                guard: QueueCtx::worker_guard(&active.workers),
                queue,
                kick,
                interrupt,
                mem: active.mem.clone(),
                disk: self.disk.clone(),
                limits: self.limits(),
                id: self.id(),
                event_idx: active.features & VIRTIO_RING_F_EVENT_IDX != 0,
                fixed_buffers: self.config.fixed_buffers,
                stop: active.stop.clone(),
                log: self.log.clone(),
                returned: active.returned.clone(),
                stats: self.stats.clone(),
            };
            // If the job never runs (iothread gone), dropping it drops the
            // context, which marks the worker finished.
            thread.run_on(Box::new(move |ex| {
                let ex2 = ex.clone();
                ex.spawn(serve_queue(ex2, ctx));
            }));
        }
    }

    /// Stops every worker of `active` (in-flight requests complete first)
    /// and takes the queues they hand back, by index.
    fn stop_workers(&self, active: &Active) -> Vec<(u16, QueueState)> {
        active.stop.store(true, Ordering::SeqCst);
        for k in &active.kicks {
            let _ = k.write(1);
        }
        active.workers.wait_idle();
        let mut queues =
            std::mem::take(&mut *active.returned.lock().unwrap_or_else(|e| e.into_inner()));
        queues.sort_by_key(|(index, _)| *index);
        queues
    }

    /// Everything an activation needs before its workers start: the
    /// active state and each queue to serve.
    fn prepare(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<QueueInit>,
    ) -> Result<(Active, Vec<QueueStart>), ActivateError> {
        if self.active.is_some() {
            self.reset();
        }
        let mut active = Active {
            stop: Arc::new(AtomicBool::new(false)),
            workers: Arc::new(WorkerCount::default()),
            kicks: Vec::with_capacity(queues.len()),
            returned: ReturnedQueues::default(),
            mem,
            features,
            wiring: Vec::with_capacity(queues.len()),
            paused: None,
        };
        let mut starts = Vec::with_capacity(queues.len());
        for q in queues {
            let dup = |e: &EventFd| e.try_clone().map_err(ActivateError::EventFd);
            active.kicks.push(dup(&q.kick)?);
            let interrupt = q.interrupt.as_ref().map(dup).transpose()?;
            active.wiring.push((q.index, dup(&q.kick)?, interrupt));
            starts.push((q.index, q.queue, q.kick, q.interrupt));
        }
        Ok((active, starts))
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The open disk.
    pub fn disk(&self) -> &BlockFile {
        &self.disk
    }

    /// Stops serving like [`VirtioDevice::reset`] (in-flight requests
    /// complete first) and returns each stopped queue, by index, in the
    /// state its worker left it: `next_avail` and `next_used` are where a
    /// later activation (or a vhost-user front-end) must resume. A queue
    /// whose worker never ran is missing; its state is what was handed in.
    pub fn stop_queues(&mut self) -> Vec<(u16, QueueState)> {
        let Some(mut active) = self.active.take() else {
            return Vec::new();
        };
        // A paused device's workers are stopped already.
        let queues = match active.paused.take() {
            Some(queues) => queues,
            None => self.stop_workers(&active),
        };
        log::debug!("{}: reset, all queue workers stopped", self.name);
        queues
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.config.queue_size; usize::from(self.config.queues)]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` (0x20) is writable in virtio-blk, and only with
        // VIRTIO_BLK_F_CONFIG_WCE, which we do not offer: ringvm is always
        // write-through to its backend, with flushes made durable.
        self.log.warn(format_args!(
            "ignored write of {} bytes to config offset {offset:#x}",
            data.len()
        ));
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<QueueInit>,
    ) -> Result<(), ActivateError> {
        let (active, starts) = self.prepare(mem, features, queues)?;
        self.spawn_workers(&active, starts);
        self.active = Some(active);
        Ok(())
    }

    fn paused_queues(&self) -> Vec<(u16, QueueState)> {
        self.active
            .as_ref()
            .and_then(|a| a.paused.clone())
            .unwrap_or_default()
    }

    fn save_state(&self) -> Result<Vec<u8>, SnapshotError> {
        encode(
            &self.name,
            &BlkSection {
                capacity: self.capacity,
                features: self.features,
                queues: self.config.queues,
                queue_size: self.config.queue_size,
                readonly: self.config.readonly,
                id: self.id().to_vec(),
            },
        )
    }

    fn restore_state(
        &mut self,
        state: &[u8],
        active: Option<(GuestMemoryMmap, u64, Vec<QueueInit>)>,
    ) -> Result<(), SnapshotError> {
        let s: BlkSection = decode(&self.name, state)?;
        let mine = (
            self.capacity,
            self.features,
            self.config.queues,
            self.config.queue_size,
            self.config.readonly,
        );
        let saved = (s.capacity, s.features, s.queues, s.queue_size, s.readonly);
        if mine != saved {
            return Err(SnapshotError::mismatch(
                self.name.clone(),
                format!(
                    "saved as (capacity {} sectors, features {:#x}, {} queues of {}, readonly {}), \
                     the configured disk is (capacity {} sectors, features {:#x}, {} queues of {}, readonly {})",
                    saved.0, saved.1, saved.2, saved.3, saved.4, mine.0, mine.1, mine.2, mine.3, mine.4
                ),
            ));
        }
        if let Some((mem, features, queues)) = active {
            let (mut a, starts) =
                self.prepare(mem, features, queues)
                    .map_err(|e| SnapshotError::Apply {
                        what: self.name.clone(),
                        detail: e.to_string(),
                    })?;
            // Paused: the workers start on resume, at these positions.
            a.paused = Some(starts.iter().map(|(i, q, _, _)| (*i, q.state())).collect());
            self.active = Some(a);
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        let Some(active) = &self.active else {
            return Ok(());
        };
        if active.paused.is_some() {
            return Ok(());
        }
        let queues = self.stop_workers(active);
        log::debug!("{}: paused, in-flight requests completed", self.name);
        if let Some(active) = &mut self.active {
            active.paused = Some(queues);
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        let Some(active) = &mut self.active else {
            return Ok(());
        };
        let Some(queues) = active.paused.take() else {
            return Ok(());
        };
        let mut starts = Vec::with_capacity(queues.len());
        for (index, state) in &queues {
            let wiring = active.wiring.iter().find(|(i, _, _)| i == index);
            let Some((_, kick, interrupt)) = wiring else {
                continue;
            };
            let queue = Queue::try_from(*state).map_err(|source| PauseError::Queue {
                index: *index,
                source,
            });
            let dup = |e: &EventFd| e.try_clone().map_err(PauseError::EventFd);
            let started = queue.and_then(|q| {
                Ok((
                    *index,
                    q,
                    dup(kick)?,
                    interrupt.as_ref().map(dup).transpose()?,
                ))
            });
            match started {
                Ok(s) => starts.push(s),
                Err(e) => {
                    active.paused = Some(queues);
                    return Err(e);
                }
            }
        }
        active.stop = Arc::new(AtomicBool::new(false));
        // Requests the driver posted before the pause but no worker took
        // yet: a kick makes each new worker look at its avail ring.
        for (_, kick, _) in &active.wiring {
            let _ = kick.write(1);
        }
        let active = self.active.take();
        if let Some(active) = active {
            self.spawn_workers(&active, starts);
            self.active = Some(active);
        }
        log::debug!("{}: resumed", self.name);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_queues();
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        self.reset();
    }
}
