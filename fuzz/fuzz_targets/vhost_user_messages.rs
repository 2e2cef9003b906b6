//! vhost-user front-end messages, as raw bytes with fds attached, fed to
//! ringvm-blk's backend over a real connection: see
//! `ringvm_blk::replay` for the input format. One daemon (device,
//! iothread, listener) serves every input, as it serves one front-end after
//! another. Needs io_uring but not /dev/kvm.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use ringvm_blk::replay::Replayer;

static REPLAYER: Mutex<Option<Replayer>> = Mutex::new(None);

fuzz_target!(|input: &[u8]| {
    let mut guard = REPLAYER.lock().unwrap_or_else(|e| e.into_inner());
    let replayer = guard.get_or_insert_with(|| {
        let mut r = Replayer::new().expect("starting the replay daemon");
        r.set_wait(std::time::Duration::from_millis(5));
        r
    });
    replayer.feed(input).expect("replaying");
});
