//! hostvisor's guest agent: the wire protocol, the agent's request handler
//! (run by the static `hostvisor-agent` binary inside the guest) and the
//! host-side client.
//!
//! The protocol: every operation is its own stream connection to the
//! agent's vsock port ([`AGENT_PORT`]). Each message is a frame, a 4-byte
//! little-endian length and that many bytes of a bincode-encoded
//! [`ToAgent`] or [`FromAgent`]. A connection opens with `Hello` both ways
//! (carrying [`PROTOCOL_VERSION`]; a mismatch is refused by name), then one
//! request and its exchange:
//!
//! | request | exchange |
//! |---|---|
//! | `Ping` | `Pong` (guest time) |
//! | `Exec` | `Started`, then `Stdout`/`Stderr` chunks while the host sends `Stdin`/`StdinEof`, then `Exited` |
//! | `Upload` | `Done` (file opened), host sends `Data`… `End`, `Done` (file checked against the request's SHA-256 and in place) |
//! | `Download` | `FileStart`, `Data`…, `FileEnd` (SHA-256 of the file) |
//! | `SetTime` | `Done` |
//! | `Shutdown` | `Done`, then the guest goes down |
//! | `Info` | `Info` |
//! | `Reseed` | `Reseeded` (how the bytes reached the guest's random pool) |
//! | `SetIdentity` | `Done` (hostname and/or machine id set) |
//!
//! Any step may be answered by `Error(text)` instead.
//!
//! New requests are added at the end of [`ToAgent`] (and new replies at
//! the end of [`FromAgent`]) without changing [`PROTOCOL_VERSION`], so an
//! older agent keeps serving the requests it knows. One that does not know
//! a request answers `Error` starting with [`server::UNKNOWN_REQUEST`]
//! (agents from before `Reseed` close the connection instead, after their
//! `Hello`); the client turns both into
//! [`AgentError::Unsupported`](client::AgentError::Unsupported).

pub mod client;
mod conn;
mod exec;
pub mod identity;
pub mod server;
pub mod spawn;

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Bumped when a message changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;

/// The agent's vsock port.
pub const AGENT_PORT: u32 = 52;

/// The largest frame either side accepts.
pub const MAX_FRAME: u32 = 1 << 20;

/// File and output chunks (well under [`MAX_FRAME`]).
pub const CHUNK: usize = 128 << 10;

/// This crate's version, which the agent reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the host sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToAgent {
    Hello {
        protocol: u32,
    },
    Ping,
    Exec(ExecRequest),
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    StdinEof,
    /// Write the file `path` (replaced whole, atomically) with `mode`'s
    /// permission bits (0o777, less the agent's umask; see [`copy_mode`]).
    /// The agent checks what it wrote against `sha256` before putting the
    /// file in place.
    Upload {
        path: String,
        mode: u32,
        size: u64,
        sha256: [u8; 32],
    },
    Download {
        path: String,
    },
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    End,
    /// Set the guest's clock (nanoseconds since the Unix epoch).
    SetTime {
        unix_ns: i64,
    },
    /// Power off (`reboot: false`) or restart the guest.
    Shutdown {
        reboot: bool,
    },
    Info,
    /// Mix `seed` (1 to [`identity::MAX_SEED`] fresh bytes from the host's
    /// CSPRNG) into the guest kernel's random pool, credited as entropy
    /// where the kernel allows, and reseed its CRNG at once: sent to a
    /// guest resumed from a snapshot or cloned, whose RNG state is
    /// otherwise that of the snapshot (there is no vmgenid device).
    Reseed {
        #[serde(with = "serde_bytes")]
        seed: Vec<u8>,
    },
    /// Give the guest a new identity (a clone resumed from its source's
    /// running state must not keep the source's); each part is optional.
    SetIdentity(Identity),
}

/// A guest's identity, as a clone gets a new one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Identity {
    /// Set with sethostname(2): 1 to 64 of `[A-Za-z0-9-]`, not starting
    /// or ending with `-` (see [`identity::check_hostname`]).
    pub hostname: Option<String>,
    /// Written to /etc/machine-id: 32 lowercase hex digits, not all zero
    /// (see [`identity::check_machine_id`]).
    pub machine_id: Option<String>,
}

