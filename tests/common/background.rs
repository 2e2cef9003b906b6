//! A `ringvm` run in the background, its output in files, for tests that
//! act on the VM while it runs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(300);

/// A `ringvm` run in the background with its output in files.
pub struct Vm {
    pub child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Vm {
    pub fn start(args: &[&str], dir: &Path) -> Vm {
        Self::spawn(Command::new(super::ringvm_bin()).args(args), dir)
    }

    pub fn spawn(cmd: &mut Command, dir: &Path) -> Vm {
        let (stdout, stderr) = (dir.join("vm.out"), dir.join("vm.err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("starting ringvm");
        Vm {
            child,
            stdout,
            stderr,
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Waits until stdout or stderr contains `text`; panics if ringvm
    /// ends first.
    pub fn wait_for(&mut self, text: &str) {
        let start = Instant::now();
        while !self.stderr().contains(text) && !self.stdout().contains(text) {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "ringvm ended: {}\n{}",
                self.stdout(),
                self.stderr()
            );
            assert!(start.elapsed() < DEADLINE, "no {text:?}: {}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn finish(mut self) -> (Option<i32>, String, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > DEADLINE {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("ringvm still running: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status.code(), self.stdout(), self.stderr())
    }
}

impl Drop for Vm {
    /// A test that fails while the VM runs does not leave it behind.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
