//! Network backends served through the io_uring executor: TAP devices
//! with the virtio-net header ([`tap`]).

pub mod tap;

pub use tap::{Tap, TapError, TapSpec, VNET_HDR_LEN};

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
