//! HTTP/1.1 requests and responses, as much as the API needs: a request
//! line, headers, and a body framed by `Content-Length` (no chunked
//! bodies). Every limit is checked before memory is committed to it.

/// The largest request body taken.
pub const MAX_BODY: usize = 1 << 20;
/// The largest request head (request line and headers).
pub const MAX_HEAD: usize = 16 << 10;
const MAX_HEADERS: usize = 32;

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// What the bytes so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A request, and how many bytes of the buffer it used.
    Complete(Request, usize),
}

/// Why a request cannot be taken. Each maps to a status and closes the
/// connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("request head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("request body of {0} bytes is larger than the limit of {MAX_BODY} bytes")]
    BodyTooLarge(u64),
    #[error("chunked request bodies are not supported; send Content-Length")]
    Chunked,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::Chunked => 501,
        }
    }
}

/// Parses one request from the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(HttpError::HeadTooLarge);
            }
            return Ok(Parsed::Partial);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::Malformed(format!(
                "more than {MAX_HEADERS} headers"
            )))
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let method = req.method.unwrap_or_default().to_string();
    let path = req.path.unwrap_or_default().to_string();
    let http10 = req.version == Some(0);
    let mut length: Option<u64> = None;
    let mut close = http10;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HttpError::Malformed(format!("header {} is not UTF-8", h.name)))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| HttpError::Malformed(format!("Content-Length {value:?}")))?;
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::Malformed("conflicting Content-Length".into()));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Chunked);
        } else if h.name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                close = true;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                close = false;
            }
        }
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY as u64 {
        return Err(HttpError::BodyTooLarge(length));
    }
    let total = head_len + length as usize;
    if buf.len() < total {
        return Ok(Parsed::Partial);
    }
    Ok(Parsed::Complete(
        Request {
            method,
            path,
            body: buf[head_len..total].to_vec(),
            close,
        },
        total,
    ))
}

/// A response: a status and an optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<String>,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

impl Response {
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            body: Some(body),
        }
    }

    pub fn no_content() -> Response {
        Response {
            status: 204,
            body: None,
        }
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Response {
        let body = serde_json::json!({ "error": message }).to_string();
        Response::json(status, body)
    }

    /// The bytes on the wire; `close` adds `Connection: close`.
    pub fn to_bytes(&self, close: bool) -> Vec<u8> {
        let body = self.body.as_deref().unwrap_or("");
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if self.body.is_some() {
            out.push_str("Content-Type: application/json\r\n");
        }
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        out.push_str(body);
        out.into_bytes()
    }
}

/// A parsed response (for the client).
#[derive(Debug, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Parses one response from the start of `buf`; None while incomplete.
pub fn parse_response(buf: &[u8]) -> Result<Option<ClientResponse>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let status = resp.code.unwrap_or(0);
    let mut length = 0u64;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| HttpError::Malformed("Content-Length".into()))?;
        }
    }
    if length > (16 << 20) {
        return Err(HttpError::BodyTooLarge(length));
    }
    let total = head_len + length as usize;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(ClientResponse {
        status,
        body: buf[head_len..total].to_vec(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_arrives_in_pieces() {
        let raw = b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n{}{}";
        for cut in 0..raw.len() {
            assert_eq!(parse(&raw[..cut]).unwrap(), Parsed::Partial, "{cut}");
        }
        let Parsed::Complete(req, n) = parse(raw).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(n, raw.len());
        assert_eq!(
            (req.method.as_str(), req.path.as_str(), &req.body[..]),
            ("PUT", "/api/v1/vm.create", &b"{}{}"[..])
        );
        assert!(!req.close);
    }

    #[test]
    fn limits_and_garbage_are_refused() {
        let big = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert_eq!(
            parse(big.as_bytes()),
            Err(HttpError::BodyTooLarge(MAX_BODY as u64 + 1))
        );
        assert!(matches!(
            parse(b"\x00\x01garbage\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert_eq!(
            parse(&vec![b'a'; MAX_HEAD + 1]).unwrap_err(),
            HttpError::HeadTooLarge
        );
        assert_eq!(
            parse(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HttpError::Chunked)
        );
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn responses_round_trip() {
        let r = Response::error(409, "cannot resume a VM that is Running");
        let bytes = r.to_bytes(true);
        let back = parse_response(&bytes).unwrap().unwrap();
        assert_eq!(back.status, 409);
        let v: serde_json::Value = serde_json::from_slice(&back.body).unwrap();
        assert_eq!(v["error"], "cannot resume a VM that is Running");
        let back = parse_response(&Response::no_content().to_bytes(false))
            .unwrap()
            .unwrap();
        assert_eq!((back.status, back.body.len()), (204, 0));
    }
}
