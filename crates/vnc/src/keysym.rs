//! X keysyms (what RFB's KeyEvent carries) to Linux evdev key codes, for
//! a US keyboard. A keysym that a US keyboard types with Shift ('A', '!',
//! '{') says so, and the session presses Shift around it when the viewer
//! did not hold Shift itself.

/// Linux key codes used here (linux/input-event-codes.h).
pub mod code {
    pub const ESC: u16 = 1;
    pub const MINUS: u16 = 12;
    pub const EQUAL: u16 = 13;
    pub const BACKSPACE: u16 = 14;
    pub const TAB: u16 = 15;
    pub const LEFTBRACE: u16 = 26;
    pub const RIGHTBRACE: u16 = 27;
    pub const ENTER: u16 = 28;
    pub const LEFTCTRL: u16 = 29;
    pub const SEMICOLON: u16 = 39;
    pub const APOSTROPHE: u16 = 40;
    pub const GRAVE: u16 = 41;
    pub const LEFTSHIFT: u16 = 42;
    pub const BACKSLASH: u16 = 43;
    pub const COMMA: u16 = 51;
    pub const DOT: u16 = 52;
    pub const SLASH: u16 = 53;
    pub const RIGHTSHIFT: u16 = 54;
    pub const KPASTERISK: u16 = 55;
    pub const LEFTALT: u16 = 56;
    pub const SPACE: u16 = 57;
    pub const CAPSLOCK: u16 = 58;
    pub const F1: u16 = 59;
    pub const NUMLOCK: u16 = 69;
    pub const SCROLLLOCK: u16 = 70;
    pub const KP7: u16 = 71;
    pub const KP8: u16 = 72;
    pub const KP9: u16 = 73;
    pub const KPMINUS: u16 = 74;
    pub const KP4: u16 = 75;
    pub const KP5: u16 = 76;
    pub const KP6: u16 = 77;
    pub const KPPLUS: u16 = 78;
    pub const KP1: u16 = 79;
    pub const KP2: u16 = 80;
    pub const KP3: u16 = 81;
    pub const KP0: u16 = 82;
    pub const KPDOT: u16 = 83;
    pub const F11: u16 = 87;
    pub const F12: u16 = 88;
    pub const KPENTER: u16 = 96;
    pub const RIGHTCTRL: u16 = 97;
    pub const KPSLASH: u16 = 98;
    pub const SYSRQ: u16 = 99;
    pub const RIGHTALT: u16 = 100;
    pub const HOME: u16 = 102;
    pub const UP: u16 = 103;
    pub const PAGEUP: u16 = 104;
    pub const LEFT: u16 = 105;
    pub const RIGHT: u16 = 106;
    pub const END: u16 = 107;
    pub const DOWN: u16 = 108;
    pub const PAGEDOWN: u16 = 109;
    pub const INSERT: u16 = 110;
    pub const DELETE: u16 = 111;
    pub const KPEQUAL: u16 = 117;
    pub const PAUSE: u16 = 119;
    pub const KPCOMMA: u16 = 121;
    pub const LEFTMETA: u16 = 125;
    pub const RIGHTMETA: u16 = 126;
    pub const COMPOSE: u16 = 127;
    pub const F13: u16 = 183;
}

/// A key and whether a US keyboard needs Shift held to type the keysym.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub code: u16,
    pub shift: bool,
}

const fn key(code: u16) -> Option<Key> {
    Some(Key { code, shift: false })
}

const fn shifted(code: u16) -> Option<Key> {
    Some(Key { code, shift: true })
}

/// The letters' key codes, a to z (the keyboard's rows are not in order).
const LETTERS: [u16; 26] = [
    30, 48, 46, 32, 18, 33, 34, 35, 23, 36, 37, 38, 50, 49, 24, 25, 16, 19, 31, 20, 22, 47, 17, 45,
    21, 44,
];

/// Whether the keysym is a Shift key (the session tracks them).
pub fn is_shift(keysym: u32) -> bool {
    matches!(keysym, 0xffe1 | 0xffe2)
}

