//! virtio-net's saved state: what the guest saw of the NIC. The backend
//! (NAT, TAP) is the caller's and is made anew for a restored VM.
//!
//! Not saved: a frame held for the guest while it had no receive buffers
//! (a network is lossy; the sender retransmits), and the counters.

use serde::{Deserialize, Serialize};

use super::{MacAddr, Net, VirtioDevice};
use crate::virtio::rate_limit::RateLimitConfig;
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
    /// its limits from the VM's configuration and starts with full
    /// buckets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
}

impl Net {
    pub(super) fn state(&self) -> NetState {
        NetState {
            mac: self.mac.0,
            link_up: self.link_up,
            features: self.features(),
            mtu: self.mtu,
            rate_limit: self.rate_limit.is_limited().then_some(self.rate_limit),
        }
    }

    /// Takes the saved link status. The MAC address stays the one this
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
        Ok(())
    }
}
