//! Guest memory in a snapshot: one file per RAM region.
//!
//! Saving writes each region's pages through one io_uring, several writes
//! in flight, at their offset in a file first sized to the whole region
//! with `ftruncate`: a page that holds only zeros (every page the guest
//! never touched, among others) is not written and stays a hole, so the
//! files are sparse. Pages the process's page tables show it never touched
//! are not even read (see [`touched_pages`]), and the scan for data runs
//! ahead of the writes instead of before them. Each file is `fdatasync`ed
//! before the `state` file is written.
//!
//! Restoring maps each file copy-on-write (`MAP_PRIVATE`): the kernel
//! reads a page on the guest's first touch and the guest's writes never
//! reach the file ([`RestoreMode::Lazy`], the default). The files must
//! then not change while the VM lives: a page not yet read would be read
//! as changed. [`RestoreMode::Copy`] reads every file into anonymous
//! memory up front instead, after which the snapshot may go.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::format::MemoryRegion;

const PAGE: usize = 4096;
/// The largest single write.
const MAX_WRITE: usize = 1 << 20;
/// Writes in flight.
const DEPTH: u32 = 32;

/// How restored guest memory is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestoreMode {
    /// Map the files `MAP_PRIVATE`: pages read on first touch.
    #[default]
    Lazy,
    /// Read the files into anonymous memory before the VM starts.
    Copy,
}

/// Errors from writing or mapping guest memory files.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("memory file {path} is {found} bytes; the snapshot's RAM region at {guest_addr:#x} is {expected}")]
    WrongSize {
        path: PathBuf,
        guest_addr: u64,
        expected: u64,
        found: u64,
    },
    #[error("the snapshot's RAM regions ({found}) are not this configuration's ({expected})")]
    Layout { expected: String, found: String },
    #[error("mapping memory file {path}")]
    Map {
        path: PathBuf,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("building guest memory from the snapshot's regions")]
    Regions,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MemoryError + 'a {
    move |source| MemoryError::Io {
        op,
        path: path.into(),
        source,
    }
}

/// Whether the page is all zeros.
fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only splits.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// The pages of a mapping that may hold data, one flag per page; None
/// when that cannot be told (every page is then read).
///
/// A page the process never touched is neither present nor swapped in
/// its page tables (`/proc/self/pagemap`, bits 63 and 62) and reads as
/// zeros, unless the mapping is backed by a file whose data shows through
/// (a memfd shared with a vhost-user or vfio-user process, which may
/// write pages this process never mapped; a snapshot file mapped
/// copy-on-write by a lazy restore): there the file's data ranges
/// (`SEEK_DATA`) count too. Reading an untouched anonymous page would map
/// the zero page into it, which for a 2 GiB guest that used a few MiB
/// costs more than writing what it did use.
fn touched_pages(ptr: *const u8, len: usize, backing: Option<(&File, u64)>) -> Option<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    let pages = len.div_ceil(PAGE);
    let mut touched = vec![false; pages];
    let pagemap = File::open("/proc/self/pagemap").ok()?;
    let first = ptr as usize / PAGE;
    let mut buf = vec![0u8; 8 * 4096];
    let mut page = 0;
    while page < pages {
        let n = (pages - page).min(4096);
        let want = &mut buf[..8 * n];
        let mut got = 0;
        while got < want.len() {
            let at = ((first + page) * 8 + got) as u64;
            match pagemap.read_at(&mut want[got..], at) {
                Ok(0) | Err(_) => return None,
                Ok(k) => got += k,
            }
        }
        for (i, e) in want.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().ok()?);
            touched[page + i] = entry & (3 << 62) != 0;
        }
        page += n;
    }
    if let Some((file, base)) = backing {
        let end = base + len as u64;
        let mut off = base;
        while off < end {
            // SAFETY: lseek on an open descriptor.
            let data = unsafe { libc::lseek(file.as_raw_fd(), off as i64, libc::SEEK_DATA) };
            if data < 0 {
                // ENXIO: no data past `off`; anything else: cannot tell.
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return None;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            let data = data as u64;
            if data >= end {
                break;
            }
            let (from, to) = ((data - base) as usize / PAGE, (hole - base) as usize);
            for t in &mut touched[from..to.div_ceil(PAGE).min(pages)] {
                *t = true;
            }
            off = hole.max(data + 1);
        }
    }
    Some(touched)
}

