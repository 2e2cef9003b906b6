//! The 8250/16550 UART at 0x3f8 (COM1), backed by vm-superio's state machine.

use std::fs::File;
use std::io::{self, LineWriter, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::coalesced::CoalescedZone;
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

/// Register offsets and bits the coalescing rule follows (the same
/// decoding as vm-superio's).
const IER_OFFSET: u64 = 1;
const LCR_OFFSET: u64 = 3;
const LCR_DLAB: u8 = 0x80;
const IER_VALID_BITS: u8 = 0x0f;
const THR_OFFSET: u64 = 0;

/// Transmitted bytes after which writes to the port are coalesced. A
/// guest that prints a few lines never gets a zone: unregistering one at
/// teardown is an SRCU grace period (3-5 ms on this host), and leaving it
/// to KVM's VM destruction costs more, while the ~120 exits of a few
/// lines cost about 1 ms here (docs/benchmarks.md, "Start-up", session 6).
/// Past this many bytes (a kernel's boot log) every further 16 bytes save
/// 15 exits.
pub const COALESCE_AFTER: u32 = 512;

/// COM1 on the PIO bus.
///
/// Writes to the transmit register (port 0x3f8) are coalesced by KVM
/// ([`crate::coalesced`]) while the interrupt enable register is zero: then
/// a transmitted byte has no effect the guest can see before its next
/// exit (no interrupt; the line status always reads empty), so the byte
/// may reach the device at that exit instead of costing one of its own.
/// A guest that enables any UART interrupt gets one exit per write again.
/// Coalescing starts once the guest has transmitted [`COALESCE_AFTER`]
/// bytes.
pub struct SerialConsole {
    inner: Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleSink>,
    /// The line control and interrupt enable registers, shadowed to decide
    /// whether the transmit register may be coalesced.
    lcr: u8,
    ier: u8,
    /// Bytes written to the transmit register, up to [`COALESCE_AFTER`].
    sent: u32,
    zone: Option<Box<dyn CoalescedZone>>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        SerialConsole {
            inner: Serial::new(IrqLine(irq), sink),
            lcr: 0,
            ier: 0,
            sent: 0,
            zone: None,
        }
    }

    /// Lets KVM coalesce transmit-register writes whenever the UART's
    /// state allows it and the guest has printed enough for it to pay.
    pub fn set_coalescing(&mut self, zone: Box<dyn CoalescedZone>) {
        self.zone = Some(zone);
        self.update_zone();
    }

    /// Whether transmit-register writes may be coalesced now.
    fn coalescing(&self) -> bool {
        self.ier == 0 && self.sent >= COALESCE_AFTER
    }

    fn update_zone(&mut self) {
        let on = self.coalescing();
        if let Some(zone) = &mut self.zone {
            zone.set(on);
        }
    }

    /// Follows the writes that change whether coalescing is allowed.
    fn track(&mut self, offset: u64, value: u8) {
        match offset {
            THR_OFFSET if self.lcr & LCR_DLAB == 0 && self.sent < COALESCE_AFTER => {
                self.sent += 1;
                if self.sent == COALESCE_AFTER {
                    self.update_zone();
                }
            }
            LCR_OFFSET => self.lcr = value,
            IER_OFFSET if self.lcr & LCR_DLAB == 0 => {
                self.ier = value & IER_VALID_BITS;
                self.update_zone();
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
                // The coalescing rule follows the restored registers.
                self.lcr = s.line_control;
                self.ier = s.interrupt_enable & IER_VALID_BITS;
                self.update_zone();
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
            self.track(offset, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn uart() -> (SerialConsole, EventFd) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let dup = irq.try_clone().unwrap();
        (SerialConsole::new(irq, ConsoleSink::Discard), dup)
    }

    #[test]
    fn registers_and_the_receive_fifo_survive_save_and_restore() {
        let (mut a, _) = uart();
        // Scratch register, line control, and RX-data interrupts on.
        a.write(0, 7, &[0x5a]);
        a.write(0, 3, &[0x03]);
        a.write(0, 1, &[0x01]);
        assert_eq!(a.enqueue_input(b"hi"), 2);
        let state = a.save().unwrap();
        let (mut b, irq) = uart();
        b.restore(&state).unwrap();
        let mut byte = [0u8];
        b.read(0, 7, &mut byte);
        assert_eq!(byte[0], 0x5a);
        b.read(0, 3, &mut byte);
        assert_eq!(byte[0], 0x03);
        // The pending received data raised the interrupt again.
        assert_eq!(irq.read().unwrap(), 1);
        b.read(0, 0, &mut byte);
        assert_eq!(byte[0], b'h');
        b.read(0, 0, &mut byte);
        assert_eq!(byte[0], b'i');
        // Garbage is refused.
        assert!(b.restore(&[0xff; 3]).is_err());
        let mut big = SerialSection {
            baud_divisor_low: 0,
            baud_divisor_high: 0,
            interrupt_enable: 0,
            interrupt_identification: 0,
            line_control: 0,
            line_status: 0,
            modem_control: 0,
            modem_status: 0,
            scratch: 0,
            in_buffer: vec![0; 4096],
        };
        let e = b.restore(&encode("serial0", &big).unwrap()).unwrap_err();
        assert!(e.is_bad_input(), "{e}");
        big.in_buffer.clear();
        b.restore(&encode("serial0", &big).unwrap()).unwrap();
    }

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

    fn print(s: &mut SerialConsole, n: u32) {
        for _ in 0..n {
            s.write(COM1_PORT.into(), THR_OFFSET, b"x");
        }
    }

    #[test]
    fn coalesces_once_the_guest_has_printed_enough() {
        let (mut s, calls) = console();
        // After reset IER is 0, but nothing was printed yet.
        assert_eq!(*calls.lock().unwrap(), [false]);
        print(&mut s, COALESCE_AFTER - 1);
        // Divisor-latch writes at the transmit offset are not bytes sent.
        s.write(COM1_PORT.into(), LCR_OFFSET, &[LCR_DLAB | 0x03]);
        s.write(COM1_PORT.into(), THR_OFFSET, &[0x01]);
        s.write(COM1_PORT.into(), LCR_OFFSET, &[0x03]);
        assert_eq!(*calls.lock().unwrap(), [false]);
        print(&mut s, 1);
        assert_eq!(*calls.lock().unwrap(), [false, true]);
        print(&mut s, 100);
        assert_eq!(*calls.lock().unwrap(), [false, true], "asked once");
    }

    #[test]
    fn coalesces_only_while_no_interrupt_is_enabled() {
        let (mut s, calls) = console();
        print(&mut s, COALESCE_AFTER);
        s.write(COM1_PORT.into(), IER_OFFSET, &[0x02]); // THRE interrupt
        s.write(COM1_PORT.into(), IER_OFFSET, &[0x00]);
        s.write(COM1_PORT.into(), IER_OFFSET, &[0xf0]); // no valid bits: still 0
        assert_eq!(*calls.lock().unwrap(), [false, true, false, true, true]);
    }

    #[test]
    fn divisor_latch_writes_are_not_ier() {
        let (mut s, calls) = console();
        print(&mut s, COALESCE_AFTER);
        s.write(COM1_PORT.into(), LCR_OFFSET, &[LCR_DLAB | 0x03]);
        s.write(COM1_PORT.into(), IER_OFFSET, &[0x01]); // divisor high byte
        assert_eq!(*calls.lock().unwrap(), [false, true]);
        s.write(COM1_PORT.into(), LCR_OFFSET, &[0x03]);
        s.write(COM1_PORT.into(), IER_OFFSET, &[0x01]); // receive interrupt
        assert_eq!(*calls.lock().unwrap(), [false, true, false]);
    }
}
