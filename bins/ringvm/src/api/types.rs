//! The JSON bodies of the API, shared by the server and `ringvm remote`.
//!
//! [`VmConfig`] is the VM configuration of `vm.create` (Cloud
//! Hypervisor's field names where the setting is the same). It maps onto
//! the command line of `ringvm run` ([`VmConfig::to_run_args`]), so the
//! API and the CLI share one set of checks and defaults.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    pub boot_vcpus: usize,
    /// Host CPUs of each vCPU thread named (`--vcpu-affinity`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affinity: Vec<CpuAffinity>,
}

/// One iothread's host CPUs (`--iothread-affinity`), in the form of
/// [`CpuAffinity`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IothreadAffinity {
    pub iothread: usize,
    pub host_cpus: Vec<usize>,
}

/// One vCPU's host CPUs, as Cloud Hypervisor's `cpus.affinity` entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuAffinity {
    pub vcpu: usize,
    pub host_cpus: Vec<usize>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// A kernel file, or `builtin` for the built-in test guest.
    pub kernel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: String,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub direct: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Iothread indices the queues are spread over (default: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iothreads: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_buffers: Option<bool>,
    /// `auto`, `uring` or `sync` (see `--disk engine=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing TAP; or `ip` and `mask` to create one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Queue pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queue_pairs: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iothreads: Vec<usize>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// `/sys/bus/pci/devices/DDDD:BB:DD.F`.
    pub path: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDeviceConfig {
    pub socket: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SerialMode {
    Off,
    /// The VMM's standard output (and input).
    #[default]
    Tty,
    File,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    pub mode: SerialMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// The VM configuration of `vm.create`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default = "default_cpus")]
    pub cpus: CpusConfig,
    #[serde(default = "default_memory")]
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default, alias = "nets")]
    pub net: Vec<NetConfig>,
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    #[serde(default)]
    pub user_devices: Vec<UserDeviceConfig>,
    #[serde(default)]
    pub serial: SerialConfig,
    #[serde(default = "default_iothreads")]
    pub iothreads: usize,
    /// Host CPUs of each iothread named.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iothread_affinity: Vec<IothreadAffinity>,
    /// `kernel` or `split`.
    #[serde(default = "default_irqchip")]
    pub irqchip: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_hide: Vec<String>,
    /// ACPI tables and the ACPI power button (`--acpi`).
    #[serde(default = "default_acpi")]
    pub acpi: bool,
}

fn default_acpi() -> bool {
    true
}

fn default_cpus() -> CpusConfig {
    CpusConfig {
        boot_vcpus: 1,
        affinity: Vec::new(),
    }
}
fn default_memory() -> MemoryConfig {
    MemoryConfig { size: 512 << 20 }
}
fn default_iothreads() -> usize {
    1
}
fn default_irqchip() -> String {
    "split".into()
}

/// Why a configuration cannot be mapped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{field}: {value:?} may not contain ','")]
    Comma { field: &'static str, value: String },
    #[error("serial: mode File needs a file")]
    SerialFile,
}

