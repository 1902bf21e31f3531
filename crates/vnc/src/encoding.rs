//! Pixels in a client's format, and the rectangle encodings: Raw and
//! ZRLE (RFC 6143 7.7.1, 7.7.6).

use flate2::{Compress, Compression, FlushCompress};

use crate::protocol::PixelFormat;

/// ZRLE's tile size.
pub const TILE: usize = 64;

/// Appends `px` (`0x00RRGGBB`) in format `pf`.
pub fn put_pixel(px: u32, pf: &PixelFormat, out: &mut Vec<u8>) {
    let value = pixel_value(px, pf);
    match (pf.bits_per_pixel, pf.big_endian) {
        (8, _) => out.push(value.to_le_bytes()[0]),
        (16, false) => out.extend_from_slice(&value.to_le_bytes()[..2]),
        (16, true) => out.extend_from_slice(&value.to_be_bytes()[2..]),
        (_, false) => out.extend_from_slice(&value.to_le_bytes()),
        (_, true) => out.extend_from_slice(&value.to_be_bytes()),
    }
}

/// `px` as a pixel value of format `pf` (not yet in bytes).
pub fn pixel_value(px: u32, pf: &PixelFormat) -> u32 {
    if *pf == PixelFormat::NATIVE {
        return px & 0x00ff_ffff;
    }
    let scale = |c: u32, max: u16| (c * u32::from(max) + 127) / 255;
    let channel = |c: u32, max: u16, shift: u8| {
        scale(c & 0xff, max)
            .checked_shl(u32::from(shift))
            .unwrap_or(0)
    };
    channel(px >> 16, pf.red_max, pf.red_shift)
        | channel(px >> 8, pf.green_max, pf.green_shift)
        | channel(px, pf.blue_max, pf.blue_shift)
}

/// Raw: every pixel, row by row.
pub fn encode_raw(pixels: &[u32], pf: &PixelFormat) -> Vec<u8> {
    let mut out = Vec::with_capacity(pixels.len() * pf.bytes_per_pixel());
    for &p in pixels {
        put_pixel(p, pf, &mut out);
    }
    out
}

/// Which bytes of a pixel ZRLE's compressed pixel (CPIXEL) keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CPixel {
    /// The whole pixel.
    Full,
    /// Three bytes: the pixel's bytes from this index.
    Three(usize),
}

fn cpixel(pf: &PixelFormat) -> CPixel {
    if pf.bits_per_pixel != 32 || !pf.true_colour || pf.depth > 24 {
        return CPixel::Full;
    }
    let mask = |max: u16, shift: u8| u32::from(max).checked_shl(u32::from(shift)).unwrap_or(0);
    let all = mask(pf.red_max, pf.red_shift)
        | mask(pf.green_max, pf.green_shift)
        | mask(pf.blue_max, pf.blue_shift);
    match (all & 0xff00_0000 == 0, all & 0xff == 0, pf.big_endian) {
        // The colour is in the low three bytes: drop the high one.
        (true, _, false) => CPixel::Three(0),
        (true, _, true) => CPixel::Three(1),
        // In the high three bytes: drop the low one.
        (false, true, false) => CPixel::Three(1),
        (false, true, true) => CPixel::Three(0),
        _ => CPixel::Full,
    }
}

fn put_cpixel(px: u32, pf: &PixelFormat, kind: CPixel, out: &mut Vec<u8>) {
    match kind {
        CPixel::Full => put_pixel(px, pf, out),
        CPixel::Three(from) => {
            let mut full = Vec::with_capacity(4);
            put_pixel(px, pf, &mut full);
            out.extend_from_slice(&full[from..from + 3]);
        }
    }
}

/// A failed compression (flate2 reported an error): the client goes.
#[derive(Debug, thiserror::Error)]
#[error("ZRLE compression failed")]
pub struct EncodeError(#[source] flate2::CompressError);

/// One client's ZRLE state: its zlib stream runs across all its
/// rectangles, as RFC 6143 requires.
pub struct ZrleEncoder {
    zlib: Compress,
}

impl std::fmt::Debug for ZrleEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZrleEncoder").finish_non_exhaustive()
    }
}

