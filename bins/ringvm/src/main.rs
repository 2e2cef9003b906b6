//! The `ringvm` command.

mod cli;
mod controller;
mod logger;
mod vm;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, RemoteArgs, RunArgs, ServeArgs};
use ringvm::api::dispatch::ApiError;
use ringvm::api::worker::{Sandbox, Worker};
use ringvm::api::{client, dispatch::Endpoint, server, types::VmConfig as ApiConfig};
use std::sync::Arc;
use vmm::config::format_size;
use vmm::seccomp::{self, SeccompMode, ThreadKind};
use vmm::{exit_code, KernelSource, RunReport};

/// The built-in test guest, built from tests/guest by build.rs.
pub static BUILTIN_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ringvm-guest.elf"));

fn exit(code: i32) -> ExitCode {
    let _ = std::io::stdout().flush();
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn error_line(err: &anyhow::Error) {
    let mut line = format!("ringvm: error: {err}");
    for cause in err.chain().skip(1) {
        line.push_str(&format!(": {cause}"));
    }
    eprintln!("{line}");
}

/// Runs a plan and prints the one-line stop reason; returns the exit code.
fn run_plan(plan: &vm::Plan) -> i32 {
    match vm::run(plan) {
        Ok(report) => {
            print_stop_line(plan, &report);
            report.reason.exit_code()
        }
        Err(f) => {
            error_line(&f.error);
            if f.bad_input {
                exit_code::BAD_INPUT
            } else {
                exit_code::HOST_ERROR
            }
        }
    }
}

fn print_stop_line(plan: &vm::Plan, report: &RunReport) {
    let kernel = match &plan.vm.kernel {
        KernelSource::Builtin(_) => "built-in guest".to_string(),
        KernelSource::Path(p) => p.display().to_string(),
    };
    let _ = std::io::stdout().flush();
    eprintln!(
        "ringvm: {} (exit code {}; {kernel}, {}; {:.1} ms)",
        report.reason,
        report.reason.exit_code(),
        report.protocol,
        report.elapsed.as_secs_f64() * 1e3
    );
}

/// Installs the `--event-monitor` writer: `path=PATH` or `fd=N`.
fn event_monitor(spec: &str) -> Result<()> {
    let writer: Box<dyn Write + Send> = if let Some(path) = spec.strip_prefix("path=") {
        Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("--event-monitor: opening {path}"))?,
        )
    } else if let Some(fd) = spec.strip_prefix("fd=") {
        use std::os::fd::FromRawFd;
        let fd: i32 = fd
            .parse()
            .ok()
            .filter(|&n| n >= 0)
            .with_context(|| format!("--event-monitor: invalid fd {fd:?}"))?;
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            anyhow::bail!("--event-monitor: fd {fd} is not open");
        }
        // SAFETY: the descriptor is open and handed to ringvm for this use
        // alone; the monitor owns it from now on.
        Box::new(unsafe { std::fs::File::from_raw_fd(fd) })
    } else {
        anyhow::bail!("invalid --event-monitor {spec:?}: expected path=PATH or fd=N");
    };
    vmm::events::install(writer);
    Ok(())
}

/// The worker thread that builds VMs under the API (ringvm::api::worker),
/// sandboxed with the VM-building list.
fn start_worker(mode: SeccompMode) -> Result<Arc<Worker>> {
    let sandbox: Sandbox = Box::new(move || {
        seccomp::apply(ThreadKind::VmBuild, mode).map_err(|e| format!("{e:#}"))?;
        seccomp::test_call(ThreadKind::VmBuild);
        Ok(())
    });
    Ok(Arc::new(Worker::spawn("vm-build", Some(sandbox))?))
}

/// Binds the API socket and starts the API thread (sandboxed before it
/// accepts a connection).
fn start_api(
    path: &std::path::Path,
    ctl: &Arc<controller::Controller>,
    mode: SeccompMode,
) -> Result<()> {
    let listener = server::bind(path).context("--api-socket")?;
    let sandbox: Sandbox = Box::new(move || {
        seccomp::apply(ThreadKind::Api, mode).map_err(|e| format!("{e:#}"))?;
        seccomp::test_call(ThreadKind::Api);
        Ok(())
    });
    server::spawn(listener, ctl.clone(), Some(ctl.worker()), Some(sandbox))
        .context("--api-socket")?;
    Ok(())
}

