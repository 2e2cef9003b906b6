//! A virtio device whose queues a vhost-user backend serves.
//!
//! The transport hands [`VhostUserDevice::activate`] each queue's kick
//! eventfd (the ioeventfd on its notify address) and its MSI-X vector's
//! eventfd (the irqfd on the vector's GSI route, which `vmm` owns); both go
//! to the backend as they are, so requests and completions never pass
//! through ringvm. A watcher thread notices the backend hanging up: it is
//! logged once and, with `reconnect=on`, the watcher reconnects, replays
//! the memory table, the inflight region and every vring, and kicks each
//! queue so the new backend looks at what is pending.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserInflight;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::config::{Kind, VhostUserConfig};
use super::ctrl::{CtrlQueue, CtrlSetup, SetPairs};
use super::personality::{self, PersonalityError, BLK_CONFIG_LEN};
use super::session::{Session, SessionError, VringSetup};
use crate::device::{read_config_space, ActivateError, QueueInit, VirtioDevice};
use crate::ratelimit::RateLimitedLog;

/// How often the watcher tries to reconnect.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);

/// Why a vhost-user device could not be created (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("{name}: vhost-user backend on {socket}")]
    Session {
        name: String,
        socket: String,
        #[source]
        source: SessionError,
    },
    #[error("{name}: vhost-user backend on {socket}")]
    Backend {
        name: String,
        socket: String,
        #[source]
        source: PersonalityError,
    },
    #[error("{name}: starting the backend watcher")]
    Watcher {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// One queue as the driver set it up, kept for replay.
struct ActiveQueue {
    index: u16,
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_avail: u16,
    kick: EventFd,
    call: EventFd,
}

struct Active {
    features: u64,
    queues: Vec<ActiveQueue>,
}

struct State {
    /// None once the backend went away (until a reconnect).
    session: Option<Session>,
    /// Set when a request failed: the session is shut down and waits for
    /// the watcher to drop it.
    broken: bool,
    active: Option<Active>,
    inflight: Option<(VhostUserInflight, File)>,
    /// NIC: queue pairs the driver asked for (the others are disabled).
    pairs: u16,
}

struct Shared {
    name: String,
    cfg: VhostUserConfig,
    mem: GuestMemoryMmap,
    /// What the backend offered at start; a reconnected one must offer
    /// at least the features the guest negotiated.
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Translates a ring address; the transport checked the queue is valid.
fn host_addr(mem: &GuestMemoryMmap, addr: GuestAddress, index: u16) -> Result<u64, SessionError> {
    mem.get_host_address(addr)
        .map(|p| p as u64)
        .map_err(|_| SessionError::RingOutsideMemory { index })
}

/// Programs every vring of `active` into `session`, from `base(q)`.
fn start_rings(
    session: &mut Session,
    shared: &Shared,
    active: &Active,
    st_inflight: &mut Option<(VhostUserInflight, File)>,
    pairs: u16,
    base: &dyn Fn(&ActiveQueue) -> u16,
) -> Result<(), SessionError> {
    let mem = &shared.mem;
    let inflight = st_inflight;
    session.set_features(personality::backend_features(
        shared.cfg.kind,
        active.features,
    ))?;
    if inflight.is_none() {
        let size = active.queues.iter().map(|q| q.size).max().unwrap_or(0);
        let count = active.queues.iter().map(|q| q.index + 1).max().unwrap_or(0);
        *inflight = session.get_inflight(count, size)?;
        if let Some((info, _)) = inflight {
            log::info!(
                "vhost-user: the backend keeps an inflight region of {} bytes for {count} queues",
                info.mmap_size
            );
        }
    }
    if let Some((info, file)) = inflight.as_ref() {
        session.set_inflight(info, file)?;
    }
    for q in &active.queues {
        session.start_vring(&VringSetup {
            index: q.index,
            size: q.size,
            desc: host_addr(mem, q.desc, q.index)?,
            avail: host_addr(mem, q.avail, q.index)?,
            used: host_addr(mem, q.used, q.index)?,
            base: base(q),
            enable: shared.cfg.kind == Kind::Blk || q.index < 2 * pairs,
            kick: &q.kick,
            call: &q.call,
        })?;
    }
    Ok(())
}

/// The used index the guest sees: where a backend that died left off.
fn used_idx(mem: &GuestMemoryMmap, q: &ActiveQueue) -> u16 {
    mem.read_obj::<u16>(q.used.unchecked_add(2))
        .map(u16::from_le)
        .unwrap_or(q.next_avail)
}

/// A virtio-blk or virtio-net device served by a vhost-user backend.
pub struct VhostUserDevice {
    kind: Kind,
    features: u64,
    config_space: Vec<u8>,
    queue_sizes: Vec<u16>,
    shared: Arc<Shared>,
    stop_watch: EventFd,
    watcher: Option<JoinHandle<()>>,
    /// NIC: the control queue, served by ringvm while the device runs.
    ctrl: Option<CtrlQueue>,
    /// Guest-caused errors (bad config writes, control commands).
    log: Arc<RateLimitedLog>,
}

impl VhostUserDevice {
    /// Connects to the backend, negotiates and checks what it says. Every
    /// failure here is the configuration's (exit code 2).
    pub fn new(
        name: &str,
        cfg: &VhostUserConfig,
        mem: GuestMemoryMmap,
        mac: [u8; 6],
    ) -> Result<VhostUserDevice, VhostUserError> {
        let socket = cfg.socket.display().to_string();
        let session_err = |source| VhostUserError::Session {
            name: name.into(),
            socket: socket.clone(),
            source,
        };
        let backend_err = |source| VhostUserError::Backend {
            name: name.into(),
            socket: socket.clone(),
            source,
        };
        let vrings = personality::vrings(cfg);
        let mut session = Session::connect(&cfg.socket, vrings).map_err(session_err)?;
        let features = personality::guest_features(cfg, session.features).map_err(backend_err)?;
        let config_space = match cfg.kind {
            Kind::Blk => {
                if !session.has(vhost::vhost_user::VhostUserProtocolFeatures::CONFIG) {
                    return Err(backend_err(PersonalityError::NoConfig));
                }
                let space = session.get_config(BLK_CONFIG_LEN).map_err(session_err)?;
                personality::blk_config(cfg, features, space).map_err(backend_err)?
            }
            Kind::Net => personality::net_config(mac, cfg.queues),
        };
        session.set_memory(&mem).map_err(session_err)?;
        let shared = Arc::new(Shared {
            name: name.into(),
            cfg: cfg.clone(),
            mem,
            state: Mutex::new(State {
                session: Some(session),
                broken: false,
                active: None,
                inflight: None,
                pairs: 1,
            }),
        });
        let stop_watch = EventFd::new(EFD_NONBLOCK).map_err(|source| VhostUserError::Watcher {
            name: name.into(),
            source,
        })?;
        let watcher = {
            let shared = shared.clone();
            let stop = stop_watch
                .try_clone()
                .map_err(|source| VhostUserError::Watcher {
                    name: name.into(),
                    source,
                })?;
            std::thread::Builder::new()
                .name(format!("{name}-watch"))
                .spawn(move || watch(&shared, &stop))
                .map_err(|source| VhostUserError::Watcher {
                    name: name.into(),
                    source,
                })?
        };
        Ok(VhostUserDevice {
            kind: cfg.kind,
            features,
            config_space,
            queue_sizes: match cfg.kind {
                Kind::Blk => vec![cfg.queue_size; usize::from(vrings)],
                Kind::Net => {
                    let mut v = vec![cfg.queue_size; usize::from(vrings)];
                    v.push(personality::CTRL_QUEUE_SIZE);
                    v
                }
            },
            shared,
            stop_watch,
            watcher: Some(watcher),
            ctrl: None,
            log: Arc::new(RateLimitedLog::new(name)),
        })
    }

    /// Starts the backend's vrings for `active` (or keeps them for the
    /// backend's return when it is away and `reconnect=on`).
    fn start_queues(&self, active: Active) -> Result<(), ActivateError> {
        let shared = &*self.shared;
        let mut st = shared.lock();
        let st = &mut *st;
        st.pairs = 1;
        let broken = st.broken;
        match st.session.as_mut().filter(|_| !broken) {
            Some(session) => {
                match start_rings(session, shared, &active, &mut st.inflight, 1, &|q| {
                    q.next_avail
                }) {
                    Ok(()) => st.active = Some(active),
                    Err(e) => {
                        failed(shared, st, "starting the queues", &e);
                        if !e.is_broken() || !shared.cfg.reconnect {
                            return Err(ActivateError::Worker(Box::new(e)));
                        }
                        // A new backend gets these queues on reconnect.
                        st.active = Some(active);
                    }
                }
            }
            None => {
                log::warn!(
                    "{}: the driver started the device while its vhost-user backend is away{}",
                    shared.name,
                    if shared.cfg.reconnect {
                        "; the queues start when it is back"
                    } else {
                        "; its queues stay stopped"
                    }
                );
                st.active = Some(active);
            }
        }
        Ok(())
    }

    /// Starts the NIC's control queue: "use N pairs" enables the first N
    /// pairs' vrings in the backend and disables the rest.
    fn start_ctrl(&self, q: QueueInit) -> std::io::Result<CtrlQueue> {
        let shared = self.shared.clone();
        let set_pairs: SetPairs = Box::new(move |n| {
            let mut st = shared.lock();
            let st = &mut *st;
            st.pairs = n;
            let broken = st.broken;
            let (Some(session), Some(active)) =
                (st.session.as_mut().filter(|_| !broken), st.active.as_ref())
            else {
                // Applied when the backend is back.
                return true;
            };
            for q in &active.queues {
                if let Err(e) = session.enable_vring(q.index, q.index < 2 * n) {
                    log::error!("{}: switching to {n} queue pairs: {e}", shared.name);
                    return false;
                }
            }
            true
        });
        CtrlQueue::start(
            &self.shared.name,
            CtrlSetup {
                log: self.log.clone(),
                mem: self.shared.mem.clone(),
                queue: q.queue,
                kick: q.kick,
                call: q.interrupt,
                max_pairs: self.shared.cfg.queues,
                set_pairs,
            },
        )
    }

    /// Whether the backend is connected (for tests and logs).
    pub fn connected(&self) -> bool {
        let st = self.shared.lock();
        st.session.is_some() && !st.broken
    }
}

/// Logs a failed request; a broken connection is shut down so the
/// watcher notices (and reconnects, if asked to).
fn failed(shared: &Shared, st: &mut State, what: &str, e: &SessionError) {
    log::error!(
        "{}: vhost-user backend on {}: {what}: {e}{}",
        shared.name,
        shared.cfg.socket.display(),
        std::error::Error::source(e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default()
    );
    if e.is_broken() {
        if let Some(s) = &st.session {
            s.shutdown();
        }
        st.broken = true;
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        match self.kind {
            Kind::Blk => 2,
            Kind::Net => 1,
        }
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only the disk's writeback byte (CONFIG_WCE) is writable; it goes
        // to the backend. Anything else is ignored, as in-VMM devices do.
        if self.kind != Kind::Blk || offset != 32 || data.len() != 1 {
            self.log.warn(format_args!(
                "ignored write of {} bytes to config offset {offset:#x}",
                data.len()
            ));
            return;
        }
        let mut st = self.shared.lock();
        let broken = st.broken;
        if let Some(s) = st.session.as_mut().filter(|_| !broken) {
            match s.set_config(32, data) {
                Ok(()) => self.config_space[32] = data[0],
                Err(e) => failed(&self.shared, &mut st, "SET_CONFIG", &e),
            }
        }
    }

    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<QueueInit>,
    ) -> Result<(), ActivateError> {
        let mut active = Active {
            features,
            queues: Vec::with_capacity(queues.len()),
        };
        let ctrl_index = personality::vrings(&self.shared.cfg);
        let mut ctrl = None;
        for q in queues {
            if self.kind == Kind::Net && q.index == ctrl_index {
                ctrl = Some(q);
                continue;
            }
            let call = match q.interrupt {
                Some(fd) => fd,
                // No vector: the backend still needs somewhere to signal.
                None => EventFd::new(EFD_NONBLOCK).map_err(ActivateError::EventFd)?,
            };
            active.queues.push(ActiveQueue {
                index: q.index,
                size: q.queue.size(),
                desc: GuestAddress(q.queue.desc_table()),
                avail: GuestAddress(q.queue.avail_ring()),
                used: GuestAddress(q.queue.used_ring()),
                next_avail: q.queue.next_avail(),
                kick: q.kick,
                call,
            });
        }
        if let Some(q) = ctrl {
            self.ctrl = Some(self.start_ctrl(q).map_err(ActivateError::EventFd)?);
        }
        let result = self.start_queues(active);
        if result.is_err() {
            // Not started: no control queue either (the lock is free now,
            // so its thread can be joined).
            self.ctrl = None;
        }
        result
    }

    fn reset(&mut self) {
        // The control thread may be waiting for the lock: stop it first.
        self.ctrl = None;
        let shared = &self.shared;
        let mut st = shared.lock();
        let st = &mut *st;
        let Some(active) = st.active.take() else {
            return;
        };
        // A fresh inflight region for the next activation (as after a
        // virtio reset nothing is in flight).
        st.inflight = None;
        let broken = st.broken;
        if let Some(session) = st.session.as_mut().filter(|_| !broken) {
            for q in &active.queues {
                if let Err(e) = session.stop_vring(q.index) {
                    failed(shared, st, "stopping a queue", &e);
                    break;
                }
            }
        }
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        let _ = self.stop_watch.write(1);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
    }
}

/// Waits until `fd` hangs up or `stop` is signalled (true: stop). With
/// `fd` None only `stop` is waited for, at most `timeout`.
fn wait(fd: Option<i32>, stop: &EventFd, timeout: Option<Duration>) -> bool {
    let mut fds = vec![libc::pollfd {
        fd: stop.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    if let Some(fd) = fd {
        fds.push(libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        });
    }
    let ms = timeout.map_or(-1, |t| t.as_millis() as i32);
    loop {
        // SAFETY: `fds` is a valid array of pollfds for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return fds[0].revents != 0;
    }
}

/// The watcher: waits for the backend to hang up, logs it once, and with
/// `reconnect=on` brings a new backend up to where the old one was.
fn watch(shared: &Shared, stop: &EventFd) {
    uring_backend::iothread::block_process_signals();
    vmm::seccomp::apply_default(vmm::seccomp::ThreadKind::VhostUser);
    loop {
        // Only this thread drops a session, so the fd stays valid while
        // it is polled.
        let fd = shared.lock().session.as_ref().map(Session::fd);
        if wait(fd, stop, None) {
            return;
        }
        {
            let mut st = shared.lock();
            st.session = None;
            st.broken = false;
        }
        log::error!(
            "{}: vhost-user backend on {} went away; the device's queues are stopped{}",
            shared.name,
            shared.cfg.socket.display(),
            if shared.cfg.reconnect {
                " until it is back (reconnect=on)"
            } else {
                ""
            }
        );
        if !shared.cfg.reconnect {
            wait(None, stop, None);
            return;
        }
        loop {
            if wait(None, stop, Some(RECONNECT_INTERVAL)) {
                return;
            }
            match reconnect(shared) {
                Ok(()) => break,
                Err(Retry::Quietly) => {}
                Err(Retry::Logged(e)) => log::warn!(
                    "{}: reconnecting to {}: {e}",
                    shared.name,
                    shared.cfg.socket.display()
                ),
            }
        }
        log::warn!(
            "{}: vhost-user backend on {} is back; the queues run again",
            shared.name,
            shared.cfg.socket.display()
        );
    }
}

enum Retry {
    /// Nobody is listening yet.
    Quietly,
    Logged(String),
}

/// One reconnect attempt: handshake, memory table, inflight region, and
/// the vrings from where the guest's used ring says the old backend got.
fn reconnect(shared: &Shared) -> Result<(), Retry> {
    let vrings = personality::vrings(&shared.cfg);
    let mut session = match Session::connect(&shared.cfg.socket, vrings) {
        Ok(s) => s,
        Err(SessionError::Connect { .. }) => return Err(Retry::Quietly),
        Err(e) => return Err(Retry::Logged(e.to_string())),
    };
    let mut st = shared.lock();
    let st = &mut *st;
    let logged = |e: SessionError| {
        Retry::Logged(format!(
            "{e}: {:?}",
            std::error::Error::source(&e).map(|s| s.to_string())
        ))
    };
    if let Some(active) = &st.active {
        // What ringvm provides itself (a NIC's MAC, status and control
        // queue) need not come from the backend.
        let ours = match shared.cfg.kind {
            Kind::Blk => 0,
            Kind::Net => personality::NET_F_MAC | personality::NET_F_STATUS,
        };
        let missing = personality::backend_features(shared.cfg.kind, active.features)
            & !session.features
            & !ours;
        if missing != 0 {
            return Err(Retry::Logged(format!(
                "the backend lacks negotiated features {missing:#x}"
            )));
        }
    }
    session.set_memory(&shared.mem).map_err(logged)?;
    if let Some(active) = &st.active {
        if st.inflight.is_some()
            && !session.has(vhost::vhost_user::VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            // The new backend cannot take the old region.
            st.inflight = None;
        }
        let mem = &shared.mem;
        // Without an inflight region the rings restart at the used index.
        // (A NIC's posted receive buffers are not requests: they are only
        // offered again.)
        if st.inflight.is_none() && shared.cfg.kind == Kind::Blk {
            for q in &active.queues {
                let avail = mem
                    .read_obj::<u16>(q.avail.unchecked_add(2))
                    .map(u16::from_le)
                    .unwrap_or(0);
                let pending = avail.wrapping_sub(used_idx(mem, q));
                if pending > 1 {
                    log::warn!(
                        "{}: queue {}: {pending} requests were outstanding and the backend keeps no inflight region: they restart at the used index, which is exact only if the old backend completed in order",
                        shared.name,
                        q.index
                    );
                }
            }
        }
        start_rings(
            &mut session,
            shared,
            active,
            &mut st.inflight,
            st.pairs,
            &|q| used_idx(mem, q),
        )
        .map_err(logged)?;
        // The old backend may have eaten the last kick.
        for q in &active.queues {
            let _ = q.kick.write(1);
        }
    }
    st.session = Some(session);
    st.broken = false;
    Ok(())
}
