//! Boots a stock Debian cloud kernel and checks what it prints about the
//! boot parameters ringvm gave it: banner, the exact command line, an e820
//! map matching the layout ringvm built, and the initrd where ringvm put it.
//! Three ways in: the bzImage (64-bit Linux boot protocol, decompressor
//! included), and the vmlinux ELF inside it, through its PVH note and, with
//! the note removed, through the 64-bit entry of an ELF vmlinux.
//!
//! The run ends once the log has what is checked (ringvm is sent SIGTERM).
//! On a hardware-KVM host the kernel may get further first: it boots on, finds no root file system,
//! panics and reboots (`panic=-1 reboot=k`): ringvm reports a reset. On a
//! PVM host KVM emulates every instruction; the kernel gets through early
//! boot (decompression alone takes about two minutes) and stops on an
//! instruction the emulator lacks, which ringvm must report with RIP and
//! bytes. Either outcome passes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::kvm_available;

/// Where the downloaded kernel is cached between runs.
fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("debian-kernel")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir.join("x/boot"))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
}

/// A stock Debian `linux-image-*-cloud-amd64` bzImage: `RINGVM_TEST_KERNEL`
/// if set, else downloaded with `apt-get download` and unpacked.
fn debian_kernel() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Ok(p) = std::env::var("RINGVM_TEST_KERNEL") {
        return p.into();
    }
    let dir = cache_dir();
    if let Some(k) = find_vmlinuz(&dir) {
        return k;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let deps = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]));
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .unwrap_or_else(|| panic!("no linux-image dependency in:\n{deps}"))
        .to_string();
    run(Command::new("apt-get")
        .args(["download", &pkg])
        .current_dir(&dir));
    let deb = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("apt-get download left a .deb");
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("x")));
    let _ = std::fs::remove_file(&deb);
    find_vmlinuz(&dir).expect("the package holds /boot/vmlinuz-*")
}

/// The vmlinux ELF inside a bzImage: the payload named by the setup
/// header, decompressed with the matching host tool.
fn extract_vmlinux(bzimage: &Path) -> PathBuf {
    let out = bzimage.with_file_name("vmlinux");
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if out.exists() {
        return out;
    }
    let img = std::fs::read(bzimage).unwrap();
    let setup_sects = match img[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let u32_at = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().unwrap()) as usize;
    let start = (setup_sects + 1) * 512 + u32_at(0x248);
    let payload = &img[start..start + u32_at(0x24c)];
    let tool = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => "lz4",
        [0x1f, 0x8b, ..] => "gzip",
        [0xfd, b'7', b'z', b'X', b'Z', ..] => "xz",
        [0x28, 0xb5, 0x2f, 0xfd, ..] => "zstd",
        _ => panic!("unknown kernel compression {:02x?}", &payload[..4]),
    };
    let packed = bzimage.with_file_name("payload");
    std::fs::write(&packed, payload).unwrap();
    let file = std::fs::File::create(&out).unwrap();
    // Tools complain about trailing bytes after the stream; the output is
    // what counts, so only the ELF magic is checked.
    let _ = Command::new(tool)
        .arg("-dc")
        .arg(&packed)
        .stdout(file)
        .status();
    let _ = std::fs::remove_file(&packed);
    let head = std::fs::read(&out)
        .map(|b| b[..4].to_vec())
        .unwrap_or_default();
    assert_eq!(head, b"\x7fELF", "{tool} did not yield a vmlinux ELF");
    out
}

