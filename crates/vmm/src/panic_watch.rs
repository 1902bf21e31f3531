//! Recognises a guest kernel panic on the console.
//!
//! Without ACPI or pvpanic, a panicking Linux guest reboots (`panic=-1`)
//! through the same keyboard-controller reset as a clean `reboot`, so the
//! VMM cannot tell the two apart from the reset itself. Linux always prints
//! `Kernel panic - not syncing: …` at KERN_EMERG (even with `quiet`), so
//! the console stream is watched for that line and a reset that follows it
//! is reported as a crash.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

const MARKER: &[u8] = b"Kernel panic - not syncing";
const MAX_LINE: usize = 512;

/// The panic message, once seen.
pub type PanicNote = Arc<Mutex<Option<String>>>;

/// A writer that passes everything through and records the first panic
/// line it sees.
pub struct PanicWatch<W> {
    inner: W,
    line: Vec<u8>,
    note: PanicNote,
    /// Where the marker starts in `line`, once it has arrived: found as
    /// bytes come in, so the UART's flush after every byte costs nothing.
    marker_at: Option<usize>,
    /// The note was taken from the unfinished current line (at a flush)
    /// and may still grow.
    provisional: bool,
}

impl<W: Write> PanicWatch<W> {
    pub fn new(inner: W, note: PanicNote) -> Self {
        PanicWatch {
            inner,
            line: Vec::with_capacity(128),
            note,
            marker_at: None,
            provisional: false,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' || self.line.len() == MAX_LINE {
                self.check_line(true);
                self.line.clear();
                self.marker_at = None;
            }
            if b != b'\n' && b != b'\r' {
                self.line.push(b);
                if self.marker_at.is_none() && self.line.ends_with(MARKER) {
                    self.marker_at = Some(self.line.len() - MARKER.len());
                }
            }
        }
    }

    /// Records a panic line; `complete` when the line has ended.
    fn check_line(&mut self, complete: bool) {
        if let Some(pos) = self.marker_at {
            let mut note = self.note.lock().unwrap_or_else(|e| e.into_inner());
            if note.is_none() || self.provisional {
                *note = Some(String::from_utf8_lossy(&self.line[pos..]).into_owned());
                self.provisional = !complete;
            }
        }
    }
}

impl<W: Write> Write for PanicWatch<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        // The guest's output is not lost to the watch if the sink fails.
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        // A panic line may still be unterminated when the guest resets.
        self.check_line(false);
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_panic_line_and_passes_output_through() {
        let note = PanicNote::default();
        let mut out = Vec::new();
        {
            let mut w = PanicWatch::new(&mut out, note.clone());
            // Byte by byte, flushed after each, as the UART writes.
            for b in b"ok\r\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\r\nmore\n" {
                w.write_all(&[*b]).unwrap();
                w.flush().unwrap();
            }
        }
        assert_eq!(
            note.lock().unwrap().as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init!")
        );
        assert!(out.starts_with(b"ok\r\n[ 1.0] Kernel panic"));
    }

    #[test]
    fn unterminated_panic_line_is_seen_on_flush_and_normal_output_is_not() {
        let note = PanicNote::default();
        let mut w = PanicWatch::new(io::sink(), note.clone());
        w.write_all(b"reboot: Restarting system\n").unwrap();
        w.flush().unwrap();
        assert!(note.lock().unwrap().is_none());
        w.write_all(b"Kernel panic - not syncing: VFS").unwrap();
        w.flush().unwrap();
        assert!(note.lock().unwrap().is_some());
    }

    #[test]
    fn long_lines_do_not_grow_without_bound() {
        let note = PanicNote::default();
        let mut w = PanicWatch::new(io::sink(), note);
        w.write_all(&vec![b'x'; 100_000]).unwrap();
        assert!(w.line.len() <= MAX_LINE);
    }
}
