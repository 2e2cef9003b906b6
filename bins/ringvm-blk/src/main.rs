//! `ringvm-blk`: a vhost-user-blk daemon serving one disk with ringvm's
//! virtio-blk device and io_uring backend (see `backend.rs` for how the
//! vhost-user lifecycle drives the device).
//!
//! ```text
//! ringvm-blk --socket PATH --disk path=FILE[,readonly=on][,direct=on][,queues=N][,serial=ID]...
//!            [--iothreads N]
//! ```
//!
//! It listens on PATH and serves one front-end at a time; when one
//! disconnects it waits for the next. SIGTERM, SIGINT or SIGHUP: in-flight
//! requests complete, the file is flushed, and it exits with 0. Bad input
//! (options, a missing disk) prints one error line and exits with 2; other
//! failures exit with 1.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::Parser;
use log::{LevelFilter, Log, Metadata, Record};
use uring_backend::executor::PollWhen;
use uring_backend::iothread::IoThread;
use vhost::vhost_user::Listener;
use vhost_user_backend::ShutdownHandle;
use virtio::blk::{BlockDevice, DiskConfig};
use virtio::VirtioDevice;
use vmm::seccomp::{SeccompMode, ThreadKind};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BAD_INPUT: u8 = 2;
const IOTHREAD_RING_ENTRIES: u32 = 256;

/// Serve a disk to a vhost-user front-end (QEMU, Cloud Hypervisor, ...)
/// as a vhost-user-blk device.
#[derive(Parser, Debug)]
#[command(name = "ringvm-blk", version)]
struct Cli {
    /// The Unix socket to listen on (created; an old one is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The disk, as `ringvm run --disk`:
    /// path=PATH[,readonly=on][,direct=on][,queues=N][,queue_size=N][,serial=ID][,iothread=I[:J...]][,fixed_buffers=off][,engine=auto|uring|sync]
    /// (fixed buffers are on by default here: the front-end's memory is
    /// registered with the iothreads' rings where the kernel allows)
    #[arg(long, value_name = "SPEC")]
    disk: String,
    /// io_uring iothreads serving the queues (round-robin).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    iothreads: u16,
    /// Microseconds an idle iothread busy-polls for new requests and
    /// completions before it sleeps (0 never polls; the default is 0, or
    /// 50 when `--poll-mode` is given); in `adaptive` mode, the most it
    /// polls for. Polling can lower
    /// latency at low queue depth where a spare core is awake, and costs
    /// CPU (docs/benchmarks.md, issue 14, session 9: on a 2-vCPU VM host
    /// it lowered neither latency nor IOPS).
    #[arg(long, value_name = "US",
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    poll_us: Option<u32>,
    /// When to poll: `always` (new requests and completions), `io` (only
    /// while reads and writes are in flight: completions without a
    /// wake-up, while an idle queue still sleeps) or `adaptive` (whenever
    /// idle, for a window between 0 and `--poll-us` that follows the gaps
    /// between requests: it grows while polling would catch the next
    /// request and shrinks to nothing when requests are sparse; the
    /// default).
    #[arg(long, value_name = "always|io|adaptive",
          value_parser = ["always", "io", "adaptive"])]
    poll_mode: Option<String>,
    /// Pin iothreads to host CPUs: `IOTHREAD@CPUS`, CPUS a list of host
    /// CPUs and ranges separated by `:` (`0@2`, `1@0-3:6`); comma-separated
    /// or repeated, as `ringvm run --iothread-affinity`. Placing an
    /// iothread on the CPU of the front-end's queue (its vCPU or client)
    /// saves a cross-CPU wake-up per request (docs/benchmarks.md, issue
    /// 14).
    #[arg(long, value_name = "IOTHREAD@CPUS")]
    iothread_affinity: Vec<String>,
    /// On exit, print each iothread's CPU time and executor counters (as
    /// `ringvm run --iothread-stats`).
    #[arg(long)]
    iothread_stats: bool,
    /// Seccomp filters per thread kind, as `ringvm run --seccomp`: the
    /// protocol thread (and the per-connection handler it starts), the
    /// iothreads and the signal thread. `true` ends the daemon (exit code
    /// 109, naming the thread and the call) on a call outside the list.
    #[arg(long, value_name = "true|false|log", default_value = "true",
          value_parser = ["true", "false", "log"])]
    seccomp: String,
}

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "ringvm-blk: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

