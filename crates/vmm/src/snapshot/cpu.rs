//! One vCPU's state: general and special registers, FPU (XSAVE when KVM
//! has it), XCRs, MSRs (the TSC among them), the local APIC, the MP state,
//! pending events and the debug registers.
//!
//! Saved by the vCPU's own thread while it is parked (see
//! [`crate::lifecycle::VcpuGate`]), restored on the new process's vCPU
//! before its thread starts.

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// The floating-point state, in the richest form KVM offers.
#[derive(Debug, Serialize, Deserialize)]
pub enum FpuState {
    /// `KVM_GET_XSAVE`: x87, SSE and every XSAVE component: the 4 KiB
    /// `kvm_xsave` region as bytes (on the heap: a vCPU's state is decoded
    /// on threads with small stacks).
    Xsave(Vec<u8>),
    /// `KVM_GET_FPU`: x87 and SSE only, when KVM has no `KVM_CAP_XSAVE`.
    Fpu(Box<FpuRegs>),
}

/// `kvm_fpu`'s fields (kvm-bindings has no serde for it).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FpuRegs {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuRegs {
    fn from(f: &kvm_fpu) -> FpuRegs {
        FpuRegs {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuRegs> for kvm_fpu {
    fn from(f: &FpuRegs) -> kvm_fpu {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// What one vCPU is.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// None when KVM has no `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    /// (index, value) of every MSR KVM lists and lets us read.
    pub msrs: Vec<(u32, u64)>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

/// What the host's KVM offers for vCPU state, probed once per VM.
#[derive(Clone, Debug, Default)]
pub struct CpuStateCaps {
    pub xsave: bool,
    pub xcrs: bool,
    /// `KVM_GET_MSR_INDEX_LIST`: the MSRs saved.
    pub msr_indices: Vec<u32>,
}

impl CpuStateCaps {
    pub fn probe(kvm: &Kvm) -> Result<CpuStateCaps, SnapshotError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(|source| SnapshotError::Kvm {
                op: "KVM_GET_MSR_INDEX_LIST",
                what: "the host".into(),
                source,
            })?;
        Ok(CpuStateCaps {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            msr_indices: list.as_slice().to_vec(),
        })
    }
}

/// What one `KVM_GET_MSRS`/`KVM_SET_MSRS` takes (`KVM_MAX_MSR_ENTRIES`).
const MSRS_PER_CALL: usize = 256;

fn kvm_err(op: &'static str, index: usize) -> impl Fn(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm {
        op,
        what: format!("vCPU {index}"),
        source,
    }
}

/// Reads every MSR of `indices` that KVM lets us read. `KVM_GET_MSRS`
/// stops at the first MSR it cannot read; that one is left out (KVM lists
/// MSRs that depend on CPU features the guest was not given) and the rest
/// read again.
fn read_msrs(fd: &VcpuFd, index: usize, indices: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSRS_PER_CALL)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| SnapshotError::Apply {
            what: format!("vCPU {index}"),
            detail: format!("building the MSR list: {e:?}"),
        })?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err("KVM_GET_MSRS", index))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // All of the chunk, or up to and past the one KVM could not read.
        rest = &rest[(if n == chunk.len() { n } else { n + 1 }).min(rest.len())..];
    }
    Ok(out)
}

/// Saves vCPU `index` (parked, its last exit completed).
pub fn save_vcpu(
    fd: &VcpuFd,
    index: usize,
    caps: &CpuStateCaps,
) -> Result<VcpuState, SnapshotError> {
    let fpu = if caps.xsave {
        let x = fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE", index))?;
        FpuState::Xsave(x.region.iter().flat_map(|w| w.to_le_bytes()).collect())
    } else {
        FpuState::Fpu(Box::new(FpuRegs::from(
            &fd.get_fpu().map_err(kvm_err("KVM_GET_FPU", index))?,
        )))
    };
    let xcrs = if caps.xcrs {
        Some(fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS", index))?)
    } else {
        None
    };
    Ok(VcpuState {
        mp_state: fd
            .get_mp_state()
            .map_err(kvm_err("KVM_GET_MP_STATE", index))?,
        regs: fd.get_regs().map_err(kvm_err("KVM_GET_REGS", index))?,
        sregs: fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS", index))?,
        fpu,
        xcrs,
        msrs: read_msrs(fd, index, &caps.msr_indices)?,
        lapic: fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC", index))?,
        events: fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS", index))?,
        debugregs: fd
            .get_debug_regs()
            .map_err(kvm_err("KVM_GET_DEBUGREGS", index))?,
    })
}

/// Loads `state` into vCPU `index` (created, CPUID set, never run). The
/// order matters: special registers (APIC base) before the local APIC,
/// MSRs before the pending events, which KVM checks against the rest.
pub fn restore_vcpu(
    fd: &VcpuFd,
    index: usize,
    state: &VcpuState,
    caps: &CpuStateCaps,
) -> Result<(), SnapshotError> {
    let what = format!("vCPU {index}");
    fd.set_sregs(&state.sregs)
        .map_err(kvm_err("KVM_SET_SREGS", index))?;
    fd.set_regs(&state.regs)
        .map_err(kvm_err("KVM_SET_REGS", index))?;
    match &state.fpu {
        FpuState::Xsave(bytes) if caps.xsave => {
            let mut x = Box::<kvm_xsave>::default();
            if bytes.len() != x.region.len() * 4 {
                return Err(SnapshotError::mismatch(
                    what,
                    format!(
                        "its XSAVE area is {} bytes, not {}",
                        bytes.len(),
                        x.region.len() * 4
                    ),
                ));
            }
            for (w, b) in x.region.iter_mut().zip(bytes.chunks_exact(4)) {
                *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            // SAFETY: `x` is a whole legacy kvm_xsave (4 KiB region, no
            // flexible-array tail), which is what KVM_SET_XSAVE reads.
            unsafe { fd.set_xsave(&x) }.map_err(kvm_err("KVM_SET_XSAVE", index))?
        }
        FpuState::Xsave(_) => {
            return Err(SnapshotError::mismatch(
                what,
                "it was saved with XSAVE state, which this host's KVM cannot load",
            ))
        }
        FpuState::Fpu(f) => fd
            .set_fpu(&kvm_fpu::from(&**f))
            .map_err(kvm_err("KVM_SET_FPU", index))?,
    }
    if let Some(x) = &state.xcrs {
        if !caps.xcrs {
            return Err(SnapshotError::mismatch(
                what,
                "it has XCRs, which this host's KVM cannot load",
            ));
        }
        fd.set_xcrs(x).map_err(kvm_err("KVM_SET_XCRS", index))?;
    }
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS", index))?;
    fd.set_lapic(&state.lapic)
        .map_err(kvm_err("KVM_SET_LAPIC", index))?;
    for chunk in state.msrs.chunks(MSRS_PER_CALL) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| SnapshotError::Apply {
            what: what.clone(),
            detail: format!("building the MSR list: {e:?}"),
        })?;
        let n = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS", index))?;
        if n != entries.len() {
            return Err(SnapshotError::Apply {
                what,
                detail: format!(
                    "KVM refused MSR {:#x} (it set {n} of {})",
                    entries[n].index,
                    entries.len()
                ),
            });
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE", index))?;
    fd.set_vcpu_events(&state.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS", index))?;
    Ok(())
}