/// The main thread's filter once the API and worker threads run: it only
/// waits for VMs to stop (the control loop of a plain run).
fn sandbox_main(mode: SeccompMode) -> Result<()> {
    seccomp::apply(ThreadKind::Vmm, mode).context("sandboxing the main thread")?;
    seccomp::test_call(ThreadKind::Vmm);
    Ok(())
}

/// `ringvm run --api-socket`: the same VM as a plain run, with the API
/// serving it; the process ends when the VM stops.
fn run_with_api(args: RunArgs) -> ExitCode {
    let Some(path) = args.api_socket.clone() else {
        return exit(exit_code::HOST_ERROR);
    };
    let stats = args.iothread_stats;
    let mode = match seccomp_mode(&args.seccomp) {
        Ok(m) => m,
        Err(e) => {
            error_line(&e);
            return exit(exit_code::BAD_INPUT);
        }
    };
    // Before any thread starts, so that none takes termination signals.
    let signals = match vmm::control::Signals::block() {
        Ok(s) => s,
        Err(e) => {
            error_line(&e.into());
            return exit(exit_code::HOST_ERROR);
        }
    };
    let ctl = match start_worker(mode).and_then(|w| controller::Controller::new(false, w, None)) {
        Ok(c) => c,
        Err(e) => {
            error_line(&e);
            return exit(exit_code::HOST_ERROR);
        }
    };
    if let Err(e) = start_api(&path, &ctl, mode) {
        error_line(&e);
        return exit(exit_code::BAD_INPUT);
    }
    if let Err(e) = sandbox_main(mode) {
        error_line(&e);
        return exit(exit_code::HOST_ERROR);
    }
    vmm::events::emit("vmm", "starting", &[]);
    let started = ctl
        .on_worker(|c| c.create_from_args(args).and_then(|()| c.boot_vm()))
        .unwrap_or_else(|| Err(ApiError::internal("the worker thread is gone")));
    let code = match started {
        Ok(()) => ctl.main_loop(&signals, stats),
        Err(e) => {
            eprintln!("ringvm: error: {}", e.message);
            if e.status == 400 {
                exit_code::BAD_INPUT
            } else {
                exit_code::HOST_ERROR
            }
        }
    };
    remove_socket(&ctl, path);
    vmm::events::emit("vmm", "shutdown", &[("exit_code", &code.to_string())]);
    exit(code)
}

/// Removes the API socket (on the worker: the main thread's list has no
/// `unlink`).
fn remove_socket(ctl: &Arc<controller::Controller>, path: std::path::PathBuf) {
    let _ = ctl.on_worker(move |_| std::fs::remove_file(path));
}

fn seccomp_mode(s: &str) -> Result<SeccompMode> {
    match s {
        "" => Ok(SeccompMode::default()),
        s => s.parse().context("--seccomp"),
    }
}

/// `ringvm serve`: the API with no VM until one is created.
fn serve(args: &ServeArgs) -> ExitCode {
    if let Some(spec) = &args.event_monitor {
        if let Err(e) = event_monitor(spec) {
            error_line(&e);
            return exit(exit_code::BAD_INPUT);
        }
    }
    let signals = match vmm::control::Signals::block() {
        Ok(s) => s,
        Err(e) => {
            error_line(&e.into());
            return exit(exit_code::HOST_ERROR);
        }
    };
    let mode = match seccomp_mode(&args.seccomp) {
        Ok(m) => m,
        Err(e) => {
            error_line(&e);
            return exit(exit_code::BAD_INPUT);
        }
    };
    // Threads that devices start on their own take this mode too.
    seccomp::set_default_mode(mode);
    let ctl = match start_worker(mode)
        .and_then(|w| controller::Controller::new(true, w, Some(args.seccomp.clone())))
    {
        Ok(c) => c,
        Err(e) => {
            error_line(&e);
            return exit(exit_code::HOST_ERROR);
        }
    };
    if let Err(e) = start_api(&args.api_socket, &ctl, mode) {
        error_line(&e);
        return exit(exit_code::BAD_INPUT);
    }
    if let Err(e) = sandbox_main(mode) {
        error_line(&e);
        return exit(exit_code::HOST_ERROR);
    }
    vmm::events::emit("vmm", "starting", &[]);
    let code = ctl.main_loop(&signals, args.iothread_stats);
    remove_socket(&ctl, args.api_socket.clone());
    vmm::events::emit("vmm", "shutdown", &[("exit_code", &code.to_string())]);
    exit(code)
}

