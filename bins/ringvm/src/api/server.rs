//! The API server: a Unix socket (mode 0600) served by its own thread,
//! one thread per connection (at most [`MAX_CONNECTIONS`]), each request
//! read with a deadline so that a slow or silent client only holds its own
//! connection. Requests that change state are serialised by one lock
//! and, when the server has a [`Worker`], carried out on it (the
//! connection threads run under the accepting thread's narrow seccomp
//! list; see [`super::worker`]); reads (`vmm.ping`, `vm.info`,
//! `vm.counters`) are not held up by them.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::dispatch::{call, route, Backend, Endpoint};
use super::http::{self, Parsed, Response};
use super::worker::{Sandbox, Worker};

/// Connections served at once; more get 503 and are closed.
pub const MAX_CONNECTIONS: usize = 16;
/// How long one request may take to arrive, and how long the connection
/// may sit idle between requests.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Errors from setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("{path} is in use by a running server")]
    InUse { path: PathBuf },
    #[error("removing the stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("binding {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the API thread")]
    Thread(#[source] std::io::Error),
    #[error("sandboxing the API thread: {0}")]
    Sandbox(String),
}

/// Binds `path` with mode 0600. An existing socket nobody listens on (a
/// stale one) is replaced; anything else there is refused.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket { path: path.into() });
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(ServerError::InUse { path: path.into() }),
            Err(_) => std::fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                path: path.into(),
                source,
            })?,
        }
    }
    // The socket is created 0600 (no window in which others may connect).
    // SAFETY: umask only changes the process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| ServerError::Bind {
        path: path.into(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ServerError::Bind {
            path: path.into(),
            source,
        }
    })?;
    Ok(listener)
}

/// The server's shared state.
struct Shared {
    backend: Arc<dyn Backend + Send>,
    /// Held while a state-changing request runs.
    changes: Mutex<()>,
    connections: AtomicUsize,
    /// Where state-changing requests run (on the connection's thread
    /// without one).
    worker: Option<Arc<Worker>>,
}

/// Starts the API thread on `listener`. It runs `sandbox` (its seccomp
/// filter, which its connection threads inherit) before it accepts a
/// connection; this returns once it did. State-changing requests go to
/// `worker` when there is one.
pub fn spawn(
    listener: UnixListener,
    backend: Arc<dyn Backend + Send>,
    worker: Option<Arc<Worker>>,
    sandbox: Option<Sandbox>,
) -> Result<std::thread::JoinHandle<()>, ServerError> {
    let shared = Arc::new(Shared {
        backend,
        changes: Mutex::new(()),
        connections: AtomicUsize::new(0),
        worker,
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            let ready = sandbox.map_or(Ok(()), |s| s());
            let ok = ready.is_ok();
            let _ = ready_tx.send(ready);
            if ok {
                accept_loop(listener, shared);
            }
        })
        .map_err(ServerError::Thread)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => Err(ServerError::Sandbox(e)),
        Err(_) => Err(ServerError::Sandbox("the thread ended".into())),
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                log::warn!("api: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = stream.write_all(&Response::error(503, "too many connections").to_bytes(true));
            continue;
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            // vm.create and vm.restore build a VM on this thread (clap's
            // parser alone takes over 256 KiB in a debug build); only the
            // pages touched count.
            .stack_size(2 << 20)
            .spawn(move || {
                serve_connection(stream, &s);
                s.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            log::warn!("api: starting a connection thread: {e}");
        }
    }
}

fn failed(what: &str, status: u16, message: &str) {
    log::debug!("api: {what}: {status} {message}");
    vmm::events::emit(
        "api",
        "request-failed",
        &[
            ("request", what),
            ("status", &status.to_string()),
            ("error", message),
        ],
    );
}

/// Serves requests on one connection until the client closes it, breaks
/// the protocol, or is too slow.
fn serve_connection(mut stream: UnixStream, shared: &Arc<Shared>) {
    let _ = stream.set_write_timeout(Some(REQUEST_DEADLINE));
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let (req, used) = loop {
            match http::parse(&buf) {
                Ok(Parsed::Complete(req, used)) => break (req, used),
                Ok(Parsed::Partial) => {}
                Err(e) => {
                    failed("unparsable request", e.status(), &e.to_string());
                    let _ = stream
                        .write_all(&Response::error(e.status(), &e.to_string()).to_bytes(true));
                    return;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                if !buf.is_empty() {
                    failed("incomplete request", 408, "request not complete in time");
                    let _ = stream.write_all(
                        &Response::error(408, "request not complete in time").to_bytes(true),
                    );
                }
                return;
            }
            let _ = stream.set_read_timeout(Some(left));
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut
                        || e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        };
        buf.drain(..used);
        shared.backend.request_begun();
        let (resp, ep) = handle_on_worker(req.clone(), shared)
            .unwrap_or_else(|| handle_request(&req, &*shared.backend, &shared.changes));
        let sent = stream.write_all(&resp.to_bytes(req.close)).is_ok();
        // Also when the client has gone: the VMM must not wait for an
        // answer that can no longer be sent.
        if let (true, Some(ep)) = (resp.status < 300, ep) {
            shared.backend.responded(ep);
        }
        shared.backend.request_ended();
        if !sent || req.close {
            return;
        }
    }
}

/// A state-changing request carried out on the worker (`None`: the
/// server has none, or the request changes nothing).
fn handle_on_worker(
    req: http::Request,
    shared: &Arc<Shared>,
) -> Option<(Response, Option<Endpoint>)> {
    let worker = shared.worker.as_ref()?;
    if !route(&req.method, &req.path).is_ok_and(|ep| ep.changes_state()) {
        return None;
    }
    let what = format!("{} {}", req.method, req.path);
    let s = shared.clone();
    Some(
        worker
            .run(move || handle_request(&req, &*s.backend, &s.changes))
            .unwrap_or_else(|| {
                let message = "the VMM's worker thread is gone";
                failed(&what, 500, message);
                (Response::error(500, message), None)
            }),
    )
}

/// One request: route, serialise if it changes state, call the backend.
/// Returns the answer and the endpoint, if the request named one.
pub fn handle_request(
    req: &http::Request,
    backend: &dyn Backend,
    changes: &Mutex<()>,
) -> (Response, Option<Endpoint>) {
    let what = format!("{} {}", req.method, req.path);
    let ep = match route(&req.method, &req.path) {
        Ok(ep) => ep,
        Err(e) => {
            failed(&what, e.status, &e.message);
            return (Response::error(e.status, &e.message), None);
        }
    };
    let _serial = ep
        .changes_state()
        .then(|| changes.lock().unwrap_or_else(|e| e.into_inner()));
    let resp = match call(ep, &req.body, backend) {
        Ok(Some(v)) => Response::json(200, v.to_string()),
        Ok(None) => Response::no_content(),
        Err(e) => {
            failed(&what, e.status, &e.message);
            Response::error(e.status, &e.message)
        }
    };
    (resp, Some(ep))
}
