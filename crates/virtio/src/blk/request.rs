//! Parsing a virtio-blk request out of a descriptor chain (virtio 1.2
//! §5.2.6), without assuming any framing: the header, data and status byte
//! may be split across descriptors or share them. Every guest-provided
//! address, length and field is checked here, and every failure says which
//! virtio status the driver gets back.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Length of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Largest number of segments (discard / write-zeroes ranges) per request.
pub const MAX_DISCARD_SEGMENTS: u32 = 64;
/// Bit 0 of a write-zeroes segment's flags: the device may unmap.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
const HEADER_SIZE: usize = 16;
const DISCARD_SEGMENT_SIZE: usize = 16;

/// What the driver asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
    /// (sector, sectors, flags) ranges.
    Discard(Vec<(u64, u32, u32)>),
    WriteZeroes(Vec<(u64, u32, u32)>),
}

/// A request ready for the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub sector: u64,
    /// Guest memory the data goes to or comes from, in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Total bytes in `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// A request that cannot be carried out, and why.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("descriptor chain loops, is longer than the queue or has a bad indirect table")]
    ChainMalformed,
    #[error("descriptor {addr:#x}+{len:#x} lies outside guest memory")]
    OutsideGuestMemory { addr: u64, len: u32 },
    #[error("a device-readable descriptor follows a device-writable one")]
    WrongDirection,
    #[error("no device-writable byte for the status")]
    NoStatus,
    #[error("header shorter than {HEADER_SIZE} bytes")]
    ShortHeader,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    #[error("data buffers have the wrong direction for request type {0}")]
    DataDirection(u32),
    #[error("sectors {sector}..+{sectors} are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("discard/write-zeroes segment list is malformed")]
    BadSegments,
}

impl RequestError {
    /// The virtio status the driver gets for this error.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// Limits that come from the device's configuration.
#[derive(Clone, Copy, Debug)]
pub struct RequestLimits {
    pub capacity_sectors: u64,
    pub readonly: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

/// A byte stream over descriptor segments.
struct Stream {
    segs: Vec<(GuestAddress, u32)>,
}

impl Stream {
    fn len(&self) -> u64 {
        self.segs.iter().map(|s| u64::from(s.1)).sum()
    }

    /// Drops the first `n` bytes.
    fn skip_front(&mut self, mut n: u64) {
        let mut whole = 0;
        for seg in self.segs.iter_mut() {
            if n == 0 {
                break;
            }
            let (addr, len) = *seg;
            if u64::from(len) <= n {
                n -= u64::from(len);
                whole += 1;
            } else {
                *seg = (addr.unchecked_add(n), len - n as u32);
                n = 0;
            }
        }
        self.segs.drain(..whole);
    }

    /// Splits off the last byte's address.
    fn pop_back_byte(&mut self) -> Option<GuestAddress> {
        let (addr, len) = self.segs.pop()?;
        if len > 1 {
            self.segs.push((addr, len - 1));
        }
        Some(addr.unchecked_add(u64::from(len) - 1))
    }

    fn read(&self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Result<(), RequestError> {
        let mut done = 0;
        for &(addr, len) in &self.segs {
            if done == buf.len() {
                break;
            }
            let n = (len as usize).min(buf.len() - done);
            mem.read_slice(&mut buf[done..done + n], addr)
                .map_err(|_| RequestError::OutsideGuestMemory { addr: addr.0, len })?;
            done += n;
        }
        if done < buf.len() {
            return Err(RequestError::ShortHeader);
        }
        Ok(())
    }
}

/// The readable and writable streams of a chain, checked against guest
/// memory and for direction order.
fn split_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    pool: &mut SegmentPool,
) -> Result<(Stream, Stream), RequestError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut readable = pool.take();
    let mut writable = pool.take();
    let mut last: Option<Descriptor> = None;
    let mut wrong_direction = false;
    for desc in chain {
        let (addr, len) = (desc.addr(), desc.len());
        if len > 0 && !GuestMemoryBackend::check_range(mem, addr, len as usize) {
            return Err(RequestError::OutsideGuestMemory { addr: addr.0, len });
        }
        if desc.is_write_only() {
            if len > 0 {
                writable.push((addr, len));
            }
        } else if writable.is_empty() {
            if len > 0 {
                readable.push((addr, len));
            }
        } else {
            wrong_direction = true;
        }
        last = Some(desc);
    }
    // The iterator stops early on loops, over-long chains and bad indirect
    // tables: the last descriptor it gave still points onwards.
    match last {
        None => return Err(RequestError::ChainMalformed),
        Some(d) if d.has_next() => {
            // Keep what we found so the caller can still report a status.
            return Err(RequestError::ChainMalformed);
        }
        Some(_) => {}
    }
    if wrong_direction {
        return Err(RequestError::WrongDirection);
    }
    Ok((Stream { segs: readable }, Stream { segs: writable }))
}

/// Where to put the status byte of a chain that could not be parsed: the
/// last device-writable byte, if the chain has one inside guest memory.
pub fn fallback_status_addr<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
) -> Option<GuestAddress>
where
    M: Deref,
    M::Target: GuestMemory,
{
    chain
        .filter(|d| d.is_write_only() && d.len() > 0)
        .last()
        .and_then(|d| d.addr().checked_add(u64::from(d.len()) - 1))
        .filter(|a| mem.address_in_range(*a))
}

