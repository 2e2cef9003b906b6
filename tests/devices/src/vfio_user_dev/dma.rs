//! DMA mappings: the file descriptors `DMA_MAP` hands over, mmapped
//! (MAP_SHARED) at their IOVA, and copies through them.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use vm_memory::VolatileSlice;

/// Most mappings one client may hold.
const MAX_MAPPINGS: usize = 1024;

/// A rejected mapping request or a failed copy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("DMA_MAP of {size:#x} bytes at IOVA {iova:#x}: empty, misaligned or wrapping")]
    BadRange { iova: u64, size: u64 },
    #[error("DMA_MAP at IOVA {iova:#x}: [{offset:#x}, +{size:#x}) is past the end of the file")]
    PastEnd { iova: u64, offset: u64, size: u64 },
    #[error("DMA_MAP at IOVA {iova:#x}: cannot stat the file")]
    Stat {
        iova: u64,
        #[source]
        source: io::Error,
    },
    #[error("DMA_MAP at IOVA {iova:#x} overlaps an existing mapping")]
    Overlap { iova: u64 },
    #[error("too many DMA mappings (at most {MAX_MAPPINGS})")]
    TooMany,
    #[error("cannot mmap {size:#x} bytes at file offset {offset:#x} for IOVA {iova:#x}")]
    Mmap {
        iova: u64,
        offset: u64,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("DMA_UNMAP of [{iova:#x}, +{size:#x}) cuts mapping at {mapping:#x}")]
    PartialUnmap { iova: u64, size: u64, mapping: u64 },
    #[error("DMA of {len:#x} bytes at {addr:#x} is outside every {access} mapping")]
    Outside {
        addr: u64,
        len: u64,
        access: &'static str,
    },
}

/// One mapping. The memory stays mapped until the value drops.
struct Mapping {
    iova: u64,
    size: u64,
    addr: NonNull<u8>,
    /// Bytes mmapped (`size`, rounded up by the kernel).
    len: usize,
    /// False when the client gave no file descriptor: the range is
    /// registered but the device cannot reach it (it does not implement
    /// `DMA_READ`/`DMA_WRITE` messages).
    mapped: bool,
    readable: bool,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory owned by this value; nothing
// about it is tied to the thread that created it.
unsafe impl Send for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: `addr`/`len` are exactly what mmap returned, and no
            // slice into the mapping outlives a `Mappings` method.
            unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
        }
    }
}

impl Mapping {
    fn end(&self) -> u64 {
        self.iova + self.size
    }

    /// The volatile slice for `[addr, addr + len)` if this mapping holds it
    /// and allows the access.
    fn slice(&self, addr: u64, len: usize, write: bool) -> Option<VolatileSlice<'_>> {
        let allowed = self.mapped && if write { self.writable } else { self.readable };
        let end = addr.checked_add(len as u64)?;
        if !allowed || addr < self.iova || end > self.end() {
            return None;
        }
        let off = (addr - self.iova) as usize;
        // SAFETY: `[off, off + len)` lies inside the mapping (checked above),
        // which lives as long as `self`; the guest is the only other user of
        // the memory, and this side only uses volatile copies.
        Some(unsafe { VolatileSlice::new(self.addr.as_ptr().add(off), len) })
    }
}

/// The mappings of the current client.
#[derive(Default)]
pub struct Mappings {
    list: Vec<Mapping>,
}

impl Mappings {
    /// Maps `size` bytes of `fd` at `offset` for the IOVA range `[iova,
    /// iova + size)`.
    pub fn map(
        &mut self,
        (readable, writable): (bool, bool),
        offset: u64,
        iova: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), Error> {
        let page = 4096;
        let end = iova.checked_add(size);
        let len = usize::try_from(size).ok();
        let (Some(end), Some(len)) = (end, len) else {
            return Err(Error::BadRange { iova, size });
        };
        if size == 0 || offset % page != 0 || i64::try_from(offset).is_err() {
            return Err(Error::BadRange { iova, size });
        }
        if self.list.iter().any(|m| iova < m.end() && m.iova < end) {
            return Err(Error::Overlap { iova });
        }
        if self.list.len() >= MAX_MAPPINGS {
            return Err(Error::TooMany);
        }
        let mut mapping = Mapping {
            iova,
            size,
            addr: NonNull::dangling(),
            len,
            mapped: false,
            readable,
            writable,
        };
        if let Some(fd) = fd {
            // Touching a shared mapping past the end of its file raises
            // SIGBUS: refuse such ranges of regular files (memfds are).
            let meta = fd
                .metadata()
                .map_err(|source| Error::Stat { iova, source })?;
            if meta.is_file() && offset.checked_add(size).is_none_or(|e| e > meta.len()) {
                return Err(Error::PastEnd { iova, offset, size });
            }
            let mut prot = 0;
            if readable {
                prot |= libc::PROT_READ;
            }
            if writable {
                prot |= libc::PROT_WRITE;
            }
            // SAFETY: a new shared mapping chosen by the kernel; it overlaps
            // no Rust object. The fd may be closed afterwards.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if addr == libc::MAP_FAILED {
                return Err(Error::Mmap {
                    iova,
                    offset,
                    size,
                    source: io::Error::last_os_error(),
                });
            }
            mapping.addr = NonNull::new(addr.cast()).ok_or(Error::BadRange { iova, size })?;
            mapping.mapped = true;
        }
        self.list.push(mapping);
        Ok(())
    }

    /// Removes every mapping inside `[iova, iova + size)` (all of them
    /// with `all`); returns how many. A mapping the range only partly
    /// covers is an error, and nothing is removed then.
    pub fn unmap(&mut self, all: bool, iova: u64, size: u64) -> Result<usize, Error> {
        let before = self.list.len();
        if all {
            self.list.clear();
            return Ok(before);
        }
        let end = iova.saturating_add(size);
        if let Some(m) = self
            .list
            .iter()
            .find(|m| m.iova < end && iova < m.end() && (m.iova < iova || m.end() > end))
        {
            return Err(Error::PartialUnmap {
                iova,
                size,
                mapping: m.iova,
            });
        }
        self.list.retain(|m| m.iova < iova || m.end() > end);
        Ok(before - self.list.len())
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn clear(&mut self) {
        self.list.clear();
    }

    fn find(&self, addr: u64, len: usize, write: bool) -> Result<VolatileSlice<'_>, Error> {
        self.list
            .iter()
            .find_map(|m| m.slice(addr, len, write))
            .ok_or(Error::Outside {
                addr,
                len: len as u64,
                access: if write { "writable" } else { "readable" },
            })
    }

    /// Copies `len` bytes from IOVA `src` to IOVA `dst`; each range must
    /// lie inside one mapping. Overlapping ranges copy as if through a
    /// buffer.
    pub fn copy(&self, src: u64, dst: u64, len: usize) -> Result<(), Error> {
        let from = self.find(src, len, false)?;
        let to = self.find(dst, len, true)?;
        let mut buf = vec![0u8; len];
        from.copy_to(&mut buf[..]);
        to.copy_from(&buf[..]);
        Ok(())
    }
}
