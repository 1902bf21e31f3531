//! The process behind a managed VM (`hostvisor start` runs it detached):
//! holds the VM's lock, serves its API, runs the VMM with the console in
//! `console.log`, and records how the VM ended.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::{Action, ApiError, Backend};
use vmm::control::{ControlError, ControlRequest, VmControl};
use vmm::{SerialConfig, VmOutcome};

use crate::snapshot::served::{self, Next, Relaunch};
use crate::store::{LastExit, VmDir};

struct VmBackend {
    name: String,
    /// The definition `GET /vm` shows (a restore changes it).
    config: Mutex<serde_json::Value>,
    /// A managed VM's directory and the hand-over to its run loop for an
    /// in-place restore (None: `hostvisor run`, which has no snapshot
    /// tree).
    managed: Option<(VmDir, Arc<Relaunch>)>,
    control: VmControl,
    /// The console log (None: the console is `run`'s terminal).
    console: Option<std::path::PathBuf>,
    /// Set when the VMM has returned: console streams end.
    ended: Arc<AtomicBool>,
    /// The guest agent, when the VM has a vsock device.
    agent: Option<agent::client::Client>,
    /// Tells the clock keeper to check the guest's clock now.
    resync: std::sync::mpsc::Sender<()>,
}

impl VmBackend {
    /// A refused request as an API error: a VM that has ended (or is being
    /// stopped) is in the wrong state for it (409); one between a reset and
    /// its next boot is briefly unavailable (503).
    fn error(&self, e: ControlError) -> ApiError {
        match e {
            ControlError::Conflict(m) => ApiError::conflict(m),
            ControlError::NotRunning if self.ended.load(Ordering::Acquire) => {
                ApiError::conflict("the VM has stopped")
            }
            ControlError::NotRunning => ApiError::new(503, "the VM is not running"),
            ControlError::Failed(m) => ApiError::internal(m),
            ControlError::Timeout(m) => ApiError::new(504, m),
        }
    }

    /// The managed-snapshot requests (`/vm/snapshots...`).
    fn snapshots(&self, action: Action) -> Result<serde_json::Value, ApiError> {
        let Some((vm, relaunch)) = &self.managed else {
            return Err(ApiError::conflict(
                "only managed VMs keep a snapshot tree (hostvisor create); use PUT /vm/snapshot",
            ));
        };
        let control = &self.control;
        let value = match action {
            Action::SnapshotList => served::list(vm, control)?,
            Action::SnapshotTake { name, description } => {
                let m = served::take(vm, control, name, description)?;
                let _ = self.resync.send(());
                m
            }
            Action::SnapshotDelete { snapshot } => {
                served::delete(vm, control, &snapshot)?;
                let _ = self.resync.send(());
                serde_json::Value::Null
            }
            Action::SnapshotRestore { snapshot } => {
                served::restore(vm, control, relaunch, &snapshot)?
            }
            _ => return Err(ApiError::internal("not a snapshot request")),
        };
        Ok(value)
    }
}

/// Carries out a stop request.
struct Stopper {
    control: VmControl,
    ended: Arc<AtomicBool>,
    agent: Option<agent::client::Client>,
}

impl Stopper {
    fn stop(self, timeout: Duration) {
        let deadline = deadline_after(timeout);
        // A paused guest cannot power off: resume it first.
        let _ = self.control.request(ControlRequest::Resume);
        if !self.ask_agent_to_power_off(timeout) && !self.press_power_button(deadline) {
            let _ = self.control.request(ControlRequest::Kill);
        }
    }

