//! Request parsing against virtio-queue's mock split queue.

use super::*;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const MEM_SIZE: u64 = 0x100_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn limits() -> RequestLimits {
    RequestLimits {
        capacity_sectors: 2048,
        readonly: false,
        discard: true,
        write_zeroes: true,
    }
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

fn parse_chain(
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    l: RequestLimits,
) -> Result<Request, (RequestError, Option<GuestAddress>)> {
    let vq = MockSplitQueue::new(mem, 16);
    let chain = vq.build_desc_chain(descs).unwrap();
    parse(chain, mem, &l)
}

#[test]
fn read_with_separate_header_data_and_status() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 8);
    let r = parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(0x20_0000, 4096, F_WRITE),
            d(0x30_0000, 1, F_WRITE),
        ],
        limits(),
    )
    .unwrap();
    assert_eq!(r.kind, RequestKind::Read);
    assert_eq!(r.sector, 8);
    assert_eq!(r.data, vec![(GuestAddress(0x20_0000), 4096)]);
    assert_eq!(r.status, GuestAddress(0x30_0000));
}

#[test]
fn write_with_header_and_data_in_one_descriptor_and_status_after_data() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 1);
    let r = parse_chain(
        &m,
        &[d(0x10_0000, 16 + 1024, 0), d(0x30_0000, 1, F_WRITE)],
        limits(),
    )
    .unwrap();
    assert_eq!(r.kind, RequestKind::Write);
    assert_eq!(r.data, vec![(GuestAddress(0x10_0010), 1024)]);
    assert_eq!(r.data_len, 1024);
}

#[test]
fn read_data_and_status_sharing_one_descriptor() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let r = parse_chain(
        &m,
        &[d(0x10_0000, 16, 0), d(0x20_0000, 513, F_WRITE)],
        limits(),
    )
    .unwrap();
    assert_eq!(r.data, vec![(GuestAddress(0x20_0000), 512)]);
    assert_eq!(r.status, GuestAddress(0x20_0200));
}

#[test]
fn header_split_across_descriptors() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0x1234 % 2048);
    m.write_slice(&[0u8; 8], GuestAddress(0x11_0000)).unwrap();
    // Move the second half of the header elsewhere.
    let mut tail = [0u8; 8];
    m.read_slice(&mut tail, GuestAddress(0x10_0008)).unwrap();
    m.write_slice(&tail, GuestAddress(0x11_0000)).unwrap();
    let r = parse_chain(
        &m,
        &[
            d(0x10_0000, 8, 0),
            d(0x11_0000, 8, 0),
            d(0x20_0000, 512, F_WRITE),
            d(0x30_0000, 1, F_WRITE),
        ],
        limits(),
    )
    .unwrap();
    assert_eq!(r.sector, 0x1234 % 2048);
}

#[test]
fn rejects_descriptor_chain_past_guest_memory() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let e = parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(MEM_SIZE - 256, 512, F_WRITE),
            d(0x30_0000, 1, F_WRITE),
        ],
        limits(),
    )
    .unwrap_err();
    assert_eq!(
        e.0,
        RequestError::OutsideGuestMemory {
            addr: MEM_SIZE - 256,
            len: 512
        }
    );
    assert_eq!(e.0.status(), VIRTIO_BLK_S_IOERR);
    assert_eq!(e.1, Some(GuestAddress(0x30_0000)), "status still reported");
}

#[test]
fn rejects_readable_after_writable() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let e = parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(0x20_0000, 512, F_WRITE),
            d(0x25_0000, 16, 0),
            d(0x30_0000, 1, F_WRITE),
        ],
        limits(),
    )
    .unwrap_err();
    assert_eq!(e.0, RequestError::WrongDirection);
    assert_eq!(e.1, Some(GuestAddress(0x30_0000)));
}

#[test]
fn rejects_chain_without_status_byte() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
    let e = parse_chain(&m, &[d(0x10_0000, 16, 0), d(0x20_0000, 512, 0)], limits()).unwrap_err();
    assert_eq!(e, (RequestError::NoStatus, None));
    let e = parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(0x20_0000, 512, 0),
            d(0x30_0000, 0, F_WRITE),
        ],
        limits(),
    )
    .unwrap_err();
    assert_eq!(e, (RequestError::NoStatus, None));
}

#[test]
fn rejects_short_header() {
    let m = mem();
    let e = parse_chain(
        &m,
        &[d(0x10_0000, 8, 0), d(0x30_0000, 1, F_WRITE)],
        limits(),
    )
    .unwrap_err();
    assert_eq!(e.0, RequestError::ShortHeader);
}

#[test]
fn rejects_data_in_the_wrong_direction() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let e = parse_chain(
        &m,
        &[d(0x10_0000, 16 + 512, 0), d(0x30_0000, 1, F_WRITE)],
        limits(),
    )
    .unwrap_err();
    assert_eq!(e.0, RequestError::DataDirection(VIRTIO_BLK_T_IN));
    header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
    let e = parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(0x20_0000, 512, F_WRITE),
            d(0x30_0000, 1, F_WRITE),
        ],
        limits(),
    )
    .unwrap_err();
    assert_eq!(e.0, RequestError::DataDirection(VIRTIO_BLK_T_OUT));
}

#[test]
fn sectors_past_the_end_are_ioerr() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 2047);
    let e = parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(0x20_0000, 1024, F_WRITE),
            d(0x30_0000, 1, F_WRITE),
        ],
        limits(),
    )
    .unwrap_err();
    assert!(matches!(
        e.0,
        RequestError::OutOfRange {
            sector: 2047,
            sectors: 2,
            capacity: 2048
        }
    ));
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, u64::MAX);
    let e = parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(0x20_0000, 512, F_WRITE),
            d(0x30_0000, 1, F_WRITE),
        ],
        limits(),
    )
    .unwrap_err();
    assert!(matches!(e.0, RequestError::OutOfRange { .. }));
}

