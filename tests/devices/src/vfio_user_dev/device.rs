//! The device model behind the vfio-user server: regions, BAR0 registers,
//! the BAR2 memfd window, the DMA engine and interrupt delivery.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use vfio_bindings::bindings::vfio::{
    vfio_region_info, vfio_region_sparse_mmap_area, VFIO_IRQ_INFO_AUTOMASKED,
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE,
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion, SparseArea};

use super::config::{self, Config};
use super::dma::{self, Mappings};
use super::intx::Intx;
use super::{lock, reg, Behaviour, Stats};
use super::{BAD_BAR0_SIZE, BAR0_SIZE, BAR2_MMAP_SIZE, BAR2_SIZE, DMA_MAX_LEN, ID_VALUE};
use super::{MSIX_PBA_OFFSET, MSIX_VECTORS};

/// VFIO PCI region indices used here, and how many regions there are.
const BAR0: u32 = 0;
const BAR2: u32 = 2;
const CONFIG: u32 = 7;
const NUM_REGIONS: u32 = 9;
/// IRQ indices (INTx, MSI, MSI-X, ERR, REQ).
const INTX: usize = 0;
const MSI: usize = 1;
const MSIX: usize = 2;
const NUM_IRQS: usize = 5;
/// Mask applied to PEEK_OFFSET.
const PEEK_MASK: u32 = 0x1ffc;

/// A request the device refuses; the server answers it with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create the BAR2 memfd")]
    Memfd(#[source] io::Error),
    #[error("region {region}: {len}-byte access at {offset:#x} is out of range or misaligned")]
    BadAccess {
        region: u32,
        offset: u64,
        len: usize,
    },
    #[error("BAR2 memfd access at {offset:#x} failed")]
    Window {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("SET_IRQS index {index} start {start} count {count} flags {flags:#x}: {why}")]
    BadIrqSet {
        index: u32,
        start: u32,
        count: u32,
        flags: u32,
        why: &'static str,
    },
    #[error("DMA_UNMAP flags {0:#x} are not supported")]
    UnmapFlags(u32),
    #[error("DMA mapping request rejected")]
    Dma(#[source] dma::Error),
    #[error("cannot start watching the INTx unmask eventfd")]
    IntxWatcher(#[source] io::Error),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, e)
    }
}

/// The eventfds, masks and pending bits of one IRQ index.
struct Irq {
    fds: Vec<Option<File>>,
    masked: Vec<bool>,
    pending: Vec<bool>,
}

impl Irq {
    fn new(count: usize) -> Irq {
        Irq {
            fds: (0..count).map(|_| None).collect(),
            masked: vec![false; count],
            pending: vec![false; count],
        }
    }

    fn count(&self) -> usize {
        self.fds.len()
    }

    fn held(&self) -> usize {
        self.fds.iter().flatten().count()
    }

    fn clear(&mut self) {
        *self = Irq::new(self.count());
    }
}

/// DMA engine and peek registers.
#[derive(Clone, Copy, Debug, Default)]
struct Regs {
    dma_src: u64,
    dma_dst: u64,
    dma_len: u32,
    dma_status: u32,
    peek_offset: u32,
    irq_count: u32,
}

/// The device state. One client at a time drives it.
pub struct Device {
    bar0_size: u64,
    config: Config,
    regs: Regs,
    /// BAR2's memory: 16 KiB, of which the client may mmap `[0, 0x2000)`.
    window: File,
    dma: Mappings,
    /// MSI and MSI-X (and the INTx index's count, for `irq_infos`).
    irqs: Vec<Irq>,
    intx: Intx,
    stats: Arc<Mutex<Stats>>,
}

fn set_lo(v: &mut u64, lo: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(lo);
}

fn set_hi(v: &mut u64, hi: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(hi) << 32);
}

