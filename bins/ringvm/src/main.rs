//! The `ringvm` command.

mod cli;
mod logger;

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command, RunArgs};
use vmm::config::format_size;
use vmm::{exit_code, KernelSource, MachineError};

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

fn run(args: &RunArgs, announce: bool) -> ExitCode {
    let config = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            error_line(&e);
            return exit(exit_code::BAD_INPUT);
        }
    };
    if announce {
        eprintln!(
            "ringvm: booting the built-in guest: {} vCPU, {} RAM, serial on stdout, command line {:?}",
            config.cpus,
            format_size(config.memory),
            config.cmdline
        );
    }
    match vmm::run(&config) {
        Ok(report) => {
            let kernel = match &config.kernel {
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
            exit(report.reason.exit_code())
        }
        Err(e) => {
            let code = if e.is_bad_input() {
                exit_code::BAD_INPUT
            } else {
                exit_code::HOST_ERROR
            };
            error_line(&anyhow::Error::new::<MachineError>(e));
            exit(code)
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
        None => run(&RunArgs::builtin_default(), true),
        Some(Command::Run(args)) => run(&args, false),
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
