//! Tests that need the executor's internals.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use io_uring::{opcode, types};

use super::Executor;

fn block_on<T: 'static>(ex: &Rc<Executor>, fut: impl Future<Output = T> + 'static) -> T {
    ex.block_on(fut).expect("the task finished")
}

#[test]
fn restricted_ring_refuses_other_opcodes() {
    let ex = Executor::new(8).expect("executor");
    if !ex.setup().restricted {
        eprintln!("note: this kernel does not restrict rings; nothing to check");
        return;
    }
    assert!(ex.setup().opcodes.readv && ex.setup().opcodes.nop);
    let ex2 = ex.clone();
    let res = block_on(&ex, async move {
        // Close is not among the executor's opcodes.
        let op = ex2.submit_op(Box::new(()), |_| opcode::Close::new(types::Fd(-1)).build());
        op.await.0
    });
    assert_eq!(res, -libc::EACCES);
    // Buffer registration is still allowed.
    let buf = crate::memory::IoBuf::new(4096);
    match ex.register_buffers(&[(buf.as_ptr(), buf.len())]) {
        Ok(()) => ex.unregister_buffers().expect("unregister"),
        Err(super::ExecutorError::RegisterBuffers { source, .. }) => {
            assert_ne!(
                source.raw_os_error(),
                Some(libc::EACCES),
                "restrictions must allow registration"
            )
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn completed_but_uncollected_ops_are_freed_when_dropped() {
    let ex = Executor::new(8).expect("executor");
    let ex2 = ex.clone();
    block_on(&ex, async move {
        let token = Rc::new(());
        let weak = Rc::downgrade(&token);
        let op = ex2.submit_op(Box::new(token), |_| opcode::Nop::new().build());
        // Let the nop complete without polling its future.
        ex2.nop().await.expect("nop");
        while ex2.inflight() > 0 {
            ex2.nop().await.expect("nop");
        }
        assert!(weak.upgrade().is_some(), "the result waits for its future");
        drop(op);
        assert!(weak.upgrade().is_none());
        assert_eq!(
            ex2.ops.borrow().len(),
            usize::from(ex2.wake_key.get().is_some())
        );
    });
}

#[test]
fn many_ops_in_one_turn_overflow_the_submission_queue_gracefully() {
    // 4 SQ entries; 64 nops queued in one turn force early submissions.
    let ex = Executor::new(4).expect("executor");
    let ex2 = ex.clone();
    let results = block_on(&ex, async move {
        let futs: Vec<_> = (0..64).map(|_| ex2.nop()).collect();
        let mut ok = 0;
        for f in futs {
            if f.await.is_ok() {
                ok += 1;
            }
        }
        ok
    });
    assert_eq!(results, 64);
    assert_eq!(ex.inflight(), 0);
}

#[test]
fn a_polling_executor_picks_up_work_without_sleeping_and_cancel_fd_ends_reads() {
    use std::sync::Arc;
    use std::time::Duration;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let ex = Executor::new(8).expect("executor");
    ex.set_poll(Duration::from_millis(200), super::PollWhen::Always);
    let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let writer = fd.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(2));
            writer.write(1).unwrap();
        }
    });
    let (ex2, fd2) = (ex.clone(), fd.clone());
    let got = block_on(&ex, async move {
        let mut total = 0;
        while total < 5 {
            total += ex2.read_eventfd(fd2.clone()).await.unwrap();
        }
        total
    });
    t.join().unwrap();
    assert_eq!(got, 5);
    let s = ex.stats().snapshot();
    assert!(s.poll_hits >= 1, "{s:?}");

    // A read nobody will ever satisfy ends with ECANCELED once its fd's
    // operations are cancelled, and the cancel counts it.
    ex.set_poll(Duration::ZERO, super::PollWhen::Always);
    let (ex2, fd2) = (ex.clone(), fd.clone());
    let (cancelled, res) = block_on(&ex, async move {
        let mut read = Box::pin(ex2.read_eventfd(fd2.clone()));
        let n = ex2.cancel_fd(fd2.clone()).await.unwrap();
        (n, read.as_mut().await)
    });
    assert_eq!(cancelled, 1);
    assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::ECANCELED));
}

