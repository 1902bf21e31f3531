//! One viewer's connection: the RFB handshake, then a reader (this
//! thread: client messages into input, clipboard, resize requests and
//! update requests) and a writer thread (waits until the viewer asked for
//! an update and something changed, then encodes and writes it).
//!
//! Bounded whatever the viewer does: its pending damage coalesces, a new
//! clipboard text replaces an unsent one, one update is encoded at a time
//! (in bands of at most 64 rows), and a write that does not finish within
//! the write timeout (a viewer that stopped reading) disconnects it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::display::{Display, Rect, Viewer, MAX_DIMENSION};
use crate::encoding::{encode_raw, ZrleEncoder};
use crate::keysym;
use crate::protocol::{self, ClientMessage, PixelFormat, ProtocolError};
use crate::{Clipboard, InputSink, ResizeHandler};

/// Rows per rectangle sent (ZRLE's tile height): bounds what one write
/// holds.
const BAND_ROWS: u32 = 64;
/// Keys a viewer may hold down at once (a bound on the state kept).
const MAX_KEYS_DOWN: usize = 64;

/// A viewer's socket.
#[derive(Debug)]
pub(crate) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    pub(crate) fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub(crate) fn set_timeouts(
        &self,
        read: Option<Duration>,
        write: Option<Duration>,
    ) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why a session ended (logged; the viewer is disconnected).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    #[error("the client's protocol version {0:?} is not RFB 3.x")]
    Version(String),
    #[error("the client chose security type {0}, which was not offered")]
    SecurityType(u8),
    #[error("wrong password")]
    AuthFailed,
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error("malformed client message")]
    Protocol(#[from] ProtocolError),
    #[error("the client cannot follow a change of the screen size")]
    CannotResize,
    #[error("cannot encode an update")]
    Encode(#[from] crate::encoding::EncodeError),
}

/// What every session of a server shares.
pub(crate) struct Context {
    pub(crate) display: Arc<Display>,
    pub(crate) input: Arc<dyn InputSink>,
    pub(crate) clipboard: Arc<dyn Clipboard>,
    pub(crate) resize: Arc<dyn ResizeHandler>,
    pub(crate) password: Option<Vec<u8>>,
    pub(crate) name: String,
    pub(crate) handshake_timeout: Duration,
    pub(crate) write_timeout: Duration,
}

/// The RFB minor version the session speaks (3.3, 3.7 or 3.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Minor {
    V3,
    V7,
    V8,
}

fn read_exact<const N: usize>(conn: &mut Conn) -> Result<[u8; N], SessionError> {
    let mut b = [0u8; N];
    conn.read_exact(&mut b)?;
    Ok(b)
}

fn reason(text: &str) -> Vec<u8> {
    let mut b = crate::display::len_u32(text.len()).to_be_bytes().to_vec();
    b.extend_from_slice(text.as_bytes());
    b
}

