//! The messages the VMM's control loop waits on.

use devices::PlatformRequest;

use crate::request::{ControlReply, ControlRequest};
use crate::shared::VcpuStop;

/// Messages to the VMM's control loop.
#[derive(Debug)]
pub enum VmmEvent {
    Platform(PlatformRequest),
    VcpuStopped {
        id: u32,
        reason: VcpuStop,
        /// Where the vCPU was when it stopped, if its registers could be read.
        rip: Option<u64>,
    },
    /// `Ctrl-A x` on the console.
    ConsoleExit,
    /// A controller's request and where to answer it.
    Control(ControlRequest, std::sync::mpsc::Sender<ControlReply>),
}
