//! What the platform firmware (or the VMM) describes: vCPU count.
//!
//! Sources, in order:
//! 1. ACPI through the RSDP address given in `hvm_start_info`;
//! 2. the Intel MultiProcessor Specification 1.4 tables, found by the
//!    floating pointer search;
//! 3. ACPI through an RSDP found by the legacy memory scan.
//!
//! All table data is untrusted: pointers must stay below 4 GiB (the
//! identity map), lengths are capped, and checksums are verified.

pub mod acpi;
mod mptable;

/// Where the vCPU count came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    MpTable,
    Acpi,
    None,
}

/// Result of [`count_cpus`].
#[derive(Clone, Copy, Debug)]
pub struct CpuCount {
    pub cpus: u32,
    pub source: Source,
}

/// Counts the enabled vCPUs described by the platform. `rsdp_hint` is
/// `hvm_start_info.rsdp_paddr` (0 when absent).
pub fn count_cpus(rsdp_hint: u64) -> CpuCount {
    let found = |cpus, source| CpuCount { cpus, source };
    if rsdp_hint != 0 {
        if let Some(n) = acpi::count(rsdp_hint) {
            return found(n, Source::Acpi);
        }
    }
    if let Some(n) = mptable::count() {
        return found(n, Source::MpTable);
    }
    if let Some(n) = acpi::find_rsdp().and_then(acpi::count) {
        return found(n, Source::Acpi);
    }
    found(0, Source::None)
}

/// True when the bytes sum to 0 modulo 256.
fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b)) == 0
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Start address of the Extended BIOS Data Area per the BIOS data area
/// word at 0x40E (a real-mode segment), or `None` when it is unset.
fn ebda_base() -> Option<u64> {
    let segment = crate::phys::read_u16(0x40e)?;
    (segment != 0).then(|| u64::from(segment) << 4)
}

/// Offsets of the 16-byte aligned positions of `region` where `signature`
/// (4 to 16 bytes) starts.
///
/// This is the hot loop of the legacy table scans (up to 8192 positions),
/// so candidates are first filtered by comparing the first four bytes as a
/// single u32: a handful of instructions per position.
fn signature_offsets<'a>(
    region: &'a [u8],
    signature: &'a [u8],
) -> impl Iterator<Item = usize> + 'a {
    let mut from = 0;
    core::iter::from_fn(move || {
        let found = find_signature(region, from, signature)?;
        from = found + 16;
        Some(found)
    })
}

/// The first 16-byte aligned offset at or after `from` (a multiple of 16)
/// where `signature` starts in `region`.
fn find_signature(region: &[u8], from: usize, signature: &[u8]) -> Option<usize> {
    let prefix = u32_at(signature, 0)?;
    let mut off = from;
    for chunk in region.get(from..)?.chunks_exact(16) {
        if u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) == prefix
            && chunk.starts_with(signature)
        {
            return Some(off);
        }
        off += 16;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums() {
        assert!(checksum_ok(&[]));
        assert!(checksum_ok(&[0x10, 0xf0]));
        assert!(!checksum_ok(&[0x10, 0xef]));
    }

    #[test]
    fn signatures() {
        let mut region = [0u8; 64];
        region[16..20].copy_from_slice(b"_MP_");
        region[36..40].copy_from_slice(b"_MP_"); // unaligned: ignored
        region[48..52].copy_from_slice(b"_MP_");
        let found: Vec<usize> = signature_offsets(&region, b"_MP_").collect();
        assert_eq!(found, [16, 48]);
    }
}
