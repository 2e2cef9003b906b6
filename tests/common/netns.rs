//! Network namespaces with a TAP, and programs run in the background with
//! their output collected: what the virtio-net boot tests (tests/net.rs,
//! tests/linux_guest.rs) share.
//!
//! Every test makes its own network namespace (deleted on drop, also when
//! the test fails) and keeps all traffic inside it: the VMM runs there
//! through `ip netns exec`, and host-side sockets are made on a thread that
//! joined the namespace with `setns(2)` (which moves that thread only).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Outcome;

/// The TAP's name inside each test's namespace.
pub const TAP: &str = "rvtap0";
pub const HOST_IP: &str = "10.0.0.1";
pub const GUEST_IP: &str = "10.0.0.2";

pub fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A network namespace of this test run, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Makes a namespace with loopback up. Without the rights or tools for
    /// that the test fails under `CI=true` and is skipped otherwise.
    pub fn new(tag: &str) -> Option<Netns> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "rvnet-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let made = Command::new("ip").args(["netns", "add", &name]).output();
        match made {
            Ok(o) if o.status.success() => {}
            other => {
                assert!(
                    !ci(),
                    "cannot create a network namespace (root and iproute2 needed) and CI=true: {other:?}"
                );
                eprintln!("skipping: cannot create a network namespace: {other:?}");
                return None;
            }
        }
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program args` inside the namespace; panics unless it succeeds.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed in {}: {out:?}",
            self.name
        );
        out
    }

    pub fn ip(&self, args: &[&str]) {
        self.run("ip", args);
    }

    /// Creates the TAP (multi-queue for more than one pair) with the host
    /// address 10.0.0.1/24, up.
    pub fn add_tap(&self, queues: u32) {
        let mut args = vec!["tuntap", "add", "dev", TAP, "mode", "tap"];
        if queues > 1 {
            args.push("multi_queue");
        }
        self.ip(&args);
        self.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
        self.ip(&["link", "set", TAP, "up"]);
    }

    /// Runs `f` on a new thread that has joined this namespace.
    pub fn thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns(2) on a valid namespace descriptor changes the
            // network namespace of the calling thread only; the thread
            // creates its sockets afterwards and touches no other state.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .output();
    }
}

/// A program running in the background whose output is collected; killed
/// on drop if it still runs.
pub struct Background {
    child: Child,
    lines: mpsc::Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    start: Instant,
}

pub fn collect(
    from: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
    lines: Option<mpsc::Sender<String>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(from);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    into.lock().unwrap().push_str(&line);
                    if let Some(tx) = &lines {
                        let _ = tx.send(line.trim_end().to_string());
                    }
                }
            }
        }
    })
}

impl Background {
    pub fn spawn(cmd: &mut Command) -> Background {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning a background program");
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone(), Some(tx)),
            collect(child.stderr.take().unwrap(), stderr.clone(), None),
        ];
        Background {
            child,
            lines,
            stdout,
            stderr,
            readers,
            start: Instant::now(),
        }
    }

    pub fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits for a stdout line starting with `prefix` and returns it.
    pub fn wait_line(&mut self, prefix: &str, deadline: Duration) -> String {
        let end = Instant::now() + deadline;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(500)))
            {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    panic!("output ended before a line `{prefix}`:\n{}", self.output());
                }
                Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                    panic!("no line `{prefix}` within {deadline:?}:\n{}", self.output())
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Lines on stderr so far.
    pub fn stderr_lines(&self) -> usize {
        self.stderr.lock().unwrap().lines().count()
    }

    /// Waits until stderr has a line after the first `skip` for which
    /// `pred` holds.
    pub fn wait_stderr(
        &self,
        skip: usize,
        pred: impl Fn(&str) -> bool,
        deadline: Duration,
    ) -> bool {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if self.stderr.lock().unwrap().lines().skip(skip).any(&pred) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Waits for the program to end (killing it, and failing, after
    /// `deadline`).
    pub fn finish(mut self, deadline: Duration) -> Outcome {
        let end = Instant::now() + deadline;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("waiting for a child") {
                break s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("still running after {deadline:?}:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Outcome {
            code: status.code(),
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr.lock().unwrap().clone(),
            elapsed: self.start.elapsed(),
        }
    }

    /// Sends SIGTERM and waits for the program to end.
    pub fn terminate(self, deadline: Duration) -> Outcome {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: signals our own child, which has not been reaped yet (so
        // the pid cannot have been reused).
        let r = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
        self.finish(deadline)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Pings the guest `n` times from the namespace; asserts every reply came.
pub fn ping(ns: &Netns, n: u32) {
    let out = ns
        .command("ping")
        .args(["-c", &n.to_string(), "-i", "0.5", "-W", "30", GUEST_IP])
        .stdin(Stdio::null())
        .output()
        .expect("running ping (iputils-ping)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!(" {n} received")),
        "ping: {out:?}"
    );
}

/// The system `ping`, required under CI.
pub fn have_ping() -> bool {
    let ok = Command::new("ping")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(!ci(), "ping missing and CI=true (install iputils-ping)");
        eprintln!("skipping: ping is not installed");
    }
    ok
}
