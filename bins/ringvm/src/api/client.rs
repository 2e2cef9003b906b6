//! The client side, for `ringvm remote`: one request per connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::dispatch::{Endpoint, PREFIX};
use super::http::{parse_response, ClientResponse};

/// Errors reaching the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the server")]
    Io(#[source] std::io::Error),
    #[error("the server's answer is not HTTP: {0}")]
    BadResponse(String),
    #[error("the server closed the connection without an answer")]
    NoResponse,
}

/// How long `ringvm remote` waits for an answer (a pause waits for
/// in-flight disk requests).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends `ep` with `body` and returns the server's answer.
pub fn request(
    socket: &Path,
    ep: Endpoint,
    body: Option<&[u8]>,
) -> Result<ClientResponse, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(RESPONSE_TIMEOUT))
        .map_err(ClientError::Io)?;
    let body = body.unwrap_or(b"");
    let mut req = format!(
        "{} {PREFIX}{} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        ep.method(),
        ep.name(),
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes).map_err(ClientError::Io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(r) =
            parse_response(&buf).map_err(|e| ClientError::BadResponse(e.to_string()))?
        {
            return Ok(r);
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err(ClientError::NoResponse),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ClientError::Io(e)),
        }
    }
}
