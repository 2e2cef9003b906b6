//! Split virtqueues (virtio 1.x, 2.7).
//!
//! Each queue owns 12 KiB of static, page-aligned memory: the descriptor
//! table at +0 (16 bytes x size), the driver ("avail") ring at +4 KiB
//! (flags, idx, ring[size], used_event) and the device ("used") ring at
//! +8 KiB (flags, idx, ring[size] of {id u32, len u32}, avail_event).
//!
//! Ordering: x86 keeps stores in order and loads in order, so publishing
//! needs only compiler barriers; the full fence the spec asks for sits
//! between publishing an index and reading the other side's event field
//! (`fence(SeqCst)`, a locked instruction on this soft-float target).

use core::cell::UnsafeCell;
use core::sync::atomic::{fence, Ordering};

/// Largest queue size this driver uses.
pub const MAX_SIZE: u16 = 256;
/// Queues with static ring memory.
pub const MAX_QUEUES: usize = 8;

const AVAIL_OFF: usize = 4096;
const USED_OFF: usize = 8192;
const RING_BYTES: usize = 3 * 4096;

/// Descriptor flags.
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;
pub const DESC_INDIRECT: u16 = 4;
/// used.flags: the device does not want notifications.
const USED_NO_NOTIFY: u16 = 1;

/// A descriptor (table entry or indirect table entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

#[repr(C, align(4096))]
struct RingMem(UnsafeCell<[u64; RING_BYTES / 8]>);

// SAFETY: ring memory is shared only with the device; the single vCPU
// accesses it through raw pointers in `Queue`.
unsafe impl Sync for RingMem {}

static RINGS: [RingMem; MAX_QUEUES] =
    [const { RingMem(UnsafeCell::new([0; RING_BYTES / 8])) }; MAX_QUEUES];

/// The spec's notification-suppression test: with event index `event`,
/// did moving an index from `old` to `new` cross it?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Driver state of one split virtqueue.
pub struct Queue {
    pub index: u16,
    size: u16,
    base: *mut u8,
    notify: u64,
    event_idx: bool,
    /// Shadow of avail.idx (entries pushed, maybe not yet published).
    next_avail: u16,
    /// avail.idx at the last publish.
    published: u16,
    /// Next used entry to consume.
    last_used: u16,
}

impl Queue {
    /// Zeroes the parts of queue `index`'s ring memory (`index` <
    /// [`MAX_QUEUES`]) that `size` entries use (a power of two <= 256) and
    /// returns the queue's state. A zero `size` makes a placeholder for a
    /// queue that is not used, and touches no memory.
    pub fn new(index: u16, size: u16, event_idx: bool) -> Queue {
        Queue::new_in(usize::from(index), index, size, event_idx)
    }

    /// [`Queue::new`] for device queue `index` on the ring memory of slot
    /// `slot` (< [`MAX_QUEUES`]): for devices whose queue indices are
    /// sparse (virtio-net's control queue sits after every queue pair).
    pub fn new_in(slot: usize, index: u16, size: u16, event_idx: bool) -> Queue {
        let mem = RINGS[slot].0.get().cast::<u64>();
        let n = usize::from(size);
        // Descriptors, then flags/idx/ring/used_event, then flags/idx/
        // ring/avail_event, each rounded up to whole words.
        for (off, bytes) in [(0, 16 * n), (AVAIL_OFF, 6 + 2 * n), (USED_OFF, 6 + 8 * n)] {
            if size != 0 {
                // The device does not use this memory now (before the queue
                // is enabled, or after a reset).
                // SAFETY: inside this queue's 12 KiB, and no reference to it exists.
                let words =
                    unsafe { core::slice::from_raw_parts_mut(mem.add(off / 8), bytes.div_ceil(8)) };
                crate::pattern::fill(words, 0);
            }
        }
        Queue {
            index,
            size,
            base: mem.cast(),
            notify: 0,
            event_idx,
            next_avail: 0,
            published: 0,
            last_used: 0,
        }
    }

