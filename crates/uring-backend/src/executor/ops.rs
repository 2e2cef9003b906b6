//! The operations the executor offers.
//!
//! Each takes ownership of what the kernel uses (the file handle, iovec
//! array and a keepalive for the data memory) and keeps it in the op table
//! until the completion arrives, even if the returned future is dropped.
//! The SQE is queued when the method is called and reaches the kernel with
//! the turn's `io_uring_enter`. Results keep the kernel's errno.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types};
use vmm_sys_util::eventfd::EventFd;

use super::op::Op;
use super::Executor;
use crate::memory::{covers, IoMemory};

/// Iovecs plus the keepalive of the memory they point into.
pub(crate) struct RwBufs {
    pub(crate) iovecs: Vec<libc::iovec>,
    pub(crate) keepalive: Box<dyn IoMemory>,
}

struct Rw<F> {
    fd: F,
    bufs: RwBufs,
}

struct Fixed<F> {
    fd: F,
    _keepalive: Box<dyn IoMemory>,
}

/// An 8-byte eventfd read. The counter lands in a `Vec`'s heap buffer,
/// which stays put while the op's box moves into the op table.
pub(super) struct EventFdRead {
    fd: Arc<EventFd>,
    buf: Vec<u8>,
}

impl EventFdRead {
    pub(super) fn new(fd: Arc<EventFd>) -> Box<EventFdRead> {
        Box::new(EventFdRead {
            fd,
            buf: vec![0; 8],
        })
    }

    pub(super) fn entry(&mut self) -> squeue::Entry {
        opcode::Read::new(fd_of(&*self.fd), self.buf.as_mut_ptr(), 8).build()
    }

    fn value(&self) -> u64 {
        let mut v = [0u8; 8];
        v.copy_from_slice(&self.buf[..8]);
        u64::from_ne_bytes(v)
    }
}

fn fd_of(fd: &impl AsRawFd) -> types::Fd {
    types::Fd(fd.as_raw_fd())
}

