//! The device seen by a client over a real socket: the `vfio_user`
//! crate's `Client` for well-formed sessions, a raw client where replies
//! are malformed on purpose.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::Client;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

use super::*;

const TRIGGER_FDS: u32 = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
const MSIX_INDEX: u32 = 2;
const MSI_INDEX: u32 = 1;

struct Fixture {
    _dir: TempDir,
    path: PathBuf,
    dev: TestDevice,
}

fn start(behaviour: Behaviour) -> Fixture {
    let dir = TempDir::new_with_prefix("/tmp/ringvm-testdev-").expect("temp dir");
    let path = dir.as_path().join("dev.sock");
    let dev = spawn(&path, behaviour).expect("spawn");
    Fixture {
        _dir: dir,
        path,
        dev,
    }
}

fn read32(c: &mut Client, region: u32, off: u64) -> u32 {
    let mut b = [0; 4];
    c.region_read(region, off, &mut b).expect("region read");
    u32::from_le_bytes(b)
}

fn write32(c: &mut Client, region: u32, off: u64, v: u32) {
    c.region_write(region, off, &v.to_le_bytes())
        .expect("region write");
}

fn config(c: &mut Client) -> [u8; 256] {
    let mut cfg = [0; 256];
    c.region_read(7, 0, &mut cfg).expect("config read");
    cfg
}

