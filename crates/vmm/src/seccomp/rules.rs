//! The allow-lists themselves and the compiler that turns one into a BPF
//! program. Plain data and `seccompiler` calls only: `build.rs` includes
//! this file to compile every kind's program at build time (the binary
//! installs those, without compiling anything at start-up), and the
//! library uses it to check them and, in test builds, to compile variants.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp,
    SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// The kinds of thread, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
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
    /// Every kind, in discriminant order (the index of its precompiled
    /// programs).
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::IoThread,
        ThreadKind::VhostUser,
        ThreadKind::Signals,
        ThreadKind::Watchdog,
        ThreadKind::Api,
        ThreadKind::VmBuild,
    ];

    /// The kind's name, as reports and `RINGVM_TEST_SECCOMP_*` spell it.
    pub fn name(self) -> &'static str {
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

// `_IOC(dir, 0xae, nr, size)` of each KVM request, written out so that
// build.rs needs neither kvm-bindings nor the ioctl macros; the unit test
// `ioctl_numbers_match_the_bindings` checks each against them.
pub(crate) const KVM_RUN: u64 = 0xae80;
pub(crate) const KVM_GET_REGS: u64 = 0x8090_ae81;
pub(crate) const KVM_GET_SREGS: u64 = 0x8138_ae83;
pub(crate) const KVM_GET_LAPIC: u64 = 0x8400_ae8e;
pub(crate) const KVM_GET_MP_STATE: u64 = 0x8004_ae98;
// A parked vCPU saving its own state for a snapshot (snapshot::cpu).
pub(crate) const KVM_GET_FPU: u64 = 0x81a0_ae8c;
pub(crate) const KVM_GET_MSRS: u64 = 0xc008_ae88;
pub(crate) const KVM_GET_VCPU_EVENTS: u64 = 0x8040_ae9f;
pub(crate) const KVM_GET_DEBUGREGS: u64 = 0x8080_aea1;
pub(crate) const KVM_GET_XSAVE: u64 = 0x9000_aea4;
pub(crate) const KVM_GET_XCRS: u64 = 0x8188_aea6;
pub(crate) const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
pub(crate) const KVM_IRQFD: u64 = 0x4020_ae76;
pub(crate) const KVM_IOEVENTFD: u64 = 0x4040_ae79;
pub(crate) const KVM_SIGNAL_MSI: u64 = 0x4020_aea5;
pub(crate) const KVM_REGISTER_COALESCED_MMIO: u64 = 0x4010_ae67;
pub(crate) const KVM_UNREGISTER_COALESCED_MMIO: u64 = 0x4010_ae68;
pub(crate) const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;

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
        KVM_RUN,
        KVM_GET_REGS,
        KVM_GET_SREGS,
        KVM_GET_LAPIC,
        KVM_GET_MP_STATE,
        KVM_GET_FPU,
        KVM_GET_MSRS,
        KVM_GET_VCPU_EVENTS,
        KVM_GET_DEBUGREGS,
        KVM_GET_XSAVE,
        KVM_GET_XCRS,
        KVM_SET_GSI_ROUTING,
        KVM_IRQFD,
        KVM_IOEVENTFD,
        KVM_SIGNAL_MSI,
        KVM_SET_USER_MEMORY_REGION,
        KVM_REGISTER_COALESCED_MMIO,
        KVM_UNREGISTER_COALESCED_MMIO,
        TUNSETOFFLOAD,
        TUNSETQUEUE,
        TUNGETIFF,
    ]
}

/// TAP requests a vCPU makes when a virtio-net device is (re)started:
/// offloads follow the negotiated features, queue pairs are attached or
/// detached, and a queue's interface is checked.
pub(crate) const TUNSETOFFLOAD: u64 = 0x4004_54d0;
pub(crate) const TUNSETQUEUE: u64 = 0x4004_54d9;
pub(crate) const TUNGETIFF: u64 = 0x8004_54d2;

