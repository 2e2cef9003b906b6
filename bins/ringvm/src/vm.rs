//! The composition root: a VM from the command line's pieces. It only
//! assembles: the machine from `vmm`, iothreads from `uring-backend`, disks
//! from `virtio`.

use std::sync::{Arc, Mutex};

use uring_backend::iothread::IoThread;
use virtio::blk::{BlockDevice, DiskConfig};
use virtio::net::{NetConfig, NetDevice};
use virtio::transport::VirtioPciDevice;
use virtio::vhost_user::{Kind, VhostUserConfig, VhostUserDevice};
use virtio::VirtioDevice;
use vmm::machine::Machine;
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

fn input(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        bad_input: true,
        error: error.into(),
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

/// Builds the VM of `plan`, runs it to its stop and reports why.
pub fn run(plan: &Plan) -> Result<RunReport, Failure> {
    let mut machine = Machine::build(&plan.vm).map_err(|e| Failure {
        bad_input: e.is_bad_input(),
        error: e.into(),
    })?;
    // Iothreads exist only when a device needs them.
    let iothreads: Vec<Arc<IoThread>> = if plan.disks.is_empty() && plan.nets.is_empty() {
        Vec::new()
    } else {
        (0..plan.iothreads)
            .map(|i| IoThread::spawn(&format!("iothread{i}"), IOTHREAD_RING_ENTRIES).map(Arc::new))
            .collect::<Result<_, _>>()
            .map_err(host)?
    };
    for t in &iothreads {
        t.set_poll(plan.iothread_poll.0, plan.iothread_poll.1);
    }
    for (i, disk) in plan.disks.iter().enumerate() {
        let name = format!("virtio-blk{i}");
        let dev = BlockDevice::new(&name, disk, &iothreads).map_err(input)?;
        add_virtio_device(&mut machine, &name, Box::new(dev))?;
    }
    let mut net_stats = Vec::new();
    for (i, net) in plan.nets.iter().enumerate() {
        let name = format!("virtio-net{i}");
        let dev = NetDevice::new(&name, net, &iothreads).map_err(input)?;
        net_stats.push((name.clone(), dev.stats_handle()));
        add_virtio_device(&mut machine, &name, Box::new(dev))?;
    }
    let (mut blk, mut net) = (0, 0);
    for cfg in &plan.vhost_user {
        let name = match cfg.kind {
            Kind::Blk => (format!("vhost-user-blk{blk}"), blk += 1).0,
            Kind::Net => (format!("vhost-user-net{net}"), net += 1).0,
        };
        let mac = cfg.mac.unwrap_or_else(virtio::net::device::random_mac);
        let dev = VhostUserDevice::new(&name, cfg, machine.memory().clone(), mac).map_err(input)?;
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
    // Devices go down with the machine, before their iothreads.
    let report = machine.run().map_err(host)?;
    if plan.iothread_stats {
        for t in &iothreads {
            let s = t.stats();
            eprintln!(
                "ringvm: {}: cpu_us={} turns={} io_uring_enter={} sqes={} cqes={}",
                t.name(),
                t.cpu_time().as_micros(),
                s.turns,
                s.enters,
                s.sqes_submitted,
                s.cqes_reaped
            );
        }
    }
    if plan.iothread_stats {
        for (name, stats) in &net_stats {
            eprintln!("ringvm: {name}: {}", stats.summary());
        }
    }
    drop(iothreads);
    Ok(report)
}
