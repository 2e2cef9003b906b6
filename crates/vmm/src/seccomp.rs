//! Seccomp filters, one allow-list per thread kind, built with the rust-vmm
//! `seccompiler` crate and installed by each thread once its set-up is
//! done and before guest code or a client can make it do anything.
//!
//! A system call outside the list raises `SIGSYS` (mode
//! [`SeccompMode::Enforce`]); [`install_reporter`]'s handler writes which
//! thread made which call to stderr and ends the process with exit code
//! [`EXIT_SECCOMP`]. [`SeccompMode::Log`] lets the call through and has the
//! kernel log it (dmesg: `audit: type=1326 ... comm="vcpu0" ...
//! syscall=N`), to develop the lists; [`SeccompMode::Off`] installs
//! nothing.
//!
//! The lists name what each kind of thread really calls after set-up
//! (found by running the whole test suite in log mode). `ioctl` is filtered
//! by request number where the thread's requests are a known set.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::str::FromStr;

use kvm_bindings::{
    kvm_coalesced_mmio_zone, kvm_ioeventfd, kvm_irq_routing, kvm_irqfd, kvm_lapic_state,
    kvm_mp_state, kvm_msi, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// Exit code after a forbidden system call.
pub const EXIT_SECCOMP: i32 = 109;

/// What to do with a system call outside a thread's list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Report it and end the process (`--seccomp true`, the default).
    #[default]
    Enforce,
    /// Let it through; the kernel logs it (`--seccomp log`).
    Log,
    /// No filter (`--seccomp false`).
    Off,
}

impl FromStr for SeccompMode {
    type Err = SeccompError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "true" | "on" => Ok(SeccompMode::Enforce),
            "log" => Ok(SeccompMode::Log),
            "false" | "off" => Ok(SeccompMode::Off),
            other => Err(SeccompError::BadMode(other.to_string())),
        }
    }
}

/// The kinds of thread, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM runs: the control loop (signals,
    /// serial input, stop and teardown).
    Vmm,
    /// A vCPU thread: `KVM_RUN` and the device emulation behind exits.
    Vcpu,
    /// An iothread: one io_uring executor serving disks and NICs.
    IoThread,
    /// A vhost-user protocol thread: accepting a peer on a Unix socket and
    /// handling its messages (memory tables arrive as fds to map, vrings
    /// as eventfds). Threads it starts (vhost-user-backend's per-connection
    /// handler) inherit the filter.
    VhostUser,
    /// A thread that only waits for stop signals and passes them on.
    Signals,
    /// A deadline thread: sleeps on a condition variable and shuts a
    /// socket down when a peer's reply is late.
    Watchdog,
    /// The API server's accepting thread and the connection threads it
    /// starts (they inherit its filter): HTTP on a Unix socket, and the
    /// requests that only read state.
    Api,
    /// The thread that builds, starts, rebuilds and tears down VMs under
    /// the API (`ringvm serve`, `ringvm run --api-socket`), and carries
    /// out every state-changing request.
    VmBuild,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::IoThread => "iothread",
            ThreadKind::VhostUser => "vhost-user",
            ThreadKind::Signals => "signals",
            ThreadKind::Watchdog => "watchdog",
            ThreadKind::Api => "api",
            ThreadKind::VmBuild => "vm-build",
        }
    }
}

/// Errors from building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("--seccomp takes true, false or log, not {0:?}")]
    BadMode(String),
    #[error("building the {kind} seccomp filter")]
    Build {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("compiling the {kind} seccomp filter")]
    Compile {
        kind: &'static str,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the seccomp filter")]
    Install(#[source] seccompiler::Error),
    #[error("installing the SIGSYS reporter")]
    Reporter(#[source] std::io::Error),
}

/// System calls every thread makes: memory allocation, locks, time,
/// signals, logging to stderr, thread exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    // The kernel's continuation of a sleep (futex with a timeout,
    // nanosleep, poll) that a signal interrupted: seen on vm-build during
    // a pause in tests/snapshot.rs (exit 109 on system call 219).
    libc::SYS_restart_syscall,
    libc::SYS_sigaltstack,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getrandom,
    libc::SYS_rseq,
    // A thread started by a sandboxed one tightens its inherited filter
    // with its own (filters only ever add restrictions); seccompiler sets
    // no_new_privs first (prctl, which also names new threads).
    libc::SYS_seccomp,
    libc::SYS_prctl,
];

/// The main thread's control loop and teardown.
const VMM: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_io_uring_enter,
    libc::SYS_sched_getaffinity,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
];

