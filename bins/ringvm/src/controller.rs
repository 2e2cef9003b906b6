//! The VMM behind the API: at most one VM, built on `vm.create`, started
//! on `vm.boot`, and driven through `vmm`'s lifecycle calls
//! ([`vmm::VmControl`]) by the API's worker thread (every state change,
//! reboots included, runs there: see `ringvm::api::worker`), while the
//! main thread waits for the VM to stop (the same wait as a plain `ringvm
//! run`).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use clap::Parser;
use ringvm::api::dispatch::{ApiError, Backend, Endpoint};
use ringvm::api::types::{self, RestoreConfig, SnapshotConfig, VmConfig as ApiConfig};
use ringvm::api::worker::Worker;
use serde_json::{json, Value};
use vmm::control::Signals;
use vmm::devices::SerialOutput;
use vmm::registry::Resource;
use vmm::{KernelSource, LifecycleError, RunReport, RunningMachine, StopReason, VmControl};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::cli::{Cli, Command, RunArgs};
use crate::vm::{self, Plan, Resources};

/// The VM the controller holds.
struct Current {
    control: Arc<VmControl>,
    resources: Arc<Resources>,
    /// The configuration in use, in the API's schema.
    config: Value,
    /// The devices as last seen (kept for `vm.info` after the stop).
    devices: Value,
}

#[derive(Default)]
struct Inner {
    /// The `ringvm run` arguments of the VM (kept for reboots).
    args: Option<RunArgs>,
    plan: Option<Plan>,
    /// Built, not started.
    built: Option<vm::Built>,
    /// Started, waiting for the main thread to take it.
    started: Option<RunningMachine>,
    current: Option<Current>,
    reboot: bool,
    /// `vmm.shutdown` was asked; `exit` is set once it was answered.
    exit_pending: bool,
    exit: Option<i32>,
}

/// The VMM, shared by the API thread and the main thread.
pub struct Controller {
    inner: Mutex<Inner>,
    /// Wakes the main thread (a VM started, the VMM is to exit).
    wake: EventFd,
    /// `ringvm serve`: the VMM outlives its VM.
    serve: bool,
    /// Where VMs are built, started and rebuilt.
    worker: Arc<Worker>,
    /// `--seccomp` of `ringvm serve`, for the VMs `vm.create` makes
    /// (`None`: each VM's own arguments say).
    seccomp: Option<String>,
    /// API requests read and not yet answered: under `ringvm run` the
    /// process ends with its VM, but only once these have their answers
    /// (a `vm.shutdown`, or the power button the guest obeys at once).
    answering: AtomicUsize,
}

fn lifecycle(e: LifecycleError) -> ApiError {
    let msg = vmm::error_line(&e);
    ApiError::new(if e.is_wrong_state() { 409 } else { 500 }, msg)
}

fn chain(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for c in e.chain().skip(1) {
        s.push_str(&format!(": {c}"));
    }
    s
}

fn resource_json(r: &Resource) -> Value {
    match *r {
        Resource::Pio { base, len } => json!({"type": "pio", "base": base, "len": len}),
        Resource::Mmio { base, len } => json!({"type": "mmio", "base": base, "len": len}),
        Resource::PciSlot { bus, slot } => json!({"type": "pci_slot", "bus": bus, "slot": slot}),
        Resource::Gsi(g) => json!({"type": "gsi", "gsi": g}),
    }
}

/// Every device in the registry with its claims and PCI address.
fn devices_json(res: &Resources) -> Option<Value> {
    let reg = res.registry.upgrade()?;
    let reg = reg.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    for name in reg.names() {
        let claims = reg.resources(name).unwrap_or(&[]);
        let bdf = claims.iter().find_map(|r| match r {
            Resource::PciSlot { bus, slot } => Some(format!("0000:{bus:02x}:{slot:02x}.0")),
            _ => None,
        });
        out.push(json!({
            "id": name,
            "pci_bdf": bdf,
            "resources": claims.iter().map(resource_json).collect::<Vec<_>>(),
        }));
    }
    Some(Value::Array(out))
}

/// The threads that have a placement (by index), in the API's form.
fn placements<T>(
    sets: &[Option<vmm::affinity::CpuSet>],
    entry: impl Fn(usize, Vec<usize>) -> T,
) -> Vec<T> {
    sets.iter()
        .enumerate()
        .filter_map(|(i, set)| Some(entry(i, set.as_ref()?.cpus().to_vec())))
        .collect()
}

