//! The agent's side: one connection, one request (see the crate docs).
//! Runs in the guest (`hostvisor-agent`); the tests run it on the host
//! over socket pairs, with a [`System`] that records instead of acting.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{
    recv, send, Address, ExecRequest, ExitStatus, FrameError, FromAgent, GuestInfo, ToAgent, CHUNK,
    PROTOCOL_VERSION, VERSION,
};

/// A connection the agent serves.
pub trait Stream: Read + Write + AsRawFd + Send + 'static + Sized {}

impl Stream for UnixStream {}

impl Stream for vsock::VsockStream {}

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
        ToAgent::Ping => send(
            &mut s,
            &FromAgent::Pong {
                unix_ns: crate::now_ns(),
            },
        ),
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

fn kill(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a plain pid and signal.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Where a guest's busybox is, for commands that are only its applets.
const BUSYBOX: &str = "/bin/busybox";

fn exec<S: Stream>(s: S, req: ExecRequest) -> Result<(), FrameError> {
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
    send(&mut reader, &FromAgent::Started { pid })?;
    let (status, timed_out) = run_child(&mut reader, &mut child, &req)?;
    send(
        &mut reader,
        &FromAgent::Exited(ExitStatus {
            code: status.code(),
            signal: status.signal(),
            timed_out,
        }),
    )
}

fn set_nonblocking(fd: i32) {
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// Serves a running command from this thread alone: its output, stdin
/// from the host, the host hanging up (which kills it) and the timeout,
/// in one poll loop. (Threads per command cost ~70 ms each on nested
/// hosts, where every guest system call is emulated.)
fn run_child<S: Stream>(
    s: &mut S,
    child: &mut std::process::Child,
    req: &ExecRequest,
) -> Result<(std::process::ExitStatus, bool), FrameError> {
    let pid = child.id();
    let mut outputs: [Option<File>; 2] = [
        child.stdout.take().map(|o| File::from(OwnedFd::from(o))),
        child.stderr.take().map(|o| File::from(OwnedFd::from(o))),
    ];
    let mut stdin = child.stdin.take().map(|i| File::from(OwnedFd::from(i)));
    if let Some(i) = &stdin {
        set_nonblocking(i.as_raw_fd());
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut stdin_eof = false;
    let mut host_gone = false;
    let mut deadline = req
        .timeout_ms
        .map(|ms| std::time::Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let mut buf = vec![0u8; CHUNK];
    let expire = |deadline: &mut Option<std::time::Instant>, timed_out: &mut bool| {
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            kill(pid);
            *timed_out = true;
            *deadline = None;
        }
    };
    while outputs.iter().any(Option::is_some) {
        // What to watch: open outputs, stdin while bytes wait for it, the
        // host while no stdin bytes wait (backpressure) and it is there.
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(4);
        let mut what = Vec::with_capacity(4);
        for (i, o) in outputs.iter().enumerate() {
            if let Some(o) = o {
                fds.push(libc::pollfd {
                    fd: o.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                what.push(i);
            }
        }
        if let (Some(i), false) = (&stdin, pending.is_empty()) {
            fds.push(libc::pollfd {
                fd: i.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            });
            what.push(2);
        }
        if !host_gone && pending.is_empty() {
            fds.push(libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            what.push(3);
        }
        let timeout = deadline.map_or(-1, |d| {
            d.saturating_duration_since(std::time::Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32
        });
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        expire(&mut deadline, &mut timed_out);
        for (fd, which) in fds.iter().zip(what) {
            if fd.revents == 0 {
                continue;
            }
            match which {
                0 | 1 => {
                    let Some(o) = outputs[which].as_mut() else {
                        continue;
                    };
                    match o.read(&mut buf) {
                        Ok(0) => outputs[which] = None,
                        Ok(n) => {
                            let data = buf[..n].to_vec();
                            let msg = if which == 0 {
                                FromAgent::Stdout(data)
                            } else {
                                FromAgent::Stderr(data)
                            };
                            if send(s, &msg).is_err() && !host_gone {
                                host_gone = true;
                                kill(pid);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => outputs[which] = None,
                    }
                }
                2 => {
                    if let Some(i) = stdin.as_mut() {
                        match i.write(&pending) {
                            Ok(n) => {
                                pending.drain(..n);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => {
                                // The command closed its stdin.
                                pending.clear();
                                stdin = None;
                            }
                        }
                    }
                    if pending.is_empty() && stdin_eof {
                        stdin = None;
                    }
                }
                _ => match recv::<ToAgent>(s) {
                    Ok(ToAgent::Stdin(data)) if stdin.is_some() => pending = data,
                    Ok(ToAgent::StdinEof) => {
                        stdin_eof = true;
                        if pending.is_empty() {
                            stdin = None;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        host_gone = true;
                        kill(pid);
                    }
                },
            }
        }
    }
    drop(stdin);
    // The outputs are closed; the command may still run.
    let status = loop {
        let Some(d) = deadline else {
            break child.wait()?;
        };
        if let Some(status) = child.try_wait()? {
            break status;
        }
        expire(&mut deadline, &mut timed_out);
        std::thread::sleep(
            d.saturating_duration_since(std::time::Instant::now())
                .min(Duration::from_millis(20)),
        );
    };
    Ok((status, timed_out))
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
    if path.file_name().is_none() {
        return error(s, format!("{}: not a file name", path.display()));
    }
    if path.is_dir() {
        return error(s, format!("{}: is a directory", path.display()));
    }
    // A random name created afresh (never through a planted link), with
    // only the permission bits of `mode` and the agent's umask taken off.
    let (mut file, tmp) = match crate::create_beside(path, mode) {
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
        // whole way to the guest's disk. Read back through the same file,
        // which stays readable whatever its mode.
        match file
            .seek(std::io::SeekFrom::Start(0))
            .and_then(|_| crate::reader_sha256(&mut file))
        {
            Ok(digest) if digest == *sha256 => {}
            Ok(_) => return Ok(Err(CORRUPTED.into())),
            Err(e) => return Ok(Err(format!("{}: {e}", path.display()))),
        }
        let placed = std::fs::rename(&tmp, path);
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
        time_unix_ns: crate::now_ns(),
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

/// The agent's main loop on the vsock `port`: connections go to a pool of
/// threads, which grows to the most connections served at once and keeps
/// its threads (creating a thread costs ~70 ms of guest kernel time on
/// nested hosts; a wake-up costs a futex call).
pub fn serve_vsock(port: u32) -> std::io::Result<()> {
    let listener = vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port)?;
    let (queue, connections) = std::sync::mpsc::channel::<vsock::VsockStream>();
    let connections = Arc::new(Mutex::new(connections));
    let idle = Arc::new(AtomicUsize::new(0));
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if idle.load(Ordering::SeqCst) == 0 {
                    spawn_worker(connections.clone(), idle.clone());
                }
                if queue.send(stream).is_err() {
                    return Err(std::io::Error::other("the worker pool is gone"));
                }
            }
            Err(e) => {
                eprintln!("hostvisor-agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn spawn_worker(
    connections: Arc<Mutex<std::sync::mpsc::Receiver<vsock::VsockStream>>>,
    idle: Arc<AtomicUsize>,
) {
    std::thread::spawn(move || loop {
        idle.fetch_add(1, Ordering::SeqCst);
        let next = connections.lock().map(|rx| rx.recv());
        idle.fetch_sub(1, Ordering::SeqCst);
        let Ok(Ok(stream)) = next else { return };
        if let Err(e) = handle_connection(stream, &RealSystem) {
            if !matches!(e, FrameError::Closed) {
                eprintln!("hostvisor-agent: {e}");
            }
        }
    });
}