/// Level from `RINGVM_LOG` (error, warn, info, debug, trace; default warn).
fn init_logger() {
    let level = std::env::var("RINGVM_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Warn);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

fn error_line(err: &anyhow::Error) {
    let mut line = format!("ringvm-blk: error: {err}");
    for cause in err.chain().skip(1) {
        line.push_str(&format!(": {cause}"));
    }
    eprintln!("{line}");
}

/// The signals that stop the daemon, blocked in every thread and taken by
/// the signal thread with `sigwait`.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for these calls to fill in.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    set
}

/// What the signal thread and the accept loop share.
struct Stop {
    requested: AtomicBool,
    /// Wakes the accept loop.
    event: EventFd,
    /// The connection being served, to cut on a signal.
    connection: Mutex<Option<ShutdownHandle>>,
}

impl Stop {
    fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.event.write(1);
        if let Some(h) = self
            .connection
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            h.shutdown();
        }
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn set_connection(&self, h: Option<ShutdownHandle>) {
        *self.connection.lock().unwrap_or_else(|e| e.into_inner()) = h;
    }
}

fn spawn_signal_thread(set: libc::sigset_t, stop: Arc<Stop>, mode: SeccompMode) -> Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            static SANDBOXED: std::sync::Once = std::sync::Once::new();
            SANDBOXED.call_once(|| {
                if let Err(e) = vmm::seccomp::apply(ThreadKind::Signals, mode) {
                    log::error!("signal thread: {e}; stopping");
                    stop.request();
                }
            });
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is an initialised sigset and `sig` a valid out
            // pointer; the signals are blocked in every thread.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc == 0 {
                log::info!("signal {sig}: stopping");
                stop.request();
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Waits until the listener has a connection (true) or a stop was
/// requested (false).
fn wait_for_connection(listener: &Listener, stop: &Stop) -> Result<bool> {
    loop {
        if stop.requested() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("waiting for a front-end");
        }
        if fds[1].revents != 0 || stop.requested() {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
        if fds[0].revents != 0 {
            anyhow::bail!("the listening socket failed");
        }
    }
}

/// Serves front-ends one after another until a stop is requested.
fn serve(listener: &mut Listener, device: &Arc<Mutex<BlockDevice>>, stop: &Stop) -> Result<()> {
    while wait_for_connection(listener, stop)? {
        ringvm_blk::serve_connection(listener, device, |handle| {
            stop.set_connection(handle);
            if stop.requested() {
                if let Some(h) = stop
                    .connection
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                {
                    h.shutdown();
                }
            }
        })?;
        stop.set_connection(None);
    }
    Ok(())
}

/// The poll ceiling in microseconds when only `--poll-mode` is given.
const POLL_US_WITH_MODE: u32 = 50;

/// The iothreads' poll time and mode from `--poll-us` and `--poll-mode`:
/// no polling unless either is given; a mode alone polls up to
/// [`POLL_US_WITH_MODE`], a time alone polls adaptively.
fn poll_setting(poll_us: Option<u32>, mode: Option<&str>) -> (std::time::Duration, PollWhen) {
    let default_us = if mode.is_some() { POLL_US_WITH_MODE } else { 0 };
    let us = poll_us.unwrap_or(default_us);
    let when = match mode {
        Some("always") => PollWhen::Always,
        Some("io") => PollWhen::IoInFlight,
        _ => PollWhen::Adaptive,
    };
    (std::time::Duration::from_micros(u64::from(us)), when)
}

