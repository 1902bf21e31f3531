//! The 2D device's state machine: resources, scanouts and the cursor,
//! and what each command does to them. It knows nothing of queues (see
//! `queue.rs`) and reads guest memory only through a resource's backing
//! during a request.
//!
//! Host memory is bounded: a resource at most [`MAX_RESOURCE_BYTES`]
//! and [`MAX_DIM`] on a side, and everything the guest makes the device
//! hold — resources' host copies, backing lists, the scanouts' frames —
//! at most [`MAX_HOST_BYTES`] together, [`MAX_RESOURCES`] resources.

use std::collections::BTreeMap;
use std::sync::Arc;

use memory::GuestMemoryMmap;

use super::display::{Cursor, DisplaySink, Frame};
use super::edid::{edid, MAX_EDID_DIM};
use super::protocol::*;
use super::resources::*;

/// Everything the guest's resources may cost the host.
pub const MAX_HOST_BYTES: usize = 256 << 20;
/// The most resources alive at once.
pub const MAX_RESOURCES: usize = 4096;
/// The largest cursor image.
pub const MAX_CURSOR_DIM: u32 = 256;
/// The smallest display mode offered (what Linux's driver accepts).
pub const MIN_MODE_DIM: u32 = 32;
/// The largest display mode offered (what an EDID timing holds).
pub const MAX_MODE_DIM: u32 = MAX_EDID_DIM;

/// What a scanout shows.
#[derive(Debug, Default)]
pub(super) struct Scanout {
    /// The host-given preferred size.
    pub mode: (u32, u32),
    /// The resource shown (0: none) and the part of it shown.
    pub resource_id: u32,
    pub rect: Rect,
    /// The picture shown, `rect` of the resource as of its last flush.
    pub frame: Option<Frame>,
}

/// The device's state behind its queues.
pub struct GpuBackend {
    pub(super) sink: Arc<dyn DisplaySink>,
    pub(super) resources: BTreeMap<u32, Resource>,
    pub(super) scanouts: Vec<Scanout>,
    pub(super) cursor: Cursor,
    /// Host bytes the guest's objects take (see [`MAX_HOST_BYTES`]).
    pub(super) used: usize,
    /// Config `events_read`.
    pub(super) events_read: u32,
    /// A configuration interrupt is due (the host changed a mode).
    pub(super) config_pending: bool,
    /// Restored resources wait to be read from their backing again.
    pub(super) reload_pending: bool,
}

impl std::fmt::Debug for GpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuBackend")
            .field("resources", &self.resources.len())
            .field("scanouts", &self.scanouts.len())
            .field("used", &self.used)
            .finish_non_exhaustive()
    }
}

/// Whether `w`×`h` is a mode the device may offer.
pub fn valid_mode(w: u32, h: u32) -> bool {
    (MIN_MODE_DIM..=MAX_MODE_DIM).contains(&w) && (MIN_MODE_DIM..=MAX_MODE_DIM).contains(&h)
}

const OK: Response = Response::NoData(RESP_OK_NODATA);
const UNSPEC: Response = Response::NoData(RESP_ERR_UNSPEC);
const NO_MEMORY: Response = Response::NoData(RESP_ERR_OUT_OF_MEMORY);
const BAD_SCANOUT: Response = Response::NoData(RESP_ERR_INVALID_SCANOUT_ID);
const BAD_RESOURCE: Response = Response::NoData(RESP_ERR_INVALID_RESOURCE_ID);
const BAD_PARAMETER: Response = Response::NoData(RESP_ERR_INVALID_PARAMETER);

impl GpuBackend {
    /// A device with a scanout per entry of `modes` (their preferred
    /// sizes), telling `sink` what it shows.
    pub fn new(modes: &[(u32, u32)], sink: Arc<dyn DisplaySink>) -> Self {
        GpuBackend {
            sink,
            resources: BTreeMap::new(),
            scanouts: modes
                .iter()
                .map(|&mode| Scanout {
                    mode,
                    ..Scanout::default()
                })
                .collect(),
            cursor: Cursor::default(),
            used: 0,
            events_read: 0,
            config_pending: false,
            reload_pending: false,
        }
    }