impl Device {
    pub fn new(behaviour: Behaviour, stats: Arc<Mutex<Stats>>) -> Result<Device, Error> {
        // SAFETY: memfd_create reads the NUL-terminated name and returns a
        // new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"ringvm-test-bar2".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Memfd(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let window = unsafe { File::from_raw_fd(fd) };
        window.set_len(BAR2_SIZE).map_err(Error::Memfd)?;
        let irq_counts: [usize; NUM_IRQS] = [1, 1, MSIX_VECTORS as usize, 0, 0];
        Ok(Device {
            bar0_size: if behaviour == Behaviour::BadBarSize {
                BAD_BAR0_SIZE
            } else {
                BAR0_SIZE
            },
            config: Config::new(behaviour),
            regs: Regs::default(),
            window,
            dma: Mappings::default(),
            irqs: irq_counts.into_iter().map(Irq::new).collect(),
            intx: Intx::new(stats.clone()),
            stats,
        })
    }

    /// The regions for `vfio_user::Server`. BAR2's entry carries the memfd,
    /// which lives as long as the device.
    pub fn regions(&self) -> Vec<ServerRegion> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        (0..NUM_REGIONS)
            .map(|index| {
                let (size, flags) = match index {
                    BAR0 => (self.bar0_size, rw),
                    BAR2 => (BAR2_SIZE, rw | VFIO_REGION_INFO_FLAG_MMAP),
                    CONFIG => (config::SIZE as u64, rw),
                    _ => (0, 0),
                };
                let mmap = index == BAR2;
                ServerRegion {
                    region_info: vfio_region_info {
                        argsz: std::mem::size_of::<vfio_region_info>() as u32,
                        flags,
                        index,
                        cap_offset: 0,
                        size,
                        offset: 0,
                    },
                    sparse_areas: if mmap {
                        vec![SparseArea {
                            area: vfio_region_sparse_mmap_area {
                                offset: 0,
                                size: BAR2_MMAP_SIZE,
                            },
                        }]
                    } else {
                        Vec::new()
                    },
                    mmap_fd: mmap.then(|| self.window.as_raw_fd()),
                }
            })
            .collect()
    }

    /// The IRQ indices for `vfio_user::Server`.
    pub fn irq_infos(&self) -> Vec<IrqInfo> {
        let flags = [
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED,
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE,
            VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_NORESIZE,
            0,
            0,
        ];
        self.irqs
            .iter()
            .zip(flags)
            .enumerate()
            .map(|(index, (irq, flags))| IrqInfo {
                index: index as u32,
                flags,
                count: irq.count() as u32,
            })
            .collect()
    }

    /// The client went away: its mappings and eventfds go too.
    pub fn disconnected(&mut self) {
        self.dma.clear();
        for irq in &mut self.irqs {
            irq.clear();
        }
        self.intx.disable();
        self.update_held();
        lock(&self.stats).sessions_ended += 1;
    }

    fn update_held(&mut self) {
        // The line's lock is never taken under the stats lock.
        let intx = self.intx.held();
        let mut s = lock(&self.stats);
        s.dma_mappings = self.dma.len();
        for (held, irq) in s.irq_fds.iter_mut().zip(&self.irqs) {
            *held = irq.held();
        }
        s.irq_fds[INTX] = intx;
    }

    fn bad_access(region: u32, offset: u64, len: usize) -> Error {
        Error::BadAccess {
            region,
            offset,
            len,
        }
    }

    /// `[offset, offset + len)` lies inside `size` bytes.
    fn inside(offset: u64, len: usize, size: u64) -> bool {
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
    }

    fn reg_read(&self, off: u64) -> Result<u32, Error> {
        let r = &self.regs;
        Ok(match off {
            reg::ID => ID_VALUE,
            reg::DMA_SRC_LO => r.dma_src as u32,
            reg::DMA_SRC_HI => (r.dma_src >> 32) as u32,
            reg::DMA_DST_LO => r.dma_dst as u32,
            reg::DMA_DST_HI => (r.dma_dst >> 32) as u32,
            reg::DMA_LEN => r.dma_len,
            reg::DMA_STATUS => r.dma_status,
            reg::PEEK_VALUE => {
                let mut v = [0; 4];
                let offset = u64::from(r.peek_offset);
                self.window
                    .read_exact_at(&mut v, offset)
                    .map_err(|source| Error::Window { offset, source })?;
                u32::from_le_bytes(v)
            }
            reg::PEEK_OFFSET => r.peek_offset,
            reg::IRQ_COUNT => r.irq_count,
            reg::INTX => self.intx.status(),
            _ => 0,
        })
    }

    fn reg_write(&mut self, off: u64, v: u32) {
        let r = &mut self.regs;
        match off {
            reg::DOORBELL => self.doorbell(v),
            reg::DMA_SRC_LO => set_lo(&mut r.dma_src, v),
            reg::DMA_SRC_HI => set_hi(&mut r.dma_src, v),
            reg::DMA_DST_LO => set_lo(&mut r.dma_dst, v),
            reg::DMA_DST_HI => set_hi(&mut r.dma_dst, v),
            reg::DMA_LEN => r.dma_len = v,
            reg::DMA_CMD if v == reg::DMA_CMD_COPY => self.dma_copy(),
            reg::PEEK_OFFSET => r.peek_offset = v & PEEK_MASK,
            reg::INTX => self.intx.set_level(v & reg::INTX_ASSERTED != 0),
            _ => {}
        }
    }

    /// Any-size read inside BAR0, assembled from the dword registers.
    fn bar0_read(&self, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        if !Self::inside(offset, data.len(), self.bar0_size) {
            return Err(Self::bad_access(BAR0, offset, data.len()));
        }
        let end = offset + data.len() as u64;
        let mut dword = offset & !3;
        while dword < end {
            let bytes = self.reg_read(dword)?.to_le_bytes();
            for (i, b) in bytes.iter().enumerate() {
                let at = dword + i as u64;
                if (offset..end).contains(&at) {
                    data[(at - offset) as usize] = *b;
                }
            }
            dword += 4;
        }
        Ok(())
    }

    /// Dword-aligned writes of whole dwords only.
    fn bar0_write(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let aligned = offset % 4 == 0 && data.len() % 4 == 0 && !data.is_empty();
        if !aligned || !Self::inside(offset, data.len(), self.bar0_size) {
            return Err(Self::bad_access(BAR0, offset, data.len()));
        }
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            self.reg_write(offset + 4 * i as u64, v);
        }
        Ok(())
    }

    /// BAR2: the memfd, with the MSI-X PBA (pending bits) overlaid.
    fn bar2_read(&self, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        if !Self::inside(offset, data.len(), BAR2_SIZE) {
            return Err(Self::bad_access(BAR2, offset, data.len()));
        }
        self.window
            .read_exact_at(data, offset)
            .map_err(|source| Error::Window { offset, source })?;
        let pba = self.irqs[MSIX]
            .pending
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, &p)| acc | (u64::from(p) << i))
            .to_le_bytes();
        for (i, b) in pba.iter().enumerate() {
            let at = MSIX_PBA_OFFSET + i as u64;
            if at >= offset && at < offset + data.len() as u64 {
                data[(at - offset) as usize] = *b;
            }
        }
        Ok(())
    }

    fn bar2_write(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        if !Self::inside(offset, data.len(), BAR2_SIZE) {
            return Err(Self::bad_access(BAR2, offset, data.len()));
        }
        self.window
            .write_all_at(data, offset)
            .map_err(|source| Error::Window { offset, source })
    }

    /// A DOORBELL write of `v`.
    fn doorbell(&mut self, v: u32) {
        if v >= MSIX_VECTORS {
            log::debug!("test device: doorbell for vector {v} ignored");
            return;
        }
        self.regs.irq_count = self.regs.irq_count.wrapping_add(1);
        lock(&self.stats).doorbells += 1;
        let msi_only = self.irqs[MSIX].held() == 0 && self.irqs[MSI].held() != 0;
        if msi_only && v == 0 {
            self.deliver(MSI, 0, true);
        } else {
            self.deliver(MSIX, v as usize, true);
        }
    }

    /// Signals `vector` of IRQ index `index`, or marks it pending when it is
    /// masked (and `respect_mask`).
    fn deliver(&mut self, index: usize, vector: usize, respect_mask: bool) {
        let irq = &mut self.irqs[index];
        if vector >= irq.count() {
            lock(&self.stats).interrupts_dropped += 1;
            return;
        }
        if respect_mask && irq.masked[vector] {
            irq.pending[vector] = true;
            return;
        }
        let sent = match &irq.fds[vector] {
            Some(fd) => {
                let mut f: &File = fd;
                match f.write_all(&1u64.to_ne_bytes()) {
                    Ok(()) => true,
                    Err(e) => {
                        log::warn!("test device: cannot signal IRQ {index}.{vector}: {e}");
                        false
                    }
                }
            }
            None => false,
        };
        let mut s = lock(&self.stats);
        if sent {
            s.interrupts += 1;
        } else {
            s.interrupts_dropped += 1;
        }
    }

    /// DMA_CMD = 1: copies DMA_LEN bytes from DMA_SRC to DMA_DST.
    fn dma_copy(&mut self) {
        let r = self.regs;
        let result = if r.dma_len > DMA_MAX_LEN {
            Err(format!(
                "DMA_LEN {:#x} is above {DMA_MAX_LEN:#x}",
                r.dma_len
            ))
        } else if r.dma_len == 0 {
            Ok(())
        } else {
            self.dma
                .copy(r.dma_src, r.dma_dst, r.dma_len as usize)
                .map_err(|e| e.to_string())
        };
        let mut s = lock(&self.stats);
        match result {
            Ok(()) => {
                self.regs.dma_status = reg::DMA_DONE;
                s.dma_copies += 1;
            }
            Err(e) => {
                log::debug!("test device: DMA failed: {e}");
                self.regs.dma_status = reg::DMA_ERROR;
                s.dma_errors += 1;
            }
        }
    }

    fn irq_set(
        &mut self,
        (index, flags, start, count): (u32, u32, u32, u32),
        fds: Vec<File>,
    ) -> Result<(), Error> {
        let bad = |why| Error::BadIrqSet {
            index,
            start,
            count,
            flags,
            why,
        };
        let irq_index = index as usize;
        let total = self
            .irqs
            .get(irq_index)
            .ok_or(bad("no such index"))?
            .count();
        let data = flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
        let action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
        if data.count_ones() != 1 || action.count_ones() != 1 {
            return Err(bad("exactly one data type and one action are needed"));
        }
        let first = start as usize;
        let end = first
            .checked_add(count as usize)
            .filter(|&e| e <= total)
            .ok_or(bad("vectors out of range"))?;
        if irq_index == INTX {
            self.intx_set((action, data), count, fds)
                .map_err(|e| match e {
                    IntxSetError::Bad(why) => bad(why),
                    IntxSetError::Watcher(e) => Error::IntxWatcher(e),
                })?;
            self.update_held();
            return Ok(());
        }
        match (action, data) {
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD) => {
                if fds.len() != count as usize {
                    return Err(bad("needs one eventfd per vector"));
                }
                let irq = &mut self.irqs[irq_index];
                for (v, fd) in (first..end).zip(fds) {
                    irq.fds[v] = Some(fd);
                }
            }
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE) if count == 0 => {
                self.irqs[irq_index].clear();
            }
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE) => {
                for v in first..end {
                    self.deliver(irq_index, v, true);
                }
            }
            (VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_DATA_NONE) => {
                self.irqs[irq_index].masked[first..end].fill(true);
            }
            (VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_NONE) => {
                for v in first..end {
                    let irq = &mut self.irqs[irq_index];
                    irq.masked[v] = false;
                    if std::mem::take(&mut irq.pending[v]) {
                        self.deliver(irq_index, v, false);
                    }
                }
            }
            _ => return Err(bad("unsupported action or data type")),
        }
        self.update_held();
        Ok(())
    }
}

