//! RFB messages: the client's, decoded from bytes without trusting them,
//! and the server's, encoded. Decoding is a pure function over a buffer
//! ([`decode_client_message`]), so the fuzzer and the tests drive it
//! without a socket.

use crate::display::MAX_CUT_TEXT;

/// Encodings and pseudo-encodings (RFC 6143 7.7, 7.8).
pub const ENC_RAW: i32 = 0;
pub const ENC_ZRLE: i32 = 16;
pub const ENC_DESKTOP_SIZE: i32 = -223;
pub const ENC_EXTENDED_DESKTOP_SIZE: i32 = -308;

/// Most encodings a SetEncodings may list (clients send a few dozen).
pub const MAX_ENCODINGS: usize = 1024;
/// Most screens a SetDesktopSize may describe.
pub const MAX_SCREENS: usize = 16;

/// How the client wants pixels (RFC 6143 7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

impl PixelFormat {
    /// The server's own: 32 bits, depth 24, little endian, `0x00RRGGBB`.
    pub const NATIVE: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = u8::from(self.true_colour);
        b[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        b[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        b[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        b[10] = self.red_shift;
        b[11] = self.green_shift;
        b[12] = self.blue_shift;
        b
    }

    /// A client's format, if the server can produce it: true colour at 8,
    /// 16 or 32 bits per pixel, every channel inside the pixel.
    pub fn from_bytes(b: &[u8; 16]) -> Result<Self, ProtocolError> {
        let pf = PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16::from_be_bytes([b[4], b[5]]),
            green_max: u16::from_be_bytes([b[6], b[7]]),
            blue_max: u16::from_be_bytes([b[8], b[9]]),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        };
        if !matches!(pf.bits_per_pixel, 8 | 16 | 32) {
            return Err(ProtocolError::PixelFormat("bits per pixel not 8, 16 or 32"));
        }
        if !pf.true_colour {
            return Err(ProtocolError::PixelFormat("colour maps are not supported"));
        }
        let fits = |max: u16, shift: u8| {
            let bits = 16 - max.leading_zeros();
            u32::from(shift) + bits <= u32::from(pf.bits_per_pixel)
        };
        if !fits(pf.red_max, pf.red_shift)
            || !fits(pf.green_max, pf.green_shift)
            || !fits(pf.blue_max, pf.blue_shift)
        {
            return Err(ProtocolError::PixelFormat(
                "a channel lies outside the pixel",
            ));
        }
        Ok(pf)
    }

    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }
}

/// One screen of an ExtendedDesktopSize layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Screen {
    pub id: u32,
    pub x: u16,
    pub y: u16,
    pub width: u16,
    pub height: u16,
    pub flags: u32,
}

/// A message from the client (RFC 6143 7.5; SetDesktopSize from the
/// ExtendedDesktopSize extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    SetPixelFormat(PixelFormat),
    SetEncodings(Vec<i32>),
    FramebufferUpdateRequest {
        incremental: bool,
        x: u16,
        y: u16,
        width: u16,
        height: u16,
    },
    KeyEvent {
        down: bool,
        keysym: u32,
    },
    PointerEvent {
        buttons: u8,
        x: u16,
        y: u16,
    },
    /// Latin-1 text.
    ClientCutText(Vec<u8>),
    SetDesktopSize {
        width: u16,
        height: u16,
        screens: Vec<Screen>,
    },
}

