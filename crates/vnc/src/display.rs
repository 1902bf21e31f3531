//! The screen between the display device and the viewers.
//!
//! The device owns the guest's scanout; it calls [`Display::resize`] when
//! the mode changes and [`Display::update`] with each rectangle the guest
//! flushed. The display keeps a copy of the screen (what a new viewer and
//! a screenshot see) and hands each update's rectangle, not its pixels, to
//! every viewer; a viewer copies pixels out only when it sends them.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

/// The largest width or height a display takes.
pub const MAX_DIMENSION: u32 = 8192;
/// Rectangles a viewer keeps apart before it merges them all into their
/// bounding box.
pub const MAX_DAMAGE_RECTS: usize = 16;
/// The largest clipboard text passed on (bytes, Latin-1).
pub const MAX_CUT_TEXT: usize = 1 << 20;

/// A length as RFB's `u32` fields carry it (every length here is bounded
/// far below 4 GiB; saturating keeps a bug from sending a short one).
pub(crate) fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A rectangle of the screen, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub const fn new(x: u32, y: u32, width: u32, height: u32) -> Self {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    fn right(&self) -> u64 {
        u64::from(self.x) + u64::from(self.width)
    }

    fn bottom(&self) -> u64 {
        u64::from(self.y) + u64::from(self.height)
    }

    /// Whether `other` lies inside this rectangle.
    pub fn contains(&self, other: &Rect) -> bool {
        other.x >= self.x
            && other.y >= self.y
            && other.right() <= self.right()
            && other.bottom() <= self.bottom()
    }

    /// The smallest rectangle holding both.
    pub fn union(&self, other: &Rect) -> Rect {
        let x = self.x.min(other.x);
        let y = self.y.min(other.y);
        let right = self.right().max(other.right());
        let bottom = self.bottom().max(other.bottom());
        Rect::new(
            x,
            y,
            u32::try_from(right - u64::from(x)).unwrap_or(u32::MAX),
            u32::try_from(bottom - u64::from(y)).unwrap_or(u32::MAX),
        )
    }

    /// The part of this rectangle inside a `width` x `height` screen.
    pub fn clip(&self, width: u32, height: u32) -> Rect {
        let x = self.x.min(width);
        let y = self.y.min(height);
        let right = self.right().min(u64::from(width));
        let bottom = self.bottom().min(u64::from(height));
        Rect::new(
            x,
            y,
            u32::try_from(right.saturating_sub(u64::from(x))).unwrap_or(0),
            u32::try_from(bottom.saturating_sub(u64::from(y))).unwrap_or(0),
        )
    }

    fn area(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// A copy of the screen: `width * height` pixels, row by row, each
/// `0x00RRGGBB`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u32>,
}

impl Frame {
    /// A black frame.
    pub fn new(width: u32, height: u32) -> Self {
        let n = (width as usize).saturating_mul(height as usize);
        Frame {
            width,
            height,
            pixels: vec![0; n],
        }
    }

    /// The pixel at `x`, `y` (`0x00RRGGBB`), if inside.
    pub fn pixel(&self, x: u32, y: u32) -> Option<u32> {
        if x >= self.width || y >= self.height {
            return None;
        }
        self.pixels
            .get(y as usize * self.width as usize + x as usize)
            .copied()
    }

    /// The pixels of `rect` (which must lie inside), row by row.
    pub fn copy_rect(&self, rect: Rect) -> Vec<u32> {
        let rect = rect.clip(self.width, self.height);
        let mut out = Vec::with_capacity(rect.area() as usize);
        for row in rect.y..rect.y + rect.height {
            let start = row as usize * self.width as usize + rect.x as usize;
            out.extend_from_slice(&self.pixels[start..start + rect.width as usize]);
        }
        out
    }
}

/// Why the display refused a call.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DisplayError {
    #[error("a {width}x{height} display is not possible (1 to {MAX_DIMENSION} pixels each way)")]
    Size { width: u32, height: u32 },
    #[error("the rectangle {0:?} does not lie inside the display")]
    Outside(Rect),
    #[error("{got} bytes of pixels for a rectangle that needs {need} (stride {stride})")]
    ShortPixels {
        got: usize,
        need: usize,
        stride: usize,
    },
}

/// What one viewer has not been sent yet. Bounded: rectangles coalesce
/// (at most [`MAX_DAMAGE_RECTS`]), a new clipboard text replaces an unsent
/// one.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) damage: Vec<Rect>,
    /// The screen changed size since the last update.
    pub(crate) resized: bool,
    /// Clipboard text for the viewer (Latin-1).
    pub(crate) cut_text: Option<Vec<u8>>,
    /// The viewer asked for an update and was not sent one yet.
    pub(crate) requested: bool,
    /// The status to answer the viewer's SetDesktopSize with.
    pub(crate) resize_reply: Option<u32>,
    /// The viewer is gone: its writer ends.
    pub(crate) closed: bool,
}

