//! virtio-net TX descriptor chains as a guest posts them, through the
//! checks the TX task makes before a frame's `writev` (direction, guest
//! memory bounds, buffer count, header and frame length). The input is a
//! descriptor table (up to 16 descriptors, as in `blk_request`), then the
//! negotiated maximum frame length comes from its first byte. Checks that
//! nothing panics and that an accepted frame's iovecs are its length and
//! lie in guest memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::net::tx_frame;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM: usize = 0x3_0000;
const DATA: u64 = 0x1_0000;

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let n = usize::from(input[0] % 16) + 1;
    // 1514 + 12 (no TSO) or 65562 (with it), as the device negotiates.
    let max_len = if input[0] & 0x80 != 0 { 65562 } else { 1526 };
    let table = &input[1..(1 + n * 16).min(input.len())];
    let descs: Vec<RawDescriptor> = table
        .chunks_exact(16)
        .map(|c| {
            let addr = u64::from_le_bytes(c[0..8].try_into().unwrap());
            // Most addresses land in guest memory so the checks go deep.
            let addr = if addr & 1 == 0 {
                DATA + (addr >> 1) % 0x1_0000
            } else {
                addr
            };
            let len = u32::from_le_bytes(c[8..12].try_into().unwrap());
            let len = if len & 1 == 0 {
                (len >> 1) % 0x4000
            } else {
                len
            };
            let flags = u16::from_le_bytes(c[12..14].try_into().unwrap());
            let next = u16::from_le_bytes(c[14..16].try_into().unwrap()) % 16;
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect();
    if descs.is_empty() {
        return;
    }
    let vq = MockSplitQueue::new(&mem, 16);
    if vq.add_desc_chains(&descs, 0).is_err() {
        return;
    }
    let Ok(mut q) = vq.create_queue::<virtio_queue::Queue>() else {
        return;
    };
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        if let Ok(frame) = tx_frame(chain, &mem, max_len) {
            let total: u64 = frame.iov.iter().map(|v| v.iov_len as u64).sum();
            assert_eq!(total, frame.len);
            assert!(frame.len >= 12 + 14 && frame.len <= max_len);
            let base = mem.iter().next().unwrap().as_ptr() as usize;
            for v in &frame.iov {
                let start = v.iov_base as usize;
                assert!(start >= base && start + v.iov_len <= base + MEM);
            }
        }
    }
});
