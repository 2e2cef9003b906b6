//! The snapshot `state` file's decoder: raw bytes as a whole file (header
//! checks: magic, version, length, CRC-32), and the same bytes as the
//! payload behind a valid header, so that the postcard decoding of every
//! vCPU, VM and device section is reached too. Nothing may panic; a state
//! that decodes encodes back to a file that decodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::format::{decode_state, encode_state, frame};

fuzz_target!(|input: &[u8]| {
    let _ = decode_state(input);
    if let Ok(state) = decode_state(&frame(input)) {
        let again = encode_state(&state).expect("a decoded state encodes");
        let back = decode_state(&again).expect("an encoded state decodes");
        assert_eq!(encode_state(&back).unwrap(), again);
    }
});