impl Pending {
    /// Adds a damaged rectangle: dropped if an existing one holds it;
    /// replaces the ones it holds; everything becomes one bounding box
    /// when too many are kept.
    pub(crate) fn add_damage(&mut self, rect: Rect) {
        if rect.is_empty() || self.damage.iter().any(|r| r.contains(&rect)) {
            return;
        }
        self.damage.retain(|r| !rect.contains(r));
        self.damage.push(rect);
        if self.damage.len() > MAX_DAMAGE_RECTS {
            let all = self.damage.iter().fold(rect, |acc, r| acc.union(r));
            self.damage.clear();
            self.damage.push(all);
        }
    }
}

/// One viewer's pending work and the condition its writer waits on.
#[derive(Debug, Default)]
pub(crate) struct Viewer {
    pub(crate) pending: Mutex<Pending>,
    pub(crate) wake: Condvar,
}

impl Viewer {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the pending work and wakes the writer.
    pub(crate) fn change(&self, f: impl FnOnce(&mut Pending)) {
        f(&mut self.lock());
        self.wake.notify_all();
    }
}

#[derive(Debug)]
struct Inner {
    frame: Frame,
    viewers: Vec<Weak<Viewer>>,
}

/// The screen and the viewers watching it.
#[derive(Debug)]
pub struct Display {
    inner: Mutex<Inner>,
}

fn check_size(width: u32, height: u32) -> Result<(), DisplayError> {
    if width == 0 || height == 0 || width > MAX_DIMENSION || height > MAX_DIMENSION {
        return Err(DisplayError::Size { width, height });
    }
    Ok(())
}

