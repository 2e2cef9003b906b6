//! The 8250/16550 UART at 0x3f8 (COM1), backed by vm-superio's state machine.

use std::fs::File;
use std::io::{self, LineWriter, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::snapshot::{decode, encode, Snapshot, SnapshotError};

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
    /// Only while the UART is rebuilt from a snapshot.
    Discard,
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleSink::Stdout(s) => s.write(buf),
            ConsoleSink::File(f) => f.write(buf),
            ConsoleSink::Discard => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConsoleSink::Stdout(s) => s.flush(),
            ConsoleSink::File(f) => f.flush(),
            ConsoleSink::Discard => Ok(()),
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

/// The UART's registers and receive FIFO (vm-superio's `SerialState`).
#[derive(Serialize, Deserialize)]
struct SerialSection {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl Snapshot for SerialConsole {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        let st = self.inner.state();
        encode(
            "serial0",
            &SerialSection {
                baud_divisor_low: st.baud_divisor_low,
                baud_divisor_high: st.baud_divisor_high,
                interrupt_enable: st.interrupt_enable,
                interrupt_identification: st.interrupt_identification,
                line_control: st.line_control,
                line_status: st.line_status,
                modem_control: st.modem_control,
                modem_status: st.modem_status,
                scratch: st.scratch,
                in_buffer: st.in_buffer,
            },
        )
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let s: SerialSection = decode("serial0", state)?;
        let st = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        };
        let irq =
            self.inner.interrupt_evt().0.try_clone().map_err(|e| {
                SnapshotError::Other(format!("serial0: duplicating its eventfd: {e}"))
            })?;
        let old = std::mem::replace(
            &mut self.inner,
            Serial::new(
                IrqLine(irq.try_clone().map_err(|e| {
                    SnapshotError::Other(format!("serial0: duplicating its eventfd: {e}"))
                })?),
                ConsoleSink::Discard,
            ),
        );
        // The interrupt a pending THR-empty or received byte raises again
        // goes to the irqfd, as it would have in the original VM.
        match Serial::from_state(
            &st,
            IrqLine(irq),
            vm_superio::serial::NoEvents,
            old.into_writer(),
        ) {
            Ok(serial) => {
                self.inner = serial;
                Ok(())
            }
            Err(e) => Err(SnapshotError::mismatch("serial0", format!("{e:?}"))),
        }
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
