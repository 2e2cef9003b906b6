//! The composition root: builds a VM from a [`VmConfig`], runs it to a
//! stop, and reports why it stopped. It only assembles; the work is done in
//! the modules it calls.

use std::fs::{File, OpenOptions};
use std::io::LineWriter;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::acpi::{self, AcpiConfig, IntxRoute, PciHost};
use crate::arch::{cpuid, mptable, regs};
use crate::boot::{self, BootError, Initrd, LoadedKernel, SliceReader};
use crate::bus::Bus;
use crate::coalesced::coalesce_serial;
use crate::config::{format_size, IrqChip, KernelSource, VmConfig};
use crate::control::{self, ControlError};
use crate::devices::acpi_pm::{AcpiPm, SharedAcpiPm, ACPI_PM_LEN, ACPI_PM_PORT, GED_GSI};
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
use crate::devices::i8042::{I8042, I8042_COMMAND_PORT, I8042_DATA_PORT};
use crate::devices::ioapic::{Ioapic, IOAPIC_MMIO_LEN};
use crate::devices::serial::{ConsoleSink, SerialConsole, COM1_GSI, COM1_LEN, COM1_PORT};
use crate::devices::SerialOutput;
use crate::interrupts::InterruptRouter;
use crate::layout::{ram_regions, HIGH_RAM_START, IOAPIC_START, MIN_MEMORY};
use crate::lifecycle::{LifecycleError, PowerButton, VcpuGate, VmControl};
use crate::memslots::MemorySlots;
use crate::pci::root::{
    PciConfigIo, PciEcam, ECAM_BUS0_SIZE, ECAM_START, MMIO32_END, MMIO32_START, PCI_CONFIG_ADDRESS,
    PCI_CONFIG_PORTS,
};
use crate::pci::{PciDevice, PciRoot};
use crate::registry::{DeviceRegistry, RegistryError, Resource};
use crate::snapshot::cpu::CpuStateCaps;
use crate::snapshot::dir::DirError;
use crate::snapshot::memory::RestoreMode;
use crate::snapshot::{SnapshotError, SnapshotState};
use crate::stop::{StopReason, VmStop};
use crate::vcpu::{HaltWatch, Vcpu, VcpuError};
use crate::vm::{create_guest_memory, create_shared_guest_memory, Vm, VmError};

mod setup;

pub use setup::validate;
use setup::{
    add_acpi_pm, add_legacy_devices, console_sink, create_vcpus, load_guest, mmio64_window,
    VcpuShared,
};