/// A vCPU: `KVM_RUN`, its kick signal, and the device work behind exits
/// (PCI config and BAR accesses reprogram routes, irqfds, ioeventfds and
/// memory slots; vfio-user BAR accesses are socket messages; virtio
/// activation hands queues to iothreads through eventfds).
const VCPU: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_eventfd2,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_io_uring_enter,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_lseek,
    // A vhost-user NIC started by the guest gets its control-queue thread
    // (threads only: `clone` needs CLONE_THREAD, `clone3` is answered
    // ENOSYS); the thread inherits this list.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
];

/// An iothread: the ring, eventfds, TAP control for queue pairs and
/// offloads, and the blocking fallbacks of the block backend.
const IOTHREAD: &[i64] = &[
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_ioctl,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_eventfd2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_readv,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_lseek,
    libc::SYS_getrusage,
    libc::SYS_sched_getaffinity,
    libc::SYS_setrlimit,
    libc::SYS_prlimit64,
];

const KVMIO: u32 = 0xae;
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
// A parked vCPU saving its own state for a snapshot (snapshot::cpu).
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_bindings::kvm_fpu);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
ioctl_iow_nr!(
    KVM_REGISTER_COALESCED_MMIO,
    KVMIO,
    0x67,
    kvm_coalesced_mmio_zone
);
ioctl_iow_nr!(
    KVM_UNREGISTER_COALESCED_MMIO,
    KVMIO,
    0x68,
    kvm_coalesced_mmio_zone
);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);

/// The `ioctl` requests a vCPU thread makes: running the vCPU and reading
/// its state (stop reports, the dead-guest probe, and all of it for a
/// snapshot, which a parked vCPU thread reads itself), and what device
/// emulation on an exit reprograms: GSI routes, irqfds, ioeventfds and
/// memory slots (MSI-X tables, BAR moves, virtio activation), and TAP
/// set-up of a virtio-net device the guest starts, and the serial port's
/// coalescing zone (turned off and on as the guest writes its interrupt
/// enable register). VFIO and
/// iommufd requests (type `;`, no size field) pass by a mask rule: an
/// assigned device's config and BAR accesses run on the vCPU thread.
fn vcpu_ioctls() -> Vec<u64> {
    vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_LAPIC(),
        KVM_GET_MP_STATE(),
        KVM_GET_FPU(),
        KVM_GET_MSRS(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_SET_GSI_ROUTING(),
        KVM_IRQFD(),
        KVM_IOEVENTFD(),
        KVM_SIGNAL_MSI(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_REGISTER_COALESCED_MMIO(),
        KVM_UNREGISTER_COALESCED_MMIO(),
        TUNSETOFFLOAD,
        TUNSETQUEUE,
        TUNGETIFF,
    ]
}

/// TAP requests a vCPU makes when a virtio-net device is (re)started:
/// offloads follow the negotiated features, queue pairs are attached or
/// detached, and a queue's interface is checked.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TUNSETQUEUE: u64 = 0x4004_54d9;
const TUNGETIFF: u64 = 0x8004_54d2;

/// `ioctl` restricted to `requests` (argument 1, compared as 32 bits as
/// the kernel does), plus every VFIO/iommufd request.
fn ioctl_rules(requests: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let mut rules = Vec::with_capacity(requests.len() + 1);
    for &r in requests {
        rules.push(SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            r,
        )?])?);
    }
    rules.push(SeccompRule::new(vec![SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xffff_ff00),
        0x3b00,
    )?])?);
    Ok(rules)
}

/// A vhost-user protocol thread (see [`ThreadKind::VhostUser`]).
const VHOST_USER: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_eventfd2,
    libc::SYS_ioctl,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // The per-connection handler thread (glibc's pthread_create; clone3
    // is answered ENOSYS by a second filter so that clone's flags are
    // checked: threads only).
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
    // The listening socket's path is removed when the daemon stops.
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    // A front-end reconnecting to its backend (`reconnect=on`): a Unix
    // socket (AF_UNIX only, see `socket_rules`) and connect.
    libc::SYS_socket,
    libc::SYS_connect,
];

/// A deadline thread (see [`ThreadKind::Watchdog`]).
const WATCHDOG: &[i64] = &[libc::SYS_shutdown];

