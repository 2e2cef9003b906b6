//! The 8250/16550 UART at 0x3f8 (COM1), backed by vm-superio's state machine.

use std::fs::File;
use std::io::{self, LineWriter, Write};
use std::path::PathBuf;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
/// ISA IRQ line of COM1.
pub const COM1_GSI: u32 = 4;

/// Where the guest's serial output goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialOutput {
    Stdio,
    File(PathBuf),
    Off,
}

/// The serial interrupt line: an eventfd registered as a KVM irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The console sink: stdout or a file, flushed at each newline so nothing
/// the guest printed is lost if the VMM is killed.
pub enum ConsoleSink {
    Stdout(io::Stdout),
    File(LineWriter<File>),
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleSink::Stdout(s) => s.write(buf),
            ConsoleSink::File(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConsoleSink::Stdout(s) => s.flush(),
            ConsoleSink::File(f) => f.flush(),
        }
    }
}

/// COM1 on the PIO bus.
pub struct SerialConsole {
    inner: Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        SerialConsole {
            inner: Serial::new(IrqLine(irq), sink),
        }
    }

    /// Queues host input for the guest to read; returns how much fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn flush(&mut self) {
        let _ = self.inner.writer_mut().flush();
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.inner.read(offset as u8);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.inner.write(offset as u8, b) {
                log::warn!("serial: {e:?}");
            }
        }
    }
}