/// How a `Reseed`'s bytes reached the guest's random pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reseeded {
    /// How many bytes were mixed in.
    pub bytes: u32,
    /// Credited as entropy (`RNDADDENTROPY`); otherwise only mixed in by a
    /// write to /dev/urandom (the ioctl was refused).
    pub credited: bool,
    /// The kernel's CRNG was reseeded at once (`RNDRESEEDCRNG`), so its
    /// output differs from the snapshot's from now on; otherwise it
    /// changes at the kernel's next periodic reseed (up to a minute).
    pub crng_reseeded: bool,
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added to the agent's environment.
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// The host sends stdin (`Stdin`… `StdinEof`); otherwise it is
    /// /dev/null.
    pub stdin: bool,
    /// Killed (SIGKILL) after this long.
    pub timeout_ms: Option<u64>,
}

/// How a guest command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
}

/// What the agent sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromAgent {
    Hello {
        protocol: u32,
        version: String,
    },
    Pong {
        unix_ns: i64,
    },
    Started {
        pid: u32,
    },
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    Exited(ExitStatus),
    FileStart {
        /// The guest file's mode; the host keeps only what [`copy_mode`]
        /// and its umask allow.
        mode: u32,
        size: u64,
    },
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The end of a download, with the SHA-256 of the file as read.
    FileEnd {
        sha256: [u8; 32],
    },
    Done,
    Info(GuestInfo),
    Error(String),
    /// The answer to `Reseed`.
    Reseeded(Reseeded),
}

/// What `guest-info` shows.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GuestInfo {
    pub hostname: String,
    pub os: String,
    pub kernel_release: String,
    pub kernel_version: String,
    pub arch: String,
    pub uptime_secs: f64,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub addresses: Vec<Address>,
    pub agent_version: String,
    /// The guest's clock when asked.
    pub time_unix_ns: i64,
}

/// One IP address of a guest interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub interface: String,
    pub address: String,
    pub prefix: u8,
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes is above the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn options() -> impl bincode::Options {
    use bincode::Options;
    bincode::DefaultOptions::new().with_limit(u64::from(MAX_FRAME))
}

/// Encodes one message as a frame into `frame` (replacing its contents).
fn encode_into<T: Serialize>(frame: &mut Vec<u8>, msg: &T) -> Result<(), FrameError> {
    frame.clear();
    encode_append(frame, msg)
}

