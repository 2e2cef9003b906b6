//! Command-line definitions and their translation into a `VmConfig`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use vmm::arch::cpuid::FeatureBit;
use vmm::config::IrqChip;
use vmm::devices::SerialOutput;
use vmm::{parse_size, KernelSource, VmConfig};

use crate::vm::Plan;
use crate::BUILTIN_GUEST;
use virtio::blk::DiskConfig;
use virtio::net::NetConfig;
use virtio::vhost_user::{is_vhost_user, Kind, VhostUserConfig};

/// ringvm: a KVM virtual machine monitor whose device backends run on io_uring.
///
/// With no arguments, ringvm boots its built-in test guest and reports what
/// happened.
#[derive(Parser, Debug)]
#[command(version, propagate_version = true, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

pub const EXIT_CODES: &str = "\
Exit codes:
  0-99  the guest's own status, written to the debug-exit port (0xf4)
  2     bad command line, configuration, kernel or initrd
  100   the guest wrote a debug-exit status above 99
  101   the guest shut down
  102   the guest asked for a reset (i8042 or KVM reset event)
  103   a vCPU triple-faulted
  104   KVM internal error, e.g. an instruction KVM cannot emulate
  105   host-side error (KVM, threads, I/O) after the VM was built
  106   ringvm was stopped by SIGINT, SIGTERM or SIGHUP
  107   the guest halted with interrupts disabled on every vCPU (dead)
  108   an API request stopped the VM (vm.shutdown) under `ringvm run`
  109   a ringvm thread made a system call its seccomp allow-list forbids";

#[derive(Subcommand, Debug)]
// Parsed once per run; boxing the arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Boot a kernel in a new VM and run it until it stops.
    Run(RunArgs),
    /// Start the VMM with no VM and serve the API until `vmm.shutdown`
    /// (a VM is made with `vm.create` and started with `vm.boot`).
    Serve(ServeArgs),
    /// Send one request to a VMM's API socket and print the answer's JSON.
    Remote(RemoteArgs),
    /// Write the built-in guest's ELF image to a file (it also boots under
    /// `qemu-system-x86_64 -kernel FILE`).
    BuiltinGuest {
        /// Where to write the ELF image.
        #[arg(long, short, value_name = "PATH")]
        output: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Where to create the API socket (mode 0600; a stale socket there is
    /// replaced, anything else is refused).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Write lifecycle events as JSON lines: `path=PATH` (appended) or
    /// `fd=N` (an open file descriptor).
    #[arg(long, value_name = "path=PATH|fd=N")]
    pub event_monitor: Option<String>,
    /// Print each iothread's counters when a VM stops.
    #[arg(long)]
    pub iothread_stats: bool,
    /// Seccomp filters for the VMM's threads (API, VM-building, main) and
    /// for every VM it creates, as `ringvm run --seccomp`.
    #[arg(long, value_name = "true|false|log", default_value = "true",
          value_parser = ["true", "false", "log"])]
    pub seccomp: String,
}

