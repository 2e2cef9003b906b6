//! Minimal 16550 UART output (polled, transmit only).
//!
//! Port I/O is a VM exit, so the driver does not poll the line status before
//! every byte: it waits for "transmit holding register empty" (which, with
//! the FIFO enabled, means the whole transmit FIFO is empty) once, then
//! writes up to a FIFO's worth of bytes back to back.

use crate::port::{inb, outb};
use core::fmt;

/// I/O base of COM1.
pub const COM1: u16 = 0x3f8;

// Register offsets from the I/O base.
const THR: u16 = 0; // transmit holding (DLAB=0) / divisor latch low (DLAB=1)
const DLM: u16 = 1; // divisor latch high (DLAB=1)
const FCR: u16 = 2; // FIFO control (write) / interrupt identification (read)
const LCR: u16 = 3; // line control
const LSR: u16 = 5; // line status

const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
const FCR_ENABLE_CLEAR: u8 = 0x07; // enable FIFOs, clear RX and TX FIFOs
const IIR_FIFO_ENABLED: u8 = 0xc0;
const LSR_THRE: u8 = 0x20; // transmit holding register (FIFO) empty
const LSR_TEMT: u8 = 0x40; // transmitter completely idle

/// Transmit FIFO depth of a 16550A.
const FIFO_DEPTH: u8 = 16;
/// Upper bound on status polls before giving up on a wedged UART.
const POLL_LIMIT: u32 = 1 << 20;

/// A polled 16550 transmitter.
pub struct Serial {
    base: u16,
    /// How many more bytes may be written before the status must be polled.
    room: u8,
    /// Bytes the transmitter accepts after THRE (16 with FIFO, else 1).
    depth: u8,
}

impl Serial {
    /// Programs the UART at `base` for 115200 8N1 with FIFOs enabled.
    pub fn init(base: u16) -> Self {
        // SAFETY: `base` is a 16550 (COM1); programming its line control,
        // divisor and FIFO registers only affects the UART.
        let iir = unsafe {
            outb(base + LCR, LCR_DLAB);
            outb(base + THR, 1); // divisor 1: 115200 baud
            outb(base + DLM, 0);
            outb(base + LCR, LCR_8N1);
            outb(base + FCR, FCR_ENABLE_CLEAR);
            inb(base + FCR)
        };
        let depth = if iir & IIR_FIFO_ENABLED == IIR_FIFO_ENABLED {
            FIFO_DEPTH
        } else {
            1
        };
        Serial {
            base,
            room: 0,
            depth,
        }
    }

    /// Uses an already initialised UART (panic path) without touching it.
    pub fn attach(base: u16) -> Self {
        Serial {
            base,
            room: 0,
            depth: 1,
        }
    }

    /// Polls LSR until all `mask` bits are set (bounded).
    fn wait_status(&self, mask: u8) {
        for _ in 0..POLL_LIMIT {
            // SAFETY: reading the line status register has no side effect
            // beyond clearing latched line errors of this UART.
            if unsafe { inb(self.base + LSR) } & mask == mask {
                return;
            }
            core::hint::spin_loop();
        }
    }

    /// Sends raw bytes: up to a FIFO's worth after each status poll, in a
    /// loop with nothing else in it (under an instruction emulator every
    /// instruction per byte counts).
    pub fn write_bytes(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.room == 0 {
                self.wait_status(LSR_THRE);
                self.room = self.depth;
            }
            let n = bytes.len().min(usize::from(self.room));
            let (now, rest) = bytes.split_at(n);
            let thr = self.base + THR;
            for &b in now {
                // SAFETY: writing the transmit holding register queues one
                // byte.
                unsafe { outb(thr, b) };
            }
            self.room -= n as u8;
            bytes = rest;
        }
    }

    /// Sends a string.
    pub fn write_str(&mut self, s: &str) {
        self.write_bytes(s.as_bytes());
    }

    /// Sends `v` in decimal.
    pub fn write_dec(&mut self, mut v: u64) {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.write_bytes(&buf[i..]);
    }

    /// Sends `v` as `0x` followed by lowercase hex digits (no leading
    /// zeros).
    pub fn write_hex(&mut self, v: u64) {
        self.write_str("0x");
        let digits = (64 - v.leading_zeros()).div_ceil(4).max(1) as usize;
        self.write_hex_digits(v, digits);
    }

    /// Sends the low `digits` nibbles of `v` in lowercase hex, zero-padded,
    /// without a prefix.
    pub fn write_hex_digits(&mut self, v: u64, digits: usize) {
        let mut buf = [0u8; 16];
        let digits = digits.min(16);
        for (i, b) in buf[..digits].iter_mut().enumerate() {
            let nibble = (v >> (4 * (digits - 1 - i))) & 0xf;
            *b = b"0123456789abcdef"[nibble as usize];
        }
        self.write_bytes(&buf[..digits]);
    }

    /// Waits until every queued byte has left the transmitter, so that an
    /// immediate power-off or reset does not lose output.
    pub fn flush(&mut self) {
        self.wait_status(LSR_THRE | LSR_TEMT);
        self.room = self.depth;
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}
