//! virtio-net through the virtio-pci transport on a real KVM VM, over a
//! real TAP in a network namespace of its own (each test thread unshares
//! one, so no frame leaves it). The host side of the TAP is an AF_PACKET
//! socket: what it sends the guest receives, and what the guest sends it
//! reads.

mod driver;
mod tap;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use driver::{Driver, TestVm};
use uring_backend::iothread::IoThread;
use virtio::device::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};

use tap::*;

#[test]
fn virtio_net_keeps_the_device_contract() {
    if !usable() {
        return;
    }
    let threads = vec![Arc::new(IoThread::spawn("net-contract", 64).unwrap())];
    let (dev, _, _) = device("ip=10.9.0.1,mask=255.255.255.0,queues=2", &threads);
    let vm = TestVm::new();
    let mut drv = Driver::new(&vm, Box::new(dev));
    drv.init_all().expect("activation");
    drv.reset();
    drv.init_all().expect("re-activation");
    drv.scribble();
    drv.reset();
    drv.init_all().expect("activation after garbage");
    drv.reset();
}

#[test]
fn frames_cross_the_tap_both_ways_and_the_filter_and_bad_chains_behave() {
    if !usable() {
        return;
    }
    let threads = vec![Arc::new(IoThread::spawn("net-io", 64).unwrap())];
    let (dev, tap, stats) = device(
        "ip=10.9.1.1,mask=255.255.255.0,mac=52:54:00:aa:bb:01",
        &threads,
    );
    let vm = TestVm::new();
    let mut drv = Driver::new(&vm, Box::new(dev));
    let all = drv.device_features();
    assert_eq!(all & F_MQ, 0, "one queue pair: no MQ");
    // Without MRG_RXBUF each frame lands in one buffer.
    drv.init(all & !F_MRG).unwrap();
    let wire = Wire::open(&tap);

    // Guest to host.
    let out = frame([0xff; 6], GUEST_MAC, b"hello from the guest");
    assert_eq!(guest_send(&mut drv, 1, &out), 0);
    assert_eq!(wire.recv_ours(25).expect("the host saw the frame"), out);

    // Host to guest.
    post_rx(&mut drv, 0, 8, 0x1_0000);
    let inbound = frame(GUEST_MAC, [0x52, 0x54, 0, 0, 0, 9], &[0x5a; 300]);
    wire.send(&inbound);
    let (nbuf, got) = guest_recv(&mut drv, 0).expect("the guest got the frame");
    assert_eq!((nbuf, got), (1, inbound.clone()));

    // The MAC filter: no promiscuous mode, empty tables.
    assert_eq!(ctrl(&mut drv, 2, &[0, 0, 0]), 0, "PROMISC off");
    assert_eq!(ctrl(&mut drv, 2, &[0, 1, 0]), 0, "ALLMULTI off");
    assert_eq!(
        ctrl(&mut drv, 2, &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        0,
        "empty MAC tables"
    );
    assert_eq!(ctrl(&mut drv, 2, &[9, 9]), 1, "unknown class refused");
    assert_eq!(ctrl(&mut drv, 2, &[4, 0, 2, 0]), 1, "MQ not negotiated");
    let stranger = frame(
        [0x52, 0x54, 0, 9, 9, 9],
        [0x52, 0, 0, 0, 0, 2],
        b"not yours",
    );
    let mine = frame(GUEST_MAC, [0x52, 0, 0, 0, 0, 2], b"yours");
    wire.send(&stranger);
    wire.send(&mine);
    let (_, got) = guest_recv(&mut drv, 0).expect("own frame arrives");
    assert_eq!(got, mine, "the stranger's frame was filtered");
    assert!(stats.rx_filtered.load(Ordering::Relaxed) >= 1);

    // A receive chain the device may not write (a driver bug): returned
    // unused and counted; frames keep arriving.
    drv.post(0, 8, &[(RX_BUF + 8 * 0x1_0000, 2048, false)]);
    let after_bad = frame(GUEST_MAC, [0x52, 0, 0, 0, 0, 2], b"after a bad RX chain");
    wire.send(&after_bad);
    let (_, got) = guest_recv(&mut drv, 0).expect("RX goes on");
    assert_eq!(got, after_bad);
    assert_eq!(stats.rx_bad_chains.load(Ordering::Relaxed), 1);

    // Bad TX chains: device-writable buffers, a runt, a giant; each is
    // dropped and counted, and the queue keeps working.
    let mem = drv.memory().clone();
    drv.post(1, 0, &[(TX_BUF, 100, true)]);
    assert_eq!(drv.wait_used(1, Duration::from_secs(10)).unwrap().1, 0);
    drv.post(1, 0, &[(TX_BUF, 20, false)]);
    assert_eq!(drv.wait_used(1, Duration::from_secs(10)).unwrap().1, 0);
    drv.post(1, 0, &[(TX_BUF, 0x2_0000, false)]);
    assert_eq!(drv.wait_used(1, Duration::from_secs(10)).unwrap().1, 0);
    drv.post(1, 0, &[(0xffff_0000, 64, false)]);
    assert_eq!(drv.wait_used(1, Duration::from_secs(10)).unwrap().1, 0);
    assert!(stats.tx_dropped.load(Ordering::Relaxed) >= 4);
    let again = frame([0xff; 6], GUEST_MAC, b"still alive");
    mem.write_slice(&[0u8; 12], GuestAddress(TX_BUF)).unwrap();
    assert_eq!(guest_send(&mut drv, 1, &again), 0);
    assert_eq!(
        wire.recv_ours(25).expect("TX works after bad chains"),
        again
    );

    // Reset and start again: frames still flow.
    drv.reset();
    drv.init(all).unwrap();
    post_rx(&mut drv, 0, 8, 0x1_0000);
    let after = frame(
        GUEST_MAC,
        [0x52, 0, 0, 0, 0, 3],
        b"after reset, with MRG_RXBUF",
    );
    wire.send(&after);
    let (nbuf, got) = guest_recv(&mut drv, 0).expect("RX after reset");
    assert_eq!((nbuf, got), (1, after));
}

#[test]
fn two_queue_pairs_serve_both_tap_queues() {
    if !usable() {
        return;
    }
    let threads = vec![Arc::new(IoThread::spawn("net-mq", 64).unwrap())];
    let (dev, tap, stats) = device(
        "ip=10.9.2.1,mask=255.255.255.0,mac=52:54:00:aa:bb:01,queues=2",
        &threads,
    );
    let vm = TestVm::new();
    let mut drv = Driver::new(&vm, Box::new(dev));
    let all = drv.device_features();
    assert_ne!(all & F_MQ, 0, "MQ offered");
    drv.init(all).unwrap();
    assert_eq!(ctrl(&mut drv, 4, &[4, 0, 3, 0]), 1, "3 pairs refused");
    assert_eq!(ctrl(&mut drv, 4, &[4, 0, 2, 0]), 0, "2 pairs");
    let wire = Wire::open(&tap);
    for q in [1u16, 3] {
        let f = frame(
            [0xff; 6],
            GUEST_MAC,
            format!("from TX queue {q}").as_bytes(),
        );
        assert_eq!(guest_send(&mut drv, q, &f), 0);
        assert_eq!(wire.recv_ours(25).expect("frame from each TX queue"), f);
    }
    assert_eq!(stats.tx_packets.load(Ordering::Relaxed), 2);
}

#[test]
fn a_deleted_tap_is_survived() {
    if !usable() {
        return;
    }
    let threads = vec![Arc::new(IoThread::spawn("net-gone", 64).unwrap())];
    let (dev, tap, stats) = device("ip=10.9.3.1,mask=255.255.255.0", &threads);
    let vm = TestVm::new();
    let mut drv = Driver::new(&vm, Box::new(dev));
    drv.init_all().unwrap();
    post_rx(&mut drv, 0, 8, 0x1_0000);
    let ok = std::process::Command::new("ip")
        .args(["link", "del", &tap])
        .status()
        .unwrap();
    assert!(ok.success());
    let f = frame([0xff; 6], GUEST_MAC, b"into the void");
    for _ in 0..3 {
        assert_eq!(guest_send(&mut drv, 1, &f), 0, "TX completes, dropped");
    }
    assert!(stats.tx_errors.load(Ordering::Relaxed) >= 1);
    // The device still resets and restarts.
    drv.reset();
    drv.init_all().unwrap();
    drv.reset();
}

#[test]
fn the_device_describes_itself() {
    if !usable() {
        return;
    }
    let threads = vec![Arc::new(IoThread::spawn("net-desc", 64).unwrap())];
    let (dev, _, _) = device(
        "ip=10.9.4.1,mask=255.255.255.0,mac=52:54:00:aa:bb:01,queues=4",
        &threads,
    );
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes().len(), 9);
    let mut cfg = [0u8; 10];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 4, "max pairs");
}