/// A signal thread: `sigwait`, then an eventfd write or a socket
/// shutdown.
const SIGNALS: &[i64] = &[libc::SYS_rt_sigtimedwait, libc::SYS_shutdown];

/// The API threads (see [`ThreadKind::Api`]): accepting connections and
/// starting a thread for each (threads only, as for vhost-user), reading
/// requests with a deadline (socket timeouts) and writing answers.
/// Requests that change state run on the VM-building thread; reads only
/// take locks and read counters (clocks, in the common list).
const API: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_accept,
    // Read and write deadlines only (see `api_rules`).
    libc::SYS_setsockopt,
    // F_GETFD only: the standard library checks a descriptor is open
    // before it closes it (debug builds).
    libc::SYS_fcntl,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
];

/// The VM-building thread (see [`ThreadKind::VmBuild`]): what building a
/// VM takes beyond the lists of the threads it starts (which [`build`]
/// adds, since they inherit this filter): opening the kernel, initrd,
/// disks, `/dev/kvm`, `/dev/net/tun` and VFIO nodes; guest memory; rings
/// (set up here, restricted, then handed to iothreads); TAP addresses
/// (an AF_INET datagram socket for its ioctls, see [`build_socket_rules`]);
/// vhost-user and vfio-user sockets; the kick and SIGSYS handlers; and
/// removing the API socket at exit. Broad, but a list: no exec, fork,
/// ptrace, mount, module or namespace calls.
const VM_BUILD: &[i64] = &[
    libc::SYS_openat,
    // Guest RAM in a memfd when a vhost-user or vfio-user peer maps it.
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    // Iothreads set their rings up before their own filter.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_register,
    // The vCPU kick handler and the SIGSYS reporter.
    libc::SYS_rt_sigaction,
    // Finding a VFIO device's group and driver in sysfs.
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    // A TAP's link state and address; socket options of vhost-user and
    // vfio-user connections.
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    // Guest RAM size against the host's (memory checks).
    libc::SYS_sysinfo,
    // Snapshots (vm.snapshot, vm.restore): the directory, memory files
    // written under a temporary name, made durable and renamed; restore
    // checks sizes, finds data runs (SEEK_DATA) and copies or maps them.
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_lseek,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_read,
    libc::SYS_pread64,
];

fn list(kind: ThreadKind) -> &'static [i64] {
    match kind {
        ThreadKind::Api => API,
        ThreadKind::VmBuild => VM_BUILD,
        ThreadKind::Vmm => VMM,
        ThreadKind::Vcpu => VCPU,
        ThreadKind::IoThread => IOTHREAD,
        ThreadKind::VhostUser => VHOST_USER,
        ThreadKind::Signals => SIGNALS,
        ThreadKind::Watchdog => WATCHDOG,
    }
}

/// Threads of this kind may start threads (see [`clone_rules`]).
fn starts_threads(kind: ThreadKind) -> bool {
    matches!(
        kind,
        ThreadKind::VhostUser | ThreadKind::Vcpu | ThreadKind::Api | ThreadKind::VmBuild
    )
}

/// `socket` for Unix sockets only.
fn socket_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )?])?])
}

/// The API threads' argument filters: `setsockopt(SOL_SOCKET,
/// SO_RCVTIMEO|SO_SNDTIMEO)` and `fcntl(F_GETFD)`.
fn api_rules() -> Result<[(i64, Vec<SeccompRule>); 2], seccompiler::BackendError> {
    let arg = |i, v: u64| SeccompCondition::new(i, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v);
    let sol = libc::SOL_SOCKET as u64;
    // SO_RCVTIMEO and SO_SNDTIMEO: the old option numbers (20, 21; what
    // the standard library passes on x86_64) and the 64-bit-time ones.
    let mut timeouts = Vec::new();
    for opt in [20, 21, libc::SO_RCVTIMEO_NEW, libc::SO_SNDTIMEO_NEW] {
        timeouts.push(SeccompRule::new(vec![arg(1, sol)?, arg(2, opt as u64)?])?);
    }
    Ok([
        (libc::SYS_setsockopt, timeouts),
        (
            libc::SYS_fcntl,
            vec![SeccompRule::new(vec![arg(1, libc::F_GETFD as u64)?])?],
        ),
    ])
}