/// A CQE result as a byte count.
fn to_len(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

fn to_unit(res: i32) -> io::Result<()> {
    to_len(res).map(drop)
}

impl Executor {
    /// Queues an op if the kernel has its opcode, else fails it with
    /// `EOPNOTSUPP`.
    fn op_if<R: 'static>(
        &self,
        supported: bool,
        owned: Box<R>,
        build: impl FnOnce(&mut R) -> squeue::Entry,
    ) -> Op<'_, R> {
        if supported {
            self.submit_op(owned, build)
        } else {
            Op::failed(self, libc::EOPNOTSUPP, owned)
        }
    }

    /// An operation that does nothing; completes in the next turn.
    pub fn nop(&self) -> impl Future<Output = io::Result<()>> + '_ {
        let op = self.op_if(self.setup.opcodes.nop, Box::new(()), |_| {
            opcode::Nop::new().build()
        });
        async move { to_unit(op.await.0) }
    }

    /// Cancels every operation of this ring on `fd` and completes when
    /// the kernel has processed the cancellation, with the number of
    /// operations cancelled. The cancelled operations' own futures then
    /// complete with `ECANCELED` (or with their result, if they finished
    /// first): await them to know the kernel is done with their buffers.
    pub fn cancel_fd<F: AsRawFd + 'static>(
        &self,
        fd: F,
    ) -> impl Future<Output = io::Result<usize>> + '_ {
        let op = self.op_if(self.setup.opcodes.async_cancel, Box::new(fd), |f| {
            opcode::AsyncCancel2::new(types::CancelBuilder::fd(fd_of(&*f)).all()).build()
        });
        async move {
            match op.await.0 {
                res if res == -libc::ENOENT => Ok(0),
                res => to_len(res),
            }
        }
    }

    /// Reads an eventfd's counter (8 bytes), waiting until it is non-zero.
    pub fn read_eventfd(&self, fd: Arc<EventFd>) -> impl Future<Output = io::Result<u64>> + '_ {
        let op = if self.setup.opcodes.read {
            self.submit_op_waiting(EventFdRead::new(fd), EventFdRead::entry, true)
        } else {
            Op::failed(self, libc::EOPNOTSUPP, EventFdRead::new(fd))
        };
        async move {
            let (res, owned) = op.await;
            match to_len(res)? {
                8 => Ok(owned.value()),
                n => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("eventfd read returned {n} bytes"),
                )),
            }
        }
    }

    fn rw_op<F: AsRawFd + 'static>(
        &self,
        write: bool,
        fd: F,
        offset: u64,
        bufs: RwBufs,
    ) -> Op<'_, Rw<F>> {
        self.rw_op_waiting(write, fd, offset, bufs, false)
    }

    fn rw_op_waiting<F: AsRawFd + 'static>(
        &self,
        write: bool,
        fd: F,
        offset: u64,
        bufs: RwBufs,
        waits: bool,
    ) -> Op<'_, Rw<F>> {
        let owned = Box::new(Rw { fd, bufs });
        if !covers(&*owned.bufs.keepalive, &owned.bufs.iovecs) {
            return Op::failed(self, libc::EFAULT, owned);
        }
        let Ok(count) = u32::try_from(owned.bufs.iovecs.len()) else {
            return Op::failed(self, libc::EINVAL, owned);
        };
        let supported = if write {
            self.setup.opcodes.writev
        } else {
            self.setup.opcodes.readv
        };
        if !supported {
            return Op::failed(self, libc::EOPNOTSUPP, owned);
        }
        self.submit_op_waiting(
            owned,
            |r| {
                let iov = r.bufs.iovecs.as_ptr();
                if write {
                    opcode::Writev::new(fd_of(&r.fd), iov, count)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Readv::new(fd_of(&r.fd), iov, count)
                        .offset(offset)
                        .build()
                }
            },
            waits,
        )
    }

    /// `preadv` through the ring, giving the buffers back.
    pub(crate) fn readv_bufs<F: AsRawFd + 'static>(
        &self,
        fd: F,
        offset: u64,
        bufs: RwBufs,
    ) -> impl Future<Output = (io::Result<usize>, RwBufs)> + '_ {
        let op = self.rw_op(false, fd, offset, bufs);
        async move {
            let (res, owned) = op.await;
            (to_len(res), owned.bufs)
        }
    }

    /// `pwritev` through the ring, giving the buffers back.
    pub(crate) fn writev_bufs<F: AsRawFd + 'static>(
        &self,
        fd: F,
        offset: u64,
        bufs: RwBufs,
    ) -> impl Future<Output = (io::Result<usize>, RwBufs)> + '_ {
        let op = self.rw_op(true, fd, offset, bufs);
        async move {
            let (res, owned) = op.await;
            (to_len(res), owned.bufs)
        }
    }

    /// As [`Executor::readv`], for a read that waits on an outside event
    /// (a frame arriving on a TAP) rather than on the kernel finishing
    /// work: polling does not spin for it (see [`PollWhen::IoInFlight`]).
    ///
    /// [`PollWhen::IoInFlight`]: super::PollWhen::IoInFlight
    pub fn readv_waiting<F: AsRawFd + 'static>(
        &self,
        fd: F,
        iovecs: Vec<libc::iovec>,
        keepalive: Box<dyn IoMemory>,
    ) -> impl Future<Output = io::Result<usize>> + '_ {
        let op = self.rw_op_waiting(false, fd, 0, RwBufs { iovecs, keepalive }, true);
        async move { to_len(op.await.0) }
    }

    /// Reads into `iovecs` from `offset` of `fd` (one `preadv`; may be
    /// short). Every iovec must lie inside `keepalive`, which keeps the
    /// memory mapped until the kernel is done, or the read fails with
    /// `EFAULT`. `fd` is an owned handle (`Arc<File>`, `OwnedFd`, ...).
    pub fn readv<F: AsRawFd + 'static>(
        &self,
        fd: F,
        offset: u64,
        iovecs: Vec<libc::iovec>,
        keepalive: Box<dyn IoMemory>,
    ) -> impl Future<Output = io::Result<usize>> + '_ {
        let fut = self.readv_bufs(fd, offset, RwBufs { iovecs, keepalive });
        async move { fut.await.0 }
    }

    /// Writes `iovecs` at `offset` of `fd` (one `pwritev`; may be short).
    /// Same rules as [`Executor::readv`].
    pub fn writev<F: AsRawFd + 'static>(
        &self,
        fd: F,
        offset: u64,
        iovecs: Vec<libc::iovec>,
        keepalive: Box<dyn IoMemory>,
    ) -> impl Future<Output = io::Result<usize>> + '_ {
        let fut = self.writev_bufs(fd, offset, RwBufs { iovecs, keepalive });
        async move { fut.await.0 }
    }

    fn fixed_op<F: AsRawFd + 'static>(
        &self,
        write: bool,
        fd: F,
        offset: u64,
        (buf, len, buf_index): (*mut u8, u32, u16),
        keepalive: Box<dyn IoMemory>,
    ) -> Op<'_, Fixed<F>> {
        let inside = len == 0 || keepalive.contains(buf as usize, len as usize);
        let owned = Box::new(Fixed {
            fd,
            _keepalive: keepalive,
        });
        if !inside {
            return Op::failed(self, libc::EFAULT, owned);
        }
        let ops = &self.setup.opcodes;
        let supported = if write {
            ops.write_fixed
        } else {
            ops.read_fixed
        };
        self.op_if(supported, owned, |r| {
            if write {
                opcode::WriteFixed::new(fd_of(&r.fd), buf, len, buf_index)
                    .offset(offset)
                    .build()
            } else {
                opcode::ReadFixed::new(fd_of(&r.fd), buf, len, buf_index)
                    .offset(offset)
                    .build()
            }
        })
    }

    /// Reads `len` bytes at `offset` into `buf`, which lies in registered
    /// buffer `buf_index` (see [`Executor::fixed_index_for`]) and inside
    /// `keepalive` (else `EFAULT`). One read; may be short.
    pub fn read_fixed<F: AsRawFd + 'static>(
        &self,
        fd: F,
        offset: u64,
        buf: *mut u8,
        len: u32,
        buf_index: u16,
        keepalive: Box<dyn IoMemory>,
    ) -> impl Future<Output = io::Result<usize>> + '_ {
        let op = self.fixed_op(false, fd, offset, (buf, len, buf_index), keepalive);
        async move { to_len(op.await.0) }
    }

    /// Writes `len` bytes from `buf` at `offset`; as [`Executor::read_fixed`].
    pub fn write_fixed<F: AsRawFd + 'static>(
        &self,
        fd: F,
        offset: u64,
        buf: *const u8,
        len: u32,
        buf_index: u16,
        keepalive: Box<dyn IoMemory>,
    ) -> impl Future<Output = io::Result<usize>> + '_ {
        let op = self.fixed_op(
            true,
            fd,
            offset,
            (buf.cast_mut(), len, buf_index),
            keepalive,
        );
        async move { to_len(op.await.0) }
    }

    /// `fsync`, or `fdatasync` when `datasync`.
    pub fn fsync<F: AsRawFd + 'static>(
        &self,
        fd: F,
        datasync: bool,
    ) -> impl Future<Output = io::Result<()>> + '_ {
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let op = self.op_if(self.setup.opcodes.fsync, Box::new(fd), |fd| {
            opcode::Fsync::new(fd_of(fd)).flags(flags).build()
        });
        async move { to_unit(op.await.0) }
    }

    /// `fallocate(fd, mode, offset, len)`.
    pub fn fallocate<F: AsRawFd + 'static>(
        &self,
        fd: F,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = io::Result<()>> + '_ {
        let op = self.op_if(self.setup.opcodes.fallocate, Box::new(fd), |fd| {
            opcode::Fallocate::new(fd_of(fd), len)
                .offset(offset)
                .mode(mode)
                .build()
        });
        async move { to_unit(op.await.0) }
    }
}
