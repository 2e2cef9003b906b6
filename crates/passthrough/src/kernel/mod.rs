//! Kernel VFIO: a PCI function bound to `vfio-pci`, opened from its sysfs
//! path.
//!
//! Where the kernel offers it (a `vfio-dev/vfioN` directory under the
//! function and `/dev/iommu`), the function's VFIO cdev is bound to a new
//! iommufd and attached to a fresh I/O address space. Otherwise the legacy
//! path: a container (`/dev/vfio/vfio`, type-1 IOMMU) with the function's
//! group (`/dev/vfio/N`, which must be viable: every function in it bound
//! to vfio-pci) and the device fd from the group. Every call goes through
//! the [`VfioSys`] seam.

#[cfg(test)]
mod fake;
pub mod sys;
#[cfg(test)]
mod tests;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_GROUP_FLAGS_VIABLE, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_TYPE1_IOMMU,
};

pub use sys::{RealSys, VfioSys};

use crate::transport::{
    parse_region_info, region_info_request, sparse_areas, DeviceInfo, DmaRegion, IrqInfo, IrqSet,
    MmapSource, RegionInfo, Transport, TransportError, REGION_INFO_SIZE,
};

const VFIO_CONTAINER: &str = "/dev/vfio/vfio";
const IOMMUFD: &str = "/dev/iommu";
/// A region info with capabilities may be at most this long.
const MAX_REGION_INFO: u32 = 64 << 10;

