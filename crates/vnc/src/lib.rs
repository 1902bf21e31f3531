//! A VNC server (RFB 3.8, RFC 6143) for a VM's screen, keyboard and
//! pointer.
//!
//! The display device feeds a [`Display`]: it [`resize`](Display::resize)s
//! it and pushes [`update`](Display::update)s of dirty rectangles (32-bit
//! BGRX pixels with a stride). Each connected viewer keeps the rectangles
//! it has not been sent yet (coalesced, bounded) and is sent them when it
//! asks for an update, so an idle screen costs nothing. What viewers type
//! and point goes to an [`InputSink`] as Linux key codes and absolute
//! tablet coordinates; their clipboard text to a [`Clipboard`]; a viewer's
//! request for another screen size to a [`ResizeHandler`].
//!
//! Why not a crate: the maintained Rust RFB servers (Oxide's `rfb`, used
//! by Propolis, and its fork `rfb2`) are built on tokio and async traits,
//! offer Raw only and no VNC Authentication; `vnc-rs` is a client. The
//! VMM is synchronous and thread-based, so the protocol is written here
//! (a few hundred lines of message codec, Raw and ZRLE) on `flate2`,
//! `des` and `png`.
//!
//! Threads: one accept thread, and per viewer a reader (handshake, then
//! client messages) and a writer (waits for damage and an update request,
//! encodes, writes). Blocking I/O on threads needs no event loop or
//! runtime, a slow viewer only ever blocks its own writer (whose writes
//! time out, which disconnects it), and the viewer cap bounds the
//! threads.

pub mod auth;
pub mod display;
pub mod encoding;
pub mod keysym;
pub mod protocol;
pub mod screenshot;
pub mod server;
mod session;

pub use display::{Display, DisplayError, Frame, Rect};
pub use screenshot::write_png;
pub use server::{Auth, Handlers, Listen, ServerConfig, VncError, VncServer};

/// Where viewers' keys and pointer go: the virtio keyboard and tablet.
pub trait InputSink: Send + Sync {
    /// A Linux key code (KEY_A = 30 ...) pressed or released.
    fn key(&self, code: u16, pressed: bool);
    /// The pointer at `x`, `y` (each `0..=32767` across the screen),
    /// buttons held (bit 0 left, 1 middle, 2 right) and wheel clicks since
    /// the last call (positive = up).
    fn pointer(&self, x: u32, y: u32, buttons: u8, wheel: i32);
}

/// Where viewers' clipboard text goes (the guest's clipboard).
pub trait Clipboard: Send + Sync {
    /// A viewer copied `text`.
    fn client_text(&self, text: &str);
}

/// Takes a viewer's request for another screen size.
pub trait ResizeHandler: Send + Sync {
    /// Asks the display for `width` x `height`; false if it refuses. The
    /// display's actual resize arrives later through [`Display::resize`].
    fn request_resize(&self, width: u16, height: u16) -> bool;
}

/// Ignores everything: for a display nobody may drive.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ignore;

impl InputSink for Ignore {
    fn key(&self, _: u16, _: bool) {}
    fn pointer(&self, _: u32, _: u32, _: u8, _: i32) {}
}

impl Clipboard for Ignore {
    fn client_text(&self, _: &str) {}
}

impl ResizeHandler for Ignore {
    fn request_resize(&self, _: u16, _: u16) -> bool {
        false
    }
}

/// Waits (up to 5 s) until `cond` holds, for tests of what other threads
/// do.
#[cfg(test)]
pub(crate) fn tests_wait(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    cond()
}
