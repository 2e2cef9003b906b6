//! The PVH `hvm_start_info` block handed over in EBX.
//!
//! Layout (all little-endian, version 1):
//!
//! | offset | field            | type |
//! |--------|------------------|------|
//! | 0      | magic 0x336ec578 | u32  |
//! | 4      | version          | u32  |
//! | 8      | flags            | u32  |
//! | 12     | nr_modules       | u32  |
//! | 16     | modlist_paddr    | u64  |
//! | 24     | cmdline_paddr    | u64  |
//! | 32     | rsdp_paddr       | u64  |
//! | 40     | memmap_paddr     | u64  (version >= 1) |
//! | 48     | memmap_entries   | u32  (version >= 1) |
//! | 52     | reserved         | u32  |
//!
//! Memory map entries (version >= 1) are 24 bytes: addr u64, size u64,
//! type u32, reserved u32.

use crate::phys;

/// `hvm_start_info.magic`.
pub const MAGIC: u32 = 0x336e_c578;
/// Size of the version 0 structure (up to and including rsdp_paddr); the
/// fields read here all exist in version 0.
const SIZE_V0: usize = 40;
/// Longest command line the guest reads.
pub const CMDLINE_MAX: usize = 4096;

/// Why the start info could not be used.
#[derive(Clone, Copy, Debug)]
pub enum Error {
    /// EBX did not point at readable memory.
    Unreadable,
    /// The magic number did not match.
    BadMagic,
}

/// The fields of `hvm_start_info` this guest uses.
/// Later guest forms can add the memory map (offsets 40/48) here.
#[derive(Clone, Copy, Debug, Default)]
pub struct StartInfo {
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
}

impl StartInfo {
    /// Reads and validates the block at guest-physical `paddr`.
    pub fn read(paddr: u64) -> Result<Self, Error> {
        let b = phys::bytes(paddr, SIZE_V0).ok_or(Error::Unreadable)?;
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(Error::BadMagic);
        }
        Ok(StartInfo {
            cmdline_paddr: u64_at(b, 24),
            rsdp_paddr: u64_at(b, 32),
        })
    }

    /// The command line (empty when absent), capped at [`CMDLINE_MAX`]
    /// bytes and stopping at the first NUL.
    pub fn cmdline(&self) -> &'static [u8] {
        if self.cmdline_paddr == 0 {
            return &[];
        }
        phys::c_string(self.cmdline_paddr, CMDLINE_MAX)
    }
}
