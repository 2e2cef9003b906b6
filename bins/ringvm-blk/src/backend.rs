//! The vhost-user side of `ringvm-blk`: one [`Session`] per front-end
//! connection, driving the same [`BlockDevice`] that `ringvm run` puts
//! behind virtio-pci.
//!
//! # How the vhost-user lifecycle maps onto `BlockDevice`
//!
//! vhost-user-backend parses the messages, maps the front-end's memory
//! table (`SET_MEM_TABLE`), translates ring addresses (`SET_VRING_ADDR`) and
//! keeps one `VringState` per queue. It has no hook for "a ring started" or
//! "a ring's call fd changed", so the vrings are our own type, [`BlkVring`]:
//! it wraps vhost-user-backend's `VringRwLock`, keeps duplicates of the kick
//! and call eventfds, and after each change of kick, call, enable or ready
//! state asks its session to [`Session::sync`].
//!
//! `sync` computes the set of *live* queues (ready, enabled, with a kick fd)
//! and, when that set, any of their eventfds, the memory table or the
//! negotiated features differ from what the device runs with, restarts the
//! device: `BlockDevice::stop_queues` (the virtio reset; in-flight requests
//! complete first) hands back each queue's `next_avail`/`next_used`, which
//! go back into the vrings, and `BlockDevice::activate` starts the live
//! queues again with `QueueInit { queue, kick, interrupt: call }` and the
//! mapped memory. Each restarted kick fd gets one write so that requests
//! whose kick a stopping worker consumed are still seen.
//!
//! So `GET_VRING_BASE` (which marks the ring not ready before it reads
//! `next_avail`) stops the queue and reports where the worker stopped;
//! `RESET_DEVICE` (which disables every ring) and a disconnect
//! ([`Session::disconnect`]) stop everything.
//!
//! # Who reads the kick eventfds
//!
//! Only the io_uring queue workers do, exactly as in the VMM: one
//! outstanding read per queue on its iothread. vhost-user-backend's epoll
//! worker threads are not used at all: [`VhostUserBackend::queues_per_thread`]
//! returns no thread, so no kick fd is ever registered with epoll (a second
//! reader would steal kicks from the worker) and `handle_event` is never
//! called.
//!
//! The vrings are created inside `VhostUserDaemon::new`, which gives them
//! nothing but the memory handle; [`Session::new_daemon`] tells them their
//! session through a thread-local set for the duration of that call.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLockReadGuard, RwLockWriteGuard, Weak};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{
    VhostUserBackend, VhostUserDaemon, VringRwLock, VringState, VringStateGuard,
    VringStateMutGuard, VringT,
};
use virtio::blk::BlockDevice;
use virtio::device::{QueueInit, VIRTIO_F_VERSION_1};
use virtio::VirtioDevice;
use virtio_queue::{Error as QueueError, Queue, QueueT};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// The guest memory handle vhost-user-backend shares with the vrings.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

/// The largest config read a front-end may ask for (vhost-user's limit).
const MAX_CONFIG_READ: u32 = 256;