/// `socket` for the VM-building thread: Unix sockets (vhost-user and
/// vfio-user peers) and AF_INET datagram sockets (a TAP's address and
/// mask are set with ioctls on one).
fn build_socket_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let mut rules = socket_rules()?;
    rules.push(SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_INET as u64,
    )?])?);
    Ok(rules)
}

/// The mode for threads that devices start on their own (vhost-user
/// watchers and deadline threads): set once by the binary
/// ([`set_default_mode`]); off until then (library tests).
static DEFAULT_MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);

/// Sets the mode [`apply_default`] uses.
pub fn set_default_mode(mode: SeccompMode) {
    let v = match mode {
        SeccompMode::Enforce => 0,
        SeccompMode::Log => 1,
        SeccompMode::Off => 2,
    };
    DEFAULT_MODE.store(v, std::sync::atomic::Ordering::SeqCst);
}

/// Installs `kind`'s filter in the process's default mode; a failure is
/// logged (the thread then runs unfiltered).
pub fn apply_default(kind: ThreadKind) {
    let mode = match DEFAULT_MODE.load(std::sync::atomic::Ordering::SeqCst) {
        0 => SeccompMode::Enforce,
        1 => SeccompMode::Log,
        _ => SeccompMode::Off,
    };
    if let Err(e) = apply(kind, mode) {
        log::error!("{} thread: {e}", kind.name());
    }
}

/// `clone` only for threads: `CLONE_THREAD` must be in its flags.
fn clone_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let thread = libc::CLONE_THREAD as u64;
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )?])?])
}

/// The second filter of kinds that may start threads: `clone3` fails with
/// ENOSYS (its flags are in memory, out of a filter's reach), so that the
/// C library falls back to `clone`, whose flags the first filter checks.
fn clone3_enosys() -> Result<BpfProgram, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_clone3, Vec::new());
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?
    .try_into()
}

/// The BPF program for `kind` in `mode` (None when seccomp is off).
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    build(kind, mismatch).map(Some)
}

fn build(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in COMMON.iter().chain(list(kind)) {
        rules.insert(nr, Vec::new());
    }
    if kind == ThreadKind::VmBuild {
        // Every thread a VM has is started here and narrows this list
        // with its own after its set-up: the list holds theirs.
        for &nr in [VMM, VCPU, IOTHREAD, VHOST_USER, SIGNALS, WATCHDOG]
            .concat()
            .iter()
        {
            rules.insert(nr, Vec::new());
        }
    }
    let build_err = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    if starts_threads(kind) {
        rules.insert(libc::SYS_clone, clone_rules().map_err(build_err)?);
    }
    if kind == ThreadKind::VhostUser {
        rules.insert(libc::SYS_socket, socket_rules().map_err(build_err)?);
    }
    if kind == ThreadKind::VmBuild {
        rules.insert(libc::SYS_socket, build_socket_rules().map_err(build_err)?);
    }
    if kind == ThreadKind::Api {
        rules.extend(api_rules().map_err(build_err)?);
    }
    if kind == ThreadKind::Vcpu {
        let ioctls = ioctl_rules(&vcpu_ioctls()).map_err(|source| SeccompError::Build {
            kind: kind.name(),
            source,
        })?;
        rules.insert(libc::SYS_ioctl, ioctls);
    }
    #[cfg(debug_assertions)]
    if let Some(nr) = test_forbidden(kind) {
        rules.remove(&nr);
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|source| SeccompError::Build {
            kind: kind.name(),
            source,
        })?;
    filter.try_into().map_err(|source| SeccompError::Compile {
        kind: kind.name(),
        source,
    })
}

/// Test builds only: `RINGVM_TEST_SECCOMP_FORBID=KIND:NR` takes system call
/// NR off KIND's list, so a test can watch the reporter name it.
#[cfg(debug_assertions)]
fn test_forbidden(kind: ThreadKind) -> Option<i64> {
    let v = std::env::var("RINGVM_TEST_SECCOMP_FORBID").ok()?;
    let (k, nr) = v.split_once(':')?;
    (k == kind.name()).then(|| nr.parse().ok()).flatten()
}

