//! Operations without a future, for paths that must not allocate per
//! request.
//!
//! A device queue keeps its requests in a table of its own, sized by the
//! queue, and submits each request's I/O with [`Executor::submit_direct`],
//! tagged with the request's slot. The op table holds an `Rc` of the
//! handler (which owns the slot table, and with it every iovec array and
//! the guest-memory handle the kernel uses) until the CQE arrives; then
//! [`Completion::complete`] runs with the tag and the result. Per
//! operation that is a reference count, not a task, a boxed future or
//! boxed resources.
//!
//! Also here: [`EventFdReader`], an eventfd read that can be awaited again
//! and again without allocating (one read outstanding at a time, even if
//! the future that started it was dropped); [`Deferred`], the
//! allocation-free form of [`Executor::defer`]; and registered files.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};

use io_uring::{opcode, squeue, types};
use vmm_sys_util::eventfd::EventFd;

use super::op::{OpSlot, OpState};
use super::{Executor, ExecutorError};

/// Receives the completions of the operations it submitted with
/// [`Executor::submit_direct`].
pub trait Completion {
    /// The operation tagged `tag` finished with `result`: a byte count, or
    /// a negative errno (`-ECANCELED` when the executor shut down first).
    fn complete(&self, tag: u64, result: i32);
}

/// Work run once at the end of the current turn, queued with
/// [`Executor::defer_rc`].
pub trait Deferred {
    fn run(self: Rc<Self>);
}

/// Slots in each ring's registered-file table, set up sparse when the ring
/// is created (before it is restricted, when registering is still allowed;
/// afterwards only updates are).
pub const FILE_SLOTS: u32 = 64;

impl Executor {
    /// Queues `entry`; when its completion arrives, `handler.complete(tag,
    /// result)` runs on this thread, at the end of a reap. `waits` marks
    /// an op that waits for an outside event (an eventfd), which polling
    /// does not spin for. If the SQE cannot be queued (the submission
    /// queue stays full) the error comes back and nothing is kept.
    ///
    /// # Safety
    ///
    /// Every pointer in `entry` (buffers, iovec arrays and the buffers
    /// they point at) must stay valid, and must not be moved or freed,
    /// until `handler.complete(tag, _)` has been called: it must point
    /// into memory that `handler` owns or keeps alive, which the op table
    /// keeps alive by holding `handler`. A file descriptor in `entry` must
    /// stay open until then.
    pub unsafe fn submit_direct(
        &self,
        handler: Rc<dyn Completion>,
        tag: u64,
        entry: squeue::Entry,
        waits: bool,
    ) -> io::Result<()> {
        let key = self.ops.borrow_mut().insert(OpSlot {
            state: OpState::Pending(None),
            owned: Box::new(()),
            waits,
            direct: Some((handler, tag)),
        });
        match self.push(&entry.user_data(key)) {
            Ok(()) => {
                self.inflight.set(self.inflight.get() + 1);
                if !waits {
                    self.busy.set(self.busy.get() + 1);
                }
                Ok(())
            }
            Err(e) => {
                let slot = self.ops.borrow_mut().remove(key);
                drop(slot);
                Err(e)
            }
        }
    }