/// `ioctl` restricted to `requests` (argument 1, compared as 32 bits as
/// the kernel does), plus every VFIO/iommufd request.
fn ioctl_rules(requests: &[u64]) -> Result<Vec<SeccompRule>, BackendError> {
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
    // vCPU threads and iothreads pin themselves (`--vcpu-affinity`,
    // `--iothread-affinity`) before their own filter.
    libc::SYS_sched_setaffinity,
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
    // A disk's filesystem (engine=auto: tmpfs and ramfs files are served
    // synchronously).
    libc::SYS_fstatfs,
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
pub(crate) fn starts_threads(kind: ThreadKind) -> bool {
    matches!(
        kind,
        ThreadKind::VhostUser | ThreadKind::Vcpu | ThreadKind::Api | ThreadKind::VmBuild
    )
}

/// `socket` for Unix sockets only.
fn socket_rules() -> Result<Vec<SeccompRule>, BackendError> {
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_UNIX as u64,
    )?])?])
}

/// The API threads' argument filters: `setsockopt(SOL_SOCKET,
/// SO_RCVTIMEO|SO_SNDTIMEO)` and `fcntl(F_GETFD)`.
fn api_rules() -> Result<[(i64, Vec<SeccompRule>); 2], BackendError> {
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
fn build_socket_rules() -> Result<Vec<SeccompRule>, BackendError> {
    let mut rules = socket_rules()?;
    rules.push(SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::AF_INET as u64,
    )?])?);
    Ok(rules)
}
/// `clone` only for threads: `CLONE_THREAD` must be in its flags.
fn clone_rules() -> Result<Vec<SeccompRule>, BackendError> {
    let thread = libc::CLONE_THREAD as u64;
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )?])?])
}

