//! The executor on a real io_uring.

mod common;

use std::cell::RefCell;
use std::os::fd::{FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use common::{block_on, TempFile};
use uring_backend::executor::yield_now;
use uring_backend::{Executor, IoBuf};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn pipe() -> (Rc<OwnedFd>, Rc<OwnedFd>) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 returned two new descriptors that we own.
    unsafe {
        (
            Rc::new(OwnedFd::from_raw_fd(fds[0])),
            Rc::new(OwnedFd::from_raw_fd(fds[1])),
        )
    }
}

#[test]
fn tasks_run_nops_and_one_enter_serves_a_whole_turn() {
    let ex = Executor::new(64).expect("executor");
    let log = Rc::new(RefCell::new(Vec::new()));
    let done = Rc::new(RefCell::new(0));
    for t in 0..3 {
        let (ex2, log, done) = (ex.clone(), log.clone(), done.clone());
        ex.spawn(async move {
            for i in 0..10 {
                ex2.nop().await.expect("nop");
                log.borrow_mut().push((t, i));
            }
            *done.borrow_mut() += 1;
            if *done.borrow() == 3 {
                ex2.stop();
            }
        });
    }
    let before = ex.stats().snapshot();
    ex.run().expect("run");
    let after = ex.stats().snapshot();
    assert_eq!(log.borrow().len(), 30);
    for t in 0..3 {
        let mine: Vec<i32> = log
            .borrow()
            .iter()
            .filter(|(tt, _)| *tt == t)
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(mine, (0..10).collect::<Vec<_>>());
    }
    assert!(after.cqes_reaped - before.cqes_reaped >= 30);
    assert!(after.sqes_submitted - before.sqes_submitted >= 30);
    // The three tasks' nops of a turn go to the kernel together.
    let enters = after.enters - before.enters;
    assert!(
        enters <= 12,
        "{enters} io_uring_enter calls for 10 rounds of 3 nops"
    );
    assert_eq!(ex.task_count(), 0);
}

#[test]
fn deferred_callbacks_run_after_the_turns_tasks_and_before_io() {
    let ex = Executor::new(8).expect("executor");
    let log = Rc::new(RefCell::new(Vec::<String>::new()));
    for name in ["a", "b"] {
        let (ex2, log2) = (ex.clone(), log.clone());
        ex.spawn(async move {
            log2.borrow_mut().push(name.to_string());
            let l = log2.clone();
            let ex3 = ex2.clone();
            ex2.defer(move || {
                l.borrow_mut().push(format!("defer-{name}"));
                let l2 = l.clone();
                // Deferred from a deferred callback: same phase.
                ex3.defer(move || l2.borrow_mut().push(format!("defer2-{name}")));
            });
            ex2.nop().await.expect("nop");
            log2.borrow_mut().push(format!("{name}-after-io"));
            if name == "b" {
                ex2.stop();
            }
        });
    }
    ex.run().expect("run");
    let log = log.borrow();
    let pos = |s: &str| {
        log.iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("{s} missing from {log:?}"))
    };
    for n in ["a", "b"] {
        assert!(
            pos(n) < pos("defer-a") && pos(n) < pos("defer-b"),
            "{log:?}"
        );
        assert!(pos(&format!("defer2-{n}")) < pos("a-after-io"), "{log:?}");
        assert!(pos(&format!("defer2-{n}")) < pos("b-after-io"), "{log:?}");
    }
}

#[test]
fn an_eventfd_write_from_another_thread_wakes_the_reading_task() {
    let ex = Executor::new(8).expect("executor");
    let efd = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let writer = {
        let efd = efd.clone();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            efd.write(5).expect("write eventfd");
        })
    };
    let ex2 = ex.clone();
    let value = block_on(&ex, async move { ex2.read_eventfd(efd).await });
    writer.join().expect("writer");
    assert_eq!(value.expect("read"), 5);
}