fn plain(field: &'static str, value: &str) -> Result<String, ConfigError> {
    if value.contains(',') {
        return Err(ConfigError::Comma {
            field,
            value: value.into(),
        });
    }
    Ok(value.to_string())
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn threads(list: &[usize]) -> String {
    list.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(":")
}

impl VmConfig {
    /// The arguments of `ringvm run` that describe the same VM.
    pub fn to_run_args(&self) -> Result<Vec<String>, ConfigError> {
        let mut a: Vec<String> = vec![
            "--kernel".into(),
            self.payload.kernel.clone(),
            "--cpus".into(),
            self.cpus.boot_vcpus.to_string(),
            "--memory".into(),
            self.memory.size.to_string(),
            "--iothreads".into(),
            self.iothreads.to_string(),
            "--irqchip".into(),
            self.irqchip.clone(),
            "--acpi".into(),
            on(self.acpi).into(),
        ];
        for aff in &self.cpus.affinity {
            a.push(format!(
                "--vcpu-affinity={}@{}",
                aff.vcpu,
                threads(&aff.host_cpus)
            ));
        }
        for aff in &self.iothread_affinity {
            a.push(format!(
                "--iothread-affinity={}@{}",
                aff.iothread,
                threads(&aff.host_cpus)
            ));
        }
        if let Some(i) = &self.payload.initramfs {
            a.extend(["--initrd".into(), i.clone()]);
        }
        if let Some(c) = &self.payload.cmdline {
            a.push(format!("--cmdline={c}"));
        }
        for d in &self.disks {
            let mut s = format!("path={}", plain("disks.path", &d.path)?);
            s.push_str(&format!(
                ",readonly={},direct={}",
                on(d.readonly),
                on(d.direct)
            ));
            if let Some(n) = d.num_queues {
                s.push_str(&format!(",queues={n}"));
            }
            if let Some(n) = d.queue_size {
                s.push_str(&format!(",queue_size={n}"));
            }
            if let Some(id) = &d.serial {
                s.push_str(&format!(",serial={}", plain("disks.serial", id)?));
            }
            if !d.iothreads.is_empty() {
                s.push_str(&format!(",iothread={}", threads(&d.iothreads)));
            }
            if let Some(f) = d.fixed_buffers {
                s.push_str(&format!(",fixed_buffers={}", on(f)));
            }
            if let Some(e) = &d.engine {
                s.push_str(&format!(",engine={}", plain("disks.engine", e)?));
            }
            a.extend(["--disk".into(), s]);
        }
        for n in &self.net {
            let mut parts = Vec::new();
            if let Some(t) = &n.tap {
                parts.push(format!("tap={}", plain("net.tap", t)?));
            }
            if let Some(ip) = &n.ip {
                parts.push(format!("ip={}", plain("net.ip", ip)?));
            }
            if let Some(m) = &n.mask {
                parts.push(format!("mask={}", plain("net.mask", m)?));
            }
            if let Some(m) = &n.mac {
                parts.push(format!("mac={}", plain("net.mac", m)?));
            }
            if let Some(q) = n.num_queue_pairs {
                parts.push(format!("queues={q}"));
            }
            if let Some(q) = n.queue_size {
                parts.push(format!("queue_size={q}"));
            }
            if !n.iothreads.is_empty() {
                parts.push(format!("iothread={}", threads(&n.iothreads)));
            }
            a.extend(["--net".into(), parts.join(",")]);
        }
        for d in &self.devices {
            a.extend([
                "--device".into(),
                format!("path={}", plain("devices.path", &d.path)?),
            ]);
        }
        for d in &self.user_devices {
            a.extend([
                "--user-device".into(),
                format!("socket={}", plain("user_devices.socket", &d.socket)?),
            ]);
        }
        let serial = match self.serial.mode {
            SerialMode::Off => "off".to_string(),
            SerialMode::Tty => "stdio".to_string(),
            SerialMode::File => match &self.serial.file {
                Some(f) => format!("file={f}"),
                None => return Err(ConfigError::SerialFile),
            },
        };
        a.extend(["--serial".into(), serial]);
        for c in &self.cpuid_hide {
            a.push(format!("--cpuid-hide={c}"));
        }
        Ok(a)
    }
}

/// `vm.snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// `file:///DIR`: the directory to write (created if missing).
    pub destination_url: String,
}

/// `vm.restore`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// `file:///DIR`: a directory `vm.snapshot` wrote.
    pub source_url: String,
    /// Resume the VM once restored (default: it stays Paused).
    #[serde(default)]
    pub resume: bool,
    /// `ondemand` (default: the memory files mapped copy-on-write) or
    /// `copy` (read in full before the VM starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_restore_mode: Option<String>,
    /// New paths for the snapshot's disks, by device name
    /// (`virtio-blk0`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub disk_paths: std::collections::BTreeMap<String, String>,
    /// New TAPs for the snapshot's NICs, by device name (`virtio-net0`):
    /// a TAP name, or `ip=A.B.C.D,mask=A.B.C.D` to create one.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub net_taps: std::collections::BTreeMap<String, String>,
}

/// The directory of a `file://` URL.
pub fn file_url_path(url: &str) -> Result<std::path::PathBuf, String> {
    match url.strip_prefix("file://") {
        Some(p) if p.starts_with('/') => Ok(p.into()),
        _ => Err(format!(
            "{url:?} is not a file:///ABSOLUTE/PATH URL (the only kind supported)"
        )),
    }
}

