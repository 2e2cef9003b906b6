//! The composition root: a VM from the command line's pieces. It only
//! assembles: the machine from `vmm`, iothreads from `uring-backend`, disks
//! from `virtio`.

use std::sync::{Arc, Mutex, Weak};

use uring_backend::iothread::IoThread;
use virtio::blk::{BlockDevice, BlockStats, DiskConfig};
use virtio::net::{NetConfig, NetDevice, NetStats};
use virtio::transport::VirtioPciDevice;
use virtio::vhost_user::{Kind, VhostUserConfig, VhostUserDevice};
use virtio::VirtioDevice;
use vmm::machine::Machine;
use vmm::registry::DeviceRegistry;
use vmm::{RunReport, VmConfig};

/// Ring entries per iothread.
const IOTHREAD_RING_ENTRIES: u32 = 512;

/// A VM to run.
pub struct Plan {
    pub vm: VmConfig,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// Disks and NICs served by vhost-user backends.
    pub vhost_user: Vec<VhostUserConfig>,
    /// PCI functions passed through (kernel VFIO or vfio-user).
    pub passthrough: Vec<passthrough::Source>,
    pub iothreads: usize,
    /// How long idle iothreads busy-poll before sleeping, and when.
    pub iothread_poll: (std::time::Duration, uring_backend::executor::PollWhen),
    /// Print each iothread's CPU time and ring counters when the VM stops.
    pub iothread_stats: bool,
    /// Host CPUs each iothread pins itself to, by index.
    pub iothread_affinity: Vec<Option<vmm::affinity::CpuSet>>,
    /// `--cpuid-hide` as given (for the configuration's JSON).
    pub cpuid_hide: Vec<String>,
    /// Build the VM from this snapshot (its state and memory).
    pub restore: Option<crate::cli::RestoreSpec>,
}

/// A failure, and whether it is the user's input (exit code 2) rather than
/// the host.
pub struct Failure {
    pub bad_input: bool,
    pub error: anyhow::Error,
}

fn host(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        bad_input: false,
        error: error.into(),
    }
}

/// A device that could not be made: the user's input (a missing file, a
/// bad TAP name: exit code 2) unless the host ran out of descriptors,
/// memory or threads (a host error).
fn device_failure(error: impl Into<anyhow::Error>) -> Failure {
    let error = error.into();
    let exhausted = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|n| matches!(n, libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN))
    });
    Failure {
        bad_input: !exhausted,
        error,
    }
}

/// Puts `dev` on the PCI bus behind a virtio-pci transport.
fn add_virtio_device(
    machine: &mut Machine,
    name: &str,
    dev: Box<dyn VirtioDevice>,
) -> Result<(), Failure> {
    let pci = VirtioPciDevice::new(
        name,
        dev,
        machine.vm_fd().clone(),
        machine.interrupts(),
        machine.memory().clone(),
    )
    .map_err(host)?;
    machine
        .add_pci_device(name, Arc::new(Mutex::new(pci)))
        .map_err(host)?;
    Ok(())
}

/// What outlives the machine's build and the API reads while the VM
/// runs: iothreads (dropped after the machine) and device counters.
pub struct Resources {
    pub iothreads: Vec<Arc<IoThread>>,
    pub disks: Vec<(String, Arc<BlockStats>)>,
    pub nets: Vec<(String, Arc<NetStats>)>,
    /// Held weakly: the registry (and the devices in it) go down with the
    /// machine.
    pub registry: Weak<Mutex<DeviceRegistry>>,
}

/// A VM built and not started (state Created).
pub struct Built {
    pub machine: Machine,
    pub resources: Arc<Resources>,
}

