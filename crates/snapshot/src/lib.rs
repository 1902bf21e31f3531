//! Snapshots: the state contract every stateful part of a VM implements
//! ([`Persist`]), the versioned, checksummed state file ([`format`]), and
//! the guest memory file ([`memory`]: page N of guest RAM at offset N × 4
//! KiB, holes for zero pages) that a restore maps copy-on-write.
//!
//! This crate knows nothing of devices or KVM: each part defines its own
//! state struct (plain serde data) and the VMM gathers them into one
//! document.

pub mod format;
pub mod memory;

use std::fs::File;
use std::path::{Path, PathBuf};

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

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a hostvisor snapshot state file (bad magic)")]
    NotASnapshot,
    #[error("the snapshot's format version is {found}; this hostvisor reads version {supported}")]
    Version { found: u32, supported: u32 },
    #[error("the snapshot state file is truncated ({got} of {expected} bytes)")]
    Truncated { expected: u64, got: u64 },
    #[error("the snapshot state file has {0} bytes after its end")]
    TrailingBytes(u64),
    #[error("the snapshot state file is corrupt (checksum mismatch)")]
    Checksum,
    #[error("the snapshot state file claims a {0}-byte payload, more than any state")]
    TooLarge(u64),
    #[error("cannot encode the state")]
    Encode(#[source] serde_json::Error),
    #[error("the snapshot state does not match what this hostvisor expects")]
    Decode(#[source] serde_json::Error),
    #[error("the memory file is truncated: guest RAM ends at byte {needed}, the file has {got}")]
    MemoryTooShort { needed: u64, got: u64 },
}

/// Creates `path` through a temporary file beside it: `fill` writes it,
/// then it is synced, renamed over `path`, and the directory synced.
pub fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map_or_else(
        || std::ffi::OsString::from("state"),
        std::ffi::OsStr::to_os_string,
    );
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(&name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        fill(&mut file)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Makes a directory's entries (a rename, a new file) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}
