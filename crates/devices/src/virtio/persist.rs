//! Saved state of virtio devices and their queues.
//!
//! Every device's own state is one variant of [`VirtioDeviceState`], so
//! the VMM can save a list of `Box<dyn VirtioDevice>` without knowing
//! their types and give each state back to a freshly made device of the
//! same type ([`VirtioDevice::restore_state`](super::VirtioDevice::restore_state),
//! which refuses a state of another type). A queue's state is
//! [`VirtqueueState`], a serde mirror of virtio-queue's `QueueState`.
//!
//! What each device keeps, and what it cannot carry across a snapshot:
//! - block: the features and config space it offered (capacity,
//!   read-only); the disk image is the caller's (an argument), and the
//!   device holds nothing between requests (each request completes before
//!   its worker returns to waiting, so a sleeping device has none in
//!   flight).
//! - net: the MAC the guest saw, the link state and the features offered.
//!   A frame held for the guest while it had no receive buffers is dropped
//!   by a snapshot (a network is lossy; the peer retransmits); a pause
//!   (sleep, wake) keeps it.
//! - console: the host input not yet delivered to the guest.
//! - rng: nothing.
//! - balloon: the features offered, the target and `actual`, the
//!   statistics buffer held (its head), the latest statistics, counters.
//! - vsock: the guest CID. Connections cannot cross a snapshot (their host
//!   ends are sockets of another process): a restored device sends the
//!   guest a VIRTIO_VSOCK_EVENT_TRANSPORT_RESET once the guest's event
//!   queue has a buffer, so the guest drops its sockets (as Firecracker
//!   does); the host listeners are the new device's and survive.
//! - input: its kind, the config selection and the events not yet
//!   delivered to the guest.
//! - fs: the share's tag. FUSE node IDs and open handles cannot cross a
//!   snapshot (they are host descriptors): the guest mounts the share
//!   again after a restore.
//! - gpu: the modes offered, the pending display event, resources (id,
//!   format, size, backing list; a host copy only for resources without
//!   a backing, bounded), what each scanout shows and the cursor. Pixels
//!   of backed resources are read from guest memory again on restore.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use memory::GuestMemoryMmap;

pub use super::balloon::persist::BalloonState;
pub use super::block::persist::BlockState;
pub use super::console::persist::ConsoleState;
pub use super::fs::persist::FsState;
pub use super::gpu::persist::GpuState;
pub use super::input::persist::InputState;
pub use super::net::persist::NetState;
pub use super::vsock::persist::VsockState;

/// One queue as saved: virtio-queue's `QueueState`, which is not serde.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct VirtqueueState {
    /// The largest size the device offers.
    pub max_size: u16,
    /// Where the device takes the next available buffer.
    pub next_avail: u16,
    /// Where the device puts the next used buffer.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for VirtqueueState {
    fn from(q: QueueState) -> Self {
        VirtqueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&Queue> for VirtqueueState {
    fn from(q: &Queue) -> Self {
        q.state().into()
    }
}

impl VirtqueueState {
    /// The queue this state describes, checked as a driver's setup would
    /// be: `max_size` is the device's, the size a power of two up to it,
    /// the rings aligned, and — for a ready queue — inside `mem`.
    pub fn to_queue(&self, max_size: u16, mem: &GuestMemoryMmap) -> Result<Queue, String> {
        if self.max_size != max_size {
            return Err(format!(
                "maximum size {} where the device offers {max_size}",
                self.max_size
            ));
        }
        if self.size == 0 || !self.size.is_power_of_two() || self.size > max_size {
            return Err(format!(
                "size {} is not a power of two up to {max_size}",
                self.size
            ));
        }
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        let queue = Queue::try_from(state).map_err(|e| format!("{e}"))?;
        if self.ready && !queue.is_valid(mem) {
            return Err("its rings lie outside guest memory".to_string());
        }
        Ok(queue)
    }
}

/// The device's own state behind the transport, one variant per device
/// type.
#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
#[serde(rename_all = "snake_case")]
pub enum VirtioDeviceState {
    Block(BlockState),
    Net(NetState),
    Console(ConsoleState),
    Rng(RngState),
    Vsock(VsockState),
    Balloon(BalloonState),
    Fs(FsState),
    Input(InputState),
    Gpu(GpuState),
}

impl VirtioDeviceState {
    /// The device type's short name, as [`VirtioDevice::name`] gives it.
    ///
    /// [`VirtioDevice::name`]: super::VirtioDevice::name
    pub fn name(&self) -> &'static str {
        match self {
            VirtioDeviceState::Block(_) => "block",
            VirtioDeviceState::Net(_) => "net",
            VirtioDeviceState::Console(_) => "console",
            VirtioDeviceState::Rng(_) => "rng",
            VirtioDeviceState::Vsock(_) => "vsock",
            VirtioDeviceState::Balloon(_) => "balloon",
            VirtioDeviceState::Fs(_) => "fs",
            VirtioDeviceState::Input(_) => "input",
            VirtioDeviceState::Gpu(_) => "gpu",
        }
    }
}

