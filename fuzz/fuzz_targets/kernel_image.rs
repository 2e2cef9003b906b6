//! Kernel image loading (ELF32 PVH, ELF64, bzImage) from arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::boot::{load_kernel, SliceReader};

fuzz_target!(|input: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let _ = load_kernel(&mem, &mut SliceReader::new(input));
});