/// Version and security. `refuse` turns the connection away with that
/// reason (told to the client as RFB allows) instead of authenticating.
pub(crate) fn handshake(
    conn: &mut Conn,
    password: Option<&[u8]>,
    refuse: Option<&'static str>,
) -> Result<(), SessionError> {
    conn.write_all(b"RFB 003.008\n")?;
    let v: [u8; 12] = read_exact(conn)?;
    let text = String::from_utf8_lossy(&v).into_owned();
    let digits = |s: &[u8]| {
        std::str::from_utf8(s)
            .ok()
            .filter(|t| t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse::<u32>().ok())
    };
    let minor = match (&v[..4], digits(&v[4..7]), v[7], digits(&v[8..11]), v[11]) {
        (b"RFB ", Some(3), b'.', Some(m), b'\n') => match m {
            8.. => Minor::V8,
            7 => Minor::V7,
            _ => Minor::V3,
        },
        _ => return Err(SessionError::Version(text)),
    };
    let kind: u8 = if password.is_some() { 2 } else { 1 };
    if let Some(why) = refuse {
        let mut b = if minor == Minor::V3 {
            vec![0, 0, 0, 0]
        } else {
            vec![0]
        };
        b.extend(reason(why));
        conn.write_all(&b)?;
        return Err(SessionError::Refused(why));
    }
    if minor == Minor::V3 {
        conn.write_all(&u32::from(kind).to_be_bytes())?;
    } else {
        conn.write_all(&[1, kind])?;
        let [chosen] = read_exact::<1>(conn)?;
        if chosen != kind {
            // RFC 6143: a failed SecurityResult, with a reason in 3.8.
            let mut b = 1u32.to_be_bytes().to_vec();
            if minor == Minor::V8 {
                b.extend(reason("security type not offered"));
            }
            conn.write_all(&b)?;
            return Err(SessionError::SecurityType(chosen));
        }
    }
    if let Some(password) = password {
        let challenge = crate::auth::challenge()?;
        conn.write_all(&challenge)?;
        let answer: [u8; 16] = read_exact(conn)?;
        if !crate::auth::check(password, &challenge, &answer) {
            let mut b = 1u32.to_be_bytes().to_vec();
            if minor == Minor::V8 {
                b.extend(reason("authentication failed"));
            }
            conn.write_all(&b)?;
            return Err(SessionError::AuthFailed);
        }
        conn.write_all(&0u32.to_be_bytes())?;
    } else if minor == Minor::V8 {
        conn.write_all(&0u32.to_be_bytes())?;
    }
    Ok(())
}

/// What the viewer asked for, read by the writer at each update.
#[derive(Debug, Clone, Copy)]
struct Settings {
    format: PixelFormat,
    zrle: bool,
    desktop_size: bool,
    extended_desktop_size: bool,
}

/// Runs a viewer's session until it disconnects or misbehaves.
pub(crate) fn run(mut conn: Conn, ctx: &Context) -> Result<(), SessionError> {
    conn.set_timeouts(Some(ctx.handshake_timeout), Some(ctx.write_timeout))?;
    handshake(&mut conn, ctx.password.as_deref(), None)?;
    let [_shared] = read_exact::<1>(&mut conn)?;
    let viewer = Arc::new(Viewer::default());
    // Attached before ServerInit tells the size: a resize after it is
    // seen by this viewer.
    ctx.display.attach(&viewer);
    let (w, h) = ctx.display.size();
    let (w16, h16) = (dim16(w), dim16(h));
    conn.write_all(&protocol::server_init(w16, h16, &ctx.name))?;
    // Viewers may sit idle for as long as they like.
    conn.set_timeouts(None, Some(ctx.write_timeout))?;

    let settings = Arc::new(Mutex::new(Settings {
        format: PixelFormat::NATIVE,
        zrle: false,
        desktop_size: false,
        extended_desktop_size: false,
    }));
    let writer = {
        let (conn, viewer, settings, display) = (
            conn.try_clone()?,
            viewer.clone(),
            settings.clone(),
            ctx.display.clone(),
        );
        std::thread::Builder::new()
            .name("vnc-writer".into())
            .spawn(move || {
                let result = write_loop(conn, &viewer, &settings, &display, (w, h));
                viewer.change(|p| p.closed = true);
                result
            })?
    };
    let read_result = read_loop(&mut conn, ctx, &viewer, &settings);
    viewer.change(|p| p.closed = true);
    conn.shutdown();
    let write_result = writer.join().unwrap_or(Ok(()));
    read_result.and(write_result)
}

/// A dimension as RFB carries it (the display keeps them far below).
fn dim16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

/// Keys held by the viewer: the code each keysym pressed, and whether the
/// server added a Shift for it.
#[derive(Debug, Default)]
struct Keyboard {
    down: HashMap<u32, (u16, bool)>,
}

impl Keyboard {
    /// Whether the viewer holds a Shift key.
    fn shift_held(&self) -> bool {
        self.down.keys().any(|&k| keysym::is_shift(k))
    }

