//! Tests that need the executor's internals.

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;

use io_uring::{opcode, types};

use super::Executor;

fn block_on<T: 'static>(ex: &Rc<Executor>, fut: impl Future<Output = T> + 'static) -> T {
    let out = Rc::new(RefCell::new(None));
    let (o, ex2) = (out.clone(), ex.clone());
    ex.spawn(async move {
        *o.borrow_mut() = Some(fut.await);
        ex2.stop();
    });
    ex.run().expect("run");
    let v = out.borrow_mut().take();
    v.expect("the task finished")
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