/// Why an INTx `SET_IRQS` was refused.
enum IntxSetError {
    Bad(&'static str),
    Watcher(io::Error),
}

impl Device {
    /// `SET_IRQS` on the INTx index (vector range already checked).
    fn intx_set(
        &mut self,
        (action, data): (u32, u32),
        count: u32,
        mut fds: Vec<File>,
    ) -> Result<(), IntxSetError> {
        let one_fd = |fds: &mut Vec<File>| match (count, fds.len()) {
            (1, 1) => fds.pop().ok_or(IntxSetError::Bad("needs one eventfd")),
            _ => Err(IntxSetError::Bad("needs exactly one eventfd")),
        };
        if data == VFIO_IRQ_SET_DATA_NONE && !fds.is_empty() {
            return Err(IntxSetError::Bad("DATA_NONE carries no eventfd"));
        }
        match (action, data) {
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD) => {
                self.intx.set_trigger(one_fd(&mut fds)?)
            }
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE) if count == 0 => {
                self.intx.disable()
            }
            (VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE) => self.intx.loopback(),
            (VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_DATA_NONE) if count == 1 => self.intx.mask(),
            (VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_NONE) if count == 1 => {
                self.intx.unmask()
            }
            (VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD) => self
                .intx
                .unmask_on(one_fd(&mut fds)?)
                .map_err(IntxSetError::Watcher)?,
            (VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_NONE) => {}
            _ => return Err(IntxSetError::Bad("unsupported action or data type")),
        }
        Ok(())
    }
}