#[test]
fn io_only_polling_skips_reads_that_wait_for_outside_events() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::Arc;
    use std::time::Duration;

    let ex = Executor::new(8).expect("executor");
    ex.set_poll(Duration::from_millis(1), super::PollWhen::IoInFlight);
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two-element array on success.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are fresh and owned from here on.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let r = Arc::new(r);
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        let b = [7u8];
        let fd = std::os::fd::AsRawFd::as_raw_fd(&w);
        // SAFETY: writing one byte from a valid buffer to a valid fd.
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), 1) };
        assert_eq!(n, 1);
    });
    let buf = Rc::new(crate::memory::IoBuf::new(64));
    let (ex2, r2, b2) = (ex.clone(), r.clone(), buf.clone());
    let n = block_on(&ex, async move {
        let iov = vec![b2.iovec(0, 64)];
        ex2.readv_waiting(r2, iov, Box::new(b2.clone())).await
    });
    writer.join().unwrap();
    assert_eq!(n.unwrap(), 1);
    let s = ex.stats().snapshot();
    assert_eq!(
        (s.poll_hits, s.poll_misses),
        (0, 0),
        "nothing but a waiting read was in flight: no polling"
    );
}

/// Counts direct completions by tag.
#[derive(Default)]
struct Sink(RefCell<Vec<(u64, i32)>>);

impl super::Completion for Sink {
    fn complete(&self, tag: u64, result: i32) {
        self.0.borrow_mut().push((tag, result));
    }
}

#[test]
fn direct_ops_reach_their_handler_with_tag_and_result_through_a_registered_file() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let ex = Executor::new(8).expect("executor");
    let mut file = tempfile_with(b"0123456789abcdef");
    file.flush().unwrap();
    let sink = Rc::new(Sink::default());
    let buf = Rc::new(RefCell::new([0u8; 4]));
    let slot = if ex.setup().file_table {
        Some(ex.register_file(&file).expect("a registered file"))
    } else {
        eprintln!("note: no registered-file table on this kernel");
        None
    };
    for (tag, offset) in [(7u64, 4u64), (9, 12)] {
        let ptr = buf.borrow_mut().as_mut_ptr();
        let entry = match slot {
            Some(s) => opcode::Read::new(types::Fixed(s), ptr, 2)
                .offset(offset)
                .build()
                .flags(io_uring::squeue::Flags::FIXED_FILE),
            None => opcode::Read::new(types::Fd(file.as_raw_fd()), ptr, 2)
                .offset(offset)
                .build(),
        };
        // SAFETY: `buf` outlives the executor's run below, which reaps
        // the completion.
        unsafe { ex.submit_direct(sink.clone(), tag, entry, false) }.unwrap();
        let ex2 = ex.clone();
        let s2 = sink.clone();
        block_on(&ex, async move {
            while s2.0.borrow().len() < (tag as usize - 5) / 2 {
                ex2.nop().await.unwrap();
            }
        });
        let got = &buf.borrow()[..2];
        assert_eq!(
            got,
            &b"0123456789abcdef"[offset as usize..offset as usize + 2]
        );
    }
    assert_eq!(*sink.0.borrow(), vec![(7, 2), (9, 2)]);
    if let Some(s) = slot {
        ex.unregister_file(s);
    }
}

#[test]
fn a_restricted_ring_takes_only_the_fixed_file_flag() {
    let ex = Executor::new(8).expect("executor");
    if !ex.setup().restricted {
        eprintln!("note: this kernel does not restrict rings; nothing to check");
        return;
    }
    let ex2 = ex.clone();
    let (forced_async, fixed) = block_on(&ex, async move {
        // IOSQE_ASYNC is not among the allowed flags.
        let op = ex2.submit_op(Box::new(()), |_| {
            opcode::Nop::new()
                .build()
                .flags(io_uring::squeue::Flags::ASYNC)
        });
        let drained = op.await.0;
        let op = ex2.submit_op(Box::new(()), |_| {
            opcode::Nop::new()
                .build()
                .flags(io_uring::squeue::Flags::FIXED_FILE)
        });
        (drained, op.await.0)
    });
    assert_eq!(forced_async, -libc::EACCES);
    assert_eq!(fixed, 0);
}

