//! The virtio-net device: configuration space, features, the queue layout
//! (RX/TX pairs, then the control queue) and starting and stopping the
//! queue tasks on the iothreads it was given.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use uring_backend::iothread::IoThread;
use uring_backend::net::tap::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use uring_backend::net::{Tap, TapError, VNET_HDR_LEN};
use virtio_queue::{Queue, QueueState};

use crate::vq::{QueueSet, QueueStart, ReturnedQueues, ServedQueue, SharedQueue};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::NetConfig;
use super::ctrl::{CtrlFeatures, RxFilter};
use super::{ctrlq, rx, tx};
use crate::device::{
    read_config_space, ActivateError, PauseError, QueueInit, VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::ratelimit::RateLimitedLog;
use crate::workers::{spread_over_iothreads, WorkerGuardToken};
use vmm::snapshot::{decode, encode, SnapshotError};

pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_CTRL_RX: u64 = 1 << 18;
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
pub const VIRTIO_NET_F_CTRL_MAC_ADDR: u64 = 1 << 23;
const VIRTIO_NET_S_LINK_UP: u16 = 1;
const CONFIG_SIZE: usize = 12;
/// The largest frame without segmentation offload: Ethernet header, 1500
/// bytes of payload and a VLAN tag.
const MAX_PLAIN_FRAME: u64 = 14 + 1500 + 4;
/// The largest frame with TSO: a 64 KiB IP packet plus headers.
const MAX_TSO_FRAME: u64 = 65_550;

/// Errors from creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetDeviceError {
    #[error("opening the TAP")]
    Tap(#[source] TapError),
    #[error("creating an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("the network device names iothread {index}, but there are only {count}")]
    NoSuchIothread { index: usize, count: usize },
}

/// Counters of one device (all queue pairs).
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames that did not fit the guest's buffers or were not frames.
    pub rx_dropped: AtomicU64,
    /// Frames the guest's MAC filter refused.
    pub rx_filtered: AtomicU64,
    pub rx_bad_chains: AtomicU64,
    /// TAP reads that found no frame (`EAGAIN`); the read is simply
    /// issued again.
    pub rx_eagain: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames refused before reaching the TAP (malformed, too long).
    pub tx_dropped: AtomicU64,
    /// Frames the TAP refused.
    pub tx_errors: AtomicU64,
    /// Of those, refused with `EAGAIN` (dropped, as a full queue drops).
    pub tx_eagain: AtomicU64,
    pub ctrl_errors: AtomicU64,
    /// Interrupts raised to the driver.
    pub interrupts: AtomicU64,
}

impl NetStats {
    /// One line of `key=value` counters.
    pub fn summary(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "rx_packets={} rx_bytes={} rx_dropped={} rx_filtered={} rx_bad_chains={} rx_eagain={} tx_packets={} tx_bytes={} tx_dropped={} tx_errors={} tx_eagain={} ctrl_errors={} interrupts={}",
            g(&self.rx_packets),
            g(&self.rx_bytes),
            g(&self.rx_dropped),
            g(&self.rx_filtered),
            g(&self.rx_bad_chains),
            g(&self.rx_eagain),
            g(&self.tx_packets),
            g(&self.tx_bytes),
            g(&self.tx_dropped),
            g(&self.tx_errors),
            g(&self.tx_eagain),
            g(&self.ctrl_errors),
            g(&self.interrupts),
        )
    }

    /// Every counter by name, in a fixed order.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("rx_frames", g(&self.rx_packets)),
            ("rx_bytes", g(&self.rx_bytes)),
            ("rx_dropped", g(&self.rx_dropped)),
            ("rx_filtered", g(&self.rx_filtered)),
            ("rx_bad_chains", g(&self.rx_bad_chains)),
            ("rx_eagain", g(&self.rx_eagain)),
            ("tx_frames", g(&self.tx_packets)),
            ("tx_bytes", g(&self.tx_bytes)),
            ("tx_dropped", g(&self.tx_dropped)),
            ("tx_errors", g(&self.tx_errors)),
            ("tx_eagain", g(&self.tx_eagain)),
            ("ctrl_errors", g(&self.ctrl_errors)),
            ("interrupts", g(&self.interrupts)),
        ]
    }
}