/// A copy of `vmlinux` whose PVH entry note no longer counts, so ringvm
/// boots it through the 64-bit Linux entry instead.
fn without_pvh_note(vmlinux: &Path) -> PathBuf {
    let out = vmlinux.with_file_name("vmlinux-nopvh");
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if out.exists() {
        return out;
    }
    let mut img = std::fs::read(vmlinux).unwrap();
    // namesz 4, descsz 8, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0".
    let note = [4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
    let at = img
        .windows(note.len())
        .position(|w| w == note)
        .expect("a PVH note");
    img[at + 8] = 0x7f; // an unused note type
    std::fs::write(&out, img).unwrap();
    out
}

const INITRD_SIZE: usize = 300 * 1024;
const MEMORY: &str = "128M";

/// The line after which the early boot log holds everything checked here
/// (the kernel has parsed the boot parameters, the e820 map, the initrd
/// and ringvm's ACPI tables): the run is ended then, with SIGTERM. On this
/// project's PVM host the emulator would stop the kernel a few minutes
/// later anyway; an emulation failure is reported with RIP and bytes, which
/// tests/boot.rs checks.
const ENOUGH: &str = "ACPI: Reserving APIC table memory";

/// Boots `kernel` with an initrd and checks the early boot log.
fn boot_and_check(kernel: &Path, protocol: &str, name: &str) {
    let dir = common::TempDir::new(name);
    let initrd = dir.file("initrd.img", &vec![0xa5; INITRD_SIZE]);
    let cmdline =
        format!("console=ttyS0 earlyprintk=serial nokaslr reboot=k panic=-1 ringvm.test={name}");
    let out = common::run_until_line(
        Command::new(common::ringvm_bin()).args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            MEMORY,
            "--cmdline",
            &cmdline,
        ]),
        ENOUGH,
        Duration::from_secs(900),
    );
    let console = &out.stdout;
    assert!(console.contains("Linux version "), "{out:#?}");
    let cmd_lines: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("Command line: ").map(|(_, c)| c))
        .collect();
    assert_eq!(
        cmd_lines.first().copied(),
        Some(cmdline.as_str()),
        "{console}"
    );

    // The layout ringvm builds for 128 MiB: low RAM up to the EBDA, the
    // EBDA..1 MiB window reserved, RAM from 1 MiB to the end.
    let e820: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("BIOS-e820: ").map(|(_, e)| e.trim()))
        .collect();
    assert_eq!(
        e820,
        [
            "[mem 0x0000000000000000-0x000000000009fbff] usable",
            "[mem 0x000000000009fc00-0x00000000000fffff] reserved",
            "[mem 0x0000000000100000-0x0000000007ffffff] usable",
        ],
        "{console}"
    );
    // The initrd sits page-aligned at the top of RAM.
    let start = 0x800_0000 - INITRD_SIZE;
    let want = format!("RAMDISK: [mem {start:#010x}-{:#010x}]", 0x800_0000 - 1);
    assert!(console.contains(&want), "{want} missing:\n{console}");

    // ringvm's ACPI tables, found through the boot protocol's RSDP pointer
    // (boot_params.acpi_rsdp_addr, or the PVH start info).
    for table in [
        "RSDP 0x00000000000E0000",
        "XSDT 0x",
        "FACP 0x",
        "DSDT 0x",
        "APIC 0x",
    ] {
        let want = format!("ACPI: {table}");
        assert!(console.contains(&want), "{want} missing:\n{console}");
    }

    let line = out.stop_line();
    assert!(line.contains(protocol), "{line}");
    match out.code {
        // Ended by the test once the log had everything.
        Some(106) => assert!(line.contains("signal"), "{line}"),
        // PVM: an instruction the emulator lacks (e.g. CMPXCHG16B).
        Some(104) => {
            assert!(
                line.contains("emulation failure on vCPU 0 at rip=0x"),
                "{line}"
            );
            let bytes = line.split_once("insn=[").expect("instruction bytes").1;
            assert!(bytes.len() > 3 && !bytes.starts_with(']'), "{line}");
        }
        // Hardware KVM: boots on, panics without a root fs, reboots.
        Some(102) => assert!(line.contains("reset"), "{line}"),
        _ => panic!("unexpected outcome: {out:#?}"),
    }
}

#[test]
fn stock_bzimage_boots_through_the_64bit_linux_protocol() {
    if !kvm_available() {
        return;
    }
    boot_and_check(
        &debian_kernel(),
        "bzImage, 64-bit Linux boot protocol",
        "bzimage",
    );
}

#[test]
fn stock_vmlinux_boots_through_its_pvh_note() {
    if !kvm_available() {
        return;
    }
    let vmlinux = extract_vmlinux(&debian_kernel());
    boot_and_check(&vmlinux, "ELF, PVH boot protocol", "pvh");
}

#[test]
fn stock_vmlinux_without_pvh_note_boots_through_the_64bit_elf_entry() {
    if !kvm_available() {
        return;
    }
    let vmlinux = without_pvh_note(&extract_vmlinux(&debian_kernel()));
    boot_and_check(&vmlinux, "ELF vmlinux, 64-bit Linux boot protocol", "elf64");
}
