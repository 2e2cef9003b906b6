//! Rate-limited log lines for guest-caused errors: a misbehaving driver
//! must not be able to flood the host's log.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines allowed per window.
const BURST: u32 = 10;
const WINDOW: Duration = Duration::from_secs(1);

/// Allows `BURST` messages per second and counts the rest.
pub struct RateLimitedLog {
    name: String,
    state: Mutex<(Instant, u32, u64)>,
}

impl RateLimitedLog {
    pub fn new(name: &str) -> Self {
        RateLimitedLog {
            name: name.into(),
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// The device name lines are prefixed with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Logs `msg` at warn level unless this device logged too much lately.
    pub fn warn(&self, msg: std::fmt::Arguments<'_>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(s.0) >= WINDOW {
            if s.2 > 0 {
                log::warn!("{}: {} similar messages suppressed", self.name, s.2);
            }
            *s = (now, 0, 0);
        }
        if s.1 < BURST {
            s.1 += 1;
            log::warn!("{}: {msg}", self.name);
        } else {
            s.2 += 1;
        }
    }

    /// Messages suppressed in the current window.
    pub fn suppressed(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_are_cut_and_counted() {
        let l = RateLimitedLog::new("t");
        for i in 0..25 {
            l.warn(format_args!("message {i}"));
        }
        assert_eq!(l.suppressed(), 15);
    }
}
