//! Legacy x86 devices: the 8250 serial port, the i8042 reset line and the
//! debug-exit port. Each is a thin [`BusDevice`](crate::bus::BusDevice)
//! adapter over a state machine (vm-superio's where one exists).

pub mod acpi_pm;
pub mod debug_exit;
pub mod i8042;
pub mod ioapic;
pub mod serial;

pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use serial::{SerialConsole, SerialOutput};
