//! The control plane: HTTP/1.1 with JSON bodies on a Unix socket, under
//! `/api/v1/`, with Cloud Hypervisor's endpoint names.
//!
//! - [`http`]: one request parsed from bytes (httparse for the head, our
//!   own body framing with a 1 MiB limit) and responses;
//! - [`types`]: the JSON bodies (serde), shared by server and client;
//! - [`dispatch`]: endpoint routing and the [`dispatch::Backend`] trait that
//!   the VMM implements, so that parsing and dispatch are tested and fuzzed
//!   without a VM;
//! - [`server`]: the socket, its own thread and one thread per connection;
//! - [`worker`]: the thread that carries out state-changing requests;
//! - [`client`]: what `ringvm remote` uses.

pub mod client;
pub mod dispatch;
pub mod http;
pub mod server;
pub mod types;
pub mod worker;
