//! What an assigned device (or a vfio-user server) tells us about itself:
//! its configuration space with the BAR sizes from region info, and the
//! region-info replies with their capability chains (sparse mmap areas).
//! None of it may panic, whatever the device claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use passthrough::config::{parse, walk_capabilities, CONFIG_SIZE};
use passthrough::transport::{parse_region_info, sparse_areas};

fuzz_target!(|input: &[u8]| {
    if input.len() < CONFIG_SIZE + 48 {
        // Short inputs still exercise the region-info parser.
        if let Some(raw) = parse_region_info(input) {
            let _ = sparse_areas(input, &raw);
        }
        return;
    }
    let (cfg, rest) = input.split_at(CONFIG_SIZE);
    let cfg: [u8; CONFIG_SIZE] = cfg.try_into().unwrap();
    let mut sizes = [0u64; 6];
    for (i, s) in sizes.iter_mut().enumerate() {
        *s = u64::from_le_bytes(rest[i * 8..i * 8 + 8].try_into().unwrap());
    }
    let _ = walk_capabilities(&cfg);
    let _ = parse(&cfg, &sizes);
    let info = &rest[48..];
    if let Some(raw) = parse_region_info(info) {
        let _ = sparse_areas(info, &raw);
    }
});
