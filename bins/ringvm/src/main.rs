//! The `ringvm` command.

mod cli;
mod logger;
mod vm;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, RunArgs};
use vmm::config::format_size;
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

fn run(args: &RunArgs) -> ExitCode {
    match args.to_plan() {
        Ok(plan) => exit(run_plan(&plan)),
        Err(e) => {
            error_line(&e);
            exit(exit_code::BAD_INPUT)
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
        Some(Command::Run(args)) => run(&args),
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
