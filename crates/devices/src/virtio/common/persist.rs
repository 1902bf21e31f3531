//! A virtio transport's common saved state: the negotiation registers,
//! each queue (with its ring positions) and the device's own state.
//!
//! Saving needs the device asleep ([`VirtioCommon::sleep`]), so the
//! queue positions are the device's, not stale copies. Restoring goes
//! into a freshly made transport (its device made from the VM's
//! configuration, not activated) and treats the state as untrusted: the
//! device type must match, queue sizes be powers of two up to the
//! device's maximum, rings aligned and inside guest memory, acked
//! features among those offered, status bits consistent. If the saved
//! device was running, restoring activates it with the restored queues:
//! it runs on without the guest negotiating again.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_queue::QueueT;

use super::{Quiesce, VirtioCommon};
use crate::virtio::{
    ActivateError, VirtioDeviceState, VirtioStateError, VirtqueueState, INT_CONFIG, INT_VRING,
};

/// The longest refusal reason kept in a state (they are a line of text).
const MAX_REASON: usize = 1024;

#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
pub struct VirtioTransportState {
    /// The virtio device ID.
    pub device_type: u32,
    /// The features offered (VERSION_1 included).
    pub device_features: u64,
    /// The features the driver acked.
    pub acked_features: u64,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub queue_select: u32,
    /// The device status register.
    pub status: u32,
    pub config_generation: u32,
    /// InterruptStatus bits the driver had not acknowledged.
    pub interrupt_status: u32,
    /// The device was running.
    pub activated: bool,
    /// A queue setting the device refused; the next DRIVER_OK fails with
    /// NEEDS_RESET (whose bit, once set, is in `status`).
    #[serde(default)]
    pub refused_queue_setup: Option<String>,
    pub queues: Vec<VirtqueueState>,
    /// The device's own state.
    pub device: VirtioDeviceState,
}

/// Why a transport's state cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    #[error("the {0} device is running; put it to sleep before saving")]
    Awake(&'static str),
    #[error("the {0} device is already set up; restore into a new transport")]
    Active(&'static str),
    #[error("the state is of virtio device type {saved}; this device is type {actual}")]
    DeviceType { saved: u32, actual: u32 },
    #[error("the state has {saved} queues; the {device} device has {actual}")]
    QueueCount {
        device: &'static str,
        saved: usize,
        actual: usize,
    },
    #[error("queue {index} of the {device} device: {why}")]
    Queue {
        device: &'static str,
        index: usize,
        why: String,
    },
    #[error("the state of the {device} device is inconsistent: {why}")]
    Invalid { device: &'static str, why: String },
    #[error("the {0} device refused its saved state")]
    Device(&'static str, #[source] VirtioStateError),
    #[error("the restored {0} device cannot start")]
    Activate(&'static str, #[source] ActivateError),
}

impl VirtioCommon {
    /// The transport's state with its device's. The device must be asleep
    /// if it was activated.
    pub fn save_state(&self) -> Result<VirtioTransportState, TransportStateError> {
        if self.activated && self.quiesce != Quiesce::Asleep {
            return Err(TransportStateError::Awake(self.device.name()));
        }
        Ok(VirtioTransportState {
            device_type: self.device.device_type(),
            device_features: self.offered_features(),
            acked_features: self.acked_features,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            refused_queue_setup: self.bad_queue_setup.clone(),
            queues: self.queues.iter().map(VirtqueueState::from).collect(),
            device: self.device.save_state(),
        })
    }

    /// Restores a saved state into this transport, which must be new (the
    /// driver has not set it up). Checks everything first; on an error
    /// nothing has changed but the device's own state. If the saved
    /// device was running, it is activated with the restored queues, and
    /// each queue's notification is replayed once (a kick that went with
    /// the old process must not be lost; a spare one is harmless).
    pub fn restore(&mut self, state: &VirtioTransportState) -> Result<(), TransportStateError> {
        let name = self.device.name();
        if self.activated || self.status != 0 {
            return Err(TransportStateError::Active(name));
        }
        let actual = self.device.device_type();
        if state.device_type != actual {
            return Err(TransportStateError::DeviceType {
                saved: state.device_type,
                actual,
            });
        }
        let invalid = |why: String| TransportStateError::Invalid { device: name, why };
        let sizes = self.device.queue_max_sizes();
        if state.queues.len() != sizes.len() {
            return Err(TransportStateError::QueueCount {
                device: name,
                saved: state.queues.len(),
                actual: sizes.len(),
            });
        }
        let queues = state
            .queues
            .iter()
            .zip(sizes)
            .enumerate()
            .map(|(index, (q, &max))| {
                q.to_queue(max, &self.mem)
                    .map_err(|why| TransportStateError::Queue {
                        device: name,
                        index,
                        why,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if state.status > 0xff {
            return Err(invalid(format!(
                "status {:#x} is wider than 8 bits",
                state.status
            )));
        }
        let offered = self.offered_features();
        let negotiated = state.status & VIRTIO_CONFIG_S_FEATURES_OK != 0;
        if negotiated && state.acked_features & !offered != 0 {
            return Err(invalid(format!(
                "acked features {:#x} are not among those offered ({offered:#x})",
                state.acked_features
            )));
        }
        if state.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(invalid(format!(
                "interrupt status {:#x} has unknown bits",
                state.interrupt_status
            )));
        }
        let ready = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        if state.activated {
            if state.status & ready != ready {
                return Err(invalid(format!(
                    "running with status {:#x} (not DRIVER_OK)",
                    state.status
                )));
            }
            if let Some(i) = queues.iter().position(|q| !q.ready()) {
                return Err(invalid(format!("running with queue {i} not ready")));
            }
        }
        if state
            .refused_queue_setup
            .as_ref()
            .is_some_and(|r| r.len() > MAX_REASON)
        {
            return Err(invalid("the refusal reason is too long".to_string()));
        }
        self.device
            .restore_state(&state.device)
            .map_err(|e| TransportStateError::Device(name, e))?;

        self.acked_features = state.acked_features;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.queue_select = state.queue_select;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.bad_queue_setup = state.refused_queue_setup.clone();
        self.queues = queues;
        self.quiesce = Quiesce::Awake;
        if state.activated {
            let activation = self
                .activation()
                .map_err(|e| TransportStateError::Activate(name, ActivateError::Event(e)))?;
            self.device
                .activate(activation)
                .map_err(|e| TransportStateError::Activate(name, e))?;
            self.activated = true;
            for event in &self.queue_events {
                let _ = event.write(1);
            }
        }
        self.interrupt.restore_status(state.interrupt_status);
        Ok(())
    }
}
