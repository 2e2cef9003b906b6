//! Guest memory in a snapshot: one file per RAM region.
//!
//! Saving writes each region's pages through one io_uring, several writes
//! in flight, at their offset in a file first sized to the whole region
//! with `ftruncate`: a page that holds only zeros (every page the guest
//! never touched, among others) is not written and stays a hole, so the
//! files are sparse. Each file is `fdatasync`ed before the `state` file
//! is written.
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

/// The runs of non-zero pages in `mem`, as (offset, length), each at most
/// [`MAX_WRITE`] bytes.
fn data_runs(mem: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in mem.chunks(PAGE).enumerate() {
        if is_zero(page) {
            continue;
        }
        let off = i * PAGE;
        match runs.last_mut() {
            Some((start, len)) if *start + *len == off && *len + page.len() <= MAX_WRITE => {
                *len += page.len()
            }
            _ => runs.push((off, page.len())),
        }
    }
    runs
}

/// Writes `mem` to `file` at the runs' offsets through `ring`, then
/// `fdatasync`s it; returns the bytes written.
fn write_runs(
    ring: &mut IoUring,
    file: &File,
    path: &Path,
    mem: &[u8],
) -> Result<u64, MemoryError> {
    let fd = types::Fd(file.as_raw_fd());
    // Pending (offset, length) of every write not yet complete.
    let mut todo: Vec<(usize, usize)> = data_runs(mem);
    todo.reverse();
    let mut in_flight: Vec<Option<(usize, usize)>> = vec![None; DEPTH as usize];
    let mut written = 0u64;
    loop {
        // Fill free slots.
        for (slot, entry) in in_flight.iter_mut().enumerate() {
            if entry.is_some() {
                continue;
            }
            let Some((off, len)) = todo.pop() else { break };
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
                todo.push((off + n, len - n));
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

/// Writes every RAM region of `mem` to `dir/memoryN`; returns the regions
/// and the bytes of data written (holes not counted).
pub fn save_memory(
    mem: &GuestMemoryMmap,
    dir: &Path,
) -> Result<(Vec<MemoryRegion>, u64), MemoryError> {
    let mut ring = IoUring::new(DEPTH).map_err(io("setting up an io_uring for", dir))?;
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
        total += write_runs(&mut ring, &file, &tmp, bytes)?;
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
    fn zero_pages_are_left_out_and_runs_are_capped() {
        let mut mem = vec![0u8; 8 * PAGE];
        mem[PAGE + 5] = 1;
        mem[2 * PAGE] = 1;
        mem[7 * PAGE + PAGE - 1] = 9;
        assert_eq!(data_runs(&mem), vec![(PAGE, 2 * PAGE), (7 * PAGE, PAGE)]);
        let full = vec![1u8; MAX_WRITE + PAGE];
        assert_eq!(data_runs(&full), vec![(0, MAX_WRITE), (MAX_WRITE, PAGE)]);
    }
}