/// Why a client's bytes are refused; the client is disconnected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("unknown client message type {0}")]
    UnknownMessage(u8),
    #[error("unusable pixel format: {0}")]
    PixelFormat(&'static str),
    #[error("{0} encodings listed, more than {MAX_ENCODINGS}")]
    TooManyEncodings(usize),
    #[error("clipboard text of {0} bytes, more than {MAX_CUT_TEXT}")]
    CutTextTooLong(u32),
    #[error("a desktop size with {0} screens (1 to {MAX_SCREENS})")]
    Screens(usize),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Decodes the client message at the start of `buf`: `Ok(None)` if more
/// bytes are needed, else the message and the bytes it took. Never reads
/// past `buf` or allocates more than the limits above.
pub fn decode_client_message(buf: &[u8]) -> Result<Option<(ClientMessage, usize)>, ProtocolError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    // The fixed part's length (type byte included).
    let fixed = match kind {
        0 => 20,
        2 => 4,
        3 => 10,
        4 => 8,
        5 => 6,
        6 => 8,
        251 => 8,
        other => return Err(ProtocolError::UnknownMessage(other)),
    };
    if buf.len() < fixed {
        return Ok(None);
    }
    let message = match kind {
        0 => {
            let pf: &[u8; 16] = buf[4..20]
                .try_into()
                .map_err(|_| ProtocolError::UnknownMessage(0))?;
            (
                ClientMessage::SetPixelFormat(PixelFormat::from_bytes(pf)?),
                20,
            )
        }
        2 => {
            let n = usize::from(be16(buf, 2));
            if n > MAX_ENCODINGS {
                return Err(ProtocolError::TooManyEncodings(n));
            }
            let total = 4 + n * 4;
            if buf.len() < total {
                return Ok(None);
            }
            let list = buf[4..total]
                .chunks_exact(4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (ClientMessage::SetEncodings(list), total)
        }
        3 => (
            ClientMessage::FramebufferUpdateRequest {
                incremental: buf[1] != 0,
                x: be16(buf, 2),
                y: be16(buf, 4),
                width: be16(buf, 6),
                height: be16(buf, 8),
            },
            10,
        ),
        4 => (
            ClientMessage::KeyEvent {
                down: buf[1] != 0,
                keysym: be32(buf, 4),
            },
            8,
        ),
        5 => (
            ClientMessage::PointerEvent {
                buttons: buf[1],
                x: be16(buf, 2),
                y: be16(buf, 4),
            },
            6,
        ),
        6 => {
            let len = be32(buf, 4);
            // A negative length (top bit) is the extended clipboard,
            // which the server does not offer.
            if len as usize > MAX_CUT_TEXT {
                return Err(ProtocolError::CutTextTooLong(len));
            }
            let total = 8 + len as usize;
            if buf.len() < total {
                return Ok(None);
            }
            (ClientMessage::ClientCutText(buf[8..total].to_vec()), total)
        }
        _ => {
            // 251: SetDesktopSize.
            let n = usize::from(buf[6]);
            if n == 0 || n > MAX_SCREENS {
                return Err(ProtocolError::Screens(n));
            }
            let total = 8 + n * 16;
            if buf.len() < total {
                return Ok(None);
            }
            let screens = buf[8..total]
                .chunks_exact(16)
                .map(|s| Screen {
                    id: be32(s, 0),
                    x: be16(s, 4),
                    y: be16(s, 6),
                    width: be16(s, 8),
                    height: be16(s, 10),
                    flags: be32(s, 12),
                })
                .collect();
            (
                ClientMessage::SetDesktopSize {
                    width: be16(buf, 2),
                    height: be16(buf, 4),
                    screens,
                },
                total,
            )
        }
    };
    Ok(Some(message))
}

/// A FramebufferUpdate's header for `rects` rectangles.
pub fn update_header(rects: u16) -> [u8; 4] {
    let r = rects.to_be_bytes();
    [0, 0, r[0], r[1]]
}

/// A rectangle's header.
pub fn rect_header(x: u16, y: u16, width: u16, height: u16, encoding: i32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&x.to_be_bytes());
    b[2..4].copy_from_slice(&y.to_be_bytes());
    b[4..6].copy_from_slice(&width.to_be_bytes());
    b[6..8].copy_from_slice(&height.to_be_bytes());
    b[8..12].copy_from_slice(&encoding.to_be_bytes());
    b
}

/// An ExtendedDesktopSize rectangle: `reason` in x (0 = the server
/// changed, 1 = this client asked, 2 = another client asked), `status` in
/// y, one screen covering the whole display.
pub fn extended_desktop_size(reason: u16, status: u16, width: u16, height: u16) -> Vec<u8> {
    let mut b = rect_header(reason, status, width, height, ENC_EXTENDED_DESKTOP_SIZE).to_vec();
    b.extend_from_slice(&[1, 0, 0, 0]);
    let screen = Screen {
        id: 0,
        x: 0,
        y: 0,
        width,
        height,
        flags: 0,
    };
    b.extend_from_slice(&screen.id.to_be_bytes());
    b.extend_from_slice(&screen.x.to_be_bytes());
    b.extend_from_slice(&screen.y.to_be_bytes());
    b.extend_from_slice(&screen.width.to_be_bytes());
    b.extend_from_slice(&screen.height.to_be_bytes());
    b.extend_from_slice(&screen.flags.to_be_bytes());
    b
}