/// State every queue task of a device shares.
pub struct NetShared {
    pub(super) tap: Tap,
    pub(super) filter: Mutex<RxFilter>,
    /// The filter accepts everything (promiscuous): RX skips it.
    pub(super) filter_open: AtomicBool,
    pub(super) active_pairs: AtomicU16,
    /// The queue set's stop flag.
    pub(super) stop: Arc<AtomicBool>,
    pub(super) tap_dead: AtomicBool,
    /// One per pair: wakes its RX task (stop, or queue pairs changed).
    pub(super) wakes: Vec<Arc<EventFd>>,
    pub(super) stats: Arc<NetStats>,
    pub(super) log: Arc<RateLimitedLog>,
}

impl NetShared {
    /// The TAP is gone (deleted, or failing for good): say so once; the
    /// VM keeps running and the device drops what it cannot send.
    pub(super) fn tap_gone(&self, pair: usize, e: &std::io::Error) {
        if !self.tap_dead.swap(true, Ordering::SeqCst) {
            log::error!(
                "{}: TAP {} is gone (queue {pair}: {e}); the network device stays up without a link, dropping frames",
                self.log.name(),
                self.tap.name()
            );
        }
    }

    /// Makes `pairs` queue pairs active: attaches their TAP queues and
    /// detaches the others, then wakes every RX task to look again.
    pub(super) fn set_active_pairs(&self, pairs: u16) -> Result<(), TapError> {
        for i in 0..self.tap.queue_count() {
            self.tap.set_queue_enabled(i, i < usize::from(pairs))?;
        }
        self.active_pairs.store(pairs, Ordering::SeqCst);
        for w in &self.wakes {
            let _ = w.write(1);
        }
        Ok(())
    }

    pub fn stats(&self) -> &NetStats {
        &self.stats
    }
}

/// A queue as handed over on activation, before its task wraps it.
pub(super) struct QueueParts {
    pub index: u16,
    pub queue: Queue,
    pub interrupt: Option<EventFd>,
    pub mem: GuestMemoryMmap,
    pub event_idx: bool,
    pub stats: Arc<NetStats>,
}

impl QueueParts {
    /// The queue with its interrupt, as its task uses it.
    pub(super) fn into_served(self, log: Arc<RateLimitedLog>) -> SharedQueue {
        ServedQueue::shared(crate::vq::QueueParts {
            index: self.index,
            queue: self.queue,
            event_idx: self.event_idx,
            mem: self.mem,
            interrupt: self.interrupt,
            log,
            counter: self.stats,
        })
    }
}

impl crate::vq::InterruptCounter for NetStats {
    fn interrupt_raised(&self) {
        self.interrupts.fetch_add(1, Ordering::Relaxed);
    }
}

/// What one queue task gets.
pub(super) struct PairCtx {
    pub guard: WorkerGuardToken,
    pub shared: Arc<NetShared>,
    pub pair: usize,
    pub q: QueueParts,
    pub kick: EventFd,
    pub mrg: bool,
    /// Largest frame plus its header, in this queue's direction.
    pub max_frame: u64,
    pub ctrl: CtrlFeatures,
    /// Receives the queue, in its final state, when the task stops.
    pub returned: ReturnedQueues,
}

/// How one queue is served: kept for restarting it after a pause.
struct QueuePlan {
    index: u16,
    role: Role,
    pair: usize,
    max_frame: u64,
}

struct Active {
    shared: Arc<NetShared>,
    set: QueueSet,
    mem: GuestMemoryMmap,
    features: u64,
    ctrl: CtrlFeatures,
    plans: Vec<QueuePlan>,
}

