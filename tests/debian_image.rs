//! The full-Linux-guest recipe of `tools/debian-guest`: `build-image.sh`
//! makes a stock Debian cloud kernel, an initramfs that loads its virtio
//! modules, and an ext4 root file system (from Debian packages) holding fio
//! and `/sbin/ringvm-fio-init`; `run.sh` boots them on ringvm.
//!
//! Booting a stock kernel to userspace needs hardware KVM, which this
//! project's CI host does not have (PVM emulates every instruction; see
//! `tests/linux.rs` for how far such a kernel gets). So these tests check
//! the build: what is in the image (read back with `debugfs`), the kernel's
//! setup header, the initramfs; and they boot the image under QEMU's TCG, an
//! independent machine, to check that the init script, the modules and fio
//! work together and print the result line `run.sh` reads.
//!
//! The image is built in `${XDG_CACHE_HOME:-~/.cache}/ringvm/debian-guest-test`;
//! `build-image.sh` rebuilds only when its inputs (itself, the init
//! scripts, the kernel package's version) change, so CI on one machine
//! builds it once. Without network access to the Debian mirror the tests
//! skip with a note, or fail under `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

fn tools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/debian-guest")
}

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

fn out_dir() -> PathBuf {
    let base = match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(x), _) if !x.is_empty() => PathBuf::from(x),
        (_, Some(h)) if !h.is_empty() => Path::new(&h).join(".cache"),
        _ => PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    };
    base.join("ringvm/debian-guest-test")
}

/// The directory with `vmlinuz`, `initrd.img` and `root.img`, built (or
/// found up to date) by `build-image.sh`; `None` when the test must skip.
fn image() -> Option<PathBuf> {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = built.as_ref() {
        return Some(dir.clone());
    }
    let dir = out_dir();
    let out = common::run_command(
        Command::new("bash")
            .arg(tools_dir().join("build-image.sh"))
            .arg("--out")
            .arg(&dir),
        Duration::from_secs(1800),
    );
    let why = out
        .stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("build-image.sh:"));
    match out.code {
        Some(0) => {}
        // 3: the mirror cannot be reached; 2: a missing tool or no way to
        // build unprivileged (.ci/run installs the tools).
        Some(code @ (2 | 3)) => {
            let why = why.map_or_else(
                || format!("build-image.sh: exit code {code}"),
                str::to_string,
            );
            assert!(
                !ci(),
                "CI=true and the image cannot be built: {why}\n{}",
                out.stderr
            );
            eprintln!("skipping: {why}");
            return None;
        }
        _ => panic!("build-image.sh failed: {out:#?}"),
    }
    *built = Some(dir.clone());
    Some(dir)
}

fn debugfs() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/debugfs");
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from("debugfs")
    }
}

/// `debugfs -R REQUEST IMAGE`: its stdout (debugfs exits 0 even when a
/// file is missing; it then prints nothing there).
fn debugfs_request(image: &Path, request: &str) -> Vec<u8> {
    let out = Command::new(debugfs())
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("running debugfs (e2fsprogs): {e}"));
    assert!(out.status.success(), "debugfs -R '{request}': {out:?}");
    out.stdout
}