/// The configuration of `plan` (made from `args`) in the API's schema:
/// every default filled in.
fn config_json(plan: &Plan) -> Value {
    let v = &plan.vm;
    let config = ApiConfig {
        cpus: types::CpusConfig {
            boot_vcpus: v.cpus,
            affinity: placements(&v.vcpu_affinity, |vcpu, host_cpus| types::CpuAffinity {
                vcpu,
                host_cpus,
            }),
        },
        memory: types::MemoryConfig { size: v.memory },
        payload: types::PayloadConfig {
            kernel: match &v.kernel {
                KernelSource::Builtin(_) => "builtin".into(),
                KernelSource::Path(p) => p.display().to_string(),
            },
            initramfs: v.initrd.as_ref().map(|p| p.display().to_string()),
            cmdline: Some(v.cmdline.clone()),
        },
        disks: plan
            .disks
            .iter()
            .map(|d| types::DiskConfig {
                path: d.path.display().to_string(),
                readonly: d.readonly,
                direct: d.direct,
                num_queues: Some(d.queues),
                queue_size: Some(d.queue_size),
                serial: d.serial.clone(),
                iothreads: d.iothreads.clone(),
                fixed_buffers: Some(d.fixed_buffers),
                engine: Some(d.engine.name().to_string()),
            })
            .collect(),
        net: plan
            .nets
            .iter()
            .map(|n| {
                let (tap, ip, mask) = match &n.tap {
                    uring_backend::net::TapSpec::Named(t) => (Some(t.clone()), None, None),
                    uring_backend::net::TapSpec::Create { ip, mask } => {
                        (None, Some(ip.to_string()), Some(mask.to_string()))
                    }
                };
                types::NetConfig {
                    tap,
                    ip,
                    mask,
                    mac: n.mac.map(|m| {
                        m.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":")
                    }),
                    num_queue_pairs: Some(n.queue_pairs),
                    queue_size: Some(n.queue_size),
                    iothreads: n.iothreads.clone(),
                }
            })
            .collect(),
        devices: plan
            .passthrough
            .iter()
            .filter_map(|s| match s {
                passthrough::Source::Kernel(p) => Some(types::DeviceConfig {
                    path: p.display().to_string(),
                }),
                passthrough::Source::User(_) => None,
            })
            .collect(),
        user_devices: plan
            .passthrough
            .iter()
            .filter_map(|s| match s {
                passthrough::Source::User(p) => Some(types::UserDeviceConfig {
                    socket: p.display().to_string(),
                }),
                passthrough::Source::Kernel(_) => None,
            })
            .collect(),
        serial: match &v.serial {
            SerialOutput::Off => types::SerialConfig {
                mode: types::SerialMode::Off,
                file: None,
            },
            SerialOutput::Stdio => types::SerialConfig {
                mode: types::SerialMode::Tty,
                file: None,
            },
            SerialOutput::File(p) => types::SerialConfig {
                mode: types::SerialMode::File,
                file: Some(p.display().to_string()),
            },
        },
        iothreads: plan.iothreads,
        iothread_affinity: placements(&plan.iothread_affinity, |iothread, host_cpus| {
            types::IothreadAffinity {
                iothread,
                host_cpus,
            }
        }),
        irqchip: match v.irqchip {
            vmm::config::IrqChip::Kernel => "kernel".into(),
            vmm::config::IrqChip::Split => "split".into(),
        },
        cpuid_hide: plan.cpuid_hide.clone(),
        acpi: v.acpi,
    };
    serde_json::to_value(config).unwrap_or(Value::Null)
}

/// The configuration with every relative file path made absolute (as
/// this process sees it), so that a snapshot restores from any directory.
fn absolute_paths(mut config: Value) -> Value {
    fn fix(v: &mut Value) {
        if let Some(p) = v.as_str() {
            let path = std::path::Path::new(p);
            if path.is_relative() && p != "builtin" {
                if let Ok(cwd) = std::env::current_dir() {
                    *v = Value::String(cwd.join(path).display().to_string());
                }
            }
        }
    }
    if let Some(disks) = config["disks"].as_array_mut() {
        for d in disks {
            fix(&mut d["path"]);
        }
    }
    fix(&mut config["payload"]["kernel"]);
    if config["payload"]["initramfs"].is_string() {
        fix(&mut config["payload"]["initramfs"]);
    }
    if config["serial"]["file"].is_string() {
        fix(&mut config["serial"]["file"]);
    }
    config
}