/// `vmm.ping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPing {
    pub build_version: String,
    pub version: String,
    pub pid: u32,
    pub features: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_config_gets_the_cli_defaults() {
        let c: VmConfig = serde_json::from_str(r#"{"payload":{"kernel":"builtin"}}"#).unwrap();
        assert_eq!(c.cpus.boot_vcpus, 1);
        assert_eq!(c.memory.size, 512 << 20);
        let args = c.to_run_args().unwrap();
        assert!(args.windows(2).any(|w| w == ["--serial", "stdio"]));
    }

    #[test]
    fn unknown_fields_and_commas_are_refused() {
        let e = serde_json::from_str::<VmConfig>(r#"{"payload":{"kernel":"x"},"cpu":{}}"#);
        assert!(e.unwrap_err().to_string().contains("unknown field `cpu`"));
        let c: VmConfig =
            serde_json::from_str(r#"{"payload":{"kernel":"x"},"disks":[{"path":"a,b"}]}"#).unwrap();
        assert!(matches!(c.to_run_args(), Err(ConfigError::Comma { .. })));
    }

    #[test]
    fn disks_and_nets_map_to_cli_options() {
        let c: VmConfig = serde_json::from_str(
            r#"{"payload":{"kernel":"builtin","cmdline":"blk.mode=write"},
                "disks":[{"path":"/d.img","num_queues":2,"iothreads":[0,1]},
                         {"path":"/e.img","engine":"sync"}],
                "net":[{"ip":"10.0.0.1","mask":"255.255.255.0","num_queue_pairs":2}]}"#,
        )
        .unwrap();
        let a = c.to_run_args().unwrap();
        assert!(a.windows(2).any(|w| w
            == [
                "--disk",
                "path=/d.img,readonly=off,direct=off,queues=2,iothread=0:1"
            ]));
        assert!(a
            .windows(2)
            .any(|w| w == ["--disk", "path=/e.img,readonly=off,direct=off,engine=sync"]));
        assert!(a
            .windows(2)
            .any(|w| w == ["--net", "ip=10.0.0.1,mask=255.255.255.0,queues=2"]));
        assert!(a.contains(&"--cmdline=blk.mode=write".to_string()));
    }

    #[test]
    fn cpu_affinity_takes_cloud_hypervisor_s_form() {
        let c: VmConfig = serde_json::from_str(
            r#"{"payload":{"kernel":"builtin"},
                "cpus":{"boot_vcpus":2,"affinity":[{"vcpu":0,"host_cpus":[0,2]},
                                                   {"vcpu":1,"host_cpus":[1]}]}}"#,
        )
        .unwrap();
        let a = c.to_run_args().unwrap();
        assert!(a.contains(&"--vcpu-affinity=0@0:2".to_string()), "{a:?}");
        assert!(a.contains(&"--vcpu-affinity=1@1".to_string()), "{a:?}");
        let e = serde_json::from_str::<VmConfig>(
            r#"{"payload":{"kernel":"x"},"cpus":{"boot_vcpus":1,"affinity":[{"vcpu":0}]}}"#,
        );
        assert!(e.unwrap_err().to_string().contains("host_cpus"));
    }

    #[test]
    fn iothread_affinity_maps_to_the_cli_option() {
        let c: VmConfig = serde_json::from_str(
            r#"{"payload":{"kernel":"builtin"},"iothreads":2,
                "iothread_affinity":[{"iothread":1,"host_cpus":[0,3]}]}"#,
        )
        .unwrap();
        let a = c.to_run_args().unwrap();
        assert!(
            a.contains(&"--iothread-affinity=1@0:3".to_string()),
            "{a:?}"
        );
        // Back to JSON and again: the same configuration.
        let again: VmConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(again, c);
        let e = serde_json::from_str::<VmConfig>(
            r#"{"payload":{"kernel":"x"},"iothread_affinity":[{"iothread":0,"cpus":[1]}]}"#,
        );
        assert!(e.unwrap_err().to_string().contains("cpus"));
    }
}
