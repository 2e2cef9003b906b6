//! When a VM stops, its PCI devices are dropped (so they stop their
//! workers and give back what they hold) before `Machine::run` returns.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmm::config::{KernelSource, VmConfig};
use vmm::devices::SerialOutput;
use vmm::machine::Machine;
use vmm::pci::{BarRange, PciDevice};
use vmm::StopReason;

/// An ELF64 kernel (64-bit Linux boot protocol entry) that writes 7 to the
/// debug-exit port: `mov al, 7; out 0xf4, al; hlt`.
fn exit7_kernel() -> &'static [u8] {
    let code = [0xb0, 0x07, 0xe6, 0xf4, 0xf4];
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

/// A PCI function with no BARs that records being dropped.
struct Witness(Arc<AtomicBool>);

impl PciDevice for Witness {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        let id = 0x1234_5678u32.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = id.get(usize::from(offset) + i).copied().unwrap_or(0);
        }
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
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn pci_devices_are_dropped_when_the_vm_stops() {
    if !ringvm_test_devices::kvm_available() {
        return;
    }
    let mut m = Machine::build(&VmConfig {
        kernel: KernelSource::Builtin(exit7_kernel()),
        initrd: None,
        cmdline: String::new(),
        memory: 64 << 20,
        cpus: 1,
        serial: SerialOutput::Off,
        serial_input: false,
        cpuid_hide: Vec::new(),
        shared_memory: false,
        irqchip: Default::default(),
        acpi: true,
        seccomp: vmm::seccomp::SeccompMode::Off,
        vcpu_affinity: Vec::new(),
    })
    .expect("building the machine");
    let dropped = Arc::new(AtomicBool::new(false));
    m.add_pci_device("witness", Arc::new(Mutex::new(Witness(dropped.clone()))))
        .expect("plugging the device");
    let report = m.run().expect("running");
    assert_eq!(report.reason, StopReason::DebugExit { status: 7 });
    assert!(
        dropped.load(Ordering::SeqCst),
        "the device outlived the machine"
    );
}
