//! The virtio-blk device: configuration space, features, and starting and
//! stopping one worker per queue on the iothreads it was given.

use std::sync::Arc;

use uring_backend::block::{BlockFile, BlockOpenOptions};
use uring_backend::iothread::IoThread;
use virtio_queue::QueueState;
use vm_memory::GuestMemoryMmap;

use super::config::DiskConfig;
use super::request::{RequestLimits, MAX_DISCARD_SEGMENTS, SECTOR_SHIFT, VIRTIO_BLK_ID_BYTES};
use super::stats::BlockStats;
use super::worker::{serve_queue, QueueCtx};
use crate::device::{
    read_config_space, ActivateError, PauseError, QueueInit, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::ratelimit::RateLimitedLog;
use crate::vq::{QueueSet, QueueStart};
use crate::workers::spread_over_iothreads;
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

struct Active {
    set: QueueSet,
    mem: GuestMemoryMmap,
    features: u64,
}

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
                engine: config.engine,
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
                guard: active.set.worker(),
                queue,
                kick,
                interrupt,
                mem: active.mem.clone(),
                disk: self.disk.clone(),
                limits: self.limits(),
                id: self.id(),
                event_idx: active.features & VIRTIO_RING_F_EVENT_IDX != 0,
                fixed_buffers: self.config.fixed_buffers,
                stop: active.set.stop.clone(),
                log: self.log.clone(),
                returned: active.set.returned(),
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
        let (set, starts) = QueueSet::new(queues, |_| true)?;
        Ok((Active { set, mem, features }, starts))
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
        let queues = active.set.stop_all(&[]);
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
            .map(|a| a.set.paused_queues())
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
            a.set.start_paused(&starts);
            self.active = Some(a);
        }
        Ok(())
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        if let Some(active) = &mut self.active {
            if active.set.pause(&[]) {
                log::debug!("{}: paused, in-flight requests completed", self.name);
            }
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        let Some(mut active) = self.active.take() else {
            return Ok(());
        };
        let resumed = active.set.resume();
        let result = match resumed {
            Ok(Some(starts)) => {
                self.spawn_workers(&active, starts);
                log::debug!("{}: resumed", self.name);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        self.active = Some(active);
        result
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
