//! virtio-fs's saved state: the tag the guest saw. Open FUSE state (node
//! IDs, file handles) cannot cross a snapshot — it is host descriptors of
//! the process that took it — so a restored device serves the share's
//! root afresh and the guest must mount the share again (requests on
//! earlier node IDs fail with EBADF).

use serde::{Deserialize, Serialize};

use super::VirtioFs;
use crate::virtio::VirtioStateError;

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct FsState {
    /// The tag in the config space when the snapshot was taken.
    pub tag: String,
}

impl VirtioFs {
    pub(super) fn state(&self) -> FsState {
        FsState {
            tag: self.tag.clone(),
        }
    }

    /// A state is only taken by a device sharing under the same tag (the
    /// guest mounted it by that name).
    pub(super) fn restore(&mut self, saved: &FsState) -> Result<(), VirtioStateError> {
        if saved.tag != self.tag {
            return Err(VirtioStateError::Invalid(format!(
                "the snapshot's share is tagged {:?}, this one {:?}",
                saved.tag, self.tag
            )));
        }
        Ok(())
    }
}
