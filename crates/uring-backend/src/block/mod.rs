//! Raw disk images and block devices served through the io_uring executor.
//!
//! A [`BlockFile`] is opened once and shared (it is a cheap `Arc` clone and
//! `Send + Sync`) by every iothread that serves one of its queues. Its I/O
//! methods (in `io.rs`) run on the calling thread's [`Executor`].
//!
//! [`Executor`]: crate::executor::Executor

mod direct;
mod io;

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use direct::DirectIo;
pub use io::{advance, ZERO_CHUNK};

/// `BLKSSZGET`: logical sector size of a block device (`int`).
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `BLKGETSIZE64`: size of a block device in bytes (`u64`).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// The sector size assumed for regular files.
const FILE_BLOCK_SIZE: u32 = 512;

/// How to open a disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockOpenOptions {
    /// Open read-only; writes then fail with `EBADF`.
    pub readonly: bool,
    /// Bypass the page cache (`O_DIRECT`). Buffers, offsets and lengths
    /// must then follow [`BlockFile::direct_alignment`].
    pub direct: bool,
    /// Which path reads, writes and flushes take.
    pub engine: IoEngine,
}

/// Which path a disk's reads, writes and flushes take (`--disk
/// engine=`), as Firecracker's `io_engine` chooses between `Sync` and
/// `Async`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngine {
    /// `sync` for a regular file in memory (tmpfs, ramfs) opened without
    /// O_DIRECT, `uring` otherwise. io_uring cannot do such a file's I/O
    /// without blocking, so it hands every operation to one of its worker
    /// threads: a thread switch and a wake-up around a copy of memory.
    #[default]
    Auto,
    /// Through the iothread's io_uring.
    Uring,
    /// `preadv`/`pwritev`/`fdatasync` on the iothread itself: no ring, no
    /// worker thread, but a slow disk stalls every queue of that iothread.
    Sync,
}

impl IoEngine {
    pub fn name(self) -> &'static str {
        match self {
            IoEngine::Auto => "auto",
            IoEngine::Uring => "uring",
            IoEngine::Sync => "sync",
        }
    }
}