    fn event(&mut self, keysym: u32, down: bool, input: &dyn InputSink) {
        if down {
            let Some(key) = keysym::to_key(keysym) else {
                tracing::debug!(keysym, "keysym without a US key ignored");
                return;
            };
            // A repeated press (the viewer's auto-repeat) keeps the
            // first press's Shift.
            let added = match self.down.get(&keysym) {
                Some(&(_, added)) => added,
                None if self.down.len() >= MAX_KEYS_DOWN => return,
                None => key.shift && !self.shift_held(),
            };
            if added && !self.down.contains_key(&keysym) {
                input.key(keysym::code::LEFTSHIFT, true);
            }
            input.key(key.code, true);
            self.down.insert(keysym, (key.code, added));
        } else if let Some((code, added)) = self.down.remove(&keysym) {
            input.key(code, false);
            if added {
                input.key(keysym::code::LEFTSHIFT, false);
            }
        } else if let Some(key) = keysym::to_key(keysym) {
            // Released without a press we saw: release it anyway.
            input.key(key.code, false);
        }
    }
}

/// `v` of `0..size` as `0..=32767`.
fn scale(v: u16, size: u32) -> u32 {
    if size <= 1 {
        return 0;
    }
    let v = u32::from(v).min(size - 1);
    v * 32767 / (size - 1)
}

fn read_loop(
    conn: &mut Conn,
    ctx: &Context,
    viewer: &Viewer,
    settings: &Mutex<Settings>,
) -> Result<(), SessionError> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    let mut keyboard = Keyboard::default();
    let mut last_buttons = 0u8;
    loop {
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut used = 0;
        while let Some((msg, len)) = protocol::decode_client_message(&buf[used..])? {
            used += len;
            handle(msg, ctx, viewer, settings, &mut keyboard, &mut last_buttons);
        }
        buf.drain(..used);
    }
}

fn handle(
    msg: ClientMessage,
    ctx: &Context,
    viewer: &Viewer,
    settings: &Mutex<Settings>,
    keyboard: &mut Keyboard,
    last_buttons: &mut u8,
) {
    // Locked only to change them: the receivers below may be slow.
    let settings = || settings.lock().unwrap_or_else(|e| e.into_inner());
    match msg {
        ClientMessage::SetPixelFormat(format) => settings().format = format,
        ClientMessage::SetEncodings(list) => {
            let mut settings = settings();
            // The first of Raw and ZRLE the viewer lists is its choice.
            settings.zrle = list
                .iter()
                .find(|e| matches!(**e, protocol::ENC_RAW | protocol::ENC_ZRLE))
                == Some(&protocol::ENC_ZRLE);
            let had = settings.desktop_size || settings.extended_desktop_size;
            settings.desktop_size = list.contains(&protocol::ENC_DESKTOP_SIZE);
            settings.extended_desktop_size = list.contains(&protocol::ENC_EXTENDED_DESKTOP_SIZE);
            if settings.extended_desktop_size && !had {
                // Tells the viewer the server takes SetDesktopSize.
                viewer.change(|p| p.resized = true);
            }
        }
        ClientMessage::FramebufferUpdateRequest {
            incremental,
            x,
            y,
            width,
            height,
        } => {
            let rect = Rect::new(x.into(), y.into(), width.into(), height.into());
            viewer.change(|p| {
                p.requested = true;
                if !incremental {
                    p.add_damage(rect);
                }
            });
        }
        ClientMessage::KeyEvent { down, keysym } => {
            keyboard.event(keysym, down, ctx.input.as_ref());
        }
        ClientMessage::PointerEvent { buttons, x, y } => {
            let (w, h) = ctx.display.size();
            let pressed = buttons & !*last_buttons;
            let wheel = i32::from(pressed & 0x08 != 0) - i32::from(pressed & 0x10 != 0);
            *last_buttons = buttons;
            ctx.input
                .pointer(scale(x, w), scale(y, h), buttons & 0x07, wheel);
        }
        ClientMessage::ClientCutText(latin1) => {
            let text: String = latin1.iter().map(|&b| char::from(b)).collect();
            ctx.clipboard.client_text(&text);
        }
        ClientMessage::SetDesktopSize { width, height, .. } => {
            let valid = width > 0
                && height > 0
                && u32::from(width) <= MAX_DIMENSION
                && u32::from(height) <= MAX_DIMENSION;
            // Status: 0 done (the display follows), 1 prohibited,
            // 3 invalid layout.
            let status = if !valid {
                3
            } else if ctx.resize.request_resize(width, height) {
                0
            } else {
                1
            };
            viewer.change(|p| p.resize_reply = Some(status));
        }
    }
}

