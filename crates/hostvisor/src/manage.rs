//! Managed VMs: `create`, `list`, `show`, `start`, `console`, `stop`,
//! `kill`, `pause`, `resume`, `edit`, `logs`, `delete`. The commands read
//! the store and talk to running VMs through their API (the CLI is a
//! client of it like any other).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use api::Client;
use vmm::config::ResetAction;

use crate::store::{VmDir, VmState};
use crate::CliError;

fn fail(e: impl std::fmt::Display) -> CliError {
    CliError::Failure(e.to_string())
}

/// Changes `edit` makes; what is not given stays.
#[derive(Debug, clap::Args)]
pub struct EditArgs {
    /// on, log or off: the VMM threads' seccomp filters.
    #[arg(long, value_name = "MODE")]
    pub seccomp: Option<seccomp::SeccompMode>,
    /// microvm or pc.
    #[arg(long, value_name = "TYPE")]
    pub machine: Option<vmm::MachineType>,
    /// bios, uefi, an image file, or none (boot the kernel directly).
    #[arg(long, value_name = "FIRMWARE")]
    pub firmware: Option<String>,
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    #[arg(long, value_name = "STR")]
    pub append: Option<String>,
    #[arg(long, value_name = "N", value_parser = crate::parse_cpus)]
    pub cpus: Option<u32>,
    /// SIZE[,backing=anon|memfd|hugetlb][,prealloc][,lock][,merge]; a
    /// size alone keeps the options.
    #[arg(long, value_name = "SIZE[,OPTIONS]", value_parser = crate::parse_memory)]
    pub memory: Option<crate::MemoryArg>,
    #[arg(long, value_name = "DEVICE", value_parser = crate::parse_console)]
    pub console: Option<vmm::ConsoleDevice>,
    #[arg(long, value_name = "ACTION", value_parser = crate::parse_reset)]
    pub on_reset: Option<ResetAction>,
    /// Replaces all disks (repeatable).
    #[arg(long, value_name = "OPTIONS")]
    pub disk: Vec<vmm::DiskConfig>,
    /// Removes all disks.
    #[arg(long, conflicts_with = "disk")]
    pub no_disks: bool,
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub rng: Option<bool>,
    /// cid=N[,socket=PATH][,pool=PORT[:PORT...]], auto (a free CID, the
    /// agent's port pooled) or none.
    #[arg(long, value_name = "OPTIONS")]
    pub vsock: Option<crate::VsockArg>,
    /// Replaces all NICs (repeatable); `none` removes them.
    #[arg(long, value_name = "OPTIONS")]
    pub net: Vec<crate::NetArg>,
    /// [reporting=on|off][,deflate-on-oom=on|off][,stats=on|off|SECONDS],
    /// on or off.
    #[arg(long, value_name = "OPTIONS")]
    pub balloon: Option<crate::balloon::BalloonArg>,
    /// Replaces all shared directories (repeatable):
    /// HOSTDIR:TAG[,readonly][,cache=...][,owner=UID:GID][,mount=PATH].
    #[arg(long, value_name = "OPTIONS")]
    pub share: Vec<vmm::ShareConfig>,
    /// Removes all shared directories.
    #[arg(long, conflicts_with = "share")]
    pub no_shares: bool,
    #[command(flatten)]
    pub limits: crate::cgroup::LimitArgs,
}

/// Gives every NIC without a MAC the VM's own: derived from its name and
/// the NIC's place, so it is the same at every start and after edits.
fn assign_macs(name: &str, nets: &mut [vmm::NetConfig]) {
    for (i, nic) in nets.iter_mut().enumerate() {
        nic.mac
            .get_or_insert_with(|| net::MacAddr::for_vm(name, i as u32));
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err("use on or off".into()),
    }
}

fn client(vm: &VmDir) -> Client {
    Client::new(&vm.socket())
}

/// The state, with "running" refined to "paused" by asking the VM.
fn live_state(vm: &VmDir) -> Result<VmState, CliError> {
    let state = vm.state().map_err(fail)?;
    if state == VmState::Running {
        if let Ok(r) = client(vm).request("GET", "/vm", "") {
            if let Ok(v) = r.json() {
                if v["state"] == "paused" {
                    return Ok(VmState::Paused);
                }
            }
        }
    }
    Ok(state)
}

