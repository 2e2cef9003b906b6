//! The disk data pattern, the workload PRNG and fast qword fill/compare.
//!
//! Every 512-byte sector at absolute disk sector `S` holds 64 copies of the
//! 64-bit word `tag(seed, S)`. Writers fill a sector with one `rep stosq`,
//! checkers compare it with one `repe scasq`: string instructions cost a
//! single (emulated) instruction however long the buffer, where a loop costs
//! one per word.

use core::arch::asm;

/// Bytes per disk sector.
pub const SECTOR: usize = 512;
/// 64-bit words per sector.
pub const SECTOR_WORDS: usize = SECTOR / 8;

/// Golden-ratio increment of splitmix64.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The splitmix64 output function of `z + GOLDEN`: a cheap 64-bit mixer
/// whose outputs for consecutive inputs look unrelated.
pub const fn splitmix64(z: u64) -> u64 {
    let mut z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The word that fills absolute sector `sector` for pattern `seed`.
pub const fn tag(seed: u64, sector: u64) -> u64 {
    splitmix64(seed.wrapping_mul(GOLDEN) ^ sector)
}

/// xorshift64* generator for random offsets.
#[derive(Clone, Copy, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed` (any value, 0 included).
    pub const fn new(seed: u64) -> Self {
        let s = splitmix64(seed ^ 0x5eed);
        Rng(if s == 0 { 1 } else { s })
    }

    /// The next 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n > 0`), by multiply-shift (no division).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Sets every word of `words` to `value` with one `rep stosq`.
pub fn fill(words: &mut [u64], value: u64) {
    // SAFETY: RDI/RCX describe exactly the slice, which is exclusively
    // borrowed; the direction flag is clear (SysV ABI, and the boot stub
    // runs `cld`). `rep stosq` leaves the flags alone.
    unsafe {
        asm!(
            "rep stosq",
            inout("rcx") words.len() => _,
            inout("rdi") words.as_mut_ptr() => _,
            in("rax") value,
            options(nostack, preserves_flags)
        );
    }
}

/// The index of the first word of `words` that differs from `value`, found
/// with one `repe scasq`.
pub fn first_mismatch(words: &[u64], value: u64) -> Option<usize> {
    if words.is_empty() {
        return None;
    }
    let end: *const u64;
    let differs: u8;
    // SAFETY: RDI/RCX describe exactly the slice, which is only read; the
    // direction flag is clear (see `fill`). RCX > 0, so at least one
    // comparison runs and ZF is meaningful afterwards.
    unsafe {
        asm!(
            "repe scasq",
            "setne {d}",
            d = out(reg_byte) differs,
            inout("rcx") words.len() => _,
            inout("rdi") words.as_ptr() => end,
            in("rax") value,
            options(nostack, readonly)
        );
    }
    if differs == 0 {
        return None;
    }
    // RDI stopped one word past the mismatch.
    Some((end as usize - words.as_ptr() as usize) / 8 - 1)
}

/// Fills `buf` (a whole number of sectors) with the pattern of the sectors
/// starting at absolute sector `first`.
pub fn fill_sectors(buf: &mut [u64], first: u64, seed: u64) {
    for (i, sector) in buf.chunks_exact_mut(SECTOR_WORDS).enumerate() {
        fill(sector, tag(seed, first + i as u64));
    }
}

/// The first bad word found by [`check_sectors`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Absolute sector.
    pub sector: u64,
    /// Word index within the sector.
    pub word: usize,
    pub expected: u64,
    pub found: u64,
}

/// Checks `buf` (a whole number of sectors) against the pattern of the
/// sectors starting at absolute sector `first`. Returns the number of bad
/// sectors and the first bad word (the lowest sector, as sectors are
/// checked in order).
pub fn check_sectors(buf: &[u64], first: u64, seed: u64) -> (u64, Option<Mismatch>) {
    let mut bad = 0;
    let mut first_bad = None;
    for (i, sector) in buf.chunks_exact(SECTOR_WORDS).enumerate() {
        let abs = first + i as u64;
        let expected = tag(seed, abs);
        if let Some(word) = first_mismatch(sector, expected) {
            bad += 1;
            if first_bad.is_none() {
                first_bad = Some(Mismatch {
                    sector: abs,
                    word,
                    expected,
                    found: sector[word],
                });
            }
        }
    }
    (bad, first_bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_reference() {
        // splitmix64 seeded with 0: the first outputs of the reference
        // generator (state += golden, then mix).
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(splitmix64(GOLDEN), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn tags_differ() {
        assert_ne!(tag(7, 0), tag(7, 1));
        assert_ne!(tag(7, 0), tag(8, 0));
        assert_eq!(tag(7, 123), tag(7, 123));
    }

    #[test]
    fn fill_and_check() {
        let mut buf = vec![0u64; SECTOR_WORDS * 4];
        fill_sectors(&mut buf, 100, 7);
        assert!(buf[..64].iter().all(|&w| w == tag(7, 100)));
        assert!(buf[192..].iter().all(|&w| w == tag(7, 103)));
        assert_eq!(check_sectors(&buf, 100, 7), (0, None));
        assert_eq!(check_sectors(&buf, 100, 8).0, 4);
        buf[64 + 63] ^= 1;
        buf[128 + 5] = 0;
        let (bad, m) = check_sectors(&buf, 100, 7);
        assert_eq!(bad, 2);
        let m = m.unwrap();
        assert_eq!((m.sector, m.word), (101, 63));
        assert_eq!(m.expected, tag(7, 101));
        assert_eq!(m.found, tag(7, 101) ^ 1);
    }

    #[test]
    fn mismatch_positions() {
        let mut w = [5u64; 10];
        assert_eq!(first_mismatch(&w, 5), None);
        assert_eq!(first_mismatch(&[], 5), None);
        w[0] = 1;
        assert_eq!(first_mismatch(&w, 5), Some(0));
        w[0] = 5;
        w[9] = 1;
        assert_eq!(first_mismatch(&w, 5), Some(9));
        fill(&mut w, 3);
        assert_eq!(w, [3; 10]);
    }

    #[test]
    fn rng() {
        let mut a = Rng::new(1);
        let mut b = Rng::new(1);
        let mut c = Rng::new(2);
        let x = a.next_u64();
        assert_eq!(x, b.next_u64());
        assert_ne!(x, c.next_u64());
        let mut zero = Rng::new(0);
        assert_ne!(zero.next_u64(), 0);
        let mut hits = [0u32; 10];
        for _ in 0..10_000 {
            hits[a.below(10) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
        assert_eq!(a.below(1), 0);
    }
}