/// What one update carries.
struct Work {
    cut_text: Option<Vec<u8>>,
    update: Option<(Vec<Rect>, bool, Option<u32>)>,
}

/// Waits for something to send; None once the session is closed.
fn next_work(viewer: &Viewer) -> Option<Work> {
    let mut p = viewer.lock();
    loop {
        if p.closed {
            return None;
        }
        let update_ready =
            p.requested && (!p.damage.is_empty() || p.resized || p.resize_reply.is_some());
        if update_ready || p.cut_text.is_some() {
            let update = update_ready.then(|| {
                p.requested = false;
                (
                    std::mem::take(&mut p.damage),
                    std::mem::take(&mut p.resized),
                    p.resize_reply.take(),
                )
            });
            return Some(Work {
                cut_text: p.cut_text.take(),
                update,
            });
        }
        p = viewer.wake.wait(p).unwrap_or_else(|e| e.into_inner());
    }
}

fn write_loop(
    mut conn: Conn,
    viewer: &Viewer,
    settings: &Mutex<Settings>,
    display: &Display,
    initial: (u32, u32),
) -> Result<(), SessionError> {
    let mut zrle = ZrleEncoder::default();
    // The size the viewer knows.
    let mut known = initial;
    let result = (|| {
        while let Some(work) = next_work(viewer) {
            if let Some(text) = work.cut_text {
                conn.write_all(&protocol::server_cut_text(&text))?;
            }
            let Some((damage, resized, reply)) = work.update else {
                continue;
            };
            let s = *settings.lock().unwrap_or_else(|e| e.into_inner());
            let (w, h) = display.size();
            let mut pseudo: Vec<Vec<u8>> = Vec::new();
            if resized || (w, h) != known {
                if s.extended_desktop_size {
                    pseudo.push(protocol::extended_desktop_size(0, 0, dim16(w), dim16(h)));
                } else if s.desktop_size {
                    pseudo.push(
                        protocol::rect_header(0, 0, dim16(w), dim16(h), protocol::ENC_DESKTOP_SIZE)
                            .to_vec(),
                    );
                } else if (w, h) != known {
                    return Err(SessionError::CannotResize);
                }
                known = (w, h);
            }
            if let Some(status) = reply {
                let status = u16::try_from(status).unwrap_or(1);
                pseudo.push(protocol::extended_desktop_size(
                    1,
                    status,
                    dim16(w),
                    dim16(h),
                ));
            }
            let bands: Vec<Rect> = damage
                .iter()
                .map(|r| r.clip(w, h))
                .filter(|r| !r.is_empty())
                .flat_map(|r| {
                    (r.y..r.y + r.height)
                        .step_by(BAND_ROWS as usize)
                        .map(move |y| Rect::new(r.x, y, r.width, BAND_ROWS.min(r.y + r.height - y)))
                })
                .collect();
            let count = u16::try_from(pseudo.len() + bands.len()).unwrap_or(u16::MAX);
            conn.write_all(&protocol::update_header(count))?;
            for p in &pseudo {
                conn.write_all(p)?;
            }
            for band in bands {
                // The screen may have shrunk since: send what is left
                // (the resize that follows repaints it all).
                let (pixels, r, _) = display.read(band);
                let (x, y, bw, bh) = (dim16(r.x), dim16(r.y), dim16(r.width), dim16(r.height));
                if s.zrle && !r.is_empty() {
                    let data =
                        zrle.encode(&pixels, r.width as usize, r.height as usize, &s.format)?;
                    conn.write_all(&protocol::rect_header(x, y, bw, bh, protocol::ENC_ZRLE))?;
                    conn.write_all(&data)?;
                } else {
                    conn.write_all(&protocol::rect_header(x, y, bw, bh, protocol::ENC_RAW))?;
                    conn.write_all(&encode_raw(&pixels, &s.format))?;
                }
            }
        }
        Ok(())
    })();
    // A write that failed or timed out ends the session: the reader sees
    // the socket shut.
    conn.shutdown();
    result
}

#[cfg(test)]
mod tests;
