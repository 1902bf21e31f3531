//! The balloon's worker thread: one epoll over the queues' kicks, the host
//! side's commands (a new target, statistics wanted), a statistics timer
//! and the stop event.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use memory::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::queues::{process_pfns, process_reports, process_stats, request_stats};
use super::Shared;
use crate::virtio::worker::WorkerThread;
use crate::virtio::{Interrupt, QueueWithEvent};

/// What the worker owns and hands back when it stops.
#[derive(Debug)]
pub(super) struct BalloonQueues {
    pub inflate: Queue,
    pub deflate: Queue,
    pub stats: Option<Queue>,
    pub reporting: Option<Queue>,
    /// The statistics buffer held until statistics are wanted.
    pub stats_head: Option<u16>,
}

/// The queues with their kick events, as activation hands them.
pub(super) struct Started {
    pub inflate: QueueWithEvent,
    pub deflate: QueueWithEvent,
    pub stats: Option<QueueWithEvent>,
    pub reporting: Option<QueueWithEvent>,
    pub stats_head: Option<u16>,
}

pub(super) struct Context {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
    pub shared: Arc<Shared>,
    pub interval: Option<Duration>,
    /// The host side's command event.
    pub command: EventFd,
}

const INFLATE: u64 = 0;
const DEFLATE: u64 = 1;
const STATS: u64 = 2;
const REPORTING: u64 = 3;
const COMMAND: u64 = 4;
const TIMER: u64 = 5;
const KILL: u64 = 6;

pub(super) fn start(ctx: Context, q: Started) -> std::io::Result<WorkerThread<BalloonQueues>> {
    let epoll = Epoll::new()?;
    let add = |fd: &dyn AsRawFd, token: u64| {
        epoll.ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(EventSet::IN, token),
        )
    };
    add(&q.inflate.1, INFLATE)?;
    add(&q.deflate.1, DEFLATE)?;
    if let Some((_, e)) = &q.stats {
        add(e, STATS)?;
    }
    if let Some((_, e)) = &q.reporting {
        add(e, REPORTING)?;
    }
    add(&ctx.command, COMMAND)?;
    let mut timer = TimerFd::new()?;
    if let (Some(interval), true) = (ctx.interval, q.stats.is_some()) {
        if !interval.is_zero() {
            timer.reset(interval, Some(interval))?;
        }
    }
    add(&timer, TIMER)?;
    let (inflate, inflate_evt) = q.inflate;
    let (deflate, deflate_evt) = q.deflate;
    let (stats, stats_evt) = split(q.stats);
    let (reporting, reporting_evt) = split(q.reporting);
    let mut owned = BalloonQueues {
        inflate,
        deflate,
        stats,
        reporting,
        stats_head: q.stats_head,
    };
    WorkerThread::spawn("virtio-balloon", move |kill| {
        let run = || -> std::io::Result<()> {
            add_kill(&epoll, &kill)?;
            let events = [
                Some(inflate_evt),
                Some(deflate_evt),
                stats_evt,
                reporting_evt,
            ];
            // Work that was pending before the device (re)started: a
            // target set while it slept, buffers made available.
            let _ = ctx.command.write(1);
            for e in events.iter().flatten() {
                let _ = e.write(1);
            }
            let mut ready = [EpollEvent::default(); 8];
            loop {
                let n = match epoll.wait(-1, &mut ready) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                for event in &ready[..n] {
                    let token = event.data();
                    if token == KILL {
                        return Ok(());
                    }
                    if let Some(Some(e)) = usize::try_from(token).ok().and_then(|i| events.get(i)) {
                        let _ = e.read();
                    }
                    handle(&ctx, &mut owned, &mut timer, token);
                }
            }
        };
        if let Err(e) = run() {
            tracing::error!("virtio-balloon worker stopped: {e}");
        }
        owned
    })
}

fn split(q: Option<QueueWithEvent>) -> (Option<Queue>, Option<EventFd>) {
    match q {
        Some((q, e)) => (Some(q), Some(e)),
        None => (None, None),
    }
}

fn add_kill(epoll: &Epoll, kill: &EventFd) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        kill.as_raw_fd(),
        EpollEvent::new(EventSet::IN, KILL),
    )
}

fn handle(ctx: &Context, q: &mut BalloonQueues, timer: &mut TimerFd, token: u64) {
    let (mem, irq) = (&ctx.mem, ctx.interrupt.as_ref());
    match token {
        INFLATE | DEFLATE => {
            let mut counters = ctx.shared.lock().counters;
            let queue = if token == INFLATE {
                &mut q.inflate
            } else {
                &mut q.deflate
            };
            process_pfns(queue, mem, irq, token == INFLATE, &mut counters);
            ctx.shared.lock().counters = counters;
        }
        REPORTING => {
            if let Some(queue) = &mut q.reporting {
                let mut counters = ctx.shared.lock().counters;
                process_reports(queue, mem, irq, &mut counters);
                ctx.shared.lock().counters = counters;
            }
        }
        STATS => {
            if let Some(queue) = &mut q.stats {
                let shared = &ctx.shared;
                process_stats(queue, mem, irq, &mut q.stats_head, &mut |stats| {
                    let mut s = shared.lock();
                    s.stats = Some(stats);
                    s.stats_at = Some(Instant::now());
                    s.stats_generation += 1;
                    drop(s);
                    shared.changed.notify_all();
                });
                // Statistics asked for before the guest's buffer came.
                let wanted = std::mem::take(&mut ctx.shared.lock().stats_wanted);
                if wanted && !request_stats(queue, mem, irq, &mut q.stats_head) {
                    ctx.shared.lock().stats_wanted = true;
                }
            }
        }
        COMMAND => {
            let _ = ctx.command.read();
            let mut s = ctx.shared.lock();
            let config = std::mem::take(&mut s.config_changed);
            let wanted = std::mem::take(&mut s.stats_wanted);
            drop(s);
            if config {
                irq.signal_config();
            }
            if wanted {
                want_stats(ctx, q);
            }
        }
        TIMER => {
            let _ = timer.wait();
            want_stats(ctx, q);
        }
        _ => {}
    }
}

/// Returns the held statistics buffer; without one, remembers that
/// statistics are wanted for when the guest gives it.
fn want_stats(ctx: &Context, q: &mut BalloonQueues) {
    let Some(queue) = &mut q.stats else {
        return;
    };
    if !request_stats(queue, &ctx.mem, &ctx.interrupt, &mut q.stats_head) {
        ctx.shared.lock().stats_wanted = true;
    }
}
