//! The host side: reaches the agent through hostvisor's vsock socket
//! (`CONNECT <port>` on the VM's Unix socket) or, for other VMMs' vhost
//! vsock, through an `AF_VSOCK` socket to the guest's CID.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::identity::IdentityError;
use crate::{
    encode, recv, send, ExecRequest, ExitStatus, FrameError, FromAgent, GuestInfo, Identity,
    Reseeded, ToAgent, AGENT_PORT, CHUNK, PROTOCOL_VERSION,
};

/// Why a connection that reached the agent's port gave no answer at all.
const CLOSED_BEFORE_ANSWER: &str = "the connection closed before the agent answered";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Nothing answers on the agent's port (not started yet, or no agent).
    #[error("the guest agent is not reachable: {0}")]
    Unreachable(String),
    #[error("the guest agent speaks protocol {agent}, this hostvisor speaks {host}")]
    Version { agent: u32, host: u32 },
    #[error("guest agent: {0}")]
    Remote(String),
    #[error("unexpected reply from the guest agent: {0}")]
    Protocol(String),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to the guest agent: {0}")]
    Frame(#[from] FrameError),
    /// The agent is older than the request (it answered that it does not
    /// know it, or closed the connection after its `Hello`).
    #[error("the guest agent (version {agent}) does not support the {request} request; update the guest's hostvisor-agent")]
    Unsupported {
        request: &'static str,
        agent: String,
    },
    /// Refused before anything was sent.
    #[error(transparent)]
    Invalid(#[from] IdentityError),
    #[error("cannot get random bytes on the host")]
    HostRandom(#[source] std::io::Error),
}

/// The clock tolerance of [`Client::announce_restore`]: the guest's clock
/// is stepped when it is further than this from the host's.
pub const RESTORE_CLOCK_TOLERANCE: Duration = Duration::from_millis(50);

/// What [`Client::announce_restore`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreReport {
    /// How the fresh seed reached the guest's random pool.
    pub reseeded: Reseeded,
    /// The guest's clock before it was stepped (guest − host, seconds).
    pub clock_drift_secs: f64,
    /// Whether the clock was stepped (the drift exceeded
    /// [`RESTORE_CLOCK_TOLERANCE`]).
    pub clock_stepped: bool,
    /// Whether a new identity was set.
    pub identity_set: bool,
}

/// How to reach the guest's vsock.
#[derive(Debug, Clone)]
pub enum Transport {
    /// hostvisor's vsock device: its host-side Unix socket.
    Muxer(PathBuf),
    /// A kernel (vhost) vsock device: the guest's CID.
    Vsock(u32),
}

trait Duplex: Read + Write + Send {
    fn clone_box(&self) -> std::io::Result<Box<dyn Duplex>>;
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl Duplex for UnixStream {
    fn clone_box(&self) -> std::io::Result<Box<dyn Duplex>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl Duplex for vsock::VsockStream {
    fn clone_box(&self) -> std::io::Result<Box<dyn Duplex>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        vsock::VsockStream::set_read_timeout(self, timeout)
    }
}

/// How many times a file copy is tried.
pub const COPY_ATTEMPTS: u32 = 3;

/// A transfer that stalls this long has lost its way.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);

/// A finished copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub bytes: u64,
    /// More than 1 when a copy arrived damaged and was made again.
    pub attempts: u32,
}

/// Whether a failed copy may succeed when made again: its data or its
/// stream arrived damaged (never the case on sound hosts; seen on nested
/// PVM hosts, see the agent's `keep_buffers_mapped`).
fn damaged(e: &AgentError) -> bool {
    match e {
        AgentError::Remote(text) => text == crate::server::CORRUPTED,
        AgentError::Protocol(_) => true,
        AgentError::Frame(FrameError::Malformed(_) | FrameError::TooLarge(_)) => true,
        AgentError::Frame(FrameError::Io(e)) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        _ => false,
    }
}

fn retry(mut copy: impl FnMut() -> Result<u64, AgentError>) -> Result<Copied, AgentError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        match copy() {
            Ok(bytes) => return Ok(Copied { bytes, attempts }),
            Err(e) if attempts < COPY_ATTEMPTS && damaged(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

/// A client for one guest's agent. Each call is its own connection.
#[derive(Debug, Clone)]
pub struct Client {
    transport: Transport,
    port: u32,
    /// How long a request keeps trying to reach an agent that is not up
    /// yet (a guest still booting).
    patience: Duration,
}

fn expect_done(reply: FromAgent) -> Result<(), AgentError> {
    match reply {
        FromAgent::Done => Ok(()),
        other => Err(unexpected(other)),
    }
}

fn unexpected(reply: FromAgent) -> AgentError {
    match reply {
        FromAgent::Error(text) => AgentError::Remote(text),
        other => AgentError::Protocol(format!("{other:?}").chars().take(80).collect()),
    }
}

/// Where a command's output goes.
pub struct ExecIo<'a> {
    pub stdin: Option<Box<dyn Read + Send>>,
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
}

impl Client {
    pub fn new(transport: Transport) -> Self {
        Client {
            transport,
            port: AGENT_PORT,
            patience: Duration::ZERO,
        }
    }

    /// A client whose requests wait up to `patience` for the agent to
    /// come up, instead of failing at once.
    pub fn patient(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Connects to the agent's port and sends `first`: through
    /// hostvisor's socket in the same write as the `CONNECT` line (the
    /// device keeps what follows the line until the guest accepts, so the
    /// request does not wait for a round trip to the host and back).
    fn raw_connect(&self, first: &[u8]) -> Result<Box<dyn Duplex>, AgentError> {
        let unreachable = |e: std::io::Error| AgentError::Unreachable(e.to_string());
        match &self.transport {
            Transport::Vsock(cid) => {
                let mut s = vsock::VsockStream::connect_with_cid_port(*cid, self.port)
                    .map_err(unreachable)?;
                s.write_all(first).map_err(FrameError::Io)?;
                Ok(Box::new(s))
            }
            Transport::Muxer(path) => {
                let mut s = UnixStream::connect(path)
                    .map_err(|e| AgentError::Unreachable(format!("{}: {e}", path.display())))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(unreachable)?;
                let mut hello = format!("CONNECT {}\n", self.port).into_bytes();
                hello.extend_from_slice(first);
                s.write_all(&hello).map_err(unreachable)?;
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                loop {
                    match s.read(&mut b) {
                        Ok(1) if b[0] == b'\n' => break,
                        Ok(1) if line.len() < 64 => line.push(b[0]),
                        Ok(_) => {
                            return Err(AgentError::Unreachable(
                                "nothing listens on the agent's port".into(),
                            ))
                        }
                        Err(e) => return Err(unreachable(e)),
                    }
                }
                if !line.starts_with(b"OK ") {
                    return Err(AgentError::Unreachable(
                        String::from_utf8_lossy(&line).into_owned(),
                    ));
                }
                s.set_read_timeout(None).map_err(unreachable)?;
                Ok(Box::new(s))
            }
        }
    }

    /// Connects, says hello and makes `req` in one write (round trips
    /// less: on slow guests each costs tens of milliseconds); returns the
    /// stream, the agent's version and its first reply.
    /// While the agent is unreachable (not up yet, or gone before it
    /// answered), this is retried for up to the client's patience.
    fn open(&self, req: &ToAgent) -> Result<(Box<dyn Duplex>, String, FromAgent), AgentError> {
        let deadline = Instant::now() + self.patience;
        loop {
            match self.open_once(req) {
                Err(AgentError::Unreachable(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    fn open_once(&self, req: &ToAgent) -> Result<(Box<dyn Duplex>, String, FromAgent), AgentError> {
        let mut both = encode(&ToAgent::Hello {
            protocol: PROTOCOL_VERSION,
        })?;
        both.extend_from_slice(&encode(req)?);
        let mut s = self.raw_connect(&both)?;
        let version = match recv::<FromAgent>(&mut s) {
            Ok(FromAgent::Hello { protocol, version }) if protocol == PROTOCOL_VERSION => version,
            Ok(FromAgent::Hello { protocol, .. }) => {
                return Err(AgentError::Version {
                    agent: protocol,
                    host: PROTOCOL_VERSION,
                })
            }
            Ok(other) => return Err(unexpected(other)),
            Err(FrameError::Closed) => {
                return Err(AgentError::Unreachable(CLOSED_BEFORE_ANSWER.into()))
            }
            Err(e) => return Err(e.into()),
        };
        let reply = recv(&mut s)?;
        Ok((s, version, reply))
    }

    fn request(&self, req: &ToAgent) -> Result<(Box<dyn Duplex>, FromAgent), AgentError> {
        let (s, _, reply) = self.open(req)?;
        Ok((s, reply))
    }

    /// The agent's version and the guest's clock (ns since the epoch).
    pub fn ping(&self) -> Result<(String, i64), AgentError> {
        match self.open(&ToAgent::Ping)? {
            (_, version, FromAgent::Pong { unix_ns }) => Ok((version, unix_ns)),
            (_, _, other) => Err(unexpected(other)),
        }
    }

    /// Waits until the agent answers, up to `timeout`.
    pub fn wait_ready(&self, timeout: Duration) -> Result<String, AgentError> {
        let (version, _) = self.clone().patient(timeout).ping()?;
        Ok(version)
    }

    /// Runs a command; its output goes to `io`, stdin comes from it.
    pub fn exec(&self, req: &ExecRequest, io: ExecIo<'_>) -> Result<ExitStatus, AgentError> {
        let req = ExecRequest {
            stdin: io.stdin.is_some(),
            ..req.clone()
        };
        let (mut s, reply) = self.request(&ToAgent::Exec(req))?;
        match reply {
            FromAgent::Started { .. } => {}
            other => return Err(unexpected(other)),
        }
        if let Some(mut input) = io.stdin {
            let mut w = s.clone_box().map_err(FrameError::Io)?;
            std::thread::spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    match input.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            let _ = send(&mut w, &ToAgent::StdinEof);
                            return;
                        }
                        Ok(n) => {
                            if send(&mut w, &ToAgent::Stdin(buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
        let file = |e| AgentError::File {
            path: "output".into(),
            source: e,
        };
        loop {
            match recv(&mut s)? {
                FromAgent::Stdout(d) => io.stdout.write_all(&d).and_then(|()| io.stdout.flush()),
                FromAgent::Stderr(d) => io.stderr.write_all(&d).and_then(|()| io.stderr.flush()),
                FromAgent::Exited(status) => return Ok(status),
                other => return Err(unexpected(other)),
            }
            .map_err(file)?;
        }
    }

    /// Copies the host file `local` to `remote` in the guest, with the
    /// local file's permissions. A copy whose SHA-256 does not match at the
    /// other end (or whose stream breaks) is made again, up to
    /// [`COPY_ATTEMPTS`] times.
    pub fn upload(&self, local: &Path, remote: &str) -> Result<Copied, AgentError> {
        let sha256 = crate::file_sha256(local).map_err(|source| AgentError::File {
            path: local.to_path_buf(),
            source,
        })?;
        retry(|| self.upload_once(local, remote, sha256))
    }

    fn upload_once(&self, local: &Path, remote: &str, sha256: [u8; 32]) -> Result<u64, AgentError> {
        let file_err = |source| AgentError::File {
            path: local.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(local).map_err(file_err)?;
        let meta = file.metadata().map_err(file_err)?;
        if meta.is_dir() {
            return Err(file_err(std::io::Error::other("is a directory")));
        }
        use std::os::unix::fs::MetadataExt;
        let (mut s, reply) = self.request(&ToAgent::Upload {
            path: remote.into(),
            mode: meta.mode() & 0o7777,
            size: meta.len(),
            sha256,
        })?;
        expect_done(reply)?;
        s.set_read_timeout(Some(TRANSFER_TIMEOUT))
            .map_err(FrameError::Io)?;
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < meta.len() {
            let want = (meta.len() - sent).min(CHUNK as u64) as usize;
            let n = file.read(&mut buf[..want]).map_err(file_err)?;
            if n == 0 {
                break;
            }
            send(&mut s, &ToAgent::Data(buf[..n].to_vec()))?;
            sent += n as u64;
        }
        send(&mut s, &ToAgent::End)?;
        expect_done(recv(&mut s)?)?;
        Ok(sent)
    }

    /// Copies the guest file `remote` to `local` (written beside it and
    /// renamed into place once its SHA-256 matches the agent's), with the
    /// guest file's permissions; retried as [`upload`](Self::upload).
    pub fn download(&self, remote: &str, local: &Path) -> Result<Copied, AgentError> {
        retry(|| self.download_once(remote, local))
    }

    fn download_once(&self, remote: &str, local: &Path) -> Result<u64, AgentError> {
        use sha2::Digest;
        let (mut s, reply) = self.request(&ToAgent::Download {
            path: remote.into(),
        })?;
        let mode = match reply {
            FromAgent::FileStart { mode, .. } => mode,
            other => return Err(unexpected(other)),
        };
        s.set_read_timeout(Some(TRANSFER_TIMEOUT))
            .map_err(FrameError::Io)?;
        let file_err = |source| AgentError::File {
            path: local.to_path_buf(),
            source,
        };
        // The guest's mode is only a wish: its permission bits (never
        // setuid, setgid or sticky) less this user's umask, applied by the
        // kernel as it creates a random name that no planted link can
        // redirect.
        let (mut file, tmp) = crate::create_beside(local, mode).map_err(file_err)?;
        let result = (|| {
            let mut got = 0u64;
            let mut hasher = sha2::Sha256::new();
            loop {
                match recv(&mut s)? {
                    FromAgent::Data(d) => {
                        hasher.update(&d);
                        file.write_all(&d).map_err(file_err)?;
                        got += d.len() as u64;
                    }
                    FromAgent::FileEnd { sha256 } => {
                        if <[u8; 32]>::from(hasher.finalize()) != sha256 {
                            return Err(AgentError::Remote(crate::server::CORRUPTED.into()));
                        }
                        break;
                    }
                    other => return Err(unexpected(other)),
                }
            }
            file.sync_all()
                .and_then(|()| std::fs::rename(&tmp, local))
                .map_err(file_err)?;
            Ok(got)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Sets the guest's clock to `unix_ns`.
    pub fn set_time(&self, unix_ns: i64) -> Result<(), AgentError> {
        expect_done(self.request(&ToAgent::SetTime { unix_ns })?.1)
    }

    /// Reads the guest's clock and sets it to the host's when it is off by
    /// more than `tolerance`. Returns the drift found (guest − host, in
    /// seconds, corrected for half the round trip).
    pub fn sync_time(&self, tolerance: Duration) -> Result<f64, AgentError> {
        let before = crate::now_ns();
        let (_, guest) = self.ping()?;
        let after = crate::now_ns();
        let host_mid = before + (after - before) / 2;
        let drift = (guest - host_mid) as f64 / 1e9;
        if drift.abs() > tolerance.as_secs_f64() {
            self.set_time(crate::now_ns())?;
        }
        Ok(drift)
    }

    /// Asks the guest to power off (or restart).
    /// Asks the guest to power off (or reboot). The request goes out with
    /// the `Hello`, so a connection that ends before any answer is the
    /// guest going down with the answers still in its kernel: that is
    /// reported as the connection's end ([`AgentError::Frame`]), as when
    /// it ends after the `Hello`, and never retried (the request may have
    /// been taken).
    pub fn shutdown(&self, reboot: bool) -> Result<(), AgentError> {
        let req = ToAgent::Shutdown { reboot };
        let deadline = Instant::now() + self.patience;
        loop {
            match self.open_once(&req) {
                Err(AgentError::Unreachable(why)) if why == CLOSED_BEFORE_ANSWER => {
                    return Err(FrameError::Closed.into());
                }
                Err(AgentError::Unreachable(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return expect_done(other?.2),
            }
        }
    }

    pub fn info(&self) -> Result<GuestInfo, AgentError> {
        match self.request(&ToAgent::Info)?.1 {
            FromAgent::Info(info) => Ok(info),
            other => Err(unexpected(other)),
        }
    }

    /// Makes a request older agents may not know: `Hello` first, on its
    /// own (waiting for the agent up to the client's patience), then
    /// `req` once the agent has answered. An agent that then closes the
    /// connection without a word (agents from before `Reseed` do that on
    /// a request they cannot decode), or answers
    /// [`UNKNOWN_REQUEST`](crate::server::UNKNOWN_REQUEST), does not know
    /// it: [`AgentError::Unsupported`], never a wait. Costs one round
    /// trip more than [`request`](Self::request).
    fn request_new(
        &self,
        name: &'static str,
        req: &ToAgent,
    ) -> Result<(Box<dyn Duplex>, FromAgent), AgentError> {
        let deadline = Instant::now() + self.patience;
        let (mut s, agent) = loop {
            match self.hello() {
                Err(AgentError::Unreachable(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => break other?,
            }
        };
        s.set_read_timeout(Some(TRANSFER_TIMEOUT))
            .map_err(FrameError::Io)?;
        send(&mut s, req)?;
        match recv(&mut s) {
            Err(FrameError::Closed) => Err(AgentError::Unsupported {
                request: name,
                agent,
            }),
            Ok(FromAgent::Error(text)) if text.starts_with(crate::server::UNKNOWN_REQUEST) => {
                Err(AgentError::Unsupported {
                    request: name,
                    agent,
                })
            }
            Ok(reply) => Ok((s, reply)),
            Err(e) => Err(e.into()),
        }
    }

    /// Connects and exchanges `Hello` alone; returns the stream and the
    /// agent's version.
    fn hello(&self) -> Result<(Box<dyn Duplex>, String), AgentError> {
        let mut s = self.raw_connect(&encode(&ToAgent::Hello {
            protocol: PROTOCOL_VERSION,
        })?)?;
        match recv::<FromAgent>(&mut s) {
            Ok(FromAgent::Hello { protocol, version }) if protocol == PROTOCOL_VERSION => {
                Ok((s, version))
            }
            Ok(FromAgent::Hello { protocol, .. }) => Err(AgentError::Version {
                agent: protocol,
                host: PROTOCOL_VERSION,
            }),
            Ok(other) => Err(unexpected(other)),
            Err(FrameError::Closed) => Err(AgentError::Unreachable(CLOSED_BEFORE_ANSWER.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Mixes `seed` (1 to [`MAX_SEED`](crate::identity::MAX_SEED) bytes,
    /// which should come from a CSPRNG: the guest credits them as
    /// entropy) into the guest kernel's random pool and reseeds its CRNG.
    pub fn reseed(&self, seed: &[u8]) -> Result<Reseeded, AgentError> {
        crate::identity::check_seed(seed)?;
        let req = ToAgent::Reseed {
            seed: seed.to_vec(),
        };
        match self.request_new("Reseed", &req)?.1 {
            FromAgent::Reseeded(done) => Ok(done),
            other => Err(unexpected(other)),
        }
    }

    /// Sets the guest's hostname and/or machine id (each part that is
    /// `Some`), after checking them here: a bad part is an
    /// [`AgentError::Invalid`] and nothing is sent.
    pub fn set_identity(&self, identity: &Identity) -> Result<(), AgentError> {
        identity.check()?;
        expect_done(
            self.request_new("SetIdentity", &ToAgent::SetIdentity(identity.clone()))?
                .1,
        )
    }

    /// Tells a guest that was just resumed from a snapshot (or cloned
    /// from one) so: in order, mixes [`SEED_LEN`](crate::identity::SEED_LEN)
    /// fresh bytes from the host's CSPRNG into its random pool and
    /// reseeds its CRNG ([`reseed`](Self::reseed)), steps its clock to the
    /// host's when it is off by more than [`RESTORE_CLOCK_TOLERANCE`],
    /// and, for a clone, sets its new `identity`
    /// ([`set_identity`](Self::set_identity); checked before anything is
    /// sent). Call it once the agent answers after the restore (the
    /// client's patience applies to each step).
    ///
    /// An agent too old for `Reseed` still gets its clock stepped; the
    /// result is then [`AgentError::Unsupported`].
    pub fn announce_restore(
        &self,
        identity: Option<&Identity>,
    ) -> Result<RestoreReport, AgentError> {
        if let Some(identity) = identity {
            identity.check()?;
        }
        let mut seed = [0u8; crate::identity::SEED_LEN];
        crate::identity::host_random(&mut seed).map_err(AgentError::HostRandom)?;
        let reseeded = self.reseed(&seed);
        seed.fill(0);
        let reseeded = match reseeded {
            Ok(done) => done,
            Err(e @ AgentError::Unsupported { .. }) => {
                self.sync_time(RESTORE_CLOCK_TOLERANCE)?;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let clock_drift_secs = self.sync_time(RESTORE_CLOCK_TOLERANCE)?;
        let identity = identity.filter(|i| i.hostname.is_some() || i.machine_id.is_some());
        if let Some(identity) = identity {
            self.set_identity(identity)?;
        }
        Ok(RestoreReport {
            reseeded,
            clock_drift_secs,
            clock_stepped: clock_drift_secs.abs() > RESTORE_CLOCK_TOLERANCE.as_secs_f64(),
            identity_set: identity.is_some(),
        })
    }
}
