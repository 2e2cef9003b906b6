//! CPUID for guest vCPUs: what KVM supports, fixed up for topology, APIC
//! IDs and the hypervisor leaf, minus any features the user hides.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One CPUID feature bit: `leaf.subleaf.reg:bit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureBit {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

/// Named features that can be hidden with `--cpuid-hide NAME`.
const NAMED: &[(&str, u32, u32, Reg, u8)] = &[
    ("sse3", 1, 0, Reg::Ecx, 0),
    ("pclmulqdq", 1, 0, Reg::Ecx, 1),
    ("vmx", 1, 0, Reg::Ecx, 5),
    ("ssse3", 1, 0, Reg::Ecx, 9),
    ("fma", 1, 0, Reg::Ecx, 12),
    ("cx16", 1, 0, Reg::Ecx, 13),
    ("pcid", 1, 0, Reg::Ecx, 17),
    ("sse4.1", 1, 0, Reg::Ecx, 19),
    ("sse4.2", 1, 0, Reg::Ecx, 20),
    ("x2apic", 1, 0, Reg::Ecx, 21),
    ("movbe", 1, 0, Reg::Ecx, 22),
    ("popcnt", 1, 0, Reg::Ecx, 23),
    ("tsc-deadline", 1, 0, Reg::Ecx, 24),
    ("aes", 1, 0, Reg::Ecx, 25),
    ("xsave", 1, 0, Reg::Ecx, 26),
    ("avx", 1, 0, Reg::Ecx, 28),
    ("f16c", 1, 0, Reg::Ecx, 29),
    ("rdrand", 1, 0, Reg::Ecx, 30),
    ("mtrr", 1, 0, Reg::Edx, 12),
    ("sse", 1, 0, Reg::Edx, 25),
    ("sse2", 1, 0, Reg::Edx, 26),
    ("fsgsbase", 7, 0, Reg::Ebx, 0),
    ("bmi1", 7, 0, Reg::Ebx, 3),
    ("avx2", 7, 0, Reg::Ebx, 5),
    ("smep", 7, 0, Reg::Ebx, 7),
    ("bmi2", 7, 0, Reg::Ebx, 8),
    ("erms", 7, 0, Reg::Ebx, 9),
    ("invpcid", 7, 0, Reg::Ebx, 10),
    ("avx512f", 7, 0, Reg::Ebx, 16),
    ("rdseed", 7, 0, Reg::Ebx, 18),
    ("smap", 7, 0, Reg::Ebx, 20),
    ("sha", 7, 0, Reg::Ebx, 29),
    ("umip", 7, 0, Reg::Ecx, 2),
    ("pku", 7, 0, Reg::Ecx, 3),
    ("la57", 7, 0, Reg::Ecx, 16),
    ("rdpid", 7, 0, Reg::Ecx, 22),
    ("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    ("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
];

/// Errors from parsing a feature to hide.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    #[error("unknown CPUID feature {0:?} (use a name such as avx2 or LEAF[.SUBLEAF].REG:BIT, e.g. 0x7.0.ebx:5)")]
    UnknownFeature(String),
}

impl FromStr for FeatureBit {
    type Err = CpuidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim().to_ascii_lowercase();
        if let Some(&(_, leaf, subleaf, reg, bit)) = NAMED.iter().find(|n| n.0 == name) {
            return Ok(FeatureBit {
                leaf,
                subleaf,
                reg,
                bit,
            });
        }
        parse_raw(&name).ok_or_else(|| CpuidError::UnknownFeature(s.to_string()))
    }
}

fn parse_num(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn parse_raw(s: &str) -> Option<FeatureBit> {
    let (path, bit) = s.split_once(':')?;
    let bit: u8 = bit.parse().ok().filter(|b| *b < 32)?;
    let mut parts = path.split('.');
    let leaf = parse_num(parts.next()?)?;
    let mut next = parts.next()?;
    let subleaf = match parse_num(next) {
        Some(n) => {
            next = parts.next()?;
            n
        }
        None => 0,
    };
    let reg = match next {
        "eax" => Reg::Eax,
        "ebx" => Reg::Ebx,
        "ecx" => Reg::Ecx,
        "edx" => Reg::Edx,
        _ => return None,
    };
    parts.next().is_none().then_some(FeatureBit {
        leaf,
        subleaf,
        reg,
        bit,
    })
}

impl FeatureBit {
    /// The `--cpuid-hide` name of this bit, if it has one.
    pub fn name(&self) -> Option<&'static str> {
        NAMED
            .iter()
            .find(|n| (n.1, n.2, n.3, n.4) == (self.leaf, self.subleaf, self.reg, self.bit))
            .map(|n| n.0)
    }

    /// `name (leaf.subleaf.reg:bit)`, or the raw form alone.
    pub fn describe(&self) -> String {
        match self.name() {
            Some(name) => format!("{name} ({self})"),
            None => self.to_string(),
        }
    }
}

