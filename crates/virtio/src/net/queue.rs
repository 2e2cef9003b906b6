//! Pieces the network queue tasks share (the queue itself, its interrupt
//! and notification coalescing are the shared layer's, [`crate::vq`]):
//! descriptor chains turned into guest segments and host iovecs, and
//! waiting for the first of two futures.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

/// Why a chain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("a {0} descriptor in a chain the device must only {1}")]
    WrongDirection(&'static str, &'static str),
    #[error("the descriptor chain is malformed (loop, too long, or a bad indirect table)")]
    Malformed,
}

/// Collects a chain whose descriptors must all be device-writable
/// (`writable`) or all device-readable into `segs` (cleared first);
/// returns the chain's length.
pub(super) fn segments_into<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    writable: bool,
    segs: &mut Vec<(GuestAddress, u32)>,
) -> Result<u64, ChainError>
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    segs.clear();
    let mut total = 0u64;
    let mut last_had_next = true;
    let mut any = false;
    for desc in chain.clone() {
        any = true;
        last_had_next = desc.has_next();
        if desc.is_write_only() != writable {
            return Err(if writable {
                ChainError::WrongDirection("read-only", "write")
            } else {
                ChainError::WrongDirection("write-only", "read")
            });
        }
        let (addr, len) = (desc.addr(), desc.len());
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, addr, len as usize) {
            return Err(ChainError::OutsideMemory { addr: addr.0, len });
        }
        segs.push((addr, len));
        total += u64::from(len);
    }
    // The iterator stops early on loops, over-long chains and bad indirect
    // tables: the last descriptor it gave still points onwards.
    if !any || last_had_next {
        return Err(ChainError::Malformed);
    }
    Ok(total)
}

/// Host iovecs for guest segments into `out` (cleared first); false if
/// a segment is outside guest memory.
pub(super) fn iovecs_into(
    mem: &GuestMemoryMmap,
    segs: &[(GuestAddress, u32)],
    out: &mut Vec<libc::iovec>,
) -> bool {
    out.clear();
    for &(addr, len) in segs {
        let Ok(slice) = mem.get_slice(addr, len as usize) else {
            return false;
        };
        out.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: len as usize,
        });
    }
    true
}

/// Which of two futures finished first.
pub(super) enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Waits for whichever of `a` and `b` completes first; the other stays
/// usable (pending) for a later call.
pub(super) async fn first<A, B>(
    mut a: Pin<&mut A>,
    mut b: Pin<&mut B>,
) -> Either<A::Output, B::Output>
where
    A: Future + ?Sized,
    B: Future + ?Sized,
{
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(v));
        }
        if let Poll::Ready(v) = b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(v));
        }
        Poll::Pending
    })
    .await
}