/// `ringvm remote`: one request, the answer's JSON on stdout; the
/// server's error on stderr and exit code 1.
fn remote(args: &RemoteArgs) -> ExitCode {
    let ep = match args.command.as_str() {
        "ping" => Endpoint::VmmPing,
        "shutdown-vmm" => Endpoint::VmmShutdown,
        "create" => Endpoint::VmCreate,
        "boot" => Endpoint::VmBoot,
        "delete" => Endpoint::VmDelete,
        "info" => Endpoint::VmInfo,
        "counters" => Endpoint::VmCounters,
        "pause" => Endpoint::VmPause,
        "resume" => Endpoint::VmResume,
        "shutdown" => Endpoint::VmShutdown,
        "reboot" => Endpoint::VmReboot,
        "power-button" => Endpoint::VmPowerButton,
        "snapshot" => Endpoint::VmSnapshot,
        "restore" => Endpoint::VmRestore,
        other => {
            eprintln!("ringvm: error: unknown remote command {other:?} (see ringvm remote --help)");
            return exit(exit_code::BAD_INPUT);
        }
    };
    let wants_arg = matches!(
        ep,
        Endpoint::VmCreate | Endpoint::VmSnapshot | Endpoint::VmRestore
    );
    if args.args.len() != usize::from(wants_arg) {
        eprintln!(
            "ringvm: error: remote {} takes {}",
            args.command,
            match ep {
                Endpoint::VmCreate => "one FILE.json",
                Endpoint::VmSnapshot | Endpoint::VmRestore => "one file:///DIR URL",
                _ => "no argument",
            }
        );
        return exit(exit_code::BAD_INPUT);
    }
    let body = if ep == Endpoint::VmSnapshot {
        Some(
            serde_json::json!({"destination_url": args.args[0]})
                .to_string()
                .into_bytes(),
        )
    } else if ep == Endpoint::VmRestore {
        Some(
            serde_json::json!({"source_url": args.args[0]})
                .to_string()
                .into_bytes(),
        )
    } else if wants_arg {
        let file = &args.args[0];
        let parsed = std::fs::read(file)
            .with_context(|| format!("reading {file}"))
            .and_then(|b| {
                serde_json::from_slice::<ApiConfig>(&b)
                    .with_context(|| format!("{file} is not a VM configuration"))
            });
        match parsed.and_then(|c| serde_json::to_vec(&c).context("encoding")) {
            Ok(b) => Some(b),
            Err(e) => {
                error_line(&e);
                return exit(exit_code::BAD_INPUT);
            }
        }
    } else {
        None
    };
    match client::request(&args.api_socket, ep, body.as_deref()) {
        Ok(r) if (200..300).contains(&r.status) => {
            if !r.body.is_empty() {
                let mut out = std::io::stdout();
                let _ = out.write_all(&r.body);
                let _ = out.write_all(b"\n");
            }
            exit(0)
        }
        Ok(r) => {
            let msg = serde_json::from_slice::<serde_json::Value>(&r.body)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
            eprintln!("ringvm: error: {} (HTTP {})", msg, r.status);
            exit(1)
        }
        Err(e) => {
            error_line(&e.into());
            exit(1)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    if let Some(spec) = &args.event_monitor {
        if let Err(e) = event_monitor(spec) {
            error_line(&e);
            return exit(exit_code::BAD_INPUT);
        }
    }
    if let Some(r) = &args.restore {
        let resume = cli::parse_restore(r).map(|s| s.resume).unwrap_or(true);
        if !resume && args.api_socket.is_none() {
            eprintln!(
                "ringvm: error: --restore: a restored VM comes up paused; give resume=on, \
                 or --api-socket to resume it with vm.resume"
            );
            return exit(exit_code::BAD_INPUT);
        }
    }
    if args.api_socket.is_some() {
        return run_with_api(args);
    }
    vmm::events::emit("vmm", "starting", &[]);
    let code = run_plain(&args);
    vmm::events::emit("vmm", "shutdown", &[("exit_code", &code.to_string())]);
    exit(code)
}

fn run_plain(args: &RunArgs) -> i32 {
    match args.to_plan() {
        Ok(plan) => run_plan(&plan),
        Err(e) => {
            error_line(&e);
            exit_code::BAD_INPUT
        }
    }
}

/// Bare `ringvm`: the built-in guest writes a pattern to a temporary disk,
/// then a second VM reads it back and checks it. Each VM is a `ringvm run`
/// child process: a VM's control thread is sandboxed for the rest of its
/// process's life, so one process runs one VM.
fn demo() -> ExitCode {
    const DISK_SIZE: u64 = 16 << 20;
    let path = std::env::temp_dir().join(format!("ringvm-demo-{}.img", std::process::id()));
    let created = std::fs::File::create(&path).and_then(|f| f.set_len(DISK_SIZE));
    if let Err(e) = created {
        error_line(
            &anyhow::Error::new(e)
                .context(format!("creating the temporary disk {}", path.display())),
        );
        return exit(exit_code::HOST_ERROR);
    }
    let seed = std::process::id() % 1000 + 1;
    let mut code = 0;
    for (pass, mode) in ["write", "verify"].iter().enumerate() {
        let mut args = RunArgs::builtin_default();
        args.cmdline = format!("blk.mode={mode} blk.bs=4096 blk.qd=8 blk.len=1M blk.seed={seed}");
        args.disk = vec![format!("path={}", path.display())];
        let plan = match args.to_plan() {
            Ok(p) => p,
            Err(e) => {
                error_line(&e);
                code = exit_code::BAD_INPUT;
                break;
            }
        };
        eprintln!(
            "ringvm: pass {} of 2: booting the built-in guest ({} vCPU, {} RAM) with a temporary {} disk at {}: {:?}",
            pass + 1,
            plan.vm.cpus,
            format_size(plan.vm.memory),
            format_size(DISK_SIZE),
            path.display(),
            plan.vm.cmdline
        );
        code = run_child(&args);
        if code != 0 {
            break;
        }
    }
    let _ = std::fs::remove_file(&path);
    if code == 0 {
        eprintln!("ringvm: the guest wrote 1 MiB through virtio-blk and read it back intact");
    }
    exit(code)
}

/// Runs the VM of `args` as `ringvm run ...` in a child process with this
/// process's stdio; returns its exit code.
fn run_child(args: &RunArgs) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            error_line(&anyhow::Error::new(e).context("finding the ringvm binary"));
            return exit_code::HOST_ERROR;
        }
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["run", "--kernel", &args.kernel, "--memory", &args.memory])
        .args(["--cpus", &args.cpus.to_string(), "--serial", &args.serial])
        .args(["--iothreads", &args.iothreads.to_string()])
        .args(["--cmdline", &args.cmdline]);
    for d in &args.disk {
        cmd.args(["--disk", d]);
    }
    match cmd.status() {
        Ok(status) => status.code().unwrap_or(exit_code::HOST_ERROR),
        Err(e) => {
            error_line(&anyhow::Error::new(e).context("starting ringvm run"));
            exit_code::HOST_ERROR
        }
    }
}

