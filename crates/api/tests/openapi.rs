//! The server against its description, `docs/api.yaml`: every documented
//! operation is exercised, every answer's status is one the document lists
//! for that operation, and JSON bodies match the documented schemas.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::{Action, ApiError, Backend, Client};
use serde_json::{json, Value};

/// A VM stand-in with the real state rules.
#[derive(Default)]
struct FakeVm {
    paused: Mutex<bool>,
    stopped: Mutex<bool>,
    actions: Mutex<Vec<Action>>,
    typed: Mutex<Vec<u8>>,
}

impl Backend for FakeVm {
    fn act(&self, action: Action) -> Result<Value, ApiError> {
        self.actions.lock().unwrap().push(action.clone());
        let mut paused = self.paused.lock().unwrap();
        let mut stopped = self.stopped.lock().unwrap();
        if *stopped && action != Action::Info {
            return Err(ApiError::conflict("the VM has stopped"));
        }
        match action {
            Action::Pause if *paused => Err(ApiError::conflict("the VM is already paused")),
            Action::Pause => {
                *paused = true;
                Ok(Value::Null)
            }
            Action::Resume if !*paused => Err(ApiError::conflict("the VM is not paused")),
            Action::Resume => {
                *paused = false;
                Ok(Value::Null)
            }
            Action::Stop { .. } => Ok(Value::Null),
            Action::Snapshot { dir, .. } if dir.ends_with("full") => Err(ApiError::conflict(
                "/s/full already exists and is not an empty directory",
            )),
            Action::Snapshot { dir, .. } if dir.ends_with("broken") => {
                Err(ApiError::internal("cannot save the VM: no space left"))
            }
            Action::Snapshot { .. } => Ok(Value::Null),
            Action::SnapshotList => Ok(json!({
                "vm": "fake", "current": "0b1c2d3e4f50", "resume_pending": false,
                "snapshots": [fake_snapshot("s1", None, false), fake_snapshot("s2", Some("3f9c0a17b2de"), true)]
            })),
            Action::SnapshotTake { name, .. } if name.as_deref() == Some("s1") => {
                Err(ApiError::conflict("fake already has a snapshot named `s1`"))
            }
            Action::SnapshotTake { name, .. } => Ok(fake_snapshot(
                name.as_deref().unwrap_or("snap-3"),
                Some("0b1c2d3e4f50"),
                true,
            )),
            Action::SnapshotRestore { snapshot } | Action::SnapshotDelete { snapshot }
                if snapshot == "nope" =>
            {
                Err(ApiError::new(404, "fake has no snapshot named `nope`"))
            }
            Action::SnapshotRestore { snapshot } if snapshot == "offline" => {
                Ok(json!({"snapshot": "offline", "id": "3f9c0a17b2de", "state": "stopped"}))
            }
            Action::SnapshotRestore { snapshot } => {
                Ok(json!({"snapshot": snapshot, "id": "0b1c2d3e4f50", "state": "running"}))
            }
            Action::SnapshotDelete { snapshot } if snapshot == "cloned" => {
                Err(ApiError::conflict("the linked clone c1 is backed by it"))
            }
            Action::SnapshotDelete { .. } => Ok(Value::Null),
            Action::BalloonSet { bytes } if bytes > 256 << 20 => Err(ApiError::conflict(
                "a balloon of 1 bytes is larger than the guest's 268435456 bytes of RAM",
            )),
            Action::BalloonSet { .. } => Ok(Value::Null),
            Action::BalloonInfo => Ok(json!({
                "target_bytes": 67108864, "actual_bytes": 67108864,
                "stats": {"total_memory": 200000000u64, "available_memory": 100000000u64, "major_faults": 3},
                "stats_age_ms": 12,
                "counters": {"inflated_pages": 16384, "deflated_pages": 0,
                             "reported_bytes": 50331648, "released_bytes": 117440512, "refused": 0}
            })),
            Action::Kill => {
                *stopped = true;
                Ok(Value::Null)
            }
            Action::Info => {
                let state = if *paused { "paused" } else { "running" };
                Ok(json!({
                    "name": "fake", "state": state, "pid": 1, "config": {"cpus": 1},
                    "status": {
                        "state": state, "uptime_ms": 5, "paused_ms": 0, "vcpus": 1,
                        "memory": 268435456,
                        "counters": {"exits": 1, "pio_exits": 1, "mmio_exits": 0,
                                     "unhandled_accesses": 0, "assists": {"int3": 2}},
                        "devices": [{"kind": "block", "mmio_base": 3489660928u64, "irq": 5, "interrupts": 9}]
                    }
                }))
            }
        }
    }

