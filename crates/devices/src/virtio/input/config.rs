//! virtio-input's config space: the driver writes `select` and `subsel`,
//! then reads `size` and the answer in the union after them (virtio 1.2,
//! 5.8.4). What Linux's virtio_input driver asks at probe: ID_NAME,
//! ID_SERIAL, ID_DEVIDS, PROP_BITS, EV_BITS for each event type (a
//! non-zero size for EV_REP alone turns key repeat on), and ABS_INFO for
//! each axis EV_BITS(EV_ABS) offered. A selection the device does not
//! answer has size 0.

use super::events::{
    ABS_MAX_COORD, ABS_X, ABS_Y, BTN_LEFT, BTN_MIDDLE, BTN_RIGHT, EV_ABS, EV_KEY, EV_LED, EV_REL,
    EV_REP, KEY_F13, KEY_F24, KEY_MAX_KEYBOARD, LED_CAPSL, LED_NUML, LED_SCROLLL, REL_WHEEL,
};

pub const CFG_UNSET: u8 = 0x00;
pub const CFG_ID_NAME: u8 = 0x01;
pub const CFG_ID_SERIAL: u8 = 0x02;
pub const CFG_ID_DEVIDS: u8 = 0x03;
pub const CFG_PROP_BITS: u8 = 0x10;
pub const CFG_EV_BITS: u8 = 0x11;
pub const CFG_ABS_INFO: u8 = 0x12;

/// Offset of the union in the config space, and its size.
pub const PAYLOAD_OFFSET: usize = 8;
pub const PAYLOAD_SIZE: usize = 128;
/// The whole config space: select, subsel, size, 5 reserved, the union.
pub const CONFIG_SIZE: usize = PAYLOAD_OFFSET + PAYLOAD_SIZE;

/// BUS_VIRTUAL (linux/input.h).
const BUS_VIRTUAL: u16 = 0x06;

/// Which device the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    /// A keyboard: the usual keys, auto-repeat, and the three LEDs whose
    /// state the guest sends on the status queue.
    Keyboard,
    /// An absolute pointer: ABS_X/ABS_Y over `0..=32767`, three buttons
    /// and a wheel (REL_WHEEL), so the guest's pointer follows a viewer's
    /// without grabbing it.
    Tablet,
}

/// One axis's `struct virtio_input_absinfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbsInfo {
    pub min: u32,
    pub max: u32,
    pub fuzz: u32,
    pub flat: u32,
    pub res: u32,
}

/// What a device of a kind answers.
#[derive(Debug, Clone)]
pub(crate) struct InputConfig {
    name: &'static str,
    serial: &'static str,
    product: u16,
    /// Per event type, the codes offered.
    ev_bits: Vec<(u16, Vec<u16>)>,
    abs: Vec<(u16, AbsInfo)>,
}

impl InputConfig {
    pub(crate) fn new(kind: InputKind) -> Self {
        match kind {
            InputKind::Keyboard => {
                let keys = (1..=KEY_MAX_KEYBOARD).chain(KEY_F13..=KEY_F24).collect();
                InputConfig {
                    name: "hostvisor virtio keyboard",
                    serial: "hostvisor-keyboard",
                    product: 1,
                    ev_bits: vec![
                        (EV_KEY, keys),
                        (EV_LED, vec![LED_NUML, LED_CAPSL, LED_SCROLLL]),
                        // Present with no codes: the driver turns on
                        // auto-repeat when EV_REP has a size.
                        (EV_REP, vec![]),
                    ],
                    abs: vec![],
                }
            }
            InputKind::Tablet => {
                let axis = AbsInfo {
                    min: 0,
                    max: ABS_MAX_COORD,
                    fuzz: 0,
                    flat: 0,
                    res: 0,
                };
                InputConfig {
                    name: "hostvisor virtio tablet",
                    serial: "hostvisor-tablet",
                    product: 2,
                    ev_bits: vec![
                        (EV_KEY, vec![BTN_LEFT, BTN_RIGHT, BTN_MIDDLE]),
                        (EV_REL, vec![REL_WHEEL]),
                        (EV_ABS, vec![ABS_X, ABS_Y]),
                    ],
                    abs: vec![(ABS_X, axis), (ABS_Y, axis)],
                }
            }
        }
    }

    /// The answer to (`select`, `subsel`): its payload, whose length is
    /// the `size` field (0 = nothing to say).
    pub(crate) fn answer(&self, select: u8, subsel: u8) -> Vec<u8> {
        match select {
            CFG_ID_NAME if subsel == 0 => self.name.as_bytes().to_vec(),
            CFG_ID_SERIAL if subsel == 0 => self.serial.as_bytes().to_vec(),
            CFG_ID_DEVIDS if subsel == 0 => [BUS_VIRTUAL, 0, self.product, 1]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            // No input properties: a plain keyboard, a pointer (not a
            // touch screen).
            CFG_PROP_BITS => Vec::new(),
            CFG_EV_BITS => {
                let Some((_, codes)) = self.ev_bits.iter().find(|(t, _)| *t == u16::from(subsel))
                else {
                    return Vec::new();
                };
                bitmap(codes)
            }
            CFG_ABS_INFO => self
                .abs
                .iter()
                .find(|(axis, _)| *axis == u16::from(subsel))
                .map(|(_, a)| {
                    [a.min, a.max, a.fuzz, a.flat, a.res]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// The config space image with `select` and `subsel` chosen.
    pub(crate) fn image(&self, select: u8, subsel: u8) -> [u8; CONFIG_SIZE] {
        let mut image = [0u8; CONFIG_SIZE];
        let answer = self.answer(select, subsel);
        let n = answer.len().min(PAYLOAD_SIZE);
        image[0] = select;
        image[1] = subsel;
        image[2] = u8::try_from(n).unwrap_or(u8::MAX);
        image[PAYLOAD_OFFSET..PAYLOAD_OFFSET + n].copy_from_slice(&answer[..n]);
        image
    }
}

/// A bitmap with bit `c` set for each code; as long as its highest byte
/// with a bit (a type with no codes still answers one zero byte, so that
/// its size is not 0).
fn bitmap(codes: &[u16]) -> Vec<u8> {
    let mut bits = vec![0u8; PAYLOAD_SIZE];
    for &c in codes {
        if let Some(byte) = bits.get_mut(usize::from(c / 8)) {
            *byte |= 1 << (c % 8);
        }
    }
    let len = bits.iter().rposition(|b| *b != 0).map_or(1, |i| i + 1);
    bits.truncate(len);
    bits
}
