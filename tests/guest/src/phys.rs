//! Access to guest-physical memory through the boot identity map.
//!
//! The boot page tables identity-map 0..4 GiB, so a physical address below
//! [`LIMIT`] is also a valid virtual address. Pointers found in firmware
//! tables are untrusted: every helper checks that the whole range lies in
//! the identity map, is not at address 0 and does not overlap this image
//! (code, data, bss and stack), so no Rust object can be aliased.

/// End of the identity map.
pub const LIMIT: u64 = 1 << 32;

#[cfg(not(test))]
extern "C" {
    // Provided by link.ld.
    static __image_start: u8;
    static __image_end: u8;
}

/// Physical range `[start, end)` occupied by this image, bss and stack.
#[cfg(not(test))]
fn image_range() -> (u64, u64) {
    // Only the addresses of the linker symbols are taken; nothing is read.
    let start = core::ptr::addr_of!(__image_start) as u64;
    let end = core::ptr::addr_of!(__image_end) as u64;
    (start, end)
}

/// Host unit tests have no guest image.
#[cfg(test)]
fn image_range() -> (u64, u64) {
    (0, 0)
}

/// True when `[addr, addr + len)` is non-empty, inside the identity map,
/// not at address 0 and disjoint from this image.
pub fn accessible(addr: u64, len: usize) -> bool {
    let len = len as u64;
    if addr == 0 || len == 0 || len > LIMIT || addr > LIMIT - len {
        return false;
    }
    let (start, end) = image_range();
    addr + len <= start || addr >= end
}

/// Borrows `len` bytes of physical memory at `addr`, if [`accessible`].
///
/// Meant for firmware and loader data (tables, command line) that nothing
/// modifies while the guest runs.
pub fn bytes(addr: u64, len: usize) -> Option<&'static [u8]> {
    if !accessible(addr, len) {
        return None;
    }
    let ptr = core::ptr::with_exposed_provenance::<u8>(addr as usize);
    // Loader/firmware data is not written while the guest runs.
    // SAFETY: non-null, identity-mapped below 4 GiB, outside every Rust
    // object (no aliasing `&mut`); u8 has no alignment or validity needs.
    Some(unsafe { core::slice::from_raw_parts(ptr, len) })
}

/// Reads a little-endian u16 at `addr`.
pub fn read_u16(addr: u64) -> Option<u16> {
    let b = bytes(addr, 2)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

/// Reads a NUL-terminated string of at most `max` bytes at `addr` (without
/// the NUL). Returns an empty slice when `addr` is 0 or not accessible.
pub fn c_string(addr: u64, max: usize) -> &'static [u8] {
    let mut len = 0;
    while len < max && accessible(addr + len as u64, 1) {
        let ptr = core::ptr::with_exposed_provenance::<u8>((addr + len as u64) as usize);
        // SAFETY: the byte is accessible (mapped, non-null, outside this
        // image); a volatile read stops exactly at the terminator.
        if unsafe { core::ptr::read_volatile(ptr) } == 0 {
            break;
        }
        len += 1;
    }
    bytes(addr, len).unwrap_or(&[])
}
