//! Routing a request to an endpoint and the endpoint to the VMM.
//!
//! The VMM implements [`Backend`]; [`dispatch`] turns any request, however
//! malformed, into a response: 404 for an unknown endpoint, 405 for a
//! known one with the wrong verb (with `Allow`), 400 for a body that is not
//! what the endpoint takes, and whatever status the backend's error has.

use serde_json::Value;

use super::types::{RestoreConfig, SnapshotConfig, VmConfig};

/// The prefix of every endpoint.
pub const PREFIX: &str = "/api/v1/";

/// Every endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    VmmPing,
    VmmShutdown,
    VmCreate,
    VmBoot,
    VmDelete,
    VmInfo,
    VmCounters,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
    VmPowerButton,
    VmSnapshot,
    VmRestore,
}

/// Name, verb and endpoint.
pub const ENDPOINTS: &[(&str, &str, Endpoint)] = &[
    ("vmm.ping", "GET", Endpoint::VmmPing),
    ("vmm.shutdown", "PUT", Endpoint::VmmShutdown),
    ("vm.create", "PUT", Endpoint::VmCreate),
    ("vm.boot", "PUT", Endpoint::VmBoot),
    ("vm.delete", "PUT", Endpoint::VmDelete),
    ("vm.info", "GET", Endpoint::VmInfo),
    ("vm.counters", "GET", Endpoint::VmCounters),
    ("vm.pause", "PUT", Endpoint::VmPause),
    ("vm.resume", "PUT", Endpoint::VmResume),
    ("vm.shutdown", "PUT", Endpoint::VmShutdown),
    ("vm.reboot", "PUT", Endpoint::VmReboot),
    ("vm.power-button", "PUT", Endpoint::VmPowerButton),
    ("vm.snapshot", "PUT", Endpoint::VmSnapshot),
    ("vm.restore", "PUT", Endpoint::VmRestore),
];

impl Endpoint {
    pub fn name(self) -> &'static str {
        ENDPOINTS
            .iter()
            .find(|(_, _, e)| *e == self)
            .map(|(n, _, _)| *n)
            .unwrap_or("?")
    }

    pub fn method(self) -> &'static str {
        ENDPOINTS
            .iter()
            .find(|(_, _, e)| *e == self)
            .map(|(_, m, _)| *m)
            .unwrap_or("GET")
    }

    /// Whether the request changes the VMM's or the VM's state (such
    /// requests are serialised).
    pub fn changes_state(self) -> bool {
        !matches!(
            self,
            Endpoint::VmmPing | Endpoint::VmInfo | Endpoint::VmCounters
        )
    }
}

/// An error with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(400, m)
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(409, m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(500, m)
    }
}

/// What the VMM does for each endpoint. Getters return the JSON body;
/// actions return nothing (204).
pub trait Backend: Sync {
    fn ping(&self) -> Result<Value, ApiError>;
    fn shutdown_vmm(&self) -> Result<(), ApiError>;
    fn create(&self, config: VmConfig) -> Result<(), ApiError>;
    fn boot(&self) -> Result<(), ApiError>;
    fn delete(&self) -> Result<(), ApiError>;
    fn info(&self) -> Result<Value, ApiError>;
    fn counters(&self) -> Result<Value, ApiError>;
    fn pause(&self) -> Result<(), ApiError>;
    fn resume(&self) -> Result<(), ApiError>;
    fn shutdown(&self) -> Result<(), ApiError>;
    fn reboot(&self) -> Result<(), ApiError>;
    fn power_button(&self) -> Result<(), ApiError>;
    /// Writes a snapshot of the Paused VM. A VMM without snapshot support
    /// says so.
    fn snapshot(&self, _config: SnapshotConfig) -> Result<(), ApiError> {
        Err(ApiError::new(501, "this VMM does not take snapshots"))
    }
    /// Builds and starts a VM from a snapshot (Paused unless asked).
    fn restore(&self, _config: RestoreConfig) -> Result<(), ApiError> {
        Err(ApiError::new(501, "this VMM does not restore snapshots"))
    }
    /// A request was read: its answer is to be sent (the VMM does not
    /// exit before [`Backend::request_ended`] follows).
    fn request_begun(&self) {}
    /// The answer to a request was sent, or could not be.
    fn request_ended(&self) {}
    /// Called once the answer to a successful `ep` was sent, or failed to
    /// be sent (the VMM exits only after `vmm.shutdown` was answered).
    fn responded(&self, _ep: Endpoint) {}
}

