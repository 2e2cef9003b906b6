//! Coalesced port writes: KVM's ring of buffered guest writes.
//!
//! A write to a port registered with `KVM_REGISTER_COALESCED_MMIO` (the
//! PIO flavour, `KVM_CAP_COALESCED_PIO`) does not leave `KVM_RUN`: KVM
//! appends it to a ring in a page shared with userspace and the guest
//! goes on. Every vCPU thread drains the ring, in order, after each
//! return from `KVM_RUN` and before it handles that exit, so a device
//! sees its coalesced writes before any access that exits (a status
//! read, a control write) and the guest cannot tell the difference,
//! provided that the write has no effect the guest could wait for
//! without exiting, such as an interrupt. The serial port therefore
//! coalesces its transmit register only while its interrupt enable
//! register is zero ([`crate::devices::serial`]).
//!
//! The ring is one page per VM, reached through any vCPU's fd; one
//! [`CoalescedRing`] is shared by all vCPU threads and a lock makes them
//! one consumer at a time.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{IoEventAddress, VmFd};
use thiserror::Error;

use crate::bus::Bus;

/// Errors of the coalesced ring and zones.
#[derive(Debug, Error)]
pub enum CoalescedError {
    #[error("mapping KVM's coalesced I/O ring")]
    Map(#[source] io::Error),
}

/// Where a drained write goes.
pub trait WriteSink {
    /// One coalesced write of `data` at `addr` (a port when `pio`).
    fn write(&self, pio: bool, addr: u64, data: &[u8]);
}

/// The PIO and MMIO buses, as the vCPU threads dispatch to them.
pub struct Buses<'a> {
    pub pio: &'a Bus,
    pub mmio: &'a Bus,
}

impl WriteSink for Buses<'_> {
    fn write(&self, pio: bool, addr: u64, data: &[u8]) {
        let bus = if pio { self.pio } else { self.mmio };
        if !bus.write(addr, data) {
            log::trace!("unhandled coalesced write {addr:#x} {data:02x?}");
        }
    }
}

/// The ring page: a header (`first`, written by us; `last`, written by
/// KVM) and the entries behind it.
pub struct CoalescedRing {
    page: NonNull<kvm_coalesced_mmio_ring>,
    /// Bytes of the mapping (one page), unmapped on drop when `owned`.
    len: usize,
    owned: bool,
    /// Entries the page holds.
    capacity: u32,
    /// Makes the vCPU threads one consumer at a time.
    consumer: Mutex<u64>,
}

// SAFETY: the page is plain shared memory; every access to the header and
// entries goes through atomics or volatile reads under `consumer`.
unsafe impl Send for CoalescedRing {}
// SAFETY: as above; `drain` takes the consumer lock.
unsafe impl Sync for CoalescedRing {}

