//! Sends arbitrary bytes to the per-VM API server, as a local client could:
//! request lines, headers, bodies (JSON or not), upgrades. The server must
//! answer or close, never panic or hang, and keep serving afterwards.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use api::{Action, ApiError, Backend};
use libfuzzer_sys::fuzz_target;

struct Stand;

impl Backend for Stand {
    fn act(&self, action: Action) -> Result<serde_json::Value, ApiError> {
        match action {
            Action::Info => Ok(serde_json::json!({"state": "running"})),
            Action::Pause => Err(ApiError::conflict("already paused")),
            _ => Ok(serde_json::Value::Null),
        }
    }
    fn console(&self) -> Result<Box<dyn Read + Send>, ApiError> {
        Ok(Box::new(&b"console\n"[..]))
    }
    fn console_input(&self, _: &[u8]) -> Result<(), ApiError> {
        Ok(())
    }
}

fn socket() -> &'static std::path::Path {
    static SERVER: OnceLock<(std::path::PathBuf, api::ServerHandle)> = OnceLock::new();
    let (path, _) = SERVER.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("hv-fuzz-api-{}.sock", std::process::id()));
        let server = api::serve(&path, Arc::new(Stand)).expect("the API server starts");
        (path, server)
    });
    path
}

fuzz_target!(|data: &[u8]| {
    let path = socket();
    let Ok(mut s) = UnixStream::connect(path) else {
        panic!("the API server stopped accepting connections");
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(data);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    // Still serving.
    let mut probe = UnixStream::connect(path).expect("the API server still accepts");
    probe
        .write_all(b"GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("a request can be sent");
    let _ = probe.set_read_timeout(Some(Duration::from_secs(5)));
    let mut ok = Vec::new();
    let _ = probe.read_to_end(&mut ok);
    assert!(ok.starts_with(b"HTTP/1.1 200"), "the server stopped answering: {:?}", String::from_utf8_lossy(&ok));
});
