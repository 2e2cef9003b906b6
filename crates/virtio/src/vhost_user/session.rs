//! One connection to a vhost-user backend: the handshake, the memory
//! table, the inflight region and each vring's start and stop, in the
//! order the vhost-user specification gives. Everything goes through the
//! `vhost` crate's [`Frontend`]; this module adds deadlines (every reply
//! is awaited at most [`REPLY_TIMEOUT`]) and checks of what the backend
//! says.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserInflight};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// How long a reply may take before the backend is declared broken.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The protocol features ringvm uses when the backend offers them.
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// What went wrong talking to a backend.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("connecting to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: no reply within {timeout:?}", timeout = REPLY_TIMEOUT)]
    Timeout { op: &'static str },
    #[error("starting the reply-deadline thread")]
    Thread(#[source] std::io::Error),
    #[error("{op}")]
    Protocol {
        op: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the backend offers {offered} queues; {wanted} are configured")]
    TooFewQueues { offered: u64, wanted: u16 },
    #[error("guest memory has {regions} regions; the backend takes at most {max}")]
    TooManyRegions { regions: usize, max: u64 },
    #[error("guest memory is not shared (no memfd behind region at {addr:#x})")]
    NotShared { addr: u64 },
    #[error("queue {index}: its rings are not in guest memory")]
    RingOutsideMemory { index: u16 },
}

impl SessionError {
    /// Whether the connection itself failed (the backend is gone or
    /// talks garbage), rather than the backend refusing one request.
    pub fn is_broken(&self) -> bool {
        match self {
            SessionError::Protocol { source, .. } => !matches!(
                source,
                vhost::Error::VhostUserProtocol(
                    vhost::vhost_user::Error::BackendInternalError
                        | vhost::vhost_user::Error::InvalidParam
                )
            ),
            SessionError::Connect { .. } | SessionError::Timeout { .. } => true,
            _ => false,
        }
    }
}

/// The reply deadline: a thread that shuts the socket down when a
/// request has waited longer than [`REPLY_TIMEOUT`]. (A socket timeout
/// would not do: the `vhost` crate retries a timed-out read forever.)
struct Deadline {
    state: Mutex<DeadlineState>,
    cv: Condvar,
}

#[derive(Default)]
struct DeadlineState {
    until: Option<Instant>,
    fired: bool,
    quit: bool,
}

impl Deadline {
    fn lock(&self) -> MutexGuard<'_, DeadlineState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self, fd: RawFd) {
        uring_backend::iothread::block_process_signals();
        vmm::seccomp::apply_default(vmm::seccomp::ThreadKind::Watchdog);
        let mut st = self.lock();
        loop {
            if st.quit {
                return;
            }
            st = match st.until {
                None => self.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(t) if Instant::now() >= t => {
                    // SAFETY: shutdown on the session's socket, which
                    // stays open until this thread has quit.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                    st.until = None;
                    st.fired = true;
                    st
                }
                Some(t) => {
                    self.cv
                        .wait_timeout(st, t.saturating_duration_since(Instant::now()))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

/// One vring as the driver set it up: host addresses of its parts.
pub struct VringSetup<'a> {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Where the backend starts in the available ring.
    pub base: u16,
    /// Whether the ring is enabled once set up.
    pub enable: bool,
    pub kick: &'a EventFd,
    pub call: &'a EventFd,
}

/// A connected, negotiated backend.
pub struct Session {
    fe: Frontend,
    deadline: Arc<Deadline>,
    deadline_thread: Option<JoinHandle<()>>,
    /// The backend's virtio features (with VHOST_USER_F_PROTOCOL_FEATURES).
    pub features: u64,
    /// Protocol features both sides use.
    pub protocol: VhostUserProtocolFeatures,
    /// Queues the backend has (GET_QUEUE_NUM, or as configured without MQ).
    pub queues: u64,
}

impl Session {
    /// Connects to `path` and negotiates: SET_OWNER, GET_FEATURES,
    /// GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM.
    pub fn connect(path: &Path, queues: u16) -> Result<Session, SessionError> {
        let connect_err = |source| SessionError::Connect {
            path: path.into(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        let fd = stream.as_raw_fd();
        let deadline = Arc::new(Deadline {
            state: Mutex::new(DeadlineState::default()),
            cv: Condvar::new(),
        });
        let thread = {
            let deadline = deadline.clone();
            std::thread::Builder::new()
                .name("vhost-user-deadline".into())
                .spawn(move || deadline.run(fd))
                .map_err(SessionError::Thread)?
        };
        let mut session = Session {
            fe: Frontend::from_stream(stream, u64::from(queues)),
            deadline,
            deadline_thread: Some(thread),
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            queues: u64::from(queues),
        };
        session.handshake(path, queues)?;
        Ok(session)
    }

    /// Runs one request (or a few) under the reply deadline.
    fn call<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T, SessionError> {
        self.deadline.lock().until = Some(Instant::now() + REPLY_TIMEOUT);
        self.deadline.cv.notify_one();
        let r = f(&mut self.fe);
        let fired = {
            let mut st = self.deadline.lock();
            st.until = None;
            st.fired
        };
        match r {
            Ok(v) => Ok(v),
            Err(_) if fired => Err(SessionError::Timeout { op }),
            Err(source) => Err(SessionError::Protocol { op, source }),
        }
    }

    fn handshake(&mut self, path: &Path, queues: u16) -> Result<(), SessionError> {
        self.call("SET_OWNER", |fe| fe.set_owner())?;
        let features = self.call("GET_FEATURES", |fe| fe.get_features())?;
        self.features = features;
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = self.call("GET_PROTOCOL_FEATURES", |fe| fe.get_protocol_features())?;
            let protocol = offered & wanted_protocol_features();
            log::debug!(
                "vhost-user {}: features {features:#x}, protocol features offered {:#x}, used {:#x}",
                path.display(),
                offered.bits(),
                protocol.bits()
            );
            self.call("SET_PROTOCOL_FEATURES", |fe| {
                fe.set_protocol_features(protocol)
            })?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                self.fe
                    .set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
            }
            self.protocol = protocol;
        }
        if self.has(VhostUserProtocolFeatures::MQ) {
            let backend_queues = self.call("GET_QUEUE_NUM", |fe| fe.get_queue_num())?;
            if backend_queues < u64::from(queues) {
                return Err(SessionError::TooFewQueues {
                    offered: backend_queues,
                    wanted: queues,
                });
            }
            self.queues = backend_queues;
        }
        Ok(())
    }

    /// The socket's fd (for watching for hangup).
    pub fn fd(&self) -> RawFd {
        self.fe.as_raw_fd()
    }

    /// Shuts the connection down (the watcher sees the hangup).
    pub fn shutdown(&self) {
        // SAFETY: shutdown on a socket fd we own; no memory is involved.
        unsafe { libc::shutdown(self.fd(), libc::SHUT_RDWR) };
    }

    pub fn has(&self, f: VhostUserProtocolFeatures) -> bool {
        self.protocol.contains(f)
    }

    /// GET_CONFIG of `len` bytes from offset 0.
    pub fn get_config(&mut self, len: u32) -> Result<Vec<u8>, SessionError> {
        let buf = vec![0u8; len as usize];
        let (_, payload) = self.call("GET_CONFIG", |fe| {
            fe.get_config(0, len, VhostUserConfigFlags::WRITABLE, &buf)
        })?;
        Ok(payload)
    }

    /// SET_CONFIG at `offset`.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), SessionError> {
        self.call("SET_CONFIG", |fe| {
            fe.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
        })
    }

    /// SET_FEATURES: `driver` features plus PROTOCOL_FEATURES when the
    /// backend offered it.
    pub fn set_features(&mut self, driver: u64) -> Result<(), SessionError> {
        let protocol = self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let features = (driver & self.features) | protocol;
        self.call("SET_FEATURES", |fe| fe.set_features(features))
    }

    /// The memory table: ADD_MEM_REG per region with CONFIGURE_MEM_SLOTS,
    /// else one SET_MEM_TABLE.
    pub fn set_memory(&mut self, mem: &GuestMemoryMmap) -> Result<(), SessionError> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            regions.push(
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| {
                    SessionError::NotShared {
                        addr: vm_memory::GuestMemoryRegion::start_addr(r).0,
                    }
                })?,
            );
        }
        if self.has(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            let max = self.call("GET_MAX_MEM_SLOTS", |fe| fe.get_max_mem_slots())?;
            if regions.len() as u64 > max {
                return Err(SessionError::TooManyRegions {
                    regions: regions.len(),
                    max,
                });
            }
            for r in &regions {
                self.call("ADD_MEM_REG", |fe| fe.add_mem_region(r))?;
            }
        } else {
            self.call("SET_MEM_TABLE", |fe| fe.set_mem_table(&regions))?;
        }
        Ok(())
    }

    /// GET_INFLIGHT_FD for `queues` queues of `size`, when offered.
    pub fn get_inflight(
        &mut self,
        queues: u16,
        size: u16,
    ) -> Result<Option<(VhostUserInflight, File)>, SessionError> {
        if !self.has(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            return Ok(None);
        }
        let ask = VhostUserInflight::new(0, 0, queues, size);
        let (info, file) = self.call("GET_INFLIGHT_FD", |fe| fe.get_inflight_fd(&ask))?;
        Ok(Some((info, file)))
    }

    /// SET_INFLIGHT_FD: hands the (possibly earlier backend's) region over.
    pub fn set_inflight(
        &mut self,
        info: &VhostUserInflight,
        file: &File,
    ) -> Result<(), SessionError> {
        self.call("SET_INFLIGHT_FD", |fe| {
            fe.set_inflight_fd(info, file.as_raw_fd())
        })
    }

    /// Starts one vring: NUM, BASE, ADDR, CALL, KICK, then ENABLE (with
    /// protocol features the ring starts disabled).
    pub fn start_vring(&mut self, v: &VringSetup) -> Result<(), SessionError> {
        let i = usize::from(v.index);
        self.call("SET_VRING_NUM", |fe| fe.set_vring_num(i, v.size))?;
        self.call("SET_VRING_BASE", |fe| fe.set_vring_base(i, v.base))?;
        let addr = VringConfigData {
            queue_max_size: v.size,
            queue_size: v.size,
            flags: 0,
            desc_table_addr: v.desc,
            used_ring_addr: v.used,
            avail_ring_addr: v.avail,
            log_addr: None,
        };
        self.call("SET_VRING_ADDR", |fe| fe.set_vring_addr(i, &addr))?;
        // The call fd first, so no completion goes to a stale one.
        self.call("SET_VRING_CALL", |fe| fe.set_vring_call(i, v.call))?;
        self.call("SET_VRING_KICK", |fe| fe.set_vring_kick(i, v.kick))?;
        self.enable_vring(v.index, v.enable)
    }

    /// SET_VRING_ENABLE (with protocol features; without them every ring
    /// runs once set up).
    pub fn enable_vring(&mut self, index: u16, enable: bool) -> Result<(), SessionError> {
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.call("SET_VRING_ENABLE", |fe| {
                fe.set_vring_enable(usize::from(index), enable)
            })?;
        }
        Ok(())
    }

    /// Stops one vring (disable, then GET_VRING_BASE, after which the
    /// backend no longer touches it); returns where it stopped.
    pub fn stop_vring(&mut self, index: u16) -> Result<u32, SessionError> {
        let i = usize::from(index);
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.call("SET_VRING_ENABLE", |fe| fe.set_vring_enable(i, false))?;
        }
        self.call("GET_VRING_BASE", |fe| fe.get_vring_base(i))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.deadline.lock().quit = true;
        self.deadline.cv.notify_one();
        if let Some(t) = self.deadline_thread.take() {
            let _ = t.join();
        }
    }
}