    /// Guest-physical addresses of the descriptor table, driver and device
    /// rings (identity map).
    pub fn ring_addresses(&self) -> [u64; 3] {
        let b = self.base as u64;
        [b, b + AVAIL_OFF as u64, b + USED_OFF as u64]
    }

    /// Sets the notify register address (known after queue setup).
    pub fn set_notify(&mut self, addr: u64) {
        self.notify = addr;
    }

    fn mask(&self, i: u16) -> usize {
        usize::from(i & (self.size - 1))
    }

    /// Pointer to a u16 at byte offset `off` of the ring memory.
    fn u16_at(&self, off: usize) -> *mut u16 {
        debug_assert!(off + 2 <= RING_BYTES);
        // SAFETY: callers pass offsets inside the 12 KiB ring memory.
        unsafe { self.base.add(off).cast() }
    }

    /// Pointer to descriptor `i` (< size).
    pub fn desc_ptr(&mut self, i: u16) -> *mut Desc {
        assert!(i < self.size);
        // SAFETY: the table holds `size` descriptors.
        unsafe { self.base.cast::<Desc>().add(usize::from(i)) }
    }

    /// Writes descriptor `i` (< size).
    pub fn set_desc(&mut self, i: u16, d: Desc) {
        debug_assert!(i < self.size);
        // SAFETY: the table holds `size` descriptors; the device only reads
        // descriptors of published chains, and `i` belongs to a free slot.
        unsafe {
            self.base
                .cast::<Desc>()
                .add(usize::from(i))
                .write_volatile(d)
        };
    }

    /// Puts chain head `head` in the next driver ring slot (not yet
    /// visible to the device: see [`Queue::publish`]).
    pub fn push(&mut self, head: u16) {
        let off = AVAIL_OFF + 4 + 2 * self.mask(self.next_avail);
        // SAFETY: a ring slot inside the driver ring; the device reads it
        // only after avail.idx moves past it.
        unsafe { self.u16_at(off).write_volatile(head) };
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Makes pushed entries visible and notifies the device if it asked to
    /// be (avail_event with EVENT_IDX, else the used ring's NO_NOTIFY
    /// flag). Returns whether a notification was sent.
    #[inline(never)]
    pub fn publish(&mut self) -> bool {
        if self.next_avail == self.published {
            return false;
        }
        // Descriptors and ring entries before the index (x86: compiler
        // barrier only).
        fence(Ordering::Release);
        // SAFETY: avail.idx, inside the ring memory.
        unsafe { self.u16_at(AVAIL_OFF + 2).write_volatile(self.next_avail) };
        let old = self.published;
        self.published = self.next_avail;
        // The index store must be visible before the event is read.
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let off = USED_OFF + 4 + 8 * usize::from(self.size);
            // SAFETY: avail_event, right after the used ring entries.
            let event = unsafe { self.u16_at(off).read_volatile() };
            need_event(event, self.next_avail, old)
        } else {
            // SAFETY: used.flags, inside the ring memory.
            let flags = unsafe { self.u16_at(USED_OFF).read_volatile() };
            flags & USED_NO_NOTIFY == 0
        };
        if kick {
            // SAFETY: the notify register of this queue (checked against
            // the notify region at setup); the value is the queue index.
            unsafe { crate::mmio::write16(self.notify, self.index) };
        }
        kick
    }

    /// Asks the device not to interrupt for used entries (`on`), or to
    /// interrupt again (`!on`, then [`Queue::arm`] as usual). Without
    /// EVENT_IDX this is the driver ring's NO_INTERRUPT flag; with it,
    /// `on` puts used_event one behind the last used entry, so the device
    /// crosses it only after 2^16 more entries.
    pub fn set_no_interrupt(&mut self, on: bool) {
        if self.event_idx {
            if on {
                let off = AVAIL_OFF + 4 + 2 * usize::from(self.size);
                // SAFETY: used_event, right after the driver ring entries.
                unsafe {
                    self.u16_at(off)
                        .write_volatile(self.last_used.wrapping_sub(1))
                };
            }
        } else {
            // SAFETY: avail.flags, inside the ring memory.
            unsafe { self.u16_at(AVAIL_OFF).write_volatile(u16::from(on)) };
        }
    }