/// A device type's own variant of [`VirtioDeviceState`]: what every
/// `restore_state` picks out of the state it is given.
pub trait OwnState: Sized {
    /// This type's state in `state`, if `state` is of this type.
    fn pick(state: &VirtioDeviceState) -> Option<&Self>;

    /// The checks every device's `restore_state` starts with: a state is
    /// restored into a device that is not running (`active` is whether it
    /// has a worker), and it must be this device's type (`device` names the
    /// device for the error).
    fn own<'a>(
        state: &'a VirtioDeviceState,
        device: &'static str,
        active: bool,
    ) -> Result<&'a Self, VirtioStateError> {
        if active {
            return Err(VirtioStateError::Active);
        }
        Self::pick(state).ok_or_else(|| VirtioStateError::wrong(device, state))
    }
}

macro_rules! own_state {
    ($($variant:ident => $ty:ty),* $(,)?) => {$(
        impl OwnState for $ty {
            fn pick(state: &VirtioDeviceState) -> Option<&Self> {
                match state {
                    VirtioDeviceState::$variant(s) => Some(s),
                    _ => None,
                }
            }
        }
    )*};
}

own_state!(
    Block => BlockState,
    Net => NetState,
    Console => ConsoleState,
    Rng => RngState,
    Vsock => VsockState,
    Balloon => BalloonState,
    Fs => FsState,
    Input => InputState,
    Gpu => GpuState,
);

/// virtio-rng keeps nothing: its queue is the transport's.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct RngState {}

/// Why a device refused a saved state.
#[derive(Debug, thiserror::Error)]
pub enum VirtioStateError {
    #[error("the state is a {got} device's; this device is a {expected} device")]
    WrongDevice {
        expected: &'static str,
        got: &'static str,
    },
    #[error("the device is running; a state is restored into a new device")]
    Active,
    /// The state does not fit this device (a value out of range, a disk
    /// of another size).
    #[error("{0}")]
    Invalid(String),
}

impl VirtioStateError {
    /// The error for a state of another device type.
    pub fn wrong(expected: &'static str, got: &VirtioDeviceState) -> Self {
        VirtioStateError::WrongDevice {
            expected,
            got: got.name(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn ready_queue() -> VirtqueueState {
        VirtqueueState {
            max_size: 256,
            next_avail: 7,
            next_used: 5,
            event_idx_enabled: true,
            size: 128,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        }
    }

    #[test]
    fn a_queue_state_round_trips_with_its_positions() {
        let saved = ready_queue();
        let q = saved.to_queue(256, &mem()).unwrap();
        assert_eq!(q.next_avail(), 7);
        assert_eq!(q.next_used(), 5);
        assert_eq!(VirtqueueState::from(&q), saved);
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(
            serde_json::from_str::<VirtqueueState>(&json).unwrap(),
            saved
        );
    }

    #[test]
    fn hostile_queue_states_are_refused() {
        let m = mem();
        let bad = [
            VirtqueueState {
                max_size: 512,
                ..ready_queue()
            },
            VirtqueueState {
                size: 0,
                ..ready_queue()
            },
            VirtqueueState {
                size: 100,
                ..ready_queue()
            },
            VirtqueueState {
                size: 512,
                ..ready_queue()
            },
            VirtqueueState {
                desc_table: 0x1001,
                ..ready_queue()
            },
            VirtqueueState {
                avail_ring: 0x2001,
                ..ready_queue()
            },
            VirtqueueState {
                used_ring: 0x3002,
                ..ready_queue()
            },
            VirtqueueState {
                used_ring: 0xffff_ffff_ffff_f000,
                ..ready_queue()
            },
            VirtqueueState {
                desc_table: 1 << 20,
                ..ready_queue()
            },
        ];
        for state in bad {
            assert!(state.to_queue(256, &m).is_err(), "{state:?}");
        }
        // A queue the driver never set up may point anywhere aligned.
        let unset = VirtqueueState {
            ready: false,
            used_ring: 1 << 40,
            ..ready_queue()
        };
        assert!(unset.to_queue(256, &m).is_ok());
    }
}
