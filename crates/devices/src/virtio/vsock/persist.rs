//! virtio-vsock's saved state, and the transport-reset event a restored
//! device sends.
//!
//! Connections cannot cross a snapshot: their host ends are sockets of
//! the process that took it. A restored device therefore starts without
//! connections and, once the guest's event queue has a buffer, sends
//! VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: the guest drops its sockets and
//! reads the CID again (a clone may have a new one). Host listeners are
//! the new device's and work at once (as in Firecracker).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use memory::GuestMemoryMmap;

use super::Vsock;
use crate::virtio::{Interrupt, VirtioStateError};

/// `virtio_vsock_event.id` of a transport reset.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct VsockState {
    /// The guest's CID when the snapshot was taken.
    pub guest_cid: u64,
}

impl Vsock {
    pub(super) fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
        }
    }

    /// Arms the transport reset for the next activation. The CID stays
    /// the one this device was made with (a clone gets a new one; the
    /// guest reads it again on the reset).
    pub(super) fn restore(&mut self, saved: &VsockState) -> Result<(), VirtioStateError> {
        if !(super::MIN_GUEST_CID..u64::from(u32::MAX)).contains(&saved.guest_cid) {
            return Err(VirtioStateError::Invalid(format!(
                "guest CID {} is reserved",
                saved.guest_cid
            )));
        }
        self.reset_on_activate = true;
        Ok(())
    }

    /// Whether the next activation sends a transport reset (tests).
    pub fn transport_reset_armed(&self) -> bool {
        self.reset_on_activate
    }
}

/// Puts a transport-reset event in the guest's next event buffer; false
/// when it has none (or it is unusable: then the event is dropped and
/// counted as sent, so a hostile buffer cannot keep it pending forever).
pub fn send_transport_reset(
    events: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
) -> bool {
    let Some(chain) = events.pop_descriptor_chain(mem) else {
        return false;
    };
    let head = chain.head_index();
    let mut written = 0u32;
    if let Some(desc) = chain.into_iter().find(|d| d.is_write_only()) {
        let bytes = EVENT_TRANSPORT_RESET.to_le_bytes();
        if desc.len() >= 4 && mem.write_slice(&bytes, desc.addr()).is_ok() {
            written = 4;
        } else {
            tracing::debug!("vsock: unusable event buffer; transport reset dropped");
        }
    }
    if let Err(e) = events.add_used(mem, head, written) {
        tracing::warn!("vsock: cannot return an event buffer: {e}");
    }
    if events.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
    true
}

/// How long host connections wait for a guest to handle a transport reset
/// before they are sent anyway.
pub const RESET_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A restored device's transport reset: waiting for an event buffer to be
/// sent in, then for the guest to handle it. A connection a host program
/// requests meanwhile would be accepted by the guest and dropped by the
/// reset it raced, so such requests wait until the guest posts the event
/// buffer again (what Linux does once it has handled the event), or
/// [`RESET_ACK_TIMEOUT`] passed.
#[derive(Debug, Default)]
pub struct TransportReset {
    /// The event waits for a buffer.
    pending: bool,
    /// Sent: the event queue's available index then, and when.
    unacked: Option<(std::num::Wrapping<u16>, std::time::Instant)>,
    /// Host programs waiting: token, socket, guest port.
    deferred: Vec<(u64, std::os::unix::net::UnixStream, u32)>,
}

impl TransportReset {
    pub fn request(&mut self) {
        self.pending = true;
    }

    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Whether host connections wait.
    pub fn resetting(&self) -> bool {
        self.pending || self.unacked.is_some()
    }

    /// Keeps a host program's request until the guest handled the reset.
    pub fn defer(&mut self, token: u64, stream: std::os::unix::net::UnixStream, port: u32) {
        self.deferred.push((token, stream, port));
    }

    /// Sends the event if it is pending and the guest gave a buffer; the
    /// requests that may go now.
    pub fn deliver(
        &mut self,
        events: &mut Queue,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Vec<(u64, std::os::unix::net::UnixStream, u32)> {
        let posted = |events: &Queue| {
            events
                .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                .ok()
        };
        if self.pending && send_transport_reset(events, mem, interrupt) {
            self.pending = false;
            self.unacked = Some((
                posted(events).unwrap_or_default(),
                std::time::Instant::now(),
            ));
        }
        if let Some((then, since)) = self.unacked {
            let now = posted(events).unwrap_or(then);
            if now != then || since.elapsed() >= RESET_ACK_TIMEOUT {
                self.unacked = None;
                return std::mem::take(&mut self.deferred);
            }
        }
        Vec::new()
    }
}