/// Why a kernel VFIO device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{path} is not a PCI function's sysfs directory (/sys/bus/pci/devices/DDDD:BB:DD.F)")]
    BadPath { path: PathBuf },
    #[error(
        "{path} is bound to {driver}, not vfio-pci (see the README's section on binding a \
         device to vfio-pci)"
    )]
    NotVfioPci { path: PathBuf, driver: String },
    #[error("{path} has no IOMMU group: is the IOMMU enabled (intel_iommu=on / amd_iommu=on)?")]
    NoIommuGroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{VFIO_CONTAINER} speaks VFIO API version {version}, not {VFIO_API_VERSION}")]
    ApiVersion { version: i32 },
    #[error("the VFIO container supports no type-1 IOMMU")]
    NoType1Iommu,
    #[error(
        "IOMMU group {group} is not viable: every device in /sys/kernel/iommu_groups/{group}/devices \
         must be bound to vfio-pci (or no driver)"
    )]
    GroupNotViable { group: u32 },
    #[error("{op} for {name}")]
    Ioctl {
        op: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// How the device's DMA is mapped.
enum Iommu {
    /// Legacy: a container holding the device's group.
    Group { container: OwnedFd, group: OwnedFd },
    /// iommufd with one I/O address space.
    Iommufd { iommufd: OwnedFd, ioas: u32 },
}

/// Where a region is in the device fd.
#[derive(Clone, Copy)]
struct RegionPlace {
    offset: u64,
    size: u64,
}

/// A function bound to vfio-pci.
pub struct KernelTransport {
    sys: Arc<dyn VfioSys>,
    name: String,
    /// Shared with the mmap sources handed out for its regions.
    device: Option<Arc<OwnedFd>>,
    iommu: Iommu,
    regions: Vec<Option<RegionPlace>>,
}

fn is_pci_address(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

impl KernelTransport {
    /// Opens the function at `sysfs` (`/sys/bus/pci/devices/0000:01:00.0`).
    pub fn open(sys: Arc<dyn VfioSys>, sysfs: &Path) -> Result<KernelTransport, KernelError> {
        let name = sysfs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| is_pci_address(n))
            .ok_or_else(|| KernelError::BadPath { path: sysfs.into() })?;
        let driver = sys
            .read_link(&sysfs.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "no driver".into());
        if driver != "vfio-pci" {
            return Err(KernelError::NotVfioPci {
                path: sysfs.into(),
                driver,
            });
        }
        let cdev = sys
            .read_dir(&sysfs.join("vfio-dev"))
            .ok()
            .and_then(|names| names.into_iter().find(|n| n.starts_with("vfio")));
        let (device, iommu) = match cdev {
            Some(cdev) => match sys.open(Path::new(IOMMUFD)) {
                Ok(iommufd) => Self::open_iommufd(&*sys, &name, &cdev, iommufd)?,
                Err(e) => {
                    log::info!("{name}: {IOMMUFD} unavailable ({e}); using the VFIO container");
                    Self::open_group(&*sys, &name, sysfs)?
                }
            },
            None => Self::open_group(&*sys, &name, sysfs)?,
        };
        Ok(KernelTransport {
            sys,
            name,
            device: Some(Arc::new(device)),
            iommu,
            regions: Vec::new(),
        })
    }

    fn open_iommufd(
        sys: &dyn VfioSys,
        name: &str,
        cdev: &str,
        iommufd: OwnedFd,
    ) -> Result<(OwnedFd, Iommu), KernelError> {
        let ioctl = |op| {
            move |source| KernelError::Ioctl {
                op,
                name: name.into(),
                source,
            }
        };
        let path = Path::new("/dev/vfio/devices").join(cdev);
        let device = sys.open(&path).map_err(|source| KernelError::Open {
            path: path.clone(),
            source,
        })?;
        sys.bind_iommufd(device.as_fd(), iommufd.as_fd())
            .map_err(ioctl("VFIO_DEVICE_BIND_IOMMUFD"))?;
        let ioas = sys
            .ioas_alloc(iommufd.as_fd())
            .map_err(ioctl("IOMMU_IOAS_ALLOC"))?;
        sys.attach_ioas(device.as_fd(), ioas)
            .map_err(ioctl("VFIO_DEVICE_ATTACH_IOMMUFD_PT"))?;
        Ok((device, Iommu::Iommufd { iommufd, ioas }))
    }

    fn open_group(
        sys: &dyn VfioSys,
        name: &str,
        sysfs: &Path,
    ) -> Result<(OwnedFd, Iommu), KernelError> {
        let ioctl = |op| {
            move |source| KernelError::Ioctl {
                op,
                name: name.into(),
                source,
            }
        };
        let group_link = sys
            .read_link(&sysfs.join("iommu_group"))
            .map_err(|source| KernelError::NoIommuGroup {
                path: sysfs.into(),
                source,
            })?;
        let group_id: u32 = group_link
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| KernelError::NoIommuGroup {
                path: sysfs.into(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            })?;
        let open = |path: PathBuf| {
            sys.open(&path)
                .map_err(|source| KernelError::Open { path, source })
        };
        let container = open(VFIO_CONTAINER.into())?;
        let version = sys
            .get_api_version(container.as_fd())
            .map_err(ioctl("VFIO_GET_API_VERSION"))?;
        if version != VFIO_API_VERSION as i32 {
            return Err(KernelError::ApiVersion { version });
        }
        let kind = [VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_IOMMU]
            .into_iter()
            .find(|&k| sys.check_extension(container.as_fd(), k).unwrap_or(0) > 0)
            .ok_or(KernelError::NoType1Iommu)?;
        let group = open(PathBuf::from(format!("/dev/vfio/{group_id}")))?;
        let status = sys
            .group_status(group.as_fd())
            .map_err(ioctl("VFIO_GROUP_GET_STATUS"))?;
        if status & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(KernelError::GroupNotViable { group: group_id });
        }
        sys.group_set_container(group.as_fd(), container.as_fd())
            .map_err(ioctl("VFIO_GROUP_SET_CONTAINER"))?;
        let attached = sys
            .set_iommu(container.as_fd(), kind)
            .map_err(ioctl("VFIO_SET_IOMMU"))
            .and_then(|()| {
                sys.group_device_fd(group.as_fd(), name)
                    .map_err(ioctl("VFIO_GROUP_GET_DEVICE_FD"))
            });
        match attached {
            Ok(device) => Ok((device, Iommu::Group { container, group })),
            Err(e) => {
                let _ = sys.group_unset_container(group.as_fd());
                Err(e)
            }
        }
    }

    fn device(&self) -> Result<BorrowedFd<'_>, TransportError> {
        self.device
            .as_deref()
            .map(AsFd::as_fd)
            .ok_or(TransportError::Invalid {
                op: "device access",
                detail: "the device is closed".into(),
            })
    }

    fn sys_err(op: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
        move |source| TransportError::Sys { op, source }
    }

    fn place(&mut self, index: u32) -> Result<RegionPlace, TransportError> {
        if let Some(Some(p)) = self.regions.get(index as usize) {
            return Ok(*p);
        }
        let info = self.region_info(index)?;
        Ok(RegionPlace {
            offset: info.offset,
            size: info.size,
        })
    }

    fn check_access(
        &mut self,
        op: &'static str,
        index: u32,
        offset: u64,
        len: usize,
    ) -> Result<u64, TransportError> {
        let p = self.place(index)?;
        let inside = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= p.size);
        if !inside {
            return Err(TransportError::Invalid {
                op,
                detail: format!(
                    "{len} bytes at {offset:#x} are outside region {index} ({:#x} bytes)",
                    p.size
                ),
            });
        }
        Ok(p.offset + offset)
    }

    fn set_irqs_raw(
        &self,
        index: u32,
        flags: u32,
        count: u32,
        fds: &[RawFd],
    ) -> Result<(), TransportError> {
        self.sys
            .set_irqs(self.device()?, index, flags, 0, count, fds)
            .map_err(Self::sys_err("VFIO_DEVICE_SET_IRQS"))
    }
}

impl Drop for KernelTransport {
    fn drop(&mut self) {
        // The device fd goes first: a group with an open device cannot
        // leave its container.
        self.device = None;
        if let Iommu::Group { group, .. } = &self.iommu {
            if let Err(e) = self.sys.group_unset_container(group.as_fd()) {
                log::warn!("{}: VFIO_GROUP_UNSET_CONTAINER: {e}", self.name);
            }
        }
    }
}

