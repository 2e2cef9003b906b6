//! vCPU threads: `KVM_RUN`, exit dispatch to the buses (and, with a split
//! irqchip, EOIs of level-triggered IOAPIC vectors to the interrupt
//! router), and the kick that gets a thread out of `KVM_RUN` when the VM
//! stops.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::Bus;
use crate::coalesced::{Buses, CoalescedRing};
use crate::interrupts::InterruptRouter;
use crate::lifecycle::VcpuGate;
use crate::stop::{StopReason, VmStop};

/// Errors from starting vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("installing the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("spawning the thread for vCPU {index}")]
    Spawn {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

thread_local! {
    /// This thread's `kvm_run`, so the kick handler can set `immediate_exit`.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Clears this thread's [`KVM_RUN`] when dropped.
struct KvmRunGuard;

impl Drop for KvmRunGuard {
    fn drop(&mut self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: `run` is this thread's mapped kvm_run, set by the vCPU loop
        // before it first enters KVM_RUN and cleared before the mapping goes
        // away; a volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result =
            register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::SignalHandler);
    });
    result
}

/// Lets the control thread find a guest that can never run again: every
/// vCPU halted with interrupts disabled, or (an AP) still waiting for a
/// startup IPI. Nothing but an NMI could wake such a guest, and nothing
/// here sends one.
pub struct HaltWatch {
    probe: Vec<AtomicBool>,
    dead: Vec<AtomicBool>,
}

const KVM_MP_STATE_UNINITIALIZED: u32 = 1;
const KVM_MP_STATE_INIT_RECEIVED: u32 = 2;
const KVM_MP_STATE_HALTED: u32 = 3;
const RFLAGS_IF: u64 = 1 << 9;

