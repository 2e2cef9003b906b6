//! A BAR's direct mappings: the parts of a region the device lets us
//! mmap, minus the pages holding the MSI-X table and PBA (which stay
//! trapped and emulated), page-aligned, each mapped into the guest as a
//! KVM memory slot at BAR base + offset and moved when the guest moves the
//! BAR.

use std::os::fd::AsFd;
use std::sync::Arc;

use vmm::memslots::{MemorySlot, MemorySlots, MmapArea, SlotError, PAGE_SIZE};

use crate::config::{BarLayout, MsixLayout};
use crate::transport::RegionInfo;

/// One mmapped piece of a BAR.
pub struct BarMap {
    /// Offset in the BAR.
    pub offset: u64,
    pub len: u64,
    pub area: Arc<MmapArea>,
}

/// A memory BAR with what is mapped of it.
pub struct Bar {
    pub layout: BarLayout,
    pub maps: Vec<BarMap>,
    /// Slots for `maps` at `addr`, while the BAR is decoded.
    pub slots: Vec<MemorySlot>,
    pub addr: Option<u64>,
}

fn round_down(v: u64) -> u64 {
    v & !(PAGE_SIZE - 1)
}

fn round_up(v: u64) -> u64 {
    v.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

/// The page-aligned `[start, end)` pieces of BAR `bar` that may be mapped:
/// the region's mmap areas within the BAR, without the pages of the MSI-X
/// table and PBA.
pub fn mappable_pieces(
    bar: &BarLayout,
    region: &RegionInfo,
    msix: Option<&MsixLayout>,
) -> Vec<(u64, u64)> {
    if bar.size < PAGE_SIZE {
        return Vec::new();
    }
    let mut pieces: Vec<(u64, u64)> = region
        .mmap_areas()
        .iter()
        .filter_map(|a| {
            let end = a.offset.checked_add(a.size)?.min(bar.size);
            (a.offset < end).then_some((a.offset, end))
        })
        .collect();
    let mut traps = Vec::new();
    if let Some(m) = msix {
        if m.table_bir == bar.index {
            traps.push((m.table_offset, m.table_offset + m.table_len()));
        }
        if m.pba_bir == bar.index {
            traps.push((m.pba_offset, m.pba_offset + m.pba_len()));
        }
    }
    for (t0, t1) in traps {
        let (t0, t1) = (round_down(t0), round_up(t1));
        pieces = pieces
            .into_iter()
            .flat_map(|(s, e)| {
                let mut out = Vec::new();
                if s < t0.min(e) {
                    out.push((s, t0.min(e)));
                }
                if t1.max(s) < e {
                    out.push((t1.max(s), e));
                }
                out
            })
            .collect();
    }
    pieces
        .into_iter()
        .map(|(s, e)| (round_up(s), round_down(e)))
        .filter(|(s, e)| s < e)
        .collect()
}

/// mmaps the pieces of `bar` that may be mapped; a piece that cannot be
/// mmapped is left to region reads and writes (logged).
pub fn map_bar(
    name: &str,
    bar: &BarLayout,
    region: &RegionInfo,
    msix: Option<&MsixLayout>,
) -> Vec<BarMap> {
    let Some(source) = &region.mmap else {
        return Vec::new();
    };
    let mut maps = Vec::new();
    for (start, end) in mappable_pieces(bar, region, msix) {
        let Some(file_offset) = source.offset.checked_add(start) else {
            continue;
        };
        match MmapArea::map_shared(source.fd.as_fd(), file_offset, end - start) {
            Ok(area) => maps.push(BarMap {
                offset: start,
                len: end - start,
                area: Arc::new(area),
            }),
            Err(e) => log::warn!(
                "{name}: BAR{} [{start:#x}, {end:#x}) stays trapped: {e}",
                bar.index
            ),
        }
    }
    maps
}

impl Bar {
    /// Follows the BAR to `addr` (None: not decoded): the slots at the old
    /// address go, slots at the new one are made.
    pub fn move_to(&mut self, name: &str, slots: &Arc<MemorySlots>, addr: Option<u64>) {
        if addr == self.addr {
            return;
        }
        self.slots.clear();
        self.addr = addr;
        let Some(base) = addr else { return };
        for m in &self.maps {
            let mapped: Result<MemorySlot, SlotError> =
                slots.map(base + m.offset, m.area.clone(), 0, m.len);
            match mapped {
                Ok(slot) => self.slots.push(slot),
                Err(e) => log::warn!(
                    "{name}: BAR{} +{:#x} stays trapped: {e}",
                    self.layout.index,
                    m.offset
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{MmapSource, SparseArea};
    use vmm::pci::BarKind;

    fn region(size: u64, sparse: Option<Vec<SparseArea>>) -> RegionInfo {
        let fd = std::fs::File::open("/dev/null").unwrap();
        RegionInfo {
            index: 2,
            flags: vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP,
            size,
            offset: 0,
            sparse,
            mmap: Some(MmapSource {
                fd: Arc::new(std::os::fd::OwnedFd::from(fd)),
                offset: 0,
            }),
        }
    }

    fn bar(size: u64) -> BarLayout {
        BarLayout {
            index: 2,
            size,
            kind: BarKind::Mem64 {
                prefetchable: false,
            },
        }
    }

    fn msix(table: u64, pba: u64) -> MsixLayout {
        MsixLayout {
            cap: 0x40,
            count: 8,
            table_bir: 2,
            table_offset: table,
            pba_bir: 2,
            pba_offset: pba,
        }
    }

    #[test]
    fn msix_pages_are_cut_out_of_the_mapping() {
        let m = msix(0x2000, 0x3000);
        assert_eq!(
            mappable_pieces(&bar(0x4000), &region(0x4000, None), Some(&m)),
            vec![(0, 0x2000)]
        );
        // Table in the middle of a page: that whole page stays trapped.
        let m = msix(0x1800, 0x1900);
        assert_eq!(
            mappable_pieces(&bar(0x4000), &region(0x4000, None), Some(&m)),
            vec![(0, 0x1000), (0x2000, 0x4000)]
        );
    }

    #[test]
    fn sparse_areas_are_respected_and_page_aligned() {
        let sparse = vec![
            SparseArea {
                offset: 0x800,
                size: 0x2000,
            },
            SparseArea {
                offset: 0x3000,
                size: 0x800,
            },
        ];
        assert_eq!(
            mappable_pieces(&bar(0x4000), &region(0x4000, Some(sparse)), None),
            vec![(0x1000, 0x2000)]
        );
        // Small BARs are never mapped; no mmap flag means nothing mapped.
        assert!(mappable_pieces(&bar(0x800), &region(0x800, None), None).is_empty());
        let mut r = region(0x4000, None);
        r.flags = 0;
        assert!(mappable_pieces(&bar(0x4000), &r, None).is_empty());
    }
}
