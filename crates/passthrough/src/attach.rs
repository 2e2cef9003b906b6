//! Attaching a passthrough device to a [`Machine`]: the transport from
//! the command line's source, the device model, its PCI slot and BARs,
//! and its INTx line (a free IOAPIC pin, claimed in the registry).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmm::machine::{Machine, MachineError};
use vmm::registry::Resource;

use crate::device::{DeviceError, PassthroughDevice, VmContext};
use crate::kernel::{KernelError, KernelTransport, RealSys};
use crate::transport::{Transport, TransportError};
use crate::user::{UserTransport, DEFAULT_TIMEOUT};

/// IOAPIC pins PCI INTx lines may use (0–15 are the ISA interrupts).
const INTX_GSIS: std::ops::Range<u32> = 16..24;

/// Where a device comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A function bound to vfio-pci, by its sysfs directory.
    Kernel(PathBuf),
    /// A vfio-user server's socket.
    User(PathBuf),
}

/// A malformed `--device` or `--user-device`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("invalid {option} {spec:?}: expected {expected}")]
    Malformed {
        option: &'static str,
        spec: String,
        expected: &'static str,
    },
}

fn parse_one(option: &'static str, key: &str, spec: &str) -> Result<PathBuf, SpecError> {
    let expected = match key {
        "path" => "path=/sys/bus/pci/devices/DDDD:BB:DD.F",
        _ => "socket=PATH",
    };
    let mut path = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some((k, v)) if k == key && !v.is_empty() && path.is_none() => path = Some(v),
            _ => {
                return Err(SpecError::Malformed {
                    option,
                    spec: spec.into(),
                    expected,
                })
            }
        }
    }
    path.map(PathBuf::from).ok_or_else(|| SpecError::Malformed {
        option,
        spec: spec.into(),
        expected,
    })
}

impl Source {
    /// `--device path=/sys/bus/pci/devices/0000:01:00.0`.
    pub fn parse_device(spec: &str) -> Result<Source, SpecError> {
        parse_one("--device", "path", spec).map(Source::Kernel)
    }

    /// `--user-device socket=PATH`.
    pub fn parse_user_device(spec: &str) -> Result<Source, SpecError> {
        parse_one("--user-device", "socket", spec).map(Source::User)
    }
}

/// Why a device could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("opening {path}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: KernelError,
    },
    #[error("connecting to the vfio-user device at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: TransportError,
    },
    #[error("attaching the device")]
    Device(#[source] DeviceError),
    #[error("plugging {name} into the PCI bus")]
    Machine {
        name: String,
        #[source]
        source: Box<MachineError>,
    },
}

impl AttachError {
    /// Whether this is the user's input (a path, a socket, a device that
    /// cannot be used) rather than the host.
    pub fn is_bad_input(&self) -> bool {
        match self {
            AttachError::Kernel { .. } | AttachError::Connect { .. } => true,
            AttachError::Device(e) => !matches!(e, DeviceError::Interrupts { .. }),
            AttachError::Machine { .. } => false,
        }
    }
}

/// A device plugged into a machine.
pub struct Attached {
    name: String,
    slot: u8,
    intx_gsi: Option<u32>,
    device: Arc<Mutex<PassthroughDevice>>,
}

/// Opens the transport for `source`.
pub fn open_transport(source: &Source) -> Result<Box<dyn Transport>, AttachError> {
    Ok(match source {
        Source::Kernel(path) => Box::new(KernelTransport::open(Arc::new(RealSys), path).map_err(
            |source| AttachError::Kernel {
                path: path.clone(),
                source,
            },
        )?),
        Source::User(socket) => Box::new(UserTransport::connect(socket, DEFAULT_TIMEOUT).map_err(
            |source| AttachError::Connect {
                socket: socket.clone(),
                source,
            },
        )?),
    })
}

fn lock(d: &Mutex<PassthroughDevice>) -> std::sync::MutexGuard<'_, PassthroughDevice> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

/// Attaches the device at `source` to `machine` as `name`.
pub fn attach(machine: &mut Machine, name: &str, source: &Source) -> Result<Attached, AttachError> {
    let transport = open_transport(source)?;
    attach_transport(machine, name, transport)
}

/// Attaches the device behind `transport` to `machine` as `name`.
pub fn attach_transport(
    machine: &mut Machine,
    name: &str,
    transport: Box<dyn Transport>,
) -> Result<Attached, AttachError> {
    let ctx = VmContext {
        router: machine.interrupts().clone(),
        slots: machine.memory_slots().clone(),
        memory: machine.memory().clone(),
    };
    let device = PassthroughDevice::new(name, transport, ctx).map_err(AttachError::Device)?;
    let wants_intx = device.wants_intx();
    let device = Arc::new(Mutex::new(device));
    let slot = machine
        .add_pci_device(name, device.clone())
        .map_err(|source| AttachError::Machine {
            name: name.into(),
            source: Box::new(source),
        })?;
    // Detached (reset, restored, everything released) once the VM stops.
    let weak = Arc::downgrade(&device);
    machine.on_stop(move || {
        if let Some(d) = weak.upgrade() {
            lock(&d).detach();
        }
    });
    let mut intx_gsi = None;
    if wants_intx {
        let mut registry = machine.registry().lock().unwrap_or_else(|e| e.into_inner());
        intx_gsi = INTX_GSIS
            .clone()
            .find(|&gsi| registry.claim(name, Resource::Gsi(gsi)).is_ok());
        drop(registry);
        match intx_gsi {
            Some(gsi) => {
                let mut d = lock(&device);
                match d.enable_intx(gsi) {
                    // The ACPI routing table names the line.
                    Ok(()) => machine.add_intx_route(slot, d.intx_pin() - 1, gsi),
                    Err(e) => log::warn!("{name}: INTx on GSI {gsi} is not available: {e}"),
                }
            }
            None => {
                log::warn!("{name}: no free IOAPIC pin for INTx; the device has MSI/MSI-X only")
            }
        }
    }
    Ok(Attached {
        name: name.into(),
        slot,
        intx_gsi,
        device,
    })
}

impl Attached {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PCI slot on bus 0.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// The IOAPIC pin of its INTx line, if it has one.
    pub fn intx_gsi(&self) -> Option<u32> {
        self.intx_gsi
    }

    pub fn device(&self) -> &Arc<Mutex<PassthroughDevice>> {
        &self.device
    }

    /// Unplugs the device (its slot, BARs and GSI claims go with its
    /// registry entry) and detaches it: interrupts, memory slots, DMA
    /// maps, vectors and routes are released, the device is reset and its
    /// saved state restored.
    pub fn detach(self, machine: &mut Machine) {
        machine.remove_pci_device(self.slot);
        lock(&self.device).detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_take_exactly_one_path() {
        assert_eq!(
            Source::parse_device("path=/sys/bus/pci/devices/0000:01:00.0"),
            Ok(Source::Kernel("/sys/bus/pci/devices/0000:01:00.0".into()))
        );
        assert_eq!(
            Source::parse_user_device("socket=/tmp/d.sock"),
            Ok(Source::User("/tmp/d.sock".into()))
        );
        for bad in [
            "",
            "path=",
            "socket=/x",
            "path=/a,path=/b",
            "path=/a,ro=on",
            "/a",
        ] {
            assert!(Source::parse_device(bad).is_err(), "{bad}");
        }
        let e = Source::parse_user_device("sock=/x").unwrap_err();
        assert!(e.to_string().contains("--user-device"), "{e}");
    }
}