thread_local! {
    /// The session whose daemon is being created on this thread.
    static CREATING: RefCell<Option<Arc<Session>>> = const { RefCell::new(None) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Duplicates of the eventfds the front-end gave for one ring.
#[derive(Default)]
struct RingFds {
    kick: Option<File>,
    call: Option<File>,
}

/// A vhost-user-backend vring that tells its session about changes.
#[derive(Clone)]
pub struct BlkVring {
    inner: VringRwLock<Mem>,
    fds: Arc<Mutex<RingFds>>,
    /// Bumped whenever the kick or call fd changes.
    generation: Arc<AtomicU64>,
    session: Weak<Session>,
}

impl BlkVring {
    fn changed(&self) {
        if let Some(session) = self.session.upgrade() {
            session.sync();
        }
    }

    fn dup(file: &Option<File>, what: &str) -> Option<File> {
        let f = file.as_ref()?;
        match f.try_clone() {
            Ok(d) => Some(d),
            Err(e) => {
                log::error!("duplicating the {what} fd: {e}");
                None
            }
        }
    }

    fn live(&self) -> bool {
        let s = self.inner.get_ref();
        s.get_queue().ready() && s.is_enabled() && s.get_kick().is_some()
    }

    /// Where the queue resumes: written back after its worker stopped.
    fn resume_at(&self, next_avail: u16, next_used: u16) {
        let mut s = self.inner.get_mut();
        let q = s.get_queue_mut();
        q.set_next_avail(next_avail);
        q.set_next_used(next_used);
    }

    /// The queue and its eventfds, as the device takes them.
    fn queue_init(&self, index: u16, mem: &GuestMemoryMmap) -> Result<QueueInit, String> {
        let queue = Queue::try_from(self.inner.get_ref().get_queue().state())
            .map_err(|e| format!("queue {index}: {e}"))?;
        if !queue.is_valid(mem) {
            return Err(format!(
                "queue {index}: its rings do not lie in the shared memory"
            ));
        }
        let fds = lock(&self.fds);
        let kick =
            Self::dup(&fds.kick, "kick").ok_or_else(|| format!("queue {index}: no kick fd"))?;
        let call = Self::dup(&fds.call, "call");
        Ok(QueueInit {
            index,
            queue,
            kick: into_eventfd(kick),
            interrupt: call.map(into_eventfd),
        })
    }
}

fn into_eventfd(f: File) -> EventFd {
    // A non-eventfd from the front-end only makes reads and writes of it
    // fail, which the worker reports; nothing is memory-unsafe.
    // SAFETY: `into_raw_fd` hands over the fd's only owner to the EventFd.
    unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }
}

impl<'a> VringStateGuard<'a, Mem> for BlkVring {
    type G = RwLockReadGuard<'a, VringState<Mem>>;
}

impl<'a> VringStateMutGuard<'a, Mem> for BlkVring {
    type G = RwLockWriteGuard<'a, VringState<Mem>>;
}

impl VringT<Mem> for BlkVring {
    fn new(mem: Mem, max_queue_size: u16) -> Result<Self, QueueError> {
        let inner = <VringRwLock<Mem> as VringT<Mem>>::new(mem, max_queue_size)?;
        let session = CREATING.with(|c| c.borrow().clone());
        let vring = BlkVring {
            inner,
            fds: Arc::default(),
            generation: Arc::default(),
            session: session.as_ref().map(Arc::downgrade).unwrap_or_default(),
        };
        match session {
            Some(s) => lock(&s.state).vrings.push(vring.clone()),
            None => log::error!("a vring was created outside a session; it will not run"),
        }
        Ok(vring)
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, Mem>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Mem>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled);
        self.changed();
    }

    fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), QueueError> {
        self.inner.set_queue_info(desc, avail, used)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready);
        self.changed();
    }

    fn set_kick(&self, file: Option<File>) {
        lock(&self.fds).kick = Self::dup(&file, "kick");
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.inner.set_kick(file);
        self.changed();
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        lock(&self.fds).call = Self::dup(&file, "call");
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.inner.set_call(file);
        self.changed();
    }

    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(file)
    }
}

/// What the device was last started with.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Running {
    /// (queue index, its vring's fd generation)
    queues: Vec<(u16, u64)>,
    mem_generation: u64,
    features: u64,
}

#[derive(Default)]
struct State {
    vrings: Vec<BlkVring>,
    mem: Option<GuestMemoryMmap>,
    mem_generation: u64,
    features: u64,
    running: Option<Running>,
}

/// One front-end connection's view of the shared block device.
pub struct Session {
    device: Arc<Mutex<BlockDevice>>,
    state: Mutex<State>,
}

impl Session {
    pub fn new(device: Arc<Mutex<BlockDevice>>) -> Arc<Session> {
        Arc::new(Session {
            device,
            state: Mutex::default(),
        })
    }

