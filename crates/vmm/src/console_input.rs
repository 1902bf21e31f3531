//! Console input: the device a machine's console input goes to
//! ([`ConsoleTarget`]), delivery with a deadline (API input), and the one
//! thread per process that reads the terminal ([`StdinConsole`]) and
//! follows the VM from boot to boot.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::serial::SerialDevice;
use devices::virtio::console::ConsoleInput;
use vmm_sys_util::eventfd::EventFd;

use crate::console::{ConsoleKey, EscapeParser, ESCAPE_HELP};
use crate::event::VmmEvent;

/// The device that console input goes to.
#[derive(Clone)]
pub struct ConsoleTarget {
    device: TargetDevice,
    /// Set when the machine stops: it takes no more input.
    closed: Arc<AtomicBool>,
}

#[derive(Clone)]
enum TargetDevice {
    /// The UART's receive FIFO; `input_space` fires when the guest has
    /// drained it.
    Uart {
        serial: Arc<Mutex<SerialDevice>>,
        input_space: Arc<EventFd>,
    },
    /// The virtio-console port.
    Virtio(Arc<ConsoleInput>),
}

/// Why input was not (all) delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    /// The machine has stopped.
    #[error("the VM is not running")]
    Closed,
    /// The guest did not take the input in time (paused, or not reading
    /// its console).
    #[error("the guest took {delivered} of {total} bytes of console input within {waited:?}")]
    Timeout {
        delivered: usize,
        total: usize,
        waited: Duration,
    },
}

impl ConsoleTarget {
    /// The UART's receive FIFO (`input_space` must be non-blocking);
    /// `closed` is the machine's stop flag.
    pub fn uart(
        serial: Arc<Mutex<SerialDevice>>,
        input_space: Arc<EventFd>,
        closed: Arc<AtomicBool>,
    ) -> Self {
        ConsoleTarget {
            device: TargetDevice::Uart {
                serial,
                input_space,
            },
            closed,
        }
    }

    /// A virtio-console port's input queue.
    pub fn virtio(input: Arc<ConsoleInput>, closed: Arc<AtomicBool>) -> Self {
        ConsoleTarget {
            device: TargetDevice::Virtio(input),
            closed,
        }
    }

    /// Whether the machine has stopped.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Queues as much of `bytes` as the device takes now, never waiting
    /// (a vCPU busy in the UART counts as "nothing fits yet"); `None`
    /// once the machine has stopped.
    pub fn try_push(&self, bytes: &[u8]) -> Option<usize> {
        if self.is_closed() {
            return None;
        }
        Some(match &self.device {
            TargetDevice::Uart { serial, .. } => match serial.try_lock() {
                Ok(mut s) => s.enqueue_input(bytes),
                Err(TryLockError::Poisoned(e)) => e.into_inner().enqueue_input(bytes),
                Err(TryLockError::WouldBlock) => 0,
            },
            TargetDevice::Virtio(input) => input.push(bytes),
        })
    }

    /// The descriptor that becomes readable when the device may have
    /// room again, if it has one.
    fn space_fd(&self) -> Option<RawFd> {
        match &self.device {
            TargetDevice::Uart { input_space, .. } => Some(input_space.as_raw_fd()),
            TargetDevice::Virtio(_) => None,
        }
    }

    /// Consumes a space signal after a poll said it fired.
    fn clear_space_signal(&self) {
        if let TargetDevice::Uart { input_space, .. } = &self.device {
            let _ = input_space.read();
        }
    }

    /// Waits at most `max` (and at most a short slice, so a missed
    /// signal only delays) for the device to have room.
    fn wait_for_space(&self, max: Duration) {
        let slice = max.min(Duration::from_millis(20));
        match self.space_fd() {
            Some(fd) => {
                if poll_readable(&[fd], Some(slice)).first() == Some(&true) {
                    self.clear_space_signal();
                }
            }
            None => std::thread::sleep(slice),
        }
    }

