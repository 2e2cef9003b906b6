//! blkbench: closed-loop 4 KiB random reads and writes through libblkio
//! (the `blkio` crate) against
//!
//! - `io_uring`: libblkio's io_uring driver on the file or device itself,
//! - `ringvm`: `ringvm-blk` through libblkio's `virtio-blk-vhost-user`,
//! - `qsd`: `qemu-storage-daemon --export type=vhost-user-blk` the same way,
//!
//! reporting IOPS, mean and p99 latency, and CPU seconds per million
//! requests of the backend process (from /proc/PID/stat) and of this one.
//! See README.md for how to run it.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};

const BS: usize = 4096;

struct Args {
    file: PathBuf,
    qds: Vec<usize>,
    duration: Duration,
    backends: Vec<String>,
    ringvm_blk: PathBuf,
    qsd: PathBuf,
    ringvm_disk_opts: String,
    /// `--poll-us` for the `ringvm-poll` backend.
    poll_us: u32,
    rounds: usize,
}

fn usage() -> ! {
    eprintln!(
        "usage: blkbench --file PATH [--qd 1,32] [--duration SECS] \
         [--backends io_uring,ringvm,qsd] [--ringvm-blk PATH] [--qsd PATH] \
         [--ringvm-disk-opts direct=on] [--poll-us 50] [--rounds N]   (backends also: ringvm-poll, ringvm-pollio, ringvm-adaptive, ringvm-nopoll; RINGVM_BLK_ARGS adds arguments to ringvm-blk, e.g. --iothread-stats)"
    );
    std::process::exit(2)
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        file: PathBuf::new(),
        qds: vec![1, 32],
        duration: Duration::from_secs(5),
        backends: vec!["io_uring".into(), "ringvm".into(), "qsd".into()],
        ringvm_blk: PathBuf::from("target/release/ringvm-blk"),
        qsd: PathBuf::from("qemu-storage-daemon"),
        ringvm_disk_opts: "direct=on".into(),
        poll_us: 50,
        rounds: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--file" => a.file = v().into(),
            "--qd" => {
                a.qds = v()
                    .split(',')
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?
            }
            "--duration" => a.duration = Duration::from_secs_f64(v().parse()?),
            "--backends" => a.backends = v().split(',').map(String::from).collect(),
            "--ringvm-blk" => a.ringvm_blk = v().into(),
            "--qsd" => a.qsd = v().into(),
            "--ringvm-disk-opts" => a.ringvm_disk_opts = v(),
            "--poll-us" => a.poll_us = v().parse()?,
            "--rounds" => a.rounds = v().parse::<usize>()?.max(1),
            _ => usage(),
        }
    }
    if a.file.as_os_str().is_empty() {
        usage();
    }
    Ok(a)
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').context("bad stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after `)`.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

struct Backend {
    name: String,
    child: Option<Child>,
    socket: Option<PathBuf>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            // SAFETY: kill has no memory-safety preconditions; the pid is
            // our own child's, not yet reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        if let Some(s) = &self.socket {
            let _ = std::fs::remove_file(s);
        }
    }
}