#[test]
fn unaligned_data_is_ioerr() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let e = parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(0x20_0000, 100, F_WRITE),
            d(0x30_0000, 1, F_WRITE),
        ],
        limits(),
    )
    .unwrap_err();
    assert_eq!(e.0, RequestError::UnalignedLength(100));
}

#[test]
fn write_to_read_only_disk_is_ioerr() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
    let l = RequestLimits {
        readonly: true,
        ..limits()
    };
    let e = parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(0x20_0000, 512, 0),
            d(0x30_0000, 1, F_WRITE),
        ],
        l,
    )
    .unwrap_err();
    assert_eq!(
        (e.0.clone(), e.0.status()),
        (RequestError::ReadOnly, VIRTIO_BLK_S_IOERR)
    );
    // Reads still work.
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    assert!(parse_chain(
        &m,
        &[
            d(0x10_0000, 16, 0),
            d(0x20_0000, 512, F_WRITE),
            d(0x30_0000, 1, F_WRITE)
        ],
        l
    )
    .is_ok());
}

#[test]
fn unknown_type_is_unsupp() {
    let m = mem();
    header(&m, 0x10_0000, 99, 0);
    let e = parse_chain(
        &m,
        &[d(0x10_0000, 16, 0), d(0x30_0000, 1, F_WRITE)],
        limits(),
    )
    .unwrap_err();
    assert_eq!(
        (e.0.clone(), e.0.status()),
        (RequestError::Unsupported(99), VIRTIO_BLK_S_UNSUPP)
    );
}

#[test]
fn discard_segments_are_parsed_and_checked() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_DISCARD, 0);
    for (i, (s, n)) in [(8u64, 8u32), (100, 16)].iter().enumerate() {
        let at = 0x10_0010 + i as u64 * 16;
        m.write_obj(*s, GuestAddress(at)).unwrap();
        m.write_obj(*n, GuestAddress(at + 8)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 12)).unwrap();
    }
    let r = parse_chain(
        &m,
        &[d(0x10_0000, 16 + 32, 0), d(0x30_0000, 1, F_WRITE)],
        limits(),
    )
    .unwrap();
    assert_eq!(r.kind, RequestKind::Discard(vec![(8, 8, 0), (100, 16, 0)]));
    // Unsupported when the feature is off; out of range segments; ragged lists.
    let l = RequestLimits {
        discard: false,
        ..limits()
    };
    assert_eq!(
        parse_chain(&m, &[d(0x10_0000, 48, 0), d(0x30_0000, 1, F_WRITE)], l)
            .unwrap_err()
            .0,
        RequestError::Unsupported(VIRTIO_BLK_T_DISCARD)
    );
    m.write_obj(2047u64, GuestAddress(0x10_0010)).unwrap();
    assert!(matches!(
        parse_chain(
            &m,
            &[d(0x10_0000, 48, 0), d(0x30_0000, 1, F_WRITE)],
            limits()
        )
        .unwrap_err()
        .0,
        RequestError::OutOfRange { .. }
    ));
    assert_eq!(
        parse_chain(
            &m,
            &[d(0x10_0000, 40, 0), d(0x30_0000, 1, F_WRITE)],
            limits()
        )
        .unwrap_err()
        .0,
        RequestError::BadSegments
    );
}

#[test]
fn looping_chain_is_malformed_but_still_gets_a_status() {
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&m, 16);
    // 0 -> 1 -> 2 -> 1 -> 2 ...
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(0x10_0000, 16, F_NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(0x20_0000, 512, F_NEXT | F_WRITE, 2)),
        RawDescriptor::from(SplitDescriptor::new(0x30_0000, 1, F_NEXT | F_WRITE, 1)),
    ];
    let chain = vq.build_multiple_desc_chains(&descs).unwrap();
    let e = parse(chain, &m, &limits()).unwrap_err();
    assert_eq!(e.0, RequestError::ChainMalformed);
    assert!(e.1.is_some());
}

#[test]
fn arbitrary_descriptor_soup_never_panics() {
    let m = mem();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..2000 {
        let n = (next() % 5 + 1) as usize;
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|_| {
                let addr = match next() % 4 {
                    0 => next(),
                    1 => MEM_SIZE - (next() % 64),
                    _ => 0x10_0000 + (next() % 0x80_0000),
                };
                d(addr, (next() % 5000) as u32, (next() % 8) as u16)
            })
            .collect();
        header(&m, 0x10_0000, (next() % 16) as u32, next() % 4096);
        let vq = MockSplitQueue::new(&m, 16);
        if let Ok(chain) = vq.build_desc_chain(&descs) {
            let _ = parse(chain, &m, &limits());
        }
    }
}

#[test]
fn writable_descriptor_wrapping_the_address_space_does_not_panic() {
    // Found by the blk_request fuzz target: the fallback status address was
    // computed with an unchecked add.
    let m = mem();
    header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let e = parse_chain(
        &m,
        &[d(0x10_0000, 16, 0), d(u64::MAX - 8, 100, F_WRITE)],
        limits(),
    )
    .unwrap_err();
    assert_eq!(
        e.0,
        RequestError::OutsideGuestMemory {
            addr: u64::MAX - 8,
            len: 100
        }
    );
    assert_eq!(e.1, None, "no status byte inside guest memory");
}
