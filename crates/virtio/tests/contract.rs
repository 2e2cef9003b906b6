//! The contract every virtio device keeps, driven through the virtio-pci
//! transport on a real KVM VM (for irqfds, ioeventfds and GSI routes):
//! activate, do I/O, reset, re-activate, survive bad driver writes, and
//! (virtio-blk) save and restore.
//! `run_contract` is called for each device type.

mod driver;

use ringvm_test_devices::kvm_available;
use std::sync::Arc;

use driver::{Driver, TestVm};
use uring_backend::iothread::IoThread;
use virtio::blk::{BlockDevice, DiskConfig};
use virtio::device::VirtioDevice;
use virtio::transport::common::{STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK};
use vmm::pci::config::{COMMAND_BUS_MASTER, COMMAND_MEMORY};

/// The parts of the contract that hold for any device.
fn run_contract(make: &dyn Fn() -> Box<dyn VirtioDevice>) {
    run_contract_on(&TestVm::new(), &|_| make());
}

/// The contract on `vm`, for devices that need its memory.
fn run_contract_on(vm: &TestVm, make: &dyn Fn(&TestVm) -> Box<dyn VirtioDevice>) {
    let mut drv = Driver::new(vm, make(vm));

    // Capabilities a modern driver needs are all there.
    let caps = drv.vendor_caps();
    for t in 1..=5 {
        assert!(
            caps.contains(&t),
            "virtio capability type {t} missing: {caps:?}"
        );
    }
    assert!(drv.has_msix());

    // Activate, reset, activate again.
    drv.init_all().expect("first activation");
    assert_eq!(drv.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    drv.reset();
    assert_eq!(drv.status(), 0);
    drv.init_all().expect("re-activation after reset");
    drv.reset();

    // Features the device did not offer, or no VERSION_1: FEATURES_OK does
    // not stick and DRIVER_OK does not start the device.
    let bogus = drv.device_features() | (1 << 63);
    assert!(drv.init(bogus).is_err());
    drv.reset();
    assert!({
        let f = drv.device_features();
        drv.init(f & !(1 << 32))
    }
    .is_err());
    drv.reset();

    // Garbage in the device config space, the common config and the BAR.
    drv.scribble();
    drv.reset();
    drv.init_all().expect("activation after garbage writes");
    drv.reset();

    // Queues outside guest memory: the device asks for a reset instead of
    // starting (or crashing).
    let f = drv.device_features();
    drv.init_with_bad_rings(f);
    assert_ne!(drv.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    drv.reset();
    assert_eq!(drv.status(), 0);
    drv.init_all().expect("activation after a needs-reset");

    // Bus mastering cleared under a running device: it stops (no more DMA)
    // and asks for a reset; with it set again the driver starts over.
    drv.set_command(COMMAND_MEMORY);
    assert_ne!(drv.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    drv.set_command(COMMAND_MEMORY | COMMAND_BUS_MASTER);
    drv.reset();
    drv.init_all()
        .expect("activation after bus mastering came back");
    assert_eq!(drv.status() & STATUS_DEVICE_NEEDS_RESET, 0);
}

fn disk_file(name: &str, size: u64) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("ringvm-contract-{name}-{}.img", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    path
}

#[test]
fn virtio_blk_keeps_the_device_contract() {
    if !kvm_available() {
        return;
    }
    let path = disk_file("blk", 1 << 20);
    let threads = vec![Arc::new(IoThread::spawn("contract", 64).unwrap())];
    let cfg = DiskConfig::parse(&format!("path={},queues=2", path.display())).unwrap();
    run_contract(&|| Box::new(BlockDevice::new("blk-contract", &cfg, &threads).unwrap()));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn virtio_blk_serves_io_through_the_transport_and_survives_reset() {
    if !kvm_available() {
        return;
    }
    let path = disk_file("blk-io", 1 << 20);
    let threads = vec![Arc::new(IoThread::spawn("contract-io", 64).unwrap())];
    let cfg = DiskConfig::parse(&format!("path={},serial=contract-id", path.display())).unwrap();
    let vm = TestVm::new();
    let mut drv = Driver::new(
        &vm,
        Box::new(BlockDevice::new("blk-io", &cfg, &threads).unwrap()),
    );
    drv.init_all().unwrap();

    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(drv.blk_write(0, 8, &pattern), 0);
    assert_eq!(drv.blk_flush(0), 0);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(
        &on_disk[8 * 512..8 * 512 + 4096],
        &pattern[..],
        "the write reached the file"
    );
    let (status, back) = drv.blk_read(0, 8, 4096);
    assert_eq!((status, back), (0, pattern.clone()));
    assert_eq!(drv.blk_get_id(0), b"contract-id\0\0\0\0\0\0\0\0\0".to_vec());
    // Past the end: IOERR, and the device carries on.
    assert_eq!(drv.blk_read(0, 2047, 1024).0, 1);
    assert_eq!(drv.blk_read(0, 8, 512).0, 0);
    // An unknown request type: UNSUPP.
    assert_eq!(drv.blk_raw_type(0, 77), 2);
    assert!(
        drv.interrupts(0) > 0,
        "completions raised the queue's MSI-X vector"
    );

    // Discard and write-zeroes make ranges read back as zeroes.
    assert_ne!(drv.device_features() & (1 << 14), 0, "WRITE_ZEROES offered");
    assert_eq!(drv.blk_write(0, 64, &pattern), 0);
    assert_eq!(drv.blk_ranges(0, 13, 64, 8, 0), 0);
    assert_eq!(drv.blk_read(0, 64, 4096), (0, vec![0; 4096]));
    if drv.device_features() & (1 << 13) != 0 {
        assert_eq!(drv.blk_write(0, 128, &pattern), 0);
        assert_eq!(drv.blk_ranges(0, 11, 128, 8, 0), 0);
        assert_eq!(drv.blk_read(0, 128, 4096), (0, vec![0; 4096]));
    }
    // A range past the end is IOERR.
    assert_eq!(drv.blk_ranges(0, 13, 2040, 16, 1), 1);
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk[64 * 512..72 * 512].iter().all(|&b| b == 0));

    // Reset with the disk in use, then start again.
    drv.reset();
    drv.init_all().unwrap();
    let (status, back) = drv.blk_read(0, 8, 4096);
    assert_eq!((status, back), (0, pattern));
    drop(drv);
    std::fs::remove_file(&path).unwrap();
}

/// A device does DMA only once the guest enabled bus mastering: a request
/// posted after DRIVER_OK with the bit clear waits (guest memory and the
/// disk untouched) and completes when the guest sets it.
#[test]
fn virtio_blk_does_no_dma_before_bus_mastering() {
    if !kvm_available() {
        return;
    }
    let path = disk_file("blk-master", 1 << 20);
    let threads = vec![Arc::new(IoThread::spawn("contract-bm", 64).unwrap())];
    let cfg = DiskConfig::parse(&format!("path={}", path.display())).unwrap();
    let vm = TestVm::new();
    let mut drv = Driver::new(
        &vm,
        Box::new(BlockDevice::new("blk-bm", &cfg, &threads).unwrap()),
    );
    drv.set_command(COMMAND_MEMORY);
    drv.init_all().unwrap();
    assert_ne!(drv.status() & STATUS_DRIVER_OK, 0);
    let pattern = vec![0xa5u8; 4096];
    drv.blk_post_write(0, 16, &pattern);
    assert_eq!(
        drv.wait_used(0, std::time::Duration::from_millis(300)),
        None
    );
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
    drv.set_command(COMMAND_MEMORY | COMMAND_BUS_MASTER);
    let done = drv.wait_used(0, std::time::Duration::from_secs(10));
    assert!(done.is_some(), "the request completed once DMA was allowed");
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[16 * 512..16 * 512 + 4096], &pattern[..]);
    drop(drv);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn read_only_disk_refuses_writes_with_ioerr() {
    if !kvm_available() {
        return;
    }
    let path = disk_file("blk-ro", 1 << 20);
    let threads = vec![Arc::new(IoThread::spawn("contract-ro", 64).unwrap())];
    let cfg = DiskConfig::parse(&format!("path={},readonly=on", path.display())).unwrap();
    let vm = TestVm::new();
    let mut drv = Driver::new(
        &vm,
        Box::new(BlockDevice::new("blk-ro", &cfg, &threads).unwrap()),
    );
    drv.init_all().unwrap();
    assert_ne!(
        drv.device_features() & (1 << 5),
        0,
        "VIRTIO_BLK_F_RO offered"
    );
    assert_eq!(drv.blk_write(0, 0, &[0xaa; 512]), 1);
    assert_eq!(drv.blk_read(0, 0, 512), (0, vec![0; 512]));
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
    drop(drv);
    std::fs::remove_file(&path).unwrap();
}

/// A tmpfs of `size` bytes mounted for one test, unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        let dir = std::env::temp_dir().join(format!("ringvm-smallfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "cannot mount a tmpfs and CI=true"
            );
            eprintln!("skipping: cannot mount a tmpfs (not root?)");
            return None;
        }
        Some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn backend_enospc_becomes_ioerr_and_the_device_carries_on() {
    if !kvm_available() {
        return;
    }
    let Some(fs) = SmallFs::mount("64k") else {
        return;
    };
    // A 1 MiB sparse disk on a 64 KiB file system.
    let path = fs.0.join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let threads = vec![Arc::new(IoThread::spawn("contract-nospc", 64).unwrap())];
    let cfg = DiskConfig::parse(&format!("path={}", path.display())).unwrap();
    let vm = TestVm::new();
    let mut drv = Driver::new(
        &vm,
        Box::new(BlockDevice::new("blk-nospc", &cfg, &threads).unwrap()),
    );
    drv.init_all().unwrap();
    let block = [0x77u8; 4096];
    let statuses: Vec<u8> = (0..64).map(|i| drv.blk_write(0, i * 8, &block)).collect();
    assert_eq!(statuses[0], 0, "the first write fits");
    assert!(
        statuses.contains(&1),
        "a full file system gives IOERR: {statuses:?}"
    );
    // Writes that were acknowledged are on disk; the device still reads.
    let (st, back) = drv.blk_read(0, 0, 4096);
    assert_eq!((st, back), (0, block.to_vec()));
    drop(drv);
}

#[test]
fn a_paused_disk_takes_no_request_until_resumed_and_counts_what_it_served() {
    use vm_memory::{Bytes, GuestAddress};
    use vmm::pci::PciDevice;
    if !kvm_available() {
        return;
    }
    let path = disk_file("blk-pause", 1 << 20);
    let threads = vec![Arc::new(IoThread::spawn("contract-pause", 64).unwrap())];
    let cfg = DiskConfig::parse(&format!("path={}", path.display())).unwrap();
    let dev = BlockDevice::new("blk-pause", &cfg, &threads).unwrap();
    let stats = dev.stats_handle();
    let vm = TestVm::new();
    let mut drv = Driver::new(&vm, Box::new(dev));
    // Before the driver starts the device there is nothing to pause.
    drv.dev.pause().unwrap();
    drv.dev.resume().unwrap();
    drv.init_all().unwrap();
    assert_eq!(drv.blk_write(0, 0, &[0x11; 4096]), 0);

    drv.dev.pause().unwrap();
    // A write posted (and kicked) while paused stays in the avail ring.
    let (h, data, status) = (
        Driver::BUFFERS,
        Driver::BUFFERS + 0x1000,
        Driver::BUFFERS + 0x100,
    );
    let mem = drv.memory().clone();
    mem.write_obj(1u32, GuestAddress(h)).unwrap();
    mem.write_obj(0u32, GuestAddress(h + 4)).unwrap();
    mem.write_obj(16u64, GuestAddress(h + 8)).unwrap();
    mem.write_slice(&[0x22; 4096], GuestAddress(data)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    drv.post(
        0,
        0,
        &[(h, 16, false), (data, 4096, false), (status, 1, true)],
    );
    assert_eq!(
        drv.wait_used(0, std::time::Duration::from_millis(500)),
        None,
        "a paused device completed a request"
    );
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk[16 * 512..16 * 512 + 4096].iter().all(|&b| b == 0));
    assert_eq!(
        stats.write_ops.load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    drv.dev.resume().unwrap();
    assert!(
        drv.wait_used(0, std::time::Duration::from_secs(10))
            .is_some(),
        "the request posted while paused was served after resume"
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), 0);
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk[16 * 512..16 * 512 + 4096]
        .iter()
        .all(|&b| b == 0x22));
    assert_eq!(drv.blk_read(0, 0, 4096), (0, vec![0x11; 4096]));
    let s = stats.snapshot();
    let get = |k: &str| s.iter().find(|(n, _)| *n == k).unwrap().1;
    assert_eq!(
        (
            get("write_ops"),
            get("write_bytes"),
            get("read_ops"),
            get("errors")
        ),
        (2, 8192, 1, 0)
    );

    // Reset while paused, then start again.
    drv.dev.pause().unwrap();
    drv.reset();
    drv.init_all().unwrap();
    assert_eq!(drv.blk_read(0, 16, 4096), (0, vec![0x22; 4096]));
    drop(drv);
    std::fs::remove_file(&path).unwrap();
}

