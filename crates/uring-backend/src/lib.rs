//! ringvm's io_uring backend: a single-threaded executor on one io_uring
//! ([`executor`]), the iothreads that run one each ([`iothread`]), and raw
//! files and block devices served through them ([`block`]), and TAP
//! devices ([`net`]).
//!
//! Every in-flight operation owns what the kernel uses (buffers or a
//! keepalive of the memory, iovec arrays, file handles) until its
//! completion arrives; see [`memory::IoMemory`].

pub mod block;
pub mod executor;
pub mod iothread;
pub mod memory;
pub mod net;
mod slab;

pub use executor::{Executor, ExecutorError};
pub use memory::{IoBuf, IoMemory};