    /// Presses the ACPI power button (a `pc` machine has one) and waits
    /// until `deadline` for the guest to power off; false on a machine
    /// without one or a guest that does not go down in time.
    fn press_power_button(&self, deadline: Instant) -> bool {
        if Instant::now() >= deadline {
            return false;
        }
        // Pressed again every few seconds, as a user would: a guest still
        // booting may not listen yet, and a second press does no harm.
        loop {
            if let Err(e) = self.control.request(ControlRequest::PowerButton) {
                tracing::info!("stop: cannot press the power button ({e}); ending the VM");
                return false;
            }
            tracing::info!("stop: pressed the ACPI power button; waiting for the guest");
            let next = Instant::now() + POWER_BUTTON_REPEAT;
            if self.wait_ended(next.min(deadline)) {
                return true;
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        tracing::info!("stop: the guest did not react to the power button in time; ending the VM");
        false
    }

    /// Waits until the VM ends or `deadline` passes.
    fn wait_ended(&self, deadline: Instant) -> bool {
        while Instant::now() < deadline {
            if self.ended.load(Ordering::Acquire) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.ended.load(Ordering::Acquire)
    }

    /// Asks the guest agent to power the guest off and waits up to
    /// `timeout` (in all: an agent that accepts the request and then
    /// hangs counts against it) for the VM to end; false when there is no
    /// agent, it does not answer, or the guest does not go down in time.
    fn ask_agent_to_power_off(&self, timeout: Duration) -> bool {
        let Some(agent) = self.agent.clone() else {
            tracing::info!("stop: no vsock device, so no agent to ask; ending the VM");
            return false;
        };
        let deadline = deadline_after(timeout);
        // The request runs on a thread of its own, left behind if the
        // agent never answers.
        let (answer, answered) = std::sync::mpsc::channel();
        let asked = std::thread::Builder::new()
            .name("stop-agent".into())
            .spawn(move || {
                let _ = answer.send(agent.shutdown(false));
            });
        if let Err(e) = asked {
            tracing::info!("stop: cannot ask the agent ({e}); ending the VM");
            return false;
        }
        match answered.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(())) => {}
            // The connection broke after the request went out: the usual
            // sign that the guest went down before the agent's answer
            // left it. Wait for the VM to end, as after an answer.
            Ok(Err(agent::client::AgentError::Frame(e))) => {
                tracing::info!("stop: the agent's connection ended ({e}); waiting for the guest");
            }
            Ok(Err(e)) => {
                tracing::info!("stop: {e}; ending the VM");
                return false;
            }
            Err(_) => {
                tracing::info!("stop: the agent did not answer within {timeout:?}; ending the VM");
                return false;
            }
        }
        if self.wait_ended(deadline) {
            return true;
        }
        tracing::info!("stop: the guest did not power off within {timeout:?}; ending the VM");
        false
    }
}

/// How often `stop` presses the power button of a guest that has not
/// reacted yet.
const POWER_BUTTON_REPEAT: Duration = Duration::from_secs(5);

/// `timeout` from now, at most [`api::MAX_STOP_TIMEOUT_S`] (the API
/// refuses more; this keeps `Instant + Duration` from overflowing whatever
/// a caller passes).
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    let timeout = timeout.min(Duration::from_secs(api::MAX_STOP_TIMEOUT_S));
    now.checked_add(timeout).unwrap_or(now)
}

/// How often the guest's clock is compared with the host's (as VirtualBox's
/// time sync does).
const CLOCK_CHECK: Duration = Duration::from_secs(10);
/// Drift beyond this is corrected.
const CLOCK_TOLERANCE: Duration = Duration::from_secs(1);