#[derive(Args, Debug)]
pub struct RemoteArgs {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// ping, info, counters, pause, resume, shutdown, reboot,
    /// power-button, create FILE.json, boot, delete, shutdown-vmm,
    /// snapshot file:///DIR, restore file:///DIR.
    #[arg(value_name = "COMMAND")]
    pub command: String,
    /// The command's argument (create: the VM configuration file).
    #[arg(value_name = "ARG")]
    pub args: Vec<String>,
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Kernel to boot: a bzImage, an ELF vmlinux, a PVH ELF (32- or
    /// 64-bit), or `builtin` for the built-in test guest (not with
    /// `--restore`).
    #[arg(long, value_name = "PATH|builtin", default_value = "")]
    pub kernel: String,

    /// Restore a VM from a snapshot directory instead of booting one:
    /// `source=DIR[,resume=on][,memory_restore_mode=ondemand|copy]`. The
    /// VM (CPUs, memory, disks, NICs, command line) is the snapshot's
    /// `config.json`; it comes up Paused (resume it with `vm.resume`
    /// through `--api-socket`) unless `resume=on`. `ondemand` (default)
    /// maps the memory files copy-on-write: they must not change while
    /// the VM runs.
    #[arg(long, value_name = "source=DIR[,...]")]
    pub restore: Option<String>,

    /// With `--restore`: a new path for one of the snapshot's disks, by
    /// device name: `virtio-blk0=/new/disk.img` (repeatable).
    #[arg(long, value_name = "NAME=PATH")]
    pub disk_path: Vec<String>,

    /// With `--restore`: a new TAP for one of the snapshot's NICs, by
    /// device name: `virtio-net0=TAPNAME` or
    /// `virtio-net0=ip=A.B.C.D,mask=A.B.C.D` (repeatable).
    #[arg(long, value_name = "NAME=TAP")]
    pub net_tap: Vec<String>,

    /// Initial ramdisk, loaded high in low memory (Linux: initrd; PVH:
    /// module 0).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line, passed exactly as given.
    #[arg(
        long,
        value_name = "STRING",
        default_value = "",
        allow_hyphen_values = true
    )]
    pub cmdline: String,

    /// Guest RAM: a byte count with an optional K, M, G or T suffix
    /// (binary units). RAM above 3 GiB is placed above 4 GiB.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "512M",
        allow_hyphen_values = true
    )]
    pub memory: String,

    /// Number of vCPUs, one host thread each.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: usize,

    /// Where the COM1 serial port (0x3f8) goes: `stdio` (output to
    /// stdout, input from stdin), `file=PATH` (appended), or `off` (no
    /// serial device).
    #[arg(long, value_name = "stdio|file=PATH|off", default_value = "stdio")]
    pub serial: String,

    /// Hide CPUID features from the guest: names such as `avx2`,
    /// `x2apic`, `tsc-deadline`, or raw bits as LEAF[.SUBLEAF].REG:BIT
    /// (e.g. `0x7.0.ebx:5`). Comma-separated or repeated.
    #[arg(long, value_name = "FEATURE", value_delimiter = ',')]
    pub cpuid_hide: Vec<String>,

    /// A virtio-blk disk (repeatable):
    /// `path=PATH[,readonly=on][,direct=on][,queues=N][,queue_size=N][,serial=ID][,iothread=I[:J...]][,engine=auto|uring|sync]`.
    /// `direct=on` opens the file with O_DIRECT; `iothread` lists the
    /// iothreads its queues are spread over (default: all). Or a disk
    /// served by a vhost-user backend:
    /// `vhost_user=on,socket=PATH[,queues=N][,queue_size=N][,reconnect=on]`
    /// (guest RAM is then shared memory).
    #[arg(long, value_name = "path=PATH[,...]")]
    pub disk: Vec<String>,

    /// Interrupt controllers: `split` (default: local APICs in KVM, the
    /// IOAPIC in ringvm with level-triggered lines through EOI exits, no
    /// PIC or PIT: much faster VM creation and teardown) or `kernel`
    /// (KVM's PIC, IOAPIC and PIT, for guests that need the PIT or the
    /// 8259s).
    #[arg(long, value_name = "split|kernel", default_value = "split",
          value_parser = ["split", "kernel"])]
    pub irqchip: String,

    /// ACPI tables (MADT, FADT, DSDT, MCFG; found through the PVH start
    /// info, the Linux boot parameters and the BIOS area) with ACPI
    /// power-off, reset and a power button. `off` leaves the MP table
    /// alone to describe the machine.
    #[arg(long, value_name = "on|off", default_value = "on",
          value_parser = ["on", "off"])]
    pub acpi: String,

    /// Seccomp filters, one allow-list per thread kind (vCPU, iothread,
    /// control thread, API): `true` stops ringvm (exit code 109, naming the
    /// thread and the call) on a system call outside the list, `log` lets
    /// it through and has the kernel log it (dmesg), `false` installs none.
    #[arg(long, value_name = "true|false|log", default_value = "true",
          value_parser = ["true", "false", "log"])]
    pub seccomp: String,

    /// A virtio-net device (repeatable): `tap=NAME[,mac=MAC][,queues=N]`
    /// attaches to an existing TAP (created with `multi_queue` for N > 1);
    /// `ip=A.B.C.D,mask=A.B.C.D[,mac=MAC][,queues=N]` creates a TAP and
    /// gives the host side that address. Also `queue_size=N` and
    /// `iothread=I[:J...]`. Or a NIC served by a vhost-user backend:
    /// `vhost_user=on,socket=PATH[,mac=MAC][,queue_size=N][,reconnect=on]`.
    #[arg(long, value_name = "tap=NAME|ip=IP,mask=MASK[,...]")]
    pub net: Vec<String>,

    /// A host PCI function passed through with kernel VFIO (repeatable):
    /// `path=/sys/bus/pci/devices/DDDD:BB:DD.F`, bound to vfio-pci.
    #[arg(long, value_name = "path=SYSFS_PATH")]
    pub device: Vec<String>,

    /// A PCI function served by a vfio-user server (repeatable):
    /// `socket=PATH`. Guest RAM is then shared memory (a memfd).
    #[arg(long, value_name = "socket=PATH")]
    pub user_device: Vec<String>,

    /// Number of iothreads, each one thread running an io_uring executor
    /// that serves the virtio queues assigned to it.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub iothreads: usize,

    /// Pin vCPU threads to host CPUs: `VCPU@CPUS`, CPUS a list of host
    /// CPUs and ranges separated by `:` (`0@2`, `1@0-3:6`); comma-separated
    /// or repeated. A vCPU not named keeps the process's affinity.
    #[arg(long, value_name = "VCPU@CPUS")]
    pub vcpu_affinity: Vec<String>,

    /// Pin iothreads to host CPUs, as `--vcpu-affinity`: `IOTHREAD@CPUS`
    /// (e.g. an iothread next to the vCPU whose disk it serves).
    #[arg(long, value_name = "IOTHREAD@CPUS")]
    pub iothread_affinity: Vec<String>,

    /// Microseconds an idle iothread busy-polls for new requests and
    /// completions before it sleeps (0 = never). Lowers latency at low
    /// queue depth; costs CPU while the guest is idle.
    #[arg(long, value_name = "US", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub iothread_poll_us: u32,

    /// When iothreads poll: `always`, `io` (only while disk I/O they
    /// started is in flight; an idle device still sleeps) or `adaptive`
    /// (a window between 0 and `--iothread-poll-us` that follows the gaps
    /// between requests, as QEMU's poll-grow/poll-shrink).
    #[arg(long, value_name = "always|io|adaptive", default_value = "always",
          value_parser = ["always", "io", "adaptive"])]
    pub iothread_poll_mode: String,

    /// When the VM stops, print each iothread's CPU time and io_uring
    /// counters (turns, io_uring_enter calls, SQEs, CQEs) on stderr.
    #[arg(long)]
    pub iothread_stats: bool,

    /// Serve the HTTP API on this Unix socket while the VM runs (see
    /// `ringvm serve`); without it no API thread is started.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Write lifecycle events as JSON lines: `path=PATH` (appended) or
    /// `fd=N` (an open file descriptor).
    #[arg(long, value_name = "path=PATH|fd=N")]
    pub event_monitor: Option<String>,
}