    /// A no-op whose completion (result 0) goes to `handler` with `tag`:
    /// a round trip through the ring.
    pub fn nop_direct(&self, handler: Rc<dyn Completion>, tag: u64) -> io::Result<()> {
        if !self.setup.opcodes.nop {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        // SAFETY: a no-op refers to no memory and no file.
        unsafe { self.submit_direct(handler, tag, opcode::Nop::new().build(), false) }
    }

    /// Runs `d` after the ready tasks of this turn, like
    /// [`Executor::defer`], without boxing a closure.
    pub fn defer_rc(&self, d: Rc<dyn Deferred>) {
        self.deferred_rc.borrow_mut().push(d);
    }

    /// Puts `fd` in a free slot of the ring's registered-file table and
    /// returns the slot, for SQEs with `IOSQE_FIXED_FILE` (the kernel then
    /// skips looking the descriptor up and taking a reference per I/O).
    /// The ring holds its own reference to the file until
    /// [`Executor::unregister_file`].
    pub fn register_file(&self, fd: &impl AsRawFd) -> Result<u32, ExecutorError> {
        let mut used = self.file_slots.borrow_mut();
        let Some(slot) = used.iter().position(|u| !*u) else {
            return Err(ExecutorError::RegisterFile(io::Error::from_raw_os_error(
                libc::ENFILE,
            )));
        };
        if !self.setup.file_table {
            return Err(ExecutorError::RegisterFile(io::Error::from_raw_os_error(
                libc::ENXIO,
            )));
        }
        self.ring
            .borrow()
            .submitter()
            .register_files_update(slot as u32, &[fd.as_raw_fd()])
            .map_err(ExecutorError::RegisterFile)?;
        used[slot] = true;
        Ok(slot as u32)
    }

    /// Empties a slot of the registered-file table. No operation on it
    /// may be in flight.
    pub fn unregister_file(&self, slot: u32) {
        let mut used = self.file_slots.borrow_mut();
        let Some(u) = used.get_mut(slot as usize) else {
            return;
        };
        if !*u {
            return;
        }
        match self
            .ring
            .borrow()
            .submitter()
            .register_files_update(slot, &[-1])
        {
            Ok(_) => *u = false,
            Err(e) => log::warn!("emptying registered file slot {slot}: {e}"),
        }
    }
}

/// What an [`EventFdReader`] shares with the op table while a read is in
/// the kernel.
struct ReadState {
    fd: Arc<EventFd>,
    /// Registered-file slot of `fd`, if it has one.
    fixed: Option<u32>,
    /// Where the kernel puts the counter; only read after the completion.
    buf: UnsafeCell<[u8; 8]>,
    /// A read is in the kernel.
    armed: Cell<bool>,
    /// The result of the last read, not yet collected.
    done: Cell<Option<i32>>,
    waker: RefCell<Option<Waker>>,
}

impl Completion for ReadState {
    fn complete(&self, _tag: u64, result: i32) {
        self.armed.set(false);
        self.done.set(Some(result));
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// Reads an eventfd (a queue's kick, a wake-up) over and over with one
/// outstanding read and no allocation per read. A read that was started
/// by a future dropped before it finished stays in the kernel, and the
/// next [`EventFdReader::read`] collects its result.
pub struct EventFdReader {
    state: Rc<ReadState>,
}

impl EventFdReader {
    pub fn new(fd: Arc<EventFd>) -> EventFdReader {
        EventFdReader::with_slot(fd, None)
    }

    /// As [`EventFdReader::new`], the read naming `fd` by its slot in the
    /// ring's registered-file table.
    pub fn with_slot(fd: Arc<EventFd>, fixed: Option<u32>) -> EventFdReader {
        EventFdReader {
            state: Rc::new(ReadState {
                fd,
                fixed,
                buf: UnsafeCell::new([0; 8]),
                armed: Cell::new(false),
                done: Cell::new(None),
                waker: RefCell::new(None),
            }),
        }
    }

    /// Whether a read is in the kernel.
    pub fn armed(&self) -> bool {
        self.state.armed.get()
    }

    /// Takes an outstanding read back from the kernel (left there, it
    /// would swallow the eventfd's next signal, meant for whoever reads it
    /// next) and waits until it is over.
    pub async fn cancel(&self, ex: &Executor) {
        if !self.armed() {
            return;
        }
        let _ = ex.cancel_fd(self.state.fd.clone()).await;
        // Collects the cancelled (or completed) read.
        let _ = self.read(ex).await;
    }

    /// Waits until the eventfd's counter is non-zero and returns it (the
    /// read resets it).
    pub fn read<'a>(&'a self, ex: &'a Executor) -> impl Future<Output = io::Result<u64>> + 'a {
        std::future::poll_fn(move |cx| {
            let s = &self.state;
            if let Some(res) = s.done.take() {
                if res < 0 {
                    return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
                }
                if res != 8 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("eventfd read returned {res} bytes"),
                    )));
                }
                // SAFETY: the read completed; nothing else writes `buf`
                // until the next one is submitted, below, after this.
                let v = u64::from_ne_bytes(unsafe { *s.buf.get() });
                return Poll::Ready(Ok(v));
            }
            {
                let mut w = s.waker.borrow_mut();
                match &*w {
                    Some(old) if old.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
            }
            if !s.armed.get() {
                if !ex.setup.opcodes.read {
                    return Poll::Ready(Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)));
                }
                let buf = s.buf.get().cast::<u8>();
                let entry = match s.fixed {
                    Some(slot) => opcode::Read::new(types::Fixed(slot), buf, 8).build(),
                    None => opcode::Read::new(types::Fd(s.fd.as_raw_fd()), buf, 8).build(),
                };
                let handler: Rc<dyn Completion> = s.clone();
                // SAFETY: `buf` is in the `ReadState` that the op table
                // keeps alive (through `handler`) until the completion, and
                // it holds `fd` open as long.
                if let Err(e) = unsafe { ex.submit_direct(handler, 0, entry, true) } {
                    return Poll::Ready(Err(e));
                }
                s.armed.set(true);
            }
            Poll::Pending
        })
    }
}