    /// Entries pushed but not yet returned by the device (published or
    /// not).
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The next used entry `(id, len)`, if the device has returned one.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: used.idx, inside the ring memory.
        let idx = unsafe { self.u16_at(USED_OFF + 2).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        // Entry contents after the index (x86: compiler barrier only).
        fence(Ordering::Acquire);
        let off = USED_OFF + 4 + 8 * self.mask(self.last_used);
        // SAFETY: a used ring element inside the ring memory, written by
        // the device before it moved used.idx.
        let (id, len) = unsafe {
            let p = self.base.add(off).cast::<u32>();
            (p.read_volatile(), p.add(1).read_volatile())
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Asks for an interrupt at the next used entry (used_event =
    /// last_used with EVENT_IDX; without it interrupts are never
    /// suppressed) and reports whether an entry is already pending, so the
    /// caller can sleep without missing a completion.
    #[inline(never)]
    pub fn arm(&mut self) -> bool {
        if self.event_idx {
            let off = AVAIL_OFF + 4 + 2 * usize::from(self.size);
            // SAFETY: used_event, right after the driver ring entries.
            unsafe { self.u16_at(off).write_volatile(self.last_used) };
            fence(Ordering::SeqCst);
        }
        // SAFETY: used.idx, inside the ring memory.
        let idx = unsafe { self.u16_at(USED_OFF + 2).read_volatile() };
        idx != self.last_used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_rule() {
        // Moving 0 -> 1 crosses event 0, not event 1.
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        // A batch 5 -> 9 crosses every event in 5..=8.
        for e in 5..9 {
            assert!(need_event(e, 9, 5), "{e}");
        }
        assert!(!need_event(9, 9, 5));
        assert!(!need_event(4, 9, 5));
        // Wrap-around of the 16-bit indices.
        assert!(need_event(0xffff, 2, 0xfffe));
        assert!(need_event(1, 2, 0xfffe));
        assert!(!need_event(2, 2, 0xfffe));
        // No movement: never.
        assert!(!need_event(7, 7, 7));
    }

    #[test]
    fn ring_roundtrip() {
        let mut q = Queue::new(0, 8, true);
        let [d, a, u] = q.ring_addresses();
        assert_eq!((a - d, u - d), (4096, 8192));
        assert_eq!(d % 4096, 0);
        assert_eq!(q.pop_used(), None);
        assert!(!q.arm());
        // Pretend the device returned ids 3 and 5 (two entries, wrapped).
        // SAFETY: test-only writes into this queue's own ring memory.
        unsafe {
            let used = q.base.add(USED_OFF);
            used.add(4).cast::<u32>().write(3);
            used.add(8).cast::<u32>().write(512);
            used.add(12).cast::<u32>().write(5);
            used.add(2).cast::<u16>().write(2);
        }
        assert!(q.arm());
        assert_eq!(q.pop_used(), Some((3, 512)));
        assert_eq!(q.pop_used(), Some((5, 0)));
        assert_eq!(q.pop_used(), None);
        assert!(!q.arm());
        // used_event now asks for the entry after index 2.
        // SAFETY: reads this queue's own ring memory.
        let ue = unsafe { q.u16_at(AVAIL_OFF + 4 + 16).read() };
        assert_eq!(ue, 2);
        q.push(7);
        q.push(9);
        // SAFETY: as above.
        let (r0, r1) = unsafe {
            (
                q.u16_at(AVAIL_OFF + 4).read(),
                q.u16_at(AVAIL_OFF + 6).read(),
            )
        };
        assert_eq!((r0, r1), (7, 9));
    }
}