/// Finds the endpoint of `method` and `path` (a query string is ignored).
pub fn route(method: &str, path: &str) -> Result<Endpoint, ApiError> {
    let path = path.split('?').next().unwrap_or("");
    let Some(name) = path.strip_prefix(PREFIX) else {
        return Err(ApiError::new(404, format!("no such endpoint: {path}")));
    };
    let Some(&(_, verb, ep)) = ENDPOINTS.iter().find(|(n, _, _)| *n == name) else {
        return Err(ApiError::new(404, format!("no such endpoint: {path}")));
    };
    if method != verb {
        return Err(ApiError::new(
            405,
            format!("{name} takes {verb}, not {method}"),
        ));
    }
    Ok(ep)
}

/// Parses the body of `vm.create`.
pub fn parse_config(body: &[u8]) -> Result<VmConfig, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "vm.create needs a VM configuration as its JSON body",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid VM configuration: {e}")))
}

/// Parses a JSON body of `endpoint`.
fn parse_body<T: serde::de::DeserializeOwned>(endpoint: &str, body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{endpoint} needs a JSON body"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid {endpoint} body: {e}")))
}

fn done(r: Result<(), ApiError>) -> Result<Option<Value>, ApiError> {
    r.map(|()| None)
}

/// Carries out `ep`.
pub fn call(ep: Endpoint, body: &[u8], b: &dyn Backend) -> Result<Option<Value>, ApiError> {
    match ep {
        Endpoint::VmmPing => b.ping().map(Some),
        Endpoint::VmmShutdown => done(b.shutdown_vmm()),
        Endpoint::VmCreate => done(b.create(parse_config(body)?)),
        Endpoint::VmBoot => done(b.boot()),
        Endpoint::VmDelete => done(b.delete()),
        Endpoint::VmInfo => b.info().map(Some),
        Endpoint::VmCounters => b.counters().map(Some),
        Endpoint::VmPause => done(b.pause()),
        Endpoint::VmResume => done(b.resume()),
        Endpoint::VmShutdown => done(b.shutdown()),
        Endpoint::VmReboot => done(b.reboot()),
        Endpoint::VmPowerButton => done(b.power_button()),
        Endpoint::VmSnapshot => done(b.snapshot(parse_body("vm.snapshot", body)?)),
        Endpoint::VmRestore => done(b.restore(parse_body("vm.restore", body)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_statuses() {
        assert_eq!(route("GET", "/api/v1/vmm.ping"), Ok(Endpoint::VmmPing));
        assert_eq!(route("PUT", "/api/v1/vm.pause?x=1"), Ok(Endpoint::VmPause));
        assert_eq!(route("GET", "/api/v1/vm.nothing").unwrap_err().status, 404);
        assert_eq!(route("GET", "/other").unwrap_err().status, 404);
        assert_eq!(route("GET", "/api/v1/vm.pause").unwrap_err().status, 405);
        assert_eq!(route("PUT", "/api/v1/vm.info").unwrap_err().status, 405);
        for (name, verb, ep) in ENDPOINTS {
            assert_eq!(route(verb, &format!("{PREFIX}{name}")), Ok(*ep));
            assert_eq!(ep.name(), *name);
        }
    }

    #[test]
    fn create_bodies_are_checked() {
        assert_eq!(parse_config(b"").unwrap_err().status, 400);
        assert_eq!(parse_config(b"{").unwrap_err().status, 400);
        assert_eq!(
            parse_config(br#"{"payload":{"kernel":"k"},"bogus":1}"#)
                .unwrap_err()
                .status,
            400
        );
        assert!(parse_config(br#"{"payload":{"kernel":"k"}}"#).is_ok());
    }
}