fn start_backend(name: &str, args: &Args, dir: &Path) -> Result<Backend> {
    let file = args.file.display().to_string();
    let socket = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let mut cmd = match name {
        "io_uring" => {
            return Ok(Backend {
                name: name.into(),
                child: None,
                socket: None,
            })
        }
        "ringvm" | "ringvm-poll" | "ringvm-pollio" | "ringvm-adaptive" | "ringvm-nopoll" => {
            let mut c = Command::new(&args.ringvm_blk);
            if name == "ringvm-nopoll" {
                c.arg("--poll-us").arg("0");
            } else if name != "ringvm" {
                c.arg("--poll-us").arg(args.poll_us.to_string());
            }
            if name == "ringvm-poll" {
                c.arg("--poll-mode").arg("always");
            }
            if name == "ringvm-pollio" {
                c.arg("--poll-mode").arg("io");
            }
            if name == "ringvm-adaptive" {
                c.arg("--poll-mode").arg("adaptive");
            }
            // Extra daemon arguments (e.g. `--iothread-stats`).
            if let Ok(extra) = std::env::var("RINGVM_BLK_ARGS") {
                c.args(extra.split_whitespace());
            }
            c.arg("--socket").arg(&socket).arg("--disk").arg(format!(
                "path={file}{}{}",
                if args.ringvm_disk_opts.is_empty() {
                    ""
                } else {
                    ","
                },
                args.ringvm_disk_opts
            ));
            c
        }
        "qsd" => {
            let driver = if std::fs::metadata(&args.file)
                .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
                .unwrap_or(false)
            {
                "host_device"
            } else {
                "file"
            };
            let mut c = Command::new(&args.qsd);
            c.arg("--blockdev").arg(format!(
                "driver={driver},node-name=disk,filename={file},aio=io_uring,cache.direct=on"
            ));
            c.arg("--export").arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ));
            c
        }
        _ => bail!("unknown backend {name}"),
    };
    let child = cmd
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("{name}: no socket at {} after 10 s", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Backend {
        name: name.into(),
        child: Some(child),
        socket: Some(socket),
    })
}

fn open(backend: &Backend, args: &Args) -> Result<(Blkio, Blkioq, u64)> {
    let e = |e: blkio::Error| anyhow::anyhow!("{}: {}", backend.name, e.message());
    let (mut b, path) = match &backend.socket {
        None => (
            Blkio::new("io_uring").map_err(e)?,
            args.file.display().to_string(),
        ),
        Some(s) => (
            Blkio::new("virtio-blk-vhost-user").map_err(e)?,
            s.display().to_string(),
        ),
    };
    b.set_str("path", &path).map_err(e)?;
    if backend.socket.is_none() {
        b.set_bool("direct", true).map_err(e)?;
    }
    // The daemon may still be getting ready to accept.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match b.connect() {
            Ok(()) => break,
            Err(err) if Instant::now() < deadline => {
                let _ = err;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => return Err(e(err)),
        }
    }
    b.set_i32("num-queues", 1).map_err(e)?;
    let mut started = b.start().map_err(e)?;
    let capacity = b.get_u64("capacity").map_err(e)?;
    let q = started.queues.pop().context("no queue")?;
    Ok((b, q, capacity))
}

struct Outcome {
    requests: u64,
    elapsed: Duration,
    mean: Duration,
    p99: Duration,
}

/// xorshift64*: cheap random offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn run(
    b: &mut Blkio,
    q: &mut Blkioq,
    capacity: u64,
    qd: usize,
    write: bool,
    duration: Duration,
) -> Result<Outcome> {
    let region = b
        .alloc_mem_region(qd * BS)
        .map_err(|e| anyhow::anyhow!("alloc_mem_region: {}", e.message()))?;
    b.map_mem_region(&region)
        .map_err(|e| anyhow::anyhow!("map_mem_region: {}", e.message()))?;
    let blocks = capacity / BS as u64;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ qd as u64 ^ u64::from(write));
    let mut started = vec![Instant::now(); qd];
    let submit = |q: &mut Blkioq, slot: usize, rng: &mut Rng| {
        let offset = (rng.next() % blocks) * BS as u64;
        let buf = (region.addr + slot * BS) as *mut u8;
        if write {
            q.write(offset, buf, BS, slot, ReqFlags::empty());
        } else {
            q.read(offset, buf, BS, slot, ReqFlags::empty());
        }
    };
    let mut lat: Vec<u32> = Vec::with_capacity(1 << 20);
    let t0 = Instant::now();
    for (slot, s) in started.iter_mut().enumerate() {
        *s = Instant::now();
        submit(q, slot, &mut rng);
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..qd).map(|_| MaybeUninit::uninit()).collect();
    let mut outstanding = qd;
    let mut stopping = false;
    while outstanding > 0 {
        let n = q
            .do_io(&mut completions, 1, None, None)
            .map_err(|e| anyhow::anyhow!("do_io: {}", e.message()))?;
        let now = Instant::now();
        if now - t0 >= duration {
            stopping = true;
        }
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                bail!("request failed: {}", c.ret);
            }
            let slot = c.user_data;
            lat.push((now - started[slot]).as_nanos().min(u128::from(u32::MAX)) as u32);
            if stopping {
                outstanding -= 1;
            } else {
                started[slot] = Instant::now();
                submit(q, slot, &mut rng);
            }
        }
    }
    let elapsed = t0.elapsed();
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    lat.sort_unstable();
    let total: u128 = lat.iter().map(|&l| u128::from(l)).sum();
    let count = lat.len().max(1);
    Ok(Outcome {
        requests: lat.len() as u64,
        elapsed,
        mean: Duration::from_nanos((total / count as u128) as u64),
        p99: Duration::from_nanos(u64::from(
            lat.get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0),
        )),
    })
}

