//! The syscall seam of kernel VFIO: every file, link and ioctl the
//! container/group/device (and iommufd) logic uses goes through
//! [`VfioSys`], so that a fake can stand in for the kernel in tests.
//! [`RealSys`] makes the real calls.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    vfio_irq_info, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE,
};

use crate::transport::{DeviceInfo, IrqInfo};

/// The kernel's VFIO, as the container/group/device logic calls it.
pub trait VfioSys: Send + Sync {
    /// Opens a character device read/write, close-on-exec.
    fn open(&self, path: &Path) -> io::Result<OwnedFd>;
    fn read_link(&self, path: &Path) -> io::Result<PathBuf>;
    /// The entries of a directory, by name.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>>;

    // The container (`/dev/vfio/vfio`).
    fn get_api_version(&self, container: BorrowedFd<'_>) -> io::Result<i32>;
    fn check_extension(&self, container: BorrowedFd<'_>, extension: u32) -> io::Result<i32>;
    fn set_iommu(&self, container: BorrowedFd<'_>, kind: u32) -> io::Result<()>;
    fn map_dma(
        &self,
        container: BorrowedFd<'_>,
        iova: u64,
        size: u64,
        vaddr: u64,
    ) -> io::Result<()>;
    fn unmap_dma(&self, container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<()>;

    // The group (`/dev/vfio/N`).
    fn group_status(&self, group: BorrowedFd<'_>) -> io::Result<u32>;
    fn group_set_container(
        &self,
        group: BorrowedFd<'_>,
        container: BorrowedFd<'_>,
    ) -> io::Result<()>;
    fn group_unset_container(&self, group: BorrowedFd<'_>) -> io::Result<()>;
    fn group_device_fd(&self, group: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd>;

    // iommufd (`/dev/iommu` and the device's cdev).
    fn bind_iommufd(&self, device: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> io::Result<u32>;
    fn ioas_alloc(&self, iommufd: BorrowedFd<'_>) -> io::Result<u32>;
    fn attach_ioas(&self, device: BorrowedFd<'_>, ioas: u32) -> io::Result<()>;
    fn ioas_map(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        iova: u64,
        size: u64,
        vaddr: u64,
    ) -> io::Result<()>;
    fn ioas_unmap(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        iova: u64,
        size: u64,
    ) -> io::Result<()>;

    // The device.
    fn device_info(&self, device: BorrowedFd<'_>) -> io::Result<DeviceInfo>;
    /// `VFIO_DEVICE_GET_REGION_INFO` on `buf`, which starts with a
    /// `vfio_region_info` whose `argsz` is `buf.len()`.
    fn region_info(&self, device: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()>;
    fn irq_info(&self, device: BorrowedFd<'_>, index: u32) -> io::Result<IrqInfo>;
    fn set_irqs(
        &self,
        device: BorrowedFd<'_>,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
    ) -> io::Result<()>;
    fn reset(&self, device: BorrowedFd<'_>) -> io::Result<()>;
    fn pread(&self, device: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn pwrite(&self, device: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize>;
}

/// `_IO(type, nr)`: VFIO and iommufd ioctls carry no size or direction.
const fn io(ty: u8, nr: u32) -> libc::c_ulong {
    ((ty as libc::c_ulong) << 8) | nr as libc::c_ulong
}

const VFIO_TYPE: u8 = b';';
const VFIO_BASE: u32 = 100;
const VFIO_GET_API_VERSION: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE);
const VFIO_CHECK_EXTENSION: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 1);
const VFIO_SET_IOMMU: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 2);
const VFIO_GROUP_GET_STATUS: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 3);
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 4);
const VFIO_GROUP_UNSET_CONTAINER: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 5);
const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 6);
const VFIO_DEVICE_GET_INFO: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 7);
const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 8);
const VFIO_DEVICE_GET_IRQ_INFO: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 9);
const VFIO_DEVICE_SET_IRQS: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 10);
const VFIO_DEVICE_RESET: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 11);
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 13);
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 14);
const VFIO_DEVICE_BIND_IOMMUFD: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 18);
const VFIO_DEVICE_ATTACH_IOMMUFD_PT: libc::c_ulong = io(VFIO_TYPE, VFIO_BASE + 19);
const IOMMUFD_TYPE: u8 = b';';
const IOMMU_IOAS_ALLOC: libc::c_ulong = io(IOMMUFD_TYPE, 0x81);
const IOMMU_IOAS_MAP: libc::c_ulong = io(IOMMUFD_TYPE, 0x85);
const IOMMU_IOAS_UNMAP: libc::c_ulong = io(IOMMUFD_TYPE, 0x86);
const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1;
const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;

/// `struct vfio_device_bind_iommufd` up to `out_devid` (what every kernel
/// with the ioctl accepts).
#[repr(C)]
#[derive(Default)]
struct BindIommufd {
    argsz: u32,
    flags: u32,
    iommufd: i32,
    out_devid: u32,
}

/// `struct vfio_device_attach_iommufd_pt` up to `pt_id`.
#[repr(C)]
#[derive(Default)]
struct AttachIommufdPt {
    argsz: u32,
    flags: u32,
    pt_id: u32,
}

/// `struct iommu_ioas_alloc`.
#[repr(C)]
#[derive(Default)]
struct IoasAlloc {
    size: u32,
    flags: u32,
    out_ioas_id: u32,
}

/// `struct iommu_ioas_map`.
#[repr(C)]
#[derive(Default)]
struct IoasMap {
    size: u32,
    flags: u32,
    ioas_id: u32,
    reserved: u32,
    user_va: u64,
    length: u64,
    iova: u64,
}

/// `struct iommu_ioas_unmap`.
#[repr(C)]
#[derive(Default)]
struct IoasUnmap {
    size: u32,
    ioas_id: u32,
    iova: u64,
    length: u64,
}

fn size_u32<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An ioctl whose argument is a pointer to `arg`.
fn ioctl_ptr<T>(fd: BorrowedFd<'_>, req: libc::c_ulong, arg: &mut T) -> io::Result<libc::c_int> {
    // SAFETY: `fd` is open; `arg` is a live, writable value of the type the
    // request expects (each caller passes the matching struct), and the
    // kernel reads or writes at most its `argsz`/`size`, which is its size.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) })
}

/// An ioctl whose argument is a plain integer (or none).
fn ioctl_val(
    fd: BorrowedFd<'_>,
    req: libc::c_ulong,
    arg: libc::c_ulong,
) -> io::Result<libc::c_int> {
    // SAFETY: `fd` is open and the request takes an integer argument, so
    // no memory is touched.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) })
}

/// The real kernel.
pub struct RealSys;

impl VfioSys for RealSys {
    fn open(&self, path: &Path) -> io::Result<OwnedFd> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(OwnedFd::from)
    }

    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::read_link(path)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect()
    }

    fn get_api_version(&self, container: BorrowedFd<'_>) -> io::Result<i32> {
        ioctl_val(container, VFIO_GET_API_VERSION, 0)
    }

    fn check_extension(&self, container: BorrowedFd<'_>, extension: u32) -> io::Result<i32> {
        ioctl_val(container, VFIO_CHECK_EXTENSION, extension.into())
    }

    fn set_iommu(&self, container: BorrowedFd<'_>, kind: u32) -> io::Result<()> {
        ioctl_val(container, VFIO_SET_IOMMU, kind.into()).map(drop)
    }

    fn map_dma(
        &self,
        container: BorrowedFd<'_>,
        iova: u64,
        size: u64,
        vaddr: u64,
    ) -> io::Result<()> {
        let mut m = vfio_iommu_type1_dma_map {
            argsz: size_u32::<vfio_iommu_type1_dma_map>(),
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr,
            iova,
            size,
        };
        ioctl_ptr(container, VFIO_IOMMU_MAP_DMA, &mut m).map(drop)
    }

    fn unmap_dma(&self, container: BorrowedFd<'_>, iova: u64, size: u64) -> io::Result<()> {
        let mut m = vfio_iommu_type1_dma_unmap {
            argsz: size_u32::<vfio_iommu_type1_dma_unmap>(),
            iova,
            size,
            ..Default::default()
        };
        ioctl_ptr(container, VFIO_IOMMU_UNMAP_DMA, &mut m).map(drop)
    }

    fn group_status(&self, group: BorrowedFd<'_>) -> io::Result<u32> {
        let mut s = vfio_group_status {
            argsz: size_u32::<vfio_group_status>(),
            flags: 0,
        };
        ioctl_ptr(group, VFIO_GROUP_GET_STATUS, &mut s)?;
        Ok(s.flags)
    }

    fn group_set_container(
        &self,
        group: BorrowedFd<'_>,
        container: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let mut fd: libc::c_int = container.as_raw_fd();
        ioctl_ptr(group, VFIO_GROUP_SET_CONTAINER, &mut fd).map(drop)
    }

    fn group_unset_container(&self, group: BorrowedFd<'_>) -> io::Result<()> {
        ioctl_val(group, VFIO_GROUP_UNSET_CONTAINER, 0).map(drop)
    }

    fn group_device_fd(&self, group: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
        let name = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `group` is open and the argument is a NUL-terminated
        // string that outlives the call.
        let fd = check(unsafe {
            libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD, name.as_ptr())
        })?;
        // SAFETY: the ioctl returned a new descriptor that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn bind_iommufd(&self, device: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
        let mut b = BindIommufd {
            argsz: size_u32::<BindIommufd>(),
            iommufd: iommufd.as_raw_fd(),
            ..Default::default()
        };
        ioctl_ptr(device, VFIO_DEVICE_BIND_IOMMUFD, &mut b)?;
        Ok(b.out_devid)
    }

    fn ioas_alloc(&self, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
        let mut a = IoasAlloc {
            size: size_u32::<IoasAlloc>(),
            ..Default::default()
        };
        ioctl_ptr(iommufd, IOMMU_IOAS_ALLOC, &mut a)?;
        Ok(a.out_ioas_id)
    }

    fn attach_ioas(&self, device: BorrowedFd<'_>, ioas: u32) -> io::Result<()> {
        let mut a = AttachIommufdPt {
            argsz: size_u32::<AttachIommufdPt>(),
            flags: 0,
            pt_id: ioas,
        };
        ioctl_ptr(device, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut a).map(drop)
    }

    fn ioas_map(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        iova: u64,
        size: u64,
        vaddr: u64,
    ) -> io::Result<()> {
        let mut m = IoasMap {
            size: size_u32::<IoasMap>(),
            flags: IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: ioas,
            reserved: 0,
            user_va: vaddr,
            length: size,
            iova,
        };
        ioctl_ptr(iommufd, IOMMU_IOAS_MAP, &mut m).map(drop)
    }

    fn ioas_unmap(
        &self,
        iommufd: BorrowedFd<'_>,
        ioas: u32,
        iova: u64,
        size: u64,
    ) -> io::Result<()> {
        let mut u = IoasUnmap {
            size: size_u32::<IoasUnmap>(),
            ioas_id: ioas,
            iova,
            length: size,
        };
        ioctl_ptr(iommufd, IOMMU_IOAS_UNMAP, &mut u).map(drop)
    }

    fn device_info(&self, device: BorrowedFd<'_>) -> io::Result<DeviceInfo> {
        let mut i = vfio_device_info {
            argsz: size_u32::<vfio_device_info>(),
            ..Default::default()
        };
        ioctl_ptr(device, VFIO_DEVICE_GET_INFO, &mut i)?;
        Ok(DeviceInfo {
            flags: i.flags,
            num_regions: i.num_regions,
            num_irqs: i.num_irqs,
        })
    }

    fn region_info(&self, device: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() < crate::transport::REGION_INFO_SIZE {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // The kernel wants the struct 8-byte aligned: copy through u64s.
        let mut words = vec![0u64; buf.len().div_ceil(8)];
        // SAFETY: `words` has at least `buf.len()` bytes; u8 has no
        // alignment or validity requirements.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), buf.len()) };
        bytes.copy_from_slice(buf);
        // SAFETY: `device` is open; the buffer starts with a
        // vfio_region_info whose argsz (set by the caller) is the buffer's
        // length, so the kernel writes within it.
        check(unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                VFIO_DEVICE_GET_REGION_INFO,
                words.as_mut_ptr(),
            )
        })?;
        buf.copy_from_slice(bytes);
        Ok(())
    }

    fn irq_info(&self, device: BorrowedFd<'_>, index: u32) -> io::Result<IrqInfo> {
        let mut i = vfio_irq_info {
            argsz: size_u32::<vfio_irq_info>(),
            index,
            ..Default::default()
        };
        ioctl_ptr(device, VFIO_DEVICE_GET_IRQ_INFO, &mut i)?;
        Ok(IrqInfo {
            index,
            flags: i.flags,
            count: i.count,
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
        // struct vfio_irq_set: argsz, flags, index, start, count, data[].
        let mut words: Vec<u32> = vec![0, flags, index, start, count];
        words.extend(fds.iter().map(|&fd| fd as u32));
        words[0] = (words.len() * 4) as u32;
        // SAFETY: `device` is open; `words` is a vfio_irq_set followed by
        // `fds.len()` descriptors, and its argsz is its length.
        check(unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_SET_IRQS, words.as_mut_ptr()) })
            .map(drop)
    }

    fn reset(&self, device: BorrowedFd<'_>) -> io::Result<()> {
        ioctl_val(device, VFIO_DEVICE_RESET, 0).map(drop)
    }

    fn pread(&self, device: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let off = libc::off64_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `buf` is writable for its length and `device` is open.
        let n =
            unsafe { libc::pread64(device.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn pwrite(&self, device: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
        let off = libc::off64_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `buf` is readable for its length and `device` is open.
        let n = unsafe { libc::pwrite64(device.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_headers() {
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(VFIO_DEVICE_BIND_IOMMUFD, 0x3b76);
        assert_eq!(IOMMU_IOAS_MAP, 0x3b85);
        assert_eq!(std::mem::size_of::<IoasMap>(), 40);
        assert_eq!(std::mem::size_of::<IoasUnmap>(), 24);
        assert_eq!(std::mem::size_of::<BindIommufd>(), 16);
    }
}