    fn console(&self) -> Result<Box<dyn Read + Send>, ApiError> {
        Ok(Box::new(&b"HOSTVISOR-GUEST-READY cpus=1\n"[..]))
    }

    fn console_input(&self, bytes: &[u8]) -> Result<(), ApiError> {
        if bytes == b"to a guest that does not read" {
            return Err(ApiError::new(
                504,
                "the guest took 0 of 29 bytes of console input within 5s",
            ));
        }
        self.typed.lock().unwrap().extend_from_slice(bytes);
        Ok(())
    }
}

/// A snapshot as the list shows it.
fn fake_snapshot(name: &str, parent: Option<&str>, current: bool) -> Value {
    json!({
        "id": "0b1c2d3e4f50", "name": name, "parent": parent,
        "created": "2026-11-27T21:18:21.042Z", "description": "", "saved_state": true,
        "size": 135168, "current": current,
        "disks": [{"path": "/vms/fake/disks/disk0-a.qcow2", "removable": true}]
    })
}

fn spec() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.yaml"))
        .unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// Follows a `$ref` inside the document.
fn resolve<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let mut at = spec;
            for part in r.trim_start_matches("#/").split('/') {
                at = &at[part];
            }
            resolve(spec, at)
        }
        None => v,
    }
}

/// A small JSON Schema check: types, required properties, enums, items.
fn check_schema(spec: &Value, schema: &Value, value: &Value, at: &str) {
    let schema = resolve(spec, schema);
    if value.is_null() && schema.get("nullable") == Some(&Value::Bool(true)) {
        return;
    }
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_u64() || value.is_i64(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        assert!(ok, "{at}: expected {t}, got {value}");
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        assert!(options.contains(value), "{at}: {value} not in {options:?}");
    }
    for name in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let name = name.as_str().unwrap();
        assert!(
            value.get(name).is_some(),
            "{at}: required property {name} missing in {value}"
        );
    }
    if let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(Value::as_object),
        value.as_object(),
    ) {
        for (name, sub) in props {
            if let Some(v) = obj.get(name) {
                check_schema(spec, sub, v, &format!("{at}.{name}"));
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            check_schema(spec, items, v, &format!("{at}[{i}]"));
        }
    }
}

fn exercised_console(op: &Value) {
    assert_eq!(op["operationId"], "consoleStream");
}