impl ServerBackend for Device {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        match region {
            BAR0 => self.bar0_read(offset, data)?,
            BAR2 => self.bar2_read(offset, data)?,
            CONFIG if self.config.read(offset, data) => {}
            _ => return Err(Self::bad_access(region, offset, data.len()).into()),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        match region {
            BAR0 => self.bar0_write(offset, data)?,
            BAR2 => self.bar2_write(offset, data)?,
            CONFIG if self.config.write(offset, data) => {}
            _ => return Err(Self::bad_access(region, offset, data.len()).into()),
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> io::Result<()> {
        let access = (
            flags.contains(DmaMapFlags::READ),
            flags.contains(DmaMapFlags::WRITE),
        );
        self.dma
            .map(access, offset, address, size, fd)
            .map_err(Error::Dma)?;
        lock(&self.stats).dma_maps += 1;
        self.update_held();
        Ok(())
    }

    fn dma_unmap(&mut self, flags: DmaUnmapFlags, address: u64, size: u64) -> io::Result<()> {
        if flags.intersects(!DmaUnmapFlags::UNMAP_ALL) {
            return Err(Error::UnmapFlags(flags.bits()).into());
        }
        let all = flags.contains(DmaUnmapFlags::UNMAP_ALL);
        let removed = self.dma.unmap(all, address, size).map_err(Error::Dma)?;
        lock(&self.stats).dma_unmaps += removed as u64;
        self.update_held();
        Ok(())
    }

    fn reset(&mut self) -> io::Result<()> {
        self.regs = Regs::default();
        let zeros = vec![0u8; BAR2_MMAP_SIZE as usize];
        self.window
            .write_all_at(&zeros, 0)
            .map_err(|source| Error::Window { offset: 0, source })?;
        self.config.reset();
        for irq in &mut self.irqs {
            irq.pending.fill(false);
        }
        self.intx.reset();
        lock(&self.stats).resets += 1;
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> io::Result<()> {
        self.irq_set((index, flags, start, count), fds)?;
        Ok(())
    }
}