    pub fn num_scanouts(&self) -> u32 {
        super::super::len_u32(self.scanouts.len())
    }

    /// The host bytes the guest's objects take now.
    pub fn host_bytes(&self) -> usize {
        self.used
    }

    /// Forgets every resource and turns the scanouts off (a device
    /// reset); the modes stay.
    pub fn reset(&mut self) {
        self.resources.clear();
        for i in 0..self.scanouts.len() {
            self.disable(i);
        }
        if self.cursor.image.is_some() {
            self.cursor = Cursor::default();
            self.sink.cursor(&self.cursor, true);
        }
        self.cursor = Cursor::default();
        self.used = 0;
        self.events_read = 0;
        self.config_pending = false;
        self.reload_pending = false;
    }

    /// Sets scanout `i`'s preferred mode and raises the display event.
    pub fn set_mode(&mut self, i: usize, w: u32, h: u32) -> bool {
        let Some(s) = self.scanouts.get_mut(i) else {
            return false;
        };
        s.mode = (w, h);
        self.events_read |= VIRTIO_GPU_EVENT_DISPLAY;
        self.config_pending = true;
        true
    }

    /// A copy of what scanout `i` shows.
    pub fn frame(&self, i: usize) -> Option<Frame> {
        self.scanouts.get(i)?.frame.clone()
    }

