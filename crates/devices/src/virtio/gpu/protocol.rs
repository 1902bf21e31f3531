//! The virtio-gpu wire format (virtio 1.2, 5.7.6): the command header,
//! the 2D commands the device serves and their responses. Decoding is a
//! pure function of the bytes the driver made device-readable, so the
//! fuzzer can drive it without a queue; every length comes from the
//! command type, never from the guest (an attach-backing's entry count
//! is capped before anything is allocated for it).

/// Feature: the device answers GET_EDID.
pub const VIRTIO_GPU_F_EDID: u32 = 1;

/// A display event is pending (config `events_read`).
pub const VIRTIO_GPU_EVENT_DISPLAY: u32 = 1;

/// Command types.
pub const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
pub const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
pub const CMD_RESOURCE_UNREF: u32 = 0x0102;
pub const CMD_SET_SCANOUT: u32 = 0x0103;
pub const CMD_RESOURCE_FLUSH: u32 = 0x0104;
pub const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
pub const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
pub const CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
pub const CMD_GET_EDID: u32 = 0x010a;
pub const CMD_UPDATE_CURSOR: u32 = 0x0300;
pub const CMD_MOVE_CURSOR: u32 = 0x0301;

/// Response types.
pub const RESP_OK_NODATA: u32 = 0x1100;
pub const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
pub const RESP_OK_EDID: u32 = 0x1104;
pub const RESP_ERR_UNSPEC: u32 = 0x1200;
pub const RESP_ERR_OUT_OF_MEMORY: u32 = 0x1201;
pub const RESP_ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
pub const RESP_ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
pub const RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;

/// The header flag asking for a fence: the response carries it back with
/// the fence id.
pub const FLAG_FENCE: u32 = 1;
/// The header flag naming a context ring (`ring_idx`); kept in the
/// response like the fence.
pub const FLAG_INFO_RING_IDX: u32 = 2;

/// The most scanouts the protocol describes (`pmodes[16]`).
pub const MAX_SCANOUTS: usize = 16;
/// The size of `virtio_gpu_ctrl_hdr`.
pub const HDR_LEN: usize = 24;
/// The size of one `virtio_gpu_mem_entry`.
pub const MEM_ENTRY_LEN: usize = 16;
/// The most backing entries one resource may have (a 128 MiB resource in
/// single 4 KiB pages), and so the longest attach request decoded.
pub const MAX_BACKING_ENTRIES: usize = 32 * 1024;
/// The longest device-readable part of a request the device reads.
pub const MAX_REQUEST_LEN: usize = HDR_LEN + 8 + MAX_BACKING_ENTRIES * MEM_ENTRY_LEN;
/// The size of a display-info response.
pub const DISPLAY_INFO_LEN: usize = HDR_LEN + MAX_SCANOUTS * 24;
/// The size of an EDID response (`size`, padding, 1024 bytes).
pub const EDID_RESP_LEN: usize = HDR_LEN + 8 + 1024;

/// A rectangle in pixels, as the protocol carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub fn new(x: u32, y: u32, width: u32, height: u32) -> Self {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    /// Whether the rectangle lies within a `width`×`height` area (no
    /// overflow: the ends are computed in 64 bits).
    pub fn fits_in(&self, width: u32, height: u32) -> bool {
        u64::from(self.x) + u64::from(self.width) <= u64::from(width)
            && u64::from(self.y) + u64::from(self.height) <= u64::from(height)
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// The common part of two rectangles (empty if none).
    pub fn intersect(&self, other: &Rect) -> Rect {
        let x0 = self.x.max(other.x);
        let y0 = self.y.max(other.y);
        let x1 = end(self.x, self.width).min(end(other.x, other.width));
        let y1 = end(self.y, self.height).min(end(other.y, other.height));
        if x1 <= u64::from(x0) || y1 <= u64::from(y0) {
            return Rect::default();
        }
        // Both ends are at most u32::MAX + u32::MAX; the differences fit
        // since each side's own extent fits in a u32.
        Rect::new(
            x0,
            y0,
            u32::try_from(x1 - u64::from(x0)).unwrap_or(0),
            u32::try_from(y1 - u64::from(y0)).unwrap_or(0),
        )
    }
}

fn end(start: u32, len: u32) -> u64 {
    u64::from(start) + u64::from(len)
}

/// `virtio_gpu_ctrl_hdr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtrlHdr {
    pub kind: u32,
    pub flags: u32,
    pub fence_id: u64,
    pub ctx_id: u32,
    pub ring_idx: u8,
}

