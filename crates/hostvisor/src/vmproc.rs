//! The process behind a managed VM (`hostvisor start` runs it detached):
//! holds the VM's lock, serves its API, runs the VMM with the console in
//! `console.log`, and records how the VM ended.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::{Action, ApiError, Backend};
use vmm::control::{ControlError, ControlRequest, VmControl};
use vmm::{SerialConfig, VmOutcome};

use crate::store::{LastExit, VmDir};

struct VmBackend {
    name: String,
    config: serde_json::Value,
    control: VmControl,
    console: std::path::PathBuf,
    /// Set when the VMM has returned: console streams end.
    ended: Arc<AtomicBool>,
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
            Action::Stop { timeout } => {
                // No channel to ask the guest to power off exists yet (no
                // ACPI power button; the guest agent will provide one), so
                // the VM is resumed if paused and ended now.
                tracing::info!(
                    "stop requested (timeout {timeout:?}): the guest cannot be asked to power off yet; ending the VM"
                );
                let _ = self.control.request(ControlRequest::Resume);
                self.control
                    .request(ControlRequest::Kill)
                    .map_err(|e| self.error(e))?;
                return Ok(serde_json::Value::Null);
            }
        };
        let status = self.control.request(request).map_err(|e| self.error(e))?;
        Ok(match status {
            Some(status) => serde_json::json!({
                "name": self.name,
                "state": status.state,
                "pid": std::process::id(),
                "config": self.config,
                "status": status,
            }),
            None => serde_json::Value::Null,
        })
    }

    fn console(&self) -> Result<Box<dyn Read + Send>, ApiError> {
        let file = std::fs::File::open(&self.console)
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

/// Runs VM `name` in this process; returns the exit code.
pub fn run(name: &str) -> Result<i32, String> {
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
    let mut config = vm.config().map_err(|e| e.to_string())?;
    vm.begin_run().map_err(|e| e.to_string())?;
    let console = vm.console_log();
    std::fs::write(&console, b"").map_err(|e| format!("{}: {e}", console.display()))?;
    config.serial = SerialConfig::File(console.clone());
    let control = VmControl::new();
    let ended = Arc::new(AtomicBool::new(false));
    let backend = Arc::new(VmBackend {
        name: name.to_string(),
        config: serde_json::to_value(&config).unwrap_or_default(),
        control: control.clone(),
        console,
        ended: ended.clone(),
    });
    let server = api::serve(&vm.socket(), backend).map_err(|e| e.to_string())?;
    tracing::info!(vm = name, pid = std::process::id(), "VM process started");
    let result = vmm::run_controlled(&config, Some(&control));
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
                message: vmm::error_chain(e),
            },
            vmm::exit_code::HOSTVISOR_ERROR,
        ),
    };
    tracing::info!(vm = name, ?exit, "VM process ends");
    vm.end_run(&exit);
    if let Err(e) = result {
        return Err(vmm::error_chain(&e));
    }
    Ok(code)
}