fn write_builtin(path: &std::path::Path) -> Result<()> {
    std::fs::write(path, BUILTIN_GUEST).with_context(|| format!("writing {}", path.display()))
}

fn main() -> ExitCode {
    // One malloc arena for all threads: per-thread arenas cost each vCPU
    // thread a fresh heap for the few allocations it ever makes.
    // SAFETY: mallopt only tunes the allocator; called before any thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    logger::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; a usage
            // error is one line on stderr and exit code 2.
            if !e.use_stderr() {
                let _ = e.print();
                return exit(0);
            }
            // clap spreads one error over several lines before the usage.
            let rendered = e.render().to_string();
            let msg: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            let msg = msg.join(" ");
            eprintln!(
                "ringvm: error: {} (see ringvm --help)",
                msg.trim_start_matches("error: ")
            );
            return exit(exit_code::BAD_INPUT);
        }
    };
    match cli.command {
        None => demo(),
        Some(Command::Run(args)) => run(args),
        Some(Command::Serve(args)) => serve(&args),
        Some(Command::Remote(args)) => remote(&args),
        Some(Command::BuiltinGuest { output }) => match write_builtin(&output) {
            Ok(()) => {
                eprintln!(
                    "ringvm: wrote the built-in guest ({} bytes) to {}",
                    BUILTIN_GUEST.len(),
                    output.display()
                );
                exit(0)
            }
            Err(e) => {
                error_line(&e);
                exit(exit_code::BAD_INPUT)
            }
        },
    }
}
