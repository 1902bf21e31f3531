//! The per-VM API: HTTP/1.1 with JSON bodies on a Unix socket (mode 0600)
//! in the VM's directory, described in `docs/api.yaml`.
//!
//! The server only parses requests into [`Action`]s and hands them to a
//! [`Backend`] (the VM process), which answers; it knows nothing of KVM.
//! HTTP parsing is tiny_http's; the client is a few lines of HTTP/1.1 over
//! a `UnixStream`, since the usual Rust HTTP clients do not speak to Unix
//! sockets without an async runtime.

pub mod client;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use client::{Client, ClientError, Response};

/// Bodies larger than this are refused (413).
const MAX_BODY: u64 = 64 << 10;

/// The longest `PUT /vm/stop` waits for the guest, in seconds (a day);
/// larger values are refused (400).
pub const MAX_STOP_TIMEOUT_S: u64 = 24 * 60 * 60;
/// `PUT /vm/stop`'s wait when the body names none, in seconds.
pub const DEFAULT_STOP_TIMEOUT_S: u64 = 30;

/// What a request asks of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `GET /vm`: state, configuration, counters.
    Info,
    /// `PUT /vm/pause`
    Pause,
    /// `PUT /vm/resume`
    Resume,
    /// `PUT /vm/stop`: ask the guest to power off; kill it after `timeout`
    /// (at most [`MAX_STOP_TIMEOUT_S`]).
    Stop { timeout: Duration },
    /// `PUT /vm/kill`
    Kill,
    /// `PUT /vm/snapshot`: save the whole VM into `dir` (absolute; new or
    /// empty), pausing it meanwhile; each disk then continues on a new
    /// qcow2 overlay (`overlays`, one per disk or per writable disk,
    /// absolute) so the images
    /// the snapshot names never change.
    Snapshot {
        dir: PathBuf,
        overlays: Vec<PathBuf>,
    },
    /// `GET /vm/snapshots`: the managed VM's snapshot tree.
    SnapshotList,
    /// `PUT /vm/snapshots/take`: a named snapshot in the managed tree
    /// (the default name when `name` is `None`).
    SnapshotTake {
        name: Option<String>,
        description: String,
    },
    /// `PUT /vm/snapshots/restore`: the VM goes on from the snapshot (its
    /// running state, or powered off when it has none).
    SnapshotRestore { snapshot: String },
    /// `PUT /vm/snapshots/delete`: the snapshot's disk changes are merged
    /// into its neighbours while the VM runs on.
    SnapshotDelete { snapshot: String },
    /// `PUT /vm/balloon`: ask the guest to balloon to `bytes`.
    BalloonSet { bytes: u64 },
    /// `GET /vm/balloon`: the balloon's figures, with statistics the guest
    /// is asked for afresh.
    BalloonInfo,
}

/// `PUT /vm/balloon`'s body: the target in MiB or in bytes (one of them).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonBody {
    target_mib: Option<u64>,
    target_bytes: Option<u64>,
}

/// `PUT /vm/snapshots/take`'s body.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TakeBody {
    name: Option<String>,
    #[serde(default)]
    description: String,
}

/// `PUT /vm/snapshots/restore` and `/delete`'s body.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotKeyBody {
    snapshot: Option<String>,
}

/// The longest snapshot name or description the API takes (in bytes).
pub const MAX_SNAPSHOT_TEXT: usize = 4096;

/// `PUT /vm/snapshot`'s body.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    dir: Option<PathBuf>,
    #[serde(default)]
    overlays: Vec<PathBuf>,
}

/// The most overlays a snapshot request names (more than any VM's disks).
const MAX_OVERLAYS: usize = 64;

/// An error answer: the HTTP status and a message (sent as
/// `{"error": message}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, message)
    }
}

/// The error body every failed request gets.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// The VM behind the API.
pub trait Backend: Send + Sync + 'static {
    /// Carries out `action`; the value is the JSON body of a 200 answer
    /// (`Info` and the snapshot list, take and restore), or ignored (other
    /// actions answer 204, stop 202).
    fn act(&self, action: Action) -> Result<serde_json::Value, ApiError>;
    /// The console's output so far and as it comes, until the VM ends.
    fn console(&self) -> Result<Box<dyn Read + Send>, ApiError>;
    /// Types `bytes` (any bytes, not only text) on the guest's console.
    fn console_input(&self, bytes: &[u8]) -> Result<(), ApiError>;
}

/// The protocol name `GET /vm/console` switches to: after the 101 answer
/// the connection carries the console's output.
pub const CONSOLE_PROTOCOL: &str = "hostvisor-console";