/// What a snapshot keeps of a virtio-net device: the MAC the driver
/// sees, the features offered, the link status, and what the driver set
/// through the control queue (filters, queue pairs in use).
#[derive(serde::Serialize, serde::Deserialize)]
struct NetSection {
    mac: [u8; 6],
    features: u64,
    queue_pairs: u16,
    link_status: u16,
    /// Present when the device was active.
    driver: Option<NetDriverState>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NetDriverState {
    filter_mac: [u8; 6],
    promisc: bool,
    allmulti: bool,
    alluni: bool,
    unicast: Vec<[u8; 6]>,
    multicast: Vec<[u8; 6]>,
    filter_open: bool,
    active_pairs: u16,
}

/// A virtio-net device over a TAP.
pub struct NetDevice {
    name: String,
    config: NetConfig,
    mac: [u8; 6],
    tap: Tap,
    features: u64,
    config_space: [u8; CONFIG_SIZE],
    pair_threads: Vec<Arc<IoThread>>,
    active: Option<Active>,
    log: Arc<RateLimitedLog>,
    /// Counters over every activation.
    stats: Arc<NetStats>,
}

/// A locally administered unicast MAC, different per device and run.
pub fn random_mac() -> [u8; 6] {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id();
        bytes = t.to_le_bytes();
    }
    [0x52, 0x54, bytes[0], bytes[1], bytes[2], bytes[3]]
}

impl NetDevice {
    /// Opens the TAP; `iothreads` are all the VM's iothreads.
    pub fn new(
        name: &str,
        config: &NetConfig,
        iothreads: &[Arc<IoThread>],
    ) -> Result<NetDevice, NetDeviceError> {
        let pairs = usize::from(config.queue_pairs);
        let tap = Tap::open(&config.tap, pairs).map_err(NetDeviceError::Tap)?;
        log::info!("{name}: TAP {} with {pairs} queue(s)", tap.name());
        let pair_threads = spread_over_iothreads(&config.iothreads, iothreads, pairs)
            .map_err(|(index, count)| NetDeviceError::NoSuchIothread { index, count })?;
        let mut features = VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_MRG_RXBUF
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_CTRL_VQ
            | VIRTIO_NET_F_CTRL_RX
            | VIRTIO_NET_F_CTRL_MAC_ADDR;
        if pairs > 1 {
            features |= VIRTIO_NET_F_MQ;
        }
        let mac = config.mac.unwrap_or_else(random_mac);
        let mut dev = NetDevice {
            name: name.into(),
            config: config.clone(),
            mac,
            tap,
            features,
            config_space: [0; CONFIG_SIZE],
            pair_threads,
            active: None,
            log: Arc::new(RateLimitedLog::new(name)),
            stats: Arc::new(NetStats::default()),
        };
        dev.build_config_space();
        Ok(dev)
    }