impl HaltWatch {
    pub fn new(vcpus: usize) -> Arc<HaltWatch> {
        Arc::new(HaltWatch {
            probe: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
            dead: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    /// Asks every vCPU to report its state at its next exit (the caller
    /// kicks them).
    pub fn request_probe(&self) {
        for (p, d) in self.probe.iter().zip(&self.dead) {
            d.store(false, Ordering::SeqCst);
            p.store(true, Ordering::SeqCst);
        }
    }

    /// Whether every vCPU answered the last probe and none can run again.
    pub fn all_dead(&self) -> bool {
        self.probe.iter().all(|p| !p.load(Ordering::SeqCst))
            && self.dead.iter().all(|d| d.load(Ordering::SeqCst))
    }
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    pub index: usize,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub stop: Arc<VmStop>,
    pub mem: GuestMemoryMmap,
    pub halt: Arc<HaltWatch>,
    /// The vCPU thread's seccomp filter, installed before its first
    /// `KVM_RUN`.
    pub seccomp: crate::seccomp::SeccompMode,
    /// Where the thread parks while the VM is paused.
    pub gate: Arc<VcpuGate>,
    /// Takes the guest's EOIs of level-triggered IOAPIC vectors (split
    /// irqchip).
    pub interrupts: Arc<InterruptRouter>,
    /// KVM's ring of coalesced writes, drained after every `KVM_RUN`
    /// (none when no device coalesces).
    pub coalesced: Option<Arc<CoalescedRing>>,
    /// What KVM offers for saving this vCPU's state (snapshots).
    pub state_caps: Arc<crate::snapshot::cpu::CpuStateCaps>,
    /// Host CPUs the thread pins itself to before its first `KVM_RUN`.
    pub affinity: Option<crate::affinity::CpuSet>,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
}

/// Kicks one vCPU thread out of `KVM_RUN` from any thread. Valid while
/// the thread has not been joined (the lifecycle drops its kickers before
/// the control thread joins).
#[derive(Clone, Copy)]
pub struct Kicker(libc::pthread_t);

impl Kicker {
    pub fn kick(&self) {
        // SAFETY: the pthread_t names a thread that has not been joined
        // (see the type's contract); a thread that already returned makes
        // this fail with ESRCH, which is harmless.
        unsafe { libc::pthread_kill(self.0, kick_signal()) };
    }
}

impl VcpuHandle {
    /// A kicker for this thread (see [`Kicker`] for when it may be used).
    pub fn kicker(&self) -> Kicker {
        use std::os::unix::thread::JoinHandleExt;
        Kicker(self.thread.as_pthread_t())
    }

    /// Makes the thread leave `KVM_RUN` soon; it stops if the VM is stopping.
    pub fn kick(&self) {
        // The thread may have exited already, in which case there is
        // nothing to kick.
        let _ = self.thread.kill(kick_signal());
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    pub fn join(self) {
        // A panicking vCPU thread already reported through the panic hook.
        let _ = self.thread.join();
    }
}

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

impl Vcpu {
    /// Starts the vCPU thread.
    pub fn spawn(self) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .stack_size(256 * 1024)
            .spawn(move || self.run_loop())
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(VcpuHandle { thread })
    }

    fn run_loop(mut self) {
        if let Some(set) = &self.affinity {
            if let Err(e) = set.apply_to_current_thread(&format!("vCPU {}", self.index)) {
                self.stop.request(StopReason::HostError {
                    message: crate::error_line(&e),
                });
                return;
            }
        }
        if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu, self.seccomp) {
            self.stop.request(StopReason::HostError {
                message: format!("vCPU {}: {e}", self.index),
            });
            return;
        }
        crate::seccomp::test_call(crate::seccomp::ThreadKind::Vcpu);
        // From here the kick handler may set `immediate_exit`; the guard
        // clears the pointer on every way out, before `self` (and with it
        // the kvm_run mapping) is dropped. A kick before this point is
        // repeated by the stopping side until the thread ends.
        KVM_RUN.with(|c| c.set(self.fd.get_kvm_run() as *mut kvm_run));
        let _clear = KvmRunGuard;
        while !self.stop.is_stopping() {
            if self.gate.is_closed() {
                self.settle();
                let (fd, index, caps) = (&self.fd, self.index, &self.state_caps);
                self.gate.park(&self.stop, index, &mut || {
                    crate::snapshot::cpu::save_vcpu(fd, index, caps)
                });
                continue;
            }
            if let Some(reason) = self.run_once() {
                self.stop.request(reason);
            }
        }
        // Writes the guest made before another vCPU or the host stopped
        // the VM still reach their device.
        self.drain_coalesced();
        log::debug!("vCPU {} stopped at rip={:#x}", self.index, self.rip());
        if let Some(ring) = &self.coalesced {
            log::debug!("coalesced writes drained so far: {}", ring.drained());
        }
    }

    /// Hands the writes KVM buffered to their devices, before any exit is
    /// handled, so that every access reaches the devices in guest order.
    fn drain_coalesced(&self) {
        if let Some(ring) = &self.coalesced {
            ring.drain(&Buses {
                pio: &self.pio,
                mmio: &self.mmio,
            });
        }
    }

    /// Runs the vCPU until one exit is handled; returns a reason to stop.
    fn run_once(&mut self) -> Option<StopReason> {
        let result = self.fd.run();
        if let Some(ring) = &self.coalesced {
            ring.drain(&Buses {
                pio: &self.pio,
                mmio: &self.mmio,
            });
        }
        let exit = match result {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                if self.halt.probe[self.index].load(Ordering::SeqCst) {
                    let dead = self.cannot_run_again();
                    self.halt.dead[self.index].store(dead, Ordering::SeqCst);
                    self.halt.probe[self.index].store(false, Ordering::SeqCst);
                }
                return None;
            }
            Err(e) => {
                return Some(StopReason::HostError {
                    message: format!("KVM_RUN on vCPU {}: {e}", self.index),
                })
            }
        };
        match exit {
            VcpuExit::IoOut(port, data) => {
                if !self.pio.write(u64::from(port), data) {
                    log::trace!("unhandled PIO write {port:#x} {data:02x?}");
                }
                None
            }
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) {
                    log::trace!("unhandled PIO read {port:#x}");
                    data.fill(0xff);
                }
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.mmio.write(addr, data);
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            VcpuExit::Hlt => Some(StopReason::Shutdown),
            VcpuExit::Shutdown => Some(StopReason::TripleFault {
                vcpu: self.index,
                rip: self.rip(),
            }),
            VcpuExit::SystemEvent(kind, _) => Some(if kind == KVM_SYSTEM_EVENT_RESET {
                StopReason::Reset
            } else {
                StopReason::Shutdown
            }),
            VcpuExit::InternalError => Some(self.internal_error()),
            VcpuExit::FailEntry(reason, cpu) => Some(StopReason::HostError {
                message: format!(
                    "KVM entry failed on vCPU {} (hardware reason {reason:#x}, host cpu {cpu})",
                    self.index
                ),
            }),
            VcpuExit::IoapicEoi(vector) => {
                self.interrupts.end_of_interrupt(vector);
                None
            }
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
            other => Some(StopReason::HostError {
                message: format!("unexpected KVM exit on vCPU {}: {other:?}", self.index),
            }),
        }
    }

