//! What the device shows the host: a [`Frame`] per scanout and a
//! [`DisplaySink`] told about every change. The sink is all a viewer
//! (VNC, screenshots) needs to know of the device.

use super::protocol::Rect;

/// A picture: `height` rows of `stride` pixels, of which the first
/// `width` are shown. Each pixel is 0xAARRGGBB (alpha 0xff for formats
/// without alpha).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    /// Pixels per row in `pixels` (at least `width`).
    pub stride: u32,
    pub pixels: Vec<u32>,
}

impl Frame {
    /// The pixel at (`x`, `y`), if inside the frame.
    pub fn pixel(&self, x: u32, y: u32) -> Option<u32> {
        if x >= self.width || y >= self.height {
            return None;
        }
        self.pixels
            .get(y as usize * self.stride as usize + x as usize)
            .copied()
    }

    /// Row `y`'s shown pixels.
    pub fn row(&self, y: u32) -> &[u32] {
        let start = y as usize * self.stride as usize;
        self.pixels
            .get(start..start + self.width as usize)
            .unwrap_or(&[])
    }
}

/// The pointer image and where it is on a scanout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    /// The scanout it is on.
    pub scanout: u32,
    /// The position of its hot spot, in the scanout's pixels.
    pub x: u32,
    pub y: u32,
    /// The hot spot within the image.
    pub hot_x: u32,
    pub hot_y: u32,
    /// The image (at most 256×256); `None`: the pointer is hidden.
    pub image: Option<Frame>,
}

/// Receives the device's output. Every call comes from the device's
/// worker thread (or, for a reset, the thread resetting the device) while
/// the device's state is locked: a sink must return quickly (copy what it
/// needs, wake its own thread) and must not call back into the
/// [`GpuHandle`](super::GpuHandle).
///
/// Calls only follow the guest's commands: a guest that draws nothing
/// causes none.
pub trait DisplaySink: Send + Sync {
    /// Scanout `scanout` now shows a `width`×`height` picture; 0×0: it is
    /// off (no resource, the driver reset). An `update` of the whole frame
    /// follows when it shows a picture.
    fn resize(&self, scanout: u32, width: u32, height: u32) {
        let _ = (scanout, width, height);
    }

    /// The pixels of `rect` (in the scanout's coordinates, within
    /// `frame`) changed; `frame` is the scanout's whole picture now.
    fn update(&self, scanout: u32, rect: Rect, frame: &Frame) {
        let _ = (scanout, rect, frame);
    }

    /// The pointer moved (`image_changed` false) or got a new image or
    /// was hidden (`image_changed` true).
    fn cursor(&self, cursor: &Cursor, image_changed: bool) {
        let _ = (cursor, image_changed);
    }
}

/// A sink that drops everything (a device nobody watches; the frames stay
/// readable through the handle).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl DisplaySink for NullSink {}
