//! Linux's own virtio drivers as tests of ringvm's devices: a small Linux
//! 6.1 (tests/linux/, built once and cached by tests/common/linux.rs) with
//! our freestanding `/init`, booted through the real `ringvm` binary on
//! real KVM. `/init` takes its orders from the kernel command line
//! (`rv_*=` tokens) and prints one `RINGVM-RESULT` line; the host checks
//! the result fields and, independently, the disk file and the network
//! traffic it saw.
//!
//! On a PVM host every guest instruction runs in KVM's instruction
//! emulator: a boot to `/init` takes 20 s or more of one core, so each test
//! boots once and deadlines are generous; nothing asserts on time.

mod common;
#[path = "common/linux.rs"]
mod linux_build;

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::{have_ping, ping, Background, Netns, GUEST_IP, HOST_IP, TAP};
use common::{crc32, kvm_available, result_fields, run_ringvm, Outcome, TempDir};
use linux_build::{linux_guest, LinuxGuest};

/// A whole boot, start to stop.
const DEADLINE: Duration = Duration::from_secs(900);
/// ringvm's exit code for an ACPI (or other) guest power-off.
const EXIT_SHUTDOWN: i32 = 101;
const MEMORY: &str = "64M";

/// The kernel command line every test starts from. The instruction
/// emulator lacks XSAVE, stac/clac (SMAP), popcnt, rdrand, rdseed,
/// {rd,wr}fsbase, invpcid, PCID and PKU: hidden from the kernel here.
/// `rodata=off` saves seconds of page-table work; `panic=-1 reboot=k` turns
/// a panic into a reset that ends the VM.
const BASE_CMDLINE: &str = "console=ttyS0 earlyprintk=serial noxsave \
     clearcpuid=smap,popcnt,rdrand,rdseed,fsgsbase,invpcid,pcid,pku \
     rodata=off mitigations=off panic=-1 reboot=k";

/// The host's TSC rate in kHz, measured against the monotonic clock.
///
/// The guest cannot calibrate its TSC: its PIT loops run in the emulator,
/// and with `--irqchip split` there is no PIT at all (and on AMD no CPUID
/// leaf 0x15, no kvmclock without PARAVIRT). Given `tsc_early_khz=` the
/// kernel trusts the TSC and runs its local APIC timer in TSC-deadline
/// mode, which needs no calibration either.
fn host_tsc_khz() -> u64 {
    // SAFETY: rdtsc has no side effects; x86_64 always has it.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(100));
    let (c1, t1) = (tsc(), Instant::now());
    let khz = (c1 - c0) as f64 / (t1 - t0).as_secs_f64() / 1e3;
    // Round to 10 MHz-ish steps' worth of noise: 0.1 % is plenty here.
    (khz / 1000.0).round() as u64 * 1000
}

/// The base command line, the TSC rate, `lpj=` from it (so that no CPU
/// calibrates its delay loop, which fails on the secondary CPUs under the
/// emulator) and the test's parameters.
fn cmdline(params: &str) -> String {
    let khz = host_tsc_khz();
    // loops_per_jiffy with a TSC delay loop: TSC ticks per jiffy (HZ=100).
    let lpj = khz * 1000 / 100;
    format!("{BASE_CMDLINE} tsc_early_khz={khz} lpj={lpj} {params}")
}

/// The KVM check, then the guest (built on first use). `None`: skip.
fn setup() -> Option<LinuxGuest> {
    if !kvm_available() {
        return None;
    }
    linux_guest()
}