/// A vhost-user disk keeps the contract against a backend that answers
/// every control message (the scripted one of tests/devices; it serves no
/// queue, so no I/O here: tests/vhost_user_frontend.rs does I/O against
/// real backends).
#[test]
fn vhost_user_blk_keeps_the_device_contract() {
    use ringvm_test_devices::vhost_user_script::*;
    use virtio::vhost_user::{Kind, VhostUserConfig, VhostUserDevice};
    if !kvm_available() {
        return;
    }
    let socket =
        std::env::temp_dir().join(format!("ringvm-contract-vhu-{}.sock", std::process::id()));
    let _backend = ScriptedBackend::start(
        &socket,
        Script {
            features: F_VERSION_1 | F_PROTOCOL_FEATURES | (1 << 6) | (1 << 9) | (1 << 12),
            protocol: PF_MQ | PF_REPLY_ACK | PF_CONFIG | PF_INFLIGHT_SHMFD | PF_CONFIGURE_MEM_SLOTS,
            queue_num: 2,
            config: blk_config(2048, 512, 2),
            lie: Lie::None,
        },
    );
    let cfg = VhostUserConfig::parse(
        Kind::Blk,
        &format!("vhost_user=on,socket={},queues=2", socket.display()),
    )
    .unwrap();
    let vm = TestVm::new_shared();
    run_contract_on(&vm, &|vm| {
        Box::new(
            VhostUserDevice::new(
                "vhu-contract",
                &cfg,
                vm.mem.clone(),
                [0x52, 0x54, 0, 0, 0, 1],
            )
            .unwrap(),
        )
    });
    let _ = std::fs::remove_file(&socket);
}