/// The runs of non-zero pages in `mem`, as (offset, length), each at most
/// [`MAX_WRITE`] bytes, found as they are asked for (the scan of one run
/// overlaps the writes of the runs before it); pages `touched` says the
/// process never touched are not read.
struct DataRuns<'a> {
    mem: &'a [u8],
    touched: Option<Vec<bool>>,
    page: usize,
}

impl<'a> DataRuns<'a> {
    fn new(mem: &'a [u8], touched: Option<Vec<bool>>) -> DataRuns<'a> {
        DataRuns {
            mem,
            touched,
            page: 0,
        }
    }

    fn has_data(&self, page: usize) -> bool {
        if self
            .touched
            .as_ref()
            .is_some_and(|t| !t.get(page).copied().unwrap_or(true))
        {
            return false;
        }
        let start = page * PAGE;
        let end = (start + PAGE).min(self.mem.len());
        !is_zero(&self.mem[start..end])
    }
}

impl Iterator for DataRuns<'_> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        let pages = self.mem.len().div_ceil(PAGE);
        while self.page < pages && !self.has_data(self.page) {
            self.page += 1;
        }
        if self.page >= pages {
            return None;
        }
        let start = self.page * PAGE;
        self.page += 1;
        while self.page < pages
            && (self.page * PAGE - start) < MAX_WRITE
            && self.has_data(self.page)
        {
            self.page += 1;
        }
        let end = (self.page * PAGE).min(self.mem.len());
        Some((start, end - start))
    }
}

/// Writes `mem` to `file` at the runs' offsets through `ring`, then
/// `fdatasync`s it; returns the bytes written.
fn write_runs(
    ring: &mut IoUring,
    file: &File,
    path: &Path,
    mut runs: DataRuns<'_>,
) -> Result<u64, MemoryError> {
    let mem = runs.mem;
    let fd = types::Fd(file.as_raw_fd());
    // The rest of short writes, then the runs not yet started.
    let mut retry: Vec<(usize, usize)> = Vec::new();
    let mut in_flight: Vec<Option<(usize, usize)>> = vec![None; DEPTH as usize];
    let mut written = 0u64;
    loop {
        // Fill free slots.
        for (slot, entry) in in_flight.iter_mut().enumerate() {
            if entry.is_some() {
                continue;
            }
            let Some((off, len)) = retry.pop().or_else(|| runs.next()) else {
                break;
            };
            let sqe = opcode::Write::new(fd, mem[off..].as_ptr(), len as u32)
                .offset(off as u64)
                .build()
                .user_data(slot as u64);
            // SAFETY: the buffer is guest memory, mapped for the VM's life
            // and unchanged while it is paused; the slot keeps the write's
            // range until its completion is reaped below.
            unsafe { ring.submission().push(&sqe) }.map_err(|_| MemoryError::Io {
                op: "queueing a write to",
                path: path.into(),
                source: std::io::Error::other("submission queue full"),
            })?;
            *entry = Some((off, len));
        }
        if in_flight.iter().all(Option::is_none) {
            break;
        }
        ring.submit_and_wait(1)
            .map_err(io("submitting writes to", path))?;
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in done {
            let Some((off, len)) = in_flight.get_mut(slot as usize).and_then(Option::take) else {
                continue;
            };
            if res < 0 {
                return Err(MemoryError::Io {
                    op: "writing",
                    path: path.into(),
                    source: std::io::Error::from_raw_os_error(-res),
                });
            }
            let n = res as usize;
            if n == 0 {
                return Err(MemoryError::Io {
                    op: "writing",
                    path: path.into(),
                    source: std::io::Error::from(std::io::ErrorKind::WriteZero),
                });
            }
            written += n as u64;
            if n < len {
                retry.push((off + n, len - n));
            }
        }
    }
    let sqe = opcode::Fsync::new(fd)
        .flags(types::FsyncFlags::DATASYNC)
        .build()
        .user_data(u64::MAX);
    // SAFETY: the fsync references only the file, open until it completes.
    unsafe { ring.submission().push(&sqe) }.map_err(|_| MemoryError::Io {
        op: "queueing fdatasync of",
        path: path.into(),
        source: std::io::Error::other("submission queue full"),
    })?;
    ring.submit_and_wait(1)
        .map_err(io("submitting fdatasync of", path))?;
    for c in ring.completion() {
        if c.result() < 0 {
            return Err(MemoryError::Io {
                op: "fdatasync",
                path: path.into(),
                source: std::io::Error::from_raw_os_error(-c.result()),
            });
        }
    }
    Ok(written)
}

