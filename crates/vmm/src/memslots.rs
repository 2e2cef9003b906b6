//! KVM memory slots beyond guest RAM: device memory (a passed-through
//! device's BARs) mapped straight into the guest.
//!
//! Guest RAM takes the first slots when the VM is built; [`MemorySlots`]
//! hands out the rest. A [`MemorySlot`] is a guard: it keeps the host
//! mapping it points at alive and removes the slot from KVM when dropped,
//! so moving device memory is "drop the old slot, map a new one".

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

/// Errors from mapping device memory.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("all {limit} KVM memory slots are in use")]
    NoFreeSlot { limit: u32 },
    #[error(
        "cannot map {len:#x} bytes at offset {offset:#x} of a {area:#x}-byte area \
         at guest address {gpa:#x}: not page-aligned, empty or out of bounds"
    )]
    BadRange {
        gpa: u64,
        offset: u64,
        len: u64,
        area: u64,
    },
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} at {gpa:#x}")]
    Kvm {
        slot: u32,
        gpa: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("mmap of {len:#x} bytes at file offset {offset:#x}")]
    Mmap {
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
}

/// The host page size KVM slots are aligned to.
pub const PAGE_SIZE: u64 = 4096;

/// A shared mapping of part of a file (a device region), unmapped on drop.
pub struct MmapArea {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; nothing
// about it is tied to the thread that created it.
unsafe impl Send for MmapArea {}
// SAFETY: the value only hands out the address; accesses through it are
// volatile or made by KVM and the device, which expect concurrent use.
unsafe impl Sync for MmapArea {}

impl MmapArea {
    /// Maps `len` bytes of `fd` at `offset`, read/write and shared.
    pub fn map_shared(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<MmapArea, SlotError> {
        let err = |source| SlotError::Mmap {
            offset,
            len,
            source,
        };
        let size = usize::try_from(len)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: a new mapping at an address the kernel picks; it aliases no
        // Rust object, and `fd` is valid for the call.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(MmapArea {
            ptr: ptr.cast(),
            len: size,
        })
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Reads the little-endian u32 at `offset` (volatile), if in bounds.
    pub fn read_u32(&self, offset: u64) -> Option<u32> {
        let o = usize::try_from(offset).ok()?;
        if o % 4 != 0 || o.checked_add(4)? > self.len {
            return None;
        }
        // SAFETY: in bounds and aligned (checked above); the mapping lives
        // as long as `self`.
        Some(u32::from_le(unsafe {
            std::ptr::read_volatile(self.ptr.add(o).cast::<u32>())
        }))
    }
}

impl Drop for MmapArea {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned; slots that point into it
        // hold an Arc of this value, so none remains.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

struct SlotState {
    next: u32,
    free: Vec<u32>,
    in_use: usize,
}

/// The allocator of KVM memory slots after guest RAM's.
pub struct MemorySlots {
    vm: Arc<VmFd>,
    limit: u32,
    state: Mutex<SlotState>,
}

impl MemorySlots {
    /// Slots `first..limit` are free.
    pub fn new(vm: Arc<VmFd>, first: u32, limit: u32) -> Arc<MemorySlots> {
        Arc::new(MemorySlots {
            vm,
            limit,
            state: Mutex::new(SlotState {
                next: first,
                free: Vec::new(),
                in_use: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn allocate(&self) -> Result<u32, SlotError> {
        let mut s = self.lock();
        let slot = match s.free.pop() {
            Some(slot) => slot,
            None if s.next < self.limit => {
                s.next += 1;
                s.next - 1
            }
            None => return Err(SlotError::NoFreeSlot { limit: self.limit }),
        };
        s.in_use += 1;
        Ok(slot)
    }

    fn release(&self, slot: u32) {
        let mut s = self.lock();
        s.free.push(slot);
        s.in_use -= 1;
    }

    fn set(&self, slot: u32, gpa: u64, len: u64, host: u64) -> Result<(), kvm_ioctls::Error> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: with a size, `host` points into an `MmapArea` the slot's
        // guard keeps alive until it removes the slot (size 0) again.
        unsafe { self.vm.set_user_memory_region(region) }
    }

    /// Maps `[offset, offset + len)` of `area` at guest address `gpa`.
    pub fn map(
        self: &Arc<Self>,
        gpa: u64,
        area: Arc<MmapArea>,
        offset: u64,
        len: u64,
    ) -> Result<MemorySlot, SlotError> {
        let aligned = |v: u64| v % PAGE_SIZE == 0;
        let fits = offset.checked_add(len).is_some_and(|end| end <= area.len());
        if len == 0 || !aligned(gpa) || !aligned(offset) || !aligned(len) || !fits {
            return Err(SlotError::BadRange {
                gpa,
                offset,
                len,
                area: area.len(),
            });
        }
        let slot = self.allocate()?;
        let host = area.as_ptr() as u64 + offset;
        if let Err(source) = self.set(slot, gpa, len, host) {
            self.release(slot);
            return Err(SlotError::Kvm { slot, gpa, source });
        }
        Ok(MemorySlot {
            slots: self.clone(),
            slot,
            gpa,
            len,
            _area: area,
        })
    }

    /// Slots held by [`MemorySlot`]s now.
    pub fn in_use(&self) -> usize {
        self.lock().in_use
    }
}

/// One device-memory slot; removed from KVM when dropped.
pub struct MemorySlot {
    slots: Arc<MemorySlots>,
    slot: u32,
    gpa: u64,
    len: u64,
    _area: Arc<MmapArea>,
}

impl MemorySlot {
    pub fn guest_addr(&self) -> u64 {
        self.gpa
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MemorySlot {
    fn drop(&mut self) {
        if let Err(e) = self.slots.set(self.slot, self.gpa, 0, 0) {
            log::warn!(
                "removing KVM memory slot {} at {:#x}: {e}",
                self.slot,
                self.gpa
            );
        }
        self.slots.release(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd(len: u64) -> std::fs::File {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"slots-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a new descriptor we own.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn mmap_area_reads_what_the_file_holds() {
        use std::os::unix::fs::FileExt;
        let f = memfd(0x2000);
        f.write_all_at(&0x1234_5678u32.to_le_bytes(), 0x1004)
            .unwrap();
        let area = MmapArea::map_shared(std::os::fd::AsFd::as_fd(&f), 0x1000, 0x1000).unwrap();
        assert_eq!(area.read_u32(4), Some(0x1234_5678));
        assert_eq!(area.read_u32(0x1000), None);
        assert_eq!(area.read_u32(2), None);
    }

    #[test]
    fn slots_are_refused_when_misaligned_or_out_of_bounds() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            assert!(std::env::var("CI").as_deref() != Ok("true"));
            return;
        };
        let vm = Arc::new(kvm.create_vm().unwrap());
        let slots = MemorySlots::new(vm, 2, 4);
        let f = memfd(0x2000);
        let area = Arc::new(MmapArea::map_shared(std::os::fd::AsFd::as_fd(&f), 0, 0x2000).unwrap());
        assert!(matches!(
            slots.map(0x1_0000_0800, area.clone(), 0, 0x1000),
            Err(SlotError::BadRange { .. })
        ));
        assert!(matches!(
            slots.map(0x1_0000_0000, area.clone(), 0x1000, 0x2000),
            Err(SlotError::BadRange { .. })
        ));
        let a = slots.map(0x1_0000_0000, area.clone(), 0, 0x1000).unwrap();
        let b = slots
            .map(0x1_0000_1000, area.clone(), 0x1000, 0x1000)
            .unwrap();
        assert_eq!(slots.in_use(), 2);
        assert!(matches!(
            slots.map(0x1_0000_2000, area.clone(), 0, 0x1000),
            Err(SlotError::NoFreeSlot { limit: 4 })
        ));
        drop(a);
        assert_eq!(slots.in_use(), 1);
        let c = slots.map(0x1_0000_3000, area, 0, 0x1000).unwrap();
        assert_eq!(c.guest_addr(), 0x1_0000_3000);
        drop((b, c));
        assert_eq!(slots.in_use(), 0);
    }
}