    /// Hands `bytes` to the guest, waiting while the device is full, but
    /// not past `timeout` and not after the machine stops.
    pub fn deliver(&self, bytes: &[u8], timeout: Duration) -> Result<(), DeliverError> {
        let started = Instant::now();
        let mut delivered = 0;
        while delivered < bytes.len() {
            let taken = self
                .try_push(&bytes[delivered..])
                .ok_or(DeliverError::Closed)?;
            delivered += taken;
            if delivered == bytes.len() {
                break;
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(DeliverError::Timeout {
                    delivered,
                    total: bytes.len(),
                    waited,
                });
            }
            if taken == 0 {
                self.wait_for_space(timeout - waited);
            }
        }
        Ok(())
    }
}

/// Polls `fds` for input (or hang-up) for up to `timeout` (`None`: no
/// limit); which are ready. Interrupted polls report none ready.
fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX)
    });
    let Ok(count) = libc::nfds_t::try_from(pfds.len()) else {
        return vec![false; fds.len()];
    };
    // SAFETY: `pfds` is a valid array of `count` pollfd structs that
    // lives across the call.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), count, ms) };
    if n <= 0 {
        return vec![false; fds.len()];
    }
    pfds.iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
        .collect()
}

/// Console input held for a guest that is not taking it; the terminal is
/// not read while this much waits (back-pressure for piped input).
const PENDING_LIMIT: usize = 64 << 10;
/// How long stopping waits for the input thread.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the input thread delivers: the current machine.
struct Attachment {
    target: ConsoleTarget,
    events: Sender<VmmEvent>,
}

struct Shared {
    current: Mutex<Option<Attachment>>,
    /// `Ctrl-A x` was typed: the VM must end (and not reboot).
    exit_requested: AtomicBool,
    /// Wakes the thread when a machine attaches.
    attached: EventFd,
}

impl Shared {
    fn current(&self) -> std::sync::MutexGuard<'_, Option<Attachment>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The console input thread: reads the terminal (or whatever stdin is),
/// strips QEMU-style `Ctrl-A` escapes and delivers the rest to the machine
/// attached at the moment, for as long as the process runs the VM — one
/// thread across every reboot. It never blocks on the guest: input waits
/// in the thread (bounded) while the device is full, so `Ctrl-A x` is
/// still seen, and a stop event ends it at once.
pub struct StdinConsole {
    shared: Arc<Shared>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    ended: mpsc::Receiver<()>,
}

impl std::fmt::Debug for StdinConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdinConsole").finish_non_exhaustive()
    }
}

impl StdinConsole {
    /// Starts reading the process's standard input.
    pub fn start() -> std::io::Result<Self> {
        Self::start_reading(std::io::stdin())
    }

    /// Starts reading `input` (kept open by the thread).
    pub fn start_reading<R: AsRawFd + Send + 'static>(input: R) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            current: Mutex::new(None),
            exit_requested: AtomicBool::new(false),
            attached: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let theirs = stop.try_clone()?;
        let (alive, ended) = mpsc::channel::<()>();
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("console-in".into())
            .spawn(move || {
                let _alive = alive;
                seccomp::apply(seccomp::ThreadKind::ConsoleInput);
                input_loop(&input, &s, &theirs);
            })?;
        Ok(StdinConsole {
            shared,
            stop,
            thread: Some(thread),
            ended,
        })
    }

    /// Sends input (and `Ctrl-A x`) to this machine from now on.
    pub fn attach(&self, target: ConsoleTarget, events: Sender<VmmEvent>) {
        *self.shared.current() = Some(Attachment { target, events });
        let _ = self.shared.attached.write(1);
    }

    /// The machine is going away: input waits for the next one.
    pub fn detach(&self) {
        *self.shared.current() = None;
    }

    /// Whether `Ctrl-A x` was typed.
    pub fn exit_requested(&self) -> bool {
        self.shared.exit_requested.load(Ordering::Acquire)
    }

    /// Stops the thread, waiting for it at most a moment (it could only
    /// be held up by a blocked write of the escape help to stdout).
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let _ = self.stop.write(1);
        match self.ended.recv_timeout(STOP_TIMEOUT) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!("the console input thread did not stop; leaving it behind");
            }
        }
    }
}

