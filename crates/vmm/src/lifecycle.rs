//! The VM's lifecycle: one state machine (Created, Running, Paused,
//! Shutdown) that the command line, signals and the API drive through the
//! same calls on a [`VmControl`].
//!
//! ```text
//!   Created --boot--> Running --pause--> Paused --resume--> Running
//!   Created | Running | Paused --shutdown (or the guest stops)--> Shutdown
//! ```
//! Pausing parks every vCPU outside `KVM_RUN` (after completing any port or
//! MMIO access it was in the middle of, so its registers are final), then
//! quiesces every PCI device (virtio queue workers stop taking requests and
//! wait for what is in flight to reach the used ring), then saves the KVM
//! clock. Resuming sets the clock back, restarts the devices and releases
//! the vCPUs. Transitions are serialised by one lock; a VM being paused or
//! resumed is never stopped half-way by another request.
//!
//! Snapshots plug in here: a Paused VM has every vCPU parked with final
//! registers, every device quiescent, and the clock saved;
//! [`VmControl::capture`] collects its state (each parked vCPU thread
//! reads its own registers, see [`VcpuGate::save_vcpus`]). A VM restored
//! from a snapshot starts Paused ([`VmControl::booted_paused`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use crate::config::IrqChip;
use crate::pci::{PciDevice, PciRoot};
use crate::registry::DeviceRegistry;
use crate::snapshot::cpu::VcpuState;
use crate::snapshot::{SnapshotError, SnapshotState};
use crate::stop::{StopReason, VmStop};
use crate::vcpu::Kicker;

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Built, vCPUs not started.
    Created,
    Running,
    Paused,
    /// Stopped (by the guest, a signal or a request); it cannot run again.
    Shutdown,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a caller asks of the lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Boot,
    Pause,
    Resume,
    Shutdown,
    Snapshot,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Boot => "boot",
            Transition::Pause => "pause",
            Transition::Resume => "resume",
            Transition::Shutdown => "shut down",
            Transition::Snapshot => "snapshot",
        }
    }
}

