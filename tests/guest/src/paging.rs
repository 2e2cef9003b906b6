//! On-demand uncached mappings for device registers.
//!
//! The boot tables identity-map 0..4 GiB with 2 MiB pages (the last GiB
//! uncached). A BAR above 4 GiB, or one the VMM put below 3 GiB, is made
//! reachable and uncached here: the missing PML4/PDPT entries get tables
//! from a small static pool, and only the 2 MiB entries covering the
//! requested range are written. Identity mapping throughout: virtual ==
//! physical, for the tables themselves too (they live in this image).

use core::cell::UnsafeCell;

/// Present | writable.
const P_RW: u64 = 0x3;
/// Page size (2 MiB page in a PD entry, 1 GiB page in a PDPT entry).
const PS: u64 = 0x80;
/// Present | writable | write-through | cache-disable | 2 MiB page.
const LARGE_UC: u64 = 0x9b;
/// Physical address bits of a table entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PAGE_2M: u64 = 1 << 21;
/// One PML4 covers the lower half of the canonical address space.
const VA_LIMIT: u64 = 1 << 47;
/// Spare tables for new PDPTs and PDs.
const SPARES: usize = 8;

#[repr(C, align(4096))]
struct Table(UnsafeCell<[u64; 512]>);

struct Pool {
    tables: [Table; SPARES],
    used: UnsafeCell<usize>,
}

// SAFETY: the guest runs on one vCPU and interrupt handlers never touch
// the pool; all accesses go through raw pointers in `map_uncached`.
unsafe impl Sync for Pool {}

static POOL: Pool = Pool {
    tables: [const { Table(UnsafeCell::new([0; 512])) }; SPARES],
    used: UnsafeCell::new(0),
};

/// Why a range could not be mapped.
#[derive(Clone, Copy, Debug)]
pub enum Error {
    /// The range is empty, wraps, or lies beyond the lower canonical half.
    BadRange,
    /// The spare table pool is exhausted.
    NoTables,
}

/// Hands out a zeroed spare table (the loader gives zeroed .bss, and a
/// table is used once).
fn alloc_table() -> Result<*mut u64, Error> {
    let used = POOL.used.get();
    // SAFETY: single-threaded access to the pool counter (see `Sync`).
    let n = unsafe { *used };
    let table = POOL.tables.get(n).ok_or(Error::NoTables)?;
    // SAFETY: as above.
    unsafe { *used = n + 1 };
    Ok(table.0.get().cast())
}

/// Returns the table an entry points to, creating it when not present.
///
/// # Safety
///
/// `entry` must point into a live paging structure of the current tables.
unsafe fn next_table(entry: *mut u64) -> Result<*mut u64, Error> {
    // SAFETY: the caller guarantees `entry` is a valid table slot.
    let e = unsafe { entry.read_volatile() };
    if e & 1 != 0 {
        return Ok(core::ptr::with_exposed_provenance_mut(
            (e & ADDR_MASK) as usize,
        ));
    }
    let table = alloc_table()?;
    // SAFETY: as above; the new table is zeroed, so it maps nothing yet.
    unsafe { entry.write_volatile(table as u64 | P_RW) };
    Ok(table)
}

/// Maps `[addr, addr + len)` identity, uncached, with 2 MiB pages, unless
/// already so. Cheap when nothing changes: one table walk per 2 MiB.
pub fn map_uncached(addr: u64, len: u64) -> Result<(), Error> {
    let end = addr.checked_add(len).ok_or(Error::BadRange)?;
    if len == 0 || end > VA_LIMIT {
        return Err(Error::BadRange);
    }
    let pml4 = read_cr3() & ADDR_MASK;
    let mut va = addr & !(PAGE_2M - 1);
    let mut flush = false;
    while va < end {
        let i4 = ((va >> 39) & 511) as usize;
        let i3 = ((va >> 30) & 511) as usize;
        let i2 = ((va >> 21) & 511) as usize;
        let pml4 = core::ptr::with_exposed_provenance_mut::<u64>(pml4 as usize);
        // SAFETY: CR3 points at the live PML4 (identity mapped, in this
        // image); every index is below 512; tables reached through present
        // entries are identity-mapped paging structures.
        unsafe {
            let pdpt = next_table(pml4.add(i4))?;
            let pdpte = pdpt.add(i3).read_volatile();
            if pdpte & 1 != 0 && pdpte & PS != 0 {
                // A 1 GiB page (not made by this guest): leave it alone.
                va += PAGE_2M;
                continue;
            }
            let pd = next_table(pdpt.add(i3))?;
            let want = va | LARGE_UC;
            let old = pd.add(i2).read_volatile();
            if old != want {
                pd.add(i2).write_volatile(want);
                flush |= old & 1 != 0;
            }
        }
        va += PAGE_2M;
    }
    if flush {
        // A present entry changed its cache type: drop stale translations.
        write_cr3(read_cr3());
    }
    Ok(())
}

fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effect (ring 0).
    unsafe {
        core::arch::asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags))
    };
    v
}

fn write_cr3(v: u64) {
    // SAFETY: reloading the current CR3 value keeps the same tables and
    // only flushes non-global TLB entries.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) v, options(nostack, preserves_flags)) };
}
