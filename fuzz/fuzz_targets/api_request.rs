//! The API server's input: bytes from a client, cut into requests the way
//! the server does (keep-alive: one after another), each routed and
//! dispatched to a fake VMM that follows the real lifecycle state machine.
//! Checks that nothing panics, every answer is a well-formed response
//! whose error bodies are `{"error": ...}`, and that a VM configuration
//! that parses also maps to `ringvm run` arguments without panicking.
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use ringvm::api::dispatch::{ApiError, Backend};
use ringvm::api::http::{self, Parsed};
use ringvm::api::server::handle_request;
use ringvm::api::types::VmConfig;
use serde_json::{json, Value};
use vmm::lifecycle::{next_state, Transition, VmState};

/// A VMM without a VM behind it: state only.
struct Fake(Mutex<Option<VmState>>);

impl Fake {
    fn step(&self, t: Transition) -> Result<(), ApiError> {
        let mut s = self.0.lock().unwrap();
        let Some(state) = *s else {
            return Err(ApiError::conflict("no VM has been created"));
        };
        *s = Some(next_state(state, t).map_err(|e| ApiError::conflict(e.to_string()))?);
        Ok(())
    }
}

impl Backend for Fake {
    fn ping(&self) -> Result<Value, ApiError> {
        Ok(json!({"version": "fuzz"}))
    }
    fn shutdown_vmm(&self) -> Result<(), ApiError> {
        Ok(())
    }
    fn create(&self, config: VmConfig) -> Result<(), ApiError> {
        config
            .to_run_args()
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let mut s = self.0.lock().unwrap();
        if s.is_some() {
            return Err(ApiError::conflict("a VM exists already"));
        }
        *s = Some(VmState::Created);
        Ok(())
    }
    fn boot(&self) -> Result<(), ApiError> {
        self.step(Transition::Boot)
    }
    fn delete(&self) -> Result<(), ApiError> {
        *self.0.lock().unwrap() = None;
        Ok(())
    }
    fn info(&self) -> Result<Value, ApiError> {
        Ok(json!({"state": format!("{:?}", *self.0.lock().unwrap())}))
    }
    fn counters(&self) -> Result<Value, ApiError> {
        Ok(json!({}))
    }
    fn pause(&self) -> Result<(), ApiError> {
        self.step(Transition::Pause)
    }
    fn resume(&self) -> Result<(), ApiError> {
        self.step(Transition::Resume)
    }
    fn shutdown(&self) -> Result<(), ApiError> {
        self.step(Transition::Shutdown)
    }
    fn reboot(&self) -> Result<(), ApiError> {
        Err(ApiError::conflict("no reboot here"))
    }
    fn power_button(&self) -> Result<(), ApiError> {
        Err(ApiError::conflict(
            "there is no ACPI power button in this VM",
        ))
    }
}

fuzz_target!(|input: &[u8]| {
    let fake = Fake(Mutex::new(None));
    let changes = Mutex::new(());
    let mut buf = input;
    loop {
        match http::parse(buf) {
            Ok(Parsed::Complete(req, used)) => {
                assert!(used > 0 && used <= buf.len());
                assert!(req.body.len() <= http::MAX_BODY);
                let (resp, _) = handle_request(&req, &fake, &changes);
                let bytes = resp.to_bytes(req.close);
                let back = http::parse_response(&bytes).unwrap().unwrap();
                assert_eq!(back.status, resp.status);
                if resp.status >= 400 {
                    let v: Value = serde_json::from_slice(&back.body).unwrap();
                    assert!(v["error"].is_string());
                }
                buf = &buf[used..];
            }
            Ok(Parsed::Partial) => break,
            Err(e) => {
                assert!(e.status() >= 400);
                break;
            }
        }
    }
    // The same bytes as a vm.create body.
    if let Ok(config) = serde_json::from_slice::<VmConfig>(input) {
        let _ = config.to_run_args();
    }
});