fn running(vm: &VmDir) -> Result<bool, CliError> {
    Ok(matches!(
        vm.state().map_err(fail)?,
        VmState::Running | VmState::Paused
    ))
}

pub fn create(
    name: &str,
    mut config: vmm::VmConfig,
    vsock: Option<crate::VsockArg>,
    default_nic: bool,
    image: Option<crate::cloudinit::Prepared>,
) -> Result<i32, CliError> {
    // A managed VM gets a NAT NIC unless told otherwise, as VirtualBox's do.
    if default_nic {
        config.nets = vec![vmm::NetConfig::new(vmm::NetMode::Nat {
            hostfwd: Vec::new(),
        })];
    }
    assign_macs(name, &mut config.nets);
    // A managed VM gets the agent's channel unless told otherwise.
    if matches!(vsock, None | Some(crate::VsockArg::Auto)) {
        config.vsock = Some(vmm::VsockConfig {
            cid: crate::store::free_cid().map_err(fail)?,
            socket: None,
            pool: vec![agent::AGENT_PORT],
        });
    }
    if let Some(image) = &image {
        image.attach(&crate::store::root().join(name), &mut config);
    }
    let vm = VmDir::create(name, &config).map_err(fail)?;
    if let Some(image) = &image {
        // The name is ours now: its overlay and seed go in its directory.
        if let Err(e) = image.install(&vm.dir, &config) {
            let _ = std::fs::remove_dir_all(&vm.dir);
            return Err(e);
        }
    }
    if let Err(e) = give_to_user(&vm, &config) {
        let _ = std::fs::remove_dir_all(&vm.dir);
        return Err(e);
    }
    println!("created {} ({})", vm.name, vm.dir.display());
    Ok(0)
}

/// With `--user`, created by root: the VM's directory (and what is in it)
/// becomes the user's, and the store searchable by it, so that the VM
/// process can write snapshots, logs and overlays after it switched.
fn give_to_user(vm: &VmDir, config: &vmm::VmConfig) -> Result<(), CliError> {
    let Some(user) = &config.sandbox.user else {
        return Ok(());
    };
    let creds = vmm::sandbox::Credentials::resolve(user)
        .map_err(|e| CliError::Usage(format!("--user: {e}")))?;
    // SAFETY: geteuid only returns a value.
    if unsafe { libc::geteuid() } != 0 {
        return Err(CliError::Usage(
            "--user is for VMs started as root; as another user, the VM runs as you".into(),
        ));
    }
    fn chown_all(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
        if std::fs::symlink_metadata(path)?.is_dir() {
            for entry in std::fs::read_dir(path)? {
                chown_all(&entry?.path(), uid, gid)?;
            }
        }
        Ok(())
    }
    chown_all(&vm.dir, creds.uid, creds.gid).map_err(|e| fail_io(&vm.dir, e))?;
    let root = crate::store::root();
    let mode = std::fs::metadata(&root)
        .map_err(|e| fail_io(&root, e))?
        .permissions()
        .mode();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode | 0o011))
        .map_err(|e| fail_io(&root, e))
}

fn fail_io(path: &Path, e: std::io::Error) -> CliError {
    CliError::Failure(format!("{}: {e}", path.display()))
}

