//! What the device model needs from a VFIO transport, and the parts of the
//! VFIO interface both transports share (region information and its
//! capability chain, interrupt sets).
//!
//! Two implementations: [`crate::user::UserTransport`] (vfio-user, a
//! device served on a Unix socket) and [`crate::kernel::KernelTransport`]
//! (the kernel's VFIO, through a syscall seam).

use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
};

/// Bytes of `struct vfio_region_info` (argsz, flags, index, cap_offset,
/// size, offset).
pub const REGION_INFO_SIZE: usize = 32;
/// Capabilities we follow in one region's chain.
const MAX_REGION_CAPS: usize = 16;
/// Sparse mmap areas we accept for one region.
const MAX_SPARSE_AREAS: usize = 64;

/// Errors from a transport. [`TransportError::is_fatal`] separates a
/// device that is gone (disconnected, answering garbage) from one that
/// refused one request.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{op}: the device server closed the connection")]
    Disconnected { op: &'static str },
    #[error("{op}: I/O on the device socket")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: malformed reply: {detail}")]
    Protocol { op: &'static str, detail: String },
    #[error("{op}: the connection to the device is unusable (it {why} earlier)")]
    Dead { op: &'static str, why: &'static str },
    #[error("{op}: the device refused (errno {errno})")]
    Refused { op: &'static str, errno: u32 },
    #[error("{op} failed")]
    Sys {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: {detail}")]
    Invalid { op: &'static str, detail: String },
}

impl TransportError {
    /// Whether the device can no longer be reached at all.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            TransportError::Disconnected { .. }
                | TransportError::Io { .. }
                | TransportError::Protocol { .. }
                | TransportError::Dead { .. }
        )
    }
}

/// `VFIO_DEVICE_GET_INFO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

impl DeviceInfo {
    pub fn is_pci(&self) -> bool {
        self.flags & VFIO_DEVICE_FLAGS_PCI != 0
    }

    pub fn resettable(&self) -> bool {
        self.flags & VFIO_DEVICE_FLAGS_RESET != 0
    }
}

/// A file descriptor to mmap a region through, and the region's offset in
/// it.
#[derive(Clone, Debug)]
pub struct MmapSource {
    pub fd: Arc<OwnedFd>,
    pub offset: u64,
}

/// One part of a region that may be mmapped: `[offset, offset + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseArea {
    pub offset: u64,
    pub size: u64,
}

/// `VFIO_DEVICE_GET_REGION_INFO`, with its sparse mmap capability.
#[derive(Clone, Debug)]
pub struct RegionInfo {
    pub index: u32,
    pub flags: u32,
    pub size: u64,
    /// Where the region sits in the device fd (kernel VFIO) or the
    /// region's own fd (vfio-user).
    pub offset: u64,
    /// The mmappable parts, if the region has a sparse mmap capability.
    pub sparse: Option<Vec<SparseArea>>,
    /// How to mmap it, if it may be mmapped.
    pub mmap: Option<MmapSource>,
}

impl RegionInfo {
    /// The parts of the region that may be mapped into the guest: the
    /// sparse areas, the whole region, or nothing.
    pub fn mmap_areas(&self) -> Vec<SparseArea> {
        if self.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || self.mmap.is_none() {
            return Vec::new();
        }
        match &self.sparse {
            Some(areas) => areas.clone(),
            None => vec![SparseArea {
                offset: 0,
                size: self.size,
            }],
        }
    }
}

/// `VFIO_DEVICE_GET_IRQ_INFO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    pub index: u32,
    pub flags: u32,
    pub count: u32,
}

/// What a `SET_IRQS` does to one interrupt index.
#[derive(Clone, Copy, Debug)]
pub enum IrqSet<'a> {
    /// Signal these eventfds for vectors `0..fds.len()`. The caller keeps
    /// them open for the call.
    Trigger(&'a [RawFd]),
    /// Stop signalling (and, for MSI/MSI-X, disable) the index.
    Disable,
    /// INTx: unmask when this (resample) eventfd is signalled.
    UnmaskOn(RawFd),
}

/// One range of guest RAM to make reachable by the device's DMA.
#[derive(Clone, Copy, Debug)]
pub struct DmaRegion<'a> {
    /// Guest-physical address, which is the device's IOVA.
    pub iova: u64,
    pub size: u64,
    /// Where the VMM has it mapped.
    pub host_addr: u64,
    /// The file behind it and the offset in that file, when it has one.
    pub file: Option<(BorrowedFd<'a>, u64)>,
}

