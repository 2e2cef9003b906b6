//! A fake kernel VFIO for tests: a sysfs tree, the container, group and
//! iommufd files, and one PCI function modelled the way vfio-pci presents
//! it (regions at fixed offsets of the device fd, interrupt indexes, DMA
//! maps, resets). Every call is logged in order.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    VFIO_TYPE1v2_IOMMU, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use super::sys::VfioSys;
use crate::transport::{DeviceInfo, IrqInfo, REGION_INFO_SIZE};

pub const SYSFS: &str = "/sys/bus/pci/devices/0000:01:00.0";
pub const GROUP: u32 = 7;
/// Each region's place in the device fd.
pub const REGION_SHIFT: u32 = 24;

/// One region of the fake function.
#[derive(Clone, Debug)]
pub struct FakeRegion {
    pub size: u64,
    pub mmap: bool,
    pub sparse: Option<Vec<(u64, u64)>>,
}

/// A `SET_IRQS` as the fake saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IrqSetCall {
    pub index: u32,
    pub flags: u32,
    pub start: u32,
    pub count: u32,
    pub fds: usize,
}

/// Everything the fake knows and saw.
pub struct FakeState {
    pub calls: Vec<String>,
    pub driver: Option<&'static str>,
    pub cdev: bool,
    pub iommufd_present: bool,
    pub api_version: i32,
    pub viable: bool,
    pub config: [u8; 256],
    /// Config bytes the guest may change (as vfio-pci's virtualisation).
    pub config_writable: [u8; 256],
    pub config_writes: Vec<(u64, Vec<u8>)>,
    pub regions: Vec<FakeRegion>,
    pub irq_counts: [u32; 5],
    pub irq_sets: Vec<IrqSetCall>,
    /// Duplicates of the eventfds given per (index, vector).
    pub irq_fds: BTreeMap<(u32, u32), File>,
    pub dma: BTreeMap<u64, (u64, u64)>,
    pub resets: usize,
    /// What each open fd is.
    fds: HashMap<RawFd, String>,
    /// The device's BAR and config contents live in this memfd at
    /// `index << REGION_SHIFT`, so the device fd can be mmapped.
    backing: File,
}

pub struct FakeSys {
    state: Mutex<FakeState>,
}

fn memfd() -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"fake-vfio".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a new descriptor nothing else owns.
    unsafe { File::from_raw_fd(fd) }
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

/// A configuration space like the vfio-user test device's: MSI-X (8
/// vectors, table/PBA in BAR2 at 0x2000/0x3000), MSI (64-bit), PCI
/// Express (to be hidden), vendor-specific; BAR0 32-bit, BAR2 64-bit;
/// INTx pin A.
pub fn test_config() -> [u8; 256] {
    let mut c = [0u8; 256];
    c[0..4].copy_from_slice(&0x7256_1234u32.to_le_bytes());
    c[0x06] = 0x10;
    c[0x08..0x0c].copy_from_slice(&0xff00_0001u32.to_le_bytes());
    c[0x18] = 0x4;
    c[0x2c..0x30].copy_from_slice(&0x0001_1234u32.to_le_bytes());
    c[0x34] = 0x40;
    c[0x3d] = 1;
    c[0x40] = 0x11;
    c[0x41] = 0x50;
    c[0x42..0x44].copy_from_slice(&7u16.to_le_bytes());
    c[0x44..0x48].copy_from_slice(&(0x2000u32 | 2).to_le_bytes());
    c[0x48..0x4c].copy_from_slice(&(0x3000u32 | 2).to_le_bytes());
    c[0x50] = 0x05;
    c[0x51] = 0x70;
    c[0x52..0x54].copy_from_slice(&0x80u16.to_le_bytes());
    c[0x70] = 0x10;
    c[0x71] = 0x60;
    c[0x72..0x74].copy_from_slice(&0x0002u16.to_le_bytes());
    c[0x60] = 0x09;
    c[0x61] = 0;
    c[0x62] = 8;
    c
}

