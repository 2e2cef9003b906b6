//! x86-64 specifics: CPUID, registers and MSRs, the MP table.

pub mod acpi;
pub mod cpuid;
pub mod mptable;
pub mod regs;
