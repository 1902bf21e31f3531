//! The thread behind an activated virtio device: it sleeps in epoll on the
//! queues' notification events and runs the device's handler for each,
//! until it is stopped. Stopping joins the thread, so a reset device has
//! no code left running against guest memory.

use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const KILL: u64 = u64::MAX;

#[derive(Debug)]
pub struct WorkerThread {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
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
                    if let Some(evt) = events.get(index as usize) {
                        let _ = evt.read();
                        handle(index as usize);
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
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Err(e) = body(theirs) {
                    tracing::error!("{label} worker stopped: {e}");
                }
            })?;
        Ok(WorkerThread {
            kill,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.kill.write(1);
            let _ = thread.join();
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
        worker.stop();
        a.write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    }
}