/// `statfs` magic numbers of the filesystems whose files are memory.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Whether `file` lives on tmpfs or ramfs.
fn in_memory(file: &File) -> bool {
    // SAFETY: statfs is plain data, filled by the kernel.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a buffer of the right size.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    rc == 0 && matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}

/// Errors from opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: its filesystem does not support O_DIRECT (direct=on); use direct=off or another filesystem")]
    DirectUnsupported {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the attributes of {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither a regular file nor a block device")]
    NotFileOrBlockDevice { path: PathBuf },
    #[error("{path}: {what} ioctl failed")]
    Ioctl {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Alignment O_DIRECT needs, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectAlignment {
    /// Of buffer addresses and lengths in memory.
    pub memory: u32,
    /// Of file offsets and lengths.
    pub offset: u32,
}

pub(crate) struct Inner {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    direct: bool,
    block_device: bool,
    logical_block_size: u32,
    alignment: DirectAlignment,
    discard: bool,
    /// Reads, writes and flushes run on the calling thread
    /// ([`IoEngine::Sync`], or `Auto` chose it).
    sync: bool,
    /// Cleared once `FALLOC_FL_ZERO_RANGE` turns out to be unsupported.
    zero_range: AtomicBool,
}

impl AsRawFd for Inner {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// An open disk image or block device.
#[derive(Clone)]
pub struct BlockFile(Arc<Inner>);

fn ioctl_value<T: Default>(file: &File, request: libc::c_ulong) -> std::io::Result<T> {
    let mut value = T::default();
    // SAFETY: both requests write one value of the type the caller asks
    // for (`int` for BLKSSZGET, `u64` for BLKGETSIZE64) into `value`.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut value as *mut T) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// `STATX_DIOALIGN` (Linux 6.1), if the kernel and filesystem report it.
fn dio_alignment(file: &File) -> Option<DirectAlignment> {
    // SAFETY: statx is plain data.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // The system call itself, not glibc's wrapper: in the static build the
    // wrapper is a weak reference that fat LTO left unresolved (a call to
    // address 0 as soon as a disk was opened).
    // SAFETY: an empty path with AT_EMPTY_PATH refers to the open fd;
    // `stx` is a valid buffer of the size the kernel writes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_statx,
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx as *mut libc::statx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_mem_align == 0 {
        return None;
    }
    Some(DirectAlignment {
        memory: stx.stx_dio_mem_align,
        offset: stx.stx_dio_offset_align,
    })
}

/// Whether a regular file's filesystem can punch holes: punching a range
/// past the end of the file (with `KEEP_SIZE`) changes nothing but fails
/// where the operation is unsupported.
fn file_can_punch(file: &File, size: u64) -> bool {
    let offset = size.next_multiple_of(4096) as libc::off_t;
    // SAFETY: plain syscall on an fd we own; the range lies past EOF.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            4096,
        )
    };
    rc == 0
}

/// Whether a block device advertises discard (sysfs; a partition's queue
/// is its disk's).
fn device_can_discard(rdev: u64) -> bool {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let base = format!("/sys/dev/block/{major}:{minor}");
    ["queue/discard_max_bytes", "../queue/discard_max_bytes"]
        .iter()
        .any(|p| {
            std::fs::read_to_string(format!("{base}/{p}"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
}

impl BlockFile {
    /// Opens a raw image or block device.
    pub fn open(path: &Path, opts: BlockOpenOptions) -> Result<BlockFile, BlockError> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.readonly);
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = match oo.open(path) {
            Ok(f) => f,
            Err(source) => {
                // EINVAL for O_DIRECT alone means the filesystem refuses it.
                let plain = || {
                    OpenOptions::new()
                        .read(true)
                        .write(!opts.readonly)
                        .open(path)
                        .is_ok()
                };
                if opts.direct && source.raw_os_error() == Some(libc::EINVAL) && plain() {
                    return Err(BlockError::DirectUnsupported {
                        path: path.to_path_buf(),
                        source,
                    });
                }
                return Err(BlockError::Open {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let meta = file.metadata().map_err(|source| BlockError::Stat {
            path: path.to_path_buf(),
            source,
        })?;
        let ioctl_err = |what| {
            move |source| BlockError::Ioctl {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let (size, block_device, logical_block_size) = if meta.file_type().is_block_device() {
            let size: u64 = ioctl_value(&file, BLKGETSIZE64).map_err(ioctl_err("BLKGETSIZE64"))?;
            let lbs: libc::c_int = ioctl_value(&file, BLKSSZGET).map_err(ioctl_err("BLKSSZGET"))?;
            (
                size,
                true,
                u32::try_from(lbs)
                    .unwrap_or(FILE_BLOCK_SIZE)
                    .max(FILE_BLOCK_SIZE),
            )
        } else if meta.file_type().is_file() {
            (meta.len(), false, FILE_BLOCK_SIZE)
        } else {
            return Err(BlockError::NotFileOrBlockDevice {
                path: path.to_path_buf(),
            });
        };
        let alignment = dio_alignment(&file).unwrap_or(DirectAlignment {
            memory: logical_block_size,
            offset: logical_block_size,
        });
        let discard = !opts.readonly
            && if block_device {
                device_can_discard(meta.rdev())
            } else {
                file_can_punch(&file, size)
            };
        let sync = match opts.engine {
            IoEngine::Sync => true,
            IoEngine::Uring => false,
            IoEngine::Auto => !opts.direct && !block_device && in_memory(&file),
        };
        log::debug!(
            "{}: {size} bytes, block device {block_device}, sector {logical_block_size}, \
             discard {discard}, direct {} {alignment:?}, engine {} ({})",
            path.display(),
            opts.direct,
            opts.engine.name(),
            if sync { "sync" } else { "uring" }
        );
        Ok(BlockFile(Arc::new(Inner {
            file,
            path: path.to_path_buf(),
            size,
            readonly: opts.readonly,
            direct: opts.direct,
            block_device,
            logical_block_size,
            alignment,
            discard,
            sync,
            zero_range: AtomicBool::new(true),
        })))
    }

    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// Size in bytes, as found at open.
    pub fn size(&self) -> u64 {
        self.0.size
    }

    pub fn readonly(&self) -> bool {
        self.0.readonly
    }

    pub fn direct(&self) -> bool {
        self.0.direct
    }

    /// Whether reads, writes and flushes run on the calling thread
    /// ([`BlockFile::run_sync`]) rather than through io_uring.
    pub fn synchronous(&self) -> bool {
        self.0.sync
    }

    pub fn is_block_device(&self) -> bool {
        self.0.block_device
    }

    /// The device's logical sector size (512 for regular files).
    pub fn logical_block_size(&self) -> u32 {
        self.0.logical_block_size
    }

    /// What O_DIRECT needs (from `STATX_DIOALIGN` where the kernel reports
    /// it, else the logical block size).
    pub fn direct_alignment(&self) -> DirectAlignment {
        self.0.alignment
    }

    /// Whether [`BlockFile::discard`] can work: hole punching on a file's
    /// filesystem, or discard on a block device; never when read-only.
    pub fn supports_discard(&self) -> bool {
        self.0.discard
    }
}