/// Mode and owner of `path` in the image, from `debugfs -R 'stat PATH'`.
fn stat(image: &Path, path: &str) -> (String, u32, u32) {
    let text =
        String::from_utf8_lossy(&debugfs_request(image, &format!("stat {path}"))).into_owned();
    let field = |name: &str| -> String {
        text.split_once(name)
            .unwrap_or_else(|| panic!("{path} is not in the image: {text:?}"))
            .1
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let mode = u32::from_str_radix(&field("Mode:"), 8).expect("an octal mode");
    let uid = field("User:").parse().expect("a uid");
    (field("Type:"), mode, uid)
}

#[test]
fn image_holds_fio_the_init_script_and_a_bzimage() {
    let Some(dir) = image() else { return };

    // The kernel: a bzImage (setup header magic "HdrS" at 0x202, boot
    // protocol 2.06 or later: what ringvm's 64-bit boot needs).
    let kernel = std::fs::read(dir.join("vmlinuz")).unwrap();
    assert!(kernel.len() > 0x300, "vmlinuz is {} bytes", kernel.len());
    assert_eq!(&kernel[0x202..0x206], b"HdrS", "vmlinuz is no bzImage");
    let version = u16::from_le_bytes([kernel[0x206], kernel[0x207]]);
    assert!(version >= 0x0206, "boot protocol {version:#06x}");

    // The root file system: an ext4 image with fio (an ELF executable)
    // and the init script, byte for byte as in tools/, executable, root's.
    let root = dir.join("root.img");
    let (kind, mode, uid) = stat(&root, "/usr/bin/fio");
    assert_eq!((kind.as_str(), mode & 0o111, uid), ("regular", 0o111, 0));
    let fio = debugfs_request(&root, "cat /usr/bin/fio");
    assert!(fio.starts_with(b"\x7fELF"), "/usr/bin/fio is no ELF");

    let (kind, mode, uid) = stat(&root, "/sbin/ringvm-fio-init");
    assert_eq!((kind.as_str(), mode & 0o777, uid), ("regular", 0o755, 0));
    let init = debugfs_request(&root, "cat /sbin/ringvm-fio-init");
    let want = std::fs::read(tools_dir().join("ringvm-fio-init")).unwrap();
    assert!(
        init == want,
        "/sbin/ringvm-fio-init differs from tools/debian-guest/ringvm-fio-init"
    );
    // What the init script runs: a shell, mount, and the directories it
    // mounts on.
    for path in ["/bin/sh", "/usr/bin/mount", "/proc", "/sys", "/dev", "/run"] {
        let (kind, ..) = stat(&root, path);
        assert!(
            kind == "regular" || kind == "directory" || kind == "symlink",
            "{path}: {kind}"
        );
    }

    // The initramfs: busybox, its /init, and virtio_blk with what it
    // needs, in an order insmod can follow (each module after its
    // dependencies, as modinfo names them).
    let list = Command::new("sh")
        .arg("-c")
        .arg("gzip -dc \"$1\" | cpio --quiet -it")
        .arg("sh")
        .arg(dir.join("initrd.img"))
        .output()
        .unwrap();
    assert!(list.status.success(), "{list:?}");
    let list = String::from_utf8_lossy(&list.stdout);
    for entry in [
        "init",
        "bin/busybox",
        "etc/modules.order",
        "lib/modules/virtio_blk.ko",
    ] {
        assert!(
            list.lines().any(|l| l == entry),
            "{entry} not in initrd.img:\n{list}"
        );
    }
    let order = Command::new("sh")
        .arg("-c")
        .arg("gzip -dc \"$1\" | cpio --quiet -i --to-stdout etc/modules.order")
        .arg("sh")
        .arg(dir.join("initrd.img"))
        .output()
        .unwrap();
    let order: Vec<String> = String::from_utf8_lossy(&order.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let at = |m: &str| {
        order
            .iter()
            .position(|l| l == m)
            .unwrap_or_else(|| panic!("{m} not in modules.order {order:?}"))
    };
    assert_eq!(order.last().map(String::as_str), Some("virtio_blk.ko"));
    assert!(at("virtio.ko") < at("virtio_pci.ko"), "{order:?}");
    assert!(at("virtio_ring.ko") < at("virtio_pci.ko"), "{order:?}");
    for m in &order {
        assert!(
            list.lines().any(|l| l == format!("lib/modules/{m}")),
            "{m} missing"
        );
    }
}

/// The image as run.sh boots it (read-only root, fio on the second disk),
/// but on QEMU's TCG: Linux's virtio drivers, the initramfs, the init
/// script and fio all work, and the result line comes out as run.sh reads
/// it. The host checks that the guest's writes reached the data disk.
#[test]
fn image_runs_fio_and_prints_its_result_under_qemu_tcg() {
    let Some(qemu) = common::qemu() else { return };
    let Some(dir) = image() else { return };
    let tmp = common::TempDir::new("debian-image-qemu");
    let data = tmp.file("data.img", &vec![0u8; 64 << 20]);
    let path = |f: &str| dir.join(f).to_str().unwrap().to_string();
    // QEMU's TCG guest has, in about one CI run in three (sessions 9 and
    // 10), gone idle for good right after fio started on /dev/vdb (kernel
    // and init fine, QEMU's main loop waking on timers only); 30 runs by
    // hand, 12 of them four at a time, never did. That is the peer's
    // emulator, not the image: one stuck run is retried, with its output
    // printed, and a second one fails the test.
    let run = || {
        common::run_command_within(
            Command::new(&qemu).args([
                "-accel",
                "tcg",
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-no-reboot",
                "-serial",
                "stdio",
                "-m",
                "512M",
                "-kernel",
                &path("vmlinuz"),
                "-initrd",
                &path("initrd.img"),
                "-append",
                "console=ttyS0 root=/dev/vda ro init=/sbin/ringvm-fio-init panic=-1 \
                 ringvm.fio.rw=randrw ringvm.fio.bs=4k ringvm.fio.iodepth=8 ringvm.fio.runtime=2",
                "-drive",
                &format!("file={},if=virtio,format=raw,readonly=on", path("root.img")),
                "-drive",
                &format!("file={},if=virtio,format=raw", data.display()),
            ]),
            Duration::from_secs(300),
        )
    };
    let out = match run() {
        Ok(out) => out,
        Err(stuck) => {
            eprintln!(
                "QEMU TCG run stuck after {:?}; once more. Its output:\n{}",
                stuck.elapsed, stuck.stdout
            );
            run().unwrap_or_else(|again| {
                panic!(
                    "QEMU TCG run stuck twice:\n{}\n{}",
                    again.stdout, again.stderr
                )
            })
        }
    };
    let fields = common::result_fields(&out.stdout)
        .unwrap_or_else(|| panic!("no RINGVM-RESULT line: {out:#?}"));
    let get = |k: &str| {
        fields
            .get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {k} in {fields:?}"))
    };
    assert_eq!(
        (
            get("mode"),
            get("rw"),
            get("target"),
            get("errors"),
            get("fio_exit")
        ),
        ("fio", "randrw", "/dev/vdb", "0", "0"),
        "{}",
        out.stdout
    );
    for k in ["read_iops", "write_iops"] {
        let iops: u64 = get(k).parse().unwrap_or_else(|_| panic!("{k}={}", get(k)));
        assert!(iops > 0, "{k}=0:\n{}", out.stdout);
    }
    // The guest powered the machine off (QEMU exits 0 on ACPI power-off;
    // a panic would have printed no result line).
    assert_eq!(out.code, Some(0), "{out:#?}");
    let written = std::fs::read(&data).unwrap();
    assert!(
        written.iter().any(|&b| b != 0),
        "fio's writes did not reach the data disk"
    );
}
