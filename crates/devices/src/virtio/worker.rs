//! The thread behind an activated virtio device: it sleeps in epoll on the
//! queues' notification events and runs the device's handler for each,
//! until it is stopped. The thread owns what the device lends it (its
//! queues, in-flight device state): a [`WorkerThread<T>`] is crosvm's
//! shape, where stopping the thread hands back the `T` it owned — that is
//! how a device *sleeps* (quiesces for a pause or a snapshot) and gets its
//! queues, with their ring positions, back.
//!
//! Stopping joins the thread, so a stopped device has no code left running
//! against guest memory — unless the thread is stuck (a backend blocked in
//! slow I/O): then stopping gives up after [`STOP_TIMEOUT`] with
//! [`WorkerError::Stuck`], so that a reset (run on a vCPU thread, under the
//! device's lock), a sleep or the VM's teardown never waits forever. The
//! thread has been told to stop and ends once its backend lets go; a later
//! [`stop`](WorkerThread::stop) collects what it owned.

use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const KILL: u64 = u64::MAX;

/// How long stopping waits for a worker before giving up.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a worker's state could not be taken back.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The thread is stuck (in its backend) and did not end in time; it
    /// has been told to stop and ends by itself once released.
    #[error("the {name} worker did not stop within {timeout:?}")]
    Stuck { name: String, timeout: Duration },
    /// The thread panicked: what it owned is gone.
    #[error("the {0} worker panicked")]
    Panicked(String),
    /// The thread was stopped before and what it owned was taken.
    #[error("the {0} worker was stopped already")]
    Stopped(String),
}

/// A device's worker thread, owning a `T` it hands back when stopped.
pub struct WorkerThread<T: Send + 'static> {
    name: String,
    kill: EventFd,
    thread: Option<JoinHandle<T>>,
    /// Disconnected when the thread ends (its sender is dropped then).
    ended: Receiver<()>,
    stop_timeout: Duration,
    /// A stop timed out once: dropping does not wait again.
    abandoned: bool,
}

impl<T: Send + 'static> std::fmt::Debug for WorkerThread<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerThread")
            .field("name", &self.name)
            .field("running", &self.thread.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: Send + 'static> WorkerThread<S> {
    /// Starts a thread that owns `state` and calls `handle(&mut state, i)`
    /// whenever `events[i]` fires; stopping it returns `state`.
    pub fn start<F>(name: &str, events: Vec<EventFd>, state: S, handle: F) -> std::io::Result<Self>
    where
        F: FnMut(&mut S, usize) + Send + 'static,
    {
        Self::start_with_fds(name, events, &[], state, handle)
    }

    /// As [`start`](Self::start), and also waits on `fds` (descriptors
    /// that `state` owns, such as a rate limiter's timer): when `fds[j]`
    /// is readable, `handle` gets index `events.len() + j` and must make
    /// it unreadable itself (read its timer).
    pub fn start_with_fds<F>(
        name: &str,
        events: Vec<EventFd>,
        fds: &[std::os::fd::RawFd],
        state: S,
        mut handle: F,
    ) -> std::io::Result<Self>
    where
        F: FnMut(&mut S, usize) + Send + 'static,
    {
        let epoll = Epoll::new()?;
        let raw = events.iter().map(std::os::fd::AsRawFd::as_raw_fd);
        for (i, fd) in raw.chain(fds.iter().copied()).enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let label = name.to_string();
        let extra = fds.len();
        Self::spawn(name, move |kill| {
            let mut state = state;
            let mut handle = |i| handle(&mut state, i);
            if let Err(e) = event_loop(&epoll, &events, extra, &kill, &mut handle) {
                tracing::error!("{label} worker stopped: {e}");
            }
            state
        })
    }
}

/// Waits on `epoll` (holding `events`, then `extra` other descriptors,
/// and not yet `kill`) and calls `handle` per fired event until `kill`
/// fires.
fn event_loop(
    epoll: &Epoll,
    events: &[EventFd],
    extra: usize,
    kill: &EventFd,
    handle: &mut dyn FnMut(usize),
) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        std::os::fd::AsRawFd::as_raw_fd(kill),
        EpollEvent::new(EventSet::IN, KILL),
    )?;
    let mut ready = vec![EpollEvent::default(); events.len() + extra + 1];
    loop {
        let n = match epoll.wait(-1, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for event in &ready[..n] {
            let index = event.data();
            if index == KILL {
                return Ok(());
            }
            let Ok(index) = usize::try_from(index) else {
                continue;
            };
            if let Some(evt) = events.get(index) {
                let _ = evt.read();
                handle(index);
            } else if index < events.len() + extra {
                handle(index);
            }
        }
    }
}

