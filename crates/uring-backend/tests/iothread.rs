//! Iothreads: jobs, stopping, CPU time and counters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use uring_backend::iothread::IoThread;

#[test]
fn jobs_run_on_the_iothread_with_its_executor() {
    let t = IoThread::spawn("iot-jobs", 32).expect("spawn");
    assert_eq!(t.name(), "iot-jobs");
    let (tx, rx) = mpsc::channel();
    for i in 0..5 {
        let tx = tx.clone();
        assert!(t.run_on(Box::new(move |ex| {
            let name = std::thread::current().name().map(str::to_string);
            let ex2 = ex.clone();
            ex.spawn(async move {
                ex2.nop().await.expect("nop");
                tx.send((i, name)).expect("send");
            });
        })));
    }
    let mut got: Vec<(i32, Option<String>)> = (0..5).map(|_| rx.recv().expect("result")).collect();
    got.sort();
    for (i, (j, name)) in got.into_iter().enumerate() {
        assert_eq!(i as i32, j);
        assert_eq!(name.as_deref(), Some("iot-jobs"));
    }
    let stats = t.stats();
    assert!(stats.cqes_reaped >= 5, "{stats:?}");
    t.stop().expect("stop");
}

/// Sets its flag when dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn stop_joins_the_thread_after_dropping_its_tasks() {
    let t = IoThread::spawn("iot-stop", 8).expect("spawn");
    let dropped = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let flag = DropFlag(dropped.clone());
    t.run_on(Box::new(move |ex| {
        ex.spawn(async move {
            let _flag = flag;
            tx.send(()).expect("send");
            // Never finishes on its own.
            std::future::pending::<()>().await;
        });
    }));
    rx.recv().expect("task started");
    assert!(!dropped.load(Ordering::SeqCst));
    t.stop().expect("stop");
    assert!(
        dropped.load(Ordering::SeqCst),
        "the task outlived its iothread"
    );
}

#[test]
fn dropping_an_iothread_stops_it() {
    let t = IoThread::spawn("iot-drop", 8).expect("spawn");
    let (tx, rx) = mpsc::channel();
    t.run_on(Box::new(move |_| tx.send(()).expect("send")));
    rx.recv().expect("job ran");
    drop(t);
}

#[test]
fn cpu_time_grows_with_work_on_the_thread() {
    let t = IoThread::spawn("iot-cpu", 8).expect("spawn");
    let before = t.cpu_time();
    let (tx, rx) = mpsc::channel();
    t.run_on(Box::new(move |_| {
        // Burn at least 20 ms of this thread's CPU time.
        let start = thread_cpu();
        let mut x = 0u64;
        while thread_cpu() - start < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        tx.send(x).expect("send");
    }));
    rx.recv().expect("job ran");
    let after = t.cpu_time();
    assert!(
        after >= before + Duration::from_millis(20),
        "{before:?} -> {after:?}"
    );
    t.stop().expect("stop");
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[test]
fn iothreads_are_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<IoThread>();
    let t = Arc::new(IoThread::spawn("iot-shared", 8).expect("spawn"));
    let (tx, rx) = mpsc::channel();
    let senders: Vec<_> = (0..4)
        .map(|i| {
            let (t, tx) = (t.clone(), tx.clone());
            std::thread::spawn(move || {
                t.run_on(Box::new(move |_| tx.send(i).expect("send")));
            })
        })
        .collect();
    for s in senders {
        s.join().expect("sender");
    }
    let mut got: Vec<i32> = (0..4).map(|_| rx.recv().expect("job")).collect();
    got.sort();
    assert_eq!(got, vec![0, 1, 2, 3]);
}

/// With polling on, an iothread whose queue has gone quiet sleeps: over
/// 2 s with no work its CPU time stays near zero, in every polling mode,
/// after work close together has grown the adaptive window.
#[test]
fn an_idle_iothread_with_polling_on_uses_almost_no_cpu() {
    use uring_backend::executor::{EventFdReader, PollWhen};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    const KICKS: u64 = 100;
    for when in [PollWhen::Adaptive, PollWhen::Always, PollWhen::IoInFlight] {
        let t = IoThread::spawn("iot-idle", 8).expect("spawn");
        assert!(t.set_poll(Duration::from_millis(2), when));
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let (tx, rx) = mpsc::channel();
        let k = kick.clone();
        assert!(t.run_on(Box::new(move |ex| {
            let ex2 = ex.clone();
            ex.spawn(async move {
                // A queue's worker: one outstanding read of its kick.
                let reader = EventFdReader::new(k);
                let mut seen = 0;
                while let Ok(n) = reader.read(&ex2).await {
                    seen += n;
                    if seen == KICKS {
                        tx.send(()).expect("send");
                    }
                }
            });
        })));
        for _ in 0..KICKS {
            std::thread::sleep(Duration::from_micros(200));
            kick.write(1).expect("kick");
        }
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the worker saw every kick");
        let busy = t.stats();
        let before = t.cpu_time();
        std::thread::sleep(Duration::from_secs(2));
        let idle = t.cpu_time() - before;
        assert!(
            idle < Duration::from_millis(100),
            "{when:?}: {idle:?} of CPU in 2 s idle ({busy:?})"
        );
        if when == PollWhen::Adaptive {
            assert!(busy.poll_hits > 0, "{busy:?}");
            assert!(busy.poll_window_ns > 0, "{busy:?}");
        }
        t.stop().expect("stop");
    }
}
