//! The command line's value parsers: `--disk` and `--net` specs, MAC
//! addresses, sizes, `--cpuid-hide` features, `--seccomp` modes and the
//! `--vcpu-affinity` / `--iothread-affinity` lists.
//! Whatever the text, each returns a value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::blk::DiskConfig;
use virtio::net::config::{parse_mac, NetConfig};
use vmm::arch::cpuid::FeatureBit;
use vmm::seccomp::SeccompMode;

fuzz_target!(|input: &[u8]| {
    let Ok(s) = std::str::from_utf8(input) else {
        return;
    };
    let _ = DiskConfig::parse(s);
    let _ = DiskConfig::parse_with_fixed_buffers(s, true);
    let _ = NetConfig::parse(s);
    let _ = parse_mac(s);
    let _ = vmm::parse_size(s);
    let _ = s.parse::<FeatureBit>();
    let _ = s.parse::<SeccompMode>();
    for count in [0, 1, 4] {
        let _ = vmm::affinity::by_index(&[s.to_string()], count, "vCPU");
    }
});