impl FakeSys {
    /// A function bound to vfio-pci in viable group 7, no iommufd.
    pub fn new() -> FakeSys {
        let mut writable = [0u8; 256];
        for o in [0x04, 0x05, 0x0c, 0x0d, 0x3c] {
            writable[o] = 0xff;
        }
        writable[0x10..0x28].fill(0xff);
        writable[0x43] = 0xc0;
        writable[0x52] = 0x71;
        let backing = memfd();
        backing.set_len(8 << REGION_SHIFT).unwrap();
        FakeSys {
            state: Mutex::new(FakeState {
                calls: Vec::new(),
                driver: Some("vfio-pci"),
                cdev: false,
                iommufd_present: false,
                api_version: 0,
                viable: true,
                config: test_config(),
                config_writable: writable,
                config_writes: Vec::new(),
                regions: vec![
                    FakeRegion {
                        size: 0x1000,
                        mmap: false,
                        sparse: None,
                    },
                    FakeRegion {
                        size: 0,
                        mmap: false,
                        sparse: None,
                    },
                    FakeRegion {
                        size: 0x4000,
                        mmap: true,
                        sparse: Some(vec![(0, 0x2000)]),
                    },
                    FakeRegion {
                        size: 0,
                        mmap: false,
                        sparse: None,
                    },
                    FakeRegion {
                        size: 0,
                        mmap: false,
                        sparse: None,
                    },
                    FakeRegion {
                        size: 0,
                        mmap: false,
                        sparse: None,
                    },
                    FakeRegion {
                        size: 0,
                        mmap: false,
                        sparse: None,
                    },
                    FakeRegion {
                        size: 256,
                        mmap: false,
                        sparse: None,
                    },
                ],
                irq_counts: [1, 1, 8, 0, 0],
                irq_sets: Vec::new(),
                irq_fds: BTreeMap::new(),
                dma: BTreeMap::new(),
                resets: 0,
                fds: HashMap::new(),
                backing,
            }),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Names of the calls made, in order.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// The memfd behind the device's regions.
    pub fn backing(&self) -> File {
        self.state().backing.try_clone().unwrap()
    }
}

impl FakeState {
    fn log(&mut self, call: impl Into<String>) {
        self.calls.push(call.into());
    }

    fn what(&self, fd: BorrowedFd<'_>) -> io::Result<&str> {
        self.fds
            .get(&fd.as_raw_fd())
            .map(String::as_str)
            .ok_or_else(ebadf)
    }

    fn expect(&self, fd: BorrowedFd<'_>, kind: &str) -> io::Result<()> {
        if self.what(fd)?.starts_with(kind) {
            Ok(())
        } else {
            Err(ebadf())
        }
    }

    fn new_fd(&mut self, what: String) -> io::Result<OwnedFd> {
        let fd: OwnedFd = if what.starts_with("device") {
            self.backing.try_clone()?.into()
        } else {
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC).map(|e| {
                // SAFETY: a dup of the eventfd's descriptor, which we own.
                unsafe { OwnedFd::from_raw_fd(libc::dup(e.as_raw_fd())) }
            })?
        };
        self.fds.insert(fd.as_raw_fd(), what);
        Ok(fd)
    }

    /// The region and offset in it for a device fd offset.
    fn locate(&self, offset: u64, len: usize) -> io::Result<(usize, u64)> {
        let index = (offset >> REGION_SHIFT) as usize;
        let off = offset & ((1 << REGION_SHIFT) - 1);
        let r = self
            .regions
            .get(index)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if off + len as u64 > r.size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok((index, off))
    }
}

impl VfioSys for FakeSys {
    fn open(&self, path: &Path) -> io::Result<OwnedFd> {
        let mut s = self.state();
        let p = path.to_string_lossy().into_owned();
        s.log(format!("open {p}"));
        let what = match p.as_str() {
            "/dev/vfio/vfio" => "container".to_string(),
            "/dev/iommu" if s.iommufd_present => "iommufd".to_string(),
            "/dev/vfio/devices/vfio3" if s.cdev => "device cdev".to_string(),
            _ if p == format!("/dev/vfio/{GROUP}") => "group".to_string(),
            _ => return Err(enoent()),
        };
        s.new_fd(what)
    }

    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        let mut s = self.state();
        let p = path.to_string_lossy().into_owned();
        s.log(format!("read_link {p}"));
        if p == format!("{SYSFS}/driver") {
            return s
                .driver
                .map(|d| PathBuf::from(format!("../../../bus/pci/drivers/{d}")))
                .ok_or_else(enoent);
        }
        if p == format!("{SYSFS}/iommu_group") {
            return Ok(PathBuf::from(format!(
                "../../../kernel/iommu_groups/{GROUP}"
            )));
        }
        Err(enoent())
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut s = self.state();
        let p = path.to_string_lossy().into_owned();
        s.log(format!("read_dir {p}"));
        if p == format!("{SYSFS}/vfio-dev") && s.cdev {
            return Ok(vec!["vfio3".into()]);
        }
        Err(enoent())
    }

