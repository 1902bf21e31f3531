//! The terminal side of the serial console: raw mode while attached
//! (restored on every way out — return, panic, fatal signal), and an input
//! thread that feeds the UART and understands QEMU's `Ctrl-A` escapes.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};

use devices::serial::SerialDevice;
use devices::virtio::console::ConsoleInput;
use vmm_sys_util::eventfd::EventFd;

use crate::VmmEvent;

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

/// The device that console input goes to.
#[derive(Clone)]
pub enum ConsoleTarget {
    /// The UART's receive FIFO; `input_space` fires when the guest has
    /// drained it.
    Uart {
        serial: Arc<Mutex<SerialDevice>>,
        input_space: Arc<EventFd>,
    },
    /// The virtio-console port.
    Virtio(Arc<ConsoleInput>),
}

impl ConsoleTarget {
    /// Hands `pending` to the guest, waiting while the device is full;
    /// false if it can take no more, ever.
    pub fn deliver(&self, mut pending: Vec<u8>) -> bool {
        while !pending.is_empty() {
            let taken = match self {
                ConsoleTarget::Uart { serial, .. } => serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .enqueue_input(&pending),
                ConsoleTarget::Virtio(input) => input.push(&pending),
            };
            pending.drain(..taken);
            if taken == 0 {
                match self {
                    ConsoleTarget::Uart { input_space, .. } => {
                        if input_space.read().is_err() {
                            return false;
                        }
                    }
                    ConsoleTarget::Virtio(_) => {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                }
            }
        }
        true
    }
}

/// Reads stdin until EOF, feeding the guest's console; `Ctrl-A x` asks the
/// VMM to end the VM.
pub fn spawn_input_thread(target: ConsoleTarget, events: Sender<VmmEvent>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut parser = EscapeParser::default();
            let mut buf = [0u8; 256];
            loop {
                // SAFETY: reading into a valid buffer of the given length.
                let n =
                    unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
                if n == 0 {
                    return;
                }
                if n < 0 {
                    if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return;
                }
                let mut pending = Vec::with_capacity(n as usize);
                let mut exit = false;
                for &b in &buf[..n as usize] {
                    match parser.feed(b) {
                        ConsoleKey::Byte(b) => pending.push(b),
                        ConsoleKey::Exit => {
                            exit = true;
                            break;
                        }
                        ConsoleKey::Help => {
                            let _ = std::io::stdout().write_all(ESCAPE_HELP.as_bytes());
                            let _ = std::io::stdout().flush();
                        }
                        ConsoleKey::Nothing => {}
                    }
                }
                // What was typed before an escape still reaches the guest.
                if !target.deliver(pending) {
                    return;
                }
                if exit {
                    let _ = events.send(VmmEvent::ConsoleExit);
                    return;
                }
            }
        })
        .map(|_| ())
}

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
