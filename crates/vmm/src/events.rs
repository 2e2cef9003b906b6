//! The event monitor (`--event-monitor`): one JSON object per line for
//! each lifecycle step of the VMM, the VM and its devices.
//!
//! There is one monitor per process, installed once by the binary; with
//! none installed, [`emit`] costs one atomic load. Events are written and
//! flushed in the order they are emitted (one lock around the writer), so
//! a reader sees them as they happen.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

static MONITOR: OnceLock<Mutex<Box<dyn Write + Send>>> = OnceLock::new();

/// Installs the process's event monitor. Returns false if one was
/// installed already (the new writer is dropped).
pub fn install(writer: Box<dyn Write + Send>) -> bool {
    MONITOR.set(Mutex::new(writer)).is_ok()
}

/// Whether a monitor is installed.
pub fn enabled() -> bool {
    MONITOR.get().is_some()
}

/// Appends `s` to `out` as the body of a JSON string (RFC 8259 escapes).
pub fn json_escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
}

/// One event line: `{"timestamp":{"secs":..,"nanos":..},"source":..,
/// "event":..,"properties":{..}}` (property values are strings).
pub fn format_event(
    now: std::time::Duration,
    source: &str,
    event: &str,
    properties: &[(&str, &str)],
) -> String {
    let mut line = format!(
        "{{\"timestamp\":{{\"secs\":{},\"nanos\":{}}},\"source\":\"",
        now.as_secs(),
        now.subsec_nanos()
    );
    json_escape(source, &mut line);
    line.push_str("\",\"event\":\"");
    json_escape(event, &mut line);
    line.push_str("\",\"properties\":{");
    for (i, (k, v)) in properties.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push('"');
        json_escape(k, &mut line);
        line.push_str("\":\"");
        json_escape(v, &mut line);
        line.push('"');
    }
    line.push_str("}}\n");
    line
}

/// Writes one event, if a monitor is installed. A failing writer is
/// logged, never fatal.
pub fn emit(source: &str, event: &str, properties: &[(&str, &str)]) {
    let Some(monitor) = MONITOR.get() else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let line = format_event(now, source, event, properties);
    let mut w = monitor.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = w.write_all(line.as_bytes()).and_then(|()| w.flush()) {
        log::warn!("event monitor: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_escaped_json_objects() {
        let line = format_event(
            std::time::Duration::new(5, 7),
            "vm",
            "paused",
            &[("why", "a \"quoted\"\nline\u{1}")],
        );
        assert_eq!(
            line,
            "{\"timestamp\":{\"secs\":5,\"nanos\":7},\"source\":\"vm\",\"event\":\"paused\",\"properties\":{\"why\":\"a \\\"quoted\\\"\\nline\\u0001\"}}\n"
        );
    }
}
