use flate2::{Decompress, FlushDecompress};

use super::*;

/// A ZRLE decoder for 32-bit native pixels with 3-byte CPIXELs, written
/// from RFC 6143 to check the encoder against.
pub(crate) struct ZrleDecoder {
    zlib: Decompress,
}

impl ZrleDecoder {
    pub(crate) fn new() -> Self {
        ZrleDecoder {
            zlib: Decompress::new(true),
        }
    }

    pub(crate) fn decode(&mut self, data: &[u8], width: usize, height: usize) -> Vec<u32> {
        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        assert_eq!(len, data.len() - 4, "length prefix");
        let mut plain = Vec::with_capacity(width * height * 4 + 1024);
        let mut input = &data[4..];
        while !input.is_empty() {
            plain.reserve(64 * 1024);
            let before = self.zlib.total_in();
            self.zlib
                .decompress_vec(input, &mut plain, FlushDecompress::Sync)
                .unwrap();
            input = &input[(self.zlib.total_in() - before) as usize..];
        }
        let mut at = 0;
        let mut next = |n: usize| {
            let s = &plain[at..at + n];
            at += n;
            s.to_vec()
        };
        let cpix = |b: Vec<u8>| u32::from_le_bytes([b[0], b[1], b[2], 0]);
        let mut out = vec![0u32; width * height];
        for ty in (0..height).step_by(TILE) {
            for tx in (0..width).step_by(TILE) {
                let (tw, th) = (TILE.min(width - tx), TILE.min(height - ty));
                let mut tile = Vec::with_capacity(tw * th);
                let sub = next(1)[0];
                match sub {
                    0 => (0..tw * th).for_each(|_| tile.push(cpix(next(3)))),
                    1 => tile = vec![cpix(next(3)); tw * th],
                    2..=16 => {
                        let pal: Vec<u32> = (0..sub).map(|_| cpix(next(3))).collect();
                        let bits = match sub {
                            2 => 1,
                            3..=4 => 2,
                            _ => 4,
                        };
                        let row_bytes = (tw * bits).div_ceil(8);
                        for _ in 0..th {
                            let row = next(row_bytes);
                            for x in 0..tw {
                                let bit = x * bits;
                                let idx =
                                    (row[bit / 8] >> (8 - bits - bit % 8)) & ((1 << bits) - 1);
                                tile.push(pal[usize::from(idx)]);
                            }
                        }
                    }
                    128 => {
                        while tile.len() < tw * th {
                            let p = cpix(next(3));
                            let mut run = 1;
                            loop {
                                let b = next(1)[0];
                                run += usize::from(b);
                                if b != 255 {
                                    break;
                                }
                            }
                            tile.extend(std::iter::repeat_n(p, run));
                        }
                    }
                    other => panic!("subencoding {other} not produced by the encoder"),
                }
                for row in 0..th {
                    for col in 0..tw {
                        out[(ty + row) * width + tx + col] = tile[row * tw + col];
                    }
                }
            }
        }
        assert_eq!(at, plain.len(), "every byte used");
        out
    }
}

fn pattern(width: usize, height: usize, seed: u32) -> Vec<u32> {
    (0..width * height)
        .map(|i| {
            let (x, y) = ((i % width) as u32, (i / width) as u32);
            match (x / 7 + y / 5 + seed) % 4 {
                0 => 0x00ff_0000,
                1 => (x * 3 + y * 5 + seed).wrapping_mul(0x9e37_79b9) & 0xff_ffff,
                2 => 0x0000_ff00 | (y & 3),
                _ => 0x0012_3456,
            }
        })
        .collect()
}

#[test]
fn zrle_round_trips_every_tile_kind_across_rectangles() {
    let mut enc = ZrleEncoder::default();
    let mut dec = ZrleDecoder::new();
    let pf = PixelFormat::NATIVE;
    // Solid, few colours, runs, noise; odd sizes leave partial tiles.
    let cases: Vec<(usize, usize, Vec<u32>)> = vec![
        (130, 70, vec![0x0010_2030; 130 * 70]),
        (65, 3, (0..65 * 3).map(|i| [1, 2, 3][i % 3]).collect()),
        (200, 150, pattern(200, 150, 1)),
        (64, 64, (0..64 * 64).map(|i| (i / 300) as u32).collect()),
        (1, 1, vec![0x00ab_cdef]),
        (77, 99, pattern(77, 99, 2)),
    ];
    for (w, h, px) in cases {
        let data = enc.encode(&px, w, h, &pf).unwrap();
        assert_eq!(dec.decode(&data, w, h), px, "{w}x{h}");
    }
}

#[test]
fn zrle_compresses_a_plain_screen() {
    let mut enc = ZrleEncoder::default();
    let px = vec![0x0020_4080; 1280 * 800];
    let data = enc.encode(&px, 1280, 800, &PixelFormat::NATIVE).unwrap();
    assert!(data.len() < 2000, "{} bytes for a blank screen", data.len());
}

#[test]
fn pixels_convert_to_client_formats() {
    let px = 0x00ff_8000; // orange
    let mut out = Vec::new();
    put_pixel(px, &PixelFormat::NATIVE, &mut out);
    assert_eq!(out, [0x00, 0x80, 0xff, 0x00]);
    // vncdotool's RGBX: red in the low byte.
    let rgbx = PixelFormat {
        red_shift: 0,
        blue_shift: 16,
        ..PixelFormat::NATIVE
    };
    out.clear();
    put_pixel(px, &rgbx, &mut out);
    assert_eq!(out, [0xff, 0x80, 0x00, 0x00]);
    // RGB565, big endian.
    let rgb565 = PixelFormat {
        bits_per_pixel: 16,
        depth: 16,
        big_endian: true,
        true_colour: true,
        red_max: 31,
        green_max: 63,
        blue_max: 31,
        red_shift: 11,
        green_shift: 5,
        blue_shift: 0,
    };
    out.clear();
    put_pixel(px, &rgb565, &mut out);
    let v = (31u16 << 11) | (32 << 5);
    assert_eq!(out, v.to_be_bytes());
    // BGR233 in one byte.
    let bgr233 = PixelFormat {
        bits_per_pixel: 8,
        depth: 8,
        big_endian: false,
        true_colour: true,
        red_max: 7,
        green_max: 7,
        blue_max: 3,
        red_shift: 0,
        green_shift: 3,
        blue_shift: 6,
    };
    out.clear();
    put_pixel(0x00ff_ffff, &bgr233, &mut out);
    assert_eq!(out, [0xff]);
    assert_eq!(encode_raw(&[px, 0], &PixelFormat::NATIVE).len(), 8);
}

#[test]
fn cpixels_drop_the_unused_byte() {
    assert_eq!(cpixel(&PixelFormat::NATIVE), CPixel::Three(0));
    let be = PixelFormat {
        big_endian: true,
        ..PixelFormat::NATIVE
    };
    assert_eq!(cpixel(&be), CPixel::Three(1));
    let high = PixelFormat {
        red_shift: 24,
        green_shift: 16,
        blue_shift: 8,
        ..PixelFormat::NATIVE
    };
    assert_eq!(cpixel(&high), CPixel::Three(1));
    let mut out = Vec::new();
    put_cpixel(0x0011_2233, &high, CPixel::Three(1), &mut out);
    assert_eq!(out, [0x33, 0x22, 0x11]);
    let deep = PixelFormat {
        depth: 32,
        ..PixelFormat::NATIVE
    };
    assert_eq!(cpixel(&deep), CPixel::Full);
}