impl<T: Send + 'static> WorkerThread<T> {
    /// Starts a thread running `body`, which must return what it owns once
    /// the event it is given fires (devices whose workers wait on more
    /// than queue events, such as vsock's sockets, run their own epoll
    /// loop).
    pub fn spawn<F>(name: &str, body: F) -> std::io::Result<Self>
    where
        F: FnOnce(EventFd) -> T + Send + 'static,
    {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let theirs = kill.try_clone()?;
        let (alive, ended) = mpsc::channel::<()>();
        let kind = seccomp::ThreadKind::for_worker(name);
        let builder = std::thread::Builder::new().name(name.to_string());
        let thread = seccomp::spawn(builder, move || {
            let _alive = alive;
            seccomp::apply(kind);
            body(theirs)
        })?;
        Ok(WorkerThread {
            name: name.to_string(),
            kill,
            thread: Some(thread),
            ended,
            stop_timeout: STOP_TIMEOUT,
            abandoned: false,
        })
    }

    /// Sets how long [`stop`](Self::stop) waits (tests).
    pub fn with_stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the thread and waits for it, at most the stop timeout, and
    /// returns what it owned. A thread that does not end in time (stuck in
    /// its backend) gives [`WorkerError::Stuck`] and stays here, told to
    /// stop: calling `stop` again waits for it again. It holds its own
    /// references to guest memory and its queues, so nothing it uses goes
    /// away under it.
    pub fn stop(&mut self) -> Result<T, WorkerError> {
        if self.thread.is_none() {
            return Err(WorkerError::Stopped(self.name.clone()));
        }
        let _ = self.kill.write(1);
        match self.ended.recv_timeout(self.stop_timeout) {
            Err(mpsc::RecvTimeoutError::Disconnected) | Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    "the {} worker did not stop within {:?}",
                    self.name,
                    self.stop_timeout
                );
                self.abandoned = true;
                return Err(WorkerError::Stuck {
                    name: self.name.clone(),
                    timeout: self.stop_timeout,
                });
            }
        }
        let thread = self
            .thread
            .take()
            .ok_or_else(|| WorkerError::Stopped(self.name.clone()))?;
        thread
            .join()
            .map_err(|_| WorkerError::Panicked(self.name.clone()))
    }
}

impl<T: Send + 'static> Drop for WorkerThread<T> {
    fn drop(&mut self) {
        if self.thread.is_none() {
            return;
        }
        if self.abandoned {
            // Told to stop already; it ends by itself (detached).
            let _ = self.kill.write(1);
            return;
        }
        let _ = self.stop();
    }
}

/// Stops the worker in `slot` and returns what it owned; `None` when there
/// is no worker (the device is not activated, or asleep already). A worker
/// that does not stop stays in `slot`, so a later call can collect it.
pub fn stop_worker<T: Send + 'static>(
    slot: &mut Option<WorkerThread<T>>,
) -> Result<Option<T>, WorkerError> {
    let Some(worker) = slot.as_mut() else {
        return Ok(None);
    };
    let owned = worker.stop()?;
    *slot = None;
    Ok(Some(owned))
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn runs_the_handler_per_event_and_stops() {
        let a = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let b = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, rx) = channel();
        let mut worker = WorkerThread::start(
            "test-worker",
            vec![a.try_clone().unwrap(), b.try_clone().unwrap()],
            Vec::new(),
            move |seen: &mut Vec<usize>, i| {
                seen.push(i);
                tx.send(i).unwrap();
            },
        )
        .unwrap();
        b.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        a.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        // Stopping hands back what the thread owned.
        assert_eq!(worker.stop().unwrap(), vec![1, 0]);
        a.write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        assert!(matches!(worker.stop(), Err(WorkerError::Stopped(_))));
    }

    #[test]
    fn stop_worker_empties_the_slot() {
        let mut slot = Some(WorkerThread::spawn("body", |_kill| 7u32).unwrap());
        assert_eq!(stop_worker(&mut slot).unwrap(), Some(7));
        assert!(slot.is_none());
        assert_eq!(stop_worker(&mut slot).unwrap(), None);
    }

    #[test]
    fn a_panicked_worker_is_an_error_not_a_panic() {
        let mut w = WorkerThread::spawn("panicky", |_kill| -> u32 { panic!("boom") }).unwrap();
        assert!(matches!(w.stop(), Err(WorkerError::Panicked(_))));
    }

    /// A worker stuck in its backend (here: waiting for a release that
    /// comes only after the stop) does not hold up the stop for longer
    /// than the timeout, and ends by itself once released.
    #[test]
    fn stopping_a_stuck_worker_is_bounded() {
        let a = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (entered_tx, entered) = channel();
        let (release, released) = channel::<()>();
        let (done_tx, done) = channel();
        let mut worker = WorkerThread::start(
            "stuck-worker",
            vec![a.try_clone().unwrap()],
            0u32,
            move |calls, _| {
                *calls += 1;
                entered_tx.send(()).unwrap();
                let _ = released.recv();
                let _ = done_tx.send(());
            },
        )
        .unwrap()
        .with_stop_timeout(Duration::from_millis(200));
        a.write(1).unwrap();
        entered.recv_timeout(Duration::from_secs(5)).unwrap();
        let started = std::time::Instant::now();
        assert!(
            matches!(worker.stop(), Err(WorkerError::Stuck { .. })),
            "the stuck worker cannot have stopped"
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        // Once released, a second stop collects what it owned.
        release.send(()).unwrap();
        done.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(worker.stop().unwrap(), 1);
    }

    /// Dropping a worker that timed out once does not wait a second time.
    #[test]
    fn dropping_an_abandoned_worker_does_not_wait() {
        let a = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (entered_tx, entered) = channel();
        let (release, released) = channel::<()>();
        let mut worker =
            WorkerThread::start("stuck", vec![a.try_clone().unwrap()], (), move |_, _| {
                entered_tx.send(()).unwrap();
                let _ = released.recv();
            })
            .unwrap()
            .with_stop_timeout(Duration::from_millis(100));
        a.write(1).unwrap();
        entered.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(worker.stop().is_err());
        let started = std::time::Instant::now();
        drop(worker);
        assert!(started.elapsed() < Duration::from_millis(90));
        release.send(()).unwrap();
    }
}