#[test]
fn an_eventfd_reader_keeps_one_read_outstanding_across_dropped_futures() {
    use std::sync::Arc;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let ex = Executor::new(8).expect("executor");
    let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let reader = Rc::new(super::EventFdReader::new(fd.clone()));
    let (ex2, r2, fd2) = (ex.clone(), reader.clone(), fd.clone());
    let got = block_on(&ex, async move {
        // Start a read and drop its future before the counter moves.
        {
            let mut first = Box::pin(r2.read(&ex2));
            let waker = std::task::Waker::noop();
            let mut cx = std::task::Context::from_waker(waker);
            assert!(first.as_mut().poll(&mut cx).is_pending());
        }
        assert!(r2.armed());
        fd2.write(5).unwrap();
        let a = r2.read(&ex2).await.unwrap();
        fd2.write(3).unwrap();
        let b = r2.read(&ex2).await.unwrap();
        (a, b)
    });
    assert_eq!(got, (5, 3));
    assert!(!reader.armed());
}

fn tempfile_with(data: &[u8]) -> std::fs::File {
    use std::io::Write;
    let path = std::env::temp_dir().join(format!(
        "ringvm-exec-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f.write_all(data).unwrap();
    f
}

#[test]
fn the_adaptive_window_grows_while_polling_would_have_caught_the_work_and_shrinks_when_not() {
    use std::time::Duration;
    let us = Duration::from_micros;
    let ceiling = us(64);
    // From nothing: the first window, then doubling, up to the ceiling.
    assert_eq!(
        super::next_window(us(0), us(10), ceiling),
        super::ADAPTIVE_START
    );
    assert_eq!(super::next_window(us(8), us(20), ceiling), us(16));
    assert_eq!(super::next_window(us(32), us(30), ceiling), us(64));
    assert_eq!(super::next_window(us(64), us(0), ceiling), us(64));
    // Work later than the ceiling: halve, and below the first window stop.
    assert_eq!(super::next_window(us(64), us(100), ceiling), us(32));
    assert_eq!(super::next_window(us(4), us(100), ceiling), us(0));
    assert_eq!(super::next_window(us(0), us(100), ceiling), us(0));
    // In between (caught by neither the window nor the ceiling): keep.
    assert_eq!(super::next_window(us(32), us(40), ceiling), us(32));
}

/// Work that comes back quickly (an eventfd written again and again from
/// another thread, well inside a generous ceiling) makes the window grow
/// and polls catch it; work far apart (gaps longer than the ceiling)
/// leaves the window at zero: an idle device does not spin.
#[test]
fn an_adaptive_executor_polls_for_close_work_and_not_for_sparse_work() {
    use std::sync::Arc;
    use std::time::Duration;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let run = |ceiling: Duration, gap: Duration, n: u64| {
        let ex = Executor::new(8).expect("executor");
        ex.set_poll(ceiling, super::PollWhen::Adaptive);
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let writer = {
            let fd = fd.clone();
            std::thread::spawn(move || {
                for _ in 0..n {
                    std::thread::sleep(gap);
                    fd.write(1).unwrap();
                }
            })
        };
        let reader = Rc::new(super::EventFdReader::new(fd));
        let (ex2, r2) = (ex.clone(), reader.clone());
        block_on(&ex, async move {
            let mut seen = 0;
            while seen < n {
                seen += r2.read(&ex2).await.unwrap();
            }
        });
        writer.join().unwrap();
        ex.stats().snapshot()
    };
    let close = run(Duration::from_millis(500), Duration::from_micros(200), 200);
    assert!(close.poll_hits > 0, "{close:?}");
    assert!(close.poll_window_ns > 0, "{close:?}");
    let sparse = run(Duration::from_micros(200), Duration::from_millis(20), 10);
    assert_eq!(sparse.poll_hits, 0, "{sparse:?}");
    assert_eq!(sparse.poll_window_ns, 0, "{sparse:?}");
}