fn print_row(name: &str, write: bool, qd: usize, r: &[f64; 4], client_cpu: f64) {
    let cpu = if r[3].is_nan() {
        "-".to_string()
    } else {
        format!("{:.2}", r[3])
    };
    let client = if client_cpu.is_nan() {
        "-".to_string()
    } else {
        format!("{client_cpu:.2}")
    };
    println!(
        "{:<13} {:<5} {:>3} {:>10.0} {:>10.1} {:>10.1} {:>16} {:>16}",
        name,
        if write { "write" } else { "read" },
        qd,
        r[0],
        r[1],
        r[2],
        cpu,
        client
    );
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let dir = std::env::temp_dir().join(format!("blkbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "{:<13} {:<5} {:>3} {:>10} {:>10} {:>10} {:>16} {:>16}",
        "backend", "op", "qd", "IOPS", "mean(us)", "p99(us)", "backend cpu s/M", "client cpu s/M"
    );
    // Backends innermost: the rows compared with each other are measured
    // next to each other in time, round after round.
    let mut results: Vec<(String, bool, usize, Vec<[f64; 4]>)> = Vec::new();
    for _round in 0..args.rounds {
        for &qd in &args.qds {
            for write in [false, true] {
                for name in &args.backends {
                    // A fresh backend per run, so each CPU figure is its own.
                    let backend = start_backend(name, &args, &dir)?;
                    let (mut b, mut q, capacity) = open(&backend, &args)?;
                    let pid = backend.child.as_ref().map(|c| c.id());
                    let me = std::process::id();
                    let cpu0 = pid.map(cpu_seconds).transpose()?;
                    let me0 = cpu_seconds(me)?;
                    let o = run(&mut b, &mut q, capacity, qd, write, args.duration)?;
                    let cpu1 = pid.map(cpu_seconds).transpose()?;
                    let me1 = cpu_seconds(me)?;
                    drop(q);
                    drop(b);
                    let per_m = |d: f64| d / (o.requests as f64 / 1e6);
                    let backend_cpu = match (cpu0, cpu1) {
                        (Some(a), Some(b)) => per_m(b - a),
                        _ => f64::NAN,
                    };
                    let row = [
                        o.requests as f64 / o.elapsed.as_secs_f64(),
                        o.mean.as_secs_f64() * 1e6,
                        o.p99.as_secs_f64() * 1e6,
                        backend_cpu,
                    ];
                    print_row(name, write, qd, &row, per_m(me1 - me0));
                    match results
                        .iter_mut()
                        .find(|r| &r.0 == name && r.1 == write && r.2 == qd)
                    {
                        Some(r) => r.3.push(row),
                        None => results.push((name.clone(), write, qd, vec![row])),
                    }
                    drop(backend);
                }
            }
        }
    }
    if args.rounds > 1 {
        println!("median of {} rounds:", args.rounds);
        for (name, write, qd, rows) in &results {
            let med = |i: usize| {
                let mut v: Vec<f64> = rows.iter().map(|r| r[i]).collect();
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            };
            print_row(name, *write, *qd, &[med(0), med(1), med(2), med(3)], f64::NAN);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
