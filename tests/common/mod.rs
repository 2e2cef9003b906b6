//! Helpers shared by the integration tests: running the `ringvm` binary with
//! a deadline, and the KVM requirement.

#![allow(dead_code)]

pub mod background;
pub mod http;
pub mod netns;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `ringvm` binary built for this test run.
pub fn ringvm_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ringvm"))
}

/// Whether KVM tests can run (fails under `CI=true` without KVM).
#[allow(unused_imports)]
pub use ringvm_test_devices::kvm_available;

/// What a finished `ringvm` run produced.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    /// The one-line stop reason ringvm prints last on stderr.
    pub fn stop_line(&self) -> &str {
        self.stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("ringvm: "))
            .unwrap_or("")
    }
}

/// Runs `ringvm` with `args`, killing it (and failing) after `deadline`.
pub fn run_ringvm(args: &[&str], deadline: Duration) -> Outcome {
    run_command(Command::new(ringvm_bin()).args(args), deadline)
}

pub fn run_command(cmd: &mut Command, deadline: Duration) -> Outcome {
    match run_command_within(cmd, deadline) {
        Ok(out) => out,
        Err(out) => panic!(
            "ringvm still running after {deadline:?}\nstdout:\n{}\nstderr:\n{}",
            out.stdout, out.stderr
        ),
    }
}

/// As [`run_command`], but a run still going at `deadline` is killed and
/// returned as `Err` with what it printed.
pub fn run_command_within(cmd: &mut Command, deadline: Duration) -> Result<Outcome, Outcome> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning ringvm");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for ringvm") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Outcome {
                code: None,
                stdout: String::from_utf8_lossy(&t_out.join().unwrap()).into_owned(),
                stderr: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
                elapsed: start.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Outcome {
        code: status.code(),
        stdout: String::from_utf8_lossy(&t_out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t_err.join().unwrap()).into_owned(),
        elapsed: start.elapsed(),
    })
}

/// Runs `cmd` until its stdout has a line containing `until` (then sends
/// it SIGTERM and collects what it printed) or it ends by itself; fails
/// after `deadline`.
pub fn run_until_line(cmd: &mut Command, until: &str, deadline: Duration) -> Outcome {
    use std::io::BufRead;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning ringvm");
    let pid = child.id() as libc::pid_t;
    let out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let until = until.to_string();
    let t_out = std::thread::spawn(move || {
        let mut text = String::new();
        let mut seen = false;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
            if !seen && line.contains(&until) {
                seen = true;
                // SAFETY: kill(2) on our child, not reaped yet (the main
                // thread only reaps after this thread has ended).
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        text
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    while !t_out.is_finished() {
        if start.elapsed() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let stdout = t_out.join().unwrap();
    let status = child.wait().expect("waiting for ringvm");
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap()).into_owned();
    assert!(
        start.elapsed() <= deadline,
        "ringvm still running after {deadline:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    Outcome {
        code: status.code(),
        stdout,
        stderr,
        elapsed: start.elapsed(),
    }
}

/// A scratch directory for one test, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let dir = base.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// CRC-32 (IEEE 802.3, as zlib computes it).
pub fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// The `key=value` fields of the guest's `RINGVM-RESULT` line.
pub fn result_fields(stdout: &str) -> Option<std::collections::BTreeMap<String, String>> {
    let line = stdout.lines().find(|l| l.starts_with("RINGVM-RESULT"))?;
    Some(
        line.split_whitespace()
            .skip(1)
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// QEMU, if installed; under CI=true its absence fails the test.
/// `Cpus_allowed_list` of a `/proc/.../status` text, as listed
/// (`0-3,6`).
pub fn cpus_allowed(status: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
}

/// The CPUs this process may run on, as listed, and the last of them.
pub fn own_cpus() -> (String, usize) {
    let list = cpus_allowed(&std::fs::read_to_string("/proc/self/status").unwrap()).unwrap();
    let last = list.rsplit([',', '-']).next().unwrap().parse().unwrap();
    (list, last)
}

/// Each thread of process `pid`: its name and the CPUs it may run on.
pub fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| {
                    let status = std::fs::read_to_string(t.path().join("status")).ok()?;
                    let name = status.lines().find_map(|l| l.strip_prefix("Name:"))?;
                    Some((name.trim().to_string(), cpus_allowed(&status)?))
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn qemu() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin/qemu-system-x86_64");
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "qemu-system-x86_64 missing and CI=true (.ci/run installs qemu-system-x86)"
    );
    eprintln!("skipping: qemu-system-x86_64 is not installed");
    None
}

#[test]
fn crc32_matches_zlib() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    assert_eq!(crc32(b""), 0);
}