#[test]
fn the_server_answers_as_its_openapi_document_says() {
    let spec = spec();
    let dir = std::env::temp_dir().join(format!("hv-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let vm = Arc::new(FakeVm::default());
    let _server = api::serve(&sock, vm.clone()).unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the socket is the owner's only");
    let client = Client::new(&sock);

    // (method, path, body, expected status)
    let cases: &[(&str, &str, &str, u16)] = &[
        ("GET", "/vm", "", 200),
        ("PUT", "/vm/resume", "", 409),
        ("PUT", "/vm/pause", "", 204),
        ("PUT", "/vm/pause", "{}", 409),
        ("GET", "/vm", "", 200),
        ("PUT", "/vm/resume", "{}", 204),
        ("PUT", "/vm/pause", "{not json", 400),
        ("PUT", "/vm/resume", r#"{"force": true}"#, 400),
        ("PUT", "/vm/stop", r#"{"timeout_s": "soon"}"#, 400),
        ("PUT", "/vm/stop", r#"{"timeout": 3}"#, 400),
        ("PUT", "/vm/stop", r#"{"timeout_s": 86401}"#, 400),
        (
            "PUT",
            "/vm/stop",
            r#"{"timeout_s": 18446744073709551615}"#,
            400,
        ),
        ("PUT", "/vm/kill", "[1,2]", 400),
        ("PUT", "/vm/snapshot", r#"{"dir": "/s/1"}"#, 204),
        ("PUT", "/vm/snapshot", r#"{"dir": "/s/full"}"#, 409),
        ("PUT", "/vm/snapshot", r#"{"dir": "/s/broken"}"#, 500),
        ("PUT", "/vm/snapshot", r#"{"dir": "relative"}"#, 400),
        ("GET", "/vm/snapshots", "", 200),
        ("PUT", "/vm/snapshots/take", "", 200),
        (
            "PUT",
            "/vm/snapshots/take",
            r#"{"name": "s3", "description": "x"}"#,
            200,
        ),
        ("PUT", "/vm/snapshots/take", r#"{"name": "s1"}"#, 409),
        ("PUT", "/vm/snapshots/take", r#"{"label": "s1"}"#, 400),
        ("PUT", "/vm/snapshots/restore", r#"{"snapshot": "s2"}"#, 200),
        (
            "PUT",
            "/vm/snapshots/restore",
            r#"{"snapshot": "offline"}"#,
            200,
        ),
        (
            "PUT",
            "/vm/snapshots/restore",
            r#"{"snapshot": "nope"}"#,
            404,
        ),
        ("PUT", "/vm/snapshots/restore", "", 400),
        ("PUT", "/vm/snapshots/delete", r#"{"snapshot": "s2"}"#, 204),
        (
            "PUT",
            "/vm/snapshots/delete",
            r#"{"snapshot": "nope"}"#,
            404,
        ),
        (
            "PUT",
            "/vm/snapshots/delete",
            r#"{"snapshot": "cloned"}"#,
            409,
        ),
        ("PUT", "/vm/snapshots/delete", r#"{"snapshot": 1}"#, 400),
        ("PUT", "/vm/balloon", r#"{"target_mib": 64}"#, 204),
        ("PUT", "/vm/balloon", r#"{"target_mib": 512}"#, 409),
        ("PUT", "/vm/balloon", r#"{"target": 64}"#, 400),
        ("GET", "/vm/balloon", "", 200),
        ("PUT", "/vm/stop", r#"{"timeout_s": 3}"#, 202),
        ("PUT", "/vm/console", "uname -a\n", 204),
        ("PUT", "/vm/console", "to a guest that does not read", 504),
        ("PUT", "/vm/kill", "", 204),
        // A stopped VM is in the wrong state for everything but GET.
        ("PUT", "/vm/pause", "", 409),
        ("PUT", "/vm/kill", "", 409),
    ];
    let mut exercised = BTreeSet::new();
    for &(method, path, body, want) in cases {
        let op = &spec["paths"][path][method.to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {path} is not in docs/api.yaml");
        exercised.insert((path.to_string(), method.to_ascii_lowercase()));
        let r = client.request(method, path, body).unwrap();
        assert_eq!(
            r.status,
            want,
            "{method} {path} {body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let documented = resolve(&spec, &op["responses"][want.to_string()]);
        assert!(
            documented.is_object(),
            "{method} {path}: status {want} is not documented"
        );
        if let Some(schema) = documented.pointer("/content/application~1json/schema") {
            let value = r.json().unwrap();
            check_schema(&spec, schema, &value, &format!("{method} {path}"));
        }
        if want >= 400 {
            assert!(!r.error_message().is_empty());
        }
    }
    // Every documented operation is exercised (the console stream below).
    exercised.insert(("/vm/console".to_string(), "get".to_string()));
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            assert!(
                exercised.contains(&(path.clone(), method.clone())),
                "{method} {path} untested"
            );
        }
    }
    assert!(vm.actions.lock().unwrap().contains(&Action::Stop {
        timeout: Duration::from_secs(3)
    }));
    // Undocumented paths and methods.
    assert_eq!(client.request("GET", "/nope", "").unwrap().status, 404);
    assert_eq!(client.request("POST", "/vm/pause", "").unwrap().status, 405);
    assert_eq!(
        client
            .request("PUT", "/vm/pause", &"x".repeat(70_000))
            .unwrap()
            .status,
        413
    );
    assert_eq!(vm.typed.lock().unwrap().as_slice(), b"uname -a\n");
    // Console input is a byte stream, not text: any bytes get through.
    let binary = b"\xff\xfe\x00\x1b[A\x80";
    let r = client.request_bytes("PUT", "/vm/console", binary).unwrap();
    assert_eq!(r.status, 204, "{}", r.error_message());
    assert_eq!(
        vm.typed.lock().unwrap().as_slice(),
        [&b"uname -a\n"[..], binary].concat()
    );
    // The console stream: a protocol switch, then the output.
    let op = &spec["paths"]["/vm/console"]["get"];
    exercised_console(op);
    let (status, mut stream) = client.stream("/vm/console").unwrap();
    assert_eq!(status, 101);
    assert!(op["responses"]["101"].is_object());
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert_eq!(text, "HOSTVISOR-GUEST-READY cpus=1\n");
    // Garbage instead of HTTP gets an error, and the server keeps serving.
    {
        use std::io::Write;
        let mut raw = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        raw.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        let _ = raw.read_to_end(&mut answer);
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.1 4"),
            "{answer:?}"
        );
    }
    assert_eq!(client.request("GET", "/vm", "").unwrap().status, 200);
    drop(_server);
    assert!(!sock.exists(), "the socket is removed with the server");
    std::fs::remove_dir_all(&dir).unwrap();
}