impl fmt::Display for FeatureBit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x}.{}.{}:{}",
            self.leaf,
            self.subleaf,
            format!("{:?}", self.reg).to_lowercase(),
            self.bit
        )
    }
}

fn reg(e: &kvm_cpuid_entry2, reg: Reg) -> u32 {
    match reg {
        Reg::Eax => e.eax,
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
    }
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

/// Whether an entry answers `leaf`/`subleaf`.
fn matches(e: &kvm_cpuid_entry2, leaf: u32, subleaf: u32) -> bool {
    e.function == leaf && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == subleaf)
}

/// Bits needed to number `n` items.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Fixes up the entries for vCPU `apic_id` of `cpus`, one core per vCPU in
/// a single package, then clears `hidden` bits.
pub fn fixup_entries(
    entries: &mut [kvm_cpuid_entry2],
    apic_id: u8,
    cpus: u8,
    hidden: &[FeatureBit],
) {
    let cpus32 = u32::from(cpus.max(1));
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // APIC ID, logical processor count, CLFLUSH size 64 bytes.
                e.ebx = (u32::from(apic_id) << 24) | (cpus32 << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= 1 << 31; // running on a hypervisor
                if cpus32 > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX[23:16] is valid
                }
            }
            0x4 => {
                // Cores per package - 1 in EAX[31:26]; threads sharing the
                // cache in EAX[25:14]: L1/L2 per core, L3 per package.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus32 - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((cpus32 - 1) << 26);
            }
            0xb | 0x1f => {
                // Extended topology: level 0 SMT (1 thread), level 1 core.
                e.edx = u32::from(apic_id);
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = bits_for(cpus32);
                        e.ebx = cpus32;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: number of physical cores - 1 and the APIC ID size.
                e.ecx = (e.ecx & !0xf0ff) | (bits_for(cpus32) << 12) | (cpus32 - 1);
            }
            0x4000_0000 => {
                // KVM's paravirt signature leaf: keep "KVMKVMKVM\0\0\0" and
                // make sure its max-leaf field covers the features leaf
                // (and the timing leaf, when it is added).
                e.eax = e.eax.max(0x4000_0001);
            }
            _ => {}
        }
    }
    for h in hidden {
        for e in entries.iter_mut().filter(|e| matches(e, h.leaf, h.subleaf)) {
            *reg_mut(e, h.reg) &= !(1u32 << h.bit);
        }
    }
}

/// The bits of `hidden` that are still set in `entries`: what a vCPU's
/// CPUID, read back from KVM after `KVM_SET_CPUID2`, shows despite our
/// clearing them. KVM for hardware virtualisation keeps the table as
/// given; a software KVM such as `kvm_pvm` merges the host CPU's own
/// feature bits back in (its guests execute CPUID against those), so on
/// such a host most hardware features cannot be hidden from the guest.
pub fn still_visible(entries: &[kvm_cpuid_entry2], hidden: &[FeatureBit]) -> Vec<FeatureBit> {
    hidden
        .iter()
        .filter(|h| {
            entries
                .iter()
                .any(|e| matches(e, h.leaf, h.subleaf) && reg(e, h.reg) & (1u32 << h.bit) != 0)
        })
        .copied()
        .collect()
}

/// The hypervisor timing leaf (as VMware defined it and QEMU offers it):
/// EAX = TSC frequency in kHz, EBX = local APIC timer frequency in kHz.
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz (one tick a nanosecond).
const LAPIC_TIMER_KHZ: u32 = 1_000_000;