/// What `--restore` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreSpec {
    pub dir: PathBuf,
    pub resume: bool,
    pub mode: vmm::snapshot::memory::RestoreMode,
}

fn on_off(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => bail!("--restore: {key}={v:?} must be on or off"),
    }
}

/// Parses `source=DIR[,resume=on][,memory_restore_mode=ondemand|copy]`.
pub fn parse_restore(s: &str) -> Result<RestoreSpec> {
    let mut spec = RestoreSpec {
        dir: PathBuf::new(),
        resume: false,
        mode: Default::default(),
    };
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("--restore: {part:?} is not KEY=VALUE"))?;
        match k {
            "source" => {
                spec.dir = v.strip_prefix("file://").unwrap_or(v).into();
            }
            "resume" => spec.resume = on_off(k, v)?,
            "memory_restore_mode" => {
                spec.mode = match v {
                    "ondemand" => vmm::snapshot::memory::RestoreMode::Lazy,
                    "copy" => vmm::snapshot::memory::RestoreMode::Copy,
                    _ => bail!("--restore: memory_restore_mode={v:?} must be ondemand or copy"),
                }
            }
            _ => bail!("--restore: unknown key {k:?} (source, resume, memory_restore_mode)"),
        }
    }
    if spec.dir.as_os_str().is_empty() {
        bail!("--restore needs source=DIR");
    }
    Ok(spec)
}

/// `virtio-blk3` -> 3.
fn device_index(name: &str, prefix: &str, count: usize, what: &str) -> Result<usize> {
    name.strip_prefix(prefix)
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n < count)
        .with_context(|| {
            format!(
                "{what}: the snapshot has no device {name:?} ({count} {prefix} device(s), {prefix}0..)"
            )
        })
}