/// `PUT /vm/stop`'s optional body.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StopBody {
    /// Seconds to wait for the guest before killing it (default 30, at
    /// most a day).
    timeout_s: Option<u64>,
}

/// The (empty) body other actions accept.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

/// Parses an optional JSON body: empty means the defaults.
fn parse_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The routes: which action a method and path ask for.
fn route(method: &str, path: &str, body: &[u8]) -> Result<Route, ApiError> {
    let path = path.split('?').next().unwrap_or(path);
    let known = [
        ("/vm", "GET"),
        ("/vm/console", "GET"),
        ("/vm/console", "PUT"),
        ("/vm/pause", "PUT"),
        ("/vm/resume", "PUT"),
        ("/vm/stop", "PUT"),
        ("/vm/kill", "PUT"),
        ("/vm/snapshot", "PUT"),
        ("/vm/snapshots", "GET"),
        ("/vm/snapshots/take", "PUT"),
        ("/vm/snapshots/restore", "PUT"),
        ("/vm/snapshots/delete", "PUT"),
        ("/vm/balloon", "GET"),
        ("/vm/balloon", "PUT"),
    ];
    let methods: Vec<&str> = known
        .iter()
        .filter(|(p, _)| *p == path)
        .map(|(_, m)| *m)
        .collect();
    if methods.is_empty() {
        return Err(ApiError::new(404, format!("no such resource: {path}")));
    }
    if !methods.contains(&method) {
        return Err(ApiError::new(
            405,
            format!("{path} takes {}, not {method}", methods.join(" or ")),
        ));
    }
    if path == "/vm/console" && method == "PUT" {
        return Ok(Route::ConsoleInput);
    }
    if path == "/vm/balloon" {
        if method == "GET" {
            return Ok(Route::Act(Action::BalloonInfo));
        }
        let b: BalloonBody = parse_body(body)?;
        let bytes = match (b.target_mib, b.target_bytes) {
            (Some(mib), None) => mib
                .checked_mul(1 << 20)
                .ok_or_else(|| ApiError::bad_request(format!("target_mib {mib} is too large")))?,
            (None, Some(bytes)) => bytes,
            _ => {
                return Err(ApiError::bad_request(
                    "the body must give one of `target_mib` and `target_bytes`",
                ))
            }
        };
        return Ok(Route::Act(Action::BalloonSet { bytes }));
    }
    Ok(match path {
        "/vm" => Route::Act(Action::Info),
        "/vm/console" => Route::Console,
        "/vm/stop" => {
            let b: StopBody = parse_body(body)?;
            let seconds = b.timeout_s.unwrap_or(DEFAULT_STOP_TIMEOUT_S);
            if seconds > MAX_STOP_TIMEOUT_S {
                return Err(ApiError::bad_request(format!(
                    "timeout_s is {seconds}; it must be at most {MAX_STOP_TIMEOUT_S} (a day)"
                )));
            }
            Route::Act(Action::Stop {
                timeout: Duration::from_secs(seconds),
            })
        }
        "/vm/snapshot" => {
            let b: SnapshotBody = parse_body(body)?;
            let dir = b
                .dir
                .ok_or_else(|| ApiError::bad_request("the body must name a `dir`"))?;
            if b.overlays.len() > MAX_OVERLAYS {
                return Err(ApiError::bad_request(format!(
                    "{} overlays; a VM has at most {MAX_OVERLAYS} disks",
                    b.overlays.len()
                )));
            }
            for path in std::iter::once(&dir).chain(&b.overlays) {
                if !path.is_absolute() {
                    return Err(ApiError::bad_request(format!(
                        "{} is not an absolute path (the VM process has its own working directory)",
                        path.display()
                    )));
                }
            }
            Route::Act(Action::Snapshot {
                dir,
                overlays: b.overlays,
            })
        }
        "/vm/snapshots" => Route::Act(Action::SnapshotList),
        "/vm/snapshots/take" => {
            let b: TakeBody = parse_body(body)?;
            if b.name.as_ref().map_or(0, String::len) > MAX_SNAPSHOT_TEXT
                || b.description.len() > MAX_SNAPSHOT_TEXT
            {
                return Err(ApiError::bad_request(format!(
                    "a snapshot's name and description are limited to {MAX_SNAPSHOT_TEXT} bytes"
                )));
            }
            Route::Act(Action::SnapshotTake {
                name: b.name,
                description: b.description,
            })
        }
        "/vm/snapshots/restore" | "/vm/snapshots/delete" => {
            let b: SnapshotKeyBody = parse_body(body)?;
            let snapshot = b
                .snapshot
                .filter(|s| !s.is_empty() && s.len() <= MAX_SNAPSHOT_TEXT)
                .ok_or_else(|| {
                    ApiError::bad_request("the body must name a `snapshot` (its name or id)")
                })?;
            Route::Act(if path.ends_with("restore") {
                Action::SnapshotRestore { snapshot }
            } else {
                Action::SnapshotDelete { snapshot }
            })
        }
        other => {
            let _: EmptyBody = parse_body(body)?;
            Route::Act(match other {
                "/vm/pause" => Action::Pause,
                "/vm/resume" => Action::Resume,
                _ => Action::Kill,
            })
        }
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Act(Action),
    Console,
    /// The request body is typed on the console.
    ConsoleInput,
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes())
        .expect("a constant, valid header")
}

fn content_type(value: &str) -> tiny_http::Header {
    header("Content-Type", value)
}

/// Copies console output to an upgraded connection, flushing as it goes,
/// until the output ends or the client goes away.
fn pump_console(
    mut stream: Box<dyn tiny_http::ReadWrite + Send>,
    mut output: Box<dyn Read + Send>,
) {
    let mut buf = [0u8; 4096];
    loop {
        match output.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream
                    .write_all(&buf[..n])
                    .and_then(|()| stream.flush())
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}

fn json_header() -> tiny_http::Header {
    content_type("application/json")
}

fn error_response(e: &ApiError) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let body = serde_json::to_vec(&ErrorBody {
        error: e.message.clone(),
    })
    .unwrap_or_default();
    tiny_http::Response::from_data(body)
        .with_status_code(e.status)
        .with_header(json_header())
}

fn handle(mut request: tiny_http::Request, backend: &dyn Backend) {
    let method = request.method().as_str().to_string();
    let url = request.url().to_string();
    let mut body = Vec::new();
    let too_big = request
        .body_length()
        .is_some_and(|n| u64::try_from(n).map_or(true, |n| n > MAX_BODY));
    let read = if too_big {
        Err(ApiError::new(
            413,
            format!("bodies are limited to {MAX_BODY} bytes"),
        ))
    } else {
        request
            .as_reader()
            .take(MAX_BODY + 1)
            .read_to_end(&mut body)
            .map_err(|e| ApiError::bad_request(format!("cannot read the body: {e}")))
            .and_then(|n| {
                if u64::try_from(n).map_or(true, |n| n > MAX_BODY) {
                    Err(ApiError::new(
                        413,
                        format!("bodies are limited to {MAX_BODY} bytes"),
                    ))
                } else {
                    Ok(())
                }
            })
    };
    let result = read.and_then(|()| route(&method, &url, &body));
    tracing::debug!(%method, %url, ok = result.is_ok(), "api request");
    let outcome = match result {
        Err(e) => request.respond(error_response(&e)),
        Ok(Route::Console) => match backend.console() {
            Ok(output) => {
                let response = tiny_http::Response::empty(101)
                    .with_header(header("Upgrade", CONSOLE_PROTOCOL))
                    .with_header(header("Connection", "Upgrade"));
                let stream = request.upgrade(CONSOLE_PROTOCOL, response);
                pump_console(stream, output);
                Ok(())
            }
            Err(e) => request.respond(error_response(&e)),
        },
        Ok(Route::ConsoleInput) => match backend.console_input(&body) {
            Ok(()) => request.respond(tiny_http::Response::empty(204)),
            Err(e) => request.respond(error_response(&e)),
        },
        Ok(Route::Act(action)) => match (action.clone(), backend.act(action)) {
            (_, Err(e)) => request.respond(error_response(&e)),
            (action, Ok(value)) => match action {
                Action::Info
                | Action::BalloonInfo
                | Action::SnapshotList
                | Action::SnapshotTake { .. }
                | Action::SnapshotRestore { .. } => request.respond(
                    tiny_http::Response::from_data(serde_json::to_vec(&value).unwrap_or_default())
                        .with_header(json_header()),
                ),
                Action::Stop { .. } => request.respond(tiny_http::Response::empty(202)),
                _ => request.respond(tiny_http::Response::empty(204)),
            },
        },
    };
    if let Err(e) = outcome {
        tracing::debug!("api: answering {method} {url} failed: {e}");
    }
}

/// A running API server; dropping it stops accepting requests and removes
/// the socket.
pub struct ServerHandle {
    server: Arc<tiny_http::Server>,
    path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Requests being answered.
    busy: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Answers being sent get out first (a restore that powers the VM
        // off answers as the process ends), within a bound: a console
        // stream ends with the VM, a stuck client must not hold the exit.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while self.busy.load(std::sync::atomic::Ordering::Acquire) > 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `path`, readable and writable by the owner only.
fn listen(path: &Path) -> std::io::Result<Arc<tiny_http::Server>> {
    let server = tiny_http::Server::http_unix(path)
        .map_err(|e| std::io::Error::other(format!("cannot listen on {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(Arc::new(server))
}

/// Serves the API on a Unix socket at `path` (replacing a stale one),
/// readable and writable by the owner only. Each request gets a thread, so
/// a console stream does not hold up other requests.
pub fn serve(path: &Path, backend: Arc<dyn Backend>) -> std::io::Result<ServerHandle> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = busy.clone();
    let (ready, made) = std::sync::mpsc::channel();
    let at = path.to_path_buf();
    // The server is made on the API thread, under its seccomp filter, so
    // the threads tiny_http starts (accept, connections) inherit it.
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            use std::sync::atomic::Ordering;
            seccomp::apply(seccomp::ThreadKind::Api);
            let s = match listen(&at) {
                Ok(s) => {
                    let _ = ready.send(Ok(s.clone()));
                    s
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            for request in s.incoming_requests() {
                let backend = backend.clone();
                let busy = counter.clone();
                busy.fetch_add(1, Ordering::AcqRel);
                let spawned = std::thread::Builder::new()
                    .name("api-request".into())
                    .spawn(move || {
                        handle(request, &*backend);
                        busy.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    counter.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!("api: cannot start a request thread: {e}");
                }
            }
        })?;
    let server = made
        .recv()
        .map_err(|_| std::io::Error::other("the API thread ended"))??;
    Ok(ServerHandle {
        server,
        path: path.to_path_buf(),
        thread: Some(thread),
        busy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_methods_and_paths_to_actions() {
        assert_eq!(route("GET", "/vm", b""), Ok(Route::Act(Action::Info)));
        assert_eq!(
            route("PUT", "/vm/pause", b""),
            Ok(Route::Act(Action::Pause))
        );
        assert_eq!(
            route("PUT", "/vm/resume", b"{}"),
            Ok(Route::Act(Action::Resume))
        );
        assert_eq!(
            route("PUT", "/vm/stop", br#"{"timeout_s": 5}"#),
            Ok(Route::Act(Action::Stop {
                timeout: Duration::from_secs(5)
            }))
        );
        assert_eq!(route("GET", "/vm/console", b""), Ok(Route::Console));
        assert_eq!(
            route("PUT", "/vm/console", b"ls\n"),
            Ok(Route::ConsoleInput)
        );
        assert_eq!(route("GET", "/nope", b"").unwrap_err().status, 404);
        assert_eq!(route("DELETE", "/vm", b"").unwrap_err().status, 405);
        assert_eq!(route("PUT", "/vm/stop", b"{oops").unwrap_err().status, 400);
        let unknown = route("PUT", "/vm/stop", br#"{"timeout": 5}"#).unwrap_err();
        assert_eq!(unknown.status, 400);
        assert!(
            unknown.message.contains("unknown field `timeout`"),
            "{unknown}"
        );
        assert_eq!(
            route("PUT", "/vm/kill", br#"{"now": true}"#)
                .unwrap_err()
                .status,
            400
        );
    }

    /// A stop timeout beyond a day is refused before anything happens
    /// (it used to overflow `Instant + Duration` in the stopper thread
    /// after the request was accepted, and the VM never stopped).
    #[test]
    fn snapshot_requests_name_absolute_paths() {
        assert_eq!(
            route(
                "PUT",
                "/vm/snapshot",
                br#"{"dir": "/s/1", "overlays": ["/d/a.qcow2"]}"#
            ),
            Ok(Route::Act(Action::Snapshot {
                dir: "/s/1".into(),
                overlays: vec!["/d/a.qcow2".into()],
            }))
        );
        assert_eq!(
            route("PUT", "/vm/snapshot", br#"{"dir": "/s/1"}"#),
            Ok(Route::Act(Action::Snapshot {
                dir: "/s/1".into(),
                overlays: vec![],
            }))
        );
        for bad in [
            &br#"{}"#[..],
            b"",
            br#"{"dir": "rel/ative"}"#,
            br#"{"dir": "/s", "overlays": ["x.qcow2"]}"#,
            br#"{"dir": "/s", "colour": 1}"#,
        ] {
            let e = route("PUT", "/vm/snapshot", bad).unwrap_err();
            assert_eq!(e.status, 400, "{e}");
        }
        let many = format!(
            r#"{{"dir": "/s", "overlays": [{}]}}"#,
            vec![r#""/o""#; 65].join(",")
        );
        assert_eq!(
            route("PUT", "/vm/snapshot", many.as_bytes())
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(route("GET", "/vm/snapshot", b"").unwrap_err().status, 405);
    }

    #[test]
    fn managed_snapshot_routes() {
        assert_eq!(
            route("GET", "/vm/snapshots", b""),
            Ok(Route::Act(Action::SnapshotList))
        );
        assert_eq!(
            route("PUT", "/vm/snapshots/take", b""),
            Ok(Route::Act(Action::SnapshotTake {
                name: None,
                description: String::new()
            }))
        );
        assert_eq!(
            route(
                "PUT",
                "/vm/snapshots/take",
                br#"{"name": "s1", "description": "before"}"#
            ),
            Ok(Route::Act(Action::SnapshotTake {
                name: Some("s1".into()),
                description: "before".into()
            }))
        );
        assert_eq!(
            route("PUT", "/vm/snapshots/restore", br#"{"snapshot": "s1"}"#),
            Ok(Route::Act(Action::SnapshotRestore {
                snapshot: "s1".into()
            }))
        );
        assert_eq!(
            route("PUT", "/vm/snapshots/delete", br#"{"snapshot": "s1"}"#),
            Ok(Route::Act(Action::SnapshotDelete {
                snapshot: "s1".into()
            }))
        );
        let long = format!(r#"{{"name": "{}"}}"#, "x".repeat(MAX_SNAPSHOT_TEXT + 1));
        for (path, bad) in [
            ("/vm/snapshots/take", long.as_bytes()),
            ("/vm/snapshots/take", br#"{"name": 1}"#),
            ("/vm/snapshots/take", br#"{"nme": "s"}"#),
            ("/vm/snapshots/restore", b""),
            ("/vm/snapshots/restore", br#"{"snapshot": ""}"#),
            ("/vm/snapshots/delete", br#"{"snapshot": "s", "x": 1}"#),
        ] {
            let e = route("PUT", path, bad).unwrap_err();
            assert_eq!(e.status, 400, "{path}: {e}");
        }
        assert_eq!(route("PUT", "/vm/snapshots", b"").unwrap_err().status, 405);
        assert_eq!(
            route("GET", "/vm/snapshots/take", b"").unwrap_err().status,
            405
        );
    }

    #[test]
    fn balloon_routes() {
        assert_eq!(
            route("GET", "/vm/balloon", b"").unwrap(),
            Route::Act(Action::BalloonInfo)
        );
        assert_eq!(
            route("PUT", "/vm/balloon", br#"{"target_mib": 64}"#).unwrap(),
            Route::Act(Action::BalloonSet { bytes: 64 << 20 })
        );
        assert_eq!(
            route("PUT", "/vm/balloon", br#"{"target_bytes": 4096}"#).unwrap(),
            Route::Act(Action::BalloonSet { bytes: 4096 })
        );
        for bad in [
            &b""[..],
            br#"{"target_mib": 1, "target_bytes": 1}"#,
            br#"{"target_mib": 18446744073709551615}"#,
            br#"{"target_mib": -1}"#,
            br#"{"size": 1}"#,
        ] {
            assert_eq!(
                route("PUT", "/vm/balloon", bad).unwrap_err().status,
                400,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(route("POST", "/vm/balloon", b"").unwrap_err().status, 405);
    }

    #[test]
    fn stop_timeouts_are_bounded() {
        let max = format!(r#"{{"timeout_s": {MAX_STOP_TIMEOUT_S}}}"#);
        assert_eq!(
            route("PUT", "/vm/stop", max.as_bytes()),
            Ok(Route::Act(Action::Stop {
                timeout: Duration::from_secs(MAX_STOP_TIMEOUT_S)
            }))
        );
        for huge in [MAX_STOP_TIMEOUT_S + 1, u64::MAX] {
            let body = format!(r#"{{"timeout_s": {huge}}}"#);
            let e = route("PUT", "/vm/stop", body.as_bytes()).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains("at most 86400"), "{e}");
        }
        assert_eq!(
            route("PUT", "/vm/stop", b""),
            Ok(Route::Act(Action::Stop {
                timeout: Duration::from_secs(DEFAULT_STOP_TIMEOUT_S)
            }))
        );
        // Out of u64 altogether, or negative: a JSON error, also 400.
        for bad in ["18446744073709551616", "-1"] {
            let body = format!(r#"{{"timeout_s": {bad}}}"#);
            assert_eq!(
                route("PUT", "/vm/stop", body.as_bytes())
                    .unwrap_err()
                    .status,
                400
            );
        }
    }
}