/// A per-vCPU copy of `base`, fixed up; with `tsc_khz`, the timing leaf
/// tells the guest the TSC frequency, which a guest without a PIT (split
/// irqchip) cannot measure.
pub fn vcpu_cpuid(
    base: &CpuId,
    apic_id: u8,
    cpus: u8,
    hidden: &[FeatureBit],
    tsc_khz: Option<u32>,
) -> CpuId {
    let mut cpuid = base.clone();
    if let Some(khz) = tsc_khz.filter(|&k| k != 0) {
        let has_signature = cpuid.as_slice().iter().any(|e| e.function == 0x4000_0000);
        let has_timing = cpuid.as_slice().iter().any(|e| e.function == TIMING_LEAF);
        if has_signature && !has_timing {
            let leaf = kvm_cpuid_entry2 {
                function: TIMING_LEAF,
                eax: khz,
                ebx: LAPIC_TIMER_KHZ,
                ..Default::default()
            };
            if cpuid.push(leaf).is_ok() {
                for e in cpuid.as_mut_slice() {
                    if e.function == 0x4000_0000 {
                        e.eax = e.eax.max(TIMING_LEAF);
                    }
                }
            }
        }
    }
    fixup_entries(cpuid.as_mut_slice(), apic_id, cpus, hidden);
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, flags: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn parses_names_and_raw_bits() {
        assert_eq!(
            "AVX2".parse::<FeatureBit>().unwrap(),
            FeatureBit {
                leaf: 7,
                subleaf: 0,
                reg: Reg::Ebx,
                bit: 5
            }
        );
        assert_eq!(
            "0x7.0.ebx:5".parse::<FeatureBit>().unwrap(),
            "avx2".parse::<FeatureBit>().unwrap()
        );
        assert_eq!(
            "1.ecx:21".parse::<FeatureBit>().unwrap(),
            "x2apic".parse::<FeatureBit>().unwrap()
        );
        for bad in [
            "",
            "avx9",
            "1.ecx:32",
            "1.exx:3",
            "1.0.ecx",
            "zz.ecx:1",
            "1.0.ecx:1.2",
        ] {
            assert!(bad.parse::<FeatureBit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sets_apic_id_topology_and_hypervisor_bit() {
        let mut e = vec![
            entry(1, 0, 0),
            entry(0xb, 0, 1),
            entry(0xb, 1, 1),
            entry(0xb, 2, 1),
        ];
        fixup_entries(&mut e, 2, 3, &[]);
        assert_eq!(e[0].ebx >> 24, 2);
        assert_eq!((e[0].ebx >> 16) & 0xff, 3);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_eq!((e[1].ebx, e[1].ecx >> 8 & 0xff), (1, 1));
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx >> 8 & 0xff), (2, 3, 2));
        assert_eq!(e[3].ecx >> 8 & 0xff, 0);
        assert!(e[1..].iter().all(|x| x.edx == 2));
    }

    #[test]
    fn the_timing_leaf_gives_the_tsc_frequency() {
        let base = CpuId::from_entries(&[entry(0, 0, 0), entry(0x4000_0000, 0, 0)]).unwrap();
        let c = vcpu_cpuid(&base, 0, 1, &[], Some(2_600_000));
        let t = c
            .as_slice()
            .iter()
            .find(|e| e.function == TIMING_LEAF)
            .unwrap();
        assert_eq!((t.eax, t.ebx), (2_600_000, 1_000_000));
        let sig = c
            .as_slice()
            .iter()
            .find(|e| e.function == 0x4000_0000)
            .unwrap();
        assert!(sig.eax >= TIMING_LEAF);
        // No frequency, or no hypervisor leaves: nothing added.
        let c = vcpu_cpuid(&base, 0, 1, &[], None);
        assert!(!c.as_slice().iter().any(|e| e.function == TIMING_LEAF));
        let bare = CpuId::from_entries(&[entry(0, 0, 0)]).unwrap();
        let c = vcpu_cpuid(&bare, 0, 1, &[], Some(1000));
        assert!(!c.as_slice().iter().any(|e| e.function == TIMING_LEAF));
    }

    #[test]
    fn finds_hidden_bits_that_came_back() {
        let popcnt: FeatureBit = "popcnt".parse().unwrap();
        let x2apic: FeatureBit = "x2apic".parse().unwrap();
        let mut e = vec![entry(1, 0, 0)];
        fixup_entries(&mut e, 0, 1, &[popcnt, x2apic]);
        assert!(still_visible(&e, &[popcnt, x2apic]).is_empty());
        // The kernel put popcnt back.
        e[0].ecx |= 1 << 23;
        assert_eq!(still_visible(&e, &[popcnt, x2apic]), vec![popcnt]);
        assert_eq!(popcnt.describe(), "popcnt (0x1.0.ecx:23)");
        let raw: FeatureBit = "0x1.ecx:30".parse().unwrap();
        assert_eq!(raw.describe(), "rdrand (0x1.0.ecx:30)");
        let unnamed: FeatureBit = "0x1.ecx:4".parse().unwrap();
        assert_eq!(unnamed.describe(), "0x1.0.ecx:4");
    }

    #[test]
    fn hides_only_the_named_bit_of_the_right_subleaf() {
        let mut e = vec![entry(7, 0, 1), entry(7, 1, 1)];
        fixup_entries(&mut e, 0, 1, &["avx2".parse().unwrap()]);
        assert_eq!(e[0].ebx, !(1 << 5));
        assert_eq!(e[1].ebx, 0xffff_ffff);
    }
}