fn parse_serial(s: &str) -> Result<SerialOutput> {
    Ok(match s {
        "stdio" => SerialOutput::Stdio,
        "off" => SerialOutput::Off,
        _ => match s.strip_prefix("file=") {
            Some(path) if !path.is_empty() => SerialOutput::File(path.into()),
            _ => bail!("invalid --serial {s:?}: expected stdio, off or file=PATH"),
        },
    })
}

impl RunArgs {
    /// The arguments of a bare `ringvm`: the built-in guest, defaults.
    pub fn builtin_default() -> RunArgs {
        RunArgs {
            kernel: "builtin".into(),
            memory: "512M".into(),
            cpus: 1,
            serial: "stdio".into(),
            iothreads: 1,
            ..Default::default()
        }
    }

    /// The arguments of the VM in the snapshot `spec` names: its
    /// `config.json` with the overrides, and this command line's
    /// process-level settings (serial output, seccomp, API, events).
    pub fn restored_args(&self, spec: &RestoreSpec) -> Result<RunArgs> {
        if !self.kernel.is_empty()
            || self.initrd.is_some()
            || !self.disk.is_empty()
            || !self.net.is_empty()
            || !self.device.is_empty()
            || !self.user_device.is_empty()
        {
            bail!(
                "--restore builds the VM from the snapshot's config.json: --kernel, --initrd, \
                 --disk, --net, --device and --user-device cannot be given with it \
                 (--disk-path and --net-tap replace disks and TAPs)"
            );
        }
        let bytes = vmm::snapshot::dir::read_config(&spec.dir).context("--restore")?;
        let config_path = spec.dir.join(vmm::snapshot::dir::CONFIG_FILE);
        let mut cfg: ringvm::api::types::VmConfig = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a VM configuration", config_path.display()))?;
        for o in &self.disk_path {
            let (name, path) = o
                .split_once('=')
                .with_context(|| format!("--disk-path {o:?}: expected NAME=PATH"))?;
            let i = device_index(name, "virtio-blk", cfg.disks.len(), "--disk-path")?;
            cfg.disks[i].path = path.into();
        }
        for o in &self.net_tap {
            let (name, tap) = o
                .split_once('=')
                .with_context(|| format!("--net-tap {o:?}: expected NAME=TAP"))?;
            let i = device_index(name, "virtio-net", cfg.net.len(), "--net-tap")?;
            let n = &mut cfg.net[i];
            if tap.starts_with("ip=") {
                let mut ip = None;
                let mut mask = None;
                for kv in tap.split(',') {
                    match kv.split_once('=') {
                        Some(("ip", v)) => ip = Some(v.to_string()),
                        Some(("mask", v)) => mask = Some(v.to_string()),
                        _ => bail!(
                            "--net-tap {o:?}: expected NAME=TAP or NAME=ip=A.B.C.D,mask=A.B.C.D"
                        ),
                    }
                }
                (n.tap, n.ip, n.mask) = (None, ip, mask);
            } else {
                (n.tap, n.ip, n.mask) = (Some(tap.to_string()), None, None);
            }
        }
        let mut argv = vec!["ringvm".to_string(), "run".to_string()];
        argv.extend(
            cfg.to_run_args()
                .with_context(|| config_path.display().to_string())?,
        );
        let mut args = match Cli::try_parse_from(argv) {
            Ok(Cli {
                command: Some(Command::Run(args)),
            }) => args,
            Ok(_) => bail!("{} did not map to a VM", config_path.display()),
            Err(e) => bail!(
                "{}: {}",
                config_path.display(),
                e.render()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("error: ")
            ),
        };
        // Where this process sends the console, and how it runs.
        if !self.serial.is_empty() {
            args.serial = self.serial.clone();
        }
        args.seccomp = self.seccomp.clone();
        args.api_socket = self.api_socket.clone();
        args.event_monitor = self.event_monitor.clone();
        args.iothread_stats = self.iothread_stats;
        args.iothread_poll_us = self.iothread_poll_us;
        args.iothread_poll_mode = self.iothread_poll_mode.clone();
        // The snapshot's thread placement holds unless this run names one.
        if !self.vcpu_affinity.is_empty() {
            args.vcpu_affinity = self.vcpu_affinity.clone();
        }
        if !self.iothread_affinity.is_empty() {
            args.iothread_affinity = self.iothread_affinity.clone();
        }
        Ok(args)
    }

