//! The agent's side: one connection, one request (see the crate docs).
//! Runs in the guest (`hostvisor-agent`); the tests run it on the host
//! over socket pairs, with a [`System`] that records instead of acting.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{
    recv, send, Address, ExecRequest, ExitStatus, FrameError, FromAgent, GuestInfo, ToAgent, CHUNK,
    PROTOCOL_VERSION, VERSION,
};

/// A connection the agent serves.
pub trait Stream: Read + Write + Send + 'static + Sized {
    fn try_clone(&self) -> std::io::Result<Self>;
}

impl Stream for UnixStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        UnixStream::try_clone(self)
    }
}

impl Stream for vsock::VsockStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        vsock::VsockStream::try_clone(self)
    }
}

/// The operations that act on the whole guest.
pub trait System: Sync {
    fn set_time(&self, unix_ns: i64) -> std::io::Result<()>;
    fn shutdown(&self, reboot: bool) -> std::io::Result<()>;
}

/// The real guest.
pub struct RealSystem;

impl System for RealSystem {
    fn set_time(&self, unix_ns: i64) -> std::io::Result<()> {
        let ts = libc::timespec {
            tv_sec: unix_ns.div_euclid(1_000_000_000),
            tv_nsec: unix_ns.rem_euclid(1_000_000_000),
        };
        // SAFETY: `ts` is a valid timespec that outlives the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn shutdown(&self, reboot: bool) -> std::io::Result<()> {
        // SAFETY: sync takes no arguments and cannot fail.
        unsafe { libc::sync() };
        // Without ACPI there is no way to power off; hostvisor's machines
        // (and its default guest, with `reboot=k`) treat a reset as the
        // power-off unless the VM is set to restart.
        let cmd = if reboot || !Path::new("/sys/firmware/acpi").exists() {
            libc::RB_AUTOBOOT
        } else {
            libc::RB_POWER_OFF
        };
        // SAFETY: reboot(2) with a valid command; it returns only on error.
        if unsafe { libc::reboot(cmd) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

fn now_ns() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

fn error(s: &mut impl Write, text: String) -> Result<(), FrameError> {
    send(s, &FromAgent::Error(text))
}

/// Serves one connection: the handshake, then one request.
pub fn handle_connection<S: Stream>(mut s: S, system: &dyn System) -> Result<(), FrameError> {
    match recv::<ToAgent>(&mut s)? {
        ToAgent::Hello { protocol } if protocol == PROTOCOL_VERSION => {}
        ToAgent::Hello { protocol } => {
            return error(
                &mut s,
                format!(
                    "protocol version {protocol} is not supported; this agent ({VERSION}) speaks version {PROTOCOL_VERSION}"
                ),
            );
        }
        _ => return error(&mut s, "expected Hello first".into()),
    }
    send(
        &mut s,
        &FromAgent::Hello {
            protocol: PROTOCOL_VERSION,
            version: VERSION.into(),
        },
    )?;
    match recv::<ToAgent>(&mut s)? {
        ToAgent::Ping => send(&mut s, &FromAgent::Pong { unix_ns: now_ns() }),
        ToAgent::Exec(req) => exec(s, req),
        ToAgent::Upload {
            path,
            mode,
            size,
            sha256,
        } => upload(&mut s, Path::new(&path), mode, size, &sha256),
        ToAgent::Download { path } => download(&mut s, Path::new(&path)),
        ToAgent::SetTime { unix_ns } => match system.set_time(unix_ns) {
            Ok(()) => send(&mut s, &FromAgent::Done),
            Err(e) => error(&mut s, format!("cannot set the clock: {e}")),
        },
        ToAgent::Shutdown { reboot } => {
            send(&mut s, &FromAgent::Done)?;
            s.flush()?;
            drop(s);
            system.shutdown(reboot)?;
            Ok(())
        }
        ToAgent::Info => send(&mut s, &FromAgent::Info(guest_info())),
        other => error(&mut s, format!("{} is not a request", message_name(&other))),
    }
}

fn message_name(m: &ToAgent) -> &'static str {
    match m {
        ToAgent::Hello { .. } => "Hello",
        ToAgent::Stdin(_) => "Stdin",
        ToAgent::StdinEof => "StdinEof",
        ToAgent::Data(_) => "Data",
        ToAgent::End => "End",
        _ => "this message",
    }
}

/// Copies a child's output into frames until it closes.
fn pump<S: Stream>(
    src: Option<impl Read + Send + 'static>,
    out: Arc<Mutex<S>>,
    wrap: fn(Vec<u8>) -> FromAgent,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Some(mut src) = src else {
            return;
        };
        let mut buf = vec![0u8; CHUNK];
        loop {
            match src.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let Ok(mut w) = out.lock() else { return };
                    if send(&mut *w, &wrap(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

fn kill(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a plain pid and signal.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Where a guest's busybox is, for commands that are only its applets.
const BUSYBOX: &str = "/bin/busybox";

fn exec<S: Stream>(s: S, req: ExecRequest) -> Result<(), FrameError> {
    let out = Arc::new(Mutex::new(s.try_clone()?));
    let mut reader = s;
    let Some((program, args)) = req.argv.split_first() else {
        return error(&mut reader, "an empty command".into());
    };
    let command = |program: &str, args: &[String]| {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = &req.cwd {
            cmd.current_dir(cwd);
        }
        cmd
    };
    let spawned = match command(program, args).spawn() {
        // A guest whose busybox has no applet links (hostvisor's default
        // guest saves seconds of boot that way) still runs `uname`.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && !program.contains('/')
                && Path::new(BUSYBOX).exists() =>
        {
            command(BUSYBOX, &req.argv).spawn()
        }
        other => other,
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return error(&mut reader, format!("cannot run {program}: {e}")),
    };
    let pid = child.id();
    {
        let mut w = out.lock().map_err(|_| FrameError::Closed)?;
        send(&mut *w, &FromAgent::Started { pid })?;
    }
    let stdout = pump(child.stdout.take(), out.clone(), FromAgent::Stdout);
    let stderr = pump(child.stderr.take(), out.clone(), FromAgent::Stderr);
    // Set once the child is reaped, so that nothing kills a reused pid.
    let finished = Arc::new((Mutex::new(false), Condvar::new()));

    // Stdin from the host; the host hanging up kills the command.
    let mut stdin = child.stdin.take();
    let done = finished.clone();
    std::thread::spawn(move || loop {
        match recv::<ToAgent>(&mut reader) {
            Ok(ToAgent::Stdin(data)) => {
                if let Some(i) = stdin.as_mut() {
                    if i.write_all(&data).is_err() {
                        stdin = None;
                    }
                }
            }
            Ok(ToAgent::StdinEof) => stdin = None,
            Ok(_) => {}
            Err(_) => {
                if let Ok(reaped) = done.0.lock() {
                    if !*reaped {
                        kill(pid);
                    }
                }
                return;
            }
        }
    });

    let timed_out = Arc::new(AtomicBool::new(false));
    if let Some(ms) = req.timeout_ms {
        let done = finished.clone();
        let flag = timed_out.clone();
        std::thread::spawn(move || {
            let (lock, cvar) = &*done;
            let Ok(guard) = lock.lock() else { return };
            if let Ok((reaped, _)) =
                cvar.wait_timeout_while(guard, Duration::from_millis(ms), |r| !*r)
            {
                if !*reaped {
                    flag.store(true, Ordering::SeqCst);
                    kill(pid);
                }
            }
        });
    }
    let status = child.wait();
    if let Ok(mut reaped) = finished.0.lock() {
        *reaped = true;
        finished.1.notify_all();
    }
    let status = status?;
    let _ = stdout.join();
    let _ = stderr.join();
    let exit = ExitStatus {
        code: status.code(),
        signal: status.signal(),
        timed_out: timed_out.load(Ordering::SeqCst),
    };
    let mut w = out.lock().map_err(|_| FrameError::Closed)?;
    send(&mut *w, &FromAgent::Exited(exit))
}

/// Receives a file into a temporary name beside `path` and renames it
/// into place, so a failed copy leaves the old file (or none).
fn upload<S: Stream>(
    s: &mut S,
    path: &Path,
    mode: u32,
    size: u64,
    sha256: &[u8; 32],
) -> Result<(), FrameError> {
    let Some(name) = path.file_name() else {
        return error(s, format!("{}: not a file name", path.display()));
    };
    if path.is_dir() {
        return error(s, format!("{}: is a directory", path.display()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.hostvisor-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mode = mode & 0o7777;
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
    {
        Ok(f) => f,
        Err(e) => return error(s, format!("{}: {e}", path.display())),
    };
    send(s, &FromAgent::Done)?;
    let result = (|| -> Result<Result<(), String>, FrameError> {
        let mut got = 0u64;
        loop {
            match recv::<ToAgent>(s)? {
                ToAgent::Data(d) => {
                    got += d.len() as u64;
                    if got > size {
                        return Ok(Err(format!("more than the announced {size} bytes")));
                    }
                    if let Err(e) = file.write_all(&d) {
                        return Ok(Err(format!("{}: {e}", path.display())));
                    }
                }
                ToAgent::End => break,
                other => return Ok(Err(format!("{} inside a file", message_name(&other)))),
            }
        }
        if got != size {
            return Ok(Err(format!("{got} bytes arrived, {size} were announced")));
        }
        if let Err(e) = file.sync_all() {
            return Ok(Err(format!("{}: {e}", path.display())));
        }
        // What reached the file, not what arrived: the check covers the
        // whole way to the guest's disk.
        match file_sha256(&tmp) {
            Ok(digest) if digest == *sha256 => {}
            Ok(_) => return Ok(Err(CORRUPTED.into())),
            Err(e) => return Ok(Err(format!("{}: {e}", path.display()))),
        }
        let placed = Ok(())
            .and_then(|()| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)))
            .and_then(|()| std::fs::rename(&tmp, path));
        Ok(placed.map_err(|e| format!("{}: {e}", path.display())))
    })();
    match result {
        Ok(Ok(())) => send(s, &FromAgent::Done),
        Ok(Err(text)) => {
            let _ = std::fs::remove_file(&tmp);
            error(s, text)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// The error text of a copy whose SHA-256 does not match; the client
/// retries on it.
pub const CORRUPTED: &str = "the file was corrupted on its way (SHA-256 mismatch)";

fn file_sha256(path: &Path) -> std::io::Result<[u8; 32]> {
    use sha2::Digest;
    let mut file = File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(hasher.finalize().into()),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn download<S: Stream>(s: &mut S, path: &Path) -> Result<(), FrameError> {
    use sha2::Digest;
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return error(s, format!("{}: {e}", path.display())),
    };
    let meta = file.metadata()?;
    if meta.is_dir() {
        return error(s, format!("{}: is a directory", path.display()));
    }
    send(
        s,
        &FromAgent::FileStart {
            mode: meta.mode() & 0o7777,
            size: meta.len(),
        },
    )?;
    let mut buf = vec![0u8; CHUNK];
    let mut hasher = sha2::Sha256::new();
    loop {
        match file.read(&mut buf) {
            Ok(0) => {
                return send(
                    s,
                    &FromAgent::FileEnd {
                        sha256: hasher.finalize().into(),
                    },
                )
            }
            Ok(n) => {
                hasher.update(&buf[..n]);
                send(s, &FromAgent::Data(buf[..n].to_vec()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return error(s, format!("{}: {e}", path.display())),
        }
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn meminfo_kib(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What the guest is: from /proc and getifaddrs(3).
pub fn guest_info() -> GuestInfo {
    let meminfo = read_trimmed("/proc/meminfo");
    let os = read_trimmed("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into());
    GuestInfo {
        hostname: read_trimmed("/proc/sys/kernel/hostname"),
        os,
        kernel_release: read_trimmed("/proc/sys/kernel/osrelease"),
        kernel_version: read_trimmed("/proc/sys/kernel/version"),
        arch: std::env::consts::ARCH.into(),
        uptime_secs: read_trimmed("/proc/uptime")
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        mem_total_kib: meminfo_kib(&meminfo, "MemTotal"),
        mem_available_kib: meminfo_kib(&meminfo, "MemAvailable"),
        addresses: addresses(),
        agent_version: VERSION.into(),
        time_unix_ns: now_ns(),
    }
}

/// Every IPv4 and IPv6 address of every interface.
fn addresses() -> Vec<Address> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return out;
    }
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive
        // until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null name is a NUL-terminated string of the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: a non-null address starts with its family.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let (address, prefix) = match family {
            libc::AF_INET => {
                // SAFETY: AF_INET addresses are sockaddr_in, and so are
                // their netmasks when present.
                let (a, m) = unsafe {
                    (
                        *ifa.ifa_addr.cast::<libc::sockaddr_in>(),
                        ifa.ifa_netmask
                            .cast::<libc::sockaddr_in>()
                            .as_ref()
                            .map(|m| m.sin_addr.s_addr),
                    )
                };
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                (ip.to_string(), m.map_or(0, |m| m.count_ones() as u8))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for sockaddr_in6.
                let (a, m) = unsafe {
                    (
                        *ifa.ifa_addr.cast::<libc::sockaddr_in6>(),
                        ifa.ifa_netmask
                            .cast::<libc::sockaddr_in6>()
                            .as_ref()
                            .map(|m| m.sin6_addr.s6_addr),
                    )
                };
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                let prefix = m.map_or(0, |m| m.iter().map(|b| b.count_ones()).sum::<u32>() as u8);
                (ip.to_string(), prefix)
            }
            _ => continue,
        };
        out.push(Address {
            interface: name,
            address,
            prefix,
        });
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    out
}

/// The agent's main loop: a thread per connection on the vsock `port`.
pub fn serve_vsock(port: u32) -> std::io::Result<()> {
    let listener = vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port)?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                std::thread::spawn(move || {
                    if let Err(e) = handle_connection(stream, &RealSystem) {
                        if !matches!(e, FrameError::Closed) {
                            eprintln!("hostvisor-agent: {e}");
                        }
                    }
                });
            }
            Err(e) => {
                eprintln!("hostvisor-agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