/// A VFIO device as the device model uses it.
pub trait Transport: Send {
    /// What to call the device in messages.
    fn describe(&self) -> String;
    fn device_info(&mut self) -> Result<DeviceInfo, TransportError>;
    fn region_info(&mut self, index: u32) -> Result<RegionInfo, TransportError>;
    fn irq_info(&mut self, index: u32) -> Result<IrqInfo, TransportError>;
    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), TransportError>;
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), TransportError>;
    fn set_irqs(&mut self, index: u32, set: IrqSet<'_>) -> Result<(), TransportError>;
    /// Whether DMA mappings need a file descriptor for the memory (the
    /// device lives in another process).
    fn dma_needs_fd(&self) -> bool;
    fn dma_map(&mut self, region: &DmaRegion<'_>) -> Result<(), TransportError>;
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), TransportError>;
    fn reset(&mut self) -> Result<(), TransportError>;
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// The fixed part of a `vfio_region_info` as bytes, with `argsz` set.
pub fn region_info_request(index: u32, argsz: u32) -> [u8; REGION_INFO_SIZE] {
    let mut b = [0u8; REGION_INFO_SIZE];
    b[0..4].copy_from_slice(&argsz.to_le_bytes());
    b[8..12].copy_from_slice(&index.to_le_bytes());
    b
}

/// The parsed fixed part of a region info reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// Parses the fixed part of `struct vfio_region_info`.
pub fn parse_region_info(b: &[u8]) -> Option<RawRegionInfo> {
    Some(RawRegionInfo {
        argsz: u32_at(b, 0)?,
        flags: u32_at(b, 4)?,
        index: u32_at(b, 8)?,
        cap_offset: u32_at(b, 12)?,
        size: u64_at(b, 16)?,
        offset: u64_at(b, 24)?,
    })
}

/// Walks the capability chain of a region info (`info` holds the
/// `vfio_region_info` followed by its capabilities; offsets count from
/// its start) and returns the sparse mmap areas, if there is such a
/// capability. Every offset, count and area is checked against `info`
/// and the region's size; the chain must move forward.
pub fn sparse_areas(info: &[u8], raw: &RawRegionInfo) -> Result<Option<Vec<SparseArea>>, String> {
    if raw.flags & VFIO_REGION_INFO_FLAG_CAPS == 0 || raw.cap_offset == 0 {
        return Ok(None);
    }
    let mut next = raw.cap_offset as usize;
    let mut areas: Option<Vec<SparseArea>> = None;
    for _ in 0..MAX_REGION_CAPS {
        if next == 0 {
            return Ok(areas);
        }
        if next < REGION_INFO_SIZE || next % 4 != 0 {
            return Err(format!("capability offset {next:#x} is invalid"));
        }
        let id = info
            .get(next..next + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("capability at {next:#x} is past the reply"))?;
        let following = u32_at(info, next + 4)
            .ok_or_else(|| format!("capability at {next:#x} is truncated"))?
            as usize;
        if following != 0 && following <= next {
            return Err(format!(
                "capability chain goes back from {next:#x} to {following:#x}"
            ));
        }
        if u32::from(id) == VFIO_REGION_INFO_CAP_SPARSE_MMAP {
            let count = u32_at(info, next + 8)
                .ok_or_else(|| "sparse mmap capability is truncated".to_string())?
                as usize;
            if count > MAX_SPARSE_AREAS {
                return Err(format!("sparse mmap capability claims {count} areas"));
            }
            let mut list = Vec::with_capacity(count);
            for i in 0..count {
                let at = next + 16 + i * 16;
                let (Some(offset), Some(size)) = (u64_at(info, at), u64_at(info, at + 8)) else {
                    return Err(format!("sparse mmap area {i} of {count} is truncated"));
                };
                let inside = offset.checked_add(size).is_some_and(|end| end <= raw.size);
                if !inside {
                    return Err(format!(
                        "sparse mmap area [{offset:#x}, +{size:#x}) is outside the {:#x}-byte region",
                        raw.size
                    ));
                }
                if size > 0 {
                    list.push(SparseArea { offset, size });
                }
            }
            areas.get_or_insert_with(Vec::new).extend(list);
        }
        next = following;
    }
    Err(format!(
        "region capability chain longer than {MAX_REGION_CAPS}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_with_caps(size: u64, caps: &[u8]) -> (Vec<u8>, RawRegionInfo) {
        let mut b = region_info_request(2, (REGION_INFO_SIZE + caps.len()) as u32).to_vec();
        b[4..8].copy_from_slice(
            &(VFIO_REGION_INFO_FLAG_CAPS | VFIO_REGION_INFO_FLAG_MMAP).to_le_bytes(),
        );
        b[12..16].copy_from_slice(&(REGION_INFO_SIZE as u32).to_le_bytes());
        b[16..24].copy_from_slice(&size.to_le_bytes());
        b.extend_from_slice(caps);
        let raw = parse_region_info(&b).unwrap();
        (b, raw)
    }

    fn sparse_cap(next: u32, count: u32, areas: &[(u64, u64)]) -> Vec<u8> {
        let mut c = Vec::new();
        c.extend_from_slice(&(VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16).to_le_bytes());
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&next.to_le_bytes());
        c.extend_from_slice(&count.to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        for (o, s) in areas {
            c.extend_from_slice(&o.to_le_bytes());
            c.extend_from_slice(&s.to_le_bytes());
        }
        c
    }

    #[test]
    fn reads_sparse_areas() {
        let (b, raw) = info_with_caps(0x4000, &sparse_cap(0, 2, &[(0, 0x2000), (0x3000, 0)]));
        assert_eq!(
            sparse_areas(&b, &raw).unwrap(),
            Some(vec![SparseArea {
                offset: 0,
                size: 0x2000
            }])
        );
    }

    #[test]
    fn rejects_lying_capability_chains() {
        // An area past the region.
        let (b, raw) = info_with_caps(0x1000, &sparse_cap(0, 1, &[(0, 0x2000)]));
        assert!(sparse_areas(&b, &raw).is_err());
        // More areas than the reply holds.
        let (b, raw) = info_with_caps(0x4000, &sparse_cap(0, 5, &[(0, 0x1000)]));
        assert!(sparse_areas(&b, &raw).is_err());
        // A huge count.
        let (b, raw) = info_with_caps(0x4000, &sparse_cap(0, u32::MAX, &[]));
        assert!(sparse_areas(&b, &raw).is_err());
        // A chain pointing at itself.
        let (b, raw) = info_with_caps(
            0x4000,
            &sparse_cap(REGION_INFO_SIZE as u32, 1, &[(0, 0x1000)]),
        );
        assert!(sparse_areas(&b, &raw).is_err());
        // A first capability past the reply.
        let (mut b, _) = info_with_caps(0x4000, &[]);
        b[12..16].copy_from_slice(&0x100u32.to_le_bytes());
        let raw = parse_region_info(&b).unwrap();
        assert!(sparse_areas(&b, &raw).is_err());
    }
}
