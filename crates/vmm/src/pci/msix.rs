//! MSI-X emulation: the capability's message control, the vector table and
//! the pending-bit array, with each vector backed by an irqfd on a GSI route
//! that follows the table ([`MsiVector`]). Shared by the virtio-pci
//! transport and PCI passthrough.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::interrupts::{InterruptError, InterruptRouter, MsiMessage, MsiVector};

/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
const MSG_CTRL_ENABLE: u16 = 1 << 15;
const MSG_CTRL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CTRL_MASKED: u32 = 1;
/// MSI target addresses live in 0xFEE0_0000–0xFEEF_FFFF.
const MSI_ADDRESS_MASK: u64 = 0xfff0_0000;
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

/// The MSI message for `address`/`data`, or None when the address is not
/// an MSI target (the local APICs' window).
pub fn msi_message(address: u64, data: u32) -> Option<MsiMessage> {
    (address & MSI_ADDRESS_MASK == MSI_ADDRESS_BASE).then_some(MsiMessage { address, data })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

impl Default for Entry {
    fn default() -> Self {
        // Vectors come out of reset masked.
        Entry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            ctrl: VECTOR_CTRL_MASKED,
        }
    }
}

/// What a snapshot keeps of MSI-X: the table, message control and which
/// vectors are pending (raised while masked).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// (address low, address high, data, vector control) per entry.
    pub table: Vec<(u32, u32, u32, u32)>,
    pub control: u16,
    pub pending: Vec<bool>,
}

/// The MSI-X state of one function.
pub struct Msix {
    entries: Vec<Entry>,
    vectors: Vec<MsiVector>,
    control: u16,
}

impl Msix {
    /// `count` vectors, each with its own GSI and eventfd.
    pub fn new(router: &Arc<InterruptRouter>, count: u16) -> Result<Msix, InterruptError> {
        let vectors = (0..count)
            .map(|_| router.msi_vector())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Msix {
            entries: vec![Entry::default(); usize::from(count)],
            vectors,
            control: count - 1,
        })
    }

    pub fn count(&self) -> u16 {
        self.entries.len() as u16
    }

    /// The message control register.
    pub fn control(&self) -> u16 {
        self.control
    }

    pub fn enabled(&self) -> bool {
        self.control & MSG_CTRL_ENABLE != 0
    }

    /// Applies a guest write to message control (only enable and function
    /// mask are writable).
    pub fn write_control(&mut self, value: u16) {
        let rw = MSG_CTRL_ENABLE | MSG_CTRL_FUNCTION_MASK;
        self.control = (self.control & !rw) | (value & rw);
        for i in 0..self.entries.len() {
            self.sync(i);
        }
    }

    /// Brings vector `i`'s route and irqfd in line with the table.
    fn sync(&mut self, i: usize) {
        let e = self.entries[i];
        let address = (u64::from(e.addr_hi) << 32) | u64::from(e.addr_lo);
        let message = msi_message(address, e.data);
        let masked = !self.enabled()
            || self.control & MSG_CTRL_FUNCTION_MASK != 0
            || e.ctrl & VECTOR_CTRL_MASKED != 0;
        if let Err(err) = self.vectors[i].update(message, masked) {
            log::error!("MSI-X vector {i}: {err}");
        }
    }

    /// The state for a snapshot.
    pub fn state(&self) -> MsixState {
        MsixState {
            table: self
                .entries
                .iter()
                .map(|e| (e.addr_lo, e.addr_hi, e.data, e.ctrl))
                .collect(),
            control: self.control,
            pending: self.vectors.iter().map(MsiVector::pending).collect(),
        }
    }

    /// Loads a saved state: every vector's route and irqfd are rebuilt
    /// from the table as a guest write would, and a pending vector's
    /// eventfd is signalled again (delivered when the guest unmasks it).
    pub fn set_state(&mut self, state: &MsixState) -> Result<(), String> {
        let n = self.entries.len();
        if state.table.len() != n || state.pending.len() != n {
            return Err(format!(
                "{} MSI-X entries saved, the function has {n}",
                state.table.len()
            ));
        }
        for (e, &(addr_lo, addr_hi, data, ctrl)) in self.entries.iter_mut().zip(&state.table) {
            *e = Entry {
                addr_lo: addr_lo & !0x3,
                addr_hi,
                data,
                ctrl: ctrl & VECTOR_CTRL_MASKED,
            };
        }
        let rw = MSG_CTRL_ENABLE | MSG_CTRL_FUNCTION_MASK;
        self.control = (self.control & !rw) | (state.control & rw);
        for i in 0..n {
            self.sync(i);
        }
        for (v, &p) in self.vectors.iter().zip(&state.pending) {
            if p {
                v.eventfd()
                    .write(1)
                    .map_err(|e| format!("raising a pending MSI-X vector: {e}"))?;
            }
        }
        Ok(())
    }

    /// A read of the vector table at `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let (i, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            offset % MSIX_ENTRY_SIZE,
        );
        let Some(e) = self.entries.get(i) else {
            data.fill(0xff);
            return;
        };
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&e.addr_lo.to_le_bytes());
        bytes[4..8].copy_from_slice(&e.addr_hi.to_le_bytes());
        bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
        bytes[12..16].copy_from_slice(&e.ctrl.to_le_bytes());
        let f = field as usize;
        match bytes.get(f..f + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    /// A write to the vector table (dword or qword accesses).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let (i, field) = (
            (offset / MSIX_ENTRY_SIZE) as usize,
            (offset % MSIX_ENTRY_SIZE) as usize,
        );
        if i >= self.entries.len()
            || field % 4 != 0
            || !(data.len() == 4 || data.len() == 8)
            || field + data.len() > 16
        {
            return;
        }
        for (k, chunk) in data.chunks_exact(4).enumerate() {
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let e = &mut self.entries[i];
            match field + k * 4 {
                0 => e.addr_lo = v & !0x3,
                4 => e.addr_hi = v,
                8 => e.data = v,
                _ => e.ctrl = v & VECTOR_CTRL_MASKED,
            }
        }
        self.sync(i);
    }

    /// A read of the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let mut bits = vec![0u8; self.entries.len().div_ceil(64) * 8];
        for (i, v) in self.vectors.iter().enumerate() {
            if v.pending() {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        let o = offset as usize;
        match bits.get(o..o + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    /// A duplicate of vector `i`'s eventfd, for a device to signal.
    pub fn eventfd(&self, i: u16) -> Option<std::io::Result<EventFd>> {
        self.vectors
            .get(usize::from(i))
            .map(|v| v.eventfd().try_clone())
    }

    /// Every vector's eventfd, in table order (what a passed-through
    /// device is given to signal, so its interrupts go straight to KVM).
    pub fn eventfds(&self) -> impl Iterator<Item = &EventFd> {
        self.vectors.iter().map(MsiVector::eventfd)
    }

    /// Whether the function mask is set.
    pub fn function_masked(&self) -> bool {
        self.control & MSG_CTRL_FUNCTION_MASK != 0
    }

    /// Back to reset state: disabled, every vector masked and unrouted.
    pub fn reset(&mut self) {
        self.control &= !(MSG_CTRL_ENABLE | MSG_CTRL_FUNCTION_MASK);
        for i in 0..self.entries.len() {
            self.entries[i] = Entry::default();
            self.sync(i);
        }
    }
}
