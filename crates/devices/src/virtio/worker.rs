//! The thread behind an activated virtio device: it sleeps in epoll on the
//! queues' notification events and runs the device's handler for each,
//! until it is stopped. Stopping joins the thread, so a reset device has
//! no code left running against guest memory — unless the thread is stuck
//! (a backend blocked in slow I/O): then stopping gives up after
//! [`STOP_TIMEOUT`] and leaves the thread to end on its own, so that a
//! reset (run on a vCPU thread, under the device's lock) or the VM's
//! teardown never waits forever.

use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const KILL: u64 = u64::MAX;

/// How long stopping waits for a worker before leaving it behind.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct WorkerThread {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the thread ends (its sender is dropped then).
    ended: Receiver<()>,
    stop_timeout: Duration,
}

impl WorkerThread {
    /// Starts a thread that calls `handle(i)` whenever `events[i]` fires.
    pub fn start<F>(name: &str, events: Vec<EventFd>, mut handle: F) -> std::io::Result<Self>
    where
        F: FnMut(usize) + Send + 'static,
    {
        let epoll = Epoll::new()?;
        for (i, evt) in events.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(evt),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        Self::spawn(name, move |kill| {
            epoll.ctl(
                ControlOperation::Add,
                std::os::fd::AsRawFd::as_raw_fd(&kill),
                EpollEvent::new(EventSet::IN, KILL),
            )?;
            let mut ready = vec![EpollEvent::default(); events.len() + 1];
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
                    }
                }
            }
        })
    }

    /// Starts a thread running `body`, which must return once the event it
    /// is given fires (devices whose workers wait on more than queue
    /// events, such as vsock's sockets, run their own epoll loop).
    pub fn spawn<F>(name: &str, body: F) -> std::io::Result<Self>
    where
        F: FnOnce(EventFd) -> std::io::Result<()> + Send + 'static,
    {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let theirs = kill.try_clone()?;
        let label = name.to_string();
        let (alive, ended) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _alive = alive;
                if let Err(e) = body(theirs) {
                    tracing::error!("{label} worker stopped: {e}");
                }
            })?;
        Ok(WorkerThread {
            kill,
            thread: Some(thread),
            ended,
            stop_timeout: STOP_TIMEOUT,
        })
    }

    /// Sets how long [`stop`](Self::stop) waits (tests).
    pub fn with_stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// Stops the thread and waits for it, at most the stop timeout; true
    /// if it ended. A thread that does not end in time (stuck in its
    /// backend) is left to end by itself: it holds its own references to
    /// guest memory and its queues, so nothing it uses goes away under it.
    pub fn stop(&mut self) -> bool {
        let Some(thread) = self.thread.take() else {
            return true;
        };
        let _ = self.kill.write(1);
        let deadline = Instant::now().checked_add(self.stop_timeout);
        let left = deadline.map_or(self.stop_timeout, |d| {
            d.saturating_duration_since(Instant::now())
        });
        match self.ended.recv_timeout(left) {
            Err(mpsc::RecvTimeoutError::Disconnected) | Ok(()) => {
                let _ = thread.join();
                true
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let name = thread.thread().name().unwrap_or("virtio").to_string();
                tracing::warn!(
                    "the {name} worker did not stop within {:?}; leaving it behind",
                    self.stop_timeout
                );
                false
            }
        }
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        self.stop();
    }
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
            move |i| tx.send(i).unwrap(),
        )
        .unwrap();
        b.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        a.write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 0);
        assert!(worker.stop());
        a.write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
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
        let mut worker =
            WorkerThread::start("stuck-worker", vec![a.try_clone().unwrap()], move |_| {
                entered_tx.send(()).unwrap();
                let _ = released.recv();
                let _ = done_tx.send(());
            })
            .unwrap()
            .with_stop_timeout(Duration::from_millis(200));
        a.write(1).unwrap();
        entered.recv_timeout(Duration::from_secs(5)).unwrap();
        let started = std::time::Instant::now();
        assert!(!worker.stop(), "the stuck worker cannot have stopped");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        drop(worker);
        release.send(()).unwrap();
        done.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}