/// What kinds that start threads do with `clone3`, as a filter of its own:
/// it fails with ENOSYS (its flags are in memory, out of a filter's
/// reach), so that the C library falls back to `clone`, whose flags the
/// kind's filter checks. [`compile`] folds this into the kind's program;
/// the tests check the fold against the two filters stacked.
#[cfg_attr(not(test), allow(dead_code))] // build.rs and the tests
pub(crate) fn clone3_enosys() -> Result<BpfProgram, BackendError> {
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

/// `kind`'s rules: every call on its lists, with the argument conditions
/// of the few that have them (an empty rule list allows the call
/// outright). `forbid` takes one call off (tests of the reporter).
pub(crate) fn rules(
    kind: ThreadKind,
    forbid: Option<i64>,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
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
    if starts_threads(kind) {
        rules.insert(libc::SYS_clone, clone_rules()?);
    }
    if kind == ThreadKind::VhostUser {
        rules.insert(libc::SYS_socket, socket_rules()?);
    }
    if kind == ThreadKind::VmBuild {
        rules.insert(libc::SYS_socket, build_socket_rules()?);
    }
    if kind == ThreadKind::Api {
        rules.extend(api_rules()?);
    }
    if kind == ThreadKind::Vcpu {
        rules.insert(libc::SYS_ioctl, ioctl_rules(&vcpu_ioctls())?);
    }
    if let Some(nr) = forbid {
        rules.remove(&nr);
    }
    Ok(rules)
}

/// Compiles `kind`'s filter: calls on its lists are allowed, every other
/// call gets `mismatch`. `forbid` takes one call off (tests of the
/// reporter). See [`compile`] for the program's shape.
pub(crate) fn build(
    kind: ThreadKind,
    mismatch: SeccompAction,
    forbid: Option<i64>,
) -> Result<BpfProgram, BackendError> {
    compile(rules(kind, forbid)?, mismatch, starts_threads(kind))
}

// Classic BPF, as seccomp filters are written (linux/filter.h, bpf_common.h).
const LD_W_ABS: u16 = 0x20;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JGT_K: u16 = 0x25;
const JMP_JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ACTION_FULL: u32 = 0xffff_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `offsetof(struct seccomp_data, nr)` and `arch`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Compiles `rules` with `mismatch` for every other call.
///
/// seccompiler tests the call number against each allowed call in turn.
/// The kernel pays for that chain at install time: it runs the filter for
/// every call number to fill its per-filter cache of always-allowed calls,
/// so a 374-instruction chain took about 0.2 ms to install here (and the
/// vCPU thread's sits before the guest's first instruction). Calls allowed
/// outright are therefore found by a binary search over runs of call
/// numbers, which allows them at once; every other call falls through to
/// seccompiler's program for the calls with argument conditions (its own
/// architecture check included), whose default is `mismatch`.
///
/// With `clone3_enosys` (kinds that start threads), `clone3` is answered
/// before the search as the [`clone3_enosys`] filter stacked on this one
/// would answer it: it fails with ENOSYS (its flags are in memory, out of
/// a filter's reach, so the C library falls back to `clone`, whose flags
/// the rules check), or gets `mismatch` where that takes precedence. One
/// program per thread: each install costs the kernel a walk.
pub(crate) fn compile(
    mut rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    clone3_enosys: bool,
) -> Result<BpfProgram, BackendError> {
    let clone3 = clone3_enosys.then(|| {
        let enosys = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
        match rules.remove(&libc::SYS_clone3) {
            Some(_) => enosys,
            // Stacked filters: the kernel takes the action that comes
            // first in its precedence (the lowest as a signed number).
            None => {
                let other = u32::from(mismatch.clone());
                if ((other & SECCOMP_RET_ACTION_FULL) as i32)
                    < ((enosys & SECCOMP_RET_ACTION_FULL) as i32)
                {
                    other
                } else {
                    enosys
                }
            }
        }
    });
    let (plain, conditional): (BTreeMap<_, _>, BTreeMap<_, _>) =
        rules.into_iter().partition(|(_, r)| r.is_empty());
    let rest: BpfProgram = SeccompFilter::new(
        conditional,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?
    .try_into()?;
    let runs = runs(plain.keys().map(|&nr| nr as u32));
    if runs.is_empty() && clone3.is_none() {
        return Ok(rest);
    }
    // The architecture first (call numbers mean nothing on another one:
    // `rest` answers those), then the number.
    let mut out = vec![
        insn(LD_W_ABS, 0, 0, DATA_ARCH),
        insn(JMP_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        insn(JMP_JA, 0, 0, 0), // to `rest`, patched below
        insn(LD_W_ABS, 0, 0, DATA_NR),
    ];
    let mut to_rest = vec![2];
    if let Some(answer) = clone3 {
        out.push(insn(JMP_JEQ_K, 0, 1, libc::SYS_clone3 as u32));
        out.push(insn(RET_K, 0, 0, answer));
    }
    if !runs.is_empty() {
        search(&mut out, &mut to_rest, &runs);
    } else {
        to_rest.push(out.len());
        out.push(insn(JMP_JA, 0, 0, 0));
    }
    let rest_at = out.len();
    for at in to_rest {
        out[at].k = (rest_at - at - 1) as u32;
    }
    out.extend(rest);
    Ok(out)
}

/// Sorted call numbers as runs of consecutive ones, `(first, last)`.
fn runs(nrs: impl Iterator<Item = u32>) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for nr in nrs {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == nr => *last = nr,
            _ => runs.push((nr, nr)),
        }
    }
    runs
}

/// Instructions [`search`] emits for `runs`.
fn search_len(runs: &[(u32, u32)]) -> usize {
    match runs {
        [(first, last)] => 3 + usize::from(first != last),
        _ => {
            let (left, right) = runs.split_at(runs.len() / 2);
            let l = search_len(left);
            // A subtree too long for an 8-bit jump is jumped over with JA.
            1 + usize::from(l > 255) + l + search_len(right)
        }
    }
}

/// A binary search of the call number (in A) over `runs`: a call in one
/// returns ALLOW; any other reaches a JA whose index goes to `to_rest`.
fn search(out: &mut Vec<sock_filter>, to_rest: &mut Vec<usize>, runs: &[(u32, u32)]) {
    match runs {
        [(first, last)] => {
            if first == last {
                out.push(insn(JMP_JEQ_K, 0, 1, *first));
            } else {
                out.push(insn(JMP_JGT_K, 2, 0, *last));
                out.push(insn(JMP_JGE_K, 0, 1, *first));
            }
            out.push(insn(RET_K, 0, 0, SECCOMP_RET_ALLOW));
            to_rest.push(out.len());
            out.push(insn(JMP_JA, 0, 0, 0));
        }
        _ => {
            let (left, right) = runs.split_at(runs.len() / 2);
            let split = right[0].0;
            let l = search_len(left);
            if l > 255 {
                out.push(insn(JMP_JGE_K, 0, 1, split));
                out.push(insn(JMP_JA, 0, 0, l as u32));
            } else {
                out.push(insn(JMP_JGE_K, l as u8, 0, split));
            }
            search(out, to_rest, left);
            search(out, to_rest, right);
        }
    }
}
