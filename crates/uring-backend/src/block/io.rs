//! I/O on a [`BlockFile`] through the calling thread's executor.
//!
//! Short transfers are completed: a read or write that moved fewer bytes
//! than asked is resubmitted for the rest. A read returns fewer bytes only
//! at the end of the file; a write returns fewer only if the kernel accepts
//! no byte at all (then the count so far). Errors keep the kernel's errno.

use std::io;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use super::{BlockFile, DirectIo};
use crate::executor::ops::RwBufs;
use crate::executor::Executor;
use crate::memory::{IoBuf, IoMemory};

/// Largest write of zeroes issued at once when the filesystem can neither
/// zero a range nor punch a hole.
pub const ZERO_CHUNK: usize = 1 << 20;

fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

fn unsupported(e: &io::Error) -> bool {
    errno(e) == Some(libc::EOPNOTSUPP)
}

/// Test builds only (debug assertions): a disk that fails mid-run.
/// `RINGVM_TEST_BLOCK_EIO=after=N,count=M` makes data transfers number
/// N+1 to N+M of the process (reads and writes, counted across disks and
/// iothreads) fail with `EIO` as a dying disk's would, without reaching
/// the file; the rest go through. Release builds have no such hook.
#[cfg(debug_assertions)]
mod inject {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static PLAN: OnceLock<Option<(u64, u64)>> = OnceLock::new();
    static OPS: AtomicU64 = AtomicU64::new(0);

    /// `after=N,count=M`; None if malformed.
    pub(super) fn parse(v: &str) -> Option<(u64, u64)> {
        let (mut after, mut count) = (None, None);
        for part in v.split(',') {
            match part.split_once('=')? {
                ("after", n) => after = Some(n.parse().ok()?),
                ("count", n) => count = Some(n.parse().ok()?),
                _ => return None,
            }
        }
        Some((after?, count?))
    }

    /// Whether this transfer is one of those to fail.
    pub(super) fn fails() -> bool {
        let plan = PLAN.get_or_init(|| {
            std::env::var("RINGVM_TEST_BLOCK_EIO")
                .ok()
                .and_then(|v| parse(&v))
        });
        let Some((after, count)) = *plan else {
            return false;
        };
        let n = OPS.fetch_add(1, Ordering::Relaxed);
        n >= after && n < after.saturating_add(count)
    }
}

/// The injected failure of a transfer, if any (see `inject`).
pub(super) fn injected_eio() -> Option<io::Error> {
    #[cfg(debug_assertions)]
    if inject::fails() {
        return Some(io::Error::from_raw_os_error(libc::EIO));
    }
    None
}

/// Drops the first `n` bytes from `iovecs` (after a short transfer).
pub fn advance(iovecs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut used = 0;
    for v in iovecs.iter_mut() {
        if n < v.iov_len {
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            break;
        }
        n -= v.iov_len;
        used += 1;
    }
    iovecs.drain(..used);
}

