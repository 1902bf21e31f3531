//! Snapshots: the state contract every stateful part of a VM implements
//! ([`Persist`]), the versioned, checksummed state file, and the guest
//! memory file (page N of guest RAM at offset N × 4 KiB, holes for zero
//! pages) that a restore maps copy-on-write.
//!
//! This crate knows nothing of devices or KVM: each part defines its own
//! state struct (plain serde data) and the VMM gathers them into one
//! document.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The state contract, in the spirit of Firecracker's `Persist`: a part
/// of the VM saves itself as a plain-data state, and is rebuilt from that
/// state plus whatever it needs from the host (`Args`: an opened disk
/// image, a network backend, guest memory).
///
/// State structs are serde data in a self-describing encoding: a field
/// added later gets `#[serde(default)]` so older snapshots still load.
/// Saving twice, or save → restore → save, must give identical states
/// (every implementation has that round-trip test).
pub trait Persist: Sized {
    /// What is saved.
    type State: Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug;
    /// What restoring needs besides the state.
    type Args;
    /// Why a state cannot be restored (a state the guest could not have
    /// produced, a value out of range).
    type Error: std::error::Error + Send + Sync + 'static;

    fn save(&self) -> Self::State;
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}
