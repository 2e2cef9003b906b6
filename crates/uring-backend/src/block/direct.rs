//! Block I/O whose completion goes to a handler instead of a future (see
//! the executor's `direct` module): what a device queue uses on its hot
//! path, where nothing may be allocated per request. The disk may be
//! named by its slot in the ring's registered-file table.
//!
//! Unlike the futures in `io.rs`, a direct transfer is one SQE: a short
//! transfer completes short, and the caller resubmits the rest.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use io_uring::{opcode, squeue, types};

use super::io::injected_eio;
use super::BlockFile;
use crate::executor::{Completion, Executor};

/// One block operation, as raw pointers into memory the handler keeps.
#[derive(Clone, Copy, Debug)]
pub enum DirectIo {
    Readv {
        offset: u64,
        iov: *const libc::iovec,
        count: u32,
    },
    Writev {
        offset: u64,
        iov: *const libc::iovec,
        count: u32,
    },
    /// Into a buffer inside registered buffer `index`.
    ReadFixed {
        offset: u64,
        buf: *mut u8,
        len: u32,
        index: u16,
    },
    WriteFixed {
        offset: u64,
        buf: *const u8,
        len: u32,
        index: u16,
    },
    /// `fdatasync`: everything written before is durable when it completes.
    Flush,
}

impl DirectIo {
    /// A vectored read (or, with `write`, write) of `iov` at `offset`.
    pub fn rw(write: bool, offset: u64, iov: &[libc::iovec]) -> DirectIo {
        let (iov, count) = (iov.as_ptr(), iov.len() as u32);
        if write {
            DirectIo::Writev { offset, iov, count }
        } else {
            DirectIo::Readv { offset, iov, count }
        }
    }

    /// A read (or write) of `len` bytes at `buf`, which lies inside
    /// registered buffer `index`.
    pub fn fixed(write: bool, offset: u64, buf: *mut u8, len: u32, index: u16) -> DirectIo {
        if write {
            DirectIo::WriteFixed {
                offset,
                buf: buf.cast_const(),
                len,
                index,
            }
        } else {
            DirectIo::ReadFixed {
                offset,
                buf,
                len,
                index,
            }
        }
    }
}

macro_rules! build_for {
    ($t:expr, $io:expr) => {
        match $io {
            DirectIo::Readv { offset, iov, count } => {
                opcode::Readv::new($t, iov, count).offset(offset).build()
            }
            DirectIo::Writev { offset, iov, count } => {
                opcode::Writev::new($t, iov, count).offset(offset).build()
            }
            DirectIo::ReadFixed {
                offset,
                buf,
                len,
                index,
            } => opcode::ReadFixed::new($t, buf, len, index)
                .offset(offset)
                .build(),
            DirectIo::WriteFixed {
                offset,
                buf,
                len,
                index,
            } => opcode::WriteFixed::new($t, buf, len, index)
                .offset(offset)
                .build(),
            DirectIo::Flush => opcode::Fsync::new($t)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
    };
}

/// The SQE for `io` on the disk named by its registered-file slot, or by
/// its descriptor.
fn entry(file_slot: Option<u32>, fd: RawFd, io: DirectIo) -> squeue::Entry {
    match file_slot {
        Some(slot) => build_for!(types::Fixed(slot), io).flags(squeue::Flags::FIXED_FILE),
        None => build_for!(types::Fd(fd), io),
    }
}

impl AsRawFd for BlockFile {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl BlockFile {
    /// Starts `io` on this disk through `ex`'s ring, the disk named by its
    /// registered-file slot `file_slot` if given; `handler` gets `tag` and
    /// the result. An error means nothing was started: the opcode is
    /// missing (`EOPNOTSUPP`), the submission queue stayed full, or (test
    /// builds) an injected disk failure.
    ///
    /// # Safety
    ///
    /// As [`Executor::submit_direct`]: the iovec array and every buffer
    /// `io` points at must stay valid until `handler` gets `tag`. The disk
    /// stays open that long because `handler` must keep this `BlockFile`
    /// (or the ring its slot).
    pub unsafe fn start(
        &self,
        ex: &Executor,
        file_slot: Option<u32>,
        handler: Rc<dyn Completion>,
        tag: u64,
        io: DirectIo,
    ) -> io::Result<()> {
        let ops = &ex.setup().opcodes;
        let (supported, transfer) = match io {
            DirectIo::Readv { .. } => (ops.readv, true),
            DirectIo::Writev { .. } => (ops.writev, true),
            DirectIo::ReadFixed { .. } => (ops.read_fixed, true),
            DirectIo::WriteFixed { .. } => (ops.write_fixed, true),
            DirectIo::Flush => (ops.fsync, false),
        };
        if !supported {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if transfer {
            if let Some(e) = injected_eio() {
                return Err(e);
            }
        }
        let sqe = entry(file_slot, self.as_raw_fd(), io);
        // SAFETY: the caller's contract is submit_direct's.
        unsafe { ex.submit_direct(handler, tag, sqe, false) }
    }
}

impl BlockFile {
    /// Runs `io` on the calling thread (the `sync` engine) and returns
    /// what its completion would carry: bytes moved, 0 for a flush, or
    /// `-errno`.
    ///
    /// # Safety
    ///
    /// The iovec array and every buffer `io` points at must be valid for
    /// the call (for writes to, for reads from, as the operation says).
    pub unsafe fn run_sync(&self, io: DirectIo) -> i32 {
        if !matches!(io, DirectIo::Flush) && injected_eio().is_some() {
            return -libc::EIO;
        }
        // SAFETY: the caller's contract.
        unsafe { self.run_sync_unchecked(io) }
    }

    /// [`BlockFile::run_sync`] without the test builds' fault injection
    /// (for callers that checked it once for a whole transfer).
    ///
    /// # Safety
    ///
    /// As [`BlockFile::run_sync`].
    pub(super) unsafe fn run_sync_unchecked(&self, io: DirectIo) -> i32 {
        let fd = self.as_raw_fd();
        // SAFETY: the caller vouches for the memory `io` points at; the
        // descriptor is this open disk.
        let rc = unsafe {
            match io {
                DirectIo::Readv { offset, iov, count } => {
                    libc::preadv(fd, iov, count as libc::c_int, offset as libc::off_t)
                }
                DirectIo::Writev { offset, iov, count } => {
                    libc::pwritev(fd, iov, count as libc::c_int, offset as libc::off_t)
                }
                DirectIo::ReadFixed {
                    offset, buf, len, ..
                } => libc::pread(fd, buf.cast(), len as usize, offset as libc::off_t),
                DirectIo::WriteFixed {
                    offset, buf, len, ..
                } => libc::pwrite(fd, buf.cast(), len as usize, offset as libc::off_t),
                DirectIo::Flush => libc::fdatasync(fd) as libc::ssize_t,
            }
        };
        if rc < 0 {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            i32::try_from(rc).unwrap_or(i32::MAX)
        }
    }
}
