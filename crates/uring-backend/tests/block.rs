//! Raw files through the executor: real io_uring, real files.

mod common;

use std::rc::Rc;
use std::sync::mpsc;

use common::{block_on, pattern, TempFile};
use uring_backend::block::{BlockError, BlockFile, BlockOpenOptions, IoEngine};
use uring_backend::iothread::IoThread;
use uring_backend::{Executor, IoBuf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const RW: BlockOpenOptions = BlockOpenOptions {
    readonly: false,
    direct: false,
    engine: IoEngine::Uring,
};
const RO: BlockOpenOptions = BlockOpenOptions {
    readonly: true,
    direct: false,
    engine: IoEngine::Uring,
};
/// Both engines, for the tests that run on each.
const ENGINES: [IoEngine; 2] = [IoEngine::Uring, IoEngine::Sync];

fn rw(engine: IoEngine) -> BlockOpenOptions {
    BlockOpenOptions { engine, ..RW }
}

fn ro(engine: IoEngine) -> BlockOpenOptions {
    BlockOpenOptions { engine, ..RO }
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> Option<i32> {
    r.expect_err("must fail").raw_os_error()
}

/// Writes `data` at `offset` in three iovecs of uneven sizes.
async fn write_split(ex: &Rc<Executor>, disk: &BlockFile, offset: u64, data: &[u8]) -> usize {
    let buf = Rc::new(IoBuf::new(data.len()));
    buf.write_at(0, data);
    let (a, b) = (data.len() / 3, data.len() / 3 + 1);
    let iov = vec![
        buf.iovec(0, a),
        buf.iovec(a, b),
        buf.iovec(a + b, data.len() - a - b),
    ];
    disk.writev(ex, offset, iov, Box::new(buf))
        .await
        .expect("writev")
}

async fn read_back(
    ex: &Rc<Executor>,
    disk: &BlockFile,
    offset: u64,
    len: usize,
) -> (usize, Vec<u8>) {
    let buf = Rc::new(IoBuf::new(len));
    let n = disk
        .readv(ex, offset, vec![buf.iovec(0, len)], Box::new(buf.clone()))
        .await
        .expect("readv");
    (n, buf.to_vec())
}

fn roundtrip_in(dir: &str, engine: IoEngine) {
    let file = TempFile::new(dir, 1 << 20);
    let disk = BlockFile::open(file.path(), rw(engine)).expect("open");
    assert_eq!(disk.synchronous(), engine == IoEngine::Sync);
    assert_eq!(disk.size(), 1 << 20);
    assert!(!disk.is_block_device());
    assert_eq!(disk.logical_block_size(), 512);
    let ex = Executor::new(32).expect("executor");
    let ex2 = ex.clone();
    block_on(&ex, async move {
        for (i, offset) in [0u64, 4096, 12345, (1 << 20) - 7000]
            .into_iter()
            .enumerate()
        {
            let data = pattern(i as u8, 7000);
            assert_eq!(write_split(&ex2, &disk, offset, &data).await, 7000);
            let (n, back) = read_back(&ex2, &disk, offset, 7000).await;
            assert_eq!(n, 7000);
            assert_eq!(back, data, "at {offset}");
        }
        disk.flush(&ex2).await.expect("flush");
    });
    let on_disk = std::fs::read(file.path()).expect("read file");
    assert_eq!(&on_disk[12345..12345 + 7000], &pattern(2, 7000)[..]);
}

#[test]
fn writev_then_readv_round_trips_on_ext4_and_tmpfs() {
    for engine in ENGINES {
        roundtrip_in("/tmp", engine);
        roundtrip_in("/dev/shm", engine);
    }
}

/// `engine=auto` runs a file in memory synchronously (io_uring would hand
/// each of its operations to a worker thread) and everything else
/// through the ring; an explicit engine is taken as given.
#[test]
fn the_auto_engine_is_synchronous_for_files_in_memory_only() {
    let auto = |dir: &str, direct: bool| {
        let file = TempFile::new(dir, 1 << 16);
        let opts = BlockOpenOptions {
            readonly: false,
            direct,
            engine: IoEngine::Auto,
        };
        BlockFile::open(file.path(), opts).map(|d| d.synchronous())
    };
    assert!(auto("/dev/shm", false).expect("open"), "tmpfs");
    let tmp_fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T", "/tmp"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if tmp_fs != "tmpfs" && tmp_fs != "ramfs" {
        assert!(!auto("/tmp", false).expect("open"), "/tmp is {tmp_fs}");
        if let Ok(sync) = auto("/tmp", true) {
            assert!(!sync, "O_DIRECT goes through the ring");
        }
    }
    let file = TempFile::new("/tmp", 1 << 16);
    for (engine, sync) in [(IoEngine::Sync, true), (IoEngine::Uring, false)] {
        let disk = BlockFile::open(file.path(), rw(engine)).expect("open");
        assert_eq!(disk.synchronous(), sync, "{engine:?}");
    }
    let shm = TempFile::new("/dev/shm", 1 << 16);
    let disk = BlockFile::open(shm.path(), rw(IoEngine::Uring)).expect("open");
    assert!(!disk.synchronous(), "uring is taken as given on tmpfs");
}

#[test]
fn reads_past_the_end_are_short_or_empty() {
    for engine in ENGINES {
        let file = TempFile::new("/dev/shm", 8192);
        let disk = BlockFile::open(file.path(), ro(engine)).expect("open");
        let ex = Executor::new(8).expect("executor");
        let ex2 = ex.clone();
        let (short, empty) = block_on(&ex, async move {
            (
                read_back(&ex2, &disk, 6144, 4096).await.0,
                read_back(&ex2, &disk, 8192, 4096).await.0,
            )
        });
        assert_eq!((short, empty), (2048, 0), "{engine:?}");
    }
}

#[test]
fn fixed_buffers_read_and_write() {
    for engine in ENGINES {
        fixed_buffers_with(engine);
    }
}

fn fixed_buffers_with(engine: IoEngine) {
    let file = TempFile::new("/dev/shm", 1 << 20);
    let disk = BlockFile::open(file.path(), rw(engine)).expect("open");
    let ex = Executor::new(8).expect("executor");
    let buf = Rc::new(IoBuf::new(64 << 10));
    if let Err(e) = ex.register_buffers(&[(buf.as_ptr(), buf.len())]) {
        eprintln!("note: skipping, the kernel refused fixed buffers: {e}");
        return;
    }
    let index = ex
        .fixed_index_for(buf.as_ptr(), buf.len())
        .expect("registered");
    assert_eq!(ex.fixed_index_for(buf.as_ptr(), buf.len() + 1), None);
    let data = pattern(9, 32 << 10);
    buf.write_at(0, &data);
    let ex2 = ex.clone();
    let b = buf.clone();
    block_on(&ex, async move {
        let n = disk
            .write_fixed(&ex2, 4096, b.as_ptr(), 32 << 10, index, Box::new(b.clone()))
            .await;
        assert_eq!(n.expect("write_fixed"), 32 << 10);
        // Read it back into the second half, through the same registration.
        let dst = b.as_ptr().wrapping_add(32 << 10);
        let n = disk
            .read_fixed(&ex2, 4096, dst, 32 << 10, index, Box::new(b.clone()))
            .await;
        assert_eq!(n.expect("read_fixed"), 32 << 10);
        // A range outside the keepalive is refused before the kernel.
        let other = Rc::new(IoBuf::new(4096));
        let r = disk
            .read_fixed(&ex2, 0, b.as_ptr(), 4096, index, Box::new(other))
            .await;
        assert_eq!(errno(r), Some(libc::EFAULT));
    });
    let mut back = vec![0; 32 << 10];
    buf.read_at(32 << 10, &mut back);
    assert_eq!(back, data);
    ex.unregister_buffers().expect("unregister");
    assert_eq!(ex.fixed_index_for(buf.as_ptr(), 1), None);
}

fn zeroing_in(dir: &str) {
    let file = TempFile::new(dir, 1 << 20);
    std::fs::write(file.path(), pattern(1, 1 << 20)).expect("fill");
    let disk = BlockFile::open(file.path(), RW).expect("open");
    assert!(disk.supports_discard(), "{dir} should punch holes");
    let ex = Executor::new(8).expect("executor");
    let ex2 = ex.clone();
    block_on(&ex, async move {
        disk.discard(&ex2, 64 << 10, 64 << 10)
            .await
            .expect("discard");
        disk.write_zeroes(&ex2, 256 << 10, 8192, false)
            .await
            .expect("write_zeroes");
        disk.write_zeroes(&ex2, 512 << 10, 8192, true)
            .await
            .expect("write_zeroes unmap");
        // An odd range: no filesystem trick covers it exactly.
        disk.write_zeroes(&ex2, 700_001, 3000, false)
            .await
            .expect("write_zeroes odd");
        disk.flush(&ex2).await.expect("flush");
    });
    let got = std::fs::read(file.path()).expect("read");
    let want_orig = pattern(1, 1 << 20);
    let zeroed = [
        (64 << 10, 64 << 10),
        (256 << 10, 8192),
        (512 << 10, 8192),
        (700_001, 3000),
    ];
    for (i, (&g, &w)) in got.iter().zip(want_orig.iter()).enumerate() {
        let in_zero = zeroed.iter().any(|&(o, l)| i >= o && i < o + l);
        assert_eq!(g, if in_zero { 0 } else { w }, "{dir}: byte {i}");
    }
    assert_eq!(got.len(), 1 << 20, "zeroing must not change the size");
}

#[test]
fn discard_and_write_zeroes_read_back_as_zero_on_ext4_and_tmpfs() {
    zeroing_in("/tmp");
    zeroing_in("/dev/shm");
}

#[test]
fn a_readonly_disk_refuses_writes_with_ebadf() {
    for engine in ENGINES {
        readonly_with(engine);
    }
}

fn readonly_with(engine: IoEngine) {
    let file = TempFile::new("/dev/shm", 1 << 16);
    let disk = BlockFile::open(file.path(), ro(engine)).expect("open");
    assert!(disk.readonly());
    assert!(!disk.supports_discard());
    let ex = Executor::new(8).expect("executor");
    let ex2 = ex.clone();
    block_on(&ex, async move {
        let buf = Rc::new(IoBuf::new(4096));
        let r = disk
            .writev(&ex2, 0, vec![buf.iovec(0, 4096)], Box::new(buf.clone()))
            .await;
        assert_eq!(errno(r), Some(libc::EBADF));
        assert_eq!(
            errno(disk.write_zeroes(&ex2, 0, 4096, true).await),
            Some(libc::EBADF)
        );
        assert_eq!(
            errno(disk.discard(&ex2, 0, 4096).await),
            Some(libc::EOPNOTSUPP)
        );
        disk.flush(&ex2)
            .await
            .expect("flushing a read-only disk is harmless");
    });
}

#[test]
fn opening_reports_what_is_wrong() {
    let missing = BlockFile::open(
        std::path::Path::new("/tmp/does-not-exist-uring-backend"),
        RO,
    );
    assert!(
        matches!(missing, Err(BlockError::Open { ref source, .. }) if source.raw_os_error() == Some(libc::ENOENT))
    );
    let dir = BlockFile::open(std::path::Path::new("/tmp"), RO);
    assert!(
        matches!(dir, Err(BlockError::NotFileOrBlockDevice { .. })),
        "{:?}",
        dir.err()
    );
    // procfs refuses O_DIRECT.
    let direct = BlockOpenOptions {
        readonly: true,
        direct: true,
        engine: IoEngine::Auto,
    };
    match BlockFile::open(std::path::Path::new("/proc/version"), direct) {
        Err(e @ BlockError::DirectUnsupported { .. }) => {
            assert!(e.to_string().contains("O_DIRECT"), "{e}");
        }
        other => panic!("expected DirectUnsupported, got {:?}", other.err()),
    }
}

fn direct_roundtrip(dir: &str) -> Result<(), BlockError> {
    let file = TempFile::new(dir, 1 << 20);
    let opts = BlockOpenOptions {
        readonly: false,
        direct: true,
        engine: IoEngine::Auto,
    };
    let disk = BlockFile::open(file.path(), opts)?;
    assert!(disk.direct());
    let align = disk.direct_alignment();
    assert!(
        align.memory.is_power_of_two() && align.offset.is_power_of_two(),
        "{align:?}"
    );
    let ex = Executor::new(8).expect("executor");
    let ex2 = ex.clone();
    block_on(&ex, async move {
        let data = pattern(3, 16384);
        assert_eq!(write_split_aligned(&ex2, &disk, 8192, &data).await, 16384);
        let (n, back) = read_back(&ex2, &disk, 8192, 16384).await;
        assert_eq!((n, back == data), (16384, true));
    });
    Ok(())
}

async fn write_split_aligned(
    ex: &Rc<Executor>,
    disk: &BlockFile,
    offset: u64,
    data: &[u8],
) -> usize {
    let buf = Rc::new(IoBuf::new(data.len()));
    buf.write_at(0, data);
    let iov = vec![buf.iovec(0, 4096), buf.iovec(4096, data.len() - 4096)];
    disk.writev(ex, offset, iov, Box::new(buf))
        .await
        .expect("writev")
}

#[test]
fn direct_io_on_tmp_works_with_aligned_buffers() {
    match direct_roundtrip("/tmp") {
        Ok(()) => {}
        Err(e @ BlockError::DirectUnsupported { .. }) => {
            eprintln!("note: skipping, /tmp refuses O_DIRECT: {e}")
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn direct_io_on_dev_shm_either_works_or_says_why_not() {
    match direct_roundtrip("/dev/shm") {
        Ok(()) => eprintln!("note: tmpfs accepts O_DIRECT on this kernel"),
        Err(e @ BlockError::DirectUnsupported { .. }) => {
            assert!(e.to_string().contains("O_DIRECT"))
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn guest_memory_is_a_keepalive_and_32_requests_run_at_once() {
    let file = TempFile::new("/dev/shm", 1 << 20);
    let disk = BlockFile::open(file.path(), RW).expect("open");
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    for i in 0..32u64 {
        mem.write_slice(&pattern(i as u8, 4096), GuestAddress(i * 4096))
            .expect("fill");
    }
    let ex = Executor::new(64).expect("executor");
    let done = Rc::new(std::cell::Cell::new(0));
    for i in 0..32u64 {
        let (ex2, disk, mem, done) = (ex.clone(), disk.clone(), mem.clone(), done.clone());
        ex.spawn(async move {
            let host = |addr: u64, len: usize| {
                let s = mem.get_slice(GuestAddress(addr), len).expect("slice");
                libc::iovec {
                    iov_base: s.ptr_guard_mut().as_ptr().cast(),
                    iov_len: len,
                }
            };
            let out = vec![host(i * 4096, 4096)];
            let n = disk
                .writev(&ex2, (31 - i) * 4096, out, Box::new(mem.clone()))
                .await;
            assert_eq!(n.expect("writev"), 4096);
            let back = vec![host((64 + i) * 4096, 4096)];
            let n = disk
                .readv(&ex2, (31 - i) * 4096, back, Box::new(mem.clone()))
                .await;
            assert_eq!(n.expect("readv"), 4096);
            done.set(done.get() + 1);
            if done.get() == 32 {
                ex2.stop();
            }
        });
    }
    ex.run().expect("run");
    for i in 0..32u64 {
        let mut got = vec![0; 4096];
        mem.read_slice(&mut got, GuestAddress((64 + i) * 4096))
            .expect("read");
        assert_eq!(got, pattern(i as u8, 4096));
    }
    assert_eq!(mem.num_regions(), 1);
}

#[test]
fn one_disk_serves_two_iothreads() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    assert_send_sync_clone::<BlockFile>();
    let file = TempFile::new("/dev/shm", 1 << 20);
    let disk = BlockFile::open(file.path(), RW).expect("open");
    let threads: Vec<IoThread> = (0..2)
        .map(|i| IoThread::spawn(&format!("blk{i}"), 16).expect("spawn"))
        .collect();
    let (tx, rx) = mpsc::channel();
    for (i, t) in threads.iter().enumerate() {
        let (disk, tx) = (disk.clone(), tx.clone());
        t.run_on(Box::new(move |ex| {
            let ex2 = ex.clone();
            ex.spawn(async move {
                let data = pattern(i as u8 + 40, 65536);
                let n = write_split(&ex2, &disk, i as u64 * 65536, &data).await;
                disk.flush(&ex2).await.expect("flush");
                tx.send(n).expect("send");
            });
        }));
    }
    assert_eq!(
        (rx.recv().expect("first"), rx.recv().expect("second")),
        (65536, 65536)
    );
    for t in threads {
        t.stop().expect("stop");
    }
    let got = std::fs::read(file.path()).expect("read");
    assert_eq!(&got[..65536], &pattern(40, 65536)[..]);
    assert_eq!(&got[65536..131072], &pattern(41, 65536)[..]);
}

#[test]
fn a_loop_block_device_reports_its_geometry_and_round_trips() {
    let backing = TempFile::new("/tmp", 8 << 20);
    let dev = match common::loopdev::LoopDevice::attach(backing.path()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("note: skipping, no loop device here: {e}");
            return;
        }
    };
    let disk = BlockFile::open(dev.path(), RW).expect("open the loop device");
    assert!(disk.is_block_device());
    assert_eq!(disk.size(), 8 << 20);
    assert_eq!(disk.logical_block_size(), 512);
    let ex = Executor::new(8).expect("executor");
    let ex2 = ex.clone();
    let d = disk.clone();
    block_on(&ex, async move {
        let data = pattern(77, 16384);
        assert_eq!(write_split(&ex2, &d, 1 << 20, &data).await, 16384);
        let (n, back) = read_back(&ex2, &d, 1 << 20, 16384).await;
        assert_eq!((n, back == data), (16384, true));
        d.write_zeroes(&ex2, (1 << 20) + 4096, 4096, false)
            .await
            .expect("write_zeroes");
        let (_, back) = read_back(&ex2, &d, (1 << 20) + 4096, 4096).await;
        assert!(back.iter().all(|&b| b == 0));
        if d.supports_discard() {
            d.discard(&ex2, 1 << 20, 4096).await.expect("discard");
            let (_, back) = read_back(&ex2, &d, 1 << 20, 4096).await;
            assert!(back.iter().all(|&b| b == 0));
        }
        d.flush(&ex2).await.expect("flush");
        // Past the end of the device: nothing to read.
        assert_eq!(read_back(&ex2, &d, 8 << 20, 4096).await.0, 0);
    });
}