/// Appends one message as a frame to `out`.
fn encode_append<T: Serialize>(out: &mut Vec<u8>, msg: &T) -> Result<(), FrameError> {
    use bincode::Options;
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let body = options()
        .serialize_into(&mut *out, msg)
        .map_err(|e| FrameError::Malformed(e.to_string()))
        .and_then(|()| {
            u32::try_from(out.len() - start - 4)
                .ok()
                .filter(|&l| l <= MAX_FRAME)
                .ok_or(FrameError::TooLarge(u32::MAX))
        });
    match body {
        Ok(len) => {
            out[start..start + 4].copy_from_slice(&len.to_le_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = Vec::new();
    encode_into(&mut frame, msg)?;
    Ok(frame)
}

/// This machine's clock in nanoseconds since the Unix epoch (negative
/// before it), as the protocol carries times.
pub fn now_ns() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

/// The SHA-256 of a file's contents (copies are checked with it at both
/// ends).
pub fn file_sha256(path: &std::path::Path) -> std::io::Result<[u8; 32]> {
    reader_sha256(&mut std::fs::File::open(path)?)
}

/// The SHA-256 of everything `r` yields.
pub fn reader_sha256(r: &mut impl Read) -> std::io::Result<[u8; 32]> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(hasher.finalize().into()),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The permission bits a copy's file is created with, from a mode the
/// other side sent: only `rwx` for user, group and others (0o777), never
/// setuid, setgid or sticky. The kernel then takes the umask off as it
/// creates the file ([`create_beside`]), so a copy never gets a permission
/// the receiving user's umask withholds (a hostile guest cannot make host
/// files setuid or world-writable).
pub fn copy_mode(sent: u32) -> u32 {
    sent & 0o777
}

/// How many random names [`create_beside`] tries before giving up.
const TEMP_ATTEMPTS: u32 = 16;

/// Creates the file a copy to `path` is written into before it is renamed
/// over `path`: a hidden, random name beside it (so the rename stays within
/// one filesystem), created with `O_CREAT | O_EXCL | O_NOFOLLOW` — never an
/// existing file and never through a symbolic link someone planted there —
/// with the permission bits [`copy_mode`] keeps from `mode`, less the
/// umask. Returns the open file (readable and writable) and its path.
pub fn create_beside(
    path: &std::path::Path,
    mode: u32,
) -> std::io::Result<(std::fs::File, std::path::PathBuf)> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("not a file name"))?
        .to_string_lossy();
    // Room for the suffix within NAME_MAX (255 bytes).
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let mut last = None;
    for _ in 0..TEMP_ATTEMPTS {
        let tmp = path.with_file_name(format!(".{}.hostvisor-{:016x}", &name[..end], random_u64()));
        match create_new(&tmp, mode) {
            Ok(file) => return Ok((file, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary name")))
}

/// Creates `path` as a new file (`O_EXCL`: it fails if anything, a
/// symbolic link included, is there; `O_NOFOLLOW` besides), readable and
/// writable, with [`copy_mode`]`(mode)` less the umask.
pub fn create_new(path: &std::path::Path, mode: u32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(copy_mode(mode))
        .open(path)
}

/// 64 random bits for a temporary name: from getrandom(2), or, before the
/// kernel's pool is ready (a guest just booted), from the clock, the pid
/// and a counter (varied, not secret: [`create_new`] keeps creation safe
/// either way, and a name taken is only skipped).
fn random_u64() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if usize::try_from(n) == Ok(b.len()) {
        return u64::from_ne_bytes(b);
    }
    // splitmix64 of the mixed inputs.
    let mut z = (now_ns() as u64)
        ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Decodes a frame's body. Never panics and never allocates more than the
/// body's size, whatever the bytes.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    use bincode::Options;
    options()
        .deserialize(body)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

thread_local! {
    /// Each thread's frame buffer, reused for every frame it sends or
    /// receives. Besides saving allocations, this keeps the agent's big
    /// buffers on pages that stay mapped: see the agent's
    /// `keep_buffers_mapped` for what fresh mappings cost on nested hosts.
    static FRAME: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes one message.
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    FRAME.with(|frame| {
        let mut frame = frame.borrow_mut();
        encode_into(&mut frame, msg)?;
        w.write_all(&frame)?;
        Ok(())
    })
}

/// Reads one message.
pub fn recv<T: for<'a> Deserialize<'a>>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    FRAME.with(|frame| {
        let mut body = frame.borrow_mut();
        body.resize(len as usize, 0);
        r.read_exact(&mut body)?;
        decode(&body)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let msgs = vec![
            ToAgent::Hello { protocol: 1 },
            ToAgent::Exec(ExecRequest {
                argv: vec!["uname".into(), "-a".into()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("/tmp".into()),
                stdin: true,
                timeout_ms: Some(5),
            }),
            ToAgent::Data(vec![7; CHUNK]),
            ToAgent::SetTime { unix_ns: -5 },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            send(&mut wire, m).unwrap();
        }
        let mut r = &wire[..];
        for m in &msgs {
            assert_eq!(&recv::<ToAgent>(&mut r).unwrap(), m);
        }
        assert!(matches!(recv::<ToAgent>(&mut r), Err(FrameError::Closed)));
    }

    #[test]
    fn restore_messages_round_trip_and_keep_their_places() {
        let msgs = [
            ToAgent::Reseed {
                seed: vec![0xa5; identity::MAX_SEED],
            },
            ToAgent::SetIdentity(Identity {
                hostname: Some("clone-1".into()),
                machine_id: None,
            }),
            ToAgent::SetIdentity(Identity::default()),
        ];
        for m in &msgs {
            let frame = encode(m).unwrap();
            assert_eq!(&decode::<ToAgent>(&frame[4..]).unwrap(), m);
        }
        let reply = FromAgent::Reseeded(Reseeded {
            bytes: 64,
            credited: true,
            crng_reseeded: false,
        });
        assert_eq!(
            decode::<FromAgent>(&encode(&reply).unwrap()[4..]).unwrap(),
            reply
        );
        // New messages come after the old ones, whose variant numbers (the
        // first byte) older agents and hosts still rely on.
        assert_eq!(encode(&ToAgent::Info).unwrap()[4], 11);
        assert_eq!(encode(&msgs[0]).unwrap()[4], 12);
        assert_eq!(encode(&msgs[1]).unwrap()[4], 13);
        assert_eq!(encode(&FromAgent::Error(String::new())).unwrap()[4], 11);
        assert_eq!(encode(&reply).unwrap()[4], 12);
    }

    #[test]
    fn hostile_restore_messages_are_errors() {
        // A seed whose length field claims more bytes than follow, or far
        // more than a frame can hold: refused before any allocation.
        let good = encode(&ToAgent::Reseed { seed: vec![7; 64] }).unwrap();
        let body = &good[4..];
        assert_eq!(&body[..2], &[12, 64]);
        let mut short = body.to_vec();
        short[1] = 65;
        assert!(matches!(
            decode::<ToAgent>(&short),
            Err(FrameError::Malformed(_))
        ));
        let mut huge = vec![12u8, 0xfd];
        huge.extend(u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<ToAgent>(&huge),
            Err(FrameError::Malformed(_))
        ));
        // Trailing bytes after a whole message are refused too.
        let mut long = body.to_vec();
        long.push(0);
        assert!(decode::<ToAgent>(&long).is_err());
        // An identity with a truncated string, a bad option tag, a hostname
        // that is not UTF-8.
        let id = encode(&ToAgent::SetIdentity(Identity {
            hostname: Some("abc".into()),
            machine_id: None,
        }))
        .unwrap();
        let body = &id[4..];
        assert!(decode::<ToAgent>(&body[..body.len() - 2]).is_err());
        let mut tag = body.to_vec();
        tag[1] = 7;
        assert!(decode::<ToAgent>(&tag).is_err());
        let mut utf8 = body.to_vec();
        let at = utf8.iter().position(|&b| b == b'a').unwrap();
        utf8[at] = 0xff;
        assert!(decode::<ToAgent>(&utf8).is_err());
        // Every truncation of a good frame is an error, never a panic.
        for n in 0..good.len() - 4 {
            assert!(decode::<ToAgent>(&good[4..4 + n]).is_err(), "{n}");
        }
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hv-agent-lib-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn creation_never_follows_or_reuses_what_is_there() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("create");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        // A symbolic link to a file, a dangling one and a plain file: all
        // refused, none followed, truncated or replaced.
        let to_file = dir.join("to-file");
        std::os::unix::fs::symlink(&victim, &to_file).unwrap();
        let dangling = dir.join("dangling");
        let made = dir.join("made-through-link");
        std::os::unix::fs::symlink(&made, &dangling).unwrap();
        for planted in [&to_file, &dangling, &victim] {
            let e = create_new(planted, 0o644).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{planted:?}");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert!(!made.exists(), "created through a dangling link");
        // A fresh name: created, with only permission bits.
        let fresh = dir.join("fresh");
        create_new(&fresh, 0o7777).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o7000, 0, "{mode:o}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn temporary_names_are_hidden_random_and_beside_the_target() {
        let dir = scratch("names");
        let target = dir.join("x".repeat(250));
        let (_a, a) = create_beside(&target, 0o600).unwrap();
        let (_b, b) = create_beside(&target, 0o600).unwrap();
        assert_ne!(a, b);
        for t in [&a, &b] {
            assert_eq!(t.parent(), Some(dir.as_path()));
            let name = t.file_name().unwrap().to_str().unwrap();
            assert!(name.starts_with(".xxx") && name.len() <= 255, "{name}");
            // Not the pid-based name of old.
            assert!(!name.ends_with(&format!("-{}", std::process::id())));
        }
        assert!(create_beside(&dir.join(".."), 0o600).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn copy_modes_keep_only_permission_bits() {
        assert_eq!(copy_mode(0o104_755), 0o755);
        assert_eq!(copy_mode(0o7777), 0o777);
        assert_eq!(copy_mode(0o640), 0o640);
    }

    #[test]
    fn hostile_frames_are_errors() {
        // Too large, declared.
        let mut r = &[0xff, 0xff, 0xff, 0xff][..];
        assert!(matches!(
            recv::<ToAgent>(&mut r),
            Err(FrameError::TooLarge(_))
        ));
        // A body whose vector length claims far more than it holds.
        let mut body = vec![3u8]; // ToAgent::Stdin
        body.extend([0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(decode::<ToAgent>(&body).is_err());
        // An unknown variant, a truncated body.
        assert!(decode::<ToAgent>(&[200]).is_err());
        assert!(decode::<FromAgent>(&[]).is_err());
        // Truncated frame.
        let frame = encode(&ToAgent::Ping).unwrap();
        let mut r = &frame[..frame.len() - 1];
        assert!(recv::<ToAgent>(&mut r).is_err());
    }
}
