//! The fourth guest form: checks a PCI function passed through by the VMM
//! (the vfio-user test device of tests/devices, vendor 0x1234 device
//! 0x7256 by default).
//!
//! Entered when the command line has any `pt.*` option. In order: find the
//! function on bus 0; walk and print its capability list (the PCI Express
//! capability must be hidden); check the BAR0 ID register; enable memory
//! space and bus mastering; set up MSI-X with one IDT vector per MSI-X
//! vector; ring the doorbell of every vector but the masked one and wait
//! for each interrupt; mask that vector in the table, ring it, check that
//! nothing arrives and that its PBA bit reads set, unmask it and check that
//! the interrupt arrives and the bit clears; write a word into BAR2's
//! window and read it back through PEEK_OFFSET/PEEK_VALUE; have the device
//! copy a buffer in guest RAM by DMA; with `pt.intx=N`, disable MSI-X and
//! take N level-triggered INTx interrupts through the IOAPIC, then one
//! asserted while the IOAPIC entry was masked ([`intx`]). Prints
//!
//! ```text
//! pt: caps 0x11@0x40 0x05@0x50 0x09@0x60
//! pt: 00:DD.F bar0=0x.. bar2=0x.. msix=8
//! [pt: <failed check>]...
//! RINGVM-RESULT mode=pt vectors=N irqs=N masked_silent=0|1|skip
//!     pending_delivered=0|1|skip bar2=ok|bad dma=ok|bad|skip intx=N|skip
//!     intx_unmask=0|1|skip caps=0x11,0x05,0x09 errors=E
//! ```
//!
//! and exits with 0 (every check passed), 1 (a check failed, or a bad
//! option), 2 (device missing or broken: `error: pt: ...`), unless `exit=N`
//! overrides 0/1.

mod device;
#[cfg(not(test))]
mod intx;
pub mod options;
#[cfg(not(test))]
mod run;

#[cfg(not(test))]
pub use run::run;