/// Errors from lifecycle requests. [`LifecycleError::is_wrong_state`]
/// separates requests that do not fit the state from host failures.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("cannot {} a VM that is {state}", action.as_str())]
    WrongState { action: Transition, state: VmState },
    #[error("the VM stopped while it was being paused")]
    StoppedWhilePausing,
    #[error("pausing device {name}")]
    PauseDevice {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("resuming device {name}")]
    ResumeDevice {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading the KVM clock")]
    GetClock(#[source] kvm_ioctls::Error),
    #[error("setting the KVM clock")]
    SetClock(#[source] kvm_ioctls::Error),
    #[error("there is no ACPI power button in this VM")]
    NoPowerButton,
    #[error("pressing the power button: {0}")]
    PowerButton(String),
    #[error("saving the VM's state")]
    Snapshot(#[source] SnapshotError),
}

impl LifecycleError {
    /// The request does not fit the VM's state (HTTP 409), rather than
    /// something failing on the host.
    pub fn is_wrong_state(&self) -> bool {
        matches!(
            self,
            LifecycleError::WrongState { .. }
                | LifecycleError::StoppedWhilePausing
                | LifecycleError::NoPowerButton
                | LifecycleError::Snapshot(SnapshotError::Unsupported { .. })
        )
    }
}

/// The state machine itself: where `t` leads from `from`.
pub fn next_state(from: VmState, t: Transition) -> Result<VmState, LifecycleError> {
    use Transition as T;
    use VmState as S;
    match (from, t) {
        (S::Created, T::Boot) => Ok(S::Running),
        (S::Running, T::Pause) => Ok(S::Paused),
        (S::Paused, T::Resume) => Ok(S::Running),
        (S::Created | S::Running | S::Paused, T::Shutdown) => Ok(S::Shutdown),
        (state, action) => Err(LifecycleError::WrongState { action, state }),
    }
}

/// Where vCPU threads park while the VM is paused.
pub struct VcpuGate {
    inner: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    parked: usize,
    /// vCPUs asked to save their state while parked.
    save_pending: BTreeSet<usize>,
    /// What they saved.
    saved: BTreeMap<usize, Result<VcpuState, SnapshotError>>,
}

/// How a parked vCPU thread saves its own state (its fd is its own).
pub type SaveVcpu<'a> = &'a mut dyn FnMut() -> Result<VcpuState, SnapshotError>;

impl VcpuGate {
    pub fn new() -> Arc<VcpuGate> {
        Arc::new(VcpuGate {
            inner: Mutex::new(GateState::default()),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a vCPU should park before its next `KVM_RUN`.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Called by vCPU thread `index`: waits while the gate is closed and
    /// the VM is not stopping, saving its state with `save` when asked.
    pub fn park(&self, stop: &VmStop, index: usize, save: SaveVcpu<'_>) {
        let mut g = self.lock();
        if !g.closed {
            return;
        }
        g.parked += 1;
        self.cv.notify_all();
        while g.closed && !stop.is_stopping() {
            if g.save_pending.remove(&index) {
                drop(g);
                let r = save();
                g = self.lock();
                g.saved.insert(index, r);
                self.cv.notify_all();
                continue;
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        g.parked -= 1;
        self.cv.notify_all();
    }

    /// Closes the gate (vCPUs park before their next `KVM_RUN`; one not
    /// started yet parks before its first).
    pub(crate) fn close(&self) {
        self.lock().closed = true;
    }

    /// Asks each of the `n` parked vCPUs to save its state and waits for
    /// all of them; in vCPU order.
    pub fn save_vcpus(&self, n: usize, stop: &VmStop) -> Result<Vec<VcpuState>, SnapshotError> {
        let mut g = self.lock();
        g.saved.clear();
        g.save_pending = (0..n).collect();
        self.cv.notify_all();
        while g.saved.len() < n {
            if stop.is_stopping() {
                g.save_pending.clear();
                return Err(SnapshotError::Other(
                    "the VM stopped while its vCPUs were being saved".into(),
                ));
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let saved = std::mem::take(&mut g.saved);
        saved.into_values().collect()
    }

    fn open(&self) {
        self.lock().closed = false;
        self.cv.notify_all();
    }

    /// Waits until `n` vCPUs are parked, kicking them out of `KVM_RUN`
    /// meanwhile; false if the VM started stopping first.
    fn wait_parked(&self, n: usize, stop: &VmStop, kicks: &[Kicker]) -> bool {
        let mut g = self.lock();
        while g.parked < n {
            if stop.is_stopping() {
                return false;
            }
            drop(g);
            for k in kicks {
                k.kick();
            }
            g = self.lock();
            if g.parked < n {
                g = self
                    .cv
                    .wait_timeout(g, Duration::from_millis(2))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        true
    }
}

/// Run when the power button is pressed (an ACPI device registers it).
pub type PowerButton = Box<dyn Fn() -> Result<(), String> + Send>;

/// What a snapshot reads besides the vCPUs (set when the VM starts).
pub(crate) struct SnapshotParts {
    pub registry: Arc<Mutex<DeviceRegistry>>,
    pub mem: GuestMemoryMmap,
    pub irqchip: IrqChip,
    pub vcpus: usize,
}

struct Inner {
    state: VmState,
    /// The vCPU threads, while they run (cleared before they are joined).
    kicks: Vec<Kicker>,
    clock: Option<kvm_clock_data>,
}

/// The handle that drives a VM's lifecycle; shared by the control thread,
/// signal handling and the API. Every method may be called from any
/// thread; transitions are serialised.
pub struct VmControl {
    inner: Mutex<Inner>,
    stop: Arc<VmStop>,
    gate: Arc<VcpuGate>,
    vm: Arc<VmFd>,
    pci: Mutex<Option<Arc<Mutex<PciRoot>>>>,
    power_button: Mutex<Option<PowerButton>>,
    snapshot: Mutex<Option<SnapshotParts>>,
}

fn emit_vm(event: &str) {
    crate::events::emit("vm", event, &[]);
}

impl VmControl {
    pub(crate) fn new(stop: Arc<VmStop>, gate: Arc<VcpuGate>, vm: Arc<VmFd>) -> Arc<VmControl> {
        Arc::new(VmControl {
            inner: Mutex::new(Inner {
                state: VmState::Created,
                kicks: Vec::new(),
                clock: None,
            }),
            stop,
            gate,
            vm,
            pci: Mutex::new(None),
            power_button: Mutex::new(None),
            snapshot: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> VmState {
        self.lock().state
    }

    /// The VM's stop channel.
    pub fn stop_handle(&self) -> &Arc<VmStop> {
        &self.stop
    }

    pub(crate) fn set_pci(&self, root: Option<Arc<Mutex<PciRoot>>>) {
        *self.pci.lock().unwrap_or_else(|e| e.into_inner()) = root;
    }

    pub(crate) fn set_power_button(&self, hook: PowerButton) {
        *self.power_button.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Closes the vCPU gate before the vCPUs start (a restored VM).
    pub(crate) fn close_gate(&self) {
        self.gate.close();
    }

    pub(crate) fn set_snapshot_parts(&self, parts: SnapshotParts) {
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(parts);
    }

    /// Created -> Paused, for a VM restored from a snapshot: its vCPU
    /// threads just started behind the closed gate, its devices are
    /// paused, and `clock` is set when it resumes.
    pub(crate) fn booted_paused(
        &self,
        kicks: Vec<Kicker>,
        clock: kvm_clock_data,
    ) -> Result<(), LifecycleError> {
        let mut inner = self.lock();
        next_state(inner.state, Transition::Boot)?;
        inner.state = VmState::Paused;
        inner.kicks = kicks;
        inner.clock = Some(clock);
        Ok(())
    }

    /// The whole state of a Paused VM, and its memory to write: every
    /// device's section (refused, naming the device, if one cannot be
    /// saved), every vCPU, the VM's KVM state.
    pub fn capture(&self) -> Result<(SnapshotState, GuestMemoryMmap), LifecycleError> {
        let inner = self.lock();
        if inner.state != VmState::Paused {
            return Err(LifecycleError::WrongState {
                action: Transition::Snapshot,
                state: inner.state,
            });
        }
        let parts = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let Some(parts) = parts.as_ref() else {
            return Err(LifecycleError::WrongState {
                action: Transition::Snapshot,
                state: inner.state,
            });
        };
        let handles = parts
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot_handles();
        let devices = crate::registry::save_all(handles).map_err(LifecycleError::Snapshot)?;
        let vcpus = self
            .gate
            .save_vcpus(parts.vcpus, &self.stop)
            .map_err(LifecycleError::Snapshot)?;
        let clock = inner.clock.unwrap_or_default();
        let vm = crate::snapshot::vmstate::save_vm(&self.vm, parts.irqchip, clock)
            .map_err(LifecycleError::Snapshot)?;
        Ok((
            SnapshotState {
                vcpus,
                vm,
                devices,
                memory: Vec::new(),
            },
            parts.mem.clone(),
        ))
    }

    /// Created -> Running, with the vCPU threads just started.
    pub(crate) fn booted(&self, kicks: Vec<Kicker>) -> Result<(), LifecycleError> {
        let mut inner = self.lock();
        inner.state = next_state(inner.state, Transition::Boot)?;
        inner.kicks = kicks;
        Ok(())
    }

    /// The VM stopped: the state becomes Shutdown and the vCPU threads may
    /// be joined (nothing kicks them after this returns).
    pub(crate) fn finished(&self) {
        let mut inner = self.lock();
        inner.state = VmState::Shutdown;
        inner.kicks.clear();
        drop(inner);
        // The devices go down with the machine, not with the last handle.
        self.set_pci(None);
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.power_button.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.gate.open();
    }

    /// Every PCI device, by name.
    fn devices(&self) -> Vec<(String, Arc<Mutex<dyn PciDevice>>)> {
        let root = self.pci.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match root {
            Some(root) => root.lock().unwrap_or_else(|e| e.into_inner()).devices(),
            None => Vec::new(),
        }
    }

    /// Running -> Paused: parks every vCPU, quiesces every device, saves
    /// the KVM clock. On failure the VM is left running.
    pub fn pause(&self) -> Result<(), LifecycleError> {
        let mut inner = self.lock();
        let next = next_state(inner.state, Transition::Pause)?;
        emit_vm("pausing");
        self.gate.close();
        if !self
            .gate
            .wait_parked(inner.kicks.len(), &self.stop, &inner.kicks)
        {
            self.gate.open();
            return Err(LifecycleError::StoppedWhilePausing);
        }
        let devices = self.devices();
        for (i, (name, dev)) in devices.iter().enumerate() {
            let r = dev.lock().unwrap_or_else(|e| e.into_inner()).pause();
            if let Err(source) = r {
                for (_, d) in devices[..i].iter().rev() {
                    if let Err(e) = d.lock().unwrap_or_else(|e| e.into_inner()).resume() {
                        log::error!("resuming a device after a failed pause: {e}");
                    }
                }
                self.gate.open();
                return Err(LifecycleError::PauseDevice {
                    name: name.clone(),
                    source,
                });
            }
        }
        inner.clock = match self.vm.get_clock() {
            Ok(c) => Some(c),
            Err(e) => {
                for (_, d) in devices.iter().rev() {
                    let _ = d.lock().unwrap_or_else(|e| e.into_inner()).resume();
                }
                self.gate.open();
                return Err(LifecycleError::GetClock(e));
            }
        };
        inner.state = next;
        drop(inner);
        emit_vm("paused");
        Ok(())
    }

    /// Paused -> Running: the clock as it was at pause, devices restarted,
    /// vCPUs released.
    pub fn resume(&self) -> Result<(), LifecycleError> {
        let mut inner = self.lock();
        let next = next_state(inner.state, Transition::Resume)?;
        emit_vm("resuming");
        if let Some(mut clock) = inner.clock.take() {
            // Without flags KVM takes the value as is: the guest's clock
            // continues from where it stood at pause.
            clock.flags = 0;
            if let Err(e) = self.vm.set_clock(&clock) {
                inner.clock = Some(clock);
                return Err(LifecycleError::SetClock(e));
            }
        }
        for (name, dev) in self.devices() {
            let r = dev.lock().unwrap_or_else(|e| e.into_inner()).resume();
            if let Err(source) = r {
                // The VM stays paused; the device said why.
                return Err(LifecycleError::ResumeDevice { name, source });
            }
        }
        inner.state = next;
        self.gate.open();
        drop(inner);
        emit_vm("resumed");
        Ok(())
    }

    /// Asks the VM to stop with `reason` (from Running or Paused; a
    /// Created VM becomes Shutdown at once). The control thread finishes
    /// the stop; the state is Shutdown once it has.
    pub fn shutdown(&self, reason: StopReason) -> Result<(), LifecycleError> {
        let mut inner = self.lock();
        next_state(inner.state, Transition::Shutdown)?;
        if inner.state == VmState::Created {
            inner.state = VmState::Shutdown;
        }
        self.stop.request(reason);
        drop(inner);
        self.gate.open();
        Ok(())
    }

    /// Presses the power button: what the ACPI device registered with
    /// [`crate::machine::Machine::on_power_button`] does, or an error when
    /// the VM has no such device.
    pub fn power_button(&self) -> Result<(), LifecycleError> {
        let inner = self.lock();
        if inner.state != VmState::Running {
            return Err(LifecycleError::WrongState {
                action: Transition::Shutdown,
                state: inner.state,
            });
        }
        let hook = self.power_button.lock().unwrap_or_else(|e| e.into_inner());
        match hook.as_ref() {
            Some(press) => press().map_err(LifecycleError::PowerButton),
            None => Err(LifecycleError::NoPowerButton),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_follow_the_state_machine() {
        use Transition as T;
        use VmState as S;
        assert_eq!(next_state(S::Created, T::Boot).unwrap(), S::Running);
        assert_eq!(next_state(S::Running, T::Pause).unwrap(), S::Paused);
        assert_eq!(next_state(S::Paused, T::Resume).unwrap(), S::Running);
        for s in [S::Created, S::Running, S::Paused] {
            assert_eq!(next_state(s, T::Shutdown).unwrap(), S::Shutdown);
        }
        let refused = [
            (S::Running, T::Boot),
            (S::Paused, T::Boot),
            (S::Shutdown, T::Boot),
            (S::Created, T::Pause),
            (S::Paused, T::Pause),
            (S::Shutdown, T::Pause),
            (S::Created, T::Resume),
            (S::Running, T::Resume),
            (S::Shutdown, T::Resume),
            (S::Shutdown, T::Shutdown),
        ];
        for (s, t) in refused {
            let e = next_state(s, t).unwrap_err();
            assert!(e.is_wrong_state(), "{s:?} {t:?}");
        }
        assert_eq!(
            next_state(S::Running, T::Resume).unwrap_err().to_string(),
            "cannot resume a VM that is Running"
        );
    }

    #[test]
    fn a_parked_vcpu_leaves_when_the_vm_stops() {
        let gate = VcpuGate::new();
        let stop = Arc::new(VmStop::new().unwrap());
        gate.close();
        let (g, s) = (gate.clone(), stop.clone());
        let t = std::thread::spawn(move || {
            g.park(&s, 0, &mut || Err(SnapshotError::Other("not asked".into())))
        });
        assert!(gate.wait_parked(1, &stop, &[]));
        stop.request(StopReason::Shutdown);
        t.join().unwrap();
        assert!(!gate.wait_parked(1, &stop, &[]));
    }
}