fn parse_segments(
    stream: &Stream,
    mem: &GuestMemoryMmap,
    limits: &RequestLimits,
) -> Result<Vec<(u64, u32, u32)>, RequestError> {
    let len = stream.len();
    if len == 0
        || len % DISCARD_SEGMENT_SIZE as u64 != 0
        || len / DISCARD_SEGMENT_SIZE as u64 > u64::from(MAX_DISCARD_SEGMENTS)
    {
        return Err(RequestError::BadSegments);
    }
    let mut raw = vec![0u8; len as usize];
    stream.read(mem, &mut raw)?;
    raw.chunks_exact(DISCARD_SEGMENT_SIZE)
        .map(|c| {
            let sector = u64::from_le_bytes(c[0..8].try_into().unwrap());
            let sectors = u32::from_le_bytes(c[8..12].try_into().unwrap());
            let flags = u32::from_le_bytes(c[12..16].try_into().unwrap());
            check_range(sector, u64::from(sectors), limits)?;
            Ok((sector, sectors, flags))
        })
        .collect()
}

fn check_range(sector: u64, sectors: u64, limits: &RequestLimits) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity: limits.capacity_sectors,
        }),
    }
}

/// Spare segment lists: parsing takes its lists from here and a finished
/// request gives its data list back, so that a queue's parsing allocates
/// nothing once warm.
#[derive(Debug, Default)]
pub struct SegmentPool(Vec<Vec<(GuestAddress, u32)>>);

/// Lists kept in a pool: two per request in flight of a full queue.
const POOL_LISTS: usize = 512;

impl SegmentPool {
    fn take(&mut self) -> Vec<(GuestAddress, u32)> {
        self.0.pop().unwrap_or_default()
    }

    /// Returns a list (a finished request's `data`) for reuse.
    pub fn give(&mut self, mut list: Vec<(GuestAddress, u32)>) {
        if self.0.len() < POOL_LISTS && list.capacity() > 0 {
            list.clear();
            self.0.push(list);
        }
    }
}

/// Parses the request in `chain`. On error, the caller reports
/// `err.status()` at [`fallback_status_addr`] (if any) and moves on.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    limits: &RequestLimits,
) -> Result<Request, (RequestError, Option<GuestAddress>)>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    parse_pooled(chain, mem, limits, &mut SegmentPool::default())
}

/// [`parse`], with the segment lists taken from (and the unused one given
/// back to) `pool`.
pub fn parse_pooled<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    limits: &RequestLimits,
    pool: &mut SegmentPool,
) -> Result<Request, (RequestError, Option<GuestAddress>)>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let fallback = || fallback_status_addr(chain.clone(), mem);
    let (mut readable, mut writable) =
        split_chain(chain.clone(), mem, pool).map_err(|e| (e, fallback()))?;
    let status = writable
        .pop_back_byte()
        .ok_or((RequestError::NoStatus, None))?;
    let fail = |e| (e, Some(status));
    let mut header = [0u8; HEADER_SIZE];
    readable.read(mem, &mut header).map_err(fail)?;
    readable.skip_front(HEADER_SIZE as u64);
    let kind_raw = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let (kind, data) = match kind_raw {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => {
            if readable.len() != 0 {
                return Err(fail(RequestError::DataDirection(kind_raw)));
            }
            let kind = if kind_raw == VIRTIO_BLK_T_IN {
                RequestKind::Read
            } else {
                RequestKind::GetId
            };
            pool.give(readable.segs);
            (kind, writable.segs)
        }
        VIRTIO_BLK_T_OUT => {
            if writable.len() != 0 {
                return Err(fail(RequestError::DataDirection(kind_raw)));
            }
            if limits.readonly {
                return Err(fail(RequestError::ReadOnly));
            }
            pool.give(writable.segs);
            (RequestKind::Write, readable.segs)
        }
        VIRTIO_BLK_T_FLUSH => {
            pool.give(readable.segs);
            pool.give(writable.segs);
            (RequestKind::Flush, Vec::new())
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let supported = if kind_raw == VIRTIO_BLK_T_DISCARD {
                limits.discard
            } else {
                limits.write_zeroes
            };
            if !supported {
                return Err(fail(RequestError::Unsupported(kind_raw)));
            }
            if limits.readonly {
                return Err(fail(RequestError::ReadOnly));
            }
            let segs = parse_segments(&readable, mem, limits).map_err(fail)?;
            let kind = if kind_raw == VIRTIO_BLK_T_DISCARD {
                RequestKind::Discard(segs)
            } else {
                RequestKind::WriteZeroes(segs)
            };
            (kind, Vec::new())
        }
        other => return Err(fail(RequestError::Unsupported(other))),
    };
    let data_len: u64 = data.iter().map(|s| u64::from(s.1)).sum();
    if matches!(kind, RequestKind::Read | RequestKind::Write) {
        if data_len % SECTOR_SIZE != 0 {
            return Err(fail(RequestError::UnalignedLength(data_len)));
        }
        check_range(sector, data_len >> SECTOR_SHIFT, limits).map_err(fail)?;
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