    /// The whole VM plan: machine, disks, iothreads.
    pub fn to_plan(&self) -> Result<Plan> {
        if let Some(r) = &self.restore {
            let spec = parse_restore(r)?;
            let mut plan = self.restored_args(&spec)?.to_plan()?;
            plan.restore = Some(spec);
            return Ok(plan);
        }
        if !self.disk_path.is_empty() || !self.net_tap.is_empty() {
            bail!("--disk-path and --net-tap are only for --restore");
        }
        let disks = self
            .disk
            .iter()
            .filter(|d| !is_vhost_user(d))
            .map(|d| DiskConfig::parse(d))
            .collect::<Result<Vec<_>, _>>()
            .context("--disk")?;
        let nets = self
            .net
            .iter()
            .filter(|n| !is_vhost_user(n))
            .map(|n| NetConfig::parse(n))
            .collect::<Result<Vec<_>, _>>()
            .context("--net")?;
        let vhost_user = self.vhost_user_devices()?;
        let passthrough = self
            .device
            .iter()
            .map(|d| passthrough::Source::parse_device(d))
            .chain(
                self.user_device
                    .iter()
                    .map(|d| passthrough::Source::parse_user_device(d)),
            )
            .collect::<Result<Vec<_>, _>>()?;
        if self.iothreads == 0 || self.iothreads > 64 {
            bail!(
                "--iothreads must be between 1 and 64, not {}",
                self.iothreads
            );
        }
        Ok(Plan {
            vm: self.to_config()?,
            disks,
            nets,
            vhost_user,
            passthrough,
            iothreads: self.iothreads,
            iothread_poll: (
                std::time::Duration::from_micros(u64::from(self.iothread_poll_us)),
                match self.iothread_poll_mode.as_str() {
                    "io" => uring_backend::executor::PollWhen::IoInFlight,
                    "adaptive" => uring_backend::executor::PollWhen::Adaptive,
                    _ => uring_backend::executor::PollWhen::Always,
                },
            ),
            iothread_stats: self.iothread_stats,
            iothread_affinity: vmm::affinity::by_index(
                &self.iothread_affinity,
                self.iothreads,
                "iothread",
            )
            .context("--iothread-affinity")?,
            cpuid_hide: self.cpuid_hide.clone(),
            restore: None,
        })
    }

    /// The `vhost_user=on` disks, then NICs, in command-line order.
    fn vhost_user_devices(&self) -> Result<Vec<VhostUserConfig>> {
        let disks = self
            .disk
            .iter()
            .filter(|d| is_vhost_user(d))
            .map(|d| VhostUserConfig::parse(Kind::Blk, d));
        let nets = self
            .net
            .iter()
            .filter(|n| is_vhost_user(n))
            .map(|n| VhostUserConfig::parse(Kind::Net, n));
        Ok(disks.chain(nets).collect::<Result<Vec<_>, _>>()?)
    }

    pub fn to_config(&self) -> Result<VmConfig> {
        let kernel = match self.kernel.as_str() {
            "builtin" => KernelSource::Builtin(BUILTIN_GUEST),
            "" => bail!("--kernel must name a kernel file or `builtin`"),
            path => KernelSource::Path(path.into()),
        };
        let memory = parse_size(&self.memory).context("--memory")?;
        let serial = parse_serial(&self.serial)?;
        let cpuid_hide = self
            .cpuid_hide
            .iter()
            .map(|f| f.parse::<FeatureBit>())
            .collect::<Result<Vec<_>, _>>()
            .context("--cpuid-hide")?;
        Ok(VmConfig {
            kernel,
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            memory,
            cpus: self.cpus,
            serial,
            serial_input: true,
            cpuid_hide,
            // Shared (a memfd) only when another process maps guest RAM.
            shared_memory: !self.user_device.is_empty()
                || self.disk.iter().chain(&self.net).any(|d| is_vhost_user(d)),
            irqchip: match self.irqchip.as_str() {
                "kernel" => IrqChip::Kernel,
                _ => IrqChip::Split,
            },
            acpi: self.acpi != "off",
            seccomp: match self.seccomp.as_str() {
                "" => Default::default(),
                s => s.parse().context("--seccomp")?,
            },
            vcpu_affinity: vmm::affinity::by_index(&self.vcpu_affinity, self.cpus, "vCPU")
                .context("--vcpu-affinity")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_forms() {
        assert_eq!(parse_serial("stdio").unwrap(), SerialOutput::Stdio);
        assert_eq!(parse_serial("off").unwrap(), SerialOutput::Off);
        assert_eq!(
            parse_serial("file=/tmp/x").unwrap(),
            SerialOutput::File("/tmp/x".into())
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tty").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
