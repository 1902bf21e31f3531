//! The listener: a Unix socket or a TCP address, an accept thread, and a
//! session per viewer up to a cap.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::display::Display;
use crate::session::{self, Conn, Context};
use crate::{Clipboard, InputSink, ResizeHandler};

/// Viewers at once by default.
pub const DEFAULT_MAX_CLIENTS: usize = 50;
/// Connections being turned away at once (each gets a short thread that
/// tells it why); more are closed without a word.
const MAX_REFUSING: usize = 8;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path (created; an existing socket file there
    /// is replaced).
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Listen {
    /// Whether only this host can connect: a Unix socket or a loopback
    /// address.
    pub fn is_local(&self) -> bool {
        match self {
            Listen::Unix(_) => true,
            Listen::Tcp(addr) => addr.ip().is_loopback(),
        }
    }
}

/// How viewers authenticate.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// Anyone who can connect (only for a local listener).
    None,
    /// VNC Authentication with this password (1 to 8 bytes).
    Password(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Password(_) => f.write_str("Password(..)"),
        }
    }
}

/// A server's settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Listen,
    pub auth: Auth,
    /// The desktop name viewers show.
    pub name: String,
    /// Viewers at once; more are told "too many clients" and closed.
    pub max_clients: usize,
    /// How long a viewer has to complete the handshake.
    pub handshake_timeout: Duration,
    /// How long one write to a viewer may block before the viewer is
    /// given up on (it stopped reading).
    pub write_timeout: Duration,
}

impl ServerConfig {
    pub fn new(listen: Listen, auth: Auth) -> Self {
        ServerConfig {
            listen,
            auth,
            name: "hostvisor".to_string(),
            max_clients: DEFAULT_MAX_CLIENTS,
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(15),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum VncError {
    #[error("a VNC server on {0} (not a Unix socket or loopback) needs a password")]
    PasswordRequired(SocketAddr),
    #[error(
        "a VNC password has 1 to {} bytes (VNC Authentication uses no more)",
        crate::auth::MAX_PASSWORD
    )]
    PasswordLength,
    #[error("cannot listen on {what}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the VNC accept thread")]
    Thread(#[source] std::io::Error),
}

/// The receivers of what viewers send.
#[derive(Clone)]
pub struct Handlers {
    pub input: Arc<dyn InputSink>,
    pub clipboard: Arc<dyn Clipboard>,
    pub resize: Arc<dyn ResizeHandler>,
}

impl Default for Handlers {
    fn default() -> Self {
        Handlers {
            input: Arc::new(crate::Ignore),
            clipboard: Arc::new(crate::Ignore),
            resize: Arc::new(crate::Ignore),
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }
            Listener::Unix(l) => Conn::Unix(l.accept()?.0),
        })
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}

/// A running VNC server. Dropping it stops accepting and disconnects
/// every viewer.
pub struct VncServer {
    local: Listen,
    clients: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Writing to it wakes the accept thread to stop.
    waker: UnixStream,
    thread: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

impl std::fmt::Debug for VncServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VncServer")
            .field("listen", &self.local)
            .finish_non_exhaustive()
    }
}