/// The key that types `keysym` on a US keyboard, or None for a keysym it
/// has no key for (it is ignored).
pub fn to_key(keysym: u32) -> Option<Key> {
    use code::*;
    let ascii = u8::try_from(keysym).ok().filter(|_| keysym < 0x80);
    if let Some(c) = ascii {
        return ascii_key(c);
    }
    match keysym {
        0xff08 => key(BACKSPACE),
        0xff09 | 0xfe20 => key(TAB), // Tab, ISO_Left_Tab (Shift+Tab)
        0xff0d => key(ENTER),
        0xff13 => key(PAUSE),
        0xff14 => key(SCROLLLOCK),
        0xff15 | 0xff61 => key(SYSRQ), // Sys_Req, Print
        0xff1b => key(ESC),
        0xff50 => key(HOME),
        0xff51 => key(LEFT),
        0xff52 => key(UP),
        0xff53 => key(RIGHT),
        0xff54 => key(DOWN),
        0xff55 => key(PAGEUP),
        0xff56 => key(PAGEDOWN),
        0xff57 => key(END),
        0xff63 => key(INSERT),
        0xff67 => key(COMPOSE), // Menu
        0xff7f => key(NUMLOCK),
        0xff80 => key(SPACE), // KP_Space
        0xff89 => key(TAB),   // KP_Tab
        0xff8d => key(KPENTER),
        0xff95 => key(KP7),   // KP_Home
        0xff96 => key(KP4),   // KP_Left
        0xff97 => key(KP8),   // KP_Up
        0xff98 => key(KP6),   // KP_Right
        0xff99 => key(KP2),   // KP_Down
        0xff9a => key(KP9),   // KP_Prior
        0xff9b => key(KP3),   // KP_Next
        0xff9c => key(KP1),   // KP_End
        0xff9d => key(KP5),   // KP_Begin
        0xff9e => key(KP0),   // KP_Insert
        0xff9f => key(KPDOT), // KP_Delete
        0xffaa => key(KPASTERISK),
        0xffab => key(KPPLUS),
        0xffac => key(KPCOMMA),
        0xffad => key(KPMINUS),
        0xffae => key(KPDOT),
        0xffaf => key(KPSLASH),
        0xffb0 => key(KP0),
        0xffb1 => key(KP1),
        0xffb2 => key(KP2),
        0xffb3 => key(KP3),
        0xffb4 => key(KP4),
        0xffb5 => key(KP5),
        0xffb6 => key(KP6),
        0xffb7 => key(KP7),
        0xffb8 => key(KP8),
        0xffb9 => key(KP9),
        0xffbd => key(KPEQUAL),
        // F1..F10 are 59..68, F11 and F12 elsewhere, F13..F24 183..194.
        0xffbe..=0xffc7 => key(F1 + (keysym - 0xffbe) as u16),
        0xffc8 => key(F11),
        0xffc9 => key(F12),
        0xffca..=0xffd5 => key(F13 + (keysym - 0xffca) as u16),
        0xffe1 => key(LEFTSHIFT),
        0xffe2 => key(RIGHTSHIFT),
        0xffe3 => key(LEFTCTRL),
        0xffe4 => key(RIGHTCTRL),
        0xffe5 => key(CAPSLOCK),
        0xffe7 | 0xffeb => key(LEFTMETA), // Meta_L, Super_L
        0xffe8 | 0xffec => key(RIGHTMETA),
        0xffe9 => key(LEFTALT),
        0xffea | 0xfe03 => key(RIGHTALT), // Alt_R, ISO_Level3_Shift (AltGr)
        0xffff => key(DELETE),
        _ => None,
    }
}

/// ASCII on a US keyboard.
fn ascii_key(c: u8) -> Option<Key> {
    use code::*;
    match c {
        b'a'..=b'z' => key(LETTERS[usize::from(c - b'a')]),
        b'A'..=b'Z' => shifted(LETTERS[usize::from(c - b'A')]),
        // KEY_1..KEY_9 are 2..10, KEY_0 is 11.
        b'1'..=b'9' => key(u16::from(c - b'1') + 2),
        b'0' => key(11),
        b' ' => key(SPACE),
        b'-' => key(MINUS),
        b'=' => key(EQUAL),
        b'[' => key(LEFTBRACE),
        b']' => key(RIGHTBRACE),
        b';' => key(SEMICOLON),
        b'\'' => key(APOSTROPHE),
        b'`' => key(GRAVE),
        b'\\' => key(BACKSLASH),
        b',' => key(COMMA),
        b'.' => key(DOT),
        b'/' => key(SLASH),
        b'!' => shifted(2),
        b'@' => shifted(3),
        b'#' => shifted(4),
        b'$' => shifted(5),
        b'%' => shifted(6),
        b'^' => shifted(7),
        b'&' => shifted(8),
        b'*' => shifted(9),
        b'(' => shifted(10),
        b')' => shifted(11),
        b'_' => shifted(MINUS),
        b'+' => shifted(EQUAL),
        b'{' => shifted(LEFTBRACE),
        b'}' => shifted(RIGHTBRACE),
        b':' => shifted(SEMICOLON),
        b'"' => shifted(APOSTROPHE),
        b'~' => shifted(GRAVE),
        b'|' => shifted(BACKSLASH),
        b'<' => shifted(COMMA),
        b'>' => shifted(DOT),
        b'?' => shifted(SLASH),
        // Control characters some clients send for their keys.
        b'\r' | b'\n' => key(ENTER),
        b'\t' => key(TAB),
        0x08 => key(BACKSPACE),
        0x1b => key(ESC),
        0x7f => key(DELETE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_printable_ascii_character_has_a_key() {
        for c in 0x20u32..0x7f {
            assert!(to_key(c).is_some(), "{:?}", char::from_u32(c));
        }
    }

    #[test]
    fn us_layout_with_shift_where_needed() {
        let k = |s: u32| to_key(s).unwrap();
        assert_eq!(
            k('a' as u32),
            Key {
                code: 30,
                shift: false
            }
        );
        assert_eq!(
            k('A' as u32),
            Key {
                code: 30,
                shift: true
            }
        );
        assert_eq!(k('z' as u32).code, 44);
        assert_eq!(k('q' as u32).code, 16);
        assert_eq!(k('m' as u32).code, 50);
        assert_eq!(
            k('1' as u32),
            Key {
                code: 2,
                shift: false
            }
        );
        assert_eq!(
            k('!' as u32),
            Key {
                code: 2,
                shift: true
            }
        );
        assert_eq!(k('0' as u32).code, 11);
        assert_eq!(
            k(')' as u32),
            Key {
                code: 11,
                shift: true
            }
        );
        assert_eq!(
            k('?' as u32),
            Key {
                code: 53,
                shift: true
            }
        );
        assert_eq!(
            k('"' as u32),
            Key {
                code: 40,
                shift: true
            }
        );
        assert_eq!(k(0xff0d).code, code::ENTER);
        assert_eq!(k(0xffbe).code, code::F1);
        assert_eq!(k(0xffc7).code, 68, "F10");
        assert_eq!(k(0xffd5).code, 194, "F24");
        assert_eq!(k(0xffe1).code, code::LEFTSHIFT);
        assert!(is_shift(0xffe2));
        assert_eq!(to_key(0xe9), None, "é: no key on a US keyboard");
        assert_eq!(to_key(0x1234_5678), None);
    }
}