impl Drop for StdinConsole {
    fn drop(&mut self) {
        self.stop();
    }
}

fn input_loop(input: &dyn AsRawFd, shared: &Shared, stop: &EventFd) {
    let mut parser = EscapeParser::default();
    let mut pending: VecDeque<u8> = VecDeque::new();
    let mut at_eof = false;
    let mut buf = [0u8; 256];
    loop {
        // Hand what waits to the current machine.
        let space_fd = {
            let current = shared.current();
            match current.as_ref() {
                Some(a) if !pending.is_empty() => {
                    let (front, _) = pending.as_slices();
                    if let Some(n) = a.target.try_push(front) {
                        pending.drain(..n);
                    }
                    a.target.space_fd()
                }
                _ => None,
            }
        };
        let read_input = !at_eof && pending.len() < PENDING_LIMIT;
        let mut fds = vec![stop.as_raw_fd(), shared.attached.as_raw_fd()];
        if read_input {
            fds.push(input.as_raw_fd());
        }
        let space_slot = space_fd.map(|fd| {
            fds.push(fd);
            fds.len() - 1
        });
        // With input waiting, look again soon: a missed space signal (or
        // a device without one) only delays delivery.
        let timeout = (!pending.is_empty()).then_some(Duration::from_millis(20));
        let ready = poll_readable(&fds, timeout);
        if ready.first() == Some(&true) {
            return;
        }
        if ready.get(1) == Some(&true) {
            let _ = shared.attached.read();
        }
        if let Some(slot) = space_slot {
            if ready.get(slot) == Some(&true) {
                if let Some(a) = shared.current().as_ref() {
                    a.target.clear_space_signal();
                }
            }
        }
        if !(read_input && ready.get(2) == Some(&true)) {
            continue;
        }
        // SAFETY: reading into a valid buffer of the given length.
        let n = unsafe { libc::read(input.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = match usize::try_from(n) {
            Ok(0) => {
                at_eof = true;
                continue;
            }
            Ok(n) => n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) {
                    continue;
                }
                tracing::debug!("console input ends: {e}");
                at_eof = true;
                continue;
            }
        };
        for &b in &buf[..n] {
            match parser.feed(b) {
                ConsoleKey::Byte(b) => pending.push_back(b),
                ConsoleKey::Exit => {
                    shared.exit_requested.store(true, Ordering::Release);
                    if let Some(a) = shared.current().as_ref() {
                        let _ = a.events.send(VmmEvent::ConsoleExit);
                    }
                }
                ConsoleKey::Help => {
                    let mut out = std::io::stdout();
                    let _ = out.write_all(ESCAPE_HELP.as_bytes());
                    let _ = out.flush();
                }
                ConsoleKey::Nothing => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::BusDevice;
    use std::os::unix::net::UnixStream;

    fn uart() -> (Arc<Mutex<SerialDevice>>, ConsoleTarget, Arc<AtomicBool>) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let space = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq,
            Box::new(std::io::sink()),
            space.clone(),
        )));
        let closed = Arc::new(AtomicBool::new(false));
        let target = ConsoleTarget::uart(serial.clone(), space, closed.clone());
        (serial, target, closed)
    }

    /// What the guest would read from the UART now.
    fn drain(serial: &Mutex<SerialDevice>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = serial.lock().unwrap();
        loop {
            let mut lsr = [0u8];
            s.read(0x3f8, 5, &mut lsr);
            if lsr[0] & 1 == 0 {
                return out;
            }
            let mut b = [0u8];
            s.read(0x3f8, 0, &mut b);
            out.push(b[0]);
        }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < Duration::from_secs(5), "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A guest that does not read its console (or is paused) makes
    /// delivery give up at the deadline, saying how much got through;
    /// a stopped machine refuses at once.
    #[test]
    fn delivery_is_bounded_by_its_deadline_and_the_stop_flag() {
        let (serial, target, closed) = uart();
        let started = Instant::now();
        let e = target
            .deliver(&[b'x'; 100], Duration::from_millis(200))
            .unwrap_err();
        assert!(
            matches!(
                e,
                DeliverError::Timeout {
                    delivered: 64,
                    total: 100,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        // A vCPU holding the UART (stuck in a write) does not block it either.
        drain(&serial);
        let held = serial.lock().unwrap();
        let e = target.deliver(b"y", Duration::from_millis(100));
        assert!(matches!(e, Err(DeliverError::Timeout { delivered: 0, .. })));
        drop(held);
        target.deliver(b"ok", Duration::from_secs(1)).unwrap();
        assert_eq!(drain(&serial), b"ok");
        closed.store(true, Ordering::Release);
        assert_eq!(
            target.deliver(b"z", Duration::from_secs(60)),
            Err(DeliverError::Closed)
        );
    }

    /// A reader draining the FIFO lets a large delivery through.
    #[test]
    fn delivery_waits_for_the_guest_to_drain() {
        let (serial, target, _closed) = uart();
        let reader = {
            let serial = serial.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while got.len() < 1000 {
                    got.extend(drain(&serial));
                    std::thread::sleep(Duration::from_millis(1));
                }
                got
            })
        };
        let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        target.deliver(&data, Duration::from_secs(10)).unwrap();
        assert_eq!(reader.join().unwrap(), data);
    }

    /// One thread follows the machines: after a reboot, input and
    /// `Ctrl-A x` go to the new machine only, and stopping the thread does
    /// not wait for input.
    #[test]
    fn the_input_thread_follows_the_current_machine() {
        let (mut typing, theirs) = UnixStream::pair().unwrap();
        let mut console = StdinConsole::start_reading(theirs).unwrap();
        let (old_serial, old_target, old_closed) = uart();
        let (old_tx, old_rx) = mpsc::channel();
        console.attach(old_target, old_tx);
        typing.write_all(b"one").unwrap();
        let mut got = Vec::new();
        wait_for("input reaches the first machine", || {
            got.extend(drain(&old_serial));
            got == b"one"
        });
        // The first machine ends (a reset): typed input waits, then goes
        // to the second machine.
        console.detach();
        old_closed.store(true, Ordering::Release);
        typing.write_all(b"two").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let (new_serial, new_target, _) = uart();
        let (new_tx, new_rx) = mpsc::channel();
        console.attach(new_target, new_tx);
        typing.write_all(b"three\x01x").unwrap();
        let mut got = Vec::new();
        wait_for("input reaches the second machine", || {
            got.extend(drain(&new_serial));
            got == b"twothree"
        });
        assert_eq!(
            new_rx
                .recv_timeout(Duration::from_secs(5))
                .ok()
                .map(|e| matches!(e, VmmEvent::ConsoleExit)),
            Some(true)
        );
        assert!(console.exit_requested());
        assert!(drain(&old_serial).is_empty());
        assert!(
            old_rx.try_recv().is_err(),
            "nothing went to the old machine"
        );
        let started = Instant::now();
        console.stop();
        assert!(started.elapsed() < Duration::from_secs(1));
        drop(typing);
    }

    /// Input the guest does not take waits in the thread; `Ctrl-A x`
    /// typed after it still ends the VM.
    #[test]
    fn ctrl_a_x_gets_through_while_the_guest_does_not_read() {
        let (mut typing, theirs) = UnixStream::pair().unwrap();
        let console = StdinConsole::start_reading(theirs).unwrap();
        let (_serial, target, _) = uart();
        let (tx, rx) = mpsc::channel();
        console.attach(target, tx);
        typing.write_all(&[b'a'; 1000]).unwrap();
        typing.write_all(b"\x01x").unwrap();
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Ok(VmmEvent::ConsoleExit)
        ));
    }
}