/// ServerCutText with Latin-1 `text`.
pub fn server_cut_text(text: &[u8]) -> Vec<u8> {
    let mut b = vec![3, 0, 0, 0];
    b.extend_from_slice(&crate::display::len_u32(text.len()).to_be_bytes());
    b.extend_from_slice(text);
    b
}

/// ServerInit: the screen size, the server's pixel format and its name.
pub fn server_init(width: u16, height: u16, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(24 + name.len());
    b.extend_from_slice(&width.to_be_bytes());
    b.extend_from_slice(&height.to_be_bytes());
    b.extend_from_slice(&PixelFormat::NATIVE.to_bytes());
    b.extend_from_slice(&crate::display::len_u32(name.len()).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_decode_and_wait_for_their_bytes() {
        let mut m = vec![0u8, 0, 0, 0];
        m.extend_from_slice(&PixelFormat::NATIVE.to_bytes());
        assert_eq!(
            decode_client_message(&m).unwrap(),
            Some((ClientMessage::SetPixelFormat(PixelFormat::NATIVE), 20))
        );
        assert_eq!(decode_client_message(&m[..19]).unwrap(), None);
        let enc = [2u8, 0, 0, 2, 0, 0, 0, 16, 0xff, 0xff, 0xfe, 0xcc];
        assert_eq!(
            decode_client_message(&enc).unwrap(),
            Some((ClientMessage::SetEncodings(vec![16, -308]), 12))
        );
        assert_eq!(decode_client_message(&enc[..11]).unwrap(), None);
        let key = [4u8, 1, 0, 0, 0, 0, 0xff, 0x0d, 99];
        assert_eq!(
            decode_client_message(&key).unwrap(),
            Some((
                ClientMessage::KeyEvent {
                    down: true,
                    keysym: 0xff0d
                },
                8
            ))
        );
        let ptr = [5u8, 9, 1, 0, 0, 2];
        assert_eq!(
            decode_client_message(&ptr).unwrap(),
            Some((
                ClientMessage::PointerEvent {
                    buttons: 9,
                    x: 256,
                    y: 2
                },
                6
            ))
        );
        let cut = [6u8, 0, 0, 0, 0, 0, 0, 2, b'h', b'i'];
        assert_eq!(
            decode_client_message(&cut).unwrap(),
            Some((ClientMessage::ClientCutText(b"hi".to_vec()), 10))
        );
        let mut size = vec![251u8, 0, 4, 0, 3, 0, 1, 0];
        size.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 3, 0, 0, 0, 0, 0]);
        let (msg, n) = decode_client_message(&size).unwrap().unwrap();
        assert_eq!(n, 24);
        assert!(matches!(
            msg,
            ClientMessage::SetDesktopSize {
                width: 1024,
                height: 768,
                ..
            }
        ));
        assert_eq!(decode_client_message(&[]).unwrap(), None);
    }

    #[test]
    fn malformed_messages_are_refused() {
        assert_eq!(
            decode_client_message(&[7]),
            Err(ProtocolError::UnknownMessage(7))
        );
        assert!(matches!(
            decode_client_message(&[2, 0, 0xff, 0xff]),
            Err(ProtocolError::TooManyEncodings(65535))
        ));
        assert!(matches!(
            decode_client_message(&[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xfe]),
            Err(ProtocolError::CutTextTooLong(_))
        ));
        assert!(matches!(
            decode_client_message(&[251, 0, 1, 0, 1, 0, 0, 0]),
            Err(ProtocolError::Screens(0))
        ));
        let mut pf = PixelFormat::NATIVE.to_bytes();
        pf[0] = 24;
        assert!(PixelFormat::from_bytes(&pf).is_err());
        let mut pf = PixelFormat::NATIVE.to_bytes();
        pf[3] = 0;
        assert!(PixelFormat::from_bytes(&pf).is_err());
        let mut pf = PixelFormat::NATIVE.to_bytes();
        pf[10] = 30;
        assert!(PixelFormat::from_bytes(&pf).is_err(), "red beyond 32 bits");
    }
}
