//! The spawner: one thread that starts the others, so that a new thread's
//! filter is its own kind's and not also its starter's (a vCPU thread
//! starting a device worker would otherwise pass on the vCPU list).

use std::sync::mpsc::{channel, sync_channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::{Builder, JoinHandle};

type Job = Box<dyn FnOnce() + Send>;

static SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Starts the spawner thread (once); it takes the broadest filter.
pub(crate) fn start() -> std::io::Result<()> {
    if SPAWNER.get().is_some() {
        return Ok(());
    }
    let (jobs, next) = channel::<Job>();
    Builder::new().name("spawner".into()).spawn(move || {
        crate::apply(crate::ThreadKind::Spawner);
        while let Ok(job) = next.recv() {
            job();
        }
    })?;
    let _ = SPAWNER.set(Mutex::new(jobs));
    Ok(())
}

/// Starts a thread as `builder` would, through the spawner when filters
/// are on (the thread then calls [`crate::apply`] for its kind).
pub fn spawn<F, T>(builder: Builder, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let Some(spawner) = SPAWNER.get() else {
        return builder.spawn(f);
    };
    let (done, handle) = sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = done.send(builder.spawn(f));
    });
    let sent = spawner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send(job);
    if sent.is_err() {
        return Err(std::io::Error::other("the thread spawner has ended"));
    }
    handle
        .recv()
        .map_err(|_| std::io::Error::other("the thread spawner has ended"))?
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_the_spawner_threads_start_directly() {
        let h = super::spawn(std::thread::Builder::new(), || 5).unwrap();
        assert_eq!(h.join().unwrap(), 5);
    }
}
