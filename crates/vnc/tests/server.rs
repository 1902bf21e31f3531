//! The server as viewers meet it, on a Unix socket or 127.0.0.1: who may
//! listen where, a client resize reaching the handler, and hostile
//! viewers (garbage, one that never reads, 50 at once and one more).

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vnc::{
    Auth, Display, Handlers, Listen, Rect, ResizeHandler, ServerConfig, VncError, VncServer,
};

fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

fn unix_server(
    path: &Path,
    display: &Arc<Display>,
    handlers: Handlers,
    tune: impl FnOnce(&mut ServerConfig),
) -> VncServer {
    let mut config = ServerConfig::new(Listen::Unix(path.to_path_buf()), Auth::None);
    tune(&mut config);
    VncServer::start(config, display.clone(), handlers).unwrap()
}

/// Connects and completes the handshake (RFB 3.8, no security); returns
/// the stream after ServerInit.
fn viewer(path: &Path) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 12];
    s.read_exact(&mut b).unwrap();
    s.write_all(b"RFB 003.008\n").unwrap();
    let mut types = [0u8; 2];
    s.read_exact(&mut types).unwrap();
    assert_eq!(types, [1, 1]);
    s.write_all(&[1]).unwrap();
    let mut ok = [0u8; 4];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(ok, [0; 4]);
    s.write_all(&[1]).unwrap();
    let mut init = [0u8; 24];
    s.read_exact(&mut init).unwrap();
    let mut name = vec![0u8; u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize];
    s.read_exact(&mut name).unwrap();
    s
}

fn request(s: &mut UnixStream, incremental: bool, w: u16, h: u16) {
    let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
    m.extend_from_slice(&w.to_be_bytes());
    m.extend_from_slice(&h.to_be_bytes());
    s.write_all(&m).unwrap();
}

/// Reads one Raw FramebufferUpdate; its rectangles.
fn raw_update(s: &mut UnixStream) -> Vec<(u16, u16, u16, u16, i32)> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h).unwrap();
    let n = u16::from_be_bytes([h[2], h[3]]);
    (0..n)
        .map(|_| {
            let mut r = [0u8; 12];
            s.read_exact(&mut r).unwrap();
            let be = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]);
            let enc = i32::from_be_bytes(r[8..12].try_into().unwrap());
            let len = match enc {
                0 => usize::from(be(4)) * usize::from(be(6)) * 4,
                -308 => {
                    let mut n = [0u8; 4];
                    s.read_exact(&mut n).unwrap();
                    usize::from(n[0]) * 16
                }
                _ => 0,
            };
            let mut skip = vec![0u8; len];
            s.read_exact(&mut skip).unwrap();
            (be(0), be(2), be(4), be(6), enc)
        })
        .collect()
}

#[test]
fn a_password_is_required_beyond_this_host() {
    let display = Display::new(8, 8).unwrap();
    let anywhere = ServerConfig::new(Listen::Tcp("0.0.0.0:0".parse().unwrap()), Auth::None);
    let err = VncServer::start(anywhere, display.clone(), Handlers::default()).unwrap_err();
    assert!(matches!(err, VncError::PasswordRequired(_)), "{err}");
    for bad in ["", "123456789"] {
        let config = ServerConfig::new(
            Listen::Tcp("127.0.0.1:0".parse().unwrap()),
            Auth::Password(bad.into()),
        );
        let err = VncServer::start(config, display.clone(), Handlers::default()).unwrap_err();
        assert!(matches!(err, VncError::PasswordLength), "{err}");
    }
    let loopback = ServerConfig::new(Listen::Tcp("127.0.0.1:0".parse().unwrap()), Auth::None);
    assert!(VncServer::start(loopback, display.clone(), Handlers::default()).is_ok());
    let v6 = ServerConfig::new(Listen::Tcp("[::]:0".parse().unwrap()), Auth::None);
    assert!(VncServer::start(v6, display.clone(), Handlers::default()).is_err());
    let with_password = ServerConfig::new(
        Listen::Tcp("0.0.0.0:0".parse().unwrap()),
        Auth::Password("s3cret".into()),
    );
    assert!(VncServer::start(with_password, display, Handlers::default()).is_ok());
}

#[derive(Default)]
struct Resizes(Mutex<Vec<(u16, u16)>>);

impl ResizeHandler for Resizes {
    fn request_resize(&self, width: u16, height: u16) -> bool {
        self.0.lock().unwrap().push((width, height));
        true
    }
}

