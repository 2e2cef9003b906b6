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
///
/// Eight bytes at a time: the even and the odd bytes of each word are
/// added into 16-bit lanes of two accumulators, which are folded every
/// 256 words (before a lane could carry into the next). Under an
/// instruction emulator this is about a fifth of the instructions of a
/// byte loop.
fn checksum_ok(bytes: &[u8]) -> bool {
    const LANES: u64 = 0x00ff_00ff_00ff_00ff;
    let fold = |x: u64| (x & 0xffff) + ((x >> 16) & 0xffff) + ((x >> 32) & 0xffff) + (x >> 48);
    let mut words = bytes.chunks_exact(8);
    let mut sum = 0u64;
    loop {
        let (mut even, mut odd, mut n) = (0u64, 0u64, 0);
        for w in words.by_ref().take(256) {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            let w = u64::from_le_bytes(word);
            even += w & LANES;
            odd += (w >> 8) & LANES;
            n += 1;
        }
        sum += fold(even) + fold(odd);
        if n < 256 {
            break;
        }
    }
    for &b in words.remainder() {
        sum += u64::from(b);
    }
    sum as u8 == 0
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
        // Against the byte loop, over lengths around the word and block
        // boundaries, with bytes of 0xff (the largest lane sums).
        let byte_loop = |b: &[u8]| b.iter().fold(0u8, |s, &x| s.wrapping_add(x)) == 0;
        for len in [1, 7, 8, 9, 63, 64, 2047, 2048, 2049, 4096, 4103, 20000] {
            let mut b: Vec<u8> = (0..len)
                .map(|i| if i % 3 == 0 { 0xff } else { (i * 7) as u8 })
                .collect();
            for fix in [false, true] {
                if fix {
                    let s = b.iter().fold(0u8, |s, &x| s.wrapping_add(x));
                    b[len / 2] = b[len / 2].wrapping_sub(s);
                }
                assert_eq!(checksum_ok(&b), byte_loop(&b), "len {len}, fixed {fix}");
            }
            assert!(checksum_ok(&b));
            b[len - 1] ^= 1;
            assert!(!checksum_ok(&b));
        }
        assert!(checksum_ok(&[0xff; 256 * 8 * 3]) == byte_loop(&[0xff; 256 * 8 * 3]));
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