/// Errors that keep a VM from starting. [`MachineError::is_bad_input`]
/// separates the user's mistakes from host failures.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("--cpus must be between 1 and {max}, not {cpus}")]
    BadCpuCount { cpus: usize, max: usize },
    #[error(
        "--memory {size} is too small: at least {} is needed",
        format_size(MIN_MEMORY)
    )]
    MemoryTooSmall { size: String },
    #[error("--memory {size} is more than this host has ({host})")]
    MemoryTooLarge { size: String, host: String },
    #[error("cannot open {what} {path}")]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is not a regular file or block device")]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("kernel {path}")]
    Kernel {
        path: String,
        #[source]
        source: BootError,
    },
    #[error("setting up boot for kernel {path}")]
    Boot {
        path: String,
        #[source]
        source: BootError,
    },
    #[error("writing the ACPI tables")]
    Acpi(#[source] acpi::AcpiError),
    #[error("writing the MP table")]
    Mptable(#[source] mptable::MptableError),
    #[error("creating the VM")]
    Vm(#[source] VmError),
    #[error("setting up vCPU {index}")]
    VcpuRegs {
        index: usize,
        #[source]
        source: regs::RegsError,
    },
    #[error("setting CPUID on vCPU {index}")]
    Cpuid {
        index: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(
        "--cpuid-hide {features}: this host's KVM keeps {} visible to the guest \
         (read back after KVM_SET_CPUID2; a software KVM such as kvm_pvm passes the \
         host CPU's own features through); hide {} inside the guest instead \
         (Linux: clearcpuid=)",
        .pronoun,
        .pronoun
    )]
    CpuidNotHidden {
        features: String,
        pronoun: &'static str,
    },
    #[error("starting vCPU")]
    Vcpu(#[source] VcpuError),
    #[error("adding a device")]
    Registry(#[source] RegistryError),
    #[error("creating an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("control loop")]
    Control(#[source] ControlError),
    #[error("PCI")]
    Pci(#[source] crate::pci::PciRootError),
    #[error("starting the VM")]
    Lifecycle(#[source] LifecycleError),
    #[error("restoring the snapshot")]
    Snapshot(#[source] SnapshotError),
    #[error("reading the snapshot")]
    SnapshotDir(#[source] DirError),
    #[error("the snapshot has {saved} vCPUs; the configuration says {configured}")]
    SnapshotCpus { saved: usize, configured: usize },
}

impl MachineError {
    /// Whether the error is in what the user gave (exit code 2) rather than
    /// on the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            MachineError::BadCpuCount { .. }
                | MachineError::MemoryTooSmall { .. }
                | MachineError::MemoryTooLarge { .. }
                | MachineError::Open { .. }
                | MachineError::NotAFile { .. }
                | MachineError::Kernel { .. }
                | MachineError::Boot { .. }
                | MachineError::CpuidNotHidden { .. }
                | MachineError::SnapshotCpus { .. }
        ) || matches!(self, MachineError::Vm(VmError::TooManyVcpus { .. }))
            || matches!(self, MachineError::Snapshot(e) if e.is_bad_input())
            || matches!(self, MachineError::SnapshotDir(e) if e.is_bad_input())
    }
}

/// What happened in a run.
#[derive(Debug)]
pub struct RunReport {
    pub reason: StopReason,
    /// The boot protocol used, e.g. "ELF, PVH boot protocol".
    pub protocol: &'static str,
    /// From the start of `run` to the VM's stop.
    pub elapsed: Duration,
}

/// Size of the 64-bit PCI BAR window above RAM.
const MMIO64_SIZE: u64 = 64 << 30;

/// A VM built from a [`VmConfig`] and ready to run: memory loaded, vCPUs
/// configured, legacy devices on their buses. PCI devices are added with
/// [`Machine::add_pci_device`] before [`Machine::run`].
pub struct Machine {
    start: Instant,
    mem: GuestMemoryMmap,
    vm: Vm,
    stop: Arc<VmStop>,
    registry: Arc<Mutex<DeviceRegistry>>,
    router: Arc<InterruptRouter>,
    slots: Arc<MemorySlots>,
    pci: Option<Arc<Mutex<PciRoot>>>,
    serial: Option<Arc<Mutex<SerialConsole>>>,
    vcpus: Vec<Vcpu>,
    halt: Arc<HaltWatch>,
    protocol: &'static str,
    serial_input: bool,
    memory_size: u64,
    cpus: usize,
    irqchip: IrqChip,
    /// The ACPI registers (and power button) when the VM has ACPI.
    acpi_pm: Option<SharedAcpiPm>,
    /// PCI INTx lines wired to IOAPIC inputs, for the DSDT's `_PRT`.
    intx_routes: Vec<IntxRoute>,
    /// Run once every vCPU has stopped (devices that must give back what
    /// they hold on the host, like an assigned PCI function).
    stop_hooks: Vec<Box<dyn FnOnce() + Send>>,
    control: Arc<VmControl>,
    /// A snapshot's state, until [`Machine::restore_state`] loads it.
    restore: Option<SnapshotState>,
    /// Built from a snapshot: starts Paused.
    restored: bool,
    /// The snapshot's KVM clock, set when the restored VM resumes.
    restore_clock: Option<kvm_bindings::kvm_clock_data>,
}

/// A snapshot to build a machine from.
pub struct RestoreFrom<'a> {
    pub dir: &'a Path,
    pub mode: RestoreMode,
}

impl Machine {
    /// Builds the VM described by `config`.
    pub fn build(config: &VmConfig) -> Result<Machine, MachineError> {
        Self::build_with(config, None)
    }

    /// Builds the VM described by `config` (the snapshot's `config.json`)
    /// around the snapshot's memory, checked against the configuration.
    /// Add the same devices as the original VM had, then call
    /// [`Machine::restore_state`] before [`Machine::start`].
    pub fn build_restored(
        config: &VmConfig,
        from: RestoreFrom<'_>,
    ) -> Result<Machine, MachineError> {
        Self::build_with(config, Some(from))
    }

    fn build_with(
        config: &VmConfig,
        from: Option<RestoreFrom<'_>>,
    ) -> Result<Machine, MachineError> {
        let start = Instant::now();
        validate(config)?;
        let (mem, state, entry, protocol) = match from {
            None => {
                let mem = if config.shared_memory {
                    create_shared_guest_memory(config.memory)
                } else {
                    create_guest_memory(config.memory)
                }
                .map_err(MachineError::Vm)?;
                let (entry, protocol) = load_guest(config, &mem)?;
                (mem, None, Some(entry), protocol)
            }
            Some(from) => {
                let state = crate::snapshot::dir::read_state(from.dir)
                    .map_err(MachineError::SnapshotDir)?;
                if state.vcpus.len() != config.cpus {
                    return Err(MachineError::SnapshotCpus {
                        saved: state.vcpus.len(),
                        configured: config.cpus,
                    });
                }
                let layout: Vec<(u64, u64)> = ram_regions(config.memory)
                    .into_iter()
                    .map(|(a, l)| (a.0, l))
                    .collect();
                let mem = crate::snapshot::memory::restore_memory(
                    from.dir,
                    &state.memory,
                    &layout,
                    from.mode,
                )
                .map_err(|e| MachineError::SnapshotDir(DirError::Memory(e)))?;
                (mem, Some(state), None, "restored from a snapshot")
            }
        };
        let sink = console_sink(&config.serial)?;

        let vm = Vm::new(&mem, config.cpus, config.irqchip).map_err(MachineError::Vm)?;
        let stop = Arc::new(VmStop::new().map_err(MachineError::EventFd)?);
        let (pio, mmio) = (Arc::new(Bus::new()), Arc::new(Bus::new()));
        let mut registry = DeviceRegistry::new(pio.clone(), mmio.clone());
        let serial = add_legacy_devices(&vm, &mut registry, &stop, sink)?;
        let acpi_pm = if config.acpi {
            Some(add_acpi_pm(&vm, &mut registry, &stop)?)
        } else {
            None
        };
        let halt = HaltWatch::new(config.cpus);
        let gate = VcpuGate::new();
        let caps = Arc::new(CpuStateCaps::probe(vm.kvm()).map_err(MachineError::Snapshot)?);
        let router = match config.irqchip {
            IrqChip::Kernel => InterruptRouter::new(vm.fd().clone()),
            IrqChip::Split => {
                let router = InterruptRouter::new_split(vm.fd().clone());
                let ioapic = Arc::new(Mutex::new(Ioapic::new(router.clone())));
                registry
                    .add(
                        "ioapic",
                        Some(ioapic.clone()),
                        vec![Resource::Mmio {
                            base: IOAPIC_START,
                            len: IOAPIC_MMIO_LEN,
                        }],
                    )
                    .map_err(MachineError::Registry)?;
                registry
                    .set_snapshot("ioapic", ioapic)
                    .map_err(MachineError::Registry)?;
                router
            }
        };
        let shared = VcpuShared {
            stop: &stop,
            halt: &halt,
            gate: &gate,
            interrupts: &router,
            caps: &caps,
        };
        let mut vcpus = create_vcpus(&vm, config, &mem, entry, (&pio, &mmio), shared)?;
        if let Some(serial) = &serial {
            coalesce_serial(&vm, &mut vcpus, serial);
        }
        // Guest RAM holds the first slots.
        let slots = MemorySlots::new(
            vm.fd().clone(),
            mem.num_regions() as u32,
            vm.memslot_limit(),
        );
        let control = VmControl::new(stop.clone(), gate, vm.fd().clone());
        // With ACPI, the power button is the GED's: the guest's handler
        // notifies its power button device and an ACPI-aware OS shuts down.
        if let Some(pm) = &acpi_pm {
            let pm = pm.clone();
            control.set_power_button(Box::new(move || {
                pm.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .press_power_button()
                    .map_err(|e| format!("raising the GED interrupt: {e}"))
            }));
        }
        Ok(Machine {
            control,
            start,
            mem,
            vm,
            stop,
            registry: Arc::new(Mutex::new(registry)),
            router,
            slots,
            pci: None,
            serial,
            vcpus,
            halt,
            protocol,
            serial_input: config.serial_input && config.serial == SerialOutput::Stdio,
            memory_size: config.memory,
            cpus: config.cpus,
            irqchip: config.irqchip,
            acpi_pm,
            intx_routes: Vec::new(),
            stop_hooks: Vec::new(),
            restored: state.is_some(),
            restore: state,
            restore_clock: None,
        })
    }

    /// Loads the snapshot given to [`Machine::build_restored`] into the
    /// machine as built so far (every device added): vCPUs, the VM's
    /// interrupt controllers, every device's section by name (the devices
    /// must be exactly the snapshot's), then the PCI BARs where the
    /// restored configuration spaces put them. Nothing runs yet.
    pub fn restore_state(&mut self) -> Result<(), MachineError> {
        let Some(state) = self.restore.take() else {
            return Ok(());
        };
        let snap = MachineError::Snapshot;
        let handles = self
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .snapshot_handles();
        crate::registry::restore_all(handles, &state.devices).map_err(snap)?;
        if let Some(root) = &self.pci {
            root.lock()
                .unwrap_or_else(|e| e.into_inner())
                .refresh_decoding();
        }
        crate::snapshot::vmstate::restore_vm(self.vm.fd(), self.irqchip, &state.vm)
            .map_err(snap)?;
        for (vcpu, vs) in self.vcpus.iter().zip(&state.vcpus) {
            crate::snapshot::cpu::restore_vcpu(&vcpu.fd, vcpu.index, vs, &vcpu.state_caps)
                .map_err(snap)?;
        }
        self.restore_clock = Some(state.vm.clock);
        Ok(())
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn vm_fd(&self) -> &Arc<kvm_ioctls::VmFd> {
        self.vm.fd()
    }

    /// The owner of GSI routes, for MSI vectors.
    pub fn interrupts(&self) -> &Arc<InterruptRouter> {
        &self.router
    }

    /// The allocator of KVM memory slots for device memory.
    pub fn memory_slots(&self) -> &Arc<MemorySlots> {
        &self.slots
    }

    /// The VM's stop channel (devices report fatal host errors through it).
    pub fn stop_handle(&self) -> &Arc<VmStop> {
        &self.stop
    }

    pub fn registry(&self) -> &Arc<Mutex<DeviceRegistry>> {
        &self.registry
    }

    /// The VM's lifecycle handle (state Created until [`Machine::start`]).
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// The PCI root, if a PCI device was added.
    pub fn pci(&self) -> Option<&Arc<Mutex<PciRoot>>> {
        self.pci.as_ref()
    }

    /// What pressing the power button does ([`VmControl::power_button`]);
    /// without this, the VM has no power button.
    pub fn on_power_button(&mut self, press: PowerButton) {
        self.control.set_power_button(press);
    }

    /// The PCI root, created with its config ports and ECAM on first use.
    fn pci_root(&mut self) -> Result<Arc<Mutex<PciRoot>>, MachineError> {
        if let Some(root) = &self.pci {
            return Ok(root.clone());
        }
        let (mmio64, _) = mmio64_window(self.memory_size);
        let root = Arc::new(Mutex::new(PciRoot::new(
            self.registry.clone(),
            mmio64,
            MMIO64_SIZE,
        )));
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        reg.add(
            "pci-config-io",
            Some(Arc::new(Mutex::new(PciConfigIo::new(&root)))),
            vec![Resource::Pio {
                base: PCI_CONFIG_ADDRESS,
                len: PCI_CONFIG_PORTS,
            }],
        )
        .map_err(MachineError::Registry)?;
        reg.set_snapshot(
            "pci-config-io",
            Arc::new(Mutex::new(crate::pci::root::PciRootSnapshot(
                Arc::downgrade(&root),
            ))),
        )
        .map_err(MachineError::Registry)?;
        reg.add(
            "pci-ecam",
            Some(Arc::new(Mutex::new(PciEcam::new(&root)))),
            vec![Resource::Mmio {
                base: ECAM_START,
                len: ECAM_BUS0_SIZE,
            }],
        )
        .map_err(MachineError::Registry)?;
        drop(reg);
        self.pci = Some(root.clone());
        Ok(root)
    }

    /// Plugs a PCI device into bus 0; returns its slot.
    pub fn add_pci_device(
        &mut self,
        name: &str,
        dev: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<u8, MachineError> {
        let root = self.pci_root()?;
        let slot = root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(name, dev)
            .map_err(MachineError::Pci)?;
        Ok(slot)
    }

    /// Unplugs the PCI device in `slot`: its slot, BARs and every other
    /// registry claim are released. Returns the device, which the caller
    /// drops (or detaches) to release what it holds itself.
    pub fn remove_pci_device(&mut self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        let root = self.pci.as_ref()?;
        let dev = root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove_device(slot);
        dev
    }

    /// Records that the INTx pin `pin` (0 = INTA#) of the device in `slot`
    /// raises IOAPIC input `gsi`, for the ACPI routing table.
    pub fn add_intx_route(&mut self, slot: u8, pin: u8, gsi: u32) {
        self.intx_routes.push(IntxRoute { slot, pin, gsi });
    }

    /// Writes the ACPI tables for the machine as built so far.
    fn write_acpi_tables(&self) -> Result<(), MachineError> {
        let (mmio64, mmio64_end) = mmio64_window(self.memory_size);
        let cfg = AcpiConfig {
            cpus: self.cpus as u8,
            pic: self.irqchip == IrqChip::Kernel,
            serial: self.serial.is_some(),
            pci: self.pci.as_ref().map(|_| PciHost {
                ecam: ECAM_START,
                mmio32: (MMIO32_START, MMIO32_END),
                mmio64: (mmio64, mmio64_end),
            }),
            intx: self.intx_routes.clone(),
        };
        acpi::write_tables(&self.mem, &cfg).map_err(MachineError::Acpi)?;
        Ok(())
    }

    /// Registers `hook` to run after every vCPU has stopped, before
    /// [`Machine::run`] returns.
    pub fn on_stop(&mut self, hook: impl FnOnce() + Send + 'static) {
        self.stop_hooks.push(Box::new(hook));
    }

    /// Starts the vCPUs: the VM goes from Created to Running. The caller
    /// (the control thread) then waits in [`RunningMachine::wait`]; the
    /// lifecycle is driven meanwhile through [`Machine::control`].
    ///
    /// Termination signals must already be blocked (see
    /// [`control::Signals::block`]) so that no vCPU thread takes them.
    pub fn start(self) -> Result<RunningMachine, MachineError> {
        let state = self.control.state();
        if state != crate::lifecycle::VmState::Created {
            return Err(MachineError::Lifecycle(LifecycleError::WrongState {
                action: crate::lifecycle::Transition::Boot,
                state,
            }));
        }
        // A restored VM's tables are in its memory already.
        if self.acpi_pm.is_some() && !self.restored {
            self.write_acpi_tables()?;
        }
        if self.restore.is_some() {
            return Err(MachineError::Snapshot(SnapshotError::Other(
                "the snapshot's state was not loaded before the start".into(),
            )));
        }
        if self.restored {
            // Every vCPU parks before its first KVM_RUN.
            self.control.close_gate();
        }
        self.control
            .set_snapshot_parts(crate::lifecycle::SnapshotParts {
                registry: self.registry.clone(),
                mem: self.mem.clone(),
                irqchip: self.irqchip,
                vcpus: self.vcpus.len(),
            });
        let stop = self.stop.clone();
        let mut handles = Vec::with_capacity(self.vcpus.len());
        let mut spawn_error = None;
        for vcpu in self.vcpus {
            match vcpu.spawn() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    spawn_error = Some(e);
                    stop.request(StopReason::HostError {
                        message: "could not start every vCPU".into(),
                    });
                    break;
                }
            }
        }
        self.control.set_pci(self.pci.clone());
        let kicks = handles.iter().map(|h| h.kicker()).collect();
        let booted = match self.restore_clock {
            Some(clock) if self.restored => self.control.booted_paused(kicks, clock),
            _ => self.control.booted(kicks),
        };
        let running = RunningMachine {
            start: self.start,
            stop,
            serial: self.serial,
            handles,
            halt: self.halt,
            protocol: self.protocol,
            serial_input: self.serial_input,
            stop_hooks: self.stop_hooks,
            control: self.control,
            spawn_error,
            _mem: self.mem,
            _vm: self.vm,
            _registry: self.registry,
            _router: self.router,
            _slots: self.slots,
            _pci: self.pci,
        };
        if let Err(e) = booted {
            running.stop.request(StopReason::HostError {
                message: e.to_string(),
            });
            let _ = running.wait(None);
            return Err(MachineError::Lifecycle(e));
        }
        crate::events::emit("vm", if self.restored { "restored" } else { "booted" }, &[]);
        Ok(running)
    }

    /// Runs the VM until it stops, and says why (start, then wait, with
    /// termination signals turned into a stop).
    pub fn run(self) -> Result<RunReport, MachineError> {
        let signals = control::Signals::block().map_err(MachineError::Control)?;
        let result = self.start()?.wait(Some(&signals));
        drop(signals);
        result
    }
}

/// A started VM, held by the control thread until it stops.
pub struct RunningMachine {
    start: Instant,
    stop: Arc<VmStop>,
    serial: Option<Arc<Mutex<SerialConsole>>>,
    handles: Vec<crate::vcpu::VcpuHandle>,
    halt: Arc<HaltWatch>,
    protocol: &'static str,
    serial_input: bool,
    stop_hooks: Vec<Box<dyn FnOnce() + Send>>,
    control: Arc<VmControl>,
    spawn_error: Option<VcpuError>,
    // What the vCPUs and devices use, kept until they have stopped; the
    // PCI root goes last of the devices (dropping it drops them).
    _mem: GuestMemoryMmap,
    _vm: Vm,
    _registry: Arc<Mutex<DeviceRegistry>>,
    _router: Arc<InterruptRouter>,
    _slots: Arc<MemorySlots>,
    _pci: Option<Arc<Mutex<PciRoot>>>,
}

impl RunningMachine {
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// Waits until the VM stops (forwarding stdin to the serial port when
    /// asked, and turning `signals` into a stop), brings every vCPU home,
    /// runs the stop hooks, and says why it stopped. The state is then
    /// Shutdown.
    pub fn wait(self, signals: Option<&control::Signals>) -> Result<RunReport, MachineError> {
        let stop = self.stop.clone();
        let stdin_to = match (&self.serial, self.serial_input) {
            (Some(s), true) => Some(s.clone()),
            _ => None,
        };
        let loop_result = control::wait_for_stop(
            &stop,
            signals,
            stdin_to.as_ref(),
            (&self.halt, &self.handles),
        );
        let elapsed = self.start.elapsed();
        if let Err(e) = &loop_result {
            stop.request(StopReason::HostError {
                message: e.to_string(),
            });
        }
        // Nothing kicks the vCPU threads once the lifecycle is Shutdown;
        // parked ones leave the gate.
        self.control.finished();
        control::stop_vcpus(self.handles);
        for hook in self.stop_hooks {
            hook();
        }
        if let Some(s) = &self.serial {
            s.lock().unwrap_or_else(|e| e.into_inner()).flush();
        }
        if let Some(e) = self.spawn_error {
            return Err(MachineError::Vcpu(e));
        }
        let reason = stop.reason().unwrap_or(StopReason::HostError {
            message: "VM stopped without a reason".into(),
        });
        crate::events::emit(
            "vm",
            "shutdown",
            &[
                ("reason", &reason.to_string()),
                ("exit_code", &reason.exit_code().to_string()),
            ],
        );
        Ok(RunReport {
            reason,
            protocol: self.protocol,
            elapsed,
        })
    }
}

/// Builds the VM described by `config`, runs it until it stops, and says why.
pub fn run(config: &VmConfig) -> Result<RunReport, MachineError> {
    Machine::build(config)?.run()
}
