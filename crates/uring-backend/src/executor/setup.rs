//! Creating the ring: setup flags with fallbacks, the opcode probe, and the
//! restriction to the opcodes the executor issues.

use std::io;

use io_uring::opcode;
use io_uring::register::{Probe, Restriction};
use io_uring::IoUring;

use super::ExecutorError;

/// `IORING_REGISTER_BUFFERS`, `IORING_UNREGISTER_BUFFERS` and
/// `IORING_REGISTER_FILES_UPDATE`, the only registrations a restricted ring
/// still allows: guest RAM as fixed buffers, and files put into (and taken
/// out of) the sparse table registered before the restriction.
const IORING_REGISTER_BUFFERS: u8 = 0;
const IORING_UNREGISTER_BUFFERS: u8 = 1;
const IORING_REGISTER_FILES_UPDATE: u8 = 6;
/// `IOSQE_FIXED_FILE`, the one SQE flag a restricted ring accepts.
const IOSQE_FIXED_FILE: u8 = 1;

/// Which of the executor's opcodes the kernel supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opcodes {
    pub nop: bool,
    pub read: bool,
    pub write: bool,
    pub readv: bool,
    pub writev: bool,
    pub read_fixed: bool,
    pub write_fixed: bool,
    pub fsync: bool,
    pub fallocate: bool,
    pub async_cancel: bool,
}

impl Opcodes {
    /// Every opcode supported: what we assume when the kernel cannot be
    /// probed (before Linux 5.6); an unsupported opcode then fails with
    /// `EINVAL` from the kernel.
    const ALL: Opcodes = Opcodes {
        nop: true,
        read: true,
        write: true,
        readv: true,
        writev: true,
        read_fixed: true,
        write_fixed: true,
        fsync: true,
        fallocate: true,
        async_cancel: true,
    };

    fn probe(probe: &Probe) -> Opcodes {
        Opcodes {
            nop: probe.is_supported(opcode::Nop::CODE),
            read: probe.is_supported(opcode::Read::CODE),
            write: probe.is_supported(opcode::Write::CODE),
            readv: probe.is_supported(opcode::Readv::CODE),
            writev: probe.is_supported(opcode::Writev::CODE),
            read_fixed: probe.is_supported(opcode::ReadFixed::CODE),
            write_fixed: probe.is_supported(opcode::WriteFixed::CODE),
            fsync: probe.is_supported(opcode::Fsync::CODE),
            fallocate: probe.is_supported(opcode::Fallocate::CODE),
            async_cancel: probe.is_supported(opcode::AsyncCancel::CODE),
        }
    }

    fn codes(&self) -> Vec<u8> {
        [
            (self.nop, opcode::Nop::CODE),
            (self.read, opcode::Read::CODE),
            (self.write, opcode::Write::CODE),
            (self.readv, opcode::Readv::CODE),
            (self.writev, opcode::Writev::CODE),
            (self.read_fixed, opcode::ReadFixed::CODE),
            (self.write_fixed, opcode::WriteFixed::CODE),
            (self.fsync, opcode::Fsync::CODE),
            (self.fallocate, opcode::Fallocate::CODE),
            (self.async_cancel, opcode::AsyncCancel::CODE),
        ]
        .into_iter()
        .filter_map(|(ok, code)| ok.then_some(code))
        .collect()
    }
}

/// How the ring was set up, as far as the kernel allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingSetup {
    /// `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN` took.
    pub single_issuer: bool,
    /// The ring only accepts the executor's opcodes and buffer
    /// (un)registration (`IORING_REGISTER_RESTRICTIONS`).
    pub restricted: bool,
    /// The kernel answered the opcode probe.
    pub probed: bool,
    /// A sparse registered-file table of [`super::FILE_SLOTS`] slots is
    /// set up (Linux 5.19 and later).
    pub file_table: bool,
    pub opcodes: Opcodes,
    pub sq_entries: u32,
    pub cq_entries: u32,
}

fn build(entries: u32, disabled: bool, single_issuer: bool) -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    if disabled {
        b.setup_r_disabled();
    }
    if single_issuer {
        b.setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag();
    }
    b.build(entries)
}

/// Creates the ring, newest setup first, falling back on `EINVAL` (a flag
/// the kernel does not know).
pub(super) fn create(entries: u32) -> Result<(IoUring, RingSetup), ExecutorError> {
    let attempts = [(true, true), (true, false), (false, false)];
    let mut last = None;
    let mut made = None;
    for (disabled, single_issuer) in attempts {
        match build(entries, disabled, single_issuer) {
            Ok(ring) => {
                made = Some((ring, disabled, single_issuer));
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(source) => return Err(ExecutorError::Setup { entries, source }),
        }
    }
    let Some((ring, disabled, single_issuer)) = made else {
        let source = last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL));
        return Err(ExecutorError::Setup { entries, source });
    };

    let mut probe = Probe::new();
    let (probed, opcodes) = match ring.submitter().register_probe(&mut probe) {
        Ok(()) => (true, Opcodes::probe(&probe)),
        Err(e) => {
            log::debug!("io_uring opcode probe failed ({e}); assuming every opcode exists");
            (false, Opcodes::ALL)
        }
    };

    let file_table = match ring.submitter().register_files_sparse(super::FILE_SLOTS) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("no registered-file table ({e}); I/O names plain descriptors");
            false
        }
    };

    let mut restricted = false;
    if disabled {
        let mut list: Vec<Restriction> = opcodes
            .codes()
            .into_iter()
            .map(Restriction::sqe_op)
            .collect();
        list.push(Restriction::register_op(IORING_REGISTER_BUFFERS));
        list.push(Restriction::register_op(IORING_UNREGISTER_BUFFERS));
        list.push(Restriction::register_op(IORING_REGISTER_FILES_UPDATE));
        list.push(Restriction::sqe_flags_allowed(IOSQE_FIXED_FILE));
        match ring.submitter().register_restrictions(&mut list) {
            Ok(()) => restricted = true,
            Err(e) => {
                log::debug!("io_uring restrictions refused ({e}); the ring stays unrestricted")
            }
        }
        ring.submitter()
            .register_enable_rings()
            .map_err(ExecutorError::EnableRings)?;
    }

    let setup = RingSetup {
        single_issuer,
        restricted,
        probed,
        file_table,
        opcodes,
        sq_entries: ring.params().sq_entries(),
        cq_entries: ring.params().cq_entries(),
    };
    Ok((ring, setup))
}
