//! virtio-gpu's saved state: the modes offered, the pending display
//! event, the resources (id, format, size, backing list), what each
//! scanout shows and the cursor. (The negotiated features and the queues
//! are the transport's.)
//!
//! Pixels: a resource with a backing is read from guest memory again
//! when the restored device starts (guest RAM is part of the snapshot);
//! one without a backing keeps its host copy in the state, as hex, at
//! most [`MAX_SAVED_PIXEL_BYTES`] of them altogether (beyond that — and
//! for all-black images — it comes back black). Scanout frames are
//! rebuilt from their resources. Like every state, it is checked as a
//! guest's commands would be.

use serde::{Deserialize, Serialize};

use super::backend::{
    copy_rect, valid_mode, GpuBackend, Scanout, MAX_CURSOR_DIM, MAX_HOST_BYTES, MAX_RESOURCES,
};
use super::display::{Cursor, Frame};
use super::protocol::{MemEntry, Rect, MAX_BACKING_ENTRIES};
use super::resources::{
    alloc_pixels, resource_bytes, Backing, Format, Resource, MAX_RESOURCE_BYTES,
};
use super::Gpu;
use crate::virtio::VirtioStateError;

/// The most host-copy pixel bytes a state keeps.
pub const MAX_SAVED_PIXEL_BYTES: usize = 16 << 20;

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct GpuState {
    /// The features the device offered.
    #[serde(default)]
    pub features: u64,
    /// Each scanout's preferred size (as the host last asked).
    #[serde(default)]
    pub modes: Vec<(u32, u32)>,
    /// Config `events_read`.
    #[serde(default)]
    pub events_read: u32,
    /// A configuration interrupt was due.
    #[serde(default)]
    pub config_pending: bool,
    #[serde(default)]
    pub resources: Vec<ResourceState>,
    /// What each scanout shows.
    #[serde(default)]
    pub scanouts: Vec<ScanoutState>,
    #[serde(default)]
    pub cursor: CursorState,
}

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct ResourceState {
    pub id: u32,
    /// The protocol's format number.
    pub format: u32,
    pub width: u32,
    pub height: u32,
    /// The guest pages behind it, if attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<Vec<MemEntry>>,
    /// The host copy (0xAARRGGBB pixels as hex) of a resource without a
    /// backing, unless black or over the bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixels: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ScanoutState {
    /// 0: off.
    pub resource_id: u32,
    pub rect: Rect,
}

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct CursorState {
    pub scanout: u32,
    pub x: u32,
    pub y: u32,
    pub hot_x: u32,
    pub hot_y: u32,
    /// The image (width, height, hex pixels); none: hidden.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<(u32, u32, String)>,
}

fn to_hex(pixels: &[u32]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(pixels.len() * 8);
    for p in pixels {
        let _ = write!(s, "{p:08x}");
    }
    s
}

