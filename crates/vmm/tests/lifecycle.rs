//! The lifecycle on a real VM: a device that fails to pause leaves the VM
//! running (and the devices paused before it resumed), pause and resume
//! reach every PCI device, wrong states are refused, the power button is
//! what a device registered, and a shutdown request ends the run with its
//! own reason.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vmm::config::{KernelSource, VmConfig};
use vmm::devices::SerialOutput;
use vmm::machine::Machine;
use vmm::pci::{BarRange, PciDevice};
use vmm::{LifecycleError, StopReason, VmState};

/// An ELF64 kernel (64-bit Linux entry) that spins: `jmp $`.
fn spin_kernel() -> &'static [u8] {
    let code = [0xeb, 0xfe];
    let mut e = vec![0u8; 120 + code.len()];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2;
    e[5] = 1;
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes());
    e[18..20].copy_from_slice(&62u16.to_le_bytes());
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    e[32..40].copy_from_slice(&64u64.to_le_bytes());
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
    e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
    e[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes());
    e[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    e[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    e[120..].copy_from_slice(&code);
    Box::leak(e.into_boxed_slice())
}

/// What a probe device saw.
#[derive(Default)]
struct Seen {
    pauses: AtomicUsize,
    resumes: AtomicUsize,
    /// Refuse to pause while set.
    refuse: AtomicBool,
    dropped: AtomicBool,
}

/// A PCI function with no BARs that records pause and resume.
struct Probe(Arc<Seen>);

impl PciDevice for Probe {
    fn config_read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn config_write(&mut self, _offset: u16, _data: &[u8]) {}
    fn decoded_bars(&self) -> Vec<BarRange> {
        Vec::new()
    }
    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
    fn set_bar_address(&mut self, _index: u8, _addr: u64) {}
    fn bar_requests(&self) -> Vec<(u8, u64, bool)> {
        Vec::new()
    }
    fn pause(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.0.refuse.load(Ordering::SeqCst) {
            return Err("the probe refuses".into());
        }
        self.0.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.dropped.store(true, Ordering::SeqCst);
    }
}

fn config() -> VmConfig {
    VmConfig {
        kernel: KernelSource::Builtin(spin_kernel()),
        initrd: None,
        cmdline: String::new(),
        memory: 64 << 20,
        cpus: 2,
        serial: SerialOutput::Off,
        serial_input: false,
        cpuid_hide: Vec::new(),
        shared_memory: false,
        irqchip: Default::default(),
        acpi: true,
        seccomp: vmm::seccomp::SeccompMode::Off,
        vcpu_affinity: Vec::new(),
    }
}

#[test]
fn pause_resume_refusals_power_button_and_shutdown_on_a_spinning_guest() {
    if !ringvm_test_devices::kvm_available() {
        return;
    }
    let mut m = Machine::build(&config()).expect("building the machine");
    let (a, b) = (Arc::new(Seen::default()), Arc::new(Seen::default()));
    m.add_pci_device("probe-a", Arc::new(Mutex::new(Probe(a.clone()))))
        .unwrap();
    m.add_pci_device("probe-b", Arc::new(Mutex::new(Probe(b.clone()))))
        .unwrap();
    let presses = Arc::new(AtomicUsize::new(0));
    let p = presses.clone();
    m.on_power_button(Box::new(move || {
        p.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }));
    let control = m.control().clone();
    assert_eq!(control.state(), VmState::Created);
    assert!(control.pause().unwrap_err().is_wrong_state());
    assert!(control.power_button().unwrap_err().is_wrong_state());

    let running = m.start().expect("starting");
    let waiter = std::thread::spawn(move || running.wait(None));
    assert_eq!(control.state(), VmState::Running);
    assert!(control.resume().unwrap_err().is_wrong_state());

    // The second device refuses: the first is resumed, the VM runs on,
    // and the failure is the host's (HTTP 500), naming the device.
    b.refuse.store(true, Ordering::SeqCst);
    let e = control.pause().unwrap_err();
    assert!(!e.is_wrong_state(), "{e}");
    assert!(
        matches!(&e, LifecycleError::PauseDevice { name, .. } if name == "probe-b"),
        "{e}"
    );
    assert_eq!(control.state(), VmState::Running);
    assert_eq!(
        (
            a.pauses.load(Ordering::SeqCst),
            a.resumes.load(Ordering::SeqCst)
        ),
        (1, 1)
    );

    b.refuse.store(false, Ordering::SeqCst);
    control.pause().expect("pausing");
    assert_eq!(control.state(), VmState::Paused);
    assert!(control.pause().unwrap_err().is_wrong_state());
    assert_eq!(b.pauses.load(Ordering::SeqCst), 1);
    control.resume().expect("resuming");
    assert_eq!(control.state(), VmState::Running);
    assert_eq!(
        (
            a.pauses.load(Ordering::SeqCst),
            a.resumes.load(Ordering::SeqCst)
        ),
        (2, 2)
    );
    assert_eq!(b.resumes.load(Ordering::SeqCst), 1);

    control.power_button().expect("pressing");
    assert_eq!(presses.load(Ordering::SeqCst), 1);

    // Shut down while paused: the parked vCPUs leave, the run ends with
    // the request as its reason, and the devices go down with the machine
    // although this handle lives on.
    control.pause().expect("pausing again");
    control
        .shutdown(StopReason::Requested {
            request: "vm.shutdown",
        })
        .expect("shutting down");
    let report = waiter.join().unwrap().expect("the run");
    assert_eq!(
        report.reason,
        StopReason::Requested {
            request: "vm.shutdown"
        }
    );
    assert_eq!(report.reason.exit_code(), vmm::exit_code::REQUESTED);
    assert_eq!(control.state(), VmState::Shutdown);
    assert!(a.dropped.load(Ordering::SeqCst) && b.dropped.load(Ordering::SeqCst));
    assert!(control.resume().unwrap_err().is_wrong_state());
    assert!(control
        .shutdown(StopReason::Requested { request: "again" })
        .unwrap_err()
        .is_wrong_state());
}

#[test]
fn a_vm_without_a_power_button_says_so() {
    if !ringvm_test_devices::kvm_available() {
        return;
    }
    let m = Machine::build(&VmConfig {
        acpi: false,
        ..config()
    })
    .expect("building the machine");
    let control = m.control().clone();
    let running = m.start().expect("starting");
    let waiter = std::thread::spawn(move || running.wait(None));
    let e = control.power_button().unwrap_err();
    assert!(matches!(e, LifecycleError::NoPowerButton), "{e}");
    assert!(e.is_wrong_state());
    control
        .shutdown(StopReason::Requested { request: "test" })
        .unwrap();
    waiter.join().unwrap().unwrap();
}
