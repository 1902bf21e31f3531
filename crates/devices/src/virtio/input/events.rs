//! Linux input events as virtio-input carries them, and the host side's
//! bounded queue of events waiting for the guest.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Event types (linux/input-event-codes.h).
pub const EV_SYN: u16 = 0x00;
pub const EV_KEY: u16 = 0x01;
pub const EV_REL: u16 = 0x02;
pub const EV_ABS: u16 = 0x03;
pub const EV_LED: u16 = 0x11;
pub const EV_REP: u16 = 0x14;

/// EV_SYN codes.
pub const SYN_REPORT: u16 = 0;
/// EV_REL codes.
pub const REL_WHEEL: u16 = 0x08;
/// EV_ABS codes.
pub const ABS_X: u16 = 0x00;
pub const ABS_Y: u16 = 0x01;
/// The largest absolute coordinate the tablet reports (its range is
/// `0..=ABS_MAX_COORD` on both axes).
pub const ABS_MAX_COORD: u32 = 32767;
/// EV_KEY codes of the tablet's buttons.
pub const BTN_LEFT: u16 = 0x110;
pub const BTN_RIGHT: u16 = 0x111;
pub const BTN_MIDDLE: u16 = 0x112;
/// EV_LED codes the keyboard offers.
pub const LED_NUML: u16 = 0;
pub const LED_CAPSL: u16 = 1;
pub const LED_SCROLLL: u16 = 2;
/// The keyboard's key codes are `1..=KEY_MAX_KEYBOARD` (KEY_ESC up to
/// KEY_COMPOSE: every key of a PC keyboard, the keypad and the media keys
/// Linux numbers below 128), plus KEY_F13..=KEY_F24.
pub const KEY_MAX_KEYBOARD: u16 = 127;
pub const KEY_F13: u16 = 183;
pub const KEY_F24: u16 = 194;

/// Events held for the guest at most. A guest that reads its event queue
/// never comes near it (a report is a few events); one that stops reading
/// gets no more once it is full (see [`InputHandle::send`]).
pub const EVENT_LIMIT: usize = 4096;

/// One `struct virtio_input_event` (the same as an evdev event without its
/// time stamp).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InputEvent {
    pub kind: u16,
    pub code: u16,
    pub value: u32,
}

impl InputEvent {
    pub const fn new(kind: u16, code: u16, value: u32) -> Self {
        InputEvent { kind, code, value }
    }

    /// The end of a report.
    pub const fn syn() -> Self {
        InputEvent::new(EV_SYN, SYN_REPORT, 0)
    }

    /// The 8 bytes the guest reads: type, code, value, little endian.
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&self.kind.to_le_bytes());
        b[2..4].copy_from_slice(&self.code.to_le_bytes());
        b[4..8].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    pub fn from_bytes(b: [u8; 8]) -> Self {
        InputEvent {
            kind: u16::from_le_bytes([b[0], b[1]]),
            code: u16::from_le_bytes([b[2], b[3]]),
            value: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    fn is_syn_report(self) -> bool {
        self.kind == EV_SYN && self.code == SYN_REPORT
    }
}

/// Why host input was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    /// The guest has not read the events queued before (its driver is not
    /// running or stopped reading): the new ones are refused whole, so
    /// the guest never sees half a report.
    #[error("{pending} input events wait for the guest already; {refused} more refused")]
    QueueFull { pending: usize, refused: usize },
}

/// Events waiting for the guest, shared by the device and its handles.
#[derive(Debug)]
pub(crate) struct EventQueue {
    pub(crate) events: Mutex<VecDeque<InputEvent>>,
    /// Fires when events were queued; the worker then fills buffers.
    pub(crate) ready: EventFd,
}

impl EventQueue {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(EventQueue {
            events: Mutex::new(VecDeque::new()),
            ready: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<InputEvent>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The host's side of an input device: what a VNC client (or anything
/// else) types and points goes in here. Cheap to clone; every clone feeds
/// the same device.
#[derive(Debug, Clone)]
pub struct InputHandle {
    pub(crate) queue: Arc<EventQueue>,
}

impl InputHandle {
    /// Queues one report for the guest: `events`, then a SYN_REPORT
    /// unless `events` ends with one. All or nothing: when the queue
    /// cannot take the whole report (more than [`EVENT_LIMIT`] events
    /// would wait) it is refused and nothing is queued. An empty slice
    /// queues nothing.
    pub fn send(&self, events: &[InputEvent]) -> Result<(), InputError> {
        if events.is_empty() {
            return Ok(());
        }
        let syn = !events.last().is_some_and(|e| e.is_syn_report());
        let n = events.len() + usize::from(syn);
        let mut pending = self.queue.lock();
        if pending.len().saturating_add(n) > EVENT_LIMIT {
            return Err(InputError::QueueFull {
                pending: pending.len(),
                refused: n,
            });
        }
        pending.extend(events.iter().copied());
        if syn {
            pending.push_back(InputEvent::syn());
        }
        drop(pending);
        let _ = self.queue.ready.write(1);
        Ok(())
    }

    /// A key (Linux key code, e.g. 30 = KEY_A) pressed or released.
    pub fn key(&self, code: u16, pressed: bool) -> Result<(), InputError> {
        self.send(&[InputEvent::new(EV_KEY, code, u32::from(pressed))])
    }

    /// The tablet's state: absolute position (each `0..=ABS_MAX_COORD`,
    /// clamped), buttons (bit 0 left, bit 1 middle, bit 2 right, as RFB
    /// numbers them) and wheel clicks (positive = up) since the last
    /// report. Buttons are sent in every report; the guest's input core
    /// drops the ones that did not change.
    pub fn pointer(&self, x: u32, y: u32, buttons: u8, wheel: i32) -> Result<(), InputError> {
        let mut events = vec![
            InputEvent::new(EV_ABS, ABS_X, x.min(ABS_MAX_COORD)),
            InputEvent::new(EV_ABS, ABS_Y, y.min(ABS_MAX_COORD)),
            InputEvent::new(EV_KEY, BTN_LEFT, u32::from(buttons & 1)),
            InputEvent::new(EV_KEY, BTN_MIDDLE, u32::from(buttons >> 1 & 1)),
            InputEvent::new(EV_KEY, BTN_RIGHT, u32::from(buttons >> 2 & 1)),
        ];
        if wheel != 0 {
            // The value is the signed count as its 32 bits.
            events.push(InputEvent::new(
                EV_REL,
                REL_WHEEL,
                u32::from_ne_bytes(wheel.to_ne_bytes()),
            ));
        }
        self.send(&events)
    }

    /// How many events wait for the guest.
    pub fn pending(&self) -> usize {
        self.queue.lock().len()
    }
}