    /// Creates the vhost-user-backend daemon for this session; its vrings
    /// report to the session.
    pub fn new_daemon(
        self: &Arc<Self>,
        name: &str,
    ) -> vhost_user_backend::Result<VhostUserDaemon<BlkBackend>> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        CREATING.with(|c| *c.borrow_mut() = Some(self.clone()));
        let daemon = VhostUserDaemon::new(name.to_string(), BlkBackend(self.clone()), mem);
        CREATING.with(|c| *c.borrow_mut() = None);
        daemon
    }

    /// Stops the device (in-flight requests complete) and forgets the
    /// front-end's memory: its connection has ended.
    pub fn disconnect(&self) {
        let mut st = lock(&self.state);
        if st.running.take().is_some() {
            lock(&self.device).stop_queues();
        }
        st.mem = None;
        st.vrings.clear();
    }

    /// Brings the device in line with the vrings: see the module doc.
    pub fn sync(&self) {
        let mut st = lock(&self.state);
        let queues: Vec<(u16, u64)> = st
            .vrings
            .iter()
            .enumerate()
            .filter(|(_, v)| v.live())
            .map(|(i, v)| (i as u16, v.generation.load(Ordering::SeqCst)))
            .collect();
        let want = (!queues.is_empty() && st.mem.is_some()).then(|| Running {
            queues,
            mem_generation: st.mem_generation,
            features: st.features,
        });
        if st.running == want {
            return;
        }
        let mut dev = lock(&self.device);
        if st.running.take().is_some() {
            for (index, q) in dev.stop_queues() {
                if let Some(v) = st.vrings.get(usize::from(index)) {
                    v.resume_at(q.next_avail, q.next_used);
                }
            }
        }
        let (Some(want), Some(mem)) = (want, st.mem.clone()) else {
            log::debug!("vhost-user-blk: stopped");
            return;
        };
        let mut inits = Vec::new();
        let mut kicks = Vec::new();
        for &(index, _) in &want.queues {
            let Some(vring) = st.vrings.get(usize::from(index)) else {
                continue;
            };
            match vring.queue_init(index, &mem) {
                Ok(init) => {
                    if let Ok(k) = init.kick.try_clone() {
                        kicks.push(k);
                    }
                    inits.push(init);
                }
                Err(e) => log::warn!("vhost-user-blk: not starting {e}"),
            }
        }
        let count = inits.len();
        match dev.activate(mem, want.features, inits) {
            Ok(()) => {
                log::debug!("vhost-user-blk: serving {count} queues");
                for k in kicks {
                    let _ = k.write(1);
                }
            }
            Err(e) => log::error!("vhost-user-blk: starting the device: {e}"),
        }
        st.running = Some(want);
    }
}

/// Refuses a memory table with a region that extends past the end of its
/// file: the front-end's mistake (or malice) must not kill the daemon with
/// SIGBUS when a worker touches the missing pages.
fn check_regions(mem: &GuestMemoryMmap) -> io::Result<()> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let size = fo.file().metadata()?.len();
        let end = fo.start().checked_add(region.len());
        if end.is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a memory region ({:#x} bytes at file offset {:#x}) extends past its file ({size:#x} bytes)",
                    region.len(),
                    fo.start()
                ),
            ));
        }
    }
    Ok(())
}

/// The [`VhostUserBackend`] of one session.
#[derive(Clone)]
pub struct BlkBackend(Arc<Session>);

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = BlkVring;

    fn num_queues(&self) -> usize {
        lock(&self.0.device).queue_max_sizes().len()
    }

    fn max_queue_size(&self) -> usize {
        let sizes = lock(&self.0.device).queue_max_sizes();
        usize::from(sizes.into_iter().max().unwrap_or(0))
    }

    fn features(&self) -> u64 {
        lock(&self.0.device).features()
            | VIRTIO_F_VERSION_1
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        lock(&self.0.state).features =
            features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.0.sync();
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            // ADD_MEM_REG/REM_MEM_REG end in `update_memory` as
            // SET_MEM_TABLE does (libblkio requires this feature).
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        // vhost-user-backend has disabled every vring, which stopped the
        // device; forget the features as a virtio reset does.
        lock(&self.0.state).features = 0;
        self.0.sync();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The worker takes EVENT_IDX from the negotiated features.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut buf = vec![0u8; size.min(MAX_CONFIG_READ) as usize];
        lock(&self.0.device).read_config(u64::from(offset), &mut buf);
        buf
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        lock(&self.0.device).write_config(u64::from(offset), buf);
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        let snapshot = (*mem.memory()).clone();
        if let Err(e) = check_regions(&snapshot) {
            // Touching such a region would raise SIGBUS: serve nothing
            // until a valid table comes.
            {
                let mut st = lock(&self.0.state);
                st.mem = None;
                st.mem_generation += 1;
            }
            self.0.sync();
            return Err(e);
        }
        {
            let mut st = lock(&self.0.state);
            st.mem = Some(snapshot);
            st.mem_generation += 1;
        }
        self.0.sync();
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // No epoll worker threads: the io_uring workers own the kicks.
        Vec::new()
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        // The ring was marked not ready just before, which already stopped
        // it; this only makes sure.
        self.0.sync();
        Ok(())
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[BlkVring],
        _thread_id: usize,
    ) -> io::Result<()> {
        Ok(())
    }
}
