//! The pieces [`Machine::build`](super::Machine::build) assembles: the
//! configuration's checks, guest memory and kernel loading, the console,
//! the legacy and ACPI devices, and the vCPUs.

use super::*;

pub(super) fn host_memory() -> u64 {
    // SAFETY: sysinfo only writes the struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    info.totalram.saturating_mul(u64::from(info.mem_unit))
}

pub(super) fn open_input(what: &'static str, path: &Path) -> Result<(File, u64), MachineError> {
    let file = File::open(path).map_err(|source| MachineError::Open {
        what,
        path: path.into(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| MachineError::Open {
        what,
        path: path.into(),
        source,
    })?;
    if meta.is_dir() {
        return Err(MachineError::NotAFile {
            what,
            path: path.into(),
        });
    }
    Ok((file, meta.len()))
}

/// Checks the parts of `config` that need no host resources.
pub fn validate(config: &VmConfig) -> Result<(), MachineError> {
    if config.cpus == 0 || config.cpus > mptable::MAX_CPUS {
        return Err(MachineError::BadCpuCount {
            cpus: config.cpus,
            max: mptable::MAX_CPUS,
        });
    }
    if config.memory < MIN_MEMORY {
        return Err(MachineError::MemoryTooSmall {
            size: format_size(config.memory),
        });
    }
    let host = host_memory();
    if config.memory > host {
        return Err(MachineError::MemoryTooLarge {
            size: format_size(config.memory),
            host: format_size(host & !((1 << 20) - 1)),
        });
    }
    Ok(())
}

/// Loads kernel and initrd and writes every boot structure into `mem`.
pub(super) fn load_guest(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
) -> Result<(regs::EntryMode, &'static str), MachineError> {
    let (loaded, name): (LoadedKernel, String) = match &config.kernel {
        KernelSource::Path(path) => {
            let (mut file, _) = open_input("kernel", path)?;
            let loaded =
                boot::load_kernel(mem, &mut file).map_err(|source| MachineError::Kernel {
                    path: path.display().to_string(),
                    source,
                })?;
            (loaded, path.display().to_string())
        }
        KernelSource::Builtin(image) => {
            let loaded =
                boot::load_kernel(mem, &mut SliceReader::new(image)).map_err(|source| {
                    MachineError::Kernel {
                        path: "builtin".into(),
                        source,
                    }
                })?;
            (loaded, "builtin".into())
        }
    };
    let mut initrd_file = match &config.initrd {
        Some(path) => Some(open_input("initrd", path)?),
        None => None,
    };
    let initrd = initrd_file
        .as_mut()
        .map(|(file, size)| Initrd { file, size: *size });
    let inputs = boot::BootInputs {
        mem_size: config.memory,
        cmdline: &config.cmdline,
        initrd,
        // The tables themselves are written when the VM starts, once its
        // devices are known.
        rsdp: config.acpi.then_some(acpi::ACPI_START),
    };
    let entry = boot::setup_boot(mem, &loaded, inputs)
        .map_err(|source| MachineError::Boot { path: name, source })?;
    mptable::setup_mptable(mem, config.cpus).map_err(MachineError::Mptable)?;
    Ok((entry, loaded.protocol()))
}

pub(super) fn console_sink(output: &SerialOutput) -> Result<Option<ConsoleSink>, MachineError> {
    Ok(match output {
        SerialOutput::Off => None,
        SerialOutput::Stdio => Some(ConsoleSink::Stdout(std::io::stdout())),
        SerialOutput::File(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| MachineError::Open {
                    what: "serial output file",
                    path: path.clone(),
                    source,
                })?;
            Some(ConsoleSink::File(LineWriter::new(file)))
        }
    })
}

/// The legacy devices every x86 VM gets, by name, with their claims.
pub(super) fn add_legacy_devices(
    vm: &Vm,
    registry: &mut DeviceRegistry,
    stop: &Arc<VmStop>,
    sink: Option<ConsoleSink>,
) -> Result<Option<Arc<Mutex<SerialConsole>>>, MachineError> {
    let serial = match sink {
        Some(sink) => {
            let irq = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
            vm.register_irqfd(&irq, COM1_GSI)
                .map_err(MachineError::Vm)?;
            let dev = Arc::new(Mutex::new(SerialConsole::new(irq, sink)));
            registry
                .add(
                    "serial0",
                    Some(dev.clone()),
                    vec![
                        Resource::Pio {
                            base: COM1_PORT,
                            len: COM1_LEN,
                        },
                        Resource::Gsi(COM1_GSI),
                    ],
                )
                .map_err(MachineError::Registry)?;
            registry
                .set_snapshot("serial0", dev.clone())
                .map_err(MachineError::Registry)?;
            Some(dev)
        }
        None => None,
    };
    let i8042 = Arc::new(Mutex::new(I8042::new(stop.clone())));
    registry
        .add(
            "i8042",
            Some(i8042.clone()),
            vec![
                Resource::Pio {
                    base: I8042_DATA_PORT,
                    len: 1,
                },
                Resource::Pio {
                    base: I8042_COMMAND_PORT,
                    len: 1,
                },
            ],
        )
        .map_err(MachineError::Registry)?;
    let debug_exit = Arc::new(Mutex::new(DebugExit::new(stop.clone())));
    registry
        .add(
            "debug-exit",
            Some(debug_exit.clone()),
            vec![Resource::Pio {
                base: DEBUG_EXIT_PORT,
                len: DEBUG_EXIT_LEN,
            }],
        )
        .map_err(MachineError::Registry)?;
    registry
        .set_snapshot("i8042", i8042)
        .and_then(|()| registry.set_snapshot("debug-exit", debug_exit))
        .map_err(MachineError::Registry)?;
    Ok(serial)
}

/// The ACPI power-off, reset and power-button registers, with the GED's
/// interrupt on its GSI.
pub(super) fn add_acpi_pm(
    vm: &Vm,
    registry: &mut DeviceRegistry,
    stop: &Arc<VmStop>,
) -> Result<SharedAcpiPm, MachineError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(MachineError::EventFd)?;
    vm.register_irqfd(&irq, GED_GSI).map_err(MachineError::Vm)?;
    let dev = Arc::new(Mutex::new(AcpiPm::new(stop.clone(), irq)));
    registry
        .add(
            "acpi-pm",
            Some(dev.clone()),
            vec![
                Resource::Pio {
                    base: ACPI_PM_PORT,
                    len: ACPI_PM_LEN,
                },
                Resource::Gsi(GED_GSI),
            ],
        )
        .map_err(MachineError::Registry)?;
    registry
        .set_snapshot("acpi-pm", dev.clone())
        .map_err(MachineError::Registry)?;
    Ok(dev)
}