fn from_hex(s: &str, count: usize) -> Result<Vec<u32>, VirtioStateError> {
    let bad = || VirtioStateError::Invalid("pixels are not the image's size in hex".into());
    if s.len() != count.checked_mul(8).ok_or_else(bad)? {
        return Err(bad());
    }
    let mut out = alloc_pixels(count).ok_or_else(bad)?;
    for (d, chunk) in out.iter_mut().zip(s.as_bytes().chunks_exact(8)) {
        let text = std::str::from_utf8(chunk).map_err(|_| bad())?;
        *d = u32::from_str_radix(text, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

fn invalid(why: String) -> VirtioStateError {
    VirtioStateError::Invalid(why)
}

impl Gpu {
    pub(super) fn state(&self) -> GpuState {
        let b = self.shared.lock();
        let mut saved_bytes = 0usize;
        let resources = b
            .resources
            .iter()
            .map(|(&id, r)| {
                let keep = r.backing.is_none()
                    && r.pixels.iter().any(|&p| p != 0)
                    && saved_bytes + r.bytes() <= MAX_SAVED_PIXEL_BYTES;
                if keep {
                    saved_bytes += r.bytes();
                }
                ResourceState {
                    id,
                    format: r.format.to_wire(),
                    width: r.width,
                    height: r.height,
                    backing: r.backing.as_ref().map(|bk| bk.entries().to_vec()),
                    pixels: keep.then(|| to_hex(&r.pixels)),
                }
            })
            .collect();
        let c = &b.cursor;
        GpuState {
            features: self.options.features(),
            modes: b.scanouts.iter().map(|s| s.mode).collect(),
            events_read: b.events_read,
            config_pending: b.config_pending,
            resources,
            scanouts: b
                .scanouts
                .iter()
                .map(|s| ScanoutState {
                    resource_id: s.resource_id,
                    rect: s.rect,
                })
                .collect(),
            cursor: CursorState {
                scanout: c.scanout,
                x: c.x,
                y: c.y,
                hot_x: c.hot_x,
                hot_y: c.hot_y,
                image: c
                    .image
                    .as_ref()
                    .map(|f| (f.width, f.height, to_hex(&f.pixels))),
            },
        }
    }

    pub(super) fn restore(&mut self, saved: &GpuState) -> Result<(), VirtioStateError> {
        if saved.features != self.options.features() {
            return Err(invalid(format!(
                "the gpu offered features {:#x}; this one offers {:#x}",
                saved.features,
                self.options.features()
            )));
        }
        if saved.modes.len() != self.options.displays.len() {
            return Err(invalid(format!(
                "the gpu had {} scanouts; this one has {}",
                saved.modes.len(),
                self.options.displays.len()
            )));
        }
        if let Some((w, h)) = saved.modes.iter().find(|(w, h)| !valid_mode(*w, *h)) {
            return Err(invalid(format!("a display mode of {w}x{h}")));
        }
        if saved.events_read & !super::protocol::VIRTIO_GPU_EVENT_DISPLAY != 0 {
            return Err(invalid(format!("unknown events {:#x}", saved.events_read)));
        }
        let sink = self.shared.lock().sink.clone();
        let mut b = GpuBackend::new(&saved.modes, sink);
        b.events_read = saved.events_read;
        b.config_pending = saved.config_pending;
        if saved.resources.len() > MAX_RESOURCES {
            return Err(invalid(format!("{} resources", saved.resources.len())));
        }
        for r in &saved.resources {
            let resource = restore_resource(r)?;
            if b.resources.contains_key(&r.id) {
                return Err(invalid(format!("resource {} twice", r.id)));
            }
            b.used += resource.bytes() + resource.backing.as_ref().map_or(0, Backing::cost);
            if b.used > MAX_HOST_BYTES {
                return Err(invalid(
                    "the resources take more than the device holds".into(),
                ));
            }
            b.reload_pending |= resource.backing.is_some();
            b.resources.insert(r.id, resource);
        }
        if saved.scanouts.len() != saved.modes.len() {
            return Err(invalid("a scanout state per mode is expected".into()));
        }
        for (s, mode) in saved.scanouts.iter().zip(&saved.modes) {
            let scanout = restore_scanout(&b, s, *mode)?;
            b.used += scanout.frame.as_ref().map_or(0, |f| f.pixels.len() * 4);
            if b.used > MAX_HOST_BYTES {
                return Err(invalid(
                    "the scanouts take more than the device holds".into(),
                ));
            }
            b.reload_pending |= scanout.frame.is_some();
            b.scanouts.push(scanout);
        }
        // `new` made a scanout per mode; the restored ones replace them.
        let n = saved.modes.len();
        b.scanouts.drain(..n);
        b.cursor = restore_cursor(&saved.cursor, n)?;
        b.reload_pending |= b.cursor.image.is_some();
        *self.shared.lock() = b;
        Ok(())
    }
}

fn restore_resource(r: &ResourceState) -> Result<Resource, VirtioStateError> {
    if r.id == 0 {
        return Err(invalid("resource id 0".into()));
    }
    let format = Format::from_wire(r.format)
        .ok_or_else(|| invalid(format!("resource {}: format {}", r.id, r.format)))?;
    let bytes = resource_bytes(r.width, r.height)
        .filter(|&n| n <= MAX_RESOURCE_BYTES)
        .ok_or_else(|| invalid(format!("resource {}: {}x{}", r.id, r.width, r.height)))?;
    let backing = match &r.backing {
        Some(list) if list.len() > MAX_BACKING_ENTRIES => {
            return Err(invalid(format!(
                "resource {}: {} backing entries",
                r.id,
                list.len()
            )))
        }
        Some(list) => Some(Backing::unchecked(list.clone())),
        None => None,
    };
    let pixels = match (&r.pixels, &backing) {
        (Some(_), Some(_)) => {
            return Err(invalid(format!("resource {}: pixels and a backing", r.id)))
        }
        (Some(hex), None) => from_hex(hex, bytes / 4)?,
        (None, _) => alloc_pixels(bytes / 4)
            .ok_or_else(|| invalid(format!("resource {}: no memory for it", r.id)))?,
    };
    Ok(Resource {
        format,
        width: r.width,
        height: r.height,
        pixels,
        backing,
    })
}

fn restore_scanout(
    b: &GpuBackend,
    s: &ScanoutState,
    mode: (u32, u32),
) -> Result<Scanout, VirtioStateError> {
    let mut out = Scanout {
        mode,
        ..Scanout::default()
    };
    if s.resource_id == 0 {
        return Ok(out);
    }
    let r = b
        .resources
        .get(&s.resource_id)
        .ok_or_else(|| invalid(format!("a scanout shows resource {}", s.resource_id)))?;
    if s.rect.is_empty() || !s.rect.fits_in(r.width, r.height) {
        return Err(invalid(format!(
            "a scanout shows {:?} of resource {}",
            s.rect, s.resource_id
        )));
    }
    let pixels = alloc_pixels(s.rect.width as usize * s.rect.height as usize)
        .ok_or_else(|| invalid("no memory for a scanout".into()))?;
    let mut frame = Frame {
        width: s.rect.width,
        height: s.rect.height,
        stride: s.rect.width,
        pixels,
    };
    copy_rect(
        r,
        s.rect,
        &mut frame,
        Rect::new(0, 0, s.rect.width, s.rect.height),
    );
    out.resource_id = s.resource_id;
    out.rect = s.rect;
    out.frame = Some(frame);
    Ok(out)
}

fn restore_cursor(c: &CursorState, scanouts: usize) -> Result<Cursor, VirtioStateError> {
    if usize::try_from(c.scanout).map_or(true, |i| i >= scanouts) {
        return Err(invalid(format!("the cursor is on scanout {}", c.scanout)));
    }
    let image = match &c.image {
        None => None,
        Some((w, h, hex)) => {
            if *w == 0 || *h == 0 || *w > MAX_CURSOR_DIM || *h > MAX_CURSOR_DIM {
                return Err(invalid(format!("a cursor of {w}x{h}")));
            }
            Some(Frame {
                width: *w,
                height: *h,
                stride: *w,
                pixels: from_hex(hex, *w as usize * *h as usize)?,
            })
        }
    };
    Ok(Cursor {
        scanout: c.scanout,
        x: c.x,
        y: c.y,
        hot_x: c.hot_x,
        hot_y: c.hot_y,
        image,
    })
}
