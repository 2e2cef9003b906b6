//! ringvm's Linux test guest (tests/linux/): a small Linux 6.1 built from
//! Debian's `linux-source-6.1` and a freestanding `/init` in an initramfs,
//! built once and cached outside the clone:
//!
//! ```text
//! ${XDG_CACHE_HOME:-~/.cache}/ringvm/linux-<K>/vmlinux
//! ${XDG_CACHE_HOME:-~/.cache}/ringvm/linux-<K>/initramfs-<I>.cpio
//! ```
//!
//! `K` hashes what the kernel is made of (tests/linux/config, the patches,
//! kernel.sh and the source tarball's size), `I` hashes init.c and how it is
//! compiled and packed, so editing `/init` does not rebuild the kernel. A
//! lock file next to the directory makes concurrent test processes build
//! each once; within a process a `OnceLock` does.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The kernel and initramfs to boot.
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
}

/// How `/init` is compiled: freestanding, static, no SSE (the host's
/// instruction emulator has none).
const CFLAGS: &[&str] = &[
    "-static",
    "-ffreestanding",
    "-nostdlib",
    "-mgeneral-regs-only",
    "-O2",
    "-fno-stack-protector",
    "-fno-pie",
    "-no-pie",
    "-fno-asynchronous-unwind-tables",
    "-fno-builtin",
    "-Wall",
    "-Werror",
];

/// The initramfs: a console for the kernel to open, mount points, /init.
const CPIO_LIST: &str = "dir /dev 0755 0 0\n\
                         nod /dev/console 0600 0 0 c 5 1\n\
                         dir /proc 0755 0 0\n\
                         dir /sys 0755 0 0\n\
                         file /init @INIT@ 0755 0 0\n";

fn linux_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/linux")
}

fn source_tarball() -> PathBuf {
    std::env::var_os("RINGVM_LINUX_SOURCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/src/linux-source-6.1.tar.xz".into())
}

fn cache_root() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("ringvm"),
        _ => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/ringvm"),
    }
}

/// 64-bit FNV-1a: stable across Rust releases (unlike `DefaultHasher`),
/// which is all a cache key needs.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    /// A named input: its name, a NUL, its length, its bytes.
    fn item(&mut self, name: &str, data: &[u8]) {
        self.feed(name.as_bytes());
        self.feed(&[0]);
        self.feed(&(data.len() as u64).to_le_bytes());
        self.feed(data);
    }
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The kernel's cache key: config, kernel.sh, patches (sorted), and the
/// source tarball's size (it changes with each Debian upload).
pub fn kernel_key() -> String {
    let dir = linux_dir();
    let mut names = vec!["config".to_string(), "kernel.sh".to_string()];
    let mut patches: Vec<String> = std::fs::read_dir(dir.join("patches"))
        .expect("tests/linux/patches")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".patch"))
        .collect();
    patches.sort();
    names.extend(patches.into_iter().map(|p| format!("patches/{p}")));
    let mut h = Fnv::new();
    for n in &names {
        h.item(n, &read(&dir.join(n)));
    }
    let size = std::fs::metadata(source_tarball()).map_or(0, |m| m.len());
    h.item("source", &size.to_le_bytes());
    format!("{:016x}", h.0)
}

fn init_key() -> String {
    let mut h = Fnv::new();
    h.item("init.c", &read(&linux_dir().join("init.c")));
    h.item("cflags", CFLAGS.join(" ").as_bytes());
    h.item("cpio", CPIO_LIST.as_bytes());
    format!("{:016x}", h.0)
}

/// What building needs; `None` when something is missing (named).
fn missing_prerequisite() -> Option<String> {
    let src = source_tarball();
    if !src.exists() {
        return Some(format!(
            "{} (apt-get install linux-source-6.1)",
            src.display()
        ));
    }
    for tool in ["gcc", "make", "flex", "bison", "bc", "patch", "xz"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("the `{tool}` command"));
        }
    }
    None
}

/// Holds an exclusive `flock` on a file until dropped (closing the file
/// releases it).
struct FileLock {
    _file: File,
}

impl FileLock {
    fn take(path: &Path) -> FileLock {
        let f = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        // SAFETY: flock(2) on a descriptor this function owns; it blocks
        // until the lock is ours and touches no memory.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            r,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        FileLock { _file: f }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn build_kernel(dir: &Path, log: &Path) {
    eprintln!(
        "building the Linux test kernel into {} (5-15 minutes; log {})",
        dir.display(),
        log.display()
    );
    let log_file = File::create(log).unwrap();
    let status = Command::new("bash")
        .arg(linux_dir().join("kernel.sh"))
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .status()
        .expect("running tests/linux/kernel.sh");
    assert!(
        status.success() && dir.join("vmlinux").exists(),
        "tests/linux/kernel.sh {} failed ({status}); the end of {}:\n{}",
        dir.display(),
        log.display(),
        tail(log, 40)
    );
}

fn build_initramfs(kdir: &Path, out: &Path) {
    let tmp = kdir.join(format!("init-build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let init = tmp.join("init");
    let cc = Command::new("gcc")
        .args(CFLAGS)
        .arg("-o")
        .arg(&init)
        .arg(linux_dir().join("init.c"))
        .output()
        .expect("running gcc");
    assert!(
        cc.status.success(),
        "compiling tests/linux/init.c: {}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let list = tmp.join("list");
    std::fs::write(&list, CPIO_LIST.replace("@INIT@", init.to_str().unwrap())).unwrap();
    let cpio = Command::new(kdir.join("gen_init_cpio"))
        .arg(&list)
        .output()
        .expect("running gen_init_cpio");
    assert!(
        cpio.status.success(),
        "gen_init_cpio: {}",
        String::from_utf8_lossy(&cpio.stderr)
    );
    let part = tmp.join("initramfs.cpio");
    std::fs::write(&part, &cpio.stdout).unwrap();
    std::fs::rename(&part, out).unwrap();
    let _ = std::fs::remove_dir_all(&tmp);
}

fn build() -> LinuxGuest {
    let root = cache_root();
    std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
    let key = kernel_key();
    let kdir = root.join(format!("linux-{key}"));
    let _lock = FileLock::take(&root.join(format!("linux-{key}.lock")));
    let vmlinux = kdir.join("vmlinux");
    if !vmlinux.exists() {
        build_kernel(&kdir, &root.join(format!("linux-{key}.log")));
    }
    let initramfs = kdir.join(format!("initramfs-{}.cpio", init_key()));
    if !initramfs.exists() {
        build_initramfs(&kdir, &initramfs);
    }
    LinuxGuest { vmlinux, initramfs }
}

/// The Linux test guest, built on first use. `None` (the test skips) when
/// the kernel source or a build tool is missing; under `CI=true` that
/// fails instead.
pub fn linux_guest() -> Option<LinuxGuest> {
    static GUEST: OnceLock<Option<LinuxGuest>> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            if let Some(what) = missing_prerequisite() {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "the Linux test guest needs {what}, and CI=true"
                );
                eprintln!("skipping: the Linux test guest needs {what}");
                return None;
            }
            Some(build())
        })
        .clone()
}
