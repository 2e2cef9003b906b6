//! Fixed (registered) buffers: registration, and finding the buffer that
//! holds a range.

use super::{Executor, ExecutorError};

/// io_uring refuses a registered buffer larger than 1 GiB.
pub const MAX_FIXED_BUFFER: usize = 1 << 30;
/// And more than this many buffers.
pub const MAX_FIXED_BUFFERS: usize = 1 << 14;

#[derive(Default)]
pub(super) struct FixedBuffers {
    /// (start address, length, index), sorted by start.
    ranges: Vec<(usize, usize, u16)>,
}

impl FixedBuffers {
    fn lookup(&self, addr: usize, len: usize) -> Option<u16> {
        let end = addr.checked_add(len)?;
        let i = self.ranges.partition_point(|&(start, _, _)| start <= addr);
        let &(start, size, index) = self.ranges.get(i.checked_sub(1)?)?;
        (end <= start + size).then_some(index)
    }
}

/// Splits regions into pieces io_uring accepts.
fn split(regions: &[(*mut u8, usize)]) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    for &(ptr, len) in regions {
        let mut off = 0;
        while off < len {
            let n = (len - off).min(MAX_FIXED_BUFFER);
            out.push(libc::iovec {
                iov_base: ptr.wrapping_add(off).cast(),
                iov_len: n,
            });
            off += n;
        }
    }
    out
}

impl Executor {
    /// Registers `regions` as the ring's fixed buffers (replacing any set
    /// registered before), split into pieces of at most 1 GiB.
    ///
    /// The kernel pins the pages of each region. They must stay mapped
    /// until [`Executor::unregister_buffers`] or the executor is dropped:
    /// fixed I/O on a range that was unmapped and mapped again would move
    /// data to or from the old, pinned pages. Pinning anonymous
    /// `MAP_NORESERVE` memory allocates all of it.
    ///
    /// On failure (the kernel may answer `EPERM`, `ENOMEM`, `EFAULT` or
    /// `EINVAL`, e.g. over `RLIMIT_MEMLOCK` or for file-backed memory) no
    /// buffers are registered and the executor goes on working without
    /// them.
    pub fn register_buffers(&self, regions: &[(*mut u8, usize)]) -> Result<(), ExecutorError> {
        let iovecs = split(regions);
        if iovecs.len() > MAX_FIXED_BUFFERS {
            return Err(ExecutorError::TooManyBuffers {
                count: iovecs.len(),
                max: MAX_FIXED_BUFFERS,
            });
        }
        if !self.buffers.borrow().ranges.is_empty() {
            self.unregister_buffers()?;
        }
        // Fixed reads and writes only target ranges that their keepalive
        // vouches for (see `ops.rs`).
        // SAFETY: the kernel reads the iovecs during the call and pins their
        // pages (EFAULT for unmapped ones), so fixed I/O only hits mapped memory.
        let res = unsafe { self.ring.borrow().submitter().register_buffers(&iovecs) };
        if let Err(source) = res {
            return Err(ExecutorError::RegisterBuffers {
                count: iovecs.len(),
                bytes: iovecs.iter().map(|v| v.iov_len as u64).sum(),
                source,
            });
        }
        let mut ranges: Vec<(usize, usize, u16)> = iovecs
            .iter()
            .enumerate()
            .map(|(i, v)| (v.iov_base as usize, v.iov_len, i as u16))
            .collect();
        ranges.sort_unstable();
        self.buffers.borrow_mut().ranges = ranges;
        Ok(())
    }

    /// Unregisters the fixed buffers, if any. Waits for no in-flight fixed
    /// I/O: the kernel keeps the pages pinned until such I/O completes.
    pub fn unregister_buffers(&self) -> Result<(), ExecutorError> {
        if self.buffers.borrow().ranges.is_empty() {
            return Ok(());
        }
        self.ring
            .borrow()
            .submitter()
            .unregister_buffers()
            .map_err(ExecutorError::UnregisterBuffers)?;
        self.buffers.borrow_mut().ranges.clear();
        Ok(())
    }

    /// The index of the registered buffer that wholly holds
    /// `[addr, addr + len)`, if any.
    pub fn fixed_index_for(&self, addr: *const u8, len: usize) -> Option<u16> {
        self.buffers.borrow().lookup(addr as usize, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_regions_are_split_at_one_gib() {
        let base = 0x1000_0000_0000usize as *mut u8;
        let v = split(&[
            (base, 2 * MAX_FIXED_BUFFER + 5),
            (base.wrapping_add(1 << 40), 10),
        ]);
        let lens: Vec<usize> = v.iter().map(|i| i.iov_len).collect();
        assert_eq!(lens, vec![MAX_FIXED_BUFFER, MAX_FIXED_BUFFER, 5, 10]);
        assert_eq!(v[1].iov_base as usize, base as usize + MAX_FIXED_BUFFER);
    }

    #[test]
    fn lookup_needs_one_buffer_to_hold_the_whole_range() {
        let b = FixedBuffers {
            ranges: vec![(0x1000, 0x1000, 0), (0x2000, 0x1000, 1), (0x8000, 0x100, 2)],
        };
        assert_eq!(b.lookup(0x1000, 0x1000), Some(0));
        assert_eq!(b.lookup(0x2800, 0x800), Some(1));
        assert_eq!(b.lookup(0x1800, 0x1000), None, "straddles two buffers");
        assert_eq!(b.lookup(0x0fff, 1), None);
        assert_eq!(b.lookup(0x8000, 0x101), None);
        assert_eq!(b.lookup(0x5000, 1), None);
        assert_eq!(b.lookup(usize::MAX, 2), None);
    }
}
