//! virtio-balloon (device type 5): the host asks the guest to give memory
//! back (a *target*), the guest inflates the balloon with pages it will
//! not use and says how many it holds (*actual*); it reports free pages
//! on its own (free page reporting) and, on request, its memory
//! statistics.
//!
//! Queues, in the order the driver sets them up (only those whose feature
//! is offered exist; the driver numbers them without gaps): inflate,
//! deflate, statistics (`VIRTIO_BALLOON_F_STATS_VQ`), free page reporting
//! (`VIRTIO_BALLOON_F_REPORTING`). Free page hinting is not offered.
//!
//! Pages inflated or reported are given back to the host at once
//! ([`memory::discard`]); the guest reads zeros there when it takes them
//! back. Deflating needs nothing from the host. Every page number and
//! range from the guest is checked against guest RAM: one outside it is
//! skipped (and counted), never touched.
//!
//! The host side ([`BalloonHandle`]) sets the target, asks for fresh
//! statistics and reads the figures; the device raises a configuration
//! interrupt for a new target and returns the statistics buffer when
//! statistics are wanted (on request, and every `stats_interval` when one
//! is set).

pub mod persist;
pub mod queues;
mod worker;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{stop_worker, WorkerError, WorkerThread};
use super::{ActivateError, Activation, VirtioDevice, VirtioDeviceState, VirtioStateError};
pub use queues::GuestStats;
use worker::BalloonQueues;

/// The virtio device ID of a memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// The statistics queue exists.
pub const F_STATS_VQ: u32 = 1;
/// The guest may deflate the balloon when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// The free page reporting queue exists.
pub const F_REPORTING: u32 = 5;
/// Balloon page numbers count 4 KiB pages whatever the guest's page size.
pub const PAGE_SHIFT: u32 = 12;
const QUEUE_SIZE: u16 = 256;
/// The config space: num_pages (le32), actual (le32).
const CONFIG_LEN: usize = 8;

/// What a balloon offers, as the VM's configuration says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonOptions {
    /// Free page reporting (free memory goes back without a target).
    pub reporting: bool,
    /// The guest may take pages back from the balloon when out of memory.
    pub deflate_on_oom: bool,
    /// The statistics queue.
    pub stats: bool,
    /// Statistics are asked for this often; `None`: only on request.
    pub stats_interval: Option<Duration>,
}

impl Default for BalloonOptions {
    fn default() -> Self {
        BalloonOptions {
            reporting: true,
            deflate_on_oom: true,
            stats: true,
            stats_interval: None,
        }
    }
}

impl BalloonOptions {
    /// The device features these options offer.
    pub fn features(&self) -> u64 {
        let mut f = 0u64;
        if self.stats {
            f |= 1 << F_STATS_VQ;
        }
        if self.deflate_on_oom {
            f |= 1 << F_DEFLATE_ON_OOM;
        }
        if self.reporting {
            f |= 1 << F_REPORTING;
        }
        f
    }
}

/// What the device did with the guest's pages.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct BalloonCounters {
    /// Pages put into the balloon (inflate queue), duplicates included.
    #[serde(default)]
    pub inflated_pages: u64,
    /// Pages taken out of it (deflate queue).
    #[serde(default)]
    pub deflated_pages: u64,
    /// Bytes the guest reported free (free page reporting).
    #[serde(default)]
    pub reported_bytes: u64,
    /// Bytes given back to the host (inflated and reported).
    #[serde(default)]
    pub released_bytes: u64,
    /// Page numbers and ranges refused (outside RAM, misaligned) or that
    /// the host could not release.
    #[serde(default)]
    pub refused: u64,
}

/// The balloon's figures, as the API shows them.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct BalloonStatus {
    /// The size the host asks for, in bytes.
    pub target_bytes: u64,
    /// The size the guest says the balloon has, in bytes.
    pub actual_bytes: u64,
    /// The guest's latest statistics, if it sent any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<GuestStats>,
    /// How long ago they came, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_age_ms: Option<u64>,
    #[serde(default)]
    pub counters: BalloonCounters,
}

