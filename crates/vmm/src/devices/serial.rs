//! The 8250/16550 UART at 0x3f8 (COM1), backed by vm-superio's state machine.

use std::fs::File;
use std::io::{self, LineWriter, Write};
use std::path::PathBuf;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::coalesced::CoalescedZone;

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

/// Register offsets and bits the coalescing rule follows (the same
/// decoding as vm-superio's).
const IER_OFFSET: u64 = 1;
const LCR_OFFSET: u64 = 3;
const LCR_DLAB: u8 = 0x80;
const IER_VALID_BITS: u8 = 0x0f;

/// COM1 on the PIO bus.
///
/// Writes to the transmit register (port 0x3f8) are coalesced by KVM
/// ([`crate::coalesced`]) while the interrupt enable register is zero: then
/// a transmitted byte has no effect the guest can see before its next
/// exit (no interrupt; the line status always reads empty), so the byte
/// may reach the device at that exit instead of costing one of its own.
/// A guest that enables any UART interrupt gets one exit per write again.
pub struct SerialConsole {
    inner: Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleSink>,
    /// The line control and interrupt enable registers, shadowed to decide
    /// whether the transmit register may be coalesced.
    lcr: u8,
    ier: u8,
    zone: Option<Box<dyn CoalescedZone>>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        SerialConsole {
            inner: Serial::new(IrqLine(irq), sink),
            lcr: 0,
            ier: 0,
            zone: None,
        }
    }

    /// Lets KVM coalesce transmit-register writes whenever the UART's
    /// state allows it (now, after reset: no interrupts are enabled).
    pub fn set_coalescing(&mut self, mut zone: Box<dyn CoalescedZone>) {
        zone.set(self.ier == 0);
        self.zone = Some(zone);
    }

    /// Follows the writes that change whether coalescing is allowed.
    fn track(&mut self, offset: u64, value: u8) {
        match offset {
            LCR_OFFSET => self.lcr = value,
            IER_OFFSET if self.lcr & LCR_DLAB == 0 => {
                self.ier = value & IER_VALID_BITS;
                if let Some(zone) = &mut self.zone {
                    zone.set(self.ier == 0);
                }
            }
            _ => {}
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
            self.track(offset, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records what the device asks of its zone.
    struct Zone(Arc<Mutex<Vec<bool>>>);

    impl CoalescedZone for Zone {
        fn set(&mut self, on: bool) {
            self.0.lock().unwrap().push(on);
        }
    }

    fn console() -> (SerialConsole, Arc<Mutex<Vec<bool>>>) {
        let file = tempfile_sink();
        let mut s = SerialConsole::new(EventFd::new(0).unwrap(), file);
        let calls = Arc::new(Mutex::new(Vec::new()));
        s.set_coalescing(Box::new(Zone(calls.clone())));
        (s, calls)
    }

    fn tempfile_sink() -> ConsoleSink {
        ConsoleSink::File(LineWriter::new(File::create("/dev/null").unwrap()))
    }

    #[test]
    fn coalesces_only_while_no_interrupt_is_enabled() {
        let (mut s, calls) = console();
        // After reset IER is 0: coalescing starts.
        assert_eq!(*calls.lock().unwrap(), [true]);
        s.write(COM1_PORT.into(), IER_OFFSET, &[0x02]); // THRE interrupt
        s.write(COM1_PORT.into(), IER_OFFSET, &[0x00]);
        s.write(COM1_PORT.into(), IER_OFFSET, &[0xf0]); // no valid bits: still 0
        assert_eq!(*calls.lock().unwrap(), [true, false, true, true]);
    }

    #[test]
    fn divisor_latch_writes_are_not_ier() {
        let (mut s, calls) = console();
        s.write(COM1_PORT.into(), LCR_OFFSET, &[LCR_DLAB | 0x03]);
        s.write(COM1_PORT.into(), IER_OFFSET, &[0x01]); // divisor high byte
        assert_eq!(*calls.lock().unwrap(), [true]);
        s.write(COM1_PORT.into(), LCR_OFFSET, &[0x03]);
        s.write(COM1_PORT.into(), IER_OFFSET, &[0x01]); // receive interrupt
        assert_eq!(*calls.lock().unwrap(), [true, false]);
    }
}