    fn get_api_version(&self, container: BorrowedFd<'_>) -> io::Result<i32> {
        let mut s = self.state();
        s.expect(container, "container")?;
        s.log("get_api_version");
        Ok(s.api_version)
    }

    fn check_extension(&self, container: BorrowedFd<'_>, extension: u32) -> io::Result<i32> {
        let mut s = self.state();
        s.expect(container, "container")?;
        s.log(format!("check_extension {extension}"));
        Ok(i32::from(extension == VFIO_TYPE1v2_IOMMU))
    }

    fn set_iommu(&self, container: BorrowedFd<'_>, kind: u32) -> io::Result<()> {
        let mut s = self.state();
        s.expect(container, "container")?;
        s.log(format!("set_iommu {kind}"));
        Ok(())
    }

    fn map_dma(
        &self,
        container: BorrowedFd<'_>,
        iova: u64,
        size: u64,
        vaddr: u64,
    ) -> io::Result<()> {
        let mut s = self.state();
        s.expect(container, "container")?;
        s.log(format!("map_dma {iova:#x}"));
        s.dma.insert(iova, (size, vaddr));
        Ok(())
    }

    fn unmap_dma(&self, container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<()> {
        let mut s = self.state();
        s.expect(container, "container")?;
        s.log(format!("unmap_dma {iova:#x}"));
        match s.dma.remove(&iova) {
            Some((sz, _)) if sz == size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn group_status(&self, group: BorrowedFd<'_>) -> io::Result<u32> {
        let mut s = self.state();
        s.expect(group, "group")?;
        s.log("group_status");
        Ok(if s.viable { VFIO_GROUP_FLAGS_VIABLE } else { 0 })
    }

    fn group_set_container(
        &self,
        group: BorrowedFd<'_>,
        container: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let mut s = self.state();
        s.expect(group, "group")?;
        s.expect(container, "container")?;
        s.log("group_set_container");
        Ok(())
    }

    fn group_unset_container(&self, group: BorrowedFd<'_>) -> io::Result<()> {
        let mut s = self.state();
        s.expect(group, "group")?;
        // The fake cannot see close(): drop what is no longer open.
        s.fds.retain(|&fd, _| {
            // SAFETY: F_GETFD only inspects the descriptor table.
            unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
        });
        if s.fds.values().any(|w| w.starts_with("device")) {
            s.log("group_unset_container with a device open");
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        s.log("group_unset_container");
        Ok(())
    }

    fn group_device_fd(&self, group: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
        let mut s = self.state();
        s.expect(group, "group")?;
        s.log(format!("group_device_fd {name}"));
        if name != "0000:01:00.0" {
            return Err(enoent());
        }
        s.new_fd("device".into())
    }

    fn bind_iommufd(&self, device: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
        let mut s = self.state();
        s.expect(device, "device cdev")?;
        s.expect(iommufd, "iommufd")?;
        s.log("bind_iommufd");
        Ok(1)
    }

    fn ioas_alloc(&self, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
        let mut s = self.state();
        s.expect(iommufd, "iommufd")?;
        s.log("ioas_alloc");
        Ok(2)
    }

    fn attach_ioas(&self, device: BorrowedFd<'_>, ioas: u32) -> io::Result<()> {
        let mut s = self.state();
        s.expect(device, "device cdev")?;
        s.log(format!("attach_ioas {ioas}"));
        Ok(())
    }

    fn ioas_map(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        iova: u64,
        size: u64,
        vaddr: u64,
    ) -> io::Result<()> {
        let mut s = self.state();
        s.expect(iommufd, "iommufd")?;
        s.log(format!("ioas_map {ioas} {iova:#x}"));
        s.dma.insert(iova, (size, vaddr));
        Ok(())
    }

    fn ioas_unmap(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        iova: u64,
        _size: u64,
    ) -> io::Result<()> {
        let mut s = self.state();
        s.expect(iommufd, "iommufd")?;
        s.log(format!("ioas_unmap {ioas} {iova:#x}"));
        s.dma.remove(&iova).map(drop).ok_or_else(enoent)
    }

    fn device_info(&self, device: BorrowedFd<'_>) -> io::Result<DeviceInfo> {
        let mut s = self.state();
        s.expect(device, "device")?;
        s.log("device_info");
        Ok(DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: 9,
            num_irqs: 5,
        })
    }

    fn region_info(&self, device: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
        let mut s = self.state();
        s.expect(device, "device")?;
        let index = u32::from_le_bytes(buf[8..12].try_into().unwrap());
        let argsz = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
        let r = s
            .regions
            .get(index as usize)
            .cloned()
            .unwrap_or(FakeRegion {
                size: 0,
                mmap: false,
                sparse: None,
            });
        let mut caps = Vec::new();
        if let Some(areas) = &r.sparse {
            caps.extend_from_slice(&(VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16).to_le_bytes());
            caps.extend_from_slice(&1u16.to_le_bytes());
            caps.extend_from_slice(&0u32.to_le_bytes());
            caps.extend_from_slice(&(areas.len() as u32).to_le_bytes());
            caps.extend_from_slice(&0u32.to_le_bytes());
            for (o, l) in areas {
                caps.extend_from_slice(&o.to_le_bytes());
                caps.extend_from_slice(&l.to_le_bytes());
            }
        }
        let mut flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        if r.mmap {
            flags |= VFIO_REGION_INFO_FLAG_MMAP;
        }
        let full = REGION_INFO_SIZE + caps.len();
        let mut out = vec![0u8; REGION_INFO_SIZE];
        out[0..4].copy_from_slice(&(full as u32).to_le_bytes());
        out[8..12].copy_from_slice(&index.to_le_bytes());
        out[16..24].copy_from_slice(&r.size.to_le_bytes());
        out[24..32].copy_from_slice(&(u64::from(index) << REGION_SHIFT).to_le_bytes());
        if !caps.is_empty() {
            flags |= VFIO_REGION_INFO_FLAG_CAPS;
            if argsz >= full {
                out[12..16].copy_from_slice(&(REGION_INFO_SIZE as u32).to_le_bytes());
                out.extend_from_slice(&caps);
            }
        }
        out[4..8].copy_from_slice(&flags.to_le_bytes());
        let n = out.len().min(buf.len());
        buf[..n].copy_from_slice(&out[..n]);
        s.log(format!("region_info {index}"));
        Ok(())
    }

    fn irq_info(&self, device: BorrowedFd<'_>, index: u32) -> io::Result<IrqInfo> {
        let mut s = self.state();
        s.expect(device, "device")?;
        s.log(format!("irq_info {index}"));
        let count = *s.irq_counts.get(index as usize).ok_or_else(enoent)?;
        Ok(IrqInfo {
            index,
            flags: 1,
            count,
        })
    }

    fn set_irqs(
        &self,
        device: BorrowedFd<'_>,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
    ) -> io::Result<()> {
        let mut s = self.state();
        s.expect(device, "device")?;
        s.log(format!("set_irqs {index} {flags:#x} {count}"));
        s.irq_sets.push(IrqSetCall {
            index,
            flags,
            start,
            count,
            fds: fds.len(),
        });
        if count == 0 {
            s.irq_fds.retain(|(i, _), _| *i != index);
        }
        if flags & vfio_bindings::bindings::vfio::VFIO_IRQ_SET_ACTION_TRIGGER != 0 {
            for (k, fd) in fds.iter().enumerate() {
                // SAFETY: dup of a descriptor the caller keeps open for
                // the call; the copy is ours.
                let dup = unsafe { libc::dup(*fd) };
                assert!(dup >= 0);
                // SAFETY: `dup` is a new descriptor we own.
                let f = unsafe { File::from_raw_fd(dup) };
                s.irq_fds.insert((index, start + k as u32), f);
            }
        }
        Ok(())
    }

    fn reset(&self, device: BorrowedFd<'_>) -> io::Result<()> {
        let mut s = self.state();
        s.expect(device, "device")?;
        s.log("reset");
        s.resets += 1;
        // A reset clears the command register and MSI/MSI-X enables.
        s.config[0x04] = 0;
        s.config[0x05] = 0;
        s.config[0x43] &= 0x3f;
        s.config[0x52] &= !1;
        Ok(())
    }

    fn pread(&self, device: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut s = self.state();
        s.expect(device, "device")?;
        let (index, off) = s.locate(offset, buf.len())?;
        if index == 7 {
            s.log(format!("config read {off:#x}"));
            buf.copy_from_slice(&s.config[off as usize..off as usize + buf.len()]);
            return Ok(buf.len());
        }
        s.backing.read_at(buf, offset)
    }

    fn pwrite(&self, device: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
        let mut s = self.state();
        s.expect(device, "device")?;
        let (index, off) = s.locate(offset, buf.len())?;
        if index == 7 {
            s.config_writes.push((off, buf.to_vec()));
            for (i, b) in buf.iter().enumerate() {
                let o = off as usize + i;
                let m = s.config_writable[o];
                s.config[o] = (s.config[o] & !m) | (b & m);
            }
            return Ok(buf.len());
        }
        s.backing.write_at(buf, offset)
    }
}
