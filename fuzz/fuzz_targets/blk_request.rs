//! virtio-blk request parsing from guest-written descriptor chains: the
//! input is a descriptor table (up to 16 descriptors) and the bytes of
//! guest memory the descriptors may point at.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::blk::request::{parse, RequestLimits};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: usize = 1 << 20;
const DATA: u64 = 0x8_0000;

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let n = usize::from(input[0] % 16) + 1;
    let (table, rest) = input[1..].split_at((n * 16).min(input.len() - 1));
    let descs: Vec<RawDescriptor> = table
        .chunks_exact(16)
        .map(|c| {
            let addr = u64::from_le_bytes(c[0..8].try_into().unwrap());
            // Most addresses land in the data window so parsing goes deep.
            let addr = if addr & 1 == 0 {
                DATA + (addr >> 1) % 0x1000
            } else {
                addr
            };
            let len = u32::from_le_bytes(c[8..12].try_into().unwrap()) % 0x2000;
            let flags = u16::from_le_bytes(c[12..14].try_into().unwrap());
            let next = u16::from_le_bytes(c[14..16].try_into().unwrap()) % 16;
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect();
    if descs.is_empty() {
        return;
    }
    let _ = mem.write_slice(&rest[..rest.len().min(0x3000)], GuestAddress(DATA));
    let vq = MockSplitQueue::new(&mem, 16);
    if vq.add_desc_chains(&descs, 0).is_err() {
        return;
    }
    let limits = RequestLimits {
        capacity_sectors: 4096,
        readonly: input[0] & 0x80 != 0,
        discard: true,
        write_zeroes: true,
    };
    let Ok(mut q) = vq.create_queue::<virtio_queue::Queue>() else {
        return;
    };
    use virtio_queue::QueueT;
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        let _ = parse(chain, &mem, &limits);
    }
});