/// `ringvm-blk` from this build (next to the test's deps directory),
/// built now if the workspace was not.
fn ringvm_blk_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("ringvm-blk");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = std::process::Command::new(cargo)
            .args(["build", "-p", "ringvm-blk", "--bin", "ringvm-blk"])
            .status()
            .unwrap();
        assert!(st.success(), "building ringvm-blk failed");
    }
    bin
}

/// A vhost-user disk served by a real backend (ringvm-blk) through the
/// transport: I/O, flush, GET_ID, then a guest reset and re-activation
/// against the same backend (GET_VRING_BASE stopped the rings; the new
/// ones start from 0), and the data is still there.
#[test]
fn vhost_user_blk_serves_io_and_survives_reset_and_reactivation() {
    use virtio::vhost_user::{Kind, VhostUserConfig, VhostUserDevice};
    if !kvm_available() {
        return;
    }
    let path = disk_file("vhu-io", 1 << 20);
    let socket = path.with_extension("sock");
    let _ = std::fs::remove_file(&socket);
    let mut backend = std::process::Command::new(ringvm_blk_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(format!("path={},serial=vhu-contract", path.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    while !socket.exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let cfg = VhostUserConfig::parse(
        Kind::Blk,
        &format!("vhost_user=on,socket={}", socket.display()),
    )
    .unwrap();
    let vm = TestVm::new_shared();
    let dev =
        VhostUserDevice::new("vhu-io", &cfg, vm.mem.clone(), [0x52, 0x54, 0, 0, 0, 2]).unwrap();
    let mut drv = Driver::new(&vm, Box::new(dev));
    drv.init_all().unwrap();
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 5) as u8).collect();
    assert_eq!(drv.blk_write(0, 8, &pattern), 0);
    assert_eq!(drv.blk_flush(0), 0);
    assert_eq!(
        &std::fs::read(&path).unwrap()[8 * 512..8 * 512 + 4096],
        &pattern[..],
        "the backend wrote the file"
    );
    assert_eq!(drv.blk_read(0, 8, 4096), (0, pattern.clone()));
    assert_eq!(drv.blk_get_id(0), b"vhu-contract\0\0\0\0\0\0\0\0".to_vec());
    assert!(
        drv.interrupts(0) > 0,
        "the backend raised the MSI-X vector's irqfd"
    );
    drv.reset();
    drv.init_all()
        .expect("re-activation against the same backend");
    assert_eq!(drv.blk_read(0, 8, 4096), (0, pattern.clone()));
    assert_eq!(drv.blk_write(0, 16, &pattern), 0);
    drv.reset();
    drop(drv);
    let _ = backend.kill();
    let _ = backend.wait();
    assert_eq!(
        &std::fs::read(&path).unwrap()[16 * 512..16 * 512 + 4096],
        &pattern[..]
    );
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&socket);
}

