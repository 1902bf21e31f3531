//! virtio-net's saved state: what the guest saw of the NIC. The backend
//! (NAT, TAP) is the caller's and is made anew for a restored VM.
//!
//! Not saved: a frame held for the guest while it had no receive buffers
//! (a network is lossy; the sender retransmits), and the counters. Saved
//! with the limits: how full each direction's token buckets were, so a
//! restored NIC does not get a fresh second's burst (as virtio-blk).

use serde::{Deserialize, Serialize};

use super::{MacAddr, Net, VirtioDevice};
use crate::virtio::rate_limit::{RateLimitConfig, RateLimiterState};
use crate::virtio::VirtioStateError;

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct NetState {
    /// The MAC address the guest read.
    pub mac: [u8; 6],
    /// The link status the guest read.
    pub link_up: bool,
    /// The features offered (the transport saves those acked).
    pub features: u64,
    /// The MTU offered, if any.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// The rate limits of each direction, if any. A restored NIC takes
    /// its limits from the VM's configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// The receive direction's limits and bucket levels (none for an
    /// unlimited NIC, one never activated, or a snapshot from before
    /// levels were saved: those start with full buckets). A restored NIC
    /// takes the levels when its limits are the saved ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_limiter: Option<RateLimiterState>,
    /// The transmit direction's, as `rx_limiter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_limiter: Option<RateLimiterState>,
}

impl Net {
    pub(super) fn state(&self) -> NetState {
        // A sleeping worker's live buckets; else the levels a restore
        // left for the next activation.
        let live = self.sleeping.as_ref();
        let rx_limiter = live
            .and_then(|w| w.rx_limiter.as_ref())
            .map(|l| l.state())
            .or(self.restored_limiters.0);
        let tx_limiter = live
            .and_then(|w| w.tx_limiter.as_ref())
            .map(|l| l.state())
            .or(self.restored_limiters.1);
        NetState {
            mac: self.mac.0,
            link_up: self.link_up,
            features: self.features(),
            mtu: self.mtu,
            rate_limit: self.rate_limit.is_limited().then_some(self.rate_limit),
            rx_limiter,
            tx_limiter,
        }
    }

    /// Takes the saved link status and bucket levels. The MAC address stays the one this
    /// device was made with: a clone gets a new one (the guest's driver
    /// keeps using the one it read until it probes again; giving the
    /// guest the new address is the VMM's business). The backend decides
    /// the offloads offered; the transport checks that the features the
    /// guest acked are still offered.
    pub(super) fn restore(&mut self, saved: &NetState) -> Result<(), VirtioStateError> {
        if saved.mac != self.mac.0 {
            tracing::info!(
                "virtio-net: restored with MAC {} where the snapshot had {}",
                self.mac,
                MacAddr(saved.mac)
            );
        }
        self.link_up = saved.link_up;
        self.restored_limiters = (saved.rx_limiter, saved.tx_limiter);
        Ok(())
    }
}
