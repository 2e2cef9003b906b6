//! The vfio-user test device: a PCI function with a register BAR, a
//! memfd-backed shared-memory BAR, MSI-X and MSI, and a DMA engine, served
//! on a Unix socket by the `vfio_user` crate's server (layout and registers:
//! tests/devices/README.md).
//!
//! [`spawn`] starts two threads:
//!
//! * the *front* accepts clients on the public socket, one after another,
//!   and relays each client's messages (with their file descriptors) to the
//!   back thread. It is where the protocol-level misbehaviours live
//!   ([`Behaviour::ShortConfigReads`], [`Behaviour::GarbageReplies`],
//!   [`Behaviour::DisconnectAfter`]), and it watches the stop event, so
//!   that dropping the [`TestDevice`] ends a session in progress;
//! * the *back* runs `vfio_user::Server` over a private (abstract) socket
//!   with the device model as its backend. When a session ends, the DMA
//!   mappings and interrupt eventfds of that client are released.
//!
//! Interrupts: `SET_IRQS` stores eventfds per index and vector; a DOORBELL
//! write signals MSI-X vector `v`, or the MSI eventfd when no MSI-X eventfd
//! is set and `v == 0`. `VFIO_IRQ_SET_ACTION_MASK`/`UNMASK` mask vectors in
//! the device: a masked vector's doorbell sets its pending bit (read through
//! the PBA at BAR2 0x3000), and unmasking signals it once and clears the bit.
//! INTx is a level-triggered line (the INTX register asserts it) with
//! VFIO's automask and unmask, including an unmask eventfd ([`intx`]).

mod config;
mod device;
mod dma;
mod intx;
mod relay;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// PCI vendor ID.
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device ID.
pub const DEVICE_ID: u16 = 0x7256;
/// Value of the ID register ("RVM1").
pub const ID_VALUE: u32 = 0x5256_4d31;
/// Size of BAR0 (registers).
pub const BAR0_SIZE: u64 = 0x1000;
/// Size of BAR0 that [`Behaviour::BadBarSize`] reports.
pub const BAD_BAR0_SIZE: u64 = 0x1800;
/// Size of BAR2 (shared memory, MSI-X table and PBA).
pub const BAR2_SIZE: u64 = 0x4000;
/// The mmappable part of BAR2: `[0, BAR2_MMAP_SIZE)`.
pub const BAR2_MMAP_SIZE: u64 = 0x2000;
/// Offset of the MSI-X table in BAR2.
pub const MSIX_TABLE_OFFSET: u64 = 0x2000;
/// Offset of the MSI-X pending bit array in BAR2.
pub const MSIX_PBA_OFFSET: u64 = 0x3000;
/// MSI-X vectors.
pub const MSIX_VECTORS: u32 = 8;
/// Size of the configuration space region.
pub const CONFIG_SIZE: u64 = 256;
/// Longest DMA copy.
pub const DMA_MAX_LEN: u32 = 1 << 20;

/// BAR0 register offsets (little-endian u32 each).
pub mod reg {
    pub const ID: u64 = 0x00;
    pub const DOORBELL: u64 = 0x04;
    pub const DMA_SRC_LO: u64 = 0x08;
    pub const DMA_SRC_HI: u64 = 0x0c;
    pub const DMA_DST_LO: u64 = 0x10;
    pub const DMA_DST_HI: u64 = 0x14;
    pub const DMA_LEN: u64 = 0x18;
    pub const DMA_CMD: u64 = 0x1c;
    pub const DMA_STATUS: u64 = 0x20;
    pub const PEEK_VALUE: u64 = 0x24;
    pub const PEEK_OFFSET: u64 = 0x28;
    pub const IRQ_COUNT: u64 = 0x2c;
    /// INTx: write bit 0 to assert (1) or deassert (0) the line; reads
    /// bit 0 the level and bit 1 whether INTx is masked.
    pub const INTX: u64 = 0x30;
    pub const INTX_ASSERTED: u32 = 1;
    pub const INTX_MASKED: u32 = 2;

    /// DMA_CMD value that starts a copy.
    pub const DMA_CMD_COPY: u32 = 1;
    /// DMA_STATUS values.
    pub const DMA_IDLE: u32 = 0;
    pub const DMA_DONE: u32 = 1;
    pub const DMA_ERROR: u32 = 2;
}

/// How the device behaves: correctly, or in one way that a VMM must
/// survive (reject the device with an error, never panic or hang).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Behaviour {
    /// As README.md describes.
    #[default]
    Good,
    /// BAR0's region reports [`BAD_BAR0_SIZE`] bytes, not a power of two.
    BadBarSize,
    /// The capability chain loops: the vendor capability at 0x60 points
    /// back to 0x40.
    CapLoop,
    /// Replies to configuration space reads (region 7) carry half the
    /// bytes asked for (rounded down), with `count` and `message_size`
    /// saying so.
    ShortConfigReads,
    /// Every reply after the first (the version handshake's) is replaced
    /// by as many pseudo-random bytes, without file descriptors.
    GarbageReplies,
    /// The device answers the first N messages of a session, then closes
    /// the connection when message N+1 arrives (unanswered).
    DisconnectAfter(usize),
}

