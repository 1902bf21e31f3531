//! The agent's side: one connection, one request (see the crate docs).
//! Runs in the guest (`hostvisor-agent`); the tests run it on the host
//! over socket pairs, with a [`System`] that records instead of acting.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::conn::Conn;
use crate::{
    identity, Address, FrameError, FromAgent, GuestInfo, Identity, Reseeded, ToAgent, CHUNK,
    PROTOCOL_VERSION, VERSION,
};

/// A connection the agent serves.
pub trait Stream: Read + Write + AsRawFd + Send + 'static + Sized {}

impl Stream for UnixStream {}

impl Stream for vsock::VsockStream {}

/// The operations that act on the whole guest.
pub trait System: Sync {
    /// The guest's clock, as `Ping` reports it (ns since the epoch).
    fn now_ns(&self) -> i64 {
        crate::now_ns()
    }
    fn set_time(&self, unix_ns: i64) -> std::io::Result<()>;
    fn shutdown(&self, reboot: bool) -> std::io::Result<()>;
    /// Mixes `seed` (already checked: 1 to [`MAX_SEED`](crate::identity::MAX_SEED)
    /// bytes) into the kernel's random pool.
    fn reseed(&self, seed: &[u8]) -> std::io::Result<Reseeded> {
        let _ = seed;
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// Sets the hostname (already checked).
    fn set_hostname(&self, name: &str) -> std::io::Result<()> {
        let _ = name;
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// Replaces the machine id (already checked).
    fn set_machine_id(&self, id: &str) -> std::io::Result<()> {
        let _ = id;
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// The start of the error an agent answers a request it cannot decode
/// with (one newer than the agent, most likely); the client reports it as
/// [`AgentError::Unsupported`](crate::client::AgentError::Unsupported).
pub const UNKNOWN_REQUEST: &str = "unknown or malformed request";

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

    fn reseed(&self, seed: &[u8]) -> std::io::Result<Reseeded> {
        identity::mix_into_pool(Path::new(identity::URANDOM), seed)
    }

    fn set_hostname(&self, name: &str) -> std::io::Result<()> {
        identity::set_hostname(name)
    }

    fn set_machine_id(&self, id: &str) -> std::io::Result<()> {
        identity::write_machine_id(Path::new(identity::MACHINE_ID), id)
    }
}

/// How long a shutdown waits for the host to read its answer.
const SHUTDOWN_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Ends our side of the connection and waits, at most `limit`, for the
/// peer to close its side (its end of file, or an error, makes `fd`
/// readable).
fn wait_for_close(fd: std::os::fd::RawFd, limit: std::time::Duration) {
    // SAFETY: shutdown(2) on a socket descriptor the connection owns.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(limit.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd that outlives the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

fn error<S: Read + Write>(s: &mut Conn<S>, text: String) -> Result<(), FrameError> {
    s.send(&FromAgent::Error(text))
}

/// Serves one connection: the handshake, then one request.
pub fn handle_connection<S: Stream>(s: S, system: &dyn System) -> Result<(), FrameError> {
    let mut s = Conn::new(s);
    match s.recv::<ToAgent>()? {
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
    // Sent with the first reply (or before waiting for the request).
    s.queue(&FromAgent::Hello {
        protocol: PROTOCOL_VERSION,
        version: VERSION.into(),
    })?;
    let request = match s.recv::<ToAgent>() {
        Ok(request) => request,
        // Most likely a request newer than this agent: say so (the host
        // would otherwise see only the connection close).
        Err(FrameError::Malformed(why)) => {
            return error(
                &mut s,
                format!("{UNKNOWN_REQUEST} (agent {VERSION}): {why}"),
            )
        }
        Err(e) => return Err(e),
    };
    match request {
        ToAgent::Ping => s.send(&FromAgent::Pong {
            unix_ns: system.now_ns(),
        }),
        ToAgent::Exec(req) => crate::exec::exec(&mut s, req),
        ToAgent::Upload {
            path,
            mode,
            size,
            sha256,
        } => upload(&mut s, Path::new(&path), mode, size, &sha256),
        ToAgent::Download { path } => download(&mut s, Path::new(&path)),
        ToAgent::SetTime { unix_ns } => match system.set_time(unix_ns) {
            Ok(()) => s.send(&FromAgent::Done),
            Err(e) => error(&mut s, format!("cannot set the clock: {e}")),
        },
        ToAgent::Shutdown { reboot } => {
            s.send(&FromAgent::Done)?;
            s.stream().flush()?;
            // The answer must reach the host before the guest goes down
            // (it could otherwise die in the guest kernel's queue): the
            // host closes the connection once it has read it.
            wait_for_close(s.fd(), SHUTDOWN_ANSWER_WAIT);
            drop(s);
            system.shutdown(reboot)?;
            Ok(())
        }
        ToAgent::Info => s.send(&FromAgent::Info(guest_info())),
        ToAgent::Reseed { seed } => {
            let result = identity::check_seed(&seed)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    system
                        .reseed(&seed)
                        .map_err(|e| format!("cannot reseed the random pool: {e}"))
                });
            match result {
                Ok(done) => s.send(&FromAgent::Reseeded(done)),
                Err(text) => error(&mut s, text),
            }
        }
        ToAgent::SetIdentity(id) => match set_identity(system, &id) {
            Ok(()) => s.send(&FromAgent::Done),
            Err(text) => error(&mut s, text),
        },
        other => error(&mut s, format!("{} is not a request", message_name(&other))),
    }
}

/// Checks the whole identity first (nothing is changed if a part is bad),
/// then sets the hostname and the machine id.
fn set_identity(system: &dyn System, id: &Identity) -> Result<(), String> {
    id.check().map_err(|e| e.to_string())?;
    if let Some(name) = &id.hostname {
        system
            .set_hostname(name)
            .map_err(|e| format!("cannot set the hostname: {e}"))?;
    }
    if let Some(machine_id) = &id.machine_id {
        system
            .set_machine_id(machine_id)
            .map_err(|e| format!("cannot write {}: {e}", identity::MACHINE_ID))?;
    }
    Ok(())
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

/// Receives a file into a temporary name beside `path` and renames it
/// into place, so a failed copy leaves the old file (or none).
fn upload<S: Stream>(
    s: &mut Conn<S>,
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
    s.send(&FromAgent::Done)?;
    let result = (|| -> Result<Result<(), String>, FrameError> {
        let mut got = 0u64;
        loop {
            match s.recv::<ToAgent>()? {
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
        Ok(Ok(())) => s.send(&FromAgent::Done),
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

fn download<S: Stream>(s: &mut Conn<S>, path: &Path) -> Result<(), FrameError> {
    use sha2::Digest;
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return error(s, format!("{}: {e}", path.display())),
    };
    let meta = file.metadata()?;
    if meta.is_dir() {
        return error(s, format!("{}: is a directory", path.display()));
    }
    // Leaves with the first chunk.
    s.queue(&FromAgent::FileStart {
        mode: meta.mode() & 0o7777,
        size: meta.len(),
    })?;
    let mut buf = vec![0u8; CHUNK];
    let mut hasher = sha2::Sha256::new();
    loop {
        match file.read(&mut buf) {
            Ok(0) => {
                return s.send(&FromAgent::FileEnd {
                    sha256: hasher.finalize().into(),
                })
            }
            Ok(n) => {
                hasher.update(&buf[..n]);
                s.send(&FromAgent::Data(buf[..n].to_vec()))?
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

/// The agent's main loop on the vsock `port`: every idle thread of a pool
/// waits in `accept` itself (no hand-off from an accepting thread: that
/// cost a futex call and a thread switch per connection); a thread that
/// takes a connection while no other waits adds one to the pool first, so
/// a long command never holds up the next request. The pool grows to the
/// most connections served at once and keeps its threads (creating a
/// thread costs ~70 ms of guest kernel time on nested hosts).
pub fn serve_vsock(port: u32) -> std::io::Result<()> {
    let listener = Arc::new(vsock::VsockListener::bind_with_cid_port(
        vsock::VMADDR_CID_ANY,
        port,
    )?);
    serve(&listener, &Arc::new(AtomicUsize::new(0)));
    Ok(())
}

fn serve(listener: &Arc<vsock::VsockListener>, idle: &Arc<AtomicUsize>) {
    loop {
        idle.fetch_add(1, Ordering::SeqCst);
        let accepted = listener.accept();
        if idle.fetch_sub(1, Ordering::SeqCst) == 1 {
            let (listener, idle) = (listener.clone(), idle.clone());
            let spawned = std::thread::Builder::new().spawn(move || serve(&listener, &idle));
            if let Err(e) = spawned {
                eprintln!("hostvisor-agent: cannot start a thread: {e}");
            }
        }
        match accepted {
            Ok((stream, _)) => {
                if let Err(e) = handle_connection(stream, &RealSystem) {
                    if !matches!(e, FrameError::Closed) {
                        eprintln!("hostvisor-agent: {e}");
                    }
                }
            }
            Err(e) => {
                eprintln!("hostvisor-agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