/// Why the host's request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonError {
    #[error("a balloon of {target} bytes is larger than the guest's {ram} bytes of RAM")]
    TooLarge { target: u64, ram: u64 },
}

/// What the device, its worker and the host side share.
#[derive(Debug)]
struct Shared {
    state: Mutex<SharedState>,
    /// Notified when the guest sends statistics or changes `actual`.
    changed: Condvar,
    /// Wakes the worker for `pending` work.
    command: EventFd,
}

#[derive(Debug, Default)]
struct SharedState {
    target_pages: u32,
    actual_pages: u32,
    stats: Option<GuestStats>,
    stats_at: Option<Instant>,
    /// Bumped by every statistics update.
    stats_generation: u64,
    counters: BalloonCounters,
    /// The host changed the target: a config interrupt is due.
    config_changed: bool,
    /// The host wants statistics: the held buffer is due back.
    stats_wanted: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The host's side of a balloon: set the target, read the figures.
#[derive(Debug, Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
    ram_bytes: u64,
    /// The device has a statistics queue.
    stats: bool,
}

impl BalloonHandle {
    /// Asks the guest for a balloon of `bytes` (rounded down to 4 KiB
    /// pages); at most the guest's RAM.
    pub fn set_target(&self, bytes: u64) -> Result<(), BalloonError> {
        if bytes > self.ram_bytes {
            return Err(BalloonError::TooLarge {
                target: bytes,
                ram: self.ram_bytes,
            });
        }
        let pages = u32::try_from(bytes >> PAGE_SHIFT).map_err(|_| BalloonError::TooLarge {
            target: bytes,
            ram: self.ram_bytes,
        })?;
        let mut s = self.shared.lock();
        s.target_pages = pages;
        s.config_changed = true;
        drop(s);
        let _ = self.shared.command.write(1);
        Ok(())
    }

    /// The figures now.
    pub fn status(&self) -> BalloonStatus {
        let s = self.shared.lock();
        BalloonStatus {
            target_bytes: u64::from(s.target_pages) << PAGE_SHIFT,
            actual_bytes: u64::from(s.actual_pages) << PAGE_SHIFT,
            stats: s.stats.clone(),
            stats_age_ms: s
                .stats_at
                .map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)),
            counters: s.counters,
        }
    }

    /// Asks the guest for fresh statistics and waits for them at most
    /// `timeout`; the figures then (with older statistics if the guest did
    /// not answer in time: a paused guest does not).
    pub fn fresh_status(&self, timeout: Duration) -> BalloonStatus {
        if !self.stats {
            return self.status();
        }
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.lock();
        let seen = s.stats_generation;
        s.stats_wanted = true;
        let _ = self.shared.command.write(1);
        while s.stats_generation == seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .shared
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(s);
        self.status()
    }

    /// Waits until `cond` holds for the figures, at most `timeout`
    /// (tests).
    pub fn wait_for(&self, timeout: Duration, cond: impl Fn(&BalloonStatus) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(&self.status()) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let s = self.shared.lock();
            let _ = self
                .shared
                .changed
                .wait_timeout(s, left.min(Duration::from_millis(50)));
        }
    }
}