    /// Before parking: an exit for a port or MMIO access is complete (and
    /// the registers final) only after the next `KVM_RUN`; one with
    /// `immediate_exit` set finishes it and returns at once.
    fn settle(&mut self) {
        for _ in 0..8 {
            self.fd.set_kvm_immediate_exit(1);
            // `run_once` clears the flag when KVM_RUN came back at once
            // (EINTR); an exit it served instead (the access finished into
            // another one, a string instruction's next element) leaves it
            // set, and the loop goes in again.
            if let Some(reason) = self.run_once() {
                self.stop.request(reason);
                break;
            }
            if self.fd.get_kvm_run().immediate_exit == 0 {
                break;
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Halted with interrupts off, or an AP never started.
    fn cannot_run_again(&self) -> bool {
        match self.fd.get_mp_state().map(|m| m.mp_state) {
            Ok(KVM_MP_STATE_HALTED) => self.fd.get_regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0),
            Ok(KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED) => self.index != 0,
            _ => false,
        }
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Collects RIP and the instruction bytes for an internal error.
    fn internal_error(&mut self) -> StopReason {
        let run = self.fd.get_kvm_run();
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the kernel
        // filled the `internal` member of the union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let suberror = internal.suberror;
        let mut insn = Vec::new();
        if suberror == KVM_INTERNAL_ERROR_EMULATION {
            // SAFETY: for an emulation failure the kernel fills the
            // `emulation_failure` member; its flags say whether the
            // instruction bytes are valid.
            let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
            if ef.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES != 0 {
                // SAFETY: the flag says the kernel filled insn_size/insn_bytes.
                let bytes = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
                let n = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
                insn.extend_from_slice(&bytes.insn_bytes[..n]);
            }
        }
        let rip = self.rip();
        if insn.is_empty() {
            insn = self.read_insn(rip);
        }
        StopReason::InternalError {
            vcpu: self.index,
            suberror,
            rip,
            insn,
        }
    }

    /// Reads up to 15 bytes at CS:RIP through the guest's page tables.
    fn read_insn(&self, rip: u64) -> Vec<u8> {
        let base = self.fd.get_sregs().map(|s| s.cs.base).unwrap_or(0);
        let linear = base.wrapping_add(rip);
        let Ok(t) = self.fd.translate_gva(linear) else {
            return Vec::new();
        };
        if t.valid == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        for i in 0..15u64 {
            match self
                .mem
                .read_obj::<u8>(GuestAddress(t.physical_address + i))
            {
                // Stop at the page end rather than guess the next page's frame.
                Ok(b) if (linear + i) & 0xfff >= linear & 0xfff || i == 0 => out.push(b),
                _ => break,
            }
        }
        out
    }
}
