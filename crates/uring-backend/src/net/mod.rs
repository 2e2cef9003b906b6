//! Network backends served through the io_uring executor: TAP devices
//! with the virtio-net header ([`tap`]).

pub mod tap;

pub use tap::{Tap, TapError, TapSpec, VNET_HDR_LEN};

use std::fs::File;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use io_uring::{opcode, squeue, types};

use crate::executor::{Completion, Executor};

/// Starts one frame's `writev` (TX) or `readv` (RX, which waits for a
/// frame to arrive) on a TAP queue, named by its registered-file slot if
/// given; `handler` gets `tag` and the result. An error means nothing was
/// started (opcode missing, submission queue full).
///
/// # Safety
///
/// As [`Executor::submit_direct`]: the iovec array and the frame buffers
/// must stay valid until `handler` gets `tag`, and `tap` open.
pub unsafe fn start_frame_io(
    ex: &Executor,
    tap: &File,
    file_slot: Option<u32>,
    (handler, tag): (Rc<dyn Completion>, u64),
    write: bool,
    iov: &[libc::iovec],
) -> std::io::Result<()> {
    let ops = &ex.setup().opcodes;
    if !(if write { ops.writev } else { ops.readv }) {
        return Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    let count =
        u32::try_from(iov.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let ptr = iov.as_ptr();
    let entry: squeue::Entry = match (file_slot, write) {
        (Some(s), true) => opcode::Writev::new(types::Fixed(s), ptr, count)
            .build()
            .flags(squeue::Flags::FIXED_FILE),
        (Some(s), false) => opcode::Readv::new(types::Fixed(s), ptr, count)
            .build()
            .flags(squeue::Flags::FIXED_FILE),
        (None, true) => opcode::Writev::new(types::Fd(tap.as_raw_fd()), ptr, count).build(),
        (None, false) => opcode::Readv::new(types::Fd(tap.as_raw_fd()), ptr, count).build(),
    };
    // SAFETY: the caller's contract is submit_direct's.
    unsafe { ex.submit_direct(handler, tag, entry, !write) }
}

/// Test builds only (debug assertions): an `EAGAIN` storm on TAPs.
/// `RINGVM_TEST_TAP_EAGAIN=rx=N,tx=M` makes the process's first N TAP
/// reads and first M TAP writes fail with `EAGAIN` (the device counts
/// them and carries on). Always false in release builds.
pub fn injected_eagain(rx: bool) -> bool {
    #[cfg(debug_assertions)]
    {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::OnceLock;
        static PLAN: OnceLock<(u64, u64)> = OnceLock::new();
        static DONE: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
        let plan = PLAN.get_or_init(|| {
            std::env::var("RINGVM_TEST_TAP_EAGAIN")
                .ok()
                .and_then(|v| parse_eagain_plan(&v))
                .unwrap_or((0, 0))
        });
        let (limit, done) = if rx {
            (plan.0, &DONE[0])
        } else {
            (plan.1, &DONE[1])
        };
        if limit > 0 {
            return done.fetch_add(1, Ordering::Relaxed) < limit;
        }
    }
    let _ = rx;
    false
}

/// `rx=N,tx=M` (either may be left out).
#[cfg(debug_assertions)]
fn parse_eagain_plan(v: &str) -> Option<(u64, u64)> {
    let (mut rx, mut tx) = (0, 0);
    for part in v.split(',') {
        match part.split_once('=')? {
            ("rx", n) => rx = n.parse().ok()?,
            ("tx", n) => tx = n.parse().ok()?,
            _ => return None,
        }
    }
    Some((rx, tx))
}

#[cfg(test)]
mod tests {
    #[test]
    fn eagain_plans_parse() {
        assert_eq!(super::parse_eagain_plan("rx=3,tx=4"), Some((3, 4)));
        assert_eq!(super::parse_eagain_plan("tx=4"), Some((0, 4)));
        assert_eq!(super::parse_eagain_plan("rx=x"), None);
        assert_eq!(super::parse_eagain_plan("up=1"), None);
    }
}