/// The 64-bit PCI BAR window for a guest of `memory_size` bytes: from the
/// first GiB boundary above RAM.
pub(super) fn mmio64_window(memory_size: u64) -> (u64, u64) {
    let high_end = ram_regions(memory_size)
        .last()
        .map(|(a, l)| a.0 + l)
        .unwrap_or(HIGH_RAM_START)
        .max(HIGH_RAM_START);
    let start = high_end.next_multiple_of(1 << 30);
    (start, start + MMIO64_SIZE)
}

/// What every vCPU of a machine shares.
pub(super) struct VcpuShared<'a> {
    pub(super) stop: &'a Arc<VmStop>,
    pub(super) halt: &'a Arc<HaltWatch>,
    pub(super) gate: &'a Arc<VcpuGate>,
    pub(super) interrupts: &'a Arc<InterruptRouter>,
    pub(super) caps: &'a Arc<CpuStateCaps>,
}

pub(super) fn create_vcpus(
    vm: &Vm,
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    entry: Option<regs::EntryMode>,
    buses: (&Arc<Bus>, &Arc<Bus>),
    shared: VcpuShared<'_>,
) -> Result<Vec<Vcpu>, MachineError> {
    let mut vcpus = Vec::with_capacity(config.cpus);
    for index in 0..config.cpus {
        let fd = vm.create_vcpu(index).map_err(MachineError::Vm)?;
        let cpuid = cpuid::vcpu_cpuid(
            vm.supported_cpuid(),
            index as u8,
            config.cpus as u8,
            &config.cpuid_hide,
            fd.get_tsc_khz().ok(),
        );
        fd.set_cpuid2(&cpuid)
            .map_err(|source| MachineError::Cpuid { index, source })?;
        if index == 0 && !config.cpuid_hide.is_empty() {
            // Hiding is a promise to the guest: check KVM kept it.
            let set = fd
                .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                .map_err(|source| MachineError::Cpuid { index, source })?;
            let back = cpuid::still_visible(set.as_slice(), &config.cpuid_hide);
            if !back.is_empty() {
                let names: Vec<String> = back.iter().map(|b| b.describe()).collect();
                return Err(MachineError::CpuidNotHidden {
                    features: names.join(", "),
                    pronoun: if back.len() > 1 { "them" } else { "it" },
                });
            }
        }
        let regs_err = |source| MachineError::VcpuRegs { index, source };
        regs::setup_msrs(&fd).map_err(regs_err)?;
        regs::setup_fpu(&fd).map_err(regs_err)?;
        regs::setup_lint(&fd).map_err(regs_err)?;
        if let (0, Some(entry)) = (index, entry) {
            regs::setup_entry(&fd, mem, entry).map_err(regs_err)?;
        }
        vcpus.push(Vcpu {
            index,
            fd,
            pio: buses.0.clone(),
            mmio: buses.1.clone(),
            stop: shared.stop.clone(),
            mem: mem.clone(),
            halt: shared.halt.clone(),
            seccomp: config.seccomp,
            gate: shared.gate.clone(),
            interrupts: shared.interrupts.clone(),
            coalesced: None,
            state_caps: shared.caps.clone(),
            affinity: config.vcpu_affinity.get(index).cloned().flatten(),
        });
    }
    Ok(vcpus)
}