/// Test builds only: the thread of `kind` makes system call `nr` now if
/// `RINGVM_TEST_SECCOMP_CALL=KIND:NR` says so (after its filter is in).
#[cfg(debug_assertions)]
pub fn test_call(kind: ThreadKind) {
    let Ok(v) = std::env::var("RINGVM_TEST_SECCOMP_CALL") else {
        return;
    };
    if let Some((k, nr)) = v.split_once(':') {
        if k == kind.name() {
            if let Ok(nr) = nr.parse::<libc::c_long>() {
                // SAFETY: a test asks for this system call with zero
                // arguments; the filter traps it before it runs.
                unsafe { libc::syscall(nr, 0, 0, 0) };
            }
        }
    }
}

#[cfg(not(debug_assertions))]
pub fn test_call(_kind: ThreadKind) {}

thread_local! {
    /// The thread's name, kept for the SIGSYS reporter (which must not
    /// make system calls it may not make).
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Installs `kind`'s filter on the calling thread (no-op when `mode` is
/// off). The thread's name is remembered for the reporter first.
pub fn apply(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    let Some(prog) = program(kind, mode)? else {
        return Ok(());
    };
    if mode == SeccompMode::Enforce {
        static REPORTER: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        REPORTER
            .get_or_init(|| install_reporter().map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(|e| SeccompError::Reporter(std::io::Error::other(e)))?;
    }
    let mut name = [0u8; 16];
    let current = std::thread::current();
    let n = current.name().unwrap_or("ringvm").as_bytes();
    let len = n.len().min(15);
    name[..len].copy_from_slice(&n[..len]);
    NAME.with(|c| c.set(name));
    if starts_threads(kind) {
        let enosys = clone3_enosys().map_err(|source| SeccompError::Compile {
            kind: kind.name(),
            source,
        })?;
        seccompiler::apply_filter(&enosys).map_err(SeccompError::Install)?;
    }
    seccompiler::apply_filter(&prog).map_err(SeccompError::Install)
}

/// Installs the process-wide `SIGSYS` handler that reports a forbidden
/// call and exits with [`EXIT_SECCOMP`].
pub fn install_reporter() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; we set the handler and flags.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = report as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act` is initialised and outlives the call.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SeccompError::Reporter(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Appends `v` in decimal to `buf` at `*at`.
fn push_dec(buf: &mut [u8], at: &mut usize, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for d in digits[..n].iter().rev() {
        if *at < buf.len() {
            buf[*at] = *d;
            *at += 1;
        }
    }
}

fn push(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    for &b in s {
        if *at < buf.len() {
            buf[*at] = b;
            *at += 1;
        }
    }
}

/// The report line for a forbidden call of `nr` on thread `name`.
fn report_line(buf: &mut [u8; 160], name: &[u8], nr: i64) -> usize {
    let mut at = 0;
    push(buf, &mut at, b"ringvm: seccomp: thread ");
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    push(buf, &mut at, if end == 0 { b"?" } else { &name[..end] });
    push(buf, &mut at, b" made system call ");
    push_dec(buf, &mut at, nr as u64);
    if let Some(n) = syscall_name(nr) {
        push(buf, &mut at, b" (");
        push(buf, &mut at, n.as_bytes());
        push(buf, &mut at, b")");
    }
    push(
        buf,
        &mut at,
        b", which its allow-list forbids; stopping (exit code 109)\n",
    );
    at
}

extern "C" fn report(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo_t for SIGSYS: the system call number is an int at offset 24
    // (after signo, errno, code, padding and the call address).
    // SAFETY: the kernel passes a valid siginfo_t of at least 128 bytes.
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    let mut name = NAME.with(|c| c.get());
    if name[0] == 0 {
        // A thread that inherited its filter (API connections, threads
        // devices start) never set NAME: ask the kernel.
        // SAFETY: PR_GET_NAME writes at most 16 bytes into `name`; prctl
        // is on every list.
        unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    }
    let mut buf = [0u8; 160];
    let len = report_line(&mut buf, &name, i64::from(nr));
    // SAFETY: write and _exit are async-signal-safe and on every list.
    unsafe {
        libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// Names of the calls a report is most likely to be about.
fn syscall_name(nr: i64) -> Option<&'static str> {
    const NAMES: &[(i64, &str)] = &[
        (libc::SYS_open, "open"),
        (libc::SYS_openat, "openat"),
        (libc::SYS_socket, "socket"),
        (libc::SYS_connect, "connect"),
        (libc::SYS_bind, "bind"),
        (libc::SYS_listen, "listen"),
        (libc::SYS_accept4, "accept4"),
        (libc::SYS_execve, "execve"),
        (libc::SYS_clone, "clone"),
        (libc::SYS_clone3, "clone3"),
        (libc::SYS_fork, "fork"),
        (libc::SYS_kill, "kill"),
        (libc::SYS_ptrace, "ptrace"),
        (libc::SYS_mount, "mount"),
        (libc::SYS_unlink, "unlink"),
        (libc::SYS_unlinkat, "unlinkat"),
        (libc::SYS_getuid, "getuid"),
        (libc::SYS_getppid, "getppid"),
        (libc::SYS_uname, "uname"),
        (libc::SYS_ioctl, "ioctl"),
        (libc::SYS_io_uring_setup, "io_uring_setup"),
        (libc::SYS_io_uring_register, "io_uring_register"),
        (libc::SYS_mmap, "mmap"),
        (libc::SYS_prctl, "prctl"),
        (libc::SYS_getcwd, "getcwd"),
        (libc::SYS_sysinfo, "sysinfo"),
    ];
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, s)| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_every_mode() {
        for kind in [
            ThreadKind::Vmm,
            ThreadKind::Vcpu,
            ThreadKind::IoThread,
            ThreadKind::VhostUser,
            ThreadKind::Signals,
            ThreadKind::Watchdog,
            ThreadKind::Api,
            ThreadKind::VmBuild,
        ] {
            assert!(program(kind, SeccompMode::Off).unwrap().is_none());
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                let p = program(kind, mode).unwrap().unwrap();
                assert!(!p.is_empty());
            }
        }
    }

    /// Runs `f` on a new thread under `kind`'s list, with refusals as
    /// errno 1000 instead of SIGSYS.
    fn under<T: Send + 'static>(kind: ThreadKind, f: fn() -> T) -> T {
        std::thread::spawn(move || {
            let prog = build(kind, SeccompAction::Errno(1000)).unwrap();
            seccompiler::apply_filter(&prog).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn errno_of(rc: libc::c_long) -> i32 {
        if rc < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    #[test]
    fn vcpu_ioctls_are_filtered_by_request() {
        let (run, vfio, tcgets, socket) = under(ThreadKind::Vcpu, || {
            // SAFETY: ioctls on fd -1 only fail; socket() with a bogus
            // family fails too, or is refused by the filter first.
            unsafe {
                (
                    errno_of(libc::syscall(libc::SYS_ioctl, -1, KVM_RUN())),
                    errno_of(libc::syscall(libc::SYS_ioctl, -1, 0x3b6eu64)),
                    errno_of(libc::syscall(libc::SYS_ioctl, -1, libc::TCGETS)),
                    errno_of(libc::syscall(libc::SYS_socket, 9999, 0, 0)),
                )
            }
        });
        assert_eq!(run, libc::EBADF, "KVM_RUN reaches the kernel");
        assert_eq!(vfio, libc::EBADF, "VFIO requests reach the kernel");
        assert_eq!(tcgets, 1000, "other ioctls are refused");
        assert_eq!(socket, 1000, "socket is on no list");
        let tcgets_io = under(ThreadKind::IoThread, || {
            // SAFETY: as above.
            unsafe { errno_of(libc::syscall(libc::SYS_ioctl, -1, libc::TCGETS)) }
        });
        assert_eq!(
            tcgets_io,
            libc::EBADF,
            "iothreads' ioctls are not filtered by request"
        );
    }

    #[test]
    fn modes_parse() {
        assert_eq!("true".parse::<SeccompMode>().unwrap(), SeccompMode::Enforce);
        assert_eq!("log".parse::<SeccompMode>().unwrap(), SeccompMode::Log);
        assert_eq!("false".parse::<SeccompMode>().unwrap(), SeccompMode::Off);
        assert!("maybe".parse::<SeccompMode>().is_err());
    }

    #[test]
    fn report_names_thread_and_call() {
        let mut buf = [0u8; 160];
        let mut name = [0u8; 16];
        name[..5].copy_from_slice(b"vcpu1");
        let n = report_line(&mut buf, &name, libc::SYS_socket);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "ringvm: seccomp: thread vcpu1 made system call 41 (socket), \
             which its allow-list forbids; stopping (exit code 109)\n"
        );
        let n = report_line(&mut buf, &[0; 16], 999);
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .starts_with("ringvm: seccomp: thread ? made system call 999,"));
    }
}