/// Keeps the guest's clock on the host's through the agent: once the
/// agent first answers, every [`CLOCK_CHECK`], and when asked (after a
/// resume). Ends with the VM.
fn keep_clock(
    agent: agent::client::Client,
    resync: std::sync::mpsc::Receiver<()>,
    ended: Arc<AtomicBool>,
) {
    use std::sync::mpsc::RecvTimeoutError;
    // Until the agent is up, look every 2 s.
    let mut wait = Duration::from_secs(2);
    let mut booted = false;
    let mut trimmer: Option<memory::overhead::Trimmer> = None;
    while !ended.load(Ordering::Acquire) {
        match agent.sync_time(CLOCK_TOLERANCE) {
            Ok(drift) => {
                if drift.abs() > CLOCK_TOLERANCE.as_secs_f64() {
                    tracing::info!("guest clock was {drift:+.3} s off the host's; set");
                }
                wait = CLOCK_CHECK;
                if !std::mem::replace(&mut booted, true) {
                    // The guest is up (its agent answered): the code that
                    // only booting it ran can go (docs/memory.md).
                    let _ = memory::overhead::release_startup_memory();
                    trimmer = Some(memory::overhead::Trimmer::new());
                } else if let Some(t) = trimmer.as_mut() {
                    // A check runs ~1.5 MiB of code (the agent client, the
                    // vsock device's muxer and queues) every CLOCK_CHECK:
                    // give it back now rather than at the run loop's next
                    // tick, so an idle VM does not sit above its budget for
                    // part of every period.
                    t.tick();
                }
            }
            Err(agent::client::AgentError::Unreachable(_)) => {}
            Err(e) => tracing::debug!("clock check: {e}"),
        }
        match resync.recv_timeout(wait) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl Backend for VmBackend {
    fn act(&self, action: Action) -> Result<serde_json::Value, ApiError> {
        let request = match action {
            Action::Info => ControlRequest::Info,
            Action::Pause => ControlRequest::Pause,
            Action::Resume => ControlRequest::Resume,
            Action::Kill => ControlRequest::Kill,
            Action::Snapshot { dir, overlays } => {
                ControlRequest::Snapshot(vmm::SnapshotRequest { dir, overlays })
            }
            Action::SnapshotList
            | Action::SnapshotTake { .. }
            | Action::SnapshotRestore { .. }
            | Action::SnapshotDelete { .. } => return self.snapshots(action),
            Action::BalloonSet { bytes } => {
                self.control.balloon_set(bytes).map_err(|e| self.error(e))?;
                return Ok(serde_json::Value::Null);
            }
            Action::BalloonInfo => {
                let status = self
                    .control
                    .balloon_status(Some(crate::balloon::FRESH_STATS_WAIT))
                    .map_err(|e| self.error(e))?;
                return serde_json::to_value(status).map_err(|e| ApiError::internal(e.to_string()));
            }
            Action::Stop { timeout } => {
                // Accepted now (202); the guest gets `timeout` to power off
                // before the VM is ended.
                let stopper = Stopper {
                    control: self.control.clone(),
                    ended: self.ended.clone(),
                    agent: self.agent.clone(),
                };
                std::thread::spawn(move || stopper.stop(timeout));
                return Ok(serde_json::Value::Null);
            }
        };
        // The guest's clock stood still while paused (a snapshot pauses
        // it too).
        let resumed = matches!(
            request,
            ControlRequest::Resume | ControlRequest::Snapshot(_)
        );
        let status = self.control.request(request).map_err(|e| self.error(e))?;
        if resumed {
            let _ = self.resync.send(());
        }
        Ok(match status {
            Some(status) => serde_json::json!({
                "name": self.name,
                "state": status.state,
                "pid": std::process::id(),
                "config": *self.config.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
                "status": status,
            }),
            None => serde_json::Value::Null,
        })
    }

    fn console(&self) -> Result<Box<dyn Read + Send>, ApiError> {
        let path = self.console.as_ref().ok_or_else(|| {
            ApiError::conflict("this VM's console is the terminal it was run from")
        })?;
        let file = std::fs::File::open(path)
            .map_err(|e| ApiError::internal(format!("the console log: {e}")))?;
        Ok(Box::new(Follow {
            file,
            ended: self.ended.clone(),
        }))
    }

    fn console_input(&self, bytes: &[u8]) -> Result<(), ApiError> {
        self.control.console_input(bytes).map_err(|e| self.error(e))
    }
}

/// Reads a growing file until `ended` (then to its end).
pub struct Follow {
    pub file: std::fs::File,
    pub ended: Arc<AtomicBool>,
}

impl Read for Follow {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.file.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            if self.ended.load(Ordering::Acquire) {
                // One last read: what was written before the end.
                return self.file.read(buf);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Once the agent of a VM resumed from a snapshot answers, tells it so
/// (on a thread of its own): fresh randomness for its RNG (two resumes of
/// one snapshot must not share a random stream), its clock stepped to the
/// host's, and — for a clone resumed from its source's state — its own
/// hostname and machine id. Without the agent (no vsock) nothing can be
/// told; with an older agent the clock is still stepped.
pub fn announce_restore(
    vsock: &std::path::Path,
    identity: Option<agent::Identity>,
    new_macs: Vec<(usize, net::MacAddr)>,
) {
    let client = agent::client::Client::new(agent::client::Transport::Muxer(vsock.to_path_buf()))
        .patient(Duration::from_secs(60));
    std::thread::spawn(move || {
        seccomp::apply(seccomp::ThreadKind::Api);
        match client.announce_restore(identity.as_ref()) {
            Ok(report) => tracing::info!(
                credited = report.reseeded.credited,
                clock_drift_secs = report.clock_drift_secs,
                identity = report.identity_set,
                "the restored guest was reseeded and its clock set"
            ),
            Err(e) => tracing::warn!("cannot tell the restored guest it was restored: {e}"),
        }
        // A clone's NICs have their own addresses; the guest's driver read
        // the source's when it probed (virtio-net lets it change them live).
        for (index, mac) in new_macs {
            let argv = [
                "ip",
                "link",
                "set",
                "dev",
                &format!("eth{index}"),
                "address",
            ]
            .iter()
            .map(ToString::to_string)
            .chain([mac.to_string()])
            .collect();
            let request = agent::ExecRequest {
                argv,
                env: vec![],
                cwd: None,
                stdin: false,
                timeout_ms: Some(10_000),
            };
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let io = agent::client::ExecIo {
                stdin: None,
                stdout: &mut out,
                stderr: &mut err,
            };
            match client.exec(&request, io) {
                Ok(status) if status.code == Some(0) => {
                    tracing::info!("eth{index} of the restored guest is now {mac}");
                }
                Ok(status) => tracing::warn!(
                    "cannot give eth{index} its address {mac}: {status:?} {}",
                    String::from_utf8_lossy(&err)
                ),
                Err(e) => tracing::warn!("cannot give eth{index} its address {mac}: {e}"),
            }
        }
    });
}

/// The NICs whose address in `config` differs from the one the guest had
/// when `saved` was taken (a clone's), with their new addresses.
fn changed_macs(config: &vmm::VmConfig, saved: &vmm::VmSnapshot) -> Vec<(usize, net::MacAddr)> {
    config
        .nets
        .iter()
        .zip(&saved.macs)
        .enumerate()
        .filter_map(|(i, (nic, old))| {
            let mac = nic.mac?;
            (mac.to_string() != *old).then_some((i, mac))
        })
        .collect()
}

/// What `hostvisor run` serves its API with.
pub struct Served {
    pub control: VmControl,
    pub ended: Arc<AtomicBool>,
    _server: api::ServerHandle,
}

/// Serves the per-VM API of an unmanaged VM (`hostvisor run
/// --api-socket PATH`) for `config`: pause, resume, kill, snapshot,
/// status; stop through the agent when it has vsock.
pub fn serve_unmanaged(config: &vmm::VmConfig, socket: &std::path::Path) -> Result<Served, String> {
    // Before the API thread starts: it takes its filter.
    seccomp::enable(config.seccomp).map_err(|e| vmm::error_chain(&e))?;
    let control = VmControl::new();
    let ended = Arc::new(AtomicBool::new(false));
    let agent = config
        .vsock
        .as_ref()
        .map(|v| agent::client::Client::new(agent::client::Transport::Muxer(v.socket_path())));
    let (resync, resync_rx) = std::sync::mpsc::channel();
    if let Some(agent) = agent.clone() {
        let ended = ended.clone();
        std::thread::spawn(move || {
            seccomp::apply(seccomp::ThreadKind::Api);
            keep_clock(agent, resync_rx, ended)
        });
    }
    let backend = Arc::new(VmBackend {
        name: "run".to_string(),
        config: Mutex::new(serde_json::to_value(config).unwrap_or_default()),
        managed: None,
        control: control.clone(),
        console: None,
        ended: ended.clone(),
        agent,
        resync,
    });
    let server = api::serve(socket, backend).map_err(|e| format!("{}: {e}", socket.display()))?;
    Ok(Served {
        control,
        ended,
        _server: server,
    })
}

/// The identity a definition gives its guest on the kernel command line
/// (`hostvisor.hostname=`, `hostvisor.machine_id=`, as a clone's has),
/// which a guest resumed from a snapshot did not boot with and must be
/// told.
fn identity_in(config: &vmm::VmConfig) -> Option<agent::Identity> {
    let words = config.append.as_deref().unwrap_or("").split_whitespace();
    let mut identity = agent::Identity {
        hostname: None,
        machine_id: None,
    };
    for word in words {
        if let Some(h) = word.strip_prefix("hostvisor.hostname=") {
            identity.hostname = Some(h.to_string());
        } else if let Some(m) = word.strip_prefix("hostvisor.machine_id=") {
            identity.machine_id = Some(m.to_string());
        }
    }
    (identity.hostname.is_some() || identity.machine_id.is_some()).then_some(identity)
}

/// The VM's definition as this process runs it: the console into its log,
/// its vsock socket in its directory; with that socket's path.
fn machine_config(vm: &VmDir) -> Result<(vmm::VmConfig, Option<std::path::PathBuf>), String> {
    let mut config = vm.config().map_err(|e| e.to_string())?;
    let vsock_socket = vm.vsock_socket(&config);
    if let (Some(v), Some(socket)) = (config.vsock.as_mut(), &vsock_socket) {
        v.socket = Some(socket.clone());
    }
    config.serial = SerialConfig::File(vm.console_log());
    Ok((config, vsock_socket))
}

/// Runs VM `name` in this process (resuming it from the saved state in
/// `restore` if given); returns the exit code.
pub fn run(name: &str, restore: Option<&std::path::Path>) -> Result<i32, String> {
    let vm = VmDir::open(name).map_err(|e| e.to_string())?;
    // `list` and other commands take the lock for an instant to look at
    // the state: retry briefly before concluding that a VM process has it.
    let deadline = Instant::now() + Duration::from_secs(2);
    let _lock = loop {
        match vm.try_lock().map_err(|e| e.to_string())? {
            Some(lock) => break lock,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            None => return Err(format!("{name} is already running")),
        }
    };
    let (mut config, vsock_socket) = machine_config(&vm)?;
    // Into the VM's own cgroup before any thread starts (all move anyway).
    if let Some(group) =
        crate::cgroup::enter(name, &config.limits).map_err(|e| vmm::error_chain(&e))?
    {
        tracing::info!(vm = name, cgroup = %group.display(), "limits applied");
    }
    vm.begin_run().map_err(|e| e.to_string())?;
    let console = vm.console_log();
    std::fs::write(&console, b"").map_err(|e| format!("{}: {e}", console.display()))?;
    // Confined before any thread starts: the VM's files and its directory
    // (snapshots, logs, sockets). docs/security.md.
    // The store is read: a snapshot delete looks for linked clones on
    // this VM's layers in the other VMs' definitions and chains.
    let extra = vmm::sandbox::Extra {
        read_write: vec![vm.path("")],
        read: vec![crate::store::root()],
        ..Default::default()
    };
    vmm::sandbox::enter(&config, &extra).map_err(|e| vmm::error_chain(&e))?;
    // Before the API thread starts: it takes its filter.
    seccomp::enable(config.seccomp).map_err(|e| vmm::error_chain(&e))?;
    let control = VmControl::new();
    let ended = Arc::new(AtomicBool::new(false));
    let agent =
        vsock_socket.map(|s| agent::client::Client::new(agent::client::Transport::Muxer(s)));
    let (resync, resync_rx) = std::sync::mpsc::channel();
    if let Some(agent) = agent.clone() {
        let ended = ended.clone();
        std::thread::spawn(move || {
            seccomp::apply(seccomp::ThreadKind::Api);
            keep_clock(agent, resync_rx, ended)
        });
    }
    let relaunch = Arc::new(Relaunch::default());
    let backend = Arc::new(VmBackend {
        name: name.to_string(),
        config: Mutex::new(serde_json::to_value(&config).unwrap_or_default()),
        managed: Some((vm.clone(), relaunch.clone())),
        control: control.clone(),
        console: Some(console),
        ended: ended.clone(),
        agent,
        resync,
    });
    let server = api::serve(&vm.socket(), backend.clone()).map_err(|e| e.to_string())?;
    tracing::info!(vm = name, pid = std::process::id(), "VM process started");
    let mut restore = restore.map(std::path::Path::to_path_buf);
    let result = loop {
        // The snapshot is read once per machine: for the addresses to
        // announce and for the VMM to restore from.
        let spec = restore
            .as_deref()
            .map(|dir| vmm::RestoreSpec::read(dir, vmm::snapshot::Load::Lazy))
            .transpose();
        let spec = match spec {
            Ok(spec) => spec,
            Err(e) => break Err(vmm::error_chain(&vmm::VmmError::Snapshot(e))),
        };
        if let (Some(from), Some(socket)) = (&spec, config.vsock.as_ref()) {
            let macs = changed_macs(&config, &from.snapshot);
            announce_restore(&socket.socket_path(), identity_in(&config), macs);
        }
        let result =
            vmm::run_vm(&config, Some(&control), spec.as_ref()).map_err(|e| vmm::error_chain(&e));
        // A restore through the API ended this machine: go on from the
        // snapshot, in this process (its API and lock stay).
        match relaunch.after_run() {
            Some(Next::Run(state)) => match machine_config(&vm) {
                Ok((c, _)) => {
                    tracing::info!(vm = name, "restored from a snapshot; running again");
                    config = c;
                    *backend
                        .config
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        serde_json::to_value(&config).unwrap_or_default();
                    restore = state;
                }
                Err(e) => break Err(format!("after restoring a snapshot: {e}")),
            },
            Some(Next::Exit) | None => break result,
        }
    };
    ended.store(true, Ordering::Release);
    drop(server);
    let (exit, code) = match &result {
        Ok(outcome) => (
            LastExit {
                crashed: matches!(outcome, VmOutcome::Crashed(_) | VmOutcome::DebugExit(1..)),
                message: format!("{outcome:?}"),
            },
            outcome.exit_code(),
        ),
        Err(e) => (
            LastExit {
                crashed: true,
                message: e.clone(),
            },
            vmm::exit_code::HOSTVISOR_ERROR,
        ),
    };
    tracing::info!(vm = name, ?exit, "VM process ends");
    vm.end_run(&exit);
    result?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A huge stop timeout (it once overflowed `Instant + Duration` in the
    /// stopper thread, after the API had answered 202) makes a deadline a
    /// day away at most.
    #[test]
    fn stop_deadlines_are_bounded() {
        let now = Instant::now();
        for t in [Duration::MAX, Duration::from_secs(u64::MAX)] {
            let d = deadline_after(t);
            assert!(d >= now);
            assert!(d <= Instant::now() + Duration::from_secs(api::MAX_STOP_TIMEOUT_S));
        }
        let d = deadline_after(Duration::from_secs(5));
        assert!(d > now && d <= Instant::now() + Duration::from_secs(5));
    }

    /// An agent that takes the power-off request and never answers does
    /// not hold the stop past its timeout (it used to wait forever, and
    /// the VM was never killed).
    #[test]
    fn a_hung_agent_does_not_hold_up_a_stop() {
        use std::io::{BufRead, Write};
        let dir = std::env::temp_dir().join(format!("hv-stop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // A muxer that connects, then an agent that reads and says nothing.
        let hung = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            (&stream).write_all(b"OK 1024\n").unwrap();
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut reader, &mut sink);
        });
        let stopper = Stopper {
            control: VmControl::new(),
            ended: Arc::new(AtomicBool::new(false)),
            agent: Some(agent::client::Client::new(agent::client::Transport::Muxer(
                path,
            ))),
        };
        let started = Instant::now();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            stopper.stop(Duration::from_secs(1));
            let _ = done.send(());
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(20)).is_ok(),
            "the stop waited for the hung agent"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&dir);
        drop(hung);
    }

    /// The guest goes down before the agent's answer to the power-off
    /// leaves it (the connection just ends): the stop waits for the VM to
    /// end instead of killing it (a kill there recorded a clean power-off
    /// as "Killed").
    #[test]
    fn a_guest_that_goes_down_before_answering_is_not_killed() {
        goes_down_before_answering(true);
    }

    /// The same when not even the agent's `Hello` left the guest (the
    /// request went out with the client's: the connection just closes).
    #[test]
    fn a_guest_that_goes_down_before_its_hello_is_not_killed() {
        goes_down_before_answering(false);
    }

    fn goes_down_before_answering(say_hello: bool) {
        use std::io::{BufRead, Write};
        let dir =
            std::env::temp_dir().join(format!("hv-stop-eof-{say_hello}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let ended = Arc::new(AtomicBool::new(false));
        let down = ended.clone();
        // A muxer and an agent that says hello, reads the request and is
        // gone; the VM ends a moment later.
        let agent = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            (&stream).write_all(b"OK 1024\n").unwrap();
            let _: agent::ToAgent = agent::recv(&mut reader).unwrap();
            if say_hello {
                let hello = agent::FromAgent::Hello {
                    protocol: agent::PROTOCOL_VERSION,
                    version: agent::VERSION.into(),
                };
                agent::send(&mut (&stream), &hello).unwrap();
            }
            let _: agent::ToAgent = agent::recv(&mut reader).unwrap();
            drop(reader);
            drop(stream);
            std::thread::sleep(Duration::from_millis(300));
            down.store(true, Ordering::Release);
        });
        let stopper = Stopper {
            control: VmControl::new(),
            ended,
            agent: Some(agent::client::Client::new(agent::client::Transport::Muxer(
                path,
            ))),
        };
        assert!(
            stopper.ask_agent_to_power_off(Duration::from_secs(20)),
            "the stop gave up on a guest that was going down"
        );
        agent.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