#[test]
fn a_waker_woken_from_another_thread_ends_the_ring_wait() {
    let ex = Executor::new(8).expect("executor");
    let slot: Arc<Mutex<Option<Waker>>> = Arc::new(Mutex::new(None));
    let flag = Arc::new(AtomicBool::new(false));
    let waker_thread = {
        let (slot, flag) = (slot.clone(), flag.clone());
        std::thread::spawn(move || loop {
            if let Some(w) = slot.lock().expect("lock").take() {
                flag.store(true, Ordering::SeqCst);
                w.wake();
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        })
    };
    let polls = block_on(&ex, {
        let flag = flag.clone();
        let mut polls = 0;
        std::future::poll_fn(move |cx| {
            polls += 1;
            if flag.load(Ordering::SeqCst) {
                return Poll::Ready(polls);
            }
            *slot.lock().expect("lock") = Some(cx.waker().clone());
            Poll::Pending
        })
    });
    waker_thread.join().expect("waker thread");
    assert!(polls >= 2);
}

#[test]
fn a_dropped_read_keeps_its_buffer_until_the_completion_arrives() {
    let ex = Executor::new(8).expect("executor");
    let (rd, wr) = pipe();
    let ex2 = ex.clone();
    let (freed_before_cqe, freed_after) = block_on(&ex, async move {
        let buf = Rc::new(IoBuf::new(4096));
        let weak = Rc::downgrade(&buf);
        let iov = vec![buf.iovec(0, 4096)];
        // Nothing is written to the pipe: the read stays in the kernel.
        let fut = ex2.readv(rd, 0, iov, Box::new(buf));
        ex2.nop().await.expect("nop"); // the read is now in the kernel
        assert_eq!(ex2.inflight(), 1);
        drop(fut);
        let freed_before_cqe = weak.upgrade().is_none();
        // The drop asked for a cancel; its completion frees the buffer.
        let mut turns = 0;
        while ex2.inflight() > 0 && turns < 1000 {
            ex2.nop().await.expect("nop");
            turns += 1;
        }
        (freed_before_cqe, weak.upgrade().is_none())
    });
    drop(wr);
    assert!(
        !freed_before_cqe,
        "the buffer was freed while the kernel owned it"
    );
    assert!(freed_after, "the buffer was never freed");
}

#[test]
fn a_read_dropped_before_submission_also_waits_for_its_completion() {
    let file = TempFile::new("/tmp", 8192);
    std::fs::write(file.path(), vec![7u8; 8192]).expect("fill");
    let f = Rc::new(std::fs::File::open(file.path()).expect("open"));
    let ex = Executor::new(8).expect("executor");
    let ex2 = ex.clone();
    let alive_after_drop = block_on(&ex, async move {
        let buf = Rc::new(IoBuf::new(8192));
        let weak = Rc::downgrade(&buf);
        let fut = ex2.readv(f, 0, vec![buf.iovec(0, 8192)], Box::new(buf));
        drop(fut); // queued, not yet submitted
        let alive = weak.upgrade().is_some();
        while ex2.inflight() > 0 {
            ex2.nop().await.expect("nop");
        }
        (alive, weak.upgrade().is_none())
    });
    assert_eq!(alive_after_drop, (true, true));
}

#[test]
fn iovecs_outside_the_keepalive_fail_with_efault() {
    let file = TempFile::new("/tmp", 4096);
    let f = Rc::new(std::fs::File::open(file.path()).expect("open"));
    let ex = Executor::new(8).expect("executor");
    let ex2 = ex.clone();
    let err = block_on(&ex, async move {
        let buf = Rc::new(IoBuf::new(4096));
        let other = IoBuf::new(4096);
        ex2.readv(f, 0, vec![other.iovec(0, 4096)], Box::new(buf))
            .await
    });
    assert_eq!(
        err.expect_err("must fail").raw_os_error(),
        Some(libc::EFAULT)
    );
}

#[test]
fn stop_from_a_task_returns_and_run_resumes_the_rest() {
    let ex = Executor::new(8).expect("executor");
    let steps = Rc::new(RefCell::new(Vec::new()));
    let (ex2, s) = (ex.clone(), steps.clone());
    ex.spawn(async move {
        s.borrow_mut().push(1);
        ex2.stop();
        yield_now().await;
        s.borrow_mut().push(2);
        ex2.stop();
    });
    ex.run().expect("first run");
    assert_eq!(*steps.borrow(), vec![1]);
    assert_eq!(ex.task_count(), 1);
    ex.run().expect("second run");
    assert_eq!(*steps.borrow(), vec![1, 2]);
    assert_eq!(ex.task_count(), 0);
}

#[test]
fn a_stop_handle_stops_an_idle_executor_from_another_thread() {
    let ex = Executor::new(8).expect("executor");
    let handle = ex.stop_handle();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(20));
        handle.stop();
    });
    ex.run().expect("run");
    t.join().expect("stopper");
}

#[test]
fn shutdown_drops_tasks_and_drains_reads_that_never_complete() {
    let ex = Executor::new(8).expect("executor");
    let (rd, _wr) = pipe();
    let buf = Rc::new(IoBuf::new(64));
    let weak = Rc::downgrade(&buf);
    let ex2 = ex.clone();
    ex.spawn(async move {
        let iov = vec![buf.iovec(0, 64)];
        let _ = ex2.readv(rd, 0, iov, Box::new(buf)).await;
        unreachable!("nothing is ever written to the pipe");
    });
    let ex3 = ex.clone();
    ex.spawn(async move {
        ex3.nop().await.expect("nop");
        ex3.stop();
    });
    ex.run().expect("run");
    assert_eq!(ex.inflight(), 1);
    assert!(weak.upgrade().is_some());
    ex.shutdown();
    assert_eq!(ex.task_count(), 0);
    assert_eq!(ex.inflight(), 0);
    assert!(weak.upgrade().is_none());
}

#[test]
fn fsync_and_fallocate_reach_the_file() {
    let file = TempFile::new("/tmp", 0);
    let f = Rc::new(
        std::fs::OpenOptions::new()
            .write(true)
            .open(file.path())
            .expect("open"),
    );
    let ex = Executor::new(8).expect("executor");
    let ex2 = ex.clone();
    block_on(&ex, async move {
        ex2.fallocate(f.clone(), 0, 0, 1 << 20)
            .await
            .expect("fallocate");
        ex2.fsync(f.clone(), false).await.expect("fsync");
        ex2.fsync(f, true).await.expect("fdatasync");
    });
    assert_eq!(std::fs::metadata(file.path()).expect("stat").len(), 1 << 20);
}

#[test]
fn a_task_that_keeps_yielding_does_not_starve_io() {
    let ex = Executor::new(8).expect("executor");
    let flag = Rc::new(std::cell::Cell::new(false));
    let (ex2, f) = (ex.clone(), flag.clone());
    ex.spawn(async move {
        while !f.get() {
            yield_now().await;
        }
        ex2.stop();
    });
    let (ex3, f) = (ex.clone(), flag.clone());
    ex.spawn(async move {
        ex3.nop().await.expect("nop");
        f.set(true);
    });
    ex.run().expect("run");
    assert!(flag.get());
}