impl CoalescedRing {
    /// Maps the VM's ring through a vCPU fd.
    pub fn map(vcpu: &impl AsRawFd) -> Result<Arc<CoalescedRing>, CoalescedError> {
        // SAFETY: sysconf has no memory effects.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: a fresh shared mapping of one page of the vCPU fd at the
        // offset KVM documents for the coalesced ring; nothing else is
        // touched, and the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                (KVM_COALESCED_MMIO_PAGE_OFFSET as usize * page_size) as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(CoalescedError::Map(io::Error::last_os_error()));
        }
        let page = NonNull::new(addr.cast())
            .ok_or_else(|| CoalescedError::Map(io::Error::from_raw_os_error(libc::EFAULT)))?;
        Ok(Arc::new(CoalescedRing {
            page,
            len: page_size,
            owned: true,
            capacity: capacity(page_size),
            consumer: Mutex::new(0),
        }))
    }

    /// A ring over memory the caller owns (tests: KVM's layout in a heap
    /// buffer of `len` bytes that outlives the ring).
    ///
    /// # Safety
    /// `page` must be valid for reads and writes of `len` bytes, aligned
    /// for the header, for the whole life of the returned ring.
    pub unsafe fn from_raw(page: NonNull<u8>, len: usize) -> CoalescedRing {
        CoalescedRing {
            page: page.cast(),
            len,
            owned: false,
            capacity: capacity(len),
            consumer: Mutex::new(0),
        }
    }

    fn first(&self) -> &AtomicU32 {
        // SAFETY: `first` is a naturally aligned u32 in the mapped page;
        // viewing it as an atomic is how the kernel and we share it.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.page.as_ptr()).first)) }
    }

    fn last(&self) -> &AtomicU32 {
        // SAFETY: as for `first`.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*self.page.as_ptr()).last)) }
    }

    /// Whether KVM has buffered anything (a cheap check before locking).
    pub fn is_empty(&self) -> bool {
        self.first().load(Ordering::Relaxed) == self.last().load(Ordering::Acquire)
    }

    /// Hands every buffered write to `sink`, oldest first; returns how
    /// many there were.
    pub fn drain(&self, sink: &impl WriteSink) -> usize {
        if self.is_empty() {
            return 0;
        }
        let mut total = self.consumer.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        loop {
            let first = self.first().load(Ordering::Relaxed);
            let last = self.last().load(Ordering::Acquire);
            if first == last || first >= self.capacity || last >= self.capacity {
                break;
            }
            // KVM writes the entry before it publishes `last` (smp_wmb);
            // the Acquire load above pairs with it.
            // SAFETY: `first` < capacity, so the entry lies inside the page.
            let entry: kvm_coalesced_mmio = unsafe {
                let entries = std::ptr::addr_of!((*self.page.as_ptr()).coalesced_mmio)
                    .cast::<kvm_coalesced_mmio>();
                entries.add(first as usize).read_volatile()
            };
            fence(Ordering::Release);
            self.first()
                .store((first + 1) % self.capacity, Ordering::Release);
            let len = (entry.len as usize).min(entry.data.len());
            sink.write(
                // SAFETY: reading a plain u32 of a union KVM filled in;
                // every bit pattern is valid.
                unsafe { entry.__bindgen_anon_1.pio } != 0,
                entry.phys_addr,
                &entry.data[..len],
            );
            n += 1;
        }
        *total += n as u64;
        n
    }

    /// Writes drained so far.
    pub fn drained(&self) -> u64 {
        *self.consumer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        if self.owned {
            // SAFETY: unmapping exactly the page `map` mapped; nothing
            // refers to it once the ring is gone.
            unsafe { libc::munmap(self.page.as_ptr().cast(), self.len) };
        }
    }
}

/// Entries that fit in a ring of `len` bytes (KVM's
/// `KVM_COALESCED_MMIO_MAX`).
fn capacity(len: usize) -> u32 {
    ((len - std::mem::size_of::<kvm_coalesced_mmio_ring>())
        / std::mem::size_of::<kvm_coalesced_mmio>()) as u32
}

/// Turns coalescing of one port range on and off.
pub trait CoalescedZone: Send {
    /// Coalesces writes to the zone (`on`) or makes them exit again.
    fn set(&mut self, on: bool);
}

/// A port range of a KVM VM, unregistered on drop: a zone left for
/// KVM to free with the VM made the VM fd's final close about 8 ms
/// slower here, the unregister (an SRCU grace period) about 2 ms.
pub struct PioZone {
    vm: Arc<VmFd>,
    port: u16,
    len: u32,
    on: bool,
}

impl PioZone {
    /// A zone that starts off.
    pub fn new(vm: Arc<VmFd>, port: u16, len: u32) -> PioZone {
        PioZone {
            vm,
            port,
            len,
            on: false,
        }
    }
}

impl CoalescedZone for PioZone {
    fn set(&mut self, on: bool) {
        if on == self.on {
            return;
        }
        let addr = IoEventAddress::Pio(u64::from(self.port));
        let done = if on {
            self.vm.register_coalesced_mmio(addr, self.len)
        } else {
            self.vm.unregister_coalesced_mmio(addr, self.len)
        };
        match done {
            Ok(()) => self.on = on,
            // Coalescing is an optimisation: on failure the writes simply
            // keep exiting (and a failed unregister leaves them coalesced,
            // which the device's condition then no longer allows: say so).
            Err(e) => log::warn!(
                "{} coalesced writes to port {:#x}: {e}",
                if on { "starting" } else { "stopping" },
                self.port
            ),
        }
    }
}