#[test]
fn a_client_resize_reaches_the_handler_and_malformed_clients_leave_others_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vnc.sock");
    let display = Display::new(64, 32).unwrap();
    let resizes = Arc::new(Resizes::default());
    let handlers = Handlers {
        resize: resizes.clone(),
        ..Handlers::default()
    };
    let server = unix_server(&path, &display, handlers, |_| {});
    let mut good = viewer(&path);
    // Raw and ExtendedDesktopSize.
    good.write_all(&[2, 0, 0, 2, 0, 0, 0, 0, 0xff, 0xff, 0xfe, 0xcc])
        .unwrap();
    request(&mut good, false, 64, 32);
    let u = raw_update(&mut good);
    assert_eq!(u[0], (0, 0, 64, 32, -308), "ExtendedDesktopSize announced");
    assert_eq!(u[1], (0, 0, 64, 32, 0));

    // Garbage from another viewer closes it alone.
    let mut bad = viewer(&path);
    bad.write_all(&[0xee; 64]).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(bad.read(&mut b).unwrap_or(0), 0, "the bad viewer is closed");

    let mut m = vec![251, 0, 0x05, 0x00, 0x03, 0x20, 1, 0];
    m.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x05, 0x00, 0x03, 0x20, 0, 0, 0, 0]);
    good.write_all(&m).unwrap();
    request(&mut good, true, 64, 32);
    assert_eq!(raw_update(&mut good), vec![(1, 0, 64, 32, -308)]);
    assert_eq!(*resizes.0.lock().unwrap(), vec![(1280, 800)]);
    // The display follows, as the device would after the guest's
    // mode change.
    display.resize(1280, 800).unwrap();
    request(&mut good, true, 64, 32);
    let u = raw_update(&mut good);
    assert_eq!(u[0], (0, 0, 1280, 800, -308));
    assert_eq!(u.len(), 1 + 800 / 64 + 1, "the new screen, in bands");
    assert_eq!(server.clients(), 1);
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_viewer_that_never_reads_is_dropped_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vnc.sock");
    let (w, h) = (1024u32, 768u32);
    let display = Display::new(w, h).unwrap();
    let server = unix_server(&path, &display, Handlers::default(), |c| {
        c.write_timeout = Duration::from_secs(1);
    });
    let mut stuck = viewer(&path);
    let before = rss_kib();
    let frame: Vec<u8> = (0..w * h * 4).map(|i| (i % 251) as u8).collect();
    // Ask for full updates over and over, never read, while the screen
    // keeps changing.
    let started = Instant::now();
    let mut i = 0u32;
    while server.clients() == 1 && started.elapsed() < Duration::from_secs(20) {
        let _ = stuck.set_write_timeout(Some(Duration::from_millis(50)));
        let mut m = vec![3, 0, 0, 0, 0, 0];
        m.extend_from_slice(&(w as u16).to_be_bytes());
        m.extend_from_slice(&(h as u16).to_be_bytes());
        let _ = stuck.write_all(&m);
        let x = (i * 16) % (w - 16);
        display
            .update(Rect::new(x, 0, 16, h), &frame, w as usize * 4)
            .unwrap();
        i += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        server.clients(),
        0,
        "the viewer that never reads was dropped"
    );
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "memory grew by {grown} KiB");
    // The server still serves others.
    let mut fresh = viewer(&path);
    request(&mut fresh, false, 8, 8);
    assert_eq!(raw_update(&mut fresh), vec![(0, 0, 8, 8, 0)]);
}

#[test]
fn fifty_viewers_at_once_and_the_next_is_told_why_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vnc.sock");
    let display = Display::new(32, 16).unwrap();
    let server = unix_server(&path, &display, Handlers::default(), |_| {});
    let mut viewers: Vec<UnixStream> = (0..50).map(|_| viewer(&path)).collect();
    assert!(wait_for(Duration::from_secs(5), || server.clients() == 50));
    // One more: refused with a reason, as RFB 3.8 allows.
    let mut extra = UnixStream::connect(&path).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut v = [0u8; 12];
    extra.read_exact(&mut v).unwrap();
    extra.write_all(b"RFB 003.008\n").unwrap();
    let mut count = [0u8; 1];
    extra.read_exact(&mut count).unwrap();
    assert_eq!(count, [0], "no security types: refused");
    let mut len = [0u8; 4];
    extra.read_exact(&mut len).unwrap();
    let mut why = vec![0u8; u32::from_be_bytes(len) as usize];
    extra.read_exact(&mut why).unwrap();
    assert_eq!(why, b"too many clients");
    // Every admitted viewer is served.
    display
        .update(Rect::new(0, 0, 1, 1), &[1, 2, 3, 0], 4)
        .unwrap();
    for v in &mut viewers {
        request(v, true, 32, 16);
    }
    for v in &mut viewers {
        assert_eq!(raw_update(v), vec![(0, 0, 1, 1, 0)]);
    }
    // One leaves: another gets in.
    drop(viewers.pop());
    assert!(wait_for(Duration::from_secs(5), || server.clients() == 49));
    let _again = viewer(&path);
    assert_eq!(server.clients(), 50);
    drop(server);
    // Stopping the server disconnects everyone.
    let mut b = [0u8; 1];
    assert_eq!(viewers[0].read(&mut b).unwrap_or(0), 0);
    assert!(!path.exists(), "the socket file is removed");
}