impl Display {
    /// A black `width` x `height` display.
    pub fn new(width: u32, height: u32) -> Result<Arc<Self>, DisplayError> {
        check_size(width, height)?;
        Ok(Arc::new(Display {
            inner: Mutex::new(Inner {
                frame: Frame::new(width, height),
                viewers: Vec::new(),
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells every viewer, dropping the ones that are gone.
    fn each_viewer(inner: &mut Inner, f: impl Fn(&mut Pending)) {
        inner.viewers.retain(|v| match v.upgrade() {
            Some(v) => {
                v.change(&f);
                true
            }
            None => false,
        });
    }

    /// The screen changed mode: it becomes a black `width` x `height`
    /// frame (the device sends its contents as updates), and viewers are
    /// told the new size.
    pub fn resize(&self, width: u32, height: u32) -> Result<(), DisplayError> {
        check_size(width, height)?;
        let mut inner = self.lock();
        if (inner.frame.width, inner.frame.height) == (width, height) {
            return Ok(());
        }
        inner.frame = Frame::new(width, height);
        Self::each_viewer(&mut inner, |p| {
            p.resized = true;
            p.damage.clear();
            p.add_damage(Rect::new(0, 0, width, height));
        });
        Ok(())
    }

    /// Copies `rect` of the screen from `pixels`: 4 bytes per pixel in
    /// the order blue, green, red, unused (DRM's XRGB8888, little endian),
    /// rows `stride` bytes apart. Viewers are told the rectangle changed.
    pub fn update(&self, rect: Rect, pixels: &[u8], stride: usize) -> Result<(), DisplayError> {
        let mut inner = self.lock();
        let (w, h) = (inner.frame.width, inner.frame.height);
        if rect.clip(w, h) != rect {
            return Err(DisplayError::Outside(rect));
        }
        if rect.is_empty() {
            return Ok(());
        }
        let row_bytes = rect.width as usize * 4;
        let need = (rect.height as usize - 1)
            .checked_mul(stride)
            .and_then(|n| n.checked_add(row_bytes))
            .filter(|_| stride >= row_bytes);
        match need {
            Some(n) if n <= pixels.len() => {}
            _ => {
                return Err(DisplayError::ShortPixels {
                    got: pixels.len(),
                    need: need.unwrap_or(usize::MAX),
                    stride,
                })
            }
        }
        for row in 0..rect.height as usize {
            let src = &pixels[row * stride..row * stride + row_bytes];
            let start = (rect.y as usize + row) * w as usize + rect.x as usize;
            let dst = &mut inner.frame.pixels[start..start + rect.width as usize];
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = u32::from_le_bytes([s[0], s[1], s[2], 0]);
            }
        }
        Self::each_viewer(&mut inner, |p| p.add_damage(rect));
        Ok(())
    }

    /// A copy of the whole screen.
    pub fn snapshot(&self) -> Frame {
        self.lock().frame.clone()
    }

    /// The screen's size.
    pub fn size(&self) -> (u32, u32) {
        let inner = self.lock();
        (inner.frame.width, inner.frame.height)
    }

    /// Sends clipboard text to every viewer (characters beyond Latin-1
    /// become `?`, as RFB's cut text is Latin-1; at most [`MAX_CUT_TEXT`]).
    pub fn set_clipboard(&self, text: &str) {
        let latin1: Vec<u8> = text
            .chars()
            .take(MAX_CUT_TEXT)
            .map(|c| u8::try_from(u32::from(c)).unwrap_or(b'?'))
            .collect();
        let mut inner = self.lock();
        Self::each_viewer(&mut inner, |p| p.cut_text = Some(latin1.clone()));
    }

    /// Registers a viewer; it is told of every change until dropped.
    pub(crate) fn attach(&self, viewer: &Arc<Viewer>) {
        self.lock().viewers.push(Arc::downgrade(viewer));
    }

    /// The pixels of `rect` (clipped to the screen), and the screen size.
    pub(crate) fn read(&self, rect: Rect) -> (Vec<u32>, Rect, (u32, u32)) {
        let inner = self.lock();
        let (w, h) = (inner.frame.width, inner.frame.height);
        let clipped = rect.clip(w, h);
        (inner.frame.copy_rect(clipped), clipped, (w, h))
    }

    /// Viewers attached and still alive.
    pub fn viewers(&self) -> usize {
        self.lock()
            .viewers
            .iter()
            .filter(|v| v.strong_count() > 0)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_copy_bgrx_with_stride_and_reject_bad_input() {
        let d = Display::new(4, 3).unwrap();
        // Two rows of two pixels, stride 12 bytes (4 of padding).
        let mut px = vec![0u8; 20];
        px[0..4].copy_from_slice(&[0x11, 0x22, 0x33, 0xff]);
        px[4..8].copy_from_slice(&[1, 2, 3, 4]);
        px[12..16].copy_from_slice(&[0xaa, 0xbb, 0xcc, 0]);
        d.update(Rect::new(1, 1, 2, 2), &px, 12).unwrap();
        let f = d.snapshot();
        assert_eq!(f.pixel(1, 1), Some(0x0033_2211));
        assert_eq!(f.pixel(2, 1), Some(0x0003_0201));
        assert_eq!(f.pixel(1, 2), Some(0x00cc_bbaa));
        assert_eq!(f.pixel(0, 0), Some(0));
        assert!(matches!(
            d.update(Rect::new(3, 0, 2, 1), &px, 12),
            Err(DisplayError::Outside(_))
        ));
        assert!(matches!(
            d.update(Rect::new(0, 0, 2, 2), &px[..19], 12),
            Err(DisplayError::ShortPixels { .. })
        ));
        assert!(matches!(
            d.update(Rect::new(0, 0, 2, 2), &px, 4),
            Err(DisplayError::ShortPixels { .. })
        ));
        assert!(d
            .update(Rect::new(u32::MAX, u32::MAX, 2, 2), &px, 12)
            .is_err());
        assert!(Display::new(0, 10).is_err());
        assert!(d.resize(MAX_DIMENSION + 1, 1).is_err());
    }

    #[test]
    fn damage_coalesces_and_stays_bounded() {
        let mut p = Pending::default();
        p.add_damage(Rect::new(0, 0, 10, 10));
        p.add_damage(Rect::new(2, 2, 3, 3));
        assert_eq!(p.damage.len(), 1, "held by an existing rectangle");
        p.add_damage(Rect::new(0, 0, 20, 20));
        assert_eq!(p.damage, [Rect::new(0, 0, 20, 20)]);
        for i in 0..1000 {
            p.add_damage(Rect::new(100 + i * 2, 50, 1, 1));
            assert!(p.damage.len() <= MAX_DAMAGE_RECTS);
        }
        let all = p.damage.iter().fold(p.damage[0], |a, r| a.union(r));
        assert!(all.contains(&Rect::new(0, 0, 20, 20)));
        assert!(all.contains(&Rect::new(2098, 50, 1, 1)));
    }

    #[test]
    fn viewers_hear_of_updates_resizes_and_clipboard() {
        let d = Display::new(8, 8).unwrap();
        let v = Arc::new(Viewer::default());
        d.attach(&v);
        d.update(Rect::new(0, 0, 1, 1), &[0; 4], 4).unwrap();
        assert_eq!(v.lock().damage, [Rect::new(0, 0, 1, 1)]);
        d.resize(16, 4).unwrap();
        assert!(v.lock().resized);
        assert_eq!(v.lock().damage, [Rect::new(0, 0, 16, 4)]);
        d.set_clipboard("é€");
        assert_eq!(v.lock().cut_text.as_deref(), Some(&[0xe9, b'?'][..]));
        assert_eq!(d.viewers(), 1);
        drop(v);
        d.update(Rect::new(0, 0, 1, 1), &[0; 4], 4).unwrap();
        assert_eq!(d.viewers(), 0);
    }
}