impl Drop for PioZone {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Lets KVM buffer the serial port's transmit writes (when it can): each
/// printed byte then costs no exit of its own.
pub(crate) fn coalesce_serial(
    vm: &crate::vm::Vm,
    vcpus: &mut [crate::vcpu::Vcpu],
    serial: &Arc<Mutex<crate::devices::serial::SerialConsole>>,
) {
    if !vm.kvm().check_extension(kvm_ioctls::Cap::CoalescedPio) {
        return;
    }
    let Some(first) = vcpus.first() else { return };
    let ring = match CoalescedRing::map(&first.fd) {
        Ok(ring) => ring,
        Err(e) => {
            log::debug!("serial writes not coalesced: {e}");
            return;
        }
    };
    for vcpu in vcpus.iter_mut() {
        vcpu.coalesced = Some(ring.clone());
    }
    // Only the transmit register: the others exit as before.
    serial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .set_coalescing(Box::new(PioZone::new(
            vm.fd().clone(),
            crate::devices::serial::COM1_PORT,
            1,
        )));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Log(StdMutex<Vec<(bool, u64, Vec<u8>)>>);

    impl WriteSink for Log {
        fn write(&self, pio: bool, addr: u64, data: &[u8]) {
            self.0.lock().unwrap().push((pio, addr, data.to_vec()));
        }
    }

    /// KVM's side: appends an entry as `coalesced_mmio_write` does.
    fn push(page: &mut [u64], cap: u32, addr: u64, byte: u8) {
        // SAFETY: the buffer is a zeroed, u64-aligned page in KVM's layout.
        unsafe {
            let ring = page.as_mut_ptr().cast::<kvm_coalesced_mmio_ring>();
            let last = (*ring).last;
            let entries =
                std::ptr::addr_of_mut!((*ring).coalesced_mmio).cast::<kvm_coalesced_mmio>();
            let e = &mut *entries.add(last as usize);
            e.phys_addr = addr;
            e.len = 1;
            e.__bindgen_anon_1.pio = 1;
            e.data = [0; 8];
            e.data[0] = byte;
            (*ring).last = (last + 1) % cap;
        }
    }

    #[test]
    fn drains_in_order_across_the_wrap() {
        let mut page = vec![0u64; 512];
        let len = page.len() * 8;
        let ptr = NonNull::new(page.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `page` outlives `ring` (dropped at the end of the test).
        let ring = unsafe { CoalescedRing::from_raw(ptr, len) };
        let cap = ring.capacity;
        assert_eq!(cap, 170, "KVM_COALESCED_MMIO_MAX for a 4 KiB page");
        let log = Log::default();
        assert_eq!(ring.drain(&log), 0);
        let mut expect = Vec::new();
        // Three rounds of 100 entries go round the 170-entry ring twice.
        for round in 0..3u8 {
            for i in 0..100u8 {
                let b = round.wrapping_mul(100).wrapping_add(i);
                push(&mut page, cap, 0x3f8, b);
                expect.push(b);
            }
            assert!(!ring.is_empty());
            assert_eq!(ring.drain(&log), 100);
            assert!(ring.is_empty());
        }
        let got: Vec<u8> = log.0.lock().unwrap().iter().map(|(_, _, d)| d[0]).collect();
        assert_eq!(got, expect);
        assert!(log
            .0
            .lock()
            .unwrap()
            .iter()
            .all(|(pio, a, d)| *pio && *a == 0x3f8 && d.len() == 1));
        assert_eq!(ring.drained(), 300);
    }

    #[test]
    fn a_corrupt_index_stops_the_drain() {
        let mut page = vec![0u64; 512];
        let len = page.len() * 8;
        let ptr = NonNull::new(page.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `page` outlives `ring`.
        let ring = unsafe { CoalescedRing::from_raw(ptr, len) };
        // `last` beyond the ring: nothing is read out of bounds.
        page[0] = 5000u64 << 32;
        assert_eq!(ring.drain(&Log::default()), 0);
    }
}
