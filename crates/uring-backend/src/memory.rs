//! Memory the kernel may read or write while an operation is in flight.
//!
//! An operation that moves data takes raw iovecs plus a *keepalive*: a
//! value that keeps the memory behind those iovecs mapped until the
//! operation's completion arrives. The keepalive also vouches for the
//! iovecs: every iovec must lie inside memory it keeps alive, or the
//! operation fails with `EFAULT` before anything reaches the kernel.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    GuestMemoryBackend, GuestMemoryRegion, GuestRegionCollection, GuestRegionMmap,
    MemoryRegionAddress,
};

/// Memory that stays mapped, and may be read and written by the kernel, for
/// as long as the value lives.
///
/// # Safety
///
/// For every range where [`IoMemory::contains`] returns true, the
/// implementation guarantees that the range is mapped for as long as the
/// value lives (moving the value must not move the memory), and that no Rust
/// reference (`&[u8]`/`&mut [u8]`) to those bytes is live while the value
/// is held by an operation: the memory is accessed like device memory, by
/// copies through raw pointers or volatile accesses only.
pub unsafe trait IoMemory: 'static {
    /// Whether `[addr, addr + len)` lies wholly inside memory this value
    /// keeps alive.
    fn contains(&self, addr: usize, len: usize) -> bool;
}

/// Checks that every iovec lies inside `mem`.
pub(crate) fn covers(mem: &dyn IoMemory, iovecs: &[libc::iovec]) -> bool {
    iovecs
        .iter()
        .all(|v| v.iov_len == 0 || mem.contains(v.iov_base as usize, v.iov_len))
}

fn inside(start: usize, size: usize, addr: usize, len: usize) -> bool {
    addr >= start
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= start.saturating_add(size))
}

// SAFETY: a guest memory collection holds its regions' mappings (through
// `Arc`s) until the last clone is dropped, and the regions never move.
// Guest memory is only ever accessed through volatile slices, never through
// Rust references, so the kernel writing it races with nothing in Rust.
unsafe impl<B: Bitmap + 'static> IoMemory for GuestRegionCollection<GuestRegionMmap<B>> {
    fn contains(&self, addr: usize, len: usize) -> bool {
        self.iter().any(|region| {
            region
                .get_host_address(MemoryRegionAddress(0))
                .is_ok_and(|base| inside(base as usize, region.len() as usize, addr, len))
        })
    }
}

// SAFETY: the `Rc` keeps the inner value (and so its memory) alive.
unsafe impl<T: IoMemory + ?Sized> IoMemory for Rc<T> {
    fn contains(&self, addr: usize, len: usize) -> bool {
        (**self).contains(addr, len)
    }
}

// SAFETY: the `Arc` keeps the inner value (and so its memory) alive.
unsafe impl<T: IoMemory + ?Sized> IoMemory for Arc<T> {
    fn contains(&self, addr: usize, len: usize) -> bool {
        (**self).contains(addr, len)
    }
}

// SAFETY: the `Box` keeps the inner value (and so its memory) alive.
unsafe impl<T: IoMemory + ?Sized> IoMemory for Box<T> {
    fn contains(&self, addr: usize, len: usize) -> bool {
        (**self).contains(addr, len)
    }
}

/// Alignment of [`IoBuf`]: a page, enough for any O_DIRECT file.
pub const IO_BUF_ALIGN: usize = 4096;

/// A zero-filled, page-aligned heap buffer for I/O, shared with in-flight
/// operations through an `Rc` (`Rc<IoBuf>` is an [`IoMemory`]).
///
/// Like guest memory it is accessed by copying in and out, never through
/// references, because the kernel may write it at any time while an
/// operation holds it. It is neither `Send` nor `Sync`: one thread copies
/// at a time.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    // Makes the type !Send and !Sync.
    _local: std::marker::PhantomData<*mut u8>,
}

impl IoBuf {
    /// A zeroed buffer of `len` bytes (at least one page is allocated).
    pub fn new(len: usize) -> IoBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf {
            ptr,
            len,
            _local: std::marker::PhantomData,
        }
    }

    fn layout(len: usize) -> Layout {
        let size = len.max(1).next_multiple_of(IO_BUF_ALIGN);
        match Layout::from_size_align(size, IO_BUF_ALIGN) {
            Ok(l) => l,
            Err(_) => panic!("IoBuf of {len} bytes is too large"),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer's address (for iovecs and fixed-buffer registration).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// An iovec for `[offset, offset + len)`; panics if out of bounds.
    pub fn iovec(&self, offset: usize, len: usize) -> libc::iovec {
        self.check(offset, len);
        libc::iovec {
            // SAFETY: the range was checked to be inside the allocation.
            iov_base: unsafe { self.ptr.as_ptr().add(offset) }.cast(),
            iov_len: len,
        }
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "range {offset}+{len} outside an IoBuf of {} bytes",
            self.len
        );
    }

    /// Copies `dst.len()` bytes out, starting at `offset`.
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) {
        self.check(offset, dst.len());
        // SAFETY: the source range is inside the allocation, `dst` is a
        // distinct Rust slice, and no reference to the buffer exists.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
    }

    /// Copies `src` in, starting at `offset`.
    pub fn write_at(&self, offset: usize, src: &[u8]) {
        self.check(offset, src.len());
        // SAFETY: the destination range is inside the allocation, `src` is
        // a distinct Rust slice, and no reference to the buffer exists.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len())
        };
    }

    /// The whole buffer, copied out.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.read_at(0, &mut v);
        v
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with the same layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
    }
}

// SAFETY: the allocation lives as long as the `IoBuf` and does not move
// with it; the type hands out no references to its bytes.
unsafe impl IoMemory for IoBuf {
    fn contains(&self, addr: usize, len: usize) -> bool {
        inside(self.ptr.as_ptr() as usize, self.len, addr, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn io_buf_is_aligned_and_bounded() {
        let b = IoBuf::new(100);
        assert_eq!(b.as_ptr() as usize % IO_BUF_ALIGN, 0);
        b.write_at(10, b"abc");
        let mut out = [0u8; 3];
        b.read_at(10, &mut out);
        assert_eq!(&out, b"abc");
        let base = b.as_ptr() as usize;
        assert!(b.contains(base, 100));
        assert!(!b.contains(base, 101));
        assert!(!b.contains(base - 1, 1));
        assert!(!b.contains(usize::MAX, 2));
    }

    #[test]
    fn guest_memory_contains_only_its_regions() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x10000),
        ])
        .expect("guest memory");
        let regions: Vec<(usize, usize)> = mem
            .iter()
            .map(|r| {
                (
                    r.get_host_address(MemoryRegionAddress(0))
                        .expect("host address") as usize,
                    r.len() as usize,
                )
            })
            .collect();
        for &(base, len) in &regions {
            assert!(mem.contains(base, len));
            assert!(!mem.contains(base, len + 1) || regions.iter().any(|&(b, _)| b == base + len));
        }
        let iov = [libc::iovec {
            iov_base: regions[0].0 as *mut libc::c_void,
            iov_len: 512,
        }];
        assert!(covers(&mem, &iov));
        let bad = [libc::iovec {
            iov_base: 8 as *mut libc::c_void,
            iov_len: 512,
        }];
        assert!(!covers(&mem, &bad));
    }
}