/// What the device has seen (totals since [`spawn`] unless said
/// otherwise; device resets do not clear them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Client connections accepted.
    pub clients: u64,
    /// Sessions whose resources (DMA mappings, eventfds) were released
    /// after the client went away.
    pub sessions_ended: u64,
    /// DOORBELL writes with a vector below [`MSIX_VECTORS`].
    pub doorbells: u64,
    /// Eventfd signals sent (doorbells, unmasked pending vectors, and
    /// `SET_IRQS` triggers).
    pub interrupts: u64,
    /// Doorbells that found neither a usable eventfd nor a masked vector.
    pub interrupts_dropped: u64,
    /// INTx trigger eventfd signals (also counted in `interrupts`).
    pub intx_signals: u64,
    /// INTx unmasks through the unmask eventfd.
    pub intx_unmasks: u64,
    /// DMA copies that completed (DMA_STATUS 1).
    pub dma_copies: u64,
    /// DMA commands that failed (DMA_STATUS 2).
    pub dma_errors: u64,
    /// `DEVICE_RESET` messages.
    pub resets: u64,
    /// `DMA_MAP` messages accepted.
    pub dma_maps: u64,
    /// Mappings removed by `DMA_UNMAP`.
    pub dma_unmaps: u64,
    /// DMA mappings held now.
    pub dma_mappings: usize,
    /// Eventfds held now, per IRQ index (INTx, MSI, MSI-X, ERR, REQ);
    /// INTx counts its trigger and its unmask eventfd.
    pub irq_fds: [usize; 5],
}

/// Why the device could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("socket path {path} already exists")]
    SocketExists { path: PathBuf },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the device model")]
    Device(#[source] device::Error),
    #[error("cannot set up the private server socket {name}")]
    Backend {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the stop eventfd")]
    StopEvent(#[source] io::Error),
    #[error("cannot start the {thread} thread")]
    Thread {
        thread: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The stop request shared by the threads: a flag, and an eventfd that
/// becomes (and stays) readable so that `poll` notices it.
pub(crate) struct Stop {
    flag: AtomicBool,
    event: EventFd,
}

impl Stop {
    fn new() -> io::Result<Stop> {
        Ok(Stop {
            flag: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        // The counter cannot overflow with one write; never read.
        let _ = self.event.write(1);
    }

    pub(crate) fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

/// Locks `m`, recovering the data if a thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running test device. Dropping it ends any session in progress, stops
/// both threads and removes the socket.
pub struct TestDevice {
    path: PathBuf,
    backend: SocketAddr,
    stop: Arc<Stop>,
    stats: Arc<Mutex<Stats>>,
    front: Option<JoinHandle<()>>,
    back: Option<JoinHandle<()>>,
}

impl TestDevice {
    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        *lock(&self.stats)
    }

    /// The socket clients connect to.
    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// Polls the counters until `done` holds or `timeout` passes, and
    /// returns the last snapshot (for what the threads do asynchronously,
    /// such as releasing a session's resources after a disconnect).
    pub fn wait_stats(&self, timeout: Duration, done: impl Fn(&Stats) -> bool) -> Stats {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.stats();
            if done(&s) || Instant::now() >= deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TestDevice {
    fn drop(&mut self) {
        self.stop.request();
        if let Some(front) = self.front.take() {
            let _ = front.join();
        }
        // The back thread waits in accept() between sessions: a connection
        // that closes at once makes its server loop return and see the flag.
        let _ = UnixStream::connect_addr(&self.backend);
        if let Some(back) = self.back.take() {
            let _ = back.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A name for the private socket, unique in this process.
fn backend_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "ringvm-test-device-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Starts a test device listening on `socket` (which must not exist).
pub fn spawn(socket: &Path, behaviour: Behaviour) -> Result<TestDevice, Error> {
    if socket.symlink_metadata().is_ok() {
        return Err(Error::SocketExists {
            path: socket.to_path_buf(),
        });
    }
    let stats = Arc::new(Mutex::new(Stats::default()));
    let stop = Arc::new(Stop::new().map_err(Error::StopEvent)?);
    let mut dev = device::Device::new(behaviour, stats.clone()).map_err(Error::Device)?;

    let name = backend_name();
    let backend_err = |source| Error::Backend {
        name: name.clone(),
        source,
    };
    let backend = SocketAddr::from_abstract_name(name.as_bytes()).map_err(backend_err)?;
    let private = UnixListener::bind_addr(&backend).map_err(backend_err)?;
    let server = vfio_user::Server::from_owned_fd(
        OwnedFd::from(private),
        true,
        dev.irq_infos(),
        dev.regions(),
    );

    let listener = UnixListener::bind(socket).map_err(|source| Error::Listen {
        path: socket.to_path_buf(),
        source,
    })?;
    let listen_err = |source| Error::Listen {
        path: socket.to_path_buf(),
        source,
    };
    listener.set_nonblocking(true).map_err(listen_err)?;

    let back_stop = stop.clone();
    let back = std::thread::Builder::new()
        .name("vfio-user-dev".into())
        .spawn(move || loop {
            match server.run(&mut dev) {
                Ok(()) => {}
                Err(vfio_user::Error::SocketAccept(e)) if !back_stop.requested() => {
                    log::warn!("test device: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => log::debug!("test device: session ended: {e}"),
            }
            dev.disconnected();
            if back_stop.requested() {
                break;
            }
        })
        .map_err(|source| {
            let _ = std::fs::remove_file(socket);
            Error::Thread {
                thread: "server",
                source,
            }
        })?;

    let relay = relay::Relay::new(behaviour, stop.clone(), stats.clone(), backend.clone());
    let front = std::thread::Builder::new()
        .name("vfio-user-relay".into())
        .spawn(move || relay.run(listener));
    let mut device = TestDevice {
        path: socket.to_path_buf(),
        backend,
        stop,
        stats,
        front: None,
        back: Some(back),
    };
    match front {
        Ok(front) => {
            device.front = Some(front);
            Ok(device)
        }
        // Dropping `device` stops the back thread and removes the socket.
        Err(source) => Err(Error::Thread {
            thread: "relay",
            source,
        }),
    }
}
