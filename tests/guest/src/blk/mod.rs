//! The second guest form: a virtio-blk workload over virtio-pci with MSI-X.
//!
//! Entered when the command line has any `blk.*` option. Prints
//!
//! ```text
//! blk: 00:DD.F capacity=<sectors> features=0x<negotiated> queues=<n> qsize=<n> msix=yes
//! [blk: id=<GET_ID string>]
//! [blk: verify mismatch sector=<S> word=<W> expected=0x.. found=0x..]
//! RINGVM-RESULT mode=<mode> dev=<N> ops=<n> bytes=<n> errors=<n> [crc32=<8 hex>]
//!     ticks=<TSC ticks> qd=<qd> bs=<bs> queues=<n> irqs=<n> [mismatch_sector=<S>]
//! ```
//!
//! and exits with 0 (no errors), 1 (errors, or a bad option), 2 (device or
//! transport failure: `error: ...`), unless `exit=N` overrides 0/1.

pub mod options;

#[cfg(not(test))]
mod dma;
#[cfg(not(test))]
mod driver;
#[cfg(not(test))]
mod workload;

#[cfg(not(test))]
pub use workload::run;
