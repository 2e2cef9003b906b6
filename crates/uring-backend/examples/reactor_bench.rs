//! Closed-loop 4 KiB random reads from a 256 MiB file in /dev/shm, at
//! queue depth 1 and 32, through:
//! - this crate's executor (readv, and read_fixed on registered buffers),
//! - tokio-uring 0.5 (with `--features bench-tokio-uring`),
//! - plain synchronous `pread` (queue depth 1 only).
//!
//! Reports ops/s, CPU time per op of the driving thread and of the whole
//! process (which includes io_uring's io-wq workers, if any), and for our
//! executor the `io_uring_enter` calls per op.
//!
//! ```text
//! cargo run --release -p uring-backend --example reactor_bench \
//!     [--features bench-tokio-uring] -- [SECONDS] [FILE]
//! ```

use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use uring_backend::block::{BlockFile, BlockOpenOptions};
use uring_backend::{Executor, IoBuf};

const FILE_SIZE: u64 = 256 << 20;
const BLOCK: usize = 4096;
const BLOCKS: u64 = FILE_SIZE / BLOCK as u64;

fn cpu(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Thread and process CPU clocks.
fn cpu_now() -> (Duration, Duration) {
    (
        cpu(libc::CLOCK_THREAD_CPUTIME_ID),
        cpu(libc::CLOCK_PROCESS_CPUTIME_ID),
    )
}

struct Rng(u64);

impl Rng {
    fn offset(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % BLOCKS) * BLOCK as u64
    }
}

struct Measured {
    ops: u64,
    wall: Duration,
    thread_cpu: Duration,
    process_cpu: Duration,
    enters: Option<u64>,
}

fn report(name: &str, qd: usize, r: &Measured) {
    let per = |d: Duration| d.as_nanos() as f64 / r.ops as f64 / 1000.0;
    let enters = r
        .enters
        .map(|e| format!("{:.3}", e as f64 / r.ops as f64))
        .unwrap_or_else(|| "-".into());
    println!(
        "{name:<22} QD{qd:<3} {:>10.0} ops/s  {:>6.2} us/op thread CPU  {:>6.2} us/op process CPU  {enters:>6} enters/op",
        r.ops as f64 / r.wall.as_secs_f64(),
        per(r.thread_cpu),
        per(r.process_cpu),
    );
}

fn ours(path: &Path, qd: usize, secs: Duration, fixed: bool) -> Option<Measured> {
    let ex = Executor::new(64).expect("executor");
    let disk = BlockFile::open(path, BlockOpenOptions::default()).expect("open");
    let bufs: Vec<Rc<IoBuf>> = (0..qd).map(|_| Rc::new(IoBuf::new(BLOCK))).collect();
    if fixed {
        let regions: Vec<(*mut u8, usize)> = bufs.iter().map(|b| (b.as_ptr(), b.len())).collect();
        if let Err(e) = ex.register_buffers(&regions) {
            println!("fixed buffers refused: {e}");
            return None;
        }
    }
    let ops = Rc::new(Cell::new(0u64));
    let live = Rc::new(Cell::new(qd));
    let start = Instant::now();
    let (cpu0, stats0) = (cpu_now(), ex.stats().snapshot());
    for (i, buf) in bufs.into_iter().enumerate() {
        let (ex2, disk, ops, live) = (ex.clone(), disk.clone(), ops.clone(), live.clone());
        let index = ex.fixed_index_for(buf.as_ptr(), BLOCK);
        ex.spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
            while start.elapsed() < secs {
                let off = rng.offset();
                let keep = Box::new(buf.clone());
                let n = match index {
                    Some(idx) => {
                        disk.read_fixed(&ex2, off, buf.as_ptr(), BLOCK, idx, keep)
                            .await
                    }
                    None => disk.readv(&ex2, off, vec![buf.iovec(0, BLOCK)], keep).await,
                };
                assert_eq!(n.expect("read"), BLOCK);
                ops.set(ops.get() + 1);
            }
            live.set(live.get() - 1);
            if live.get() == 0 {
                ex2.stop();
            }
        });
    }
    ex.run().expect("run");
    let (cpu1, stats1) = (cpu_now(), ex.stats().snapshot());
    Some(Measured {
        ops: ops.get(),
        wall: start.elapsed(),
        thread_cpu: cpu1.0 - cpu0.0,
        process_cpu: cpu1.1 - cpu0.1,
        enters: Some(stats1.enters - stats0.enters),
    })
}

fn pread(path: &Path, secs: Duration) -> Measured {
    let f = File::open(path).expect("open");
    let mut buf = vec![0u8; BLOCK];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut ops = 0;
    let start = Instant::now();
    let cpu0 = cpu_now();
    while start.elapsed() < secs {
        let n = f.read_at(&mut buf, rng.offset()).expect("pread");
        assert_eq!(n, BLOCK);
        ops += 1;
    }
    let cpu1 = cpu_now();
    Measured {
        ops,
        wall: start.elapsed(),
        thread_cpu: cpu1.0 - cpu0.0,
        process_cpu: cpu1.1 - cpu0.1,
        enters: None,
    }
}

#[cfg(feature = "bench-tokio-uring")]
fn tokio_uring(path: &Path, qd: usize, secs: Duration) -> Measured {
    let path = path.to_path_buf();
    tokio_uring::start(async move {
        let file = Rc::new(tokio_uring::fs::File::open(&path).await.expect("open"));
        let ops = Rc::new(Cell::new(0u64));
        let start = Instant::now();
        let cpu0 = cpu_now();
        let handles: Vec<_> = (0..qd)
            .map(|i| {
                let (file, ops) = (file.clone(), ops.clone());
                tokio_uring::spawn(async move {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
                    let mut buf = vec![0u8; BLOCK];
                    while start.elapsed() < secs {
                        let (res, b) = file.read_at(buf, rng.offset()).await;
                        assert_eq!(res.expect("read"), BLOCK);
                        buf = b;
                        ops.set(ops.get() + 1);
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.expect("task");
        }
        let cpu1 = cpu_now();
        Measured {
            ops: ops.get(),
            wall: start.elapsed(),
            thread_cpu: cpu1.0 - cpu0.0,
            process_cpu: cpu1.1 - cpu0.1,
            enters: None,
        }
    })
}

fn make_file(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == FILE_SIZE) {
        return;
    }
    let f = File::create(path).expect("create");
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for i in 0..FILE_SIZE / chunk.len() as u64 {
        f.write_all_at(&chunk, i * chunk.len() as u64)
            .expect("fill");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let secs = Duration::from_secs_f64(args.next().and_then(|s| s.parse().ok()).unwrap_or(3.0));
    let path = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "/dev/shm/ringvm-reactor-bench.img".into()),
    );
    make_file(&path);
    println!(
        "4 KiB random reads from {} (256 MiB), {secs:?} per run",
        path.display()
    );
    for qd in [1, 32] {
        if let Some(r) = ours(&path, qd, secs, false) {
            report("ringvm executor readv", qd, &r);
        }
        if let Some(r) = ours(&path, qd, secs, true) {
            report("ringvm executor fixed", qd, &r);
        }
        #[cfg(feature = "bench-tokio-uring")]
        report("tokio-uring 0.5", qd, &tokio_uring(&path, qd, secs));
        if qd == 1 {
            report("sync pread", 1, &pread(&path, secs));
        }
    }
    #[cfg(not(feature = "bench-tokio-uring"))]
    println!("(tokio-uring not measured: build with --features bench-tokio-uring)");
}