impl BlockFile {
    async fn rw(
        &self,
        ex: &Rc<Executor>,
        write: bool,
        offset: u64,
        bufs: RwBufs,
    ) -> io::Result<usize> {
        if let Some(e) = injected_eio() {
            return Err(e);
        }
        if self.0.sync && !crate::memory::covers(&*bufs.keepalive, &bufs.iovecs) {
            // As the ring's path refuses it.
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        let total: usize = bufs.iovecs.iter().map(|v| v.iov_len).sum();
        let mut bufs = bufs;
        let mut done = 0usize;
        while done < total {
            let at = offset + done as u64;
            if self.0.sync {
                // SAFETY: `bufs` holds the iovecs and keeps the memory
                // they point at alive across the call.
                match unsafe { self.sync_step(DirectIo::rw(write, at, &bufs.iovecs)) }? {
                    Some(0) => break,
                    Some(n) => {
                        done += n;
                        advance(&mut bufs.iovecs, n);
                    }
                    None => {}
                }
                continue;
            }
            let (res, back) = if write {
                ex.writev_bufs(self.0.clone(), at, bufs).await
            } else {
                ex.readv_bufs(self.0.clone(), at, bufs).await
            };
            bufs = back;
            match res {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    advance(&mut bufs.iovecs, n);
                }
                Err(e) if errno(&e) == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// One synchronous step of a transfer loop (the `sync` engine): the
    /// bytes moved (0 at the end of the file), or `None` to retry after
    /// `EINTR`.
    ///
    /// # Safety
    /// As [`BlockFile::run_sync`].
    unsafe fn sync_step(&self, io: DirectIo) -> io::Result<Option<usize>> {
        // SAFETY: the caller's promise.
        match unsafe { self.run_sync_unchecked(io) } {
            n if n >= 0 => Ok(Some(n as usize)),
            e if e == -libc::EINTR => Ok(None),
            e => Err(io::Error::from_raw_os_error(-e)),
        }
    }

    /// Reads into `iovecs` from `offset`; see [`Executor::readv`] for the
    /// keepalive. Returns the bytes read: all of them unless the file ends.
    pub async fn readv(
        &self,
        ex: &Rc<Executor>,
        offset: u64,
        iovecs: Vec<libc::iovec>,
        keepalive: Box<dyn IoMemory>,
    ) -> io::Result<usize> {
        self.rw(ex, false, offset, RwBufs { iovecs, keepalive })
            .await
    }

    /// Writes `iovecs` at `offset`; returns the bytes written (all of them
    /// unless the kernel stops accepting any).
    pub async fn writev(
        &self,
        ex: &Rc<Executor>,
        offset: u64,
        iovecs: Vec<libc::iovec>,
        keepalive: Box<dyn IoMemory>,
    ) -> io::Result<usize> {
        self.rw(ex, true, offset, RwBufs { iovecs, keepalive })
            .await
    }

    async fn fixed(
        &self,
        ex: &Rc<Executor>,
        write: bool,
        offset: u64,
        (buf, len, buf_index): (*mut u8, usize, u16),
        keepalive: Rc<dyn IoMemory>,
    ) -> io::Result<usize> {
        if u32::try_from(len).is_err() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if let Some(e) = injected_eio() {
            return Err(e);
        }
        if self.0.sync && len > 0 && !keepalive.contains(buf as usize, len) {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        let mut done = 0usize;
        while done < len {
            let ptr = buf.wrapping_add(done);
            let n = (len - done) as u32;
            let at = offset + done as u64;
            if self.0.sync {
                let io = DirectIo::fixed(write, at, ptr, n, buf_index);
                // SAFETY: `keepalive` keeps the buffer alive across the call.
                match unsafe { self.sync_step(io) }? {
                    Some(0) => break,
                    Some(r) => done += r,
                    None => {}
                }
                continue;
            }
            let keep: Box<dyn IoMemory> = Box::new(keepalive.clone());
            let res = if write {
                ex.write_fixed(self.0.clone(), at, ptr, n, buf_index, keep)
                    .await
            } else {
                ex.read_fixed(self.0.clone(), at, ptr, n, buf_index, keep)
                    .await
            };
            match res {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if errno(&e) == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Reads `len` bytes at `offset` into `buf`, which lies in registered
    /// buffer `buf_index` and inside `keepalive`. Same completion rules as
    /// [`BlockFile::readv`].
    pub async fn read_fixed(
        &self,
        ex: &Rc<Executor>,
        offset: u64,
        buf: *mut u8,
        len: usize,
        buf_index: u16,
        keepalive: Box<dyn IoMemory>,
    ) -> io::Result<usize> {
        self.fixed(
            ex,
            false,
            offset,
            (buf, len, buf_index),
            Rc::from(keepalive),
        )
        .await
    }

    /// Writes `len` bytes from `buf` at `offset`; as [`BlockFile::read_fixed`].
    pub async fn write_fixed(
        &self,
        ex: &Rc<Executor>,
        offset: u64,
        buf: *const u8,
        len: usize,
        buf_index: u16,
        keepalive: Box<dyn IoMemory>,
    ) -> io::Result<usize> {
        self.fixed(
            ex,
            true,
            offset,
            (buf.cast_mut(), len, buf_index),
            Rc::from(keepalive),
        )
        .await
    }

    /// Makes every completed write durable (`fdatasync`).
    pub async fn flush(&self, ex: &Rc<Executor>) -> io::Result<()> {
        if self.0.sync {
            // SAFETY: a flush points at no memory.
            return match unsafe { self.run_sync_unchecked(DirectIo::Flush) } {
                e if e < 0 => Err(io::Error::from_raw_os_error(-e)),
                _ => Ok(()),
            };
        }
        ex.fsync(self.0.clone(), true).await
    }

    /// Deallocates `[offset, offset + len)`, which then reads as zeroes
    /// (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`). `EOPNOTSUPP` where
    /// [`BlockFile::supports_discard`] is false.
    pub async fn discard(&self, ex: &Rc<Executor>, offset: u64, len: u64) -> io::Result<()> {
        if !self.0.discard {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        ex.fallocate(self.0.clone(), mode, offset, len).await
    }

    /// Makes `[offset, offset + len)` read as zeroes: `FALLOC_FL_ZERO_RANGE`
    /// if the filesystem has it, else a hole if `may_unmap` allows and
    /// discard works, else by writing zeroes.
    pub async fn write_zeroes(
        &self,
        ex: &Rc<Executor>,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.0.zero_range.load(Ordering::Relaxed) {
            let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            match ex.fallocate(self.0.clone(), mode, offset, len).await {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => self.0.zero_range.store(false, Ordering::Relaxed),
                Err(e) => return Err(e),
            }
        }
        if may_unmap && self.0.discard {
            match self.discard(ex, offset, len).await {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        self.write_zero_bytes(ex, offset, len).await
    }

    async fn write_zero_bytes(&self, ex: &Rc<Executor>, offset: u64, len: u64) -> io::Result<()> {
        let chunk = usize::try_from(len).unwrap_or(ZERO_CHUNK).min(ZERO_CHUNK);
        let zeroes = Rc::new(IoBuf::new(chunk));
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk as u64) as usize;
            let iov = vec![zeroes.iovec(0, n)];
            let written = self
                .writev(ex, offset + done, iov, Box::new(zeroes.clone()))
                .await?;
            if written == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            done += written as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::advance;

    #[test]
    fn eio_injection_plans_parse() {
        assert_eq!(super::inject::parse("after=5,count=3"), Some((5, 3)));
        assert_eq!(super::inject::parse("count=1,after=0"), Some((0, 1)));
        assert_eq!(super::inject::parse("after=5"), None);
        assert_eq!(super::inject::parse("after=x,count=1"), None);
        assert_eq!(super::inject::parse("later=1,count=1"), None);
    }

    fn iov(base: usize, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        }
    }

    fn shape(v: &[libc::iovec]) -> Vec<(usize, usize)> {
        v.iter().map(|i| (i.iov_base as usize, i.iov_len)).collect()
    }

    #[test]
    fn advance_drops_whole_and_trims_partial_iovecs() {
        let mut v = vec![iov(0x1000, 100), iov(0x2000, 50), iov(0x3000, 10)];
        advance(&mut v, 30);
        assert_eq!(
            shape(&v),
            vec![(0x1000 + 30, 70), (0x2000, 50), (0x3000, 10)]
        );
        advance(&mut v, 70);
        assert_eq!(shape(&v), vec![(0x2000, 50), (0x3000, 10)]);
        advance(&mut v, 55);
        assert_eq!(shape(&v), vec![(0x3000 + 5, 5)]);
        advance(&mut v, 5);
        assert!(v.is_empty());
    }
}
