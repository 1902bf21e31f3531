//! virtio-balloon's saved state: what it offered, the target and the
//! guest's `actual`, the statistics buffer it holds, the latest
//! statistics and its counters. (The negotiated features and the queues
//! are the transport's.)

use serde::{Deserialize, Serialize};

use super::{Balloon, BalloonCounters, GuestStats, PAGE_SHIFT};
use crate::virtio::VirtioStateError;

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct BalloonState {
    /// The features the device offered (a restored device must offer the
    /// same: the driver set up its queues for them).
    #[serde(default)]
    pub features: u64,
    /// The size the host asked for, in 4 KiB pages.
    #[serde(default)]
    pub target_pages: u32,
    /// The size the guest said the balloon has, in 4 KiB pages.
    #[serde(default)]
    pub actual_pages: u32,
    /// The head of the statistics buffer the device held (the driver
    /// waits for it back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats_head: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<GuestStats>,
    #[serde(default)]
    pub counters: BalloonCounters,
}

impl Balloon {
    pub(super) fn state(&self) -> BalloonState {
        let s = self.shared.lock();
        BalloonState {
            features: self.options.features(),
            target_pages: s.target_pages,
            actual_pages: s.actual_pages,
            stats_head: self.stats_head,
            stats: s.stats.clone(),
            counters: s.counters,
        }
    }

    pub(super) fn restore(&mut self, saved: &BalloonState) -> Result<(), VirtioStateError> {
        if saved.features != self.options.features() {
            return Err(VirtioStateError::Invalid(format!(
                "the balloon offered features {:#x}; this one offers {:#x}",
                saved.features,
                self.options.features()
            )));
        }
        let pages = self.ram_bytes >> PAGE_SHIFT;
        if u64::from(saved.target_pages) > pages {
            return Err(VirtioStateError::Invalid(format!(
                "a balloon target of {} pages in a guest of {pages}",
                saved.target_pages
            )));
        }
        if saved.stats_head.is_some() && !self.options.stats {
            return Err(VirtioStateError::Invalid(
                "a statistics buffer held by a balloon without statistics".into(),
            ));
        }
        // A head outside the queue is the transport's to refuse when the
        // device uses it (add_used checks it against the queue size).
        let mut s = self.shared.lock();
        s.target_pages = saved.target_pages;
        s.actual_pages = saved.actual_pages;
        s.stats = saved.stats.clone();
        s.stats_at = None;
        s.counters = saved.counters;
        drop(s);
        self.stats_head = saved.stats_head;
        Ok(())
    }
}
