//! The KVM VM: guest memory slots, the irqchip (in-kernel with the PIT, or
//! split) and irqfds.

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_CAP_SPLIT_IRQCHIP,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use std::sync::Arc;

use crate::config::IrqChip;
use crate::interrupts::IOAPIC_PINS;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Errors from creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM {op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM supports at most {max} vCPUs on this host; {wanted} requested")]
    TooManyVcpus { wanted: usize, max: usize },
    #[error("allocating {size} bytes of guest memory")]
    Memory {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("creating a {size}-byte memfd for shareable guest memory")]
    Memfd {
        size: u64,
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Allocates guest RAM for the layout's regions (anonymous, no reserve).
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<(GuestAddress, usize)> = crate::layout::ram_regions(size)
        .into_iter()
        .map(|(a, l)| (a, l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmError::Memory { size, source })
}

/// Allocates guest RAM in one memfd (sparse until touched), each region
/// at its own file offset, so that another process (a vfio-user device)
/// can map it. Used only when the VM's configuration asks for it.
pub fn create_shared_guest_memory(size: u64) -> Result<GuestMemoryMmap, VmError> {
    let memfd_err = |source| VmError::Memfd { size, source };
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"ringvm-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(memfd_err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let file = Arc::new(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    file.set_len(size).map_err(memfd_err)?;
    let mut offset = 0;
    let mut ranges = Vec::new();
    for (addr, len) in crate::layout::ram_regions(size) {
        ranges.push((
            addr,
            len as usize,
            Some(FileOffset::from_arc(file.clone(), offset)),
        ));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|source| VmError::Memory { size, source })
}

/// Where KVM's TSS and identity page (needed on Intel hosts) go: the top of
/// the 32-bit hole, below the BIOS area, which nothing else uses.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// A KVM VM with memory, irqchip and PIT set up.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    supported_cpuid: CpuId,
}

impl Vm {
    /// Creates the VM for `cpus` vCPUs and maps `mem` into it.
    pub fn new(mem: &GuestMemoryMmap, cpus: usize, irqchip: IrqChip) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let max = kvm.get_max_vcpus();
        if cpus > max {
            return Err(VmError::TooManyVcpus { wanted: cpus, max });
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region's host mapping lives as long as `mem`, which
            // the caller keeps alive for the VM's lifetime (Vmm owns both and
            // drops the VM first).
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        match irqchip {
            IrqChip::Kernel => {
                fd.create_irq_chip()
                    .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
            }
            IrqChip::Split => {
                let mut cap = kvm_enable_cap {
                    cap: KVM_CAP_SPLIT_IRQCHIP,
                    ..Default::default()
                };
                // Routes reserved for the userspace IOAPIC's pins.
                cap.args[0] = u64::from(IOAPIC_PINS);
                fd.enable_cap(&cap)
                    .map_err(kvm_err("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?;
            }
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Vm {
            kvm,
            fd: Arc::new(fd),
            supported_cpuid,
        })
    }

    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Number of KVM memory slots this VM may use.
    pub fn memslot_limit(&self) -> u32 {
        u32::try_from(self.kvm.get_nr_memslots()).unwrap_or(u32::MAX)
    }

    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    pub fn create_vcpu(&self, index: usize) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(index as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))
    }

    /// Connects `evt` to `gsi` (an IOAPIC pin with the default routing).
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))
    }
}
