//! VM configuration, as the CLI (or a later API) builds it.

use std::path::PathBuf;

use crate::arch::cpuid::FeatureBit;
use crate::devices::SerialOutput;

/// Where the kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    Path(PathBuf),
    /// An image embedded in the binary (the built-in guest).
    Builtin(&'static [u8]),
}

/// Everything needed to build and boot a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: KernelSource,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub cpus: usize,
    pub serial: SerialOutput,
    /// Feed standard input to the serial port (with `SerialOutput::Stdio`).
    pub serial_input: bool,
    /// CPUID feature bits hidden from the guest.
    pub cpuid_hide: Vec<FeatureBit>,
    /// Guest RAM in a memfd that other processes can map (vfio-user
    /// devices need it for DMA); anonymous memory otherwise.
    pub shared_memory: bool,
    pub irqchip: IrqChip,
    /// ACPI tables (RSDP, XSDT, FADT, DSDT, MADT, MCFG) and the ACPI
    /// power-off, reset and power-button registers; the MP table is there
    /// either way.
    pub acpi: bool,
    /// Seccomp filters for the vCPU threads and the control thread (and,
    /// through the composition root, the iothreads).
    pub seccomp: crate::seccomp::SeccompMode,
    /// Host CPUs each vCPU thread is pinned to, by vCPU index (missing or
    /// `None`: the process's affinity).
    pub vcpu_affinity: Vec<Option<crate::affinity::CpuSet>>,
}

/// Where the interrupt controllers live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IrqChip {
    /// KVM's in-kernel PIC, IOAPIC and PIT, with the local APICs.
    Kernel,
    /// Local APICs in KVM, IOAPIC in userspace, no PIC and no PIT (as
    /// Cloud Hypervisor does). A VM without the legacy chips is created and
    /// torn down much faster. Level-triggered lines (PCI INTx) work through
    /// KVM's EOI exits and resample eventfds the router signals; guests
    /// must not need the PIT or the PIC (Linux with a TSC-deadline or
    /// local APIC timer and an ACPI or MP-table IOAPIC does not).
    #[default]
    Split,
}

/// Errors from parsing a size.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error(
        "invalid size {0:?}: expected a number with an optional K, M, G or T suffix, e.g. 512M"
    )]
    Invalid(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses `512M`, `4G`, `1048576`, `64MiB`, `2g`: binary units, bytes if
/// no suffix.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits);
    if num.is_empty() {
        return Err(SizeError::Invalid(s.into()));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::Invalid(s.into())),
    };
    let n: u64 = num.parse().map_err(|_| SizeError::Overflow(s.into()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.into()))
}

/// Formats a byte count the way the CLI takes it back.
pub fn format_size(n: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    format!("{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_with_binary_suffixes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1k"), Ok(1024));
    }

    #[test]
    fn rejects_malformed_sizes() {
        for bad in ["", "M", "12X", "-1G", "1.5G", "0x10M", "G4", "1 G B"] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("17179869184G"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats_round_sizes() {
        assert_eq!(format_size(64 << 20), "64M");
        assert_eq!(format_size(3 << 30), "3G");
        assert_eq!(format_size(1000), "1000");
    }
}