/// Builds the VM of `plan`: machine, iothreads, devices.
pub fn build(plan: &Plan) -> Result<Built, Failure> {
    // Threads devices start on their own take this mode too.
    vmm::seccomp::set_default_mode(plan.vm.seccomp);
    let machine_err = |e: vmm::MachineError| Failure {
        bad_input: e.is_bad_input(),
        error: e.into(),
    };
    let mut machine = match &plan.restore {
        None => Machine::build(&plan.vm),
        Some(r) => Machine::build_restored(
            &plan.vm,
            vmm::machine::RestoreFrom {
                dir: &r.dir,
                mode: r.mode,
            },
        ),
    }
    .map_err(machine_err)?;
    // Iothreads exist only when a device needs them.
    let iothreads: Vec<Arc<IoThread>> = if plan.disks.is_empty() && plan.nets.is_empty() {
        Vec::new()
    } else {
        let mode = plan.vm.seccomp;
        (0..plan.iothreads)
            .map(|i| {
                let affinity = plan.iothread_affinity.get(i).cloned().flatten();
                let sandbox: uring_backend::iothread::Sandbox = Box::new(move || {
                    if let Some(set) = affinity {
                        set.apply_to_current_thread(&format!("iothread {i}"))
                            .map_err(|e| vmm::error_line(&e))?;
                    }
                    vmm::seccomp::apply(vmm::seccomp::ThreadKind::IoThread, mode)
                        .map_err(|e| format!("{e:#}"))?;
                    vmm::seccomp::test_call(vmm::seccomp::ThreadKind::IoThread);
                    Ok(())
                });
                IoThread::spawn_sandboxed(
                    &format!("iothread{i}"),
                    IOTHREAD_RING_ENTRIES,
                    Some(sandbox),
                )
                .map(Arc::new)
            })
            .collect::<Result<_, _>>()
            .map_err(host)?
    };
    for t in &iothreads {
        t.set_poll(plan.iothread_poll.0, plan.iothread_poll.1);
    }
    let mut disks = Vec::new();
    for (i, disk) in plan.disks.iter().enumerate() {
        let name = format!("virtio-blk{i}");
        let dev = BlockDevice::new(&name, disk, &iothreads).map_err(device_failure)?;
        disks.push((name.clone(), dev.stats_handle()));
        add_virtio_device(&mut machine, &name, Box::new(dev))?;
    }
    let mut nets = Vec::new();
    for (i, net) in plan.nets.iter().enumerate() {
        let name = format!("virtio-net{i}");
        let dev = NetDevice::new(&name, net, &iothreads).map_err(device_failure)?;
        nets.push((name.clone(), dev.stats_handle()));
        add_virtio_device(&mut machine, &name, Box::new(dev))?;
    }
    let (mut blk, mut net) = (0, 0);
    for cfg in &plan.vhost_user {
        let name = match cfg.kind {
            Kind::Blk => (format!("vhost-user-blk{blk}"), blk += 1).0,
            Kind::Net => (format!("vhost-user-net{net}"), net += 1).0,
        };
        let mac = cfg.mac.unwrap_or_else(virtio::net::device::random_mac);
        let dev = VhostUserDevice::new(&name, cfg, machine.memory().clone(), mac)
            .map_err(device_failure)?;
        add_virtio_device(&mut machine, &name, Box::new(dev))?;
    }
    for (i, source) in plan.passthrough.iter().enumerate() {
        passthrough::attach(&mut machine, &format!("passthrough{i}"), source).map_err(|e| {
            Failure {
                bad_input: e.is_bad_input(),
                error: e.into(),
            }
        })?;
    }
    // A snapshot's state goes into the devices just built, before any
    // vCPU runs.
    machine.restore_state().map_err(machine_err)?;
    let registry = Arc::downgrade(machine.registry());
    Ok(Built {
        machine,
        resources: Arc::new(Resources {
            iothreads,
            disks,
            nets,
            registry,
        }),
    })
}

/// Prints what `--iothread-stats` asks for.
pub fn print_stats(res: &Resources) {
    for t in &res.iothreads {
        eprintln!("ringvm: {}", t.stats_line());
    }
    for (name, stats) in &res.nets {
        eprintln!("ringvm: {name}: {}", stats.summary());
    }
}

/// Builds the VM of `plan`, runs it to its stop and reports why.
pub fn run(plan: &Plan) -> Result<RunReport, Failure> {
    let built = build(plan)?;
    let signals = vmm::control::Signals::block().map_err(host)?;
    // Devices go down with the machine, before their iothreads.
    let running = built.machine.start().map_err(host)?;
    if plan.restore.as_ref().is_some_and(|r| r.resume) {
        if let Err(e) = running.control().resume() {
            running
                .control()
                .stop_handle()
                .request(vmm::StopReason::HostError {
                    message: format!("resuming the restored VM: {e}"),
                });
        }
    }
    // One VM per process here: the control thread is sandboxed once every
    // vCPU runs (with an API, the thread that builds VMs stays unfiltered).
    if let Err(e) = vmm::seccomp::apply(vmm::seccomp::ThreadKind::Vmm, plan.vm.seccomp) {
        running
            .control()
            .stop_handle()
            .request(vmm::StopReason::HostError {
                message: format!("{e:#}"),
            });
    }
    vmm::seccomp::test_call(vmm::seccomp::ThreadKind::Vmm);
    let report = running.wait(Some(&signals)).map_err(host)?;
    if plan.iothread_stats {
        print_stats(&built.resources);
    }
    drop(built.resources);
    Ok(report)
}
