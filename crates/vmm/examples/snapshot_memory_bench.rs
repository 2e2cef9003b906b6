//! How fast the snapshot path writes and maps guest memory, without a VM:
//! SIZE MiB of anonymous guest RAM (the VM layout's regions) filled with
//! non-zero data, written by `snapshot::memory::save_memory` (io_uring,
//! 1 MiB writes, 32 in flight, then fdatasync) into DIR, then mapped back
//! lazily and copied back. Compare the write rate with
//! `fio --name=w --rw=write --bs=1M --iodepth=32 --ioengine=io_uring
//! --size=SIZEm --fsync_on_close=1 --filename=DIR/fio.dat`.
//!
//!     cargo run --release -p vmm --example snapshot_memory_bench -- 512 /tmp/snapbench

use std::path::PathBuf;
use std::time::Instant;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm::snapshot::memory::{restore_memory, save_memory, RestoreMode};

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: snapshot_memory_bench SIZE_MIB DIR");
    let dir = PathBuf::from(
        args.next()
            .expect("usage: snapshot_memory_bench SIZE_MIB DIR"),
    );
    std::fs::create_dir_all(&dir).expect("creating DIR");
    let size = mib << 20;
    let mem = vmm::vm::create_guest_memory(size).expect("guest memory");
    for region in mem.iter() {
        // SAFETY: the region is mapped for `len` bytes and nothing else
        // uses this memory.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), region.len() as usize) };
        for (i, chunk) in bytes.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&((i as u64) | 1).to_le_bytes()[..chunk.len()]);
        }
    }
    let t = Instant::now();
    let (regions, written) = save_memory(&mem, &dir).expect("save_memory");
    let save = t.elapsed();
    let layout: Vec<(u64, u64)> = regions.iter().map(|r| (r.guest_addr, r.size)).collect();
    let t = Instant::now();
    let lazy = restore_memory(&dir, &regions, &layout, RestoreMode::Lazy).expect("lazy");
    let map = t.elapsed();
    drop(lazy);
    let t = Instant::now();
    let copy = restore_memory(&dir, &regions, &layout, RestoreMode::Copy).expect("copy");
    let copied = t.elapsed();
    drop(copy);
    println!(
        "size_mib={mib} written_mib={} save_ms={:.1} save_mib_s={:.0} lazy_map_us={} copy_ms={:.1} copy_mib_s={:.0}",
        written >> 20,
        save.as_secs_f64() * 1e3,
        (written >> 20) as f64 / save.as_secs_f64(),
        map.as_micros(),
        copied.as_secs_f64() * 1e3,
        mib as f64 / copied.as_secs_f64()
    );
}
