//! `exec`, `cp` and `guest-info`: a running managed VM's guest agent,
//! reached through the VM's vsock socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent::client::{AgentError, Client, ExecIo, Transport};
use agent::ExecRequest;

use crate::store::VmDir;
use crate::CliError;

/// `exec`'s own failures (as `docker exec`): 125 hostvisor or the agent
/// failed, 127 the command could not be started, 124 it timed out.
pub const EXEC_FAILED: i32 = 125;
pub const EXEC_NOT_STARTED: i32 = 127;
pub const EXEC_TIMED_OUT: i32 = 124;

/// The agent of running VM `name`, once it answers (up to `wait`).
fn agent(name: &str, wait: Duration) -> Result<Client, CliError> {
    let fail = |e: String| CliError::Failure(e);
    let vm = VmDir::open(name).map_err(|e| fail(e.to_string()))?;
    let config = vm.config().map_err(|e| fail(e.to_string()))?;
    let Some(socket) = vm.vsock_socket(&config) else {
        return Err(fail(format!(
            "{name} has no vsock device, so no guest agent; add one with `hostvisor edit {name} --vsock auto`"
        )));
    };
    crate::manage::require_running(&vm)?;
    // No separate readiness check: each request waits for the agent itself
    // (a round trip less per command).
    Ok(Client::new(Transport::Muxer(socket)).patient(wait))
}

/// An agent error as the CLI's.
fn agent_error(name: &str, wait: Duration, e: AgentError) -> CliError {
    CliError::Failure(match e {
        AgentError::Unreachable(why) => format!(
            "{name}: the guest agent did not answer within {} s ({why}); is hostvisor-agent running in the guest?",
            wait.as_secs()
        ),
        other => format!("{name}: {other}"),
    })
}

pub struct ExecArgs {
    pub name: String,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub timeout: Option<u64>,
    pub interactive: bool,
    pub wait: u64,
}

/// Runs a command in the guest; returns the exit code to leave with.
pub fn exec(args: ExecArgs) -> i32 {
    match exec_inner(args) {
        Ok(code) => code,
        Err(CliError::Usage(m)) => {
            eprintln!("hostvisor: {m}");
            vmm::exit_code::USAGE
        }
        Err(CliError::Failure(m)) => {
            eprintln!("hostvisor: {m}");
            EXEC_FAILED
        }
    }
}

fn exec_inner(args: ExecArgs) -> Result<i32, CliError> {
    let mut env = Vec::new();
    for e in &args.env {
        let (k, v) = e
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| CliError::Usage(format!("--env {e}: expected KEY=VALUE")))?;
        env.push((k.to_string(), v.to_string()));
    }
    let wait = Duration::from_secs(args.wait);
    let client = agent(&args.name, wait)?;
    let req = ExecRequest {
        argv: args.command.clone(),
        env,
        cwd: args.workdir,
        stdin: args.interactive,
        timeout_ms: args.timeout.map(|s| s.saturating_mul(1000)),
    };
    let stdin: Option<Box<dyn std::io::Read + Send>> = if args.interactive {
        Some(Box::new(std::io::stdin()))
    } else {
        None
    };
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let io = ExecIo {
        stdin,
        stdout: &mut out,
        stderr: &mut err,
    };
    match client.exec(&req, io) {
        Ok(status) if status.timed_out => {
            eprintln!(
                "hostvisor: `{}` timed out after {} s and was killed",
                args.command.join(" "),
                args.timeout.unwrap_or(0)
            );
            Ok(EXEC_TIMED_OUT)
        }
        Ok(status) => Ok(match (status.code, status.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => EXEC_FAILED,
        }),
        Err(AgentError::Remote(m)) if m.starts_with("cannot run") => {
            eprintln!("hostvisor: {m}");
            Ok(EXEC_NOT_STARTED)
        }
        Err(e) => Err(agent_error(&args.name, wait, e)),
    }
}

/// `NAME:PATH` → (NAME, PATH) when NAME could be a VM's name.
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (name, path) = arg.split_once(':')?;
    (crate::store::check_name(name).is_ok() && !path.is_empty()).then_some((name, path))
}

/// `cp SRC NAME:DST` or `cp NAME:SRC DST`.
pub fn cp(src: &str, dst: &str, wait: u64) -> Result<i32, CliError> {
    let wait = Duration::from_secs(wait);
    match (remote(src), remote(dst)) {
        (None, Some((name, path))) => {
            let local = Path::new(src);
            let mut path = path.to_string();
            if path.ends_with('/') {
                let file = local
                    .file_name()
                    .ok_or_else(|| CliError::Usage(format!("{src}: not a file")))?;
                path.push_str(&file.to_string_lossy());
            }
            let copied = agent(name, wait)?
                .upload(local, &path)
                .map_err(|e| agent_error(name, wait, e))?;
            report_copy(copied, &format!("{name}:{path}"));
            Ok(0)
        }
        (Some((name, path)), None) => {
            let mut local = PathBuf::from(dst);
            if local.is_dir() {
                let file = Path::new(path)
                    .file_name()
                    .ok_or_else(|| CliError::Usage(format!("{src}: not a file")))?;
                local.push(file);
            }
            let copied = agent(name, wait)?
                .download(path, &local)
                .map_err(|e| agent_error(name, wait, e))?;
            report_copy(copied, &local.display().to_string());
            Ok(0)
        }
        (Some(_), Some(_)) => Err(CliError::Usage(
            "copy between a VM and the host: one of SRC and DST is NAME:PATH, not both".into(),
        )),
        (None, None) => Err(CliError::Usage(
            "one of SRC and DST must be NAME:PATH (a VM's file)".into(),
        )),
    }
}

fn report_copy(c: agent::client::Copied, to: &str) {
    println!("copied {} bytes to {to}", c.bytes);
    if c.attempts > 1 {
        eprintln!(
            "hostvisor: warning: the copy arrived damaged {} time(s) (SHA-256 mismatch) and was made again; this host's virtualization is corrupting data",
            c.attempts - 1
        );
    }
}

fn mib(kib: u64) -> String {
    format!("{} MiB", kib / 1024)
}

pub fn guest_info(name: &str, json: bool, wait: u64) -> Result<i32, CliError> {
    let wait = Duration::from_secs(wait);
    let info = agent(name, wait)?
        .info()
        .map_err(|e| agent_error(name, wait, e))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&info).unwrap_or_default()
        );
        return Ok(0);
    }
    let host_ns = agent::now_ns();
    let addresses: Vec<String> = info
        .addresses
        .iter()
        .map(|a| format!("{} {}/{}", a.interface, a.address, a.prefix))
        .collect();
    println!("hostname: {}", info.hostname);
    println!("os: {}", info.os);
    println!("kernel: {} {}", info.kernel_release, info.kernel_version);
    println!("arch: {}", info.arch);
    println!("uptime: {:.1} s", info.uptime_secs);
    println!(
        "memory: {} total, {} available",
        mib(info.mem_total_kib),
        mib(info.mem_available_kib)
    );
    println!("addresses: {}", addresses.join(", "));
    println!(
        "clock: {:+.3} s from the host's",
        (info.time_unix_ns - host_ns) as f64 / 1e9
    );
    println!("agent: {}", info.agent_version);
    Ok(0)
}