impl VncServer {
    /// Listens as `config` says and serves `display`. Refuses to listen
    /// beyond this host without a password.
    pub fn start(
        config: ServerConfig,
        display: Arc<Display>,
        handlers: Handlers,
    ) -> Result<VncServer, VncError> {
        let password = match &config.auth {
            Auth::None => {
                if let Listen::Tcp(addr) = config.listen {
                    if !config.listen.is_local() {
                        return Err(VncError::PasswordRequired(addr));
                    }
                }
                None
            }
            Auth::Password(p) => {
                if p.is_empty() || p.len() > crate::auth::MAX_PASSWORD {
                    return Err(VncError::PasswordLength);
                }
                Some(p.as_bytes().to_vec())
            }
        };
        let listen_err = |what: String| move |source| VncError::Listen { what, source };
        let (listener, local, unix_path) = match &config.listen {
            Listen::Tcp(addr) => {
                let l = TcpListener::bind(addr).map_err(listen_err(addr.to_string()))?;
                let local = l.local_addr().map_err(listen_err(addr.to_string()))?;
                (Listener::Tcp(l), Listen::Tcp(local), None)
            }
            Listen::Unix(path) => {
                remove_stale_socket(path);
                let l = UnixListener::bind(path).map_err(listen_err(path.display().to_string()))?;
                (
                    Listener::Unix(l),
                    Listen::Unix(path.clone()),
                    Some(path.clone()),
                )
            }
        };
        let (waker, wakee) = UnixStream::pair().map_err(VncError::Thread)?;
        let clients = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = Arc::new(Context {
            display,
            input: handlers.input,
            clipboard: handlers.clipboard,
            resize: handlers.resize,
            password,
            name: config.name.clone(),
            handshake_timeout: config.handshake_timeout,
            write_timeout: config.write_timeout,
        });
        let accept = Acceptor {
            listener,
            wakee,
            ctx,
            clients: clients.clone(),
            refusing: Arc::new(AtomicUsize::new(0)),
            stop: stop.clone(),
            max_clients: config.max_clients,
            sessions: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("vnc-accept".into())
            .spawn(move || accept.run())
            .map_err(VncError::Thread)?;
        Ok(VncServer {
            local,
            clients,
            stop,
            waker,
            thread: Some(thread),
            unix_path,
        })
    }

    /// Where the server listens (the bound port for a TCP port 0).
    pub fn local_addr(&self) -> &Listen {
        &self.local
    }

    /// Viewers connected now (handshaking or in session).
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::SeqCst)
    }
}

impl Drop for VncServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::io::Write::write_all(&mut &self.waker, &[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Removes a socket file left by an earlier run (only a socket: any other
/// file at the path is left for bind to refuse).
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

struct Session {
    conn: Conn,
    thread: JoinHandle<()>,
}

struct Acceptor {
    listener: Listener,
    wakee: UnixStream,
    ctx: Arc<Context>,
    clients: Arc<AtomicUsize>,
    refusing: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    max_clients: usize,
    sessions: Vec<Session>,
}

/// Waits until `fds[i]` is readable; the readable ones.
fn wait_readable(fds: &[RawFd]) -> std::io::Result<Vec<bool>> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `polls` is a valid array of `polls.len()` pollfds that
        // outlives the call.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(polls.iter().map(|p| p.revents != 0).collect());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Acceptor {
    fn run(mut self) {
        let fds = [self.listener.fd(), self.wakee.as_raw_fd()];
        while !self.stop.load(Ordering::SeqCst) {
            match wait_readable(&fds) {
                Ok(ready) if ready[1] => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!("VNC server stopped: {e}");
                    break;
                }
            }
            self.sessions.retain(|s| !s.thread.is_finished());
            match self.listener.accept() {
                Ok(conn) => self.admit(conn),
                Err(e) => {
                    tracing::warn!("VNC accept failed: {e}");
                    // Out of descriptors: give the sessions a moment.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        for s in &self.sessions {
            s.conn.shutdown();
        }
        for s in self.sessions.drain(..) {
            let _ = s.thread.join();
        }
    }

    fn admit(&mut self, conn: Conn) {
        if self.clients.load(Ordering::SeqCst) >= self.max_clients {
            self.refuse(conn);
            return;
        }
        let Ok(handle) = conn.try_clone() else {
            return;
        };
        self.clients.fetch_add(1, Ordering::SeqCst);
        let (ctx, clients) = (self.ctx.clone(), self.clients.clone());
        let spawned = std::thread::Builder::new()
            .name("vnc-client".into())
            .spawn(move || {
                match session::run(conn, &ctx) {
                    Ok(()) => tracing::debug!("VNC viewer disconnected"),
                    Err(e) => tracing::info!("VNC viewer disconnected: {e}"),
                }
                clients.fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(thread) => self.sessions.push(Session {
                conn: handle,
                thread,
            }),
            Err(e) => {
                tracing::warn!("cannot start a VNC session: {e}");
                self.clients.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Tells a viewer beyond the cap why it is turned away (on a short
    /// thread with short timeouts, so a silent one holds nothing long).
    fn refuse(&self, conn: Conn) {
        if self.refusing.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSING {
            self.refusing.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let refusing = self.refusing.clone();
        let spawned = std::thread::Builder::new()
            .name("vnc-refuse".into())
            .spawn(move || {
                let mut conn = conn;
                let t = Some(Duration::from_secs(2));
                if conn.set_timeouts(t, t).is_ok() {
                    let _ = session::handshake(&mut conn, None, Some("too many clients"));
                }
                conn.shutdown();
                refusing.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.refusing.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