/// `ringvm run` arguments from an API configuration.
fn run_args(config: &ApiConfig) -> Result<RunArgs, ApiError> {
    let mut argv = vec!["ringvm".to_string(), "run".to_string()];
    argv.extend(
        config
            .to_run_args()
            .map_err(|e| ApiError::bad_request(e.to_string()))?,
    );
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Some(Command::Run(args)),
        }) => Ok(args),
        Ok(_) => Err(ApiError::internal("the configuration did not map to `run`")),
        Err(e) => Err(ApiError::bad_request(format!(
            "invalid VM configuration: {}",
            e.render()
                .to_string()
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ")
        ))),
    }
}

impl Controller {
    pub fn new(
        serve: bool,
        worker: Arc<Worker>,
        seccomp: Option<String>,
    ) -> Result<Arc<Controller>> {
        Ok(Arc::new(Controller {
            inner: Mutex::new(Inner::default()),
            wake: EventFd::new(EFD_NONBLOCK)?,
            serve,
            worker,
            seccomp,
            answering: AtomicUsize::new(0),
        }))
    }

    /// The worker thread's handle (for the API server).
    pub fn worker(&self) -> Arc<Worker> {
        self.worker.clone()
    }

    /// Runs `f` on the worker thread.
    pub fn on_worker<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Controller) -> R + Send + 'static,
    ) -> Option<R> {
        let me = self.clone();
        self.worker.run(move || f(&me))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lifecycle handle of the VM, started or not.
    fn control(inner: &Inner) -> Option<Arc<VmControl>> {
        if let Some(c) = &inner.current {
            return Some(c.control.clone());
        }
        inner.built.as_ref().map(|b| b.machine.control().clone())
    }

    fn no_vm() -> ApiError {
        ApiError::conflict("no VM has been created")
    }

    /// Builds the VM of `args` (state Created).
    pub fn create_from_args(&self, args: RunArgs) -> Result<(), ApiError> {
        let mut inner = self.lock();
        if inner.built.is_some() || inner.current.is_some() {
            return Err(ApiError::conflict(
                "a VM exists already (vm.delete it first)",
            ));
        }
        let plan = args
            .to_plan()
            .map_err(|e| ApiError::bad_request(chain(&e)))?;
        let built = vm::build(&plan)
            .map_err(|f| ApiError::new(if f.bad_input { 400 } else { 500 }, chain(&f.error)))?;
        vmm::events::emit("vm", "created", &[]);
        inner.args = Some(args);
        inner.plan = Some(plan);
        inner.built = Some(built);
        Ok(())
    }

    fn start(inner: &mut Inner) -> Result<(), ApiError> {
        if let Some(b) = &inner.built {
            let state = b.machine.control().state();
            if state != vmm::VmState::Created {
                return Err(lifecycle(LifecycleError::WrongState {
                    action: vmm::lifecycle::Transition::Boot,
                    state,
                }));
            }
        }
        let Some(built) = inner.built.take() else {
            return Err(match Self::control(inner) {
                Some(c) => lifecycle(LifecycleError::WrongState {
                    action: vmm::lifecycle::Transition::Boot,
                    state: c.state(),
                }),
                None => Self::no_vm(),
            });
        };
        let (Some(plan), Some(_)) = (&inner.plan, &inner.args) else {
            return Err(ApiError::internal("a built VM without its plan"));
        };
        let config = config_json(plan);
        vmm::events::emit("vm", "booting", &[]);
        let control = built.machine.control().clone();
        let resources = built.resources.clone();
        let devices = devices_json(&resources).unwrap_or(Value::Null);
        let running = built
            .machine
            .start()
            .map_err(|e| ApiError::internal(chain(&e.into())))?;
        if plan.restore.as_ref().is_some_and(|r| r.resume) {
            running.control().resume().map_err(lifecycle)?;
        }
        inner.current = Some(Current {
            control,
            resources,
            config,
            devices,
        });
        inner.started = Some(running);
        Ok(())
    }

    /// Starts the built VM; the main thread waits for it.
    pub fn boot_vm(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        Self::start(&mut inner)?;
        let _ = self.wake.write(1);
        Ok(())
    }

    /// The main thread: waits for VMs to start and stop until the VMM is
    /// to exit; returns the process exit code.
    pub fn main_loop(self: &Arc<Self>, signals: &Signals, iothread_stats: bool) -> i32 {
        loop {
            let started = self.lock().started.take();
            if let Some(running) = started {
                let report = running.wait(Some(signals));
                let code = self.vm_stopped(report, iothread_stats);
                if let Some(code) = code {
                    return code;
                }
                continue;
            }
            if let Some(code) = self.lock().exit {
                return code;
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: signals.fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of pollfd for its length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            if n > 0 && fds[0].revents != 0 {
                let _ = self.wake.read();
            }
            if n > 0 && fds[1].revents != 0 {
                if let Some(sig) = signals.read() {
                    eprintln!("ringvm: stopped by signal {sig}");
                    return vmm::exit_code::SIGNAL;
                }
            }
        }
    }

    /// After a VM stopped: the stop line, a reboot, or the exit code when
    /// the process is to end.
    fn vm_stopped(
        self: &Arc<Self>,
        report: Result<RunReport, vmm::MachineError>,
        iothread_stats: bool,
    ) -> Option<i32> {
        let mut inner = self.lock();
        if let Some(cur) = &mut inner.current {
            if let Some(d) = devices_json(&cur.resources) {
                cur.devices = d;
            }
            if iothread_stats {
                vm::print_stats(&cur.resources);
            }
        }
        let kernel = match inner.plan.as_ref().map(|p| &p.vm.kernel) {
            Some(KernelSource::Path(p)) => p.display().to_string(),
            _ => "built-in guest".to_string(),
        };
        let code = match &report {
            Ok(r) => {
                // The same line as a plain `ringvm run`.
                eprintln!(
                    "ringvm: {} (exit code {}; {kernel}, {}; {:.1} ms)",
                    r.reason,
                    r.reason.exit_code(),
                    r.protocol,
                    r.elapsed.as_secs_f64() * 1e3
                );
                r.reason.exit_code()
            }
            Err(e) => {
                eprintln!("ringvm: error: {}", chain(&anyhow::anyhow!("{e}")));
                vmm::exit_code::HOST_ERROR
            }
        };
        if matches!(&report, Ok(r) if matches!(r.reason, StopReason::Signal { .. })) {
            return Some(code);
        }
        if inner.exit_pending {
            // Answered by now, or very soon: the API thread sets `exit`.
            drop(inner);
            for _ in 0..200 {
                if let Some(c) = self.lock().exit {
                    return Some(c);
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            return Some(0);
        }
        if std::mem::take(&mut inner.reboot) {
            let args = inner.args.take();
            inner.current = None;
            inner.plan = None;
            drop(inner);
            if let Some(args) = args {
                // A restored VM reboots as a fresh boot of its snapshot's
                // configuration, not as the snapshot again. Reading that
                // configuration opens files: the worker does it.
                let rebuilt = self
                    .on_worker(|c| {
                        let args = match &args.restore {
                            Some(r) => crate::cli::parse_restore(r)
                                .and_then(|spec| args.restored_args(&spec))
                                .map_err(|e| ApiError::bad_request(chain(&e)))?,
                            None => args,
                        };
                        c.create_from_args(args)
                            .and_then(|()| Self::start(&mut c.lock()))
                    })
                    .unwrap_or_else(|| Err(ApiError::internal("the worker thread is gone")));
                match rebuilt {
                    Ok(()) => return None,
                    Err(e) => {
                        eprintln!("ringvm: error: rebooting: {}", e.message);
                        return Some(vmm::exit_code::HOST_ERROR);
                    }
                }
            }
            return None;
        }
        if self.serve {
            return None;
        }
        drop(inner);
        if self.answering.load(Ordering::SeqCst) > 0 {
            // The API thread answers within its write deadline.
            let deadline = std::time::Instant::now() + 2 * ringvm::api::server::REQUEST_DEADLINE;
            while self.answering.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        Some(code)
    }
}

impl Backend for Controller {
    fn ping(&self) -> Result<Value, ApiError> {
        Ok(serde_json::to_value(types::VmmPing {
            build_version: env!("CARGO_PKG_VERSION").into(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            features: [
                "kvm",
                "io_uring",
                "virtio-blk",
                "virtio-net",
                "vfio",
                "vfio-user",
                "irqchip-split",
                "pause",
                "snapshot",
                "event-monitor",
            ]
            .map(String::from)
            .to_vec(),
        })
        .unwrap_or(Value::Null))
    }

    fn shutdown_vmm(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        inner.exit_pending = true;
        if let Some(c) = Self::control(&inner) {
            if matches!(c.state(), vmm::VmState::Running | vmm::VmState::Paused) {
                c.shutdown(StopReason::Requested {
                    request: "vmm.shutdown",
                })
                .map_err(lifecycle)?;
            }
        }
        Ok(())
    }

    fn create(&self, config: ApiConfig) -> Result<(), ApiError> {
        let mut args = run_args(&config)?;
        if let Some(mode) = &self.seccomp {
            args.seccomp = mode.clone();
        }
        self.create_from_args(args)
    }

    fn boot(&self) -> Result<(), ApiError> {
        self.boot_vm()
    }

    fn delete(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let Some(c) = Self::control(&inner) else {
            return Err(Self::no_vm());
        };
        if matches!(c.state(), vmm::VmState::Running | vmm::VmState::Paused) {
            return Err(ApiError::conflict(format!(
                "cannot delete a VM that is {} (vm.shutdown it first)",
                c.state()
            )));
        }
        if inner.started.is_some() {
            return Err(ApiError::conflict("the VM is still stopping"));
        }
        inner.built = None;
        inner.current = None;
        inner.plan = None;
        inner.args = None;
        drop(inner);
        vmm::events::emit("vm", "deleted", &[]);
        Ok(())
    }

    fn info(&self) -> Result<Value, ApiError> {
        let inner = self.lock();
        if let Some(cur) = &inner.current {
            let devices = devices_json(&cur.resources).unwrap_or_else(|| cur.devices.clone());
            return Ok(json!({
                "state": cur.control.state().as_str(),
                "config": cur.config,
                "devices": devices,
            }));
        }
        let (Some(built), Some(plan)) = (&inner.built, &inner.plan) else {
            return Err(Self::no_vm());
        };
        Ok(json!({
            "state": built.machine.control().state().as_str(),
            "config": config_json(plan),
            "devices": devices_json(&built.resources).unwrap_or(Value::Null),
        }))
    }

    fn counters(&self) -> Result<Value, ApiError> {
        let inner = self.lock();
        let res = match (&inner.current, &inner.built) {
            (Some(c), _) => c.resources.clone(),
            (None, Some(b)) => b.resources.clone(),
            (None, None) => return Err(Self::no_vm()),
        };
        drop(inner);
        let mut devices = serde_json::Map::new();
        for (name, s) in &res.disks {
            let m: serde_json::Map<String, Value> = s
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            devices.insert(name.clone(), Value::Object(m));
        }
        for (name, s) in &res.nets {
            let m: serde_json::Map<String, Value> = s
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            devices.insert(name.clone(), Value::Object(m));
        }
        let mut iothreads = serde_json::Map::new();
        for t in &res.iothreads {
            let s = t.stats();
            iothreads.insert(
                t.name().to_string(),
                json!({
                    "cpu_us": t.cpu_time().as_micros() as u64,
                    "turns": s.turns,
                    "io_uring_enter": s.enters,
                    "sqes": s.sqes_submitted,
                    "cqes": s.cqes_reaped,
                }),
            );
        }
        Ok(json!({"devices": devices, "iothreads": iothreads}))
    }

    fn pause(&self) -> Result<(), ApiError> {
        let c = Self::control(&self.lock()).ok_or_else(Self::no_vm)?;
        c.pause().map_err(lifecycle)
    }

    fn resume(&self) -> Result<(), ApiError> {
        let c = Self::control(&self.lock()).ok_or_else(Self::no_vm)?;
        c.resume().map_err(lifecycle)
    }

    fn shutdown(&self) -> Result<(), ApiError> {
        let c = Self::control(&self.lock()).ok_or_else(Self::no_vm)?;
        c.shutdown(StopReason::Requested {
            request: "vm.shutdown",
        })
        .map_err(lifecycle)
    }

    fn reboot(&self) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let c = Self::control(&inner).ok_or_else(Self::no_vm)?;
        match c.state() {
            vmm::VmState::Running | vmm::VmState::Paused => {}
            state => {
                return Err(ApiError::conflict(format!(
                    "cannot reboot a VM that is {state}"
                )))
            }
        }
        inner.reboot = true;
        c.shutdown(StopReason::Requested {
            request: "vm.reboot",
        })
        .map_err(lifecycle)
    }

    fn power_button(&self) -> Result<(), ApiError> {
        let c = Self::control(&self.lock()).ok_or_else(Self::no_vm)?;
        c.power_button().map_err(lifecycle)
    }

    fn snapshot(&self, config: SnapshotConfig) -> Result<(), ApiError> {
        let dir = types::file_url_path(&config.destination_url).map_err(ApiError::bad_request)?;
        let (control, json) = {
            let inner = self.lock();
            match &inner.current {
                Some(cur) => (cur.control.clone(), cur.config.clone()),
                None => {
                    return Err(match Self::control(&inner) {
                        Some(c) => lifecycle(LifecycleError::WrongState {
                            action: vmm::lifecycle::Transition::Snapshot,
                            state: c.state(),
                        }),
                        None => Self::no_vm(),
                    })
                }
            }
        };
        vmm::events::emit("vm", "snapshotting", &[]);
        // Every device's state first: a device that cannot be saved
        // refuses before anything is written.
        let (state, mem) = control.capture().map_err(lifecycle)?;
        let json = serde_json::to_vec_pretty(&absolute_paths(json))
            .map_err(|e| ApiError::internal(format!("encoding config.json: {e}")))?;
        let report = vmm::snapshot::dir::write_dir(&dir, &json, state, &mem)
            .map_err(|e| ApiError::internal(chain(&e.into())))?;
        vmm::events::emit(
            "vm",
            "snapshotted",
            &[
                ("path", &dir.display().to_string()),
                ("memory_bytes", &report.memory_bytes.to_string()),
            ],
        );
        Ok(())
    }

    fn restore(&self, config: RestoreConfig) -> Result<(), ApiError> {
        let dir = types::file_url_path(&config.source_url).map_err(ApiError::bad_request)?;
        let mut spec = format!("source={}", dir.display());
        if spec.contains(',') {
            return Err(ApiError::bad_request("source_url may not contain ','"));
        }
        spec.push_str(if config.resume {
            ",resume=on"
        } else {
            ",resume=off"
        });
        if let Some(m) = &config.memory_restore_mode {
            spec.push_str(&format!(",memory_restore_mode={m}"));
        }
        let args = RunArgs {
            restore: Some(spec),
            disk_path: config
                .disk_paths
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            net_tap: config
                .net_taps
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            ..Default::default()
        };
        self.create_from_args(args)?;
        self.boot_vm()
    }

    fn request_begun(&self) {
        self.answering.fetch_add(1, Ordering::SeqCst);
    }

    fn request_ended(&self) {
        self.answering.fetch_sub(1, Ordering::SeqCst);
    }

    fn responded(&self, ep: Endpoint) {
        if ep == Endpoint::VmmShutdown {
            let mut inner = self.lock();
            if inner.exit_pending {
                inner.exit = Some(0);
                let _ = self.wake.write(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_errors_map_to_409_or_500_with_their_causes() {
        let wrong = lifecycle(LifecycleError::WrongState {
            action: vmm::lifecycle::Transition::Resume,
            state: vmm::VmState::Running,
        });
        assert_eq!(
            (wrong.status, wrong.message.as_str()),
            (409, "cannot resume a VM that is Running")
        );
        assert_eq!(lifecycle(LifecycleError::NoPowerButton).status, 409);
        let host = lifecycle(LifecycleError::PauseDevice {
            name: "virtio-blk0".into(),
            source: "the disk is gone".into(),
        });
        assert_eq!(
            (host.status, host.message.as_str()),
            (500, "pausing device virtio-blk0: the disk is gone")
        );
        let clock = lifecycle(LifecycleError::GetClock(vmm_sys_util::errno::Error::new(
            libc::EINVAL,
        )));
        assert_eq!(clock.status, 500);
        assert!(clock.message.starts_with("reading the KVM clock: "));
    }
}
