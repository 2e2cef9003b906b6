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
//! The lists (`rules.rs`) name what each kind of thread really calls after
//! set-up (found by running the whole test suite in log mode). `ioctl` is
//! filtered by request number where the thread's requests are a known set.
//!
//! The programs are compiled at build time (`build.rs` includes
//! `rules.rs`), as Firecracker does, so a thread installs a static program:
//! no compilation, allocation or list code runs at start-up.

use std::borrow::Cow;
use std::cell::Cell;
use std::str::FromStr;

use seccompiler::SeccompAction;

// Release builds install only what build.rs compiled from it; the
// compiler in it runs here in test builds (checks and variants).
#[cfg_attr(not(debug_assertions), allow(dead_code))]
mod rules;

pub use rules::ThreadKind;

/// The programs `build.rs` compiled from `rules.rs`: `PROGRAMS[kind][m]`
/// with `m` 0 for [`SeccompMode::Enforce`] and 1 for [`SeccompMode::Log`].
mod compiled {
    include!(concat!(env!("OUT_DIR"), "/seccomp_programs.rs"));
}

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
    #[error("installing the seccomp filter")]
    Install(#[source] seccompiler::Error),
    #[error("installing the SIGSYS reporter")]
    Reporter(#[source] std::io::Error),
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

/// A BPF program, as `seccompiler::apply_filter` takes it.
pub type Program = Cow<'static, [seccompiler::sock_filter]>;

/// The BPF program for `kind` in `mode` (None when seccomp is off): the
/// one compiled at build time, or (test builds, with
/// `RINGVM_TEST_SECCOMP_FORBID` naming this kind) one compiled now.
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<Option<Program>, SeccompError> {
    let (index, _mismatch) = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => (0, SeccompAction::Trap),
        SeccompMode::Log => (1, SeccompAction::Log),
    };
    #[cfg(debug_assertions)]
    if let Some(nr) = test_forbidden(kind) {
        let prog =
            rules::build(kind, _mismatch, Some(nr)).map_err(|source| SeccompError::Build {
                kind: kind.name(),
                source,
            })?;
        return Ok(Some(Cow::Owned(prog)));
    }
    Ok(Some(Cow::Borrowed(
        compiled::PROGRAMS[kind as usize][index],
    )))
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
    fn the_build_time_programs_are_the_lists_compiled() {
        for (i, kind) in ThreadKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, i, "ALL is in discriminant order");
            assert!(program(kind, SeccompMode::Off).unwrap().is_none());
            for (mode, action) in [
                (SeccompMode::Enforce, SeccompAction::Trap),
                (SeccompMode::Log, SeccompAction::Log),
            ] {
                let p = program(kind, mode).unwrap().unwrap();
                assert!(!p.is_empty());
                let now = rules::build(kind, action, None).unwrap();
                assert_eq!(*p, *now, "{} {mode:?}", kind.name());
            }
        }
    }

    /// Runs a classic-BPF seccomp program on one call: its return value
    /// and the instructions it ran.
    fn run_bpf(
        prog: &[seccompiler::sock_filter],
        nr: u32,
        arch: u32,
        args: [u64; 6],
    ) -> (u32, usize) {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        let (mut a, mut pc, mut steps) = (0u32, 0usize, 0usize);
        loop {
            let i = &prog[pc];
            let (k, jt, jf) = (i.k, usize::from(i.jt), usize::from(i.jf));
            pc += 1;
            steps += 1;
            match i.code {
                0x20 => {
                    let at = k as usize;
                    a = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
                }
                0x54 => a &= k,
                0x05 => pc += k as usize,
                0x15 => pc += if a == k { jt } else { jf },
                0x25 => pc += if a > k { jt } else { jf },
                0x35 => pc += if a >= k { jt } else { jf },
                0x45 => pc += if a & k != 0 { jt } else { jf },
                0x06 => return (k, steps),
                code => panic!("instruction {code:#x} at {}", pc - 1),
            }
        }
    }

    #[test]
    fn the_search_programs_decide_every_call_as_seccompiler_does() {
        const X86_64: u32 = 0xc000_003e;
        for kind in ThreadKind::ALL {
            for action in [SeccompAction::Trap, SeccompAction::Log] {
                let ours = rules::build(kind, action.clone(), None).unwrap();
                let reference: seccompiler::BpfProgram = seccompiler::SeccompFilter::new(
                    rules::rules(kind, None).unwrap(),
                    action,
                    SeccompAction::Allow,
                    seccompiler::TargetArch::x86_64,
                )
                .unwrap()
                .try_into()
                .unwrap();
                // Argument values: every constant the reference compares
                // with, one off, and with high bits set.
                let mut pool: Vec<u64> = vec![0, u64::MAX];
                for i in &reference {
                    let k = u64::from(i.k);
                    pool.extend([k, k ^ 1, k | 1 << 32]);
                }
                pool.sort_unstable();
                pool.dedup();
                let conditional: Vec<u32> = rules::rules(kind, None)
                    .unwrap()
                    .into_iter()
                    .filter(|(_, r)| !r.is_empty())
                    .map(|(nr, _)| nr as u32)
                    .collect();
                // Kinds that start threads used to stack the clone3 filter
                // on theirs: the kernel then takes the action first in its
                // precedence (the lowest as a signed number).
                let stacked = rules::starts_threads(kind).then(|| rules::clone3_enosys().unwrap());
                let rank = |v: u32| (v & 0xffff_0000) as i32;
                let check = |nr: u32, arch: u32, args: [u64; 6]| {
                    let (got, steps) = run_bpf(&ours, nr, arch, args);
                    let (mut want, _) = run_bpf(&reference, nr, arch, args);
                    if let Some(second) = &stacked {
                        let (also, _) = run_bpf(second, nr, arch, args);
                        if rank(also) < rank(want) {
                            want = also;
                        }
                    }
                    assert_eq!(
                        got,
                        want,
                        "{} nr {nr} arch {arch:#x} {args:x?}",
                        kind.name()
                    );
                    steps
                };
                let mut worst = 0;
                for nr in (0..1100).chain([0x4000_0000, 0x4000_0001, u32::MAX]) {
                    for arch in [X86_64, 0x4000_0003] {
                        let steps = check(nr, arch, [0; 6]);
                        if arch == X86_64 && !conditional.contains(&nr) {
                            worst = worst.max(steps);
                        }
                    }
                }
                for &nr in &conditional {
                    for (i, j) in [(0, 1), (1, 2), (0, 2)] {
                        for &x in &pool {
                            for &y in &pool {
                                let mut args = [0; 6];
                                args[i] = x;
                                args[j] = y;
                                check(nr, X86_64, args);
                            }
                        }
                    }
                }
                // The kernel runs the program for every call number at
                // install time: a binary search keeps that walk short
                // (seccompiler's chains ran 62-181 instructions).
                assert!(worst <= 48, "{}: {worst} instructions", kind.name());
            }
        }
    }

    #[test]
    fn ioctl_numbers_match_the_bindings() {
        use kvm_bindings::*;
        use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};
        const KVMIO: u32 = 0xae;
        ioctl_io_nr!(RUN, KVMIO, 0x80);
        ioctl_ior_nr!(GET_REGS, KVMIO, 0x81, kvm_regs);
        ioctl_ior_nr!(GET_SREGS, KVMIO, 0x83, kvm_sregs);
        ioctl_ior_nr!(GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
        ioctl_ior_nr!(GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
        ioctl_ior_nr!(GET_FPU, KVMIO, 0x8c, kvm_fpu);
        ioctl_iowr_nr!(GET_MSRS, KVMIO, 0x88, kvm_msrs);
        ioctl_ior_nr!(GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
        ioctl_ior_nr!(GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
        ioctl_ior_nr!(GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
        ioctl_ior_nr!(GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
        ioctl_iow_nr!(SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
        ioctl_iow_nr!(IRQFD, KVMIO, 0x76, kvm_irqfd);
        ioctl_iow_nr!(IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
        ioctl_iow_nr!(SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
        ioctl_iow_nr!(REG_COALESCED, KVMIO, 0x67, kvm_coalesced_mmio_zone);
        ioctl_iow_nr!(UNREG_COALESCED, KVMIO, 0x68, kvm_coalesced_mmio_zone);
        ioctl_iow_nr!(SET_MEM, KVMIO, 0x46, kvm_userspace_memory_region);
        let pairs = [
            (rules::KVM_RUN, RUN()),
            (rules::KVM_GET_REGS, GET_REGS()),
            (rules::KVM_GET_SREGS, GET_SREGS()),
            (rules::KVM_GET_LAPIC, GET_LAPIC()),
            (rules::KVM_GET_MP_STATE, GET_MP_STATE()),
            (rules::KVM_GET_FPU, GET_FPU()),
            (rules::KVM_GET_MSRS, GET_MSRS()),
            (rules::KVM_GET_VCPU_EVENTS, GET_VCPU_EVENTS()),
            (rules::KVM_GET_DEBUGREGS, GET_DEBUGREGS()),
            (rules::KVM_GET_XSAVE, GET_XSAVE()),
            (rules::KVM_GET_XCRS, GET_XCRS()),
            (rules::KVM_SET_GSI_ROUTING, SET_GSI_ROUTING()),
            (rules::KVM_IRQFD, IRQFD()),
            (rules::KVM_IOEVENTFD, IOEVENTFD()),
            (rules::KVM_SIGNAL_MSI, SIGNAL_MSI()),
            (rules::KVM_REGISTER_COALESCED_MMIO, REG_COALESCED()),
            (rules::KVM_UNREGISTER_COALESCED_MMIO, UNREG_COALESCED()),
            (rules::KVM_SET_USER_MEMORY_REGION, SET_MEM()),
        ];
        for (i, (ours, bindings)) in pairs.into_iter().enumerate() {
            assert_eq!(ours, bindings, "request {i}");
        }
        // The TAP requests (linux/if_tun.h: _IOW('T', 208|217, int),
        // _IOR('T', 210, unsigned int)).
        assert_eq!(
            rules::TUNSETOFFLOAD,
            (1 << 30) | (4 << 16) | (0x54 << 8) | 208
        );
        assert_eq!(
            rules::TUNSETQUEUE,
            (1 << 30) | (4 << 16) | (0x54 << 8) | 217
        );
        assert_eq!(rules::TUNGETIFF, (2 << 30) | (4 << 16) | (0x54 << 8) | 210);
    }

    /// Runs `f` on a new thread under `kind`'s list, with refusals as
    /// errno 1000 instead of SIGSYS.
    fn under<T: Send + 'static>(kind: ThreadKind, f: fn() -> T) -> T {
        std::thread::spawn(move || {
            let prog = rules::build(kind, SeccompAction::Errno(1000), None).unwrap();
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
    fn kinds_that_start_threads_answer_clone3_with_enosys_and_still_start_threads() {
        for kind in [ThreadKind::Vcpu, ThreadKind::VhostUser] {
            let (clone3, started) = under(kind, || {
                // SAFETY: clone3 with a null argument only fails (EFAULT
                // if it reached the kernel).
                let rc = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
                // The C library falls back to clone(CLONE_THREAD).
                let started = std::thread::spawn(|| 7).join().ok();
                (errno_of(rc), started)
            });
            assert_eq!(clone3, libc::ENOSYS, "{}", kind.name());
            assert_eq!(started, Some(7), "{}", kind.name());
        }
        let clone3 = under(ThreadKind::IoThread, || {
            // SAFETY: as above.
            errno_of(unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) })
        });
        assert_eq!(clone3, 1000, "iothreads start no threads");
    }

    #[test]
    fn vcpu_ioctls_are_filtered_by_request() {
        let (run, vfio, tcgets, socket) = under(ThreadKind::Vcpu, || {
            // SAFETY: ioctls on fd -1 only fail; socket() with a bogus
            // family fails too, or is refused by the filter first.
            unsafe {
                (
                    errno_of(libc::syscall(libc::SYS_ioctl, -1, rules::KVM_RUN)),
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