    /// Carries out one command.
    pub fn execute(&mut self, mem: &GuestMemoryMmap, cmd: Command) -> Response {
        match cmd {
            Command::GetDisplayInfo => Response::DisplayInfo(
                self.scanouts
                    .iter()
                    .map(|s| (Rect::new(0, 0, s.mode.0, s.mode.1), true))
                    .collect(),
            ),
            Command::GetEdid { scanout } => match self.scanout_index(scanout) {
                Some(i) => {
                    let (w, h) = self.scanouts[i].mode;
                    Response::Edid(edid(w, h).to_vec())
                }
                None => BAD_SCANOUT,
            },
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            } => self.create(resource_id, format, width, height),
            Command::ResourceUnref { resource_id } => self.unref(resource_id),
            Command::SetScanout {
                rect,
                scanout,
                resource_id,
            } => self.set_scanout(scanout, resource_id, rect),
            Command::ResourceFlush { rect, resource_id } => self.flush(resource_id, rect),
            Command::TransferToHost2d {
                rect,
                offset,
                resource_id,
            } => self.transfer(mem, resource_id, rect, offset),
            Command::AttachBacking {
                resource_id,
                entries,
            } => self.attach(mem, resource_id, entries),
            Command::DetachBacking { resource_id } => self.detach(resource_id),
            Command::UpdateCursor(c) => self.update_cursor(c),
            Command::MoveCursor(c) => self.move_cursor(c),
        }
    }

    fn scanout_index(&self, scanout: u32) -> Option<usize> {
        usize::try_from(scanout)
            .ok()
            .filter(|&i| i < self.scanouts.len())
    }

    fn create(&mut self, id: u32, format: u32, width: u32, height: u32) -> Response {
        if id == 0 || self.resources.contains_key(&id) {
            return BAD_RESOURCE;
        }
        let Some(format) = Format::from_wire(format) else {
            return BAD_PARAMETER;
        };
        let Some(bytes) = resource_bytes(width, height) else {
            return BAD_PARAMETER;
        };
        if bytes > MAX_RESOURCE_BYTES
            || self.resources.len() >= MAX_RESOURCES
            || self.used + bytes > MAX_HOST_BYTES
        {
            return NO_MEMORY;
        }
        let Some(pixels) = alloc_pixels(bytes / 4) else {
            return NO_MEMORY;
        };
        self.used += bytes;
        self.resources.insert(
            id,
            Resource {
                format,
                width,
                height,
                pixels,
                backing: None,
            },
        );
        OK
    }

    fn unref(&mut self, id: u32) -> Response {
        let Some(r) = self.resources.remove(&id) else {
            return BAD_RESOURCE;
        };
        self.used = self
            .used
            .saturating_sub(r.bytes() + r.backing.as_ref().map_or(0, Backing::cost));
        for i in 0..self.scanouts.len() {
            if self.scanouts[i].resource_id == id {
                self.disable(i);
            }
        }
        OK
    }

    /// Turns scanout `i` off.
    fn disable(&mut self, i: usize) {
        let s = &mut self.scanouts[i];
        let was_on = s.resource_id != 0;
        s.resource_id = 0;
        s.rect = Rect::default();
        if let Some(f) = s.frame.take() {
            self.used = self.used.saturating_sub(f.pixels.len() * 4);
        }
        if was_on {
            self.sink.resize(super::super::len_u32(i), 0, 0);
        }
    }

    fn set_scanout(&mut self, scanout: u32, id: u32, rect: Rect) -> Response {
        let Some(i) = self.scanout_index(scanout) else {
            return BAD_SCANOUT;
        };
        if id == 0 {
            self.disable(i);
            return OK;
        }
        let Some(r) = self.resources.get(&id) else {
            return BAD_RESOURCE;
        };
        if rect.is_empty() || !rect.fits_in(r.width, r.height) {
            return BAD_PARAMETER;
        }
        let s = &self.scanouts[i];
        if s.resource_id == id && s.rect == rect {
            return OK;
        }
        let old = s.frame.as_ref().map_or(0, |f| f.pixels.len() * 4);
        let new = rect.width as usize * rect.height as usize * 4;
        if self.used.saturating_sub(old) + new > MAX_HOST_BYTES {
            return NO_MEMORY;
        }
        let whole = Rect::new(0, 0, rect.width, rect.height);
        if s.frame.as_ref().map(|f| (f.width, f.height)) != Some((rect.width, rect.height)) {
            let Some(pixels) = alloc_pixels(new / 4) else {
                return NO_MEMORY;
            };
            self.used = self.used.saturating_sub(old) + new;
            self.scanouts[i].frame = Some(Frame {
                width: rect.width,
                height: rect.height,
                stride: rect.width,
                pixels,
            });
            self.sink.resize(scanout, rect.width, rect.height);
        }
        let s = &mut self.scanouts[i];
        s.resource_id = id;
        s.rect = rect;
        if let Some(f) = s.frame.as_mut() {
            copy_rect(r, rect, f, whole);
            self.sink.update(scanout, whole, f);
        }
        OK
    }

    fn flush(&mut self, id: u32, rect: Rect) -> Response {
        let Some(r) = self.resources.get(&id) else {
            return BAD_RESOURCE;
        };
        if !rect.fits_in(r.width, r.height) {
            return BAD_PARAMETER;
        }
        for (i, s) in self.scanouts.iter_mut().enumerate() {
            if s.resource_id != id {
                continue;
            }
            let part = rect.intersect(&s.rect);
            let Some(frame) = s.frame.as_mut() else {
                continue;
            };
            if part.is_empty() {
                continue;
            }
            let at = Rect::new(
                part.x - s.rect.x,
                part.y - s.rect.y,
                part.width,
                part.height,
            );
            copy_rect(r, part, frame, at);
            self.sink.update(super::super::len_u32(i), at, frame);
        }
        OK
    }

    fn transfer(&mut self, mem: &GuestMemoryMmap, id: u32, rect: Rect, offset: u64) -> Response {
        let Some(r) = self.resources.get_mut(&id) else {
            return BAD_RESOURCE;
        };
        match r.transfer(mem, rect, offset) {
            Ok(()) => OK,
            Err(TransferError::Rect | TransferError::Backing(BackingError::TooShort)) => {
                BAD_PARAMETER
            }
            Err(TransferError::NoBacking | TransferError::Backing(BackingError::OutsideRam)) => {
                UNSPEC
            }
        }
    }

    fn attach(&mut self, mem: &GuestMemoryMmap, id: u32, entries: Vec<MemEntry>) -> Response {
        let Some(r) = self.resources.get_mut(&id) else {
            return BAD_RESOURCE;
        };
        if r.backing.is_some() {
            return UNSPEC;
        }
        let cost = entries.len() * ENTRY_COST;
        if self.used + cost > MAX_HOST_BYTES {
            return NO_MEMORY;
        }
        match Backing::new(entries, mem) {
            Ok(b) => {
                self.used += b.cost();
                r.backing = Some(b);
                OK
            }
            Err(_) => BAD_PARAMETER,
        }
    }

    fn detach(&mut self, id: u32) -> Response {
        let Some(r) = self.resources.get_mut(&id) else {
            return BAD_RESOURCE;
        };
        match r.backing.take() {
            Some(b) => {
                self.used = self.used.saturating_sub(b.cost());
                OK
            }
            None => UNSPEC,
        }
    }

    fn update_cursor(&mut self, c: CursorCmd) -> Response {
        if self.scanout_index(c.scanout).is_none() {
            return BAD_SCANOUT;
        }
        let image = if c.resource_id == 0 {
            None
        } else {
            let Some(r) = self.resources.get(&c.resource_id) else {
                return BAD_RESOURCE;
            };
            if r.width > MAX_CURSOR_DIM || r.height > MAX_CURSOR_DIM {
                return BAD_PARAMETER;
            }
            Some(Frame {
                width: r.width,
                height: r.height,
                stride: r.width,
                pixels: r.pixels.clone(),
            })
        };
        self.cursor = Cursor {
            scanout: c.scanout,
            x: c.x,
            y: c.y,
            hot_x: c.hot_x,
            hot_y: c.hot_y,
            image,
        };
        self.sink.cursor(&self.cursor, true);
        OK
    }

    fn move_cursor(&mut self, c: CursorCmd) -> Response {
        if self.scanout_index(c.scanout).is_none() {
            return BAD_SCANOUT;
        }
        self.cursor.scanout = c.scanout;
        self.cursor.x = c.x;
        self.cursor.y = c.y;
        self.sink.cursor(&self.cursor, false);
        OK
    }

    /// Reads restored resources from their backing again and shows the
    /// scanouts' pictures (after a restore, once guest memory is there).
    pub fn reload(&mut self, mem: &GuestMemoryMmap) {
        if !std::mem::take(&mut self.reload_pending) {
            return;
        }
        for (id, r) in &mut self.resources {
            if r.backing.is_some() {
                if let Err(e) = r.reload(mem) {
                    tracing::debug!(
                        resource = id,
                        "virtio-gpu: restored backing unreadable: {e:?}"
                    );
                }
            }
        }
        for (i, s) in self.scanouts.iter_mut().enumerate() {
            let (Some(r), Some(frame)) = (self.resources.get(&s.resource_id), s.frame.as_mut())
            else {
                continue;
            };
            let whole = Rect::new(0, 0, s.rect.width, s.rect.height);
            copy_rect(r, s.rect, frame, whole);
            let i = super::super::len_u32(i);
            self.sink.resize(i, s.rect.width, s.rect.height);
            self.sink.update(i, whole, frame);
        }
        if self.cursor.image.is_some() {
            self.sink.cursor(&self.cursor, true);
        }
    }
}

/// Copies `from` (within the resource) to `to` (the same size, within the
/// frame).
pub(super) fn copy_rect(r: &Resource, from: Rect, frame: &mut Frame, to: Rect) {
    let (rw, fw) = (r.width as usize, frame.stride as usize);
    let n = from.width as usize;
    for row in 0..from.height as usize {
        let src = (from.y as usize + row) * rw + from.x as usize;
        let dst = (to.y as usize + row) * fw + to.x as usize;
        if let (Some(s), Some(d)) = (
            r.pixels.get(src..src + n),
            frame.pixels.get_mut(dst..dst + n),
        ) {
            d.copy_from_slice(s);
        }
    }
}