/// The ring of a snapshot's memory writes: created disabled, restricted to
/// writes and fsync with no SQE flag and no registration, then enabled.
/// Kernels without restrictions (before 5.10) get a plain ring.
fn restricted_ring() -> std::io::Result<IoUring> {
    use io_uring::register::Restriction;
    let ring = match IoUring::builder().setup_r_disabled().build(DEPTH) {
        Ok(ring) => ring,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return IoUring::new(DEPTH),
        Err(e) => return Err(e),
    };
    let mut list = [
        Restriction::sqe_op(opcode::Write::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
    ];
    if let Err(e) = ring.submitter().register_restrictions(&mut list) {
        log::debug!("snapshot ring left unrestricted: {e}");
    }
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}

/// Writes every RAM region of `mem` to `dir/memoryN`; returns the regions
/// and the bytes of data written (holes not counted).
pub fn save_memory(
    mem: &GuestMemoryMmap,
    dir: &Path,
) -> Result<(Vec<MemoryRegion>, u64), MemoryError> {
    let mut ring = restricted_ring().map_err(io("setting up an io_uring for", dir))?;
    let mut regions = Vec::new();
    let mut total = 0;
    for (i, region) in mem.iter().enumerate() {
        let name = format!("memory{i}");
        let path = dir.join(&name);
        // Written under a temporary name and renamed into place: a VM
        // restored lazily from this very directory keeps reading its
        // pages from the old file, which must not be truncated under it.
        let tmp = dir.join(format!("{name}.tmp"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        file.set_len(region.len()).map_err(io("sizing", &tmp))?;
        // SAFETY: the region's mapping is `len` bytes at `as_ptr`, alive as
        // long as `mem`; the VM is paused, so neither vCPUs nor devices
        // write it while this slice lives.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        let backing = region.file_offset().map(|f| (f.file(), f.start()));
        let touched = touched_pages(region.as_ptr(), bytes.len(), backing);
        total += write_runs(&mut ring, &file, &tmp, DataRuns::new(bytes, touched))?;
        std::fs::rename(&tmp, &path).map_err(io("renaming into place", &path))?;
        regions.push(MemoryRegion {
            guest_addr: region.start_addr().0,
            size: region.len(),
            file: name,
        });
    }
    Ok((regions, total))
}

fn describe(regions: &[(u64, u64)]) -> String {
    regions
        .iter()
        .map(|(a, l)| format!("{l:#x} bytes at {a:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks the snapshot's regions against `layout` (this configuration's
/// RAM) and every file's size; opens the files.
fn open_files(
    dir: &Path,
    regions: &[MemoryRegion],
    layout: &[(u64, u64)],
) -> Result<Vec<(File, PathBuf)>, MemoryError> {
    let saved: Vec<(u64, u64)> = regions.iter().map(|r| (r.guest_addr, r.size)).collect();
    if saved != layout {
        return Err(MemoryError::Layout {
            expected: describe(layout),
            found: describe(&saved),
        });
    }
    let mut files = Vec::new();
    for r in regions {
        // The name comes from the state file: only a plain file name.
        let path = dir.join(Path::new(&r.file).file_name().unwrap_or_default());
        let file = File::open(&path).map_err(io("opening memory file", &path))?;
        let found = file
            .metadata()
            .map_err(io("reading the size of", &path))?
            .len();
        if found != r.size {
            return Err(MemoryError::WrongSize {
                path,
                guest_addr: r.guest_addr,
                expected: r.size,
                found,
            });
        }
        files.push((file, path));
    }
    Ok(files)
}

/// Guest memory for a restored VM of `layout`, from the files in `dir`.
pub fn restore_memory(
    dir: &Path,
    regions: &[MemoryRegion],
    layout: &[(u64, u64)],
    mode: RestoreMode,
) -> Result<GuestMemoryMmap, MemoryError> {
    let files = open_files(dir, regions, layout)?;
    match mode {
        RestoreMode::Lazy => {
            let mut out = Vec::new();
            for ((file, path), r) in files.into_iter().zip(regions) {
                let mapping = MmapRegionBuilder::new_with_bitmap(r.size as usize, ())
                    .with_file_offset(FileOffset::from_arc(Arc::new(file), 0))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                    .build()
                    .map_err(|source| MemoryError::Map { path, source })?;
                out.push(
                    GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
                        .ok_or(MemoryError::Regions)?,
                );
            }
            GuestMemoryMmap::from_regions(out).map_err(|_| MemoryError::Regions)
        }
        RestoreMode::Copy => {
            let ranges: Vec<(GuestAddress, usize)> = layout
                .iter()
                .map(|&(a, l)| (GuestAddress(a), l as usize))
                .collect();
            let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|_| MemoryError::Regions)?;
            for ((file, path), region) in files.iter().zip(mem.iter()) {
                copy_in(file, path, region)?;
            }
            Ok(mem)
        }
    }
}

/// Reads `file` into `region`, leaving its holes as the zero pages an
/// untouched anonymous mapping already has.
fn copy_in(file: &File, path: &Path, region: &GuestRegionMmap) -> Result<(), MemoryError> {
    use std::os::unix::fs::FileExt;
    let len = region.len();
    // SAFETY: the region was just mapped, `len` bytes at `as_ptr`, and no
    // vCPU or device uses it yet.
    let dst = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), len as usize) };
    let mut off = 0u64;
    while off < len {
        // SEEK_DATA/SEEK_HOLE skip the file's holes.
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(file.as_raw_fd(), off as i64, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data past `off`
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            len
        } else {
            (hole as u64).min(len)
        };
        let (start, end) = (data as u64, end);
        let mut at = start;
        while at < end {
            let n = file
                .read_at(&mut dst[at as usize..end as usize], at)
                .map_err(io("reading memory file", path))?;
            if n == 0 {
                break;
            }
            at += n as u64;
        }
        off = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_ring_refuses_what_it_does_not_write_with() {
        let mut ring = restricted_ring().unwrap();
        let sqe = opcode::Nop::new().build().user_data(1);
        // SAFETY: a no-op refers to no memory.
        unsafe { ring.submission().push(&sqe) }.unwrap();
        ring.submit_and_wait(1).unwrap();
        let res = ring.completion().next().unwrap().result();
        assert_eq!(res, -libc::EACCES);
    }

    #[test]
    fn zero_pages_are_left_out_and_runs_are_capped() {
        let mut mem = vec![0u8; 8 * PAGE];
        mem[PAGE + 5] = 1;
        mem[2 * PAGE] = 1;
        mem[7 * PAGE + PAGE - 1] = 9;
        let runs = |m: &[u8], t: Option<Vec<bool>>| DataRuns::new(m, t).collect::<Vec<_>>();
        assert_eq!(runs(&mem, None), vec![(PAGE, 2 * PAGE), (7 * PAGE, PAGE)]);
        let full = vec![1u8; MAX_WRITE + PAGE];
        assert_eq!(runs(&full, None), vec![(0, MAX_WRITE), (MAX_WRITE, PAGE)]);
        // Pages the process never touched are not read.
        let mut t = vec![true; 8];
        t[2] = false;
        assert_eq!(runs(&mem, Some(t)), vec![(PAGE, PAGE), (7 * PAGE, PAGE)]);
    }

    /// An anonymous mapping: only the pages written count as touched,
    /// whether or not they hold zeros now; a memfd mapping adds the pages
    /// another process wrote through the file.
    #[test]
    fn untouched_pages_are_found_in_the_page_tables_and_the_backing_file() {
        use std::os::unix::fs::FileExt;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE)]).unwrap();
        let region = mem.iter().next().unwrap();
        // SAFETY: the region is mapped for 16 pages and only this test uses it.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), 16 * PAGE) };
        bytes[3 * PAGE] = 7;
        bytes[9 * PAGE + 100] = 0; // written, still zero
        let touched = touched_pages(region.as_ptr(), 16 * PAGE, None).unwrap();
        let pages: Vec<usize> = (0..16).filter(|&p| touched[p]).collect();
        assert_eq!(pages, vec![3, 9]);
        assert_eq!(
            DataRuns::new(bytes, Some(touched)).collect::<Vec<_>>(),
            vec![(3 * PAGE, PAGE)]
        );

        let file = crate::vm::create_shared_guest_memory(16 * PAGE as u64).unwrap();
        let region = file.iter().next().unwrap();
        let fo = region.file_offset().unwrap();
        // Another process's write, through the file only.
        fo.file()
            .write_all_at(&[1], fo.start() + 5 * PAGE as u64)
            .unwrap();
        let touched =
            touched_pages(region.as_ptr(), 16 * PAGE, Some((fo.file(), fo.start()))).unwrap();
        let pages: Vec<usize> = (0..16).filter(|&p| touched[p]).collect();
        assert_eq!(pages, vec![5]);
    }
}
