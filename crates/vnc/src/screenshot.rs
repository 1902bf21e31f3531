//! PNG screenshots of a [`Frame`].

use std::io::Write;

use crate::display::Frame;

#[derive(Debug, thiserror::Error)]
#[error("cannot write the PNG screenshot")]
pub struct ScreenshotError(#[source] png::EncodingError);

/// Writes `frame` to `out` as an 8-bit RGB PNG.
pub fn write_png(frame: &Frame, out: impl Write) -> Result<(), ScreenshotError> {
    let mut encoder = png::Encoder::new(out, frame.width, frame.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(ScreenshotError)?;
    let rgb: Vec<u8> = frame
        .pixels
        .iter()
        .flat_map(|p| {
            let [b, g, r, _] = p.to_le_bytes();
            [r, g, b]
        })
        .collect();
    writer.write_image_data(&rgb).map_err(ScreenshotError)?;
    writer.finish().map_err(ScreenshotError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_screenshot_decodes_to_the_same_pixels() {
        let mut frame = Frame::new(3, 2);
        frame.pixels = vec![
            0x00ff_0000,
            0x0000_ff00,
            0x0000_00ff,
            0x0012_3456,
            0,
            0x00ff_ffff,
        ];
        let mut png_bytes = Vec::new();
        write_png(&frame, &mut png_bytes).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0u8; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(
            &buf[..18],
            &[255, 0, 0, 0, 255, 0, 0, 0, 255, 0x12, 0x34, 0x56, 0, 0, 0, 255, 255, 255]
        );
    }
}
