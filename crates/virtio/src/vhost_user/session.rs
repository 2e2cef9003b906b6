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
use std::time::Duration;

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
            SessionError::Connect { .. } => true,
            _ => false,
        }
    }
}

fn proto(op: &'static str) -> impl FnOnce(vhost::Error) -> SessionError {
    move |source| SessionError::Protocol { op, source }
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
    pub kick: &'a EventFd,
    pub call: &'a EventFd,
}

/// A connected, negotiated backend.
pub struct Session {
    fe: Frontend,
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
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(connect_err)?;
        let mut fe = Frontend::from_stream(stream, u64::from(queues));
        fe.set_owner().map_err(proto("SET_OWNER"))?;
        let features = fe.get_features().map_err(proto("GET_FEATURES"))?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = fe
                .get_protocol_features()
                .map_err(proto("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & wanted_protocol_features();
            log::debug!(
                "vhost-user {}: features {features:#x}, protocol features offered {:#x}, used {:#x}",
                path.display(),
                offered.bits(),
                protocol.bits()
            );
            fe.set_protocol_features(protocol)
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let mut backend_queues = u64::from(queues);
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            backend_queues = fe.get_queue_num().map_err(proto("GET_QUEUE_NUM"))?;
            if backend_queues < u64::from(queues) {
                return Err(SessionError::TooFewQueues {
                    offered: backend_queues,
                    wanted: queues,
                });
            }
        }
        Ok(Session {
            fe,
            features,
            protocol,
            queues: backend_queues,
        })
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
        let (_, payload) = self
            .fe
            .get_config(0, len, VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(proto("GET_CONFIG"))?;
        Ok(payload)
    }

    /// SET_CONFIG at `offset`.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), SessionError> {
        self.fe
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(proto("SET_CONFIG"))
    }

    /// SET_FEATURES: `driver` features plus PROTOCOL_FEATURES when the
    /// backend offered it.
    pub fn set_features(&mut self, driver: u64) -> Result<(), SessionError> {
        let protocol = self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.fe
            .set_features((driver & self.features) | protocol)
            .map_err(proto("SET_FEATURES"))
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
            let max = self
                .fe
                .get_max_mem_slots()
                .map_err(proto("GET_MAX_MEM_SLOTS"))?;
            if regions.len() as u64 > max {
                return Err(SessionError::TooManyRegions {
                    regions: regions.len(),
                    max,
                });
            }
            for r in &regions {
                self.fe.add_mem_region(r).map_err(proto("ADD_MEM_REG"))?;
            }
        } else {
            self.fe
                .set_mem_table(&regions)
                .map_err(proto("SET_MEM_TABLE"))?;
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
        let (info, file) = self
            .fe
            .get_inflight_fd(&ask)
            .map_err(proto("GET_INFLIGHT_FD"))?;
        Ok(Some((info, file)))
    }

    /// SET_INFLIGHT_FD: hands the (possibly earlier backend's) region over.
    pub fn set_inflight(
        &mut self,
        info: &VhostUserInflight,
        file: &File,
    ) -> Result<(), SessionError> {
        self.fe
            .set_inflight_fd(info, file.as_raw_fd())
            .map_err(proto("SET_INFLIGHT_FD"))
    }

    /// Starts one vring: NUM, BASE, ADDR, CALL, KICK, then ENABLE (with
    /// protocol features the ring starts disabled).
    pub fn start_vring(&mut self, v: &VringSetup) -> Result<(), SessionError> {
        let i = usize::from(v.index);
        self.fe
            .set_vring_num(i, v.size)
            .map_err(proto("SET_VRING_NUM"))?;
        self.fe
            .set_vring_base(i, v.base)
            .map_err(proto("SET_VRING_BASE"))?;
        let addr = VringConfigData {
            queue_max_size: v.size,
            queue_size: v.size,
            flags: 0,
            desc_table_addr: v.desc,
            used_ring_addr: v.used,
            avail_ring_addr: v.avail,
            log_addr: None,
        };
        self.fe
            .set_vring_addr(i, &addr)
            .map_err(proto("SET_VRING_ADDR"))?;
        // The call fd first, so no completion goes to a stale one.
        self.fe
            .set_vring_call(i, v.call)
            .map_err(proto("SET_VRING_CALL"))?;
        self.fe
            .set_vring_kick(i, v.kick)
            .map_err(proto("SET_VRING_KICK"))?;
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.fe
                .set_vring_enable(i, true)
                .map_err(proto("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stops one vring (disable, then GET_VRING_BASE, after which the
    /// backend no longer touches it); returns where it stopped.
    pub fn stop_vring(&mut self, index: u16) -> Result<u32, SessionError> {
        let i = usize::from(index);
        if self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            self.fe
                .set_vring_enable(i, false)
                .map_err(proto("SET_VRING_ENABLE"))?;
        }
        self.fe.get_vring_base(i).map_err(proto("GET_VRING_BASE"))
    }
}