impl Transport for KernelTransport {
    fn describe(&self) -> String {
        format!("VFIO device {}", self.name)
    }

    fn device_info(&mut self) -> Result<DeviceInfo, TransportError> {
        self.sys
            .device_info(self.device()?)
            .map_err(Self::sys_err("VFIO_DEVICE_GET_INFO"))
    }

    fn region_info(&mut self, index: u32) -> Result<RegionInfo, TransportError> {
        let op = "VFIO_DEVICE_GET_REGION_INFO";
        let mut buf = region_info_request(index, REGION_INFO_SIZE as u32).to_vec();
        self.sys
            .region_info(self.device()?, &mut buf)
            .map_err(Self::sys_err(op))?;
        let mut raw = parse_region_info(&buf).ok_or(TransportError::Invalid {
            op,
            detail: "short region info".into(),
        })?;
        if raw.argsz > REGION_INFO_SIZE as u32 && raw.argsz <= MAX_REGION_INFO {
            buf = vec![0u8; raw.argsz as usize];
            buf[..REGION_INFO_SIZE].copy_from_slice(&region_info_request(index, raw.argsz));
            self.sys
                .region_info(self.device()?, &mut buf)
                .map_err(Self::sys_err(op))?;
            raw = parse_region_info(&buf).ok_or(TransportError::Invalid {
                op,
                detail: "short region info".into(),
            })?;
        }
        let sparse =
            sparse_areas(&buf, &raw).map_err(|detail| TransportError::Invalid { op, detail })?;
        let i = index as usize;
        if self.regions.len() <= i {
            self.regions.resize(i + 1, None);
        }
        self.regions[i] = Some(RegionPlace {
            offset: raw.offset,
            size: raw.size,
        });
        let mmap = (raw.flags & VFIO_REGION_INFO_FLAG_MMAP != 0)
            .then(|| self.device.clone())
            .flatten()
            .map(|fd| MmapSource {
                fd,
                offset: raw.offset,
            });
        Ok(RegionInfo {
            index,
            flags: raw.flags,
            size: raw.size,
            offset: raw.offset,
            sparse,
            mmap,
        })
    }

    fn irq_info(&mut self, index: u32) -> Result<IrqInfo, TransportError> {
        self.sys
            .irq_info(self.device()?, index)
            .map_err(Self::sys_err("VFIO_DEVICE_GET_IRQ_INFO"))
    }

    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), TransportError> {
        let op = "region read";
        let at = self.check_access(op, index, offset, data.len())?;
        let n = self
            .sys
            .pread(self.device()?, data, at)
            .map_err(Self::sys_err(op))?;
        if n != data.len() {
            return Err(TransportError::Invalid {
                op,
                detail: format!("{n} of {} bytes", data.len()),
            });
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), TransportError> {
        let op = "region write";
        let at = self.check_access(op, index, offset, data.len())?;
        let n = self
            .sys
            .pwrite(self.device()?, data, at)
            .map_err(Self::sys_err(op))?;
        if n != data.len() {
            return Err(TransportError::Invalid {
                op,
                detail: format!("{n} of {} bytes", data.len()),
            });
        }
        Ok(())
    }

    fn set_irqs(&mut self, index: u32, set: IrqSet<'_>) -> Result<(), TransportError> {
        match set {
            IrqSet::Trigger(fds) => self.set_irqs_raw(
                index,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                fds.len() as u32,
                fds,
            ),
            IrqSet::Disable => self.set_irqs_raw(
                index,
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                &[],
            ),
            IrqSet::UnmaskOn(fd) => self.set_irqs_raw(
                index,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK,
                1,
                &[fd],
            ),
        }
    }

    fn dma_needs_fd(&self) -> bool {
        false
    }

    fn dma_map(&mut self, region: &DmaRegion<'_>) -> Result<(), TransportError> {
        let r = match &self.iommu {
            Iommu::Group { container, .. } => self.sys.map_dma(
                container.as_fd(),
                region.iova,
                region.size,
                region.host_addr,
            ),
            Iommu::Iommufd { iommufd, ioas } => self.sys.ioas_map(
                iommufd.as_fd(),
                *ioas,
                region.iova,
                region.size,
                region.host_addr,
            ),
        };
        r.map_err(Self::sys_err("DMA map"))
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), TransportError> {
        let r = match &self.iommu {
            Iommu::Group { container, .. } => self.sys.unmap_dma(container.as_fd(), iova, size),
            Iommu::Iommufd { iommufd, ioas } => {
                self.sys.ioas_unmap(iommufd.as_fd(), *ioas, iova, size)
            }
        };
        r.map_err(Self::sys_err("DMA unmap"))
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        self.sys
            .reset(self.device()?)
            .map_err(Self::sys_err("VFIO_DEVICE_RESET"))
    }
}
