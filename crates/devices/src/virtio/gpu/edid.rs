//! An EDID 1.4 base block for a virtual monitor whose preferred (and
//! native) mode is the scanout's current size: the guest's DRM driver
//! reads it (GET_EDID) and offers that mode first.

/// The size of an EDID base block.
pub const EDID_LEN: usize = 128;
/// The largest width or height a detailed timing descriptor holds
/// (12 bits).
pub const MAX_EDID_DIM: u32 = 4095;

/// Horizontal blanking: front porch, sync, back porch (CVT reduced
/// blanking's proportions).
const H_FRONT: u32 = 48;
const H_SYNC: u32 = 32;
const H_BLANK: u32 = 160;
/// Vertical blanking: front porch, sync, total.
const V_FRONT: u32 = 3;
const V_SYNC: u32 = 5;
const V_BLANK: u32 = 23;
/// The refresh rate offered when the pixel clock allows it.
const REFRESH_HZ: u64 = 60;

/// The EDID for a `width`×`height` monitor (each clamped to 1..=4095).
pub fn edid(width: u32, height: u32) -> [u8; EDID_LEN] {
    let w = width.clamp(1, MAX_EDID_DIM);
    let h = height.clamp(1, MAX_EDID_DIM);
    let mut e = [0u8; EDID_LEN];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Manufacturer "HVS": three 5-bit letters, big-endian.
    let id = letters(*b"HVS");
    e[8..10].copy_from_slice(&id.to_be_bytes());
    e[10..12].copy_from_slice(&0x0001u16.to_le_bytes()); // product code
    e[16] = 0xff; // the year below is a model year
    e[17] = 36; // 2026 - 1990
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0xa0; // digital input, 8 bits per colour
                  // The screen size in cm at 96 dots per inch.
    let (w_mm, h_mm) = (mm(w), mm(h));
    e[21] = u8::try_from((w_mm / 10).clamp(1, 255)).unwrap_or(255);
    e[22] = u8::try_from((h_mm / 10).clamp(1, 255)).unwrap_or(255);
    e[23] = 120; // gamma 2.2
                 // sRGB is the default colour space, the preferred timing is native,
                 // RGB 4:4:4.
    e[24] = 0x06;
    // The sRGB primaries and white point.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    // No established timings; the eight standard timings unused.
    e[38..54].fill(0x01);
    e[54..72].copy_from_slice(&detailed_timing(w, h, w_mm, h_mm));
    e[72..90].copy_from_slice(&text_descriptor(0xfc, b"hostvisor"));
    e[90..108].copy_from_slice(&text_descriptor(0xff, b"0"));
    // Descriptor 4: dummy (tag 0x10).
    e[111] = 0x10;
    e[126] = 0; // no extension blocks
    let sum = e[..127].iter().fold(0u8, |s, b| s.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

fn letters(l: [u8; 3]) -> u16 {
    l.iter().fold(0u16, |v, c| {
        (v << 5) | u16::from(c.saturating_sub(b'@') & 0x1f)
    })
}

/// Millimetres at 96 dpi.
fn mm(px: u32) -> u32 {
    px * 254 / 960
}

/// The detailed timing descriptor of the preferred mode: reduced
/// blanking, 60 Hz or the highest rate whose pixel clock fits the field
/// (655.35 MHz).
fn detailed_timing(w: u32, h: u32, w_mm: u32, h_mm: u32) -> [u8; 18] {
    let total = u64::from(w + H_BLANK) * u64::from(h + V_BLANK);
    let clock_10khz = (total * REFRESH_HZ).div_ceil(10_000).clamp(1, 0xffff);
    let mut d = [0u8; 18];
    d[0..2].copy_from_slice(&u16::try_from(clock_10khz).unwrap_or(0xffff).to_le_bytes());
    let lo = |v: u32| u8::try_from(v & 0xff).unwrap_or(0);
    let hi = |v: u32| u8::try_from((v >> 8) & 0xf).unwrap_or(0);
    d[2] = lo(w);
    d[3] = lo(H_BLANK);
    d[4] = (hi(w) << 4) | hi(H_BLANK);
    d[5] = lo(h);
    d[6] = lo(V_BLANK);
    d[7] = (hi(h) << 4) | hi(V_BLANK);
    d[8] = lo(H_FRONT);
    d[9] = lo(H_SYNC);
    d[10] = (lo(V_FRONT & 0xf) << 4) | lo(V_SYNC & 0xf);
    // The high bits of the porches and syncs are all zero here.
    d[11] = 0;
    d[12] = lo(w_mm);
    d[13] = lo(h_mm);
    d[14] = (hi(w_mm) << 4) | hi(h_mm);
    // Digital separate sync, both polarities positive.
    d[17] = 0x1e;
    d
}

/// A display descriptor holding text (`tag` 0xfc: the monitor's name,
/// 0xff: its serial number).
fn text_descriptor(tag: u8, text: &[u8]) -> [u8; 18] {
    let mut d = [0u8; 18];
    d[3] = tag;
    let body = &mut d[5..];
    body.fill(b' ');
    let n = text.len().min(12);
    body[..n].copy_from_slice(&text[..n]);
    body[n] = b'\n';
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field12(lo: u8, hi_nibble: u8) -> u32 {
        u32::from(lo) | (u32::from(hi_nibble) << 8)
    }

    #[test]
    fn the_block_is_valid_and_prefers_the_mode() {
        for (w, h) in [
            (1280, 800),
            (1024, 768),
            (3840, 2160),
            (32, 32),
            (4095, 4095),
        ] {
            let e = edid(w, h);
            assert_eq!(&e[..8], &[0, 255, 255, 255, 255, 255, 255, 0]);
            assert_eq!(e.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0, "checksum");
            assert_eq!((e[18], e[19]), (1, 4));
            assert_ne!(e[24] & 0x02, 0, "the first timing is preferred");
            let d = &e[54..72];
            assert_ne!(
                u16::from_le_bytes([d[0], d[1]]),
                0,
                "a timing, not a display descriptor"
            );
            assert_eq!(field12(d[2], d[4] >> 4), w, "width");
            assert_eq!(field12(d[5], d[7] >> 4), h, "height");
            assert_eq!(&e[72..77], &[0, 0, 0, 0xfc, 0]);
            assert_eq!(&e[77..87], b"hostvisor\n");
        }
        // Manufacturer "HVS".
        let e = edid(1280, 800);
        let id = u16::from_be_bytes([e[8], e[9]]);
        let l = |s: u16| char::from(b'@' + u8::try_from((id >> s) & 0x1f).unwrap());
        assert_eq!((l(10), l(5), l(0)), ('H', 'V', 'S'));
        // 60 Hz at 1280x800: (1440 x 823 x 60) / 10 kHz, rounded up.
        assert_eq!(u16::from_le_bytes([e[54], e[55]]), 7111);
    }

    #[test]
    fn sizes_beyond_the_field_are_clamped() {
        let e = edid(100_000, 0);
        assert_eq!(field12(e[56], e[58] >> 4), MAX_EDID_DIM);
        assert_eq!(field12(e[59], e[61] >> 4), 1);
        assert_eq!(e.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
    }
}