/// The capability chain as `(offset, id)`, at most `limit` entries.
fn chain(cfg: &[u8; 256], limit: usize) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    let mut at = cfg[0x34];
    while at != 0 && out.len() < limit {
        out.push((at, cfg[usize::from(at)]));
        at = cfg[usize::from(at) + 1];
    }
    out
}

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create reads the NUL-terminated name; the result is
    // checked before use.
    let fd = unsafe { libc::memfd_create(c"test-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: a new descriptor nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("memfd size");
    f
}

fn eventfds(n: usize) -> Vec<EventFd> {
    (0..n)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .collect()
}

fn fired(e: &EventFd) -> u64 {
    e.read().unwrap_or(0)
}

#[test]
fn regions_and_irq_indices() {
    let f = start(Behaviour::Good);
    let c = Client::new(&f.path).expect("client");
    let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    let bar0 = c.region(0).expect("BAR0");
    assert_eq!((bar0.size, bar0.flags & rw), (BAR0_SIZE, rw));
    assert!(bar0.file_offset.is_none() && bar0.sparse_areas.is_empty());
    let bar2 = c.region(2).expect("BAR2");
    assert_eq!(bar2.size, BAR2_SIZE);
    assert_ne!(bar2.flags & VFIO_REGION_INFO_FLAG_MMAP, 0);
    assert!(bar2.file_offset.is_some(), "BAR2 comes with its memfd");
    assert_eq!(bar2.sparse_areas.len(), 1);
    assert_eq!(
        (bar2.sparse_areas[0].offset, bar2.sparse_areas[0].size),
        (0, BAR2_MMAP_SIZE)
    );
    assert_eq!(c.region(7).expect("config").size, CONFIG_SIZE);
    for i in [1, 3, 4, 5, 6, 8] {
        assert_eq!(c.region(i).expect("region").size, 0, "region {i}");
    }
    let mut c = c;
    let counts: Vec<u32> = (0..5)
        .map(|i| c.get_irq_info(i).expect("irq info").count)
        .collect();
    assert_eq!(counts, [1, 1, 8, 0, 0]);
}

#[test]
fn config_space_identity_and_capabilities() {
    let f = start(Behaviour::Good);
    let mut c = Client::new(&f.path).expect("client");
    let cfg = config(&mut c);
    let dword = |o: usize| u32::from_le_bytes([cfg[o], cfg[o + 1], cfg[o + 2], cfg[o + 3]]);
    assert_eq!(dword(0), 0x7256_1234);
    assert_eq!(dword(0x08), 0xff00_0001);
    assert_eq!(dword(0x2c), 0x0001_1234);
    assert_ne!(dword(0x04) & (1 << 20), 0, "capability list bit");
    assert_eq!(
        chain(&cfg, 16),
        [(0x40, 0x11), (0x50, 0x05), (0x70, 0x10), (0x60, 0x09)]
    );
    // MSI-X: 8 vectors, table at BAR2 0x2000, PBA at BAR2 0x3000.
    assert_eq!(dword(0x40) >> 16, 7);
    assert_eq!((dword(0x44), dword(0x48)), (0x2002, 0x3002));
    // MSI: 64-bit, one vector.
    assert_eq!(dword(0x50) >> 16, 0x80);
    assert_eq!(&cfg[0x62..0x66], b"\x08RVM");
    // The command register takes memory space and bus master.
    write32(&mut c, 7, 0x04, 0x6);
    assert_eq!(read32(&mut c, 7, 0x04) & 0xffff, 0x6);
}

#[test]
fn bar2_window_is_shared_with_the_client() {
    let f = start(Behaviour::Good);
    let mut c = Client::new(&f.path).expect("client");
    let fo = c
        .region(2)
        .and_then(|r| r.file_offset.as_ref())
        .expect("fd");
    let file = fo.file().try_clone().expect("dup");
    let start = fo.start();
    let len = BAR2_MMAP_SIZE as usize;
    // SAFETY: a new shared mapping of the window, unmapped below; the
    // device accesses the memfd only with pread/pwrite.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            start as libc::off_t,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let words = addr.cast::<u32>();
    // SAFETY: offset 0x100 is inside the mapping and 4-byte aligned.
    unsafe { words.add(0x40).write_volatile(0x1234_5678) };
    write32(&mut c, 0, reg::PEEK_OFFSET, 0x100);
    assert_eq!(read32(&mut c, 0, reg::PEEK_VALUE), 0x1234_5678);
    // PEEK_OFFSET is masked to the window.
    write32(&mut c, 0, reg::PEEK_OFFSET, 0xffff_ffff);
    assert_eq!(read32(&mut c, 0, reg::PEEK_OFFSET), 0x1ffc);
    // Region writes land in the same memory.
    write32(&mut c, 2, 0x200, 0xfeed_f00d);
    // SAFETY: offset 0x200 is inside the mapping and aligned.
    assert_eq!(unsafe { words.add(0x80).read_volatile() }, 0xfeed_f00d);
    assert_eq!(read32(&mut c, 2, 0x100), 0x1234_5678);
    // SAFETY: the mapping made above; nothing refers to it any more.
    unsafe { libc::munmap(addr, len) };
    assert_eq!(read32(&mut c, 0, reg::ID), ID_VALUE);
}

#[test]
fn doorbell_signals_the_vector_eventfd() {
    let f = start(Behaviour::Good);
    let mut c = Client::new(&f.path).expect("client");
    let efds = eventfds(8);
    let raw: Vec<i32> = efds.iter().map(|e| e.as_raw_fd()).collect();
    c.set_irqs(MSIX_INDEX, TRIGGER_FDS, 0, 8, &raw)
        .expect("set irqs");
    assert_eq!(f.dev.stats().irq_fds, [0, 0, 8, 0, 0]);

    write32(&mut c, 0, reg::DOORBELL, 3);
    let got: Vec<u64> = efds.iter().map(fired).collect();
    assert_eq!(got, [0, 0, 0, 1, 0, 0, 0, 0]);
    // Vectors past the table are ignored and not counted.
    write32(&mut c, 0, reg::DOORBELL, 8);
    assert_eq!(read32(&mut c, 0, reg::IRQ_COUNT), 1);
    let s = f.dev.stats();
    assert_eq!((s.doorbells, s.interrupts), (1, 1));

    // Masked: pending in the PBA instead of a signal.
    c.set_irqs(
        MSIX_INDEX,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_MASK,
        5,
        1,
        &[],
    )
    .expect("mask");
    write32(&mut c, 0, reg::DOORBELL, 5);
    assert_eq!(fired(&efds[5]), 0);
    assert_eq!(read32(&mut c, 2, MSIX_PBA_OFFSET), 1 << 5);
    // Unmasking delivers it once and clears the bit.
    let unmask = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK;
    c.set_irqs(MSIX_INDEX, unmask, 5, 1, &[]).expect("unmask");
    assert_eq!(fired(&efds[5]), 1);
    assert_eq!(read32(&mut c, 2, MSIX_PBA_OFFSET), 0);
    c.set_irqs(MSIX_INDEX, unmask, 5, 1, &[]).expect("unmask");
    assert_eq!(fired(&efds[5]), 0);

    // A loopback trigger without data fires a vector.
    c.set_irqs(
        MSIX_INDEX,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        6,
        1,
        &[],
    )
    .expect("trigger");
    assert_eq!(fired(&efds[6]), 1);

    // Out-of-range vectors are refused and change nothing.
    let more = eventfds(9);
    let raw9: Vec<i32> = more.iter().map(|e| e.as_raw_fd()).collect();
    c.set_irqs(MSIX_INDEX, TRIGGER_FDS, 0, 9, &raw9)
        .expect("reply");
    write32(&mut c, 0, reg::DOORBELL, 0);
    assert_eq!((fired(&efds[0]), fired(&more[0])), (1, 0));

    // MSI-X off, MSI on: doorbell 0 signals the MSI eventfd.
    c.set_irqs(
        MSIX_INDEX,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        0,
        &[],
    )
    .expect("disable");
    let msi = eventfds(1);
    c.set_irqs(MSI_INDEX, TRIGGER_FDS, 0, 1, &[msi[0].as_raw_fd()])
        .expect("msi");
    assert_eq!(f.dev.stats().irq_fds, [0, 1, 0, 0, 0]);
    write32(&mut c, 0, reg::DOORBELL, 0);
    assert_eq!(fired(&msi[0]), 1);
    assert_eq!(read32(&mut c, 0, reg::IRQ_COUNT), 4);
}

const INTX_INDEX: u32 = 0;

/// Waits (bounded) for the eventfd to be signalled; its count, or 0.
fn fired_soon(e: &EventFd) -> u64 {
    for _ in 0..500 {
        if let Ok(n) = e.read() {
            return n;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    0
}

#[test]
fn intx_is_level_triggered_with_automask_and_unmask() {
    let f = start(Behaviour::Good);
    let mut c = Client::new(&f.path).expect("client");
    let trigger = eventfds(1).remove(0);
    let unmask = eventfds(1).remove(0);
    let level = |c: &mut Client, on: bool| write32(c, 0, reg::INTX, u32::from(on));
    // Asserted before there is an eventfd: nothing to signal yet; the
    // trigger eventfd then gets it at once, and INTx masks itself.
    level(&mut c, true);
    c.set_irqs(INTX_INDEX, TRIGGER_FDS, 0, 1, &[trigger.as_raw_fd()])
        .expect("trigger");
    assert_eq!(fired(&trigger), 1);
    assert_eq!(
        read32(&mut c, 0, reg::INTX),
        reg::INTX_ASSERTED | reg::INTX_MASKED
    );
    // Masked: deassert and assert again, no signal.
    level(&mut c, false);
    level(&mut c, true);
    assert_eq!(fired(&trigger), 0);
    // Unmasking with DATA_NONE signals again: the line is still high.
    let unmask_none = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK;
    c.set_irqs(INTX_INDEX, unmask_none, 0, 1, &[])
        .expect("unmask");
    assert_eq!(fired(&trigger), 1);

    // The unmask eventfd: stored (it counts as held), then each write
    // unmasks; a deasserted line stays quiet until asserted again.
    let unmask_fd = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK;
    c.set_irqs(INTX_INDEX, unmask_fd, 0, 1, &[unmask.as_raw_fd()])
        .expect("unmask eventfd");
    assert_eq!(f.dev.stats().irq_fds, [2, 0, 0, 0, 0]);
    level(&mut c, false);
    unmask.write(1).unwrap();
    let s = f
        .dev
        .wait_stats(Duration::from_secs(5), |s| s.intx_unmasks == 1);
    assert_eq!(s.intx_unmasks, 1, "{s:?}");
    assert_eq!(read32(&mut c, 0, reg::INTX), 0, "low and unmasked");
    assert_eq!(fired(&trigger), 0);
    level(&mut c, true);
    assert_eq!(fired(&trigger), 1);
    // Still high at the unmask: signalled again, from the watcher.
    unmask.write(1).unwrap();
    assert_eq!(fired_soon(&trigger), 1);
    let s = f.dev.stats();
    assert_eq!((s.intx_signals, s.intx_unmasks), (4, 2), "{s:?}");

    // Refused: two eventfds for one line, an eventfd with MASK.
    let two = eventfds(2);
    let raw: Vec<i32> = two.iter().map(|e| e.as_raw_fd()).collect();
    c.set_irqs(INTX_INDEX, unmask_fd, 0, 2, &raw)
        .expect("reply");
    let mask_fd = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_MASK;
    c.set_irqs(INTX_INDEX, mask_fd, 0, 1, &raw[..1])
        .expect("reply");
    assert_eq!(f.dev.stats().irq_fds[0], 2);

    // Disabled: both eventfds go; reset deasserts the line.
    c.set_irqs(
        INTX_INDEX,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        0,
        &[],
    )
    .expect("disable");
    assert_eq!(f.dev.stats().irq_fds[0], 0);
    unmask.write(1).unwrap();
    c.reset().expect("reset");
    assert_eq!(read32(&mut c, 0, reg::INTX), 0);
}

fn dma(c: &mut Client, src: u64, dst: u64, len: u32) -> u32 {
    c.region_write(0, reg::DMA_SRC_LO, &src.to_le_bytes())
        .expect("src");
    c.region_write(0, reg::DMA_DST_LO, &dst.to_le_bytes())
        .expect("dst");
    write32(c, 0, reg::DMA_LEN, len);
    write32(c, 0, reg::DMA_CMD, reg::DMA_CMD_COPY);
    read32(c, 0, reg::DMA_STATUS)
}

#[test]
fn dma_copies_between_mapped_guest_ranges() {
    let f = start(Behaviour::Good);
    let mut c = Client::new(&f.path).expect("client");
    // Two "guest RAM" ranges: A at IOVA 1 MiB, B at IOVA 4 MiB taken from
    // offset 8 KiB of its memfd.
    let a = memfd(0x10000);
    let b = memfd(0x12000);
    c.dma_map(0, 0x10_0000, 0x10000, a.as_raw_fd())
        .expect("map A");
    c.dma_map(0x2000, 0x40_0000, 0x10000, b.as_raw_fd())
        .expect("map B");
    let pattern: Vec<u8> = (0..0x2000u32).map(|i| (i * 7 + 3) as u8).collect();
    a.write_all_at(&pattern, 0x80).expect("fill A");

    assert_eq!(dma(&mut c, 0x10_0080, 0x40_1000, 0x2000), reg::DMA_DONE);
    let mut got = vec![0; 0x2000];
    b.read_exact_at(&mut got, 0x3000).expect("read B");
    assert_eq!(got, pattern);
    let s = f.dev.stats();
    assert_eq!((s.dma_maps, s.dma_mappings, s.dma_copies), (2, 2, 1));

    // Outside every mapping, straddling two, or too long: status 2.
    assert_eq!(dma(&mut c, 0x20_0000, 0x40_0000, 16), reg::DMA_ERROR);
    assert_eq!(dma(&mut c, 0x10_fff0, 0x40_0000, 32), reg::DMA_ERROR);
    assert_eq!(
        dma(&mut c, 0x10_0000, 0x40_0000, DMA_MAX_LEN + 1),
        reg::DMA_ERROR
    );
    assert_eq!(f.dev.stats().dma_errors, 3);

    // A range past the end of its file is refused (no SIGBUS later).
    c.dma_map(0x10000, 0x80_0000, 0x4000, b.as_raw_fd())
        .expect("reply");
    assert_eq!(f.dev.stats().dma_mappings, 2);
    assert_eq!(dma(&mut c, 0x80_0000, 0x40_0000, 16), reg::DMA_ERROR);

    c.dma_unmap(0x10_0000, 0x10000).expect("unmap A");
    let s = f.dev.stats();
    assert_eq!((s.dma_unmaps, s.dma_mappings), (1, 1));
    assert_eq!(dma(&mut c, 0x10_0080, 0x40_1000, 16), reg::DMA_ERROR);
    // Copies inside B still work.
    assert_eq!(dma(&mut c, 0x40_1000, 0x40_8000, 0x2000), reg::DMA_DONE);
    b.read_exact_at(&mut got, 0xa000).expect("read B");
    assert_eq!(got, pattern);
}

#[test]
fn reset_clears_registers_window_and_command() {
    let f = start(Behaviour::Good);
    let mut c = Client::new(&f.path).expect("client");
    write32(&mut c, 0, reg::DMA_LEN, 64);
    write32(&mut c, 0, reg::DOORBELL, 0);
    write32(&mut c, 2, 0x100, 0xabcd);
    write32(&mut c, 7, 0x04, 0x6);
    c.reset().expect("reset");
    assert_eq!(read32(&mut c, 0, reg::DMA_LEN), 0);
    assert_eq!(read32(&mut c, 0, reg::IRQ_COUNT), 0);
    assert_eq!(read32(&mut c, 2, 0x100), 0);
    assert_eq!(read32(&mut c, 7, 0x04) & 0xffff, 0);
    assert_eq!(read32(&mut c, 0, reg::ID), ID_VALUE);
    assert_eq!(f.dev.stats().resets, 1);
}

#[test]
fn serves_clients_one_after_another_and_releases_their_resources() {
    let f = start(Behaviour::Good);
    {
        let mut c = Client::new(&f.path).expect("first client");
        let ram = memfd(0x1000);
        c.dma_map(0, 0, 0x1000, ram.as_raw_fd()).expect("map");
        let e = eventfds(1);
        c.set_irqs(MSIX_INDEX, TRIGGER_FDS, 0, 1, &[e[0].as_raw_fd()])
            .expect("irq");
        let s = f.dev.stats();
        assert_eq!((s.dma_mappings, s.irq_fds[2]), (1, 1));
    }
    let s = f
        .dev
        .wait_stats(Duration::from_secs(10), |s| s.sessions_ended == 1);
    assert_eq!(
        (s.sessions_ended, s.dma_mappings, s.irq_fds),
        (1, 0, [0; 5])
    );
    let mut c = Client::new(&f.path).expect("second client");
    assert_eq!(read32(&mut c, 0, reg::ID), ID_VALUE);
    assert_eq!(f.dev.stats().clients, 2);
}

#[test]
fn drop_ends_a_session_in_progress_and_removes_the_socket() {
    let f = start(Behaviour::Good);
    let mut c = Client::new(&f.path).expect("client");
    assert_eq!(read32(&mut c, 0, reg::ID), ID_VALUE);
    let path = f.path.clone();
    drop(f.dev);
    assert!(!path.exists());
    let mut b = [0; 4];
    assert!(c.region_read(0, 0, &mut b).is_err());
}

#[test]
fn spawn_refuses_an_existing_path() {
    let f = start(Behaviour::Good);
    assert!(matches!(
        spawn(&f.path, Behaviour::Good),
        Err(Error::SocketExists { .. })
    ));
}

#[test]
fn bad_bar_size_is_reported() {
    let f = start(Behaviour::BadBarSize);
    let c = Client::new(&f.path).expect("client");
    let size = c.region(0).expect("BAR0").size;
    assert_eq!(size, BAD_BAR0_SIZE);
    assert!(!size.is_power_of_two());
}

#[test]
fn cap_loop_revisits_the_first_capability() {
    let f = start(Behaviour::CapLoop);
    let mut c = Client::new(&f.path).expect("client");
    let caps = chain(&config(&mut c), 8);
    assert_eq!(caps.len(), 8);
    assert_eq!(caps[4], (0x40, 0x11));
}

/// A client that speaks the wire format itself.
struct Raw {
    s: UnixStream,
    id: u16,
}

/// A reply: `(message_id, command, flags, body)`.
type Reply = (u16, u16, u32, Vec<u8>);

impl Raw {
    fn connect(f: &Fixture) -> Raw {
        let s = UnixStream::connect(&f.path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Raw { s, id: 0 }
    }

    fn send(&mut self, command: u16, body: &[u8]) {
        self.id += 1;
        let mut m = Vec::new();
        m.extend_from_slice(&self.id.to_le_bytes());
        m.extend_from_slice(&command.to_le_bytes());
        m.extend_from_slice(&(16 + body.len() as u32).to_le_bytes());
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(body);
        // The device may already have hung up.
        let _ = self.s.write_all(&m);
    }

    /// The next reply, or None when the device hung up (end of stream, or
    /// a reset because our last message was left unread).
    fn recv(&mut self) -> Option<Reply> {
        let mut h = [0u8; 16];
        let n = match self.s.read(&mut h) {
            Ok(0) => return None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            r => r.expect("read"),
        };
        self.s.read_exact(&mut h[n..]).expect("header");
        let size = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let mut body = vec![0; size.saturating_sub(16).min(1 << 20)];
        self.s.read_exact(&mut body).expect("body");
        Some((
            u16::from_le_bytes([h[0], h[1]]),
            u16::from_le_bytes([h[2], h[3]]),
            u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
            body,
        ))
    }

    fn version(&mut self) -> Option<Reply> {
        let mut body = vec![0, 0, 1, 0];
        body.extend_from_slice(b"{\"capabilities\":{}}\0");
        self.send(1, &body);
        self.recv()
    }

    fn send_get_info(&mut self) {
        let mut body = 16u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 12]);
        self.send(4, &body);
    }

    fn get_info(&mut self) -> Option<Reply> {
        self.send_get_info();
        self.recv()
    }

    fn region_read(&mut self, region: u32, offset: u64, count: u32) -> Option<Reply> {
        let mut body = offset.to_le_bytes().to_vec();
        body.extend_from_slice(&region.to_le_bytes());
        body.extend_from_slice(&count.to_le_bytes());
        self.send(9, &body);
        self.recv()
    }
}

#[test]
fn short_config_reads_carry_half_the_bytes() {
    let f = start(Behaviour::ShortConfigReads);
    let mut r = Raw::connect(&f);
    assert_eq!(r.version().expect("version").1, 1);
    let (_, cmd, flags, body) = r.region_read(7, 0, 4).expect("reply");
    assert_eq!((cmd, flags), (9, 1));
    assert_eq!(
        u32::from_le_bytes([body[12], body[13], body[14], body[15]]),
        2
    );
    assert_eq!(&body[16..], [0x34, 0x12]);
    // Other regions answer in full.
    let (_, _, _, body) = r.region_read(0, 0, 4).expect("reply");
    assert_eq!(&body[16..], ID_VALUE.to_le_bytes());
}

#[test]
fn garbage_replies_follow_the_version_handshake() {
    let f = start(Behaviour::GarbageReplies);
    let mut r = Raw::connect(&f);
    let (id, cmd, flags, _) = r.version().expect("version");
    assert_eq!((id, cmd, flags), (1, 1, 1));
    // The reply has the length of a DEVICE_GET_INFO reply (32 bytes), but
    // its header is noise (its message_size too, so read exactly 32).
    r.send_get_info();
    let mut reply = [0u8; 32];
    r.s.read_exact(&mut reply).expect("reply");
    let well_formed = reply[..4] == [2, 0, 4, 0] && reply[4..12] == [32, 0, 0, 0, 1, 0, 0, 0];
    assert!(!well_formed, "a well-formed reply: {reply:02x?}");
}

#[test]
fn disconnect_after_n_messages() {
    let f = start(Behaviour::DisconnectAfter(2));
    for _ in 0..2 {
        let mut r = Raw::connect(&f);
        assert_eq!(r.version().expect("version").1, 1);
        let (id, cmd, _, _) = r.get_info().expect("info");
        assert_eq!((id, cmd), (2, 4));
        assert!(r.region_read(7, 0, 4).is_none(), "third message answered");
    }
    assert_eq!(f.dev.stats().clients, 2);

    let f = start(Behaviour::DisconnectAfter(0));
    assert!(Raw::connect(&f).version().is_none());
    assert!(Client::new(&f.path).is_err());
}
