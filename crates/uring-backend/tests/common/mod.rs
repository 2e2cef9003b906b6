//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};

use uring_backend::Executor;

pub mod loopdev;

/// Runs `fut` as a task and the executor until it finishes.
pub fn block_on<T: 'static>(ex: &Rc<Executor>, fut: impl Future<Output = T> + 'static) -> T {
    ex.block_on(fut).expect("the task finished")
}

/// A file removed when dropped.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// A new file of `len` bytes under `dir`.
    pub fn new(dir: &str, len: u64) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "uring-backend-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let path = Path::new(dir).join(name);
        let f = std::fs::File::create(&path).expect("create temp file");
        f.set_len(len).expect("size temp file");
        TempFile(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Bytes whose value depends on their position.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