/// A virtio-balloon device.
pub struct Balloon {
    options: BalloonOptions,
    shared: Arc<Shared>,
    ram_bytes: u64,
    worker: Option<WorkerThread<BalloonQueues>>,
    /// The statistics buffer the guest gave and the device holds, while
    /// the device sleeps (the worker holds it while it runs).
    stats_head: Option<u16>,
    queue_sizes: Vec<u16>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Balloon {
    /// A balloon for a guest with `ram_bytes` of RAM, and its host side.
    pub fn new(options: BalloonOptions, ram_bytes: u64) -> std::io::Result<(Self, BalloonHandle)> {
        let shared = Arc::new(Shared {
            state: Mutex::new(SharedState::default()),
            changed: Condvar::new(),
            command: EventFd::new(libc::EFD_NONBLOCK)?,
        });
        let queues = 2 + usize::from(options.stats) + usize::from(options.reporting);
        let device = Balloon {
            options,
            shared: shared.clone(),
            ram_bytes,
            worker: None,
            stats_head: None,
            queue_sizes: vec![QUEUE_SIZE; queues],
        };
        let handle = BalloonHandle {
            shared,
            ram_bytes,
            stats: options.stats,
        };
        Ok((device, handle))
    }

    fn config_image(&self) -> [u8; CONFIG_LEN] {
        let s = self.shared.lock();
        let mut c = [0u8; CONFIG_LEN];
        c[..4].copy_from_slice(&s.target_pages.to_le_bytes());
        c[4..].copy_from_slice(&s.actual_pages.to_le_bytes());
        c
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }
    fn name(&self) -> &'static str {
        "balloon"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn features(&self) -> u64 {
        self.options.features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_image(), offset, data);
    }

    /// Only `actual` (bytes 4..8) is the driver's to write; Linux writes
    /// it whole, a partial write changes the bytes it covers.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut image = self.config_image();
        let fits = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(data.len())?))
            .filter(|r| r.start >= 4 && r.end <= CONFIG_LEN);
        let Some(range) = fits else {
            tracing::debug!(offset, len = data.len(), "balloon config write ignored");
            return;
        };
        image[range].copy_from_slice(data);
        let mut actual = [0u8; 4];
        actual.copy_from_slice(&image[4..]);
        self.shared.lock().actual_pages = u32::from_le_bytes(actual);
        self.shared.changed.notify_all();
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let offered = self.options.features();
        let queue_features = (1 << F_STATS_VQ) | (1 << F_REPORTING);
        // The driver sets up a queue per feature it accepts; the transport
        // insists on every queue the device offers.
        if a.acked_features & queue_features != offered & queue_features {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: 2
                    + usize::from(a.acked_features & (1 << F_STATS_VQ) != 0)
                    + usize::from(a.acked_features & (1 << F_REPORTING) != 0),
            });
        }
        let got = a.queues.len();
        if got != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got,
            });
        }
        let mut queues = a.queues.into_iter();
        let mut next = || {
            queues.next().ok_or(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got,
            })
        };
        let inflate = next()?;
        let deflate = next()?;
        let stats = if self.options.stats {
            Some(next()?)
        } else {
            None
        };
        let reporting = if self.options.reporting {
            Some(next()?)
        } else {
            None
        };
        let command = self
            .shared
            .command
            .try_clone()
            .map_err(ActivateError::Event)?;
        let ctx = worker::Context {
            mem: a.mem,
            interrupt: a.interrupt,
            shared: self.shared.clone(),
            interval: self.options.stats_interval,
            command,
        };
        let queues = worker::Started {
            inflate,
            deflate,
            stats,
            reporting,
            stats_head: self.stats_head.take(),
        };
        self.worker = Some(worker::start(ctx, queues).map_err(ActivateError::Thread)?);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.stats_head = None;
        let mut s = self.shared.lock();
        s.actual_pages = 0;
    }

    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, WorkerError> {
        let Some(q) = stop_worker(&mut self.worker)? else {
            return Ok(None);
        };
        self.stats_head = q.stats_head;
        let mut list = vec![q.inflate, q.deflate];
        list.extend(q.stats);
        list.extend(q.reporting);
        Ok(Some(list))
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Balloon(self.state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioStateError> {
        use super::persist::OwnState;
        let s = persist::BalloonState::own(state, self.name(), self.worker.is_some())?;
        self.restore(s)
    }
}

#[cfg(test)]
// Test lengths, indices and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests;