impl Default for ZrleEncoder {
    fn default() -> Self {
        ZrleEncoder {
            zlib: Compress::new(Compression::fast(), true),
        }
    }
}

impl ZrleEncoder {
    /// A `width` x `height` rectangle's ZRLE data (the length, then the
    /// zlib bytes).
    pub fn encode(
        &mut self,
        pixels: &[u32],
        width: usize,
        height: usize,
        pf: &PixelFormat,
    ) -> Result<Vec<u8>, EncodeError> {
        let kind = cpixel(pf);
        let mut plain = Vec::new();
        for ty in (0..height).step_by(TILE) {
            for tx in (0..width).step_by(TILE) {
                let (tw, th) = (TILE.min(width - tx), TILE.min(height - ty));
                let tile: Vec<u32> = (ty..ty + th)
                    .flat_map(|row| &pixels[row * width + tx..row * width + tx + tw])
                    .copied()
                    .collect();
                encode_tile(&tile, tw, pf, kind, &mut plain);
            }
        }
        let zipped = deflate_sync(&mut self.zlib, &plain).map_err(EncodeError)?;
        let mut out = Vec::with_capacity(4 + zipped.len());
        out.extend_from_slice(&crate::display::len_u32(zipped.len()).to_be_bytes());
        out.extend_from_slice(&zipped);
        Ok(out)
    }
}

/// Compresses `input` and flushes to a byte boundary (Z_SYNC_FLUSH), so
/// the client can inflate the rectangle without the next one.
fn deflate_sync(z: &mut Compress, input: &[u8]) -> Result<Vec<u8>, flate2::CompressError> {
    let mut out = Vec::with_capacity(input.len() / 4 + 1024);
    let mut consumed = 0usize;
    loop {
        if out.capacity() - out.len() < 256 {
            out.reserve(out.capacity().max(4096));
        }
        let before = z.total_in();
        z.compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)?;
        consumed += usize::try_from(z.total_in() - before).unwrap_or(0);
        // Done when all input went in and the flush left room unused.
        if consumed >= input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
    }
}

/// One tile: solid, packed palette (2 to 16 colours), plain RLE or raw,
/// whichever is smallest of those that apply.
fn encode_tile(tile: &[u32], width: usize, pf: &PixelFormat, kind: CPixel, out: &mut Vec<u8>) {
    let mut palette: Vec<u32> = Vec::with_capacity(17);
    for &p in tile {
        if !palette.contains(&p) {
            palette.push(p);
            if palette.len() > 16 {
                break;
            }
        }
    }
    if palette.len() == 1 {
        out.push(1);
        put_cpixel(palette[0], pf, kind, out);
        return;
    }
    if palette.len() <= 16 {
        let n = palette.len();
        out.push(u8::try_from(n).unwrap_or(16));
        for &p in &palette {
            put_cpixel(p, pf, kind, out);
        }
        let bits = match n {
            2 => 1,
            3..=4 => 2,
            _ => 4,
        };
        for row in tile.chunks(width) {
            let (mut byte, mut used) = (0u8, 0);
            for p in row {
                let index = palette.iter().position(|q| q == p).unwrap_or(0);
                byte = (byte << bits) | u8::try_from(index).unwrap_or(0);
                used += bits;
                if used == 8 {
                    out.push(byte);
                    (byte, used) = (0, 0);
                }
            }
            if used > 0 {
                out.push(byte << (8 - used));
            }
        }
        return;
    }
    // Plain RLE if it beats raw.
    let mut rle = vec![128u8];
    let mut i = 0;
    while i < tile.len() {
        let run = tile[i..].iter().take_while(|&&p| p == tile[i]).count();
        put_cpixel(tile[i], pf, kind, &mut rle);
        let mut rest = run - 1;
        while rest >= 255 {
            rle.push(255);
            rest -= 255;
        }
        rle.push(u8::try_from(rest).unwrap_or(0));
        i += run;
    }
    let mut raw = vec![0u8];
    for &p in tile {
        put_cpixel(p, pf, kind, &mut raw);
    }
    out.extend_from_slice(if rle.len() < raw.len() { &rle } else { &raw });
}

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod tests_support {
    pub(crate) use super::tests::ZrleDecoder;
}