fn run(cli: Cli) -> Result<u8> {
    // The front-end's shared memory is registered with each iothread's
    // ring (fixed buffers) unless `fixed_buffers=off`.
    let config = match DiskConfig::parse_with_fixed_buffers(&cli.disk, true) {
        Ok(c) => c,
        Err(e) => {
            error_line(&anyhow::Error::new(e));
            return Ok(BAD_INPUT);
        }
    };
    // Block the stop signals before any thread exists, so that every
    // thread inherits the mask and only the signal thread takes them.
    let set = stop_signals();
    // SAFETY: `set` is initialised; a null old-mask pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        anyhow::bail!(
            "blocking signals: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    let mode: SeccompMode = cli.seccomp.parse().context("--seccomp")?;
    let affinity = match vmm::affinity::by_index(
        &cli.iothread_affinity,
        usize::from(cli.iothreads),
        "iothread",
    ) {
        Ok(a) => a,
        Err(e) => {
            error_line(&anyhow::Error::new(e).context("--iothread-affinity"));
            return Ok(BAD_INPUT);
        }
    };
    let iothreads = (0..cli.iothreads)
        .map(|i| {
            let pin = affinity[usize::from(i)].clone();
            let sandbox: uring_backend::iothread::Sandbox = Box::new(move || {
                if let Some(set) = pin {
                    set.apply_to_current_thread(&format!("iothread {i}"))
                        .map_err(|e| vmm::error_line(&e))?;
                }
                vmm::seccomp::apply(ThreadKind::IoThread, mode).map_err(|e| format!("{e:#}"))
            });
            IoThread::spawn_sandboxed(
                &format!("iothread{i}"),
                IOTHREAD_RING_ENTRIES,
                Some(sandbox),
            )
            .map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()
        .context("starting the iothreads")?;
    let (poll, when) = poll_setting(cli.poll_us, cli.poll_mode.as_deref());
    for t in &iothreads {
        t.set_poll(poll, when);
    }
    let device = match BlockDevice::new("vhost-user-blk", &config, &iothreads) {
        Ok(d) => d,
        Err(e) => {
            error_line(&anyhow::Error::new(e));
            return Ok(BAD_INPUT);
        }
    };
    let sectors = device.capacity();
    let disk = device.disk().clone();
    let device = Arc::new(Mutex::new(device));
    let mut listener = match Listener::new(&cli.socket, true) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "ringvm-blk: error: listening on {}: {e}",
                cli.socket.display()
            );
            return Ok(BAD_INPUT);
        }
    };
    let stop = Arc::new(Stop {
        requested: AtomicBool::new(false),
        event: EventFd::new(EFD_NONBLOCK).context("creating the stop eventfd")?,
        connection: Mutex::new(None),
    });
    spawn_signal_thread(set, stop.clone(), mode)?;
    // Opened now: the protocol thread may not open files once sandboxed.
    let sync_file = if disk.readonly() {
        None
    } else {
        Some(
            std::fs::File::open(disk.path())
                .with_context(|| format!("opening {} to flush it", disk.path().display()))?,
        )
    };
    eprintln!(
        "ringvm-blk: serving {} ({sectors} sectors, {} queue(s){}) on {}",
        config.path.display(),
        config.queues,
        if config.readonly { ", read-only" } else { "" },
        cli.socket.display()
    );
    vmm::seccomp::apply(ThreadKind::VhostUser, mode).context("seccomp")?;
    vmm::seccomp::test_call(ThreadKind::VhostUser);
    let served = serve(&mut listener, &device, &stop);
    // Every request has completed once the device is reset; then make
    // what was written durable.
    device.lock().unwrap_or_else(|e| e.into_inner()).reset();
    let _ = std::fs::remove_file(&cli.socket);
    served?;
    if let Some(f) = sync_file {
        f.sync_all()
            .with_context(|| format!("flushing {}", disk.path().display()))?;
    }
    if cli.iothread_stats {
        for t in &iothreads {
            eprintln!("ringvm-blk: {}", t.stats_line());
        }
    }
    drop(iothreads);
    eprintln!("ringvm-blk: stopped");
    Ok(0)
}

fn main() -> ExitCode {
    init_logger();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad arguments");
            eprintln!(
                "ringvm-blk: {} (see ringvm-blk --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(BAD_INPUT);
        }
    };
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            error_line(&e);
            1
        }
    };
    let _ = std::io::stdout().flush();
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn polling_is_off_unless_asked_for_and_a_mode_alone_gets_a_ceiling() {
        assert_eq!(
            poll_setting(None, None),
            (Duration::ZERO, PollWhen::Adaptive)
        );
        assert_eq!(
            poll_setting(Some(20), None),
            (Duration::from_micros(20), PollWhen::Adaptive)
        );
        assert_eq!(
            poll_setting(None, Some("always")),
            (Duration::from_micros(50), PollWhen::Always)
        );
        assert_eq!(
            poll_setting(None, Some("io")),
            (Duration::from_micros(50), PollWhen::IoInFlight)
        );
        assert_eq!(
            poll_setting(Some(0), Some("adaptive")),
            (Duration::ZERO, PollWhen::Adaptive)
        );
    }
}