    fn build_config_space(&mut self) {
        let c = &mut self.config_space;
        c[0..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        c[8..10].copy_from_slice(&self.config.queue_pairs.to_le_bytes());
    }

    /// The TAP's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's counters, readable while it runs.
    pub fn stats_handle(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    fn pairs(&self) -> usize {
        usize::from(self.config.queue_pairs)
    }

    fn start(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<QueueInit>,
    ) -> Result<(Active, Vec<QueueStart>), ActivateError> {
        let pairs = self.pairs();
        let mq = features & VIRTIO_NET_F_MQ != 0;
        let ctrl_index = if mq { 2 * pairs } else { 2 };
        let has = |f: u64| features & f != 0;
        let mut offload = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            offload |= TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                offload |= TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                offload |= TUN_F_TSO6;
            }
        }
        // A TAP that went away leaves the device up without a link.
        let mut tap_ok = true;
        if let Err(e) = self.tap.set_offload(offload) {
            log::error!("{}: {e}; the device runs without a link", self.name);
            tap_ok = false;
        }
        let rx_max = VNET_HDR_LEN as u64
            + if offload & (TUN_F_TSO4 | TUN_F_TSO6) != 0 {
                MAX_TSO_FRAME
            } else {
                MAX_PLAIN_FRAME
            };
        let tx_max = VNET_HDR_LEN as u64
            + if has(VIRTIO_NET_F_HOST_TSO4) || has(VIRTIO_NET_F_HOST_TSO6) {
                MAX_TSO_FRAME
            } else {
                MAX_PLAIN_FRAME
            };
        let wakes = (0..pairs)
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ActivateError::EventFd)?;
        let mut plans = Vec::with_capacity(queues.len());
        for q in &queues {
            let index = usize::from(q.index);
            let (pair, role) = if index == ctrl_index && has(VIRTIO_NET_F_CTRL_VQ) {
                (0, Role::Ctrl)
            } else if index < 2 * if mq { pairs } else { 1 } {
                (index / 2, if index % 2 == 0 { Role::Rx } else { Role::Tx })
            } else {
                self.log
                    .warn(format_args!("queue {index} has no use; left idle"));
                continue;
            };
            plans.push(QueuePlan {
                index: q.index,
                role,
                pair,
                max_frame: if role == Role::Tx { tx_max } else { rx_max },
            });
        }
        let (set, starts) = QueueSet::new(queues, |i| plans.iter().any(|p| p.index == i))?;
        let filter = RxFilter::new(self.mac);
        let shared = Arc::new(NetShared {
            tap: self.tap.clone(),
            filter: Mutex::new(filter),
            filter_open: AtomicBool::new(true),
            active_pairs: AtomicU16::new(1),
            stop: set.stop.clone(),
            tap_dead: AtomicBool::new(!tap_ok),
            wakes,
            stats: self.stats.clone(),
            log: self.log.clone(),
        });
        // One pair until the driver asks for more (virtio 1.2 §5.1.6.5.5).
        if let Err(e) = shared.set_active_pairs(1) {
            if tap_ok {
                log::error!("{}: {e}; the device runs without a link", self.name);
            }
            shared.tap_dead.store(true, Ordering::SeqCst);
        }
        let ctrl = CtrlFeatures {
            rx: has(VIRTIO_NET_F_CTRL_RX),
            mac_addr: has(VIRTIO_NET_F_CTRL_MAC_ADDR),
            mq,
            max_pairs: self.config.queue_pairs,
        };
        let active = Active {
            shared,
            set,
            mem,
            features,
            ctrl,
            plans,
        };
        Ok((active, starts))
    }

    fn driver_state(&self) -> Option<NetDriverState> {
        let a = self.active.as_ref()?;
        let f = a.shared.filter.lock().unwrap_or_else(|e| e.into_inner());
        Some(NetDriverState {
            filter_mac: f.mac,
            promisc: f.promisc,
            allmulti: f.allmulti,
            alluni: f.alluni,
            unicast: f.unicast.clone(),
            multicast: f.multicast.clone(),
            filter_open: a.shared.filter_open.load(Ordering::SeqCst),
            active_pairs: a.shared.active_pairs.load(Ordering::SeqCst),
        })
    }

    /// Starts the task of each queue in `queues` on its pair's iothread.
    fn spawn_tasks(&self, active: &Active, queues: Vec<QueueStart>) {
        let has = |f: u64| active.features & f != 0;
        for (index, queue, kick, interrupt) in queues {
            let Some(plan) = active.plans.iter().find(|p| p.index == index) else {
                continue;
            };
            let (pair, role) = (plan.pair, plan.role);
            let ctx = PairCtx {
                guard: active.set.worker(),
                shared: active.shared.clone(),
                pair,
                q: QueueParts {
                    index,
                    queue,
                    interrupt,
                    mem: active.mem.clone(),
                    event_idx: has(VIRTIO_RING_F_EVENT_IDX),
                    stats: self.stats.clone(),
                },
                kick,
                mrg: has(VIRTIO_NET_F_MRG_RXBUF),
                max_frame: plan.max_frame,
                ctrl: active.ctrl,
                returned: active.set.returned(),
            };
            let thread = &self.pair_threads[pair];
            let wake = active.shared.wakes[pair].clone();
            // A job that never runs drops its context, which counts the
            // worker finished.
            thread.run_on(Box::new(move |ex| {
                let ex2 = ex.clone();
                match role {
                    Role::Rx => ex.spawn(rx::serve_rx(ex2, ctx, wake)),
                    Role::Tx => ex.spawn(tx::serve_tx(ex2, ctx)),
                    Role::Ctrl => ex.spawn(ctrlq::serve_ctrl(ex2, ctx)),
                }
            }));
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Rx,
    Tx,
    Ctrl,
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.config.queue_size; 2 * self.pairs() + 1]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for VERSION_1 drivers (they set it through
        // the control queue); nothing else is writable.
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
        if self.active.is_some() {
            self.reset();
        }
        let (active, starts) = self.start(mem, features, queues)?;
        self.spawn_tasks(&active, starts);
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
            &NetSection {
                mac: self.mac,
                features: self.features,
                queue_pairs: self.config.queue_pairs,
                link_status: u16::from_le_bytes([self.config_space[6], self.config_space[7]]),
                driver: self.driver_state(),
            },
        )
    }

    fn restore_state(
        &mut self,
        state: &[u8],
        active: Option<(GuestMemoryMmap, u64, Vec<QueueInit>)>,
    ) -> Result<(), SnapshotError> {
        let s: NetSection = decode(&self.name, state)?;
        if (s.features, s.queue_pairs) != (self.features, self.config.queue_pairs) {
            return Err(SnapshotError::mismatch(
                self.name.clone(),
                format!(
                    "saved with features {:#x} and {} queue pairs, configured with {:#x} and {}",
                    s.features, s.queue_pairs, self.features, self.config.queue_pairs
                ),
            ));
        }
        // The guest knows the device by the saved MAC, whatever this
        // configuration would have picked.
        self.mac = s.mac;
        self.build_config_space();
        self.config_space[6..8].copy_from_slice(&s.link_status.to_le_bytes());
        let (Some((mem, features, queues)), Some(d)) = (active, s.driver) else {
            return Ok(());
        };
        let name = self.name.clone();
        let apply = |detail: String| SnapshotError::Apply {
            what: name.clone(),
            detail,
        };
        let (a, starts) = self
            .start(mem, features, queues)
            .map_err(|e| apply(e.to_string()))?;
        {
            let mut f = a.shared.filter.lock().unwrap_or_else(|e| e.into_inner());
            f.mac = d.filter_mac;
            f.promisc = d.promisc;
            f.allmulti = d.allmulti;
            f.alluni = d.alluni;
            f.unicast = d.unicast;
            f.multicast = d.multicast;
        }
        a.shared.filter_open.store(d.filter_open, Ordering::SeqCst);
        if d.active_pairs == 0 || d.active_pairs > self.config.queue_pairs {
            return Err(SnapshotError::mismatch(
                self.name.clone(),
                format!("{} queue pairs in use", d.active_pairs),
            ));
        }
        if let Err(e) = a.shared.set_active_pairs(d.active_pairs) {
            log::error!("{}: {e}; the device runs without a link", self.name);
            a.shared.tap_dead.store(true, Ordering::SeqCst);
        }
        let mut a = a;
        // Paused: the tasks start on resume, at these positions.
        a.set.start_paused(&starts);
        self.active = Some(a);
        Ok(())
    }

    fn reset(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        active.set.stop_all(&active.shared.wakes);
        log::debug!("{}: reset, all queue tasks stopped", self.name);
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        if let Some(active) = &mut self.active {
            if active.set.pause(&active.shared.wakes) {
                log::debug!("{}: paused, frames in flight completed", self.name);
            }
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        let Some(mut active) = self.active.take() else {
            return Ok(());
        };
        // The same shared state (filters, queue pairs in use) carries on.
        let result = match active.set.resume() {
            Ok(Some(starts)) => {
                self.spawn_tasks(&active, starts);
                log::debug!("{}: resumed", self.name);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        self.active = Some(active);
        result
    }
}

impl Drop for NetDevice {
    fn drop(&mut self) {
        self.reset();
    }
}
