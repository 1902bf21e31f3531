//! The terminal side of the serial console: raw mode while attached
//! (restored on every way out — return, panic, fatal signal) and QEMU's
//! `Ctrl-A` escapes. The input thread is in [`crate::console_input`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();
static RAW_ACTIVE: AtomicBool = AtomicBool::new(false);

/// Puts the terminal back as it was. Async-signal-safe: an atomic swap,
/// a read of an initialised OnceLock and tcsetattr.
pub fn restore_terminal() {
    if RAW_ACTIVE.swap(false, Ordering::SeqCst) {
        if let Some(saved) = SAVED_TERMIOS.get() {
            // SAFETY: tcsetattr on fd 0 with a termios that tcgetattr filled.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

extern "C" fn restore_and_reraise(sig: libc::c_int) {
    restore_terminal();
    // SAFETY: resetting the disposition and re-raising are async-signal-safe;
    // the process then ends as the signal would have ended it.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Raw mode on stdin for as long as the guard lives.
#[derive(Debug)]
pub struct RawTerminal(());

impl RawTerminal {
    /// Enters raw mode if stdin is a terminal; `None` otherwise.
    pub fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal, `saved` is a valid termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let _ = SAVED_TERMIOS.set(saved);
        let saved = *SAVED_TERMIOS.get()?;
        static HOOKS: std::sync::Once = std::sync::Once::new();
        HOOKS.call_once(|| {
            for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
                // SAFETY: installs a handler that only does async-signal-safe work.
                unsafe {
                    libc::signal(sig, restore_and_reraise as *const () as libc::sighandler_t)
                };
            }
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                previous(info);
            }));
        });
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct in place.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so "\n" from the guest still returns the
        // carriage on hosts where the guest's tty does not add "\r".
        raw.c_oflag = saved.c_oflag;
        RAW_ACTIVE.store(true, Ordering::SeqCst);
        // SAFETY: fd 0 is a terminal, `raw` a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            RAW_ACTIVE.store(false, Ordering::SeqCst);
            return None;
        }
        Some(RawTerminal(()))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// What one input byte means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleKey {
    /// Pass to the guest.
    Byte(u8),
    /// `Ctrl-A x`: kill the VM.
    Exit,
    /// `Ctrl-A h`: show the escapes.
    Help,
    /// Part of an escape, or an unknown escape (ignored, as QEMU does).
    Nothing,
}

const CTRL_A: u8 = 0x01;

/// Recognises QEMU's `Ctrl-A` escapes in the input stream.
#[derive(Debug, Default)]
pub struct EscapeParser {
    after_ctrl_a: bool,
}

impl EscapeParser {
    pub fn feed(&mut self, byte: u8) -> ConsoleKey {
        if !self.after_ctrl_a {
            if byte == CTRL_A {
                self.after_ctrl_a = true;
                return ConsoleKey::Nothing;
            }
            return ConsoleKey::Byte(byte);
        }
        self.after_ctrl_a = false;
        match byte {
            b'x' | b'X' => ConsoleKey::Exit,
            b'h' | b'H' | b'?' => ConsoleKey::Help,
            CTRL_A => ConsoleKey::Byte(CTRL_A),
            _ => ConsoleKey::Nothing,
        }
    }
}

pub const ESCAPE_HELP: &str =
    "\r\nC-a x    kill the VM\r\nC-a h    this help\r\nC-a C-a  send C-a\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(input: &[u8]) -> Vec<ConsoleKey> {
        let mut p = EscapeParser::default();
        input
            .iter()
            .map(|&b| p.feed(b))
            .filter(|k| *k != ConsoleKey::Nothing)
            .collect()
    }

    #[test]
    fn escapes() {
        assert_eq!(
            keys(b"ls\r"),
            vec![
                ConsoleKey::Byte(b'l'),
                ConsoleKey::Byte(b's'),
                ConsoleKey::Byte(b'\r')
            ]
        );
        assert_eq!(
            keys(b"a\x01x"),
            vec![ConsoleKey::Byte(b'a'), ConsoleKey::Exit]
        );
        assert_eq!(keys(b"\x01\x01"), vec![ConsoleKey::Byte(CTRL_A)]);
        assert_eq!(keys(b"\x01h"), vec![ConsoleKey::Help]);
        // Unknown escapes are swallowed; the next byte is ordinary.
        assert_eq!(keys(b"\x01zx"), vec![ConsoleKey::Byte(b'x')]);
    }
}