/// A paused virtio-blk function saved with a request still in its avail
/// ring is loaded into a new device and transport in the same VM: after
/// resume the request is served from where the queue stood (no request
/// lost or done twice) and earlier data reads back. The restored function
/// decodes BAR0 where the saved one had it and stays paused until resumed.
/// A disk of another size is refused.
#[test]
fn a_saved_disk_function_restores_into_a_new_device_and_serves_the_pending_request() {
    use vm_memory::{Bytes, GuestAddress};
    use vmm::pci::PciDevice;
    use vmm::snapshot::SnapshotError;
    if !kvm_available() {
        return;
    }
    let path = disk_file("blk-snap", 1 << 20);
    let other = disk_file("blk-snap-small", 1 << 19);
    let threads = vec![Arc::new(IoThread::spawn("contract-snap", 64).unwrap())];
    let cfg = DiskConfig::parse(&format!("path={}", path.display())).unwrap();
    let vm = TestVm::new();
    let mut drv = Driver::new(
        &vm,
        Box::new(BlockDevice::new("blk-snap", &cfg, &threads).unwrap()),
    );
    drv.init_all().unwrap();
    assert_eq!(drv.blk_write(0, 0, &[0x33; 4096]), 0);
    drv.dev.pause().unwrap();
    let (h, data, status) = (
        Driver::BUFFERS,
        Driver::BUFFERS + 0x1000,
        Driver::BUFFERS + 0x100,
    );
    let mem = drv.memory().clone();
    mem.write_obj(1u32, GuestAddress(h)).unwrap();
    mem.write_obj(0u32, GuestAddress(h + 4)).unwrap();
    mem.write_obj(24u64, GuestAddress(h + 8)).unwrap();
    mem.write_slice(&[0x44; 4096], GuestAddress(data)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    drv.post(
        0,
        0,
        &[(h, 16, false), (data, 4096, false), (status, 1, true)],
    );
    let state = drv.dev.save_state().unwrap();

    // A disk of another size is not the saved device.
    let small = DiskConfig::parse(&format!("path={}", other.display())).unwrap();
    let mut wrong = virtio::transport::VirtioPciDevice::new(
        "blk-snap",
        Box::new(BlockDevice::new("blk-snap", &small, &threads).unwrap()),
        vm.fd.clone(),
        &vm.router,
        vm.mem.clone(),
    )
    .unwrap();
    let e = wrong.restore_state(&state).unwrap_err();
    assert!(
        matches!(&e, SnapshotError::Mismatch { .. }) && e.to_string().contains("capacity"),
        "{e}"
    );
    drop(wrong);

    // The same disk in a new device: the old one goes first (its notify
    // ioeventfds sit where the new BAR will be).
    let fresh = virtio::transport::VirtioPciDevice::new(
        "blk-snap",
        Box::new(BlockDevice::new("blk-snap", &cfg, &threads).unwrap()),
        vm.fd.clone(),
        &vm.router,
        vm.mem.clone(),
    )
    .unwrap();
    drop(std::mem::replace(&mut drv.dev, fresh));
    drv.dev.restore_state(&state).unwrap();
    let bars = drv.dev.decoded_bars();
    assert_eq!(bars.len(), 1, "BAR0 decoded where it was saved");
    drv.dev.bars_changed(&[], &bars);
    assert_eq!(
        drv.wait_used(0, std::time::Duration::from_millis(300)),
        None,
        "a restored device stays paused until resume"
    );
    drv.dev.resume().unwrap();
    assert!(
        drv.wait_used(0, std::time::Duration::from_secs(10))
            .is_some(),
        "the request pending at save was served after restore"
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), 0);
    assert_eq!(drv.blk_read(0, 24, 4096), (0, vec![0x44; 4096]));
    assert_eq!(drv.blk_read(0, 0, 4096), (0, vec![0x33; 4096]));
    drop(drv);
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&other).unwrap();
}
