//! The `state` file: a fixed header, then the postcard encoding of
//! [`SnapshotState`].
//!
//! | bytes | field |
//! |-------|-------|
//! | 0..8  | magic `RINGVMSS` |
//! | 8..12 | format version (u32, little-endian) |
//! | 12..20 | payload length in bytes (u64, little-endian) |
//! | 20..24 | CRC-32 (IEEE) of the payload (u32, little-endian) |
//! | 24..  | payload |
//!
//! [`decode_state`] checks the header, the length and the checksum before
//! it decodes anything, and refuses trailing bytes: whatever the file
//! holds, it returns an error or a state, never panics (fuzzed by
//! `fuzz/fuzz_targets/snapshot_state.rs`).

use serde::{Deserialize, Serialize};

use super::cpu::VcpuState;
use super::vmstate::VmKvmState;
use super::Section;

pub const MAGIC: [u8; 8] = *b"RINGVMSS";
/// Bumped whenever [`SnapshotState`] or any device's section changes shape.
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 24;
/// Larger payloads are refused before they are read (vCPU and device state
/// is a few KiB per vCPU and device).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// One RAM region and the file its contents are in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    pub guest_addr: u64,
    pub size: u64,
    /// File name inside the snapshot directory.
    pub file: String,
}

/// Everything in `state`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmKvmState,
    /// One per device, by registry name, sorted by name.
    pub devices: Vec<Section>,
    pub memory: Vec<MemoryRegion>,
}

/// Why a `state` file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("is {len} bytes, shorter than the {HEADER_LEN}-byte header")]
    Short { len: usize },
    #[error("is not a ringvm snapshot state (bad magic number)")]
    Magic,
    #[error("has format version {found}; this ringvm reads version {FORMAT_VERSION}")]
    Version { found: u32 },
    #[error("is truncated or has trailing bytes: the header says {header} payload bytes, the file has {found}")]
    Length { header: u64, found: u64 },
    #[error("is corrupted: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum { expected: u32, found: u32 },
    #[error("cannot be decoded")]
    Decode(#[source] postcard::Error),
    #[error("has {len} bytes after the end of its state")]
    Trailing { len: usize },
    #[error("cannot be encoded")]
    Encode(#[source] postcard::Error),
}

/// The whole file for `state`.
pub fn encode_state(state: &SnapshotState) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_stdvec(state).map_err(FormatError::Encode)?;
    Ok(frame(&payload))
}

/// `payload` behind a header of this format version (with its length
/// and checksum).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks and decodes a `state` file.
pub fn decode_state(bytes: &[u8]) -> Result<SnapshotState, FormatError> {
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Short { len: bytes.len() });
    }
    if bytes[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    let word = |r: std::ops::Range<usize>| -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&bytes[r]);
        b
    };
    let version = u32::from_le_bytes(word(8..12)[..4].try_into().unwrap_or([0; 4]));
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let header = u64::from_le_bytes(word(12..20));
    let payload = &bytes[HEADER_LEN..];
    if header != payload.len() as u64 || header > MAX_PAYLOAD {
        return Err(FormatError::Length {
            header,
            found: payload.len() as u64,
        });
    }
    let expected = u32::from_le_bytes(word(20..24)[..4].try_into().unwrap_or([0; 4]));
    let found = crc32fast::hash(payload);
    if found != expected {
        return Err(FormatError::Checksum { expected, found });
    }
    let (state, rest) = postcard::take_from_bytes(payload).map_err(FormatError::Decode)?;
    if !rest.is_empty() {
        return Err(FormatError::Trailing { len: rest.len() });
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotState {
        SnapshotState {
            vcpus: Vec::new(),
            vm: VmKvmState::default(),
            devices: vec![Section {
                name: "serial0".into(),
                data: vec![1, 2, 3],
            }],
            memory: vec![MemoryRegion {
                guest_addr: 0,
                size: 1 << 20,
                file: "memory0".into(),
            }],
        }
    }

    #[test]
    fn round_trips_and_refuses_every_damage() {
        let bytes = encode_state(&sample()).unwrap();
        let back = decode_state(&bytes).unwrap();
        assert_eq!(back.devices, sample().devices);
        assert_eq!(back.memory, sample().memory);
        assert!(matches!(
            decode_state(&bytes[..10]),
            Err(FormatError::Short { .. })
        ));
        assert!(matches!(
            decode_state(&bytes[..bytes.len() - 1]),
            Err(FormatError::Length { .. })
        ));
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 0x40;
        assert!(matches!(
            decode_state(&bad),
            Err(FormatError::Checksum { .. })
        ));
        let mut v2 = bytes.clone();
        v2[8] = 2;
        assert_eq!(
            decode_state(&v2).unwrap_err().to_string(),
            "has format version 2; this ringvm reads version 1"
        );
        let mut magic = bytes;
        magic[0] = b'X';
        assert!(matches!(decode_state(&magic), Err(FormatError::Magic)));
    }
}
