//! virtio-blk's saved state: what the device offered. The disk image is
//! the caller's (it is opened again and handed to [`Block::new`]); a
//! restore checks that it still looks as the guest saw it.

use serde::{Deserialize, Serialize};

use super::Block;
use crate::virtio::rate_limit::RateLimiterState;
use crate::virtio::{VirtioDevice, VirtioStateError};

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct BlockState {
    /// The features offered.
    pub features: u64,
    /// The config space the guest read (capacity, limits).
    pub config: Vec<u8>,
    /// The rate limits and how full their buckets were (none in
    /// snapshots from before rate limits, or for an unlimited disk).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterState>,
}

impl Block {
    pub(super) fn state(&self) -> BlockState {
        let rate_limiter = match &self.limiter {
            Some(l) => Some(l.state()),
            None => self.restored_limiter.or_else(|| {
                self.rate_limit.is_limited().then(|| RateLimiterState {
                    config: self.rate_limit,
                    ..RateLimiterState::default()
                })
            }),
        };
        BlockState {
            features: self.features(),
            config: self.config.clone(),
            rate_limiter,
        }
    }

    /// Keeps the saved buckets' levels for the next activation (they
    /// apply only if the limits are the same: the VM's configuration,
    /// not the snapshot, decides the limits).
    pub(super) fn restore_limiter(&mut self, saved: &BlockState) {
        self.restored_limiter = saved.rate_limiter;
    }

    /// A restored block device is made on the snapshot's disk: it must
    /// offer what the saved one offered (same capacity, same read-only
    /// mode), or the guest's view of the disk would be wrong.
    pub(super) fn check_state(&self, saved: &BlockState) -> Result<(), VirtioStateError> {
        let now = self.state();
        if saved.config != now.config {
            return Err(VirtioStateError::Invalid(format!(
                "the disk's geometry differs from the snapshot's (capacity {} sectors, \
                 the snapshot's {})",
                capacity(&now.config),
                capacity(&saved.config),
            )));
        }
        if saved.features != now.features {
            return Err(VirtioStateError::Invalid(format!(
                "the disk offers features {:#x}, the snapshot's offered {:#x} \
                 (read-only mode changed?)",
                now.features, saved.features
            )));
        }
        Ok(())
    }
}

/// The capacity field of a config space, for messages.
fn capacity(config: &[u8]) -> u64 {
    config
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes)
}