impl CtrlHdr {
    pub fn decode(b: &[u8]) -> Option<CtrlHdr> {
        let mut r = Fields::new(b.get(..HDR_LEN)?);
        Some(CtrlHdr {
            kind: r.u32(),
            flags: r.u32(),
            fence_id: r.u64(),
            ctx_id: r.u32(),
            ring_idx: b[20],
        })
    }

    /// The header of the response to this request: `kind`, with the fence
    /// (and ring) the request asked for.
    pub fn response(&self, kind: u32) -> [u8; HDR_LEN] {
        let mut out = [0u8; HDR_LEN];
        let flags = self.flags & (FLAG_FENCE | FLAG_INFO_RING_IDX);
        out[0..4].copy_from_slice(&kind.to_le_bytes());
        out[4..8].copy_from_slice(&flags.to_le_bytes());
        if flags & FLAG_FENCE != 0 {
            out[8..16].copy_from_slice(&self.fence_id.to_le_bytes());
            out[16..20].copy_from_slice(&self.ctx_id.to_le_bytes());
            if flags & FLAG_INFO_RING_IDX != 0 {
                out[20] = self.ring_idx;
            }
        }
        out
    }
}

/// One guest-physical piece of a resource's backing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemEntry {
    pub addr: u64,
    pub len: u32,
}

/// `virtio_gpu_cursor_pos` and the rest of an update/move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CursorCmd {
    pub scanout: u32,
    pub x: u32,
    pub y: u32,
    pub resource_id: u32,
    pub hot_x: u32,
    pub hot_y: u32,
}

/// A decoded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    GetDisplayInfo,
    GetEdid {
        scanout: u32,
    },
    ResourceCreate2d {
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    },
    ResourceUnref {
        resource_id: u32,
    },
    SetScanout {
        rect: Rect,
        scanout: u32,
        resource_id: u32,
    },
    ResourceFlush {
        rect: Rect,
        resource_id: u32,
    },
    TransferToHost2d {
        rect: Rect,
        offset: u64,
        resource_id: u32,
    },
    AttachBacking {
        resource_id: u32,
        entries: Vec<MemEntry>,
    },
    DetachBacking {
        resource_id: u32,
    },
    UpdateCursor(CursorCmd),
    MoveCursor(CursorCmd),
}

/// Why a request was not decoded; each maps to the error response the
/// driver gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the request is shorter than a command header")]
    NoHeader,
    #[error("command {0:#x} is not supported")]
    Unsupported(u32),
    #[error("command {kind:#x} needs {need} bytes, the request has {got}")]
    Short { kind: u32, need: usize, got: usize },
    #[error("an attach of {0} backing entries is more than the device takes")]
    TooManyEntries(u32),
}

impl DecodeError {
    /// The response type that reports this error.
    pub fn response(&self) -> u32 {
        match self {
            DecodeError::TooManyEntries(_) => RESP_ERR_INVALID_PARAMETER,
            _ => RESP_ERR_UNSPEC,
        }
    }
}

/// Little-endian fields read in order from a slice known to be long
/// enough (a missing byte reads as zero).
struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(b: &'a [u8]) -> Self {
        Fields { b, at: 0 }
    }
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut v = [0u8; N];
        if let Some(s) = self.b.get(self.at..self.at + N) {
            v.copy_from_slice(s);
        }
        self.at += N;
        v
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn rect(&mut self) -> Rect {
        Rect::new(self.u32(), self.u32(), self.u32(), self.u32())
    }
}

/// The size of a command's fixed part (header included).
fn command_len(kind: u32) -> Option<usize> {
    Some(match kind {
        CMD_GET_DISPLAY_INFO => HDR_LEN,
        CMD_GET_EDID | CMD_RESOURCE_UNREF | CMD_RESOURCE_DETACH_BACKING => HDR_LEN + 8,
        CMD_RESOURCE_CREATE_2D => HDR_LEN + 16,
        CMD_SET_SCANOUT | CMD_RESOURCE_FLUSH => HDR_LEN + 24,
        CMD_TRANSFER_TO_HOST_2D => HDR_LEN + 32,
        CMD_RESOURCE_ATTACH_BACKING => HDR_LEN + 8,
        CMD_UPDATE_CURSOR | CMD_MOVE_CURSOR => HDR_LEN + 32,
        _ => return None,
    })
}