/// `ringvm run` arguments for the Linux guest.
fn run_args(g: &LinuxGuest, cpus: u32, irqchip: &str, cmdline: &str) -> Vec<String> {
    [
        "run",
        "--kernel",
        g.vmlinux.to_str().unwrap(),
        "--initrd",
        g.initramfs.to_str().unwrap(),
        "--memory",
        MEMORY,
        "--cpus",
        &cpus.to_string(),
        "--irqchip",
        irqchip,
        "--cmdline",
        cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The result line's fields; a line without its last fields (cut short, or
/// interleaved with kernel messages) fails with the whole output.
fn fields(out: &Outcome) -> BTreeMap<String, String> {
    let f = result_fields(&out.stdout).unwrap_or_else(|| panic!("no RINGVM-RESULT line: {out:#?}"));
    assert!(
        f.contains_key("ok") && f.contains_key("errors"),
        "an incomplete RINGVM-RESULT line: {out:#?}"
    );
    f
}

/// Prints how long the boot took (for the log, never asserted).
fn note_time(name: &str, out: &Outcome, f: &BTreeMap<String, String>) {
    eprintln!(
        "{name}: ringvm ran {:.1} s, guest uptime at the result {} s",
        out.elapsed.as_secs_f64(),
        f.get("uptime").map_or("?", String::as_str)
    );
}

/// Sum of `/init`'s `irq_virtio<N>-<suffix>` fields (one device per test).
fn irqs(f: &BTreeMap<String, String>, suffix: &str) -> Option<u64> {
    f.iter()
        .filter(|(k, _)| {
            k.strip_prefix("irq_virtio")
                .and_then(|r| r.split_once('-'))
                .is_some_and(|(n, s)| n.bytes().all(|b| b.is_ascii_digit()) && s == suffix)
        })
        .map(|(_, v)| v.parse::<u64>().expect("a count"))
        .reduce(|a, b| a + b)
}

fn num(f: &BTreeMap<String, String>, key: &str) -> u64 {
    f.get(key)
        .unwrap_or_else(|| panic!("no {key} in {f:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key}={}: {e}", f[key]))
}

// ---- virtio-blk ---------------------------------------------------------

/// `/init`'s data pattern (tests/linux/init.c `pattern`): the 8-byte word
/// at disk offset 8*i is mix((seed << 32) ^ i), little-endian.
fn pattern(off: u64, len: u64, seed: u64) -> Vec<u8> {
    let mix = |mut x: u64| {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    };
    (off..off + len)
        .map(|o| (mix((seed << 32) ^ (o >> 3)) >> (8 * (o & 7))) as u8)
        .collect()
}

const DISK_SIZE: u64 = 16 << 20;
const SEED: u64 = 11;
/// Written by the guest with O_DIRECT (seed SEED).
const DW: (u64, u64) = (0, 512 << 10);
/// Written by the guest through the page cache in 3000-byte pieces (seed
/// SEED + 1).
const CW: (u64, u64) = (1 << 20, 300 << 10);
/// Written by the host, read by the guest both ways.
const HR: (u64, u64) = (2 << 20, 512 << 10);
/// Filled by the host, discarded by the guest.
const DISCARD: (u64, u64) = (4 << 20, 1 << 20);

fn range(data: &[u8], (off, len): (u64, u64)) -> &[u8] {
    &data[off as usize..(off + len) as usize]
}

/// The disk before the boot: host data in HR, 0xa5 in DISCARD, zeros
/// elsewhere.
fn prepare_disk(path: &Path) -> Vec<u8> {
    let mut data = vec![0u8; DISK_SIZE as usize];
    let mut x = 0x1234_5678u32;
    for b in &mut data[HR.0 as usize..(HR.0 + HR.1) as usize] {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    data[DISCARD.0 as usize..(DISCARD.0 + DISCARD.1) as usize].fill(0xa5);
    std::fs::write(path, &data).unwrap();
    data
}

/// Whether `[off, off+len)` of the file is a hole (deallocated).
fn is_hole(path: &Path, (off, len): (u64, u64)) -> bool {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: lseek on a descriptor owned by `f`; no memory is touched.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), off as i64, libc::SEEK_HOLE) };
    // SAFETY: as above.
    let data = unsafe { libc::lseek(f.as_raw_fd(), off as i64, libc::SEEK_DATA) };
    hole == off as i64 && (data < 0 || data >= (off + len) as i64)
}