pub fn list(json: bool) -> Result<i32, CliError> {
    let mut rows = Vec::new();
    for vm in VmDir::all().map_err(fail)? {
        let state = live_state(&vm)?;
        let config = vm.config().ok();
        rows.push(serde_json::json!({
            "name": vm.name,
            "state": state,
            "cpus": config.as_ref().map(|c| c.cpus),
            "memory": config.as_ref().map(|c| c.memory.to_string()),
            "pid": if matches!(state, VmState::Running | VmState::Paused) { vm.pid() } else { None },
        }));
    }
    if json {
        println!("{}", serde_json::Value::Array(rows));
    } else {
        println!(
            "{:<24} {:<9} {:>4} {:>7}",
            "NAME", "STATE", "CPUS", "MEMORY"
        );
        for r in rows {
            println!(
                "{:<24} {:<9} {:>4} {:>7}",
                r["name"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or(""),
                r["cpus"],
                r["memory"].as_str().unwrap_or("")
            );
        }
    }
    Ok(0)
}

pub fn show(name: &str, json: bool) -> Result<i32, CliError> {
    let vm = VmDir::open(name).map_err(fail)?;
    let state = live_state(&vm)?;
    let config = vm.config().map_err(fail)?;
    let status = if matches!(state, VmState::Running | VmState::Paused) {
        client(&vm)
            .request("GET", "/vm", "")
            .ok()
            .and_then(|r| r.json().ok())
            .map(|v| v["status"].clone())
    } else {
        None
    };
    let out = serde_json::json!({
        "name": vm.name,
        "state": state,
        "directory": vm.dir,
        "pid": if status.is_some() { vm.pid() } else { None },
        "config": config,
        "status": status,
        "last_exit": vm.last_exit(),
    });
    if json {
        println!("{out:#}");
    } else {
        println!(
            "name: {}\nstate: {state}\ndirectory: {}",
            vm.name,
            vm.dir.display()
        );
        if let Some(pid) = out["pid"].as_i64() {
            println!("pid: {pid}");
        }
        if let (Some(v), Some(socket)) = (&config.vsock, vm.vsock_socket(&config)) {
            println!("vsock: cid {} (socket {})", v.cid, socket.display());
        }
        for (i, nic) in config.nets.iter().enumerate() {
            println!("eth{i}: {nic}");
        }
        for share in &config.shares {
            println!("share: {share} (guest: {})", share.mount_point());
        }
        print!("{}", toml::to_string(&config).unwrap_or_default());
        if let Some(s) = &status {
            println!(
                "uptime: {} ms (paused {} ms), exits: {}",
                s["uptime_ms"], s["paused_ms"], s["counters"]["exits"]
            );
            if s["balloon"].is_object() {
                print!("{}", crate::balloon::describe(&s["balloon"]));
            }
        }
        if let Some(exit) = vm.last_exit() {
            println!("last exit: {}", exit.message);
        }
    }
    Ok(0)
}

/// Starts the VM process detached and waits until its API answers.
pub fn start(name: &str) -> Result<i32, CliError> {
    let vm = VmDir::open(name).map_err(fail)?;
    if running(&vm)? {
        return Err(fail(format!("{name} is already running")));
    }
    vm.config().map_err(fail)?;
    // A VM restored to (or cloned from) a snapshot with a running state
    // resumes from it while its disks are untouched since.
    let restore = crate::snapshot::resume_for_start(&vm)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(vm.vmm_log())
        .map_err(fail)?;
    let exe = std::env::current_exe().map_err(fail)?;
    let mut cmd = Command::new(exe);
    cmd.args(["vm-process", name]);
    if let Some(dir) = &restore {
        cmd.arg("--restore").arg(dir);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().map_err(fail)?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory; the child
    // leaves our session so it outlives the terminal.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(fail)?;
    let started = Instant::now();
    loop {
        // Answered by our VM process (not one a concurrent start made).
        if let Ok(r) = client(&vm).request("GET", "/vm", "") {
            if r.status == 200 && r.json().is_ok_and(|v| v["pid"] == child.id()) {
                if restore.is_some() {
                    // Used: the next start boots (the disks move on).
                    crate::snapshot::resume_used(&vm)?;
                }
                println!("started {name} (pid {})", child.id());
                return Ok(0);
            }
        }
        if let Some(status) = child.try_wait().map_err(fail)? {
            let log = std::fs::read_to_string(vm.vmm_log()).unwrap_or_default();
            let last = log.lines().last().unwrap_or("").to_string();
            return Err(fail(format!(
                "{name} did not start (VM process exited with {status}): {last}"
            )));
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(fail(format!(
                "{name} did not answer within 30 s; see {}",
                vm.vmm_log().display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends an action; maps API errors to CLI errors.
fn act(vm: &VmDir, path: &str, body: &str) -> Result<(), CliError> {
    let r = client(vm)
        .request("PUT", path, body)
        .map_err(|e| fail(format!("{} is not running ({e})", vm.name)))?;
    if r.status >= 300 {
        return Err(fail(format!("{}: {}", vm.name, r.error_message())));
    }
    Ok(())
}

/// Waits for the VM process to end; false on timeout.
fn wait_ended(vm: &VmDir, limit: Duration) -> Result<bool, CliError> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !running(vm)? {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(false)
}

pub(crate) fn require_running(vm: &VmDir) -> Result<(), CliError> {
    if running(vm)? {
        Ok(())
    } else {
        Err(fail(format!("{} is not running", vm.name)))
    }
}

pub fn stop(name: &str, timeout: u64) -> Result<i32, CliError> {
    let vm = VmDir::open(name).map_err(fail)?;
    require_running(&vm)?;
    act(&vm, "/vm/stop", &format!("{{\"timeout_s\": {timeout}}}"))?;
    let bar = crate::progress::spinner(&format!("stopping {name}"));
    let ended = wait_ended(&vm, Duration::from_secs(timeout.saturating_add(10)));
    bar.finish_and_clear();
    if !ended? {
        return kill(name);
    }
    println!("stopped {name}");
    Ok(0)
}

pub fn kill(name: &str) -> Result<i32, CliError> {
    let vm = VmDir::open(name).map_err(fail)?;
    require_running(&vm)?;
    let asked = act(&vm, "/vm/kill", "");
    if asked.is_err() || !wait_ended(&vm, Duration::from_secs(10))? {
        // The process does not answer: end it.
        if let Some(pid) = vm.pid() {
            // SAFETY: kill(2) with a pid read from the VM's pidfile.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        wait_ended(&vm, Duration::from_secs(10))?;
    }
    println!("killed {name}");
    Ok(0)
}

pub fn pause(name: &str, resume: bool) -> Result<i32, CliError> {
    let vm = VmDir::open(name).map_err(fail)?;
    require_running(&vm)?;
    act(&vm, if resume { "/vm/resume" } else { "/vm/pause" }, "")?;
    println!("{} {name}", if resume { "resumed" } else { "paused" });
    Ok(0)
}

pub fn edit(name: &str, args: EditArgs) -> Result<i32, CliError> {
    let vm = VmDir::open(name).map_err(fail)?;
    // Hold the lock while editing, so the VM cannot start meanwhile.
    let Some(_lock) = vm.try_lock().map_err(fail)? else {
        return Err(fail(format!("{name} is running; stop it before editing")));
    };
    let mut c = vm.config().map_err(fail)?;
    if let Some(v) = args.machine {
        c.machine = v;
    }
    if let Some(v) = args.seccomp {
        c.seccomp = v;
    }
    match args.firmware.as_deref() {
        None => {}
        Some("none") => c.firmware = None,
        Some(f) => {
            c.firmware = Some(f.parse().map_err(CliError::Usage)?);
            // Firmware boots need a pc, unless the user says otherwise
            // (and gets the error at start).
            if args.machine.is_none() {
                c.machine = vmm::MachineType::Pc;
            }
        }
    }
    if let Some(v) = args.kernel {
        c.kernel = v;
    }
    if let Some(v) = args.initrd {
        c.initrd = Some(v);
    }
    if let Some(v) = args.cmdline {
        c.cmdline = Some(v);
    }
    if let Some(v) = args.append {
        c.append = Some(v);
    }
    if let Some(v) = args.cpus {
        c.cpus = v;
    }
    if let Some(v) = args.memory {
        c.memory = v.size;
        if let Some(options) = v.options {
            c.memory_options = options;
        }
        c.memory_options
            .check_size(v.size.bytes())
            .map_err(|e| CliError::Usage(format!("--memory: {e}")))?;
    }
    if let Some(v) = args.console {
        c.console = v;
    }
    if let Some(v) = args.on_reset {
        c.on_reset = v;
    }
    if !args.disk.is_empty() {
        c.disks = args.disk;
    }
    args.limits.apply(&mut c).map_err(CliError::Usage)?;
    if args.no_disks {
        c.disks.clear();
    }
    match args.balloon {
        None => {}
        Some(crate::balloon::BalloonArg::Off) => c.balloon = None,
        Some(crate::balloon::BalloonArg::Set(b)) => c.balloon = Some(b),
    }
    if let Some(v) = args.rng {
        c.rng = v;
    }
    match args.vsock {
        None => {}
        Some(crate::VsockArg::None) => c.vsock = None,
        Some(crate::VsockArg::Auto) if c.vsock.is_none() => {
            c.vsock = Some(vmm::VsockConfig {
                cid: crate::store::free_cid().map_err(fail)?,
                socket: None,
                pool: vec![agent::AGENT_PORT],
            });
        }
        Some(crate::VsockArg::Auto) => {}
        Some(crate::VsockArg::Set(v)) => c.vsock = Some(v),
    }
    if let Some(mut nets) = crate::nics(&args.net)? {
        assign_macs(name, &mut nets);
        c.nets = nets;
    }
    if !args.share.is_empty() {
        c.shares = crate::share::absolute(args.share)?;
    }
    if args.no_shares {
        c.shares.clear();
    }
    vm.write_config(&c).map_err(fail)?;
    println!("edited {name}");
    Ok(0)
}

pub fn logs(name: &str, follow: bool) -> Result<i32, CliError> {
    let vm = VmDir::open(name).map_err(fail)?;
    let mut out = std::io::stdout();
    if follow && running(&vm)? {
        let stream = console_stream(&vm)?;
        copy_to_stdout(stream);
        return Ok(0);
    }
    match std::fs::read(vm.console_log()) {
        Ok(data) => {
            let _ = out.write_all(&data);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    Ok(0)
}

/// Attaches to the console: output as it comes, keystrokes to the guest,
/// until the VM ends or `Ctrl-A d` detaches.
pub fn console(name: &str) -> Result<i32, CliError> {
    let vm = VmDir::open(name).map_err(fail)?;
    require_running(&vm)?;
    let stream = console_stream(&vm)?;
    let raw = vmm::console::RawTerminal::enter();
    if raw.is_some() {
        eprint!("[attached to {name}; Ctrl-A d detaches]\r\n");
    }
    let input = client(&vm);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        let mut escape = false;
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut typed = Vec::with_capacity(n);
            for &b in &buf[..n] {
                match (escape, b) {
                    (true, b'd') => {
                        if !typed.is_empty() {
                            let _ = input.request_bytes("PUT", "/vm/console", &typed);
                        }
                        eprint!("\r\n[detached]\r\n");
                        vmm::console::restore_terminal();
                        std::process::exit(0);
                    }
                    (true, 0x01) => {
                        typed.push(0x01);
                        escape = false;
                    }
                    (true, _) => escape = false,
                    (false, 0x01) => escape = true,
                    (false, b) => typed.push(b),
                }
            }
            if !typed.is_empty() && input.request_bytes("PUT", "/vm/console", &typed).is_err() {
                return;
            }
        }
    });
    copy_to_stdout(stream);
    drop(raw);
    Ok(0)
}

/// The console's output stream (the API's upgraded connection).
fn console_stream(vm: &VmDir) -> Result<Box<dyn Read + Send>, CliError> {
    let (status, stream) = client(vm).stream("/vm/console").map_err(fail)?;
    if status != 101 {
        return Err(fail(format!(
            "{}: the console stream answered {status}",
            vm.name
        )));
    }
    Ok(stream)
}

/// Copies a stream to stdout as it comes, until it or stdout ends.
fn copy_to_stdout(mut stream: Box<dyn Read + Send>) {
    let mut out = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
    }
}

pub fn delete(name: &str) -> Result<i32, CliError> {
    let vm = VmDir::open(name).map_err(fail)?;
    let Some(lock) = vm.try_lock().map_err(fail)? else {
        return Err(fail(format!("{name} is running; stop it before deleting")));
    };
    let clones = crate::snapshot::linked_clones_of(&vm);
    if !clones.is_empty() {
        return Err(fail(format!(
            "{name} cannot be deleted: its linked clones {} are backed by its disks (delete them first)",
            clones.join(", ")
        )));
    }
    let limited = vm.config().is_ok_and(|c| !c.limits.is_unset());
    std::fs::remove_dir_all(&vm.dir).map_err(fail)?;
    if limited {
        crate::cgroup::remove(name);
    }
    drop(lock);
    println!("deleted {name}");
    Ok(0)
}