/// Decodes a request (the device-readable bytes of a chain).
pub fn decode(b: &[u8]) -> Result<(CtrlHdr, Command), (Option<CtrlHdr>, DecodeError)> {
    let hdr = CtrlHdr::decode(b).ok_or((None, DecodeError::NoHeader))?;
    let fail = |e| (Some(hdr), e);
    let need = command_len(hdr.kind).ok_or(fail(DecodeError::Unsupported(hdr.kind)))?;
    if b.len() < need {
        return Err(fail(DecodeError::Short {
            kind: hdr.kind,
            need,
            got: b.len(),
        }));
    }
    let mut f = Fields::new(&b[HDR_LEN..need]);
    let cmd = match hdr.kind {
        CMD_GET_DISPLAY_INFO => Command::GetDisplayInfo,
        CMD_GET_EDID => Command::GetEdid { scanout: f.u32() },
        CMD_RESOURCE_CREATE_2D => Command::ResourceCreate2d {
            resource_id: f.u32(),
            format: f.u32(),
            width: f.u32(),
            height: f.u32(),
        },
        CMD_RESOURCE_UNREF => Command::ResourceUnref {
            resource_id: f.u32(),
        },
        CMD_SET_SCANOUT => Command::SetScanout {
            rect: f.rect(),
            scanout: f.u32(),
            resource_id: f.u32(),
        },
        CMD_RESOURCE_FLUSH => Command::ResourceFlush {
            rect: f.rect(),
            resource_id: f.u32(),
        },
        CMD_TRANSFER_TO_HOST_2D => Command::TransferToHost2d {
            rect: f.rect(),
            offset: f.u64(),
            resource_id: f.u32(),
        },
        CMD_RESOURCE_ATTACH_BACKING => {
            let resource_id = f.u32();
            let count = f.u32();
            let n = usize::try_from(count)
                .ok()
                .filter(|&n| n <= MAX_BACKING_ENTRIES)
                .ok_or(fail(DecodeError::TooManyEntries(count)))?;
            let list = &b[need..];
            if list.len() / MEM_ENTRY_LEN < n {
                return Err(fail(DecodeError::Short {
                    kind: hdr.kind,
                    need: need + n * MEM_ENTRY_LEN,
                    got: b.len(),
                }));
            }
            let entries = list
                .chunks_exact(MEM_ENTRY_LEN)
                .take(n)
                .map(|e| {
                    let mut f = Fields::new(e);
                    MemEntry {
                        addr: f.u64(),
                        len: f.u32(),
                    }
                })
                .collect();
            Command::AttachBacking {
                resource_id,
                entries,
            }
        }
        CMD_RESOURCE_DETACH_BACKING => Command::DetachBacking {
            resource_id: f.u32(),
        },
        CMD_UPDATE_CURSOR | CMD_MOVE_CURSOR => {
            let c = CursorCmd {
                scanout: f.u32(),
                x: f.u32(),
                y: f.u32(),
                resource_id: {
                    let _padding = f.u32();
                    f.u32()
                },
                hot_x: f.u32(),
                hot_y: f.u32(),
            };
            if hdr.kind == CMD_UPDATE_CURSOR {
                Command::UpdateCursor(c)
            } else {
                Command::MoveCursor(c)
            }
        }
        other => return Err(fail(DecodeError::Unsupported(other))),
    };
    Ok((hdr, cmd))
}

/// What the device answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// A response with no data: OK_NODATA or an error type.
    NoData(u32),
    /// Each scanout's preferred size and whether it is enabled.
    DisplayInfo(Vec<(Rect, bool)>),
    /// An EDID block.
    Edid(Vec<u8>),
}

impl Response {
    pub fn kind(&self) -> u32 {
        match self {
            Response::NoData(k) => *k,
            Response::DisplayInfo(_) => RESP_OK_DISPLAY_INFO,
            Response::Edid(_) => RESP_OK_EDID,
        }
    }

    /// The response's bytes, after the header of `request`.
    pub fn encode(&self, request: &CtrlHdr) -> Vec<u8> {
        let mut out = request.response(self.kind()).to_vec();
        match self {
            Response::NoData(_) => {}
            Response::DisplayInfo(modes) => {
                for i in 0..MAX_SCANOUTS {
                    let (r, enabled) = modes.get(i).copied().unwrap_or_default();
                    for v in [r.x, r.y, r.width, r.height, u32::from(enabled), 0] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
            Response::Edid(edid) => {
                let n = edid.len().min(1024);
                out.extend_from_slice(&super::super::len_u32(n).to_le_bytes());
                out.extend_from_slice(&[0; 4]);
                out.extend_from_slice(&edid[..n]);
                out.resize(EDID_RESP_LEN, 0);
            }
        }
        out
    }
}
