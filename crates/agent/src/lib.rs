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
//!
//! Any step may be answered by `Error(text)` instead.

pub mod client;
pub mod server;

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
    /// Write the file `path` (replaced whole, atomically) with `mode`.
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
    use bincode::Options;
    frame.clear();
    frame.extend_from_slice(&[0; 4]);
    options()
        .serialize_into(&mut *frame, msg)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = u32::try_from(frame.len() - 4)
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or(FrameError::TooLarge(u32::MAX))?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    Ok(())
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
    use sha2::Digest;
    let mut file = std::fs::File::open(path)?;
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

/// Where a copy to `path` is written before it is renamed into place:
/// a hidden name beside it, so the rename stays within one filesystem.
pub fn temp_beside(path: &std::path::Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.hostvisor-{}", std::process::id()))
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