/// Boots the guest on a prepared disk with 4 queues and 2 vCPUs; `/init`
/// writes (O_DIRECT and cached), fsyncs, reads the host's data both ways
/// and discards a range. The host then checks the file byte for byte.
fn blk_test(name: &str, irqchip: &str) {
    let Some(g) = setup() else { return };
    let dir = TempDir::new(name);
    let disk = dir.path().join("disk.img");
    let before = prepare_disk(&disk);
    let params = format!(
        "rv_mode=blk rv_exit=port rv_seed={SEED} rv_dw_off={} rv_dw_len={} \
         rv_cw_off={} rv_cw_len={} rv_r_off={} rv_r_len={} \
         rv_discard_off={} rv_discard_len={}",
        DW.0, DW.1, CW.0, CW.1, HR.0, HR.1, DISCARD.0, DISCARD.1
    );
    let mut args = run_args(&g, 2, irqchip, &cmdline(&params));
    args.push("--disk".into());
    args.push(format!("path={},queues=4", disk.display()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ringvm(&argv, DEADLINE);
    let f = fields(&out);
    note_time(name, &out, &f);
    assert_eq!(out.code, Some(0), "{f:?}\n{out:#?}");
    assert_eq!(
        (f["ok"].as_str(), f["errors"].as_str()),
        ("1", "0"),
        "{out:#?}"
    );
    assert_eq!(f["cpus_online"], "0-1", "{f:?}");
    assert_eq!(num(&f, "size"), DISK_SIZE, "{f:?}");
    // queues=4 with 2 vCPUs: blk-mq uses one queue per CPU, and /init
    // issued I/O from both, each completing on its own MSI-X vector.
    assert_eq!(num(&f, "mq"), 2, "{f:?}");
    for q in ["req.0", "req.1"] {
        assert!(
            irqs(&f, q).is_some_and(|n| n > 0),
            "no interrupts on {q}: {f:?}"
        );
    }
    assert!(num(&f, "discard_max") > 0, "{f:?}");
    assert_eq!(f["discard_errno"], "0", "{f:?}");

    let after = std::fs::read(&disk).unwrap();
    assert_eq!(after.len() as u64, DISK_SIZE);
    let want_dw = pattern(DW.0, DW.1, SEED);
    let want_cw = pattern(CW.0, CW.1, SEED + 1);
    assert!(
        range(&after, DW) == want_dw,
        "the O_DIRECT write is not in the file"
    );
    assert!(
        range(&after, CW) == want_cw,
        "the page-cache write is not in the file"
    );
    // The guest's CRCs of what it read back from the device.
    assert_eq!(f["dw_crc"], format!("{:08x}", crc32(&want_dw)), "{f:?}");
    assert_eq!(f["cw_crc"], format!("{:08x}", crc32(&want_cw)), "{f:?}");
    // What the host wrote, as the guest read it through the cache and not.
    let host = format!("{:08x}", crc32(range(&before, HR)));
    assert_eq!((&f["rc_crc"], &f["rd_crc"]), (&host, &host), "{f:?}");
    assert!(
        range(&after, HR) == range(&before, HR),
        "the read-only range changed"
    );
    // Discarded: reads back zero and is deallocated in the file.
    assert!(
        range(&after, DISCARD).iter().all(|&b| b == 0),
        "the discarded range does not read back as zeros"
    );
    assert!(is_hole(&disk, DISCARD), "the discarded range is not a hole");
    // Nothing else was touched.
    for gap in [
        (DW.0 + DW.1, CW.0 - DW.0 - DW.1),
        (CW.0 + CW.1, HR.0 - CW.0 - CW.1),
        (HR.0 + HR.1, DISCARD.0 - HR.0 - HR.1),
        (DISCARD.0 + DISCARD.1, DISK_SIZE - DISCARD.0 - DISCARD.1),
    ] {
        assert!(
            range(&after, gap).iter().all(|&b| b == 0),
            "bytes changed in {gap:x?}"
        );
    }
}

/// 1. Linux's virtio_blk on a four-queue disk, two vCPUs, in-kernel irqchip.
#[test]
fn linux_virtio_blk_direct_cached_discard_multiqueue() {
    blk_test("linux-blk", "kernel");
}

/// 2. The same with the split irqchip (IOAPIC in ringvm, no PIT).
#[test]
fn linux_virtio_blk_under_split_irqchip() {
    blk_test("linux-blk-split", "split");
}

// ---- virtio-net ---------------------------------------------------------

const ECHO_PORT: u16 = 7777;
const GUEST_PORT: u16 = 7000;
const DATAGRAMS: u64 = 16;
const DATAGRAM_SIZE: u64 = 512;

/// Echoes every datagram to HOST_IP:ECHO_PORT back until `stop`; returns
/// the payloads it saw. Runs inside the namespace.
fn echo_server(stop: Arc<AtomicBool>) -> Vec<Vec<u8>> {
    let s = UdpSocket::bind((HOST_IP, ECHO_PORT)).expect("binding the echo server");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => {
                s.send_to(&buf[..n], from).expect("echoing");
                seen.push(buf[..n].to_vec());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("echo server: {e}"),
        }
    }
    seen
}

/// Sends "go" to the guest and waits for it to come back (the guest as an
/// echo server). Runs inside the namespace.
fn go() -> Result<(), String> {
    let s = UdpSocket::bind((HOST_IP, 0)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.send_to(b"go: host to guest", (GUEST_IP, GUEST_PORT))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let (n, from) = s.recv_from(&mut buf).map_err(|e| e.to_string())?;
    if &buf[..n] != b"go: host to guest" || from.port() != GUEST_PORT {
        return Err(format!("wrong reply {:?} from {from}", &buf[..n]));
    }
    Ok(())
}

/// Boots the guest with a two-queue-pair virtio-net on a multi-queue TAP in
/// a namespace: `/init` brings eth0 up with ioctls, the host pings it,
/// exchanges "go" with it, and echoes its datagrams (sent from both vCPUs,
/// so through both transmit queues).
fn net_test(name: &str, irqchip: &str) {
    if !kvm_available() || !have_ping() {
        return;
    }
    let Some(ns) = Netns::new(name) else { return };
    let Some(g) = linux_guest() else { return };
    ns.add_tap(2);
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        ns.thread(move || echo_server(stop))
    };
    let params = format!(
        "rv_mode=net rv_exit=port rv_ip={GUEST_IP} rv_mask=255.255.255.0 \
         rv_peer={HOST_IP} rv_port={ECHO_PORT} rv_lport={GUEST_PORT} \
         rv_count={DATAGRAMS} rv_size={DATAGRAM_SIZE}"
    );
    let mut args = run_args(&g, 2, irqchip, &cmdline(&params));
    args.push("--net".into());
    args.push(format!("tap={TAP},queues=2"));
    let mut vm = Background::spawn(ns.command(common::ringvm_bin()).args(&args));
    vm.wait_line("rvinit: net up", DEADLINE);
    ping(&ns, 3);
    let went = ns.thread(go).join().unwrap();
    let out = vm.finish(DEADLINE);
    stop.store(true, Ordering::Relaxed);
    let seen = server.join().unwrap();
    assert_eq!(went, Ok(()), "{out:#?}");
    let f = fields(&out);
    note_time(name, &out, &f);
    assert_eq!(out.code, Some(0), "{f:?}\n{out:#?}");
    assert_eq!(
        (f["ok"].as_str(), f["errors"].as_str()),
        ("1", "0"),
        "{out:#?}"
    );
    assert_eq!(f["cpus_online"], "0-1", "{f:?}");
    assert_eq!(num(&f, "udp_ok"), DATAGRAMS, "{f:?}");
    // The host saw exactly what the guest sent, in order.
    let mut crc = Vec::new();
    for (i, p) in seen.iter().enumerate() {
        let mut want = pattern(i as u64 * DATAGRAM_SIZE, DATAGRAM_SIZE, 3);
        want[0] = i as u8;
        assert!(*p == want, "datagram {i} differs");
        crc.extend_from_slice(p);
    }
    assert_eq!(seen.len() as u64, DATAGRAMS, "{f:?}");
    assert_eq!(f["udp_crc"], format!("{:08x}", crc32(&crc)), "{f:?}");
    // Two queue pairs, both used in each direction (virtio_net's ethtool
    // counters), each queue on its own MSI-X vector.
    for q in ["txq0", "txq1", "rxq0", "rxq1"] {
        assert!(num(&f, q) > 0, "nothing on {q}: {f:?}");
    }
    assert!(!f.contains_key("txq2"), "more than two queue pairs: {f:?}");
    for q in ["input.0", "input.1"] {
        assert!(
            irqs(&f, q).is_some_and(|n| n > 0),
            "no interrupts on {q}: {f:?}"
        );
    }
}

/// 3. Linux's virtio_net with two queue pairs, in-kernel irqchip: ping and
///    UDP echo through a TAP.
#[test]
fn linux_virtio_net_ping_and_udp_two_queue_pairs() {
    net_test("lnet", "kernel");
}

/// 4. The same with the split irqchip.
#[test]
fn linux_virtio_net_under_split_irqchip() {
    net_test("lnet-split", "split");
}

// ---- ACPI ---------------------------------------------------------------

/// Boots with 2 vCPUs and a disk (so there is a PCI host bridge), `/init`
/// reports and powers off with reboot(POWER_OFF); the kernel must have
/// taken CPUs, IOAPIC and ECAM from ACPI and ringvm must report a guest
/// shutdown.
fn acpi_test(name: &str, irqchip: &str) {
    let Some(g) = setup() else { return };
    let dir = TempDir::new(name);
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut args = run_args(&g, 2, irqchip, &cmdline("rv_mode=info rv_exit=poweroff"));
    args.push("--disk".into());
    args.push(format!("path={}", disk.display()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_ringvm(&argv, DEADLINE);
    let f = fields(&out);
    note_time(name, &out, &f);
    let log = &out.stdout;
    for table in ["XSDT", "FACP", "DSDT", "APIC", "MCFG"] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("ACPI: {table} 0x"))),
            "the kernel did not list the {table} table:\n{log}"
        );
    }
    for line in [
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "IOAPIC[0]: apic_id",
        "PCI: MMCONFIG for domain 0000 [bus 00-",
        "smp: Brought up 1 node, 2 CPUs",
    ] {
        assert!(log.contains(line), "no `{line}` on the console:\n{log}");
    }
    // Linux uses the MCFG's ECAM only once it finds it reserved as a
    // motherboard resource (or in e820); else it stays on port I/O.
    assert!(
        log.contains("reserved in ACPI motherboard resources"),
        "the kernel did not take the ECAM:\n{log}"
    );
    assert_eq!(f["cpus_online"], "0-1", "{f:?}");
    let tables: Vec<&str> = f["acpi_tables"].split(',').collect();
    for t in ["APIC", "DSDT", "FACP", "MCFG"] {
        assert!(
            tables.contains(&t),
            "no /sys/firmware/acpi/tables/{t}: {f:?}"
        );
    }
    assert_eq!(num(&f, "pci_devices"), 2, "{f:?}");
    assert_eq!(
        (f["ok"].as_str(), f["errors"].as_str()),
        ("1", "0"),
        "{out:#?}"
    );
    assert_eq!(out.code, Some(EXIT_SHUTDOWN), "{out:#?}");
    assert!(out.stop_line().contains("guest shut down"), "{out:#?}");
}

/// 5. ACPI tables, in-kernel irqchip.
#[test]
fn linux_acpi_two_cpus_ioapic_ecam_and_power_off() {
    acpi_test("linux-acpi", "kernel");
}

/// 6. ACPI tables with the split irqchip.
#[test]
fn linux_acpi_under_split_irqchip() {
    acpi_test("linux-acpi-split", "split");
}
