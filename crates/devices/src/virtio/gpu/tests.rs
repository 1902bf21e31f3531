//! virtio-gpu driven as Linux's driver drives it: requests through real
//! split queues in test guest memory, the sink recording what the host
//! would see.

use std::sync::{Arc, Mutex};

use memory::GuestMemoryMmap;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{GpuBackend, MAX_HOST_BYTES};
use super::protocol::*;
use super::queue::{process_queue, GpuQueue};
use super::*;
use crate::test_util::{desc as d, F_NEXT, F_WRITE};
use crate::virtio::Interrupt;

/// Where requests go (64 KiB apart), where responses go, and where the
/// guest's framebuffers live.
const REQ: u64 = 0x10_0000;
const RESP: u64 = 0x18_0000;
const FB: u64 = 0x20_0000;
const RAM: usize = 16 << 20;

fn mem() -> &'static GuestMemoryMmap {
    Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap(),
    ))
}

/// What the sink was told.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Resize(u32, u32, u32),
    /// The rectangle and its pixels as the frame had them.
    Update(u32, Rect, Vec<u32>),
    Cursor {
        x: u32,
        y: u32,
        image: Option<(u32, u32, u32)>,
        changed: bool,
    },
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Seen>>);

impl Recorder {
    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
    fn seen(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }
}

impl DisplaySink for Recorder {
    fn resize(&self, scanout: u32, width: u32, height: u32) {
        self.0
            .lock()
            .unwrap()
            .push(Seen::Resize(scanout, width, height));
    }
    fn update(&self, scanout: u32, rect: Rect, frame: &Frame) {
        let mut px = Vec::new();
        for y in rect.y..rect.y + rect.height {
            for x in rect.x..rect.x + rect.width {
                px.push(frame.pixel(x, y).unwrap());
            }
        }
        self.0.lock().unwrap().push(Seen::Update(scanout, rect, px));
    }
    fn cursor(&self, c: &Cursor, changed: bool) {
        self.0.lock().unwrap().push(Seen::Cursor {
            x: c.x,
            y: c.y,
            // Size and the first pixel.
            image: c.image.as_ref().map(|f| (f.width, f.height, f.pixels[0])),
            changed,
        });
    }
}

fn le(fields: &[u32]) -> Vec<u8> {
    fields.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn hdr(kind: u32, flags: u32, fence: u64) -> Vec<u8> {
    let mut h = le(&[kind, flags]);
    h.extend(fence.to_le_bytes());
    h.extend(le(&[5, 0x0000_0003]));
    h
}

/// A command: header and little-endian fields.
fn cmd(kind: u32, fields: &[u32]) -> Vec<u8> {
    let mut c = hdr(kind, 0, 0);
    c.extend(le(fields));
    c
}

fn create(id: u32, format: u32, w: u32, h: u32) -> Vec<u8> {
    cmd(CMD_RESOURCE_CREATE_2D, &[id, format, w, h])
}

fn set_scanout(scanout: u32, id: u32, r: Rect) -> Vec<u8> {
    cmd(CMD_SET_SCANOUT, &[r.x, r.y, r.width, r.height, scanout, id])
}

fn flush(id: u32, r: Rect) -> Vec<u8> {
    cmd(CMD_RESOURCE_FLUSH, &[r.x, r.y, r.width, r.height, id, 0])
}

fn transfer(id: u32, r: Rect, offset: u64) -> Vec<u8> {
    let (lo, hi) = (offset as u32, (offset >> 32) as u32);
    cmd(
        CMD_TRANSFER_TO_HOST_2D,
        &[r.x, r.y, r.width, r.height, lo, hi, id, 0],
    )
}

fn attach_head(id: u32, n: u32) -> Vec<u8> {
    cmd(CMD_RESOURCE_ATTACH_BACKING, &[id, n])
}

fn entries(list: &[(u64, u32)]) -> Vec<u8> {
    let mut v = Vec::new();
    for &(addr, len) in list {
        v.extend(addr.to_le_bytes());
        v.extend(le(&[len, 0]));
    }
    v
}

fn cursor_cmd(kind: u32, scanout: u32, x: u32, y: u32, id: u32) -> Vec<u8> {
    cmd(kind, &[scanout, x, y, 0, id, 2, 3, 0])
}

fn rect(x: u32, y: u32, w: u32, h: u32) -> Rect {
    Rect::new(x, y, w, h)
}

fn kind(resp: &[u8]) -> u32 {
    u32::from_le_bytes(resp[0..4].try_into().unwrap())
}

/// The guest's view of a pixel in B8G8R8X8 (what Linux's XRGB8888 is):
/// a colour made of its coordinates.
fn colour(x: u32, y: u32) -> u32 {
    0x0001_0000 * (x & 0xff) + 0x100 * (y & 0xff) + 0x5a
}

/// Writes a `w`×`h` XRGB8888 picture into guest memory at `at`.
fn draw(m: &GuestMemoryMmap, at: u64, w: u32, h: u32, shift: u32) {
    let mut bytes = Vec::new();
    for y in 0..h {
        for x in 0..w {
            bytes.extend((colour(x, y) + shift).to_le_bytes());
        }
    }
    m.write_slice(&bytes, GuestAddress(at)).unwrap();
}

/// A device behind one mock queue, served synchronously.
struct Dev {
    mem: &'static GuestMemoryMmap,
    mock: MockSplitQueue<'static, GuestMemoryMmap>,
    queue: Queue,
    next_desc: u16,
    used: u16,
    backend: Mutex<GpuBackend>,
    sink: Arc<Recorder>,
    irq: Interrupt,
}

impl Dev {
    fn new(modes: &[(u32, u32)]) -> Dev {
        let mem = mem();
        let mock = MockSplitQueue::new(mem, 256);
        let queue = mock.create_queue().unwrap();
        let sink = Arc::new(Recorder::default());
        let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Dev {
            mem,
            mock,
            queue,
            next_desc: 0,
            used: 0,
            backend: Mutex::new(GpuBackend::new(modes, sink.clone())),
            sink,
            irq: Interrupt::new(line),
        }
    }

    /// Sends a request made of `parts` (each its own device-readable
    /// descriptor) with a `resp_len`-byte response buffer on `which`;
    /// the used length and the response bytes.
    fn send_on(&mut self, which: GpuQueue, parts: &[&[u8]], resp_len: u32) -> (u32, Vec<u8>) {
        let mut descs = Vec::new();
        let base = self.next_desc;
        for (i, p) in parts.iter().enumerate() {
            let at = REQ + i as u64 * 0x1_0000;
            self.mem.write_slice(p, GuestAddress(at)).unwrap();
            descs.push(d(at, p.len() as u32, F_NEXT, base + i as u16 + 1));
        }
        if resp_len > 0 {
            self.mem
                .write_slice(&vec![0xee; resp_len as usize], GuestAddress(RESP))
                .unwrap();
            descs.push(d(RESP, resp_len, F_WRITE, 0));
        } else if let Some(last) = descs.last_mut() {
            *last = d(
                REQ + (parts.len() as u64 - 1) * 0x1_0000,
                parts[parts.len() - 1].len() as u32,
                0,
                0,
            );
        }
        self.send_descs(which, &descs)
    }

    fn send_descs(
        &mut self,
        which: GpuQueue,
        descs: &[virtio_queue::desc::RawDescriptor],
    ) -> (u32, Vec<u8>) {
        self.mock.add_desc_chains(descs, self.next_desc).unwrap();
        self.next_desc = (self.next_desc + descs.len() as u16) % 240;
        process_queue(which, &mut self.queue, self.mem, &self.irq, &self.backend);
        assert_eq!(
            self.mock.used().idx().load(),
            self.used + 1,
            "the chain was used"
        );
        let elem = self
            .mock
            .used()
            .ring()
            .ref_at(usize::from(self.used))
            .unwrap()
            .load();
        self.used += 1;
        let mut out = vec![0u8; elem.len() as usize];
        self.mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
        (elem.len(), out)
    }

    /// Sends a one-part control request; its response (which must have
    /// come).
    fn send(&mut self, req: &[u8]) -> Vec<u8> {
        let (len, out) = self.send_on(GpuQueue::Control, &[req], 2048);
        assert!(len >= HDR_LEN as u32, "a response came");
        out
    }

    /// Sends a control request and returns its response type.
    fn status(&mut self, req: &[u8]) -> u32 {
        kind(&self.send(req))
    }

    fn attach(&mut self, id: u32, list: &[(u64, u32)]) -> u32 {
        let head = attach_head(id, list.len() as u32);
        let (_, out) = self.send_on(GpuQueue::Control, &[&head, &entries(list)], 64);
        kind(&out)
    }

    fn frame(&self) -> Option<Frame> {
        self.backend.lock().unwrap().frame(0)
    }

    fn host_bytes(&self) -> usize {
        self.backend.lock().unwrap().host_bytes()
    }
}

/// The pixels of `r` of the picture `draw` made (width `w`, `shift`),
/// as the host sees them (alpha 0xff).
fn expected(r: Rect, shift: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for y in r.y..r.y + r.height {
        for x in r.x..r.x + r.width {
            v.push(0xff00_0000 | (colour(x, y) + shift));
        }
    }
    v
}

/// What Linux does at boot and on every frame: display info, create,
/// attach (entries in a second descriptor, pages not in order), set
/// scanout, transfer, flush — the sink gets the mode, then exactly the
/// flushed rectangle with exactly the guest's pixels.
#[test]
fn a_guest_frame_reaches_the_sink_exactly() {
    let mut dev = Dev::new(&[(1280, 800), (640, 480)]);
    let out = dev.send(&cmd(CMD_GET_DISPLAY_INFO, &[]));
    assert_eq!(out.len(), DISPLAY_INFO_LEN);
    assert_eq!(kind(&out), RESP_OK_DISPLAY_INFO);
    let one = |i: usize| {
        let b = &out[HDR_LEN + i * 24..HDR_LEN + i * 24 + 24];
        let f = |k: usize| u32::from_le_bytes(b[k * 4..k * 4 + 4].try_into().unwrap());
        (f(0), f(1), f(2), f(3), f(4))
    };
    assert_eq!(one(0), (0, 0, 1280, 800, 1));
    assert_eq!(one(1), (0, 0, 640, 480, 1));
    assert_eq!(one(2), (0, 0, 0, 0, 0));

    let (w, h) = (64u32, 48u32);
    let size = w * h * 4;
    assert_eq!(dev.status(&create(1, 2, w, h)), RESP_OK_NODATA);
    // Two pieces, the second half first in guest memory.
    let half = size / 2;
    let pieces = [(FB + u64::from(half), half), (FB, half)];
    assert_eq!(dev.attach(1, &pieces), RESP_OK_NODATA);
    // The picture as the backing sees it: first half at FB + half.
    draw(dev.mem, FB + 0x10_0000, w, h, 0);
    let mut pic = vec![0u8; size as usize];
    dev.mem
        .read_slice(&mut pic, GuestAddress(FB + 0x10_0000))
        .unwrap();
    dev.mem
        .write_slice(&pic[..half as usize], GuestAddress(FB + u64::from(half)))
        .unwrap();
    dev.mem
        .write_slice(&pic[half as usize..], GuestAddress(FB))
        .unwrap();

    assert_eq!(
        dev.status(&set_scanout(0, 1, rect(0, 0, w, h))),
        RESP_OK_NODATA
    );
    let seen = dev.sink.take();
    assert_eq!(seen[0], Seen::Resize(0, w, h));
    assert_eq!(
        seen[1],
        Seen::Update(0, rect(0, 0, w, h), vec![0; (w * h) as usize])
    );
    assert_eq!(seen.len(), 2);

    // Linux transfers and flushes the damaged part: offset = y × pitch
    // + x × 4.
    let r = rect(8, 4, 16, 8);
    let offset = u64::from(4 * w * 4 + 8 * 4);
    assert_eq!(dev.status(&transfer(1, r, offset)), RESP_OK_NODATA);
    assert!(dev.sink.take().is_empty(), "a transfer alone shows nothing");
    assert_eq!(dev.status(&flush(1, r)), RESP_OK_NODATA);
    assert_eq!(dev.sink.take(), vec![Seen::Update(0, r, expected(r, 0))]);
    let frame = dev.frame().unwrap();
    assert_eq!((frame.width, frame.height, frame.stride), (w, h, w));
    assert_eq!(frame.pixel(8, 4), Some(0xff00_0000 | colour(8, 4)));
    assert_eq!(frame.pixel(7, 4), Some(0), "outside the transfer");
    assert_eq!(frame.pixel(24, 11), Some(0), "outside the transfer");

    // The whole picture; a flush outside any scanout's part shows
    // nothing, the other scanout shows a part of the resource.
    let all = rect(0, 0, w, h);
    assert_eq!(dev.status(&transfer(1, all, 0)), RESP_OK_NODATA);
    assert_eq!(
        dev.status(&set_scanout(1, 1, rect(32, 16, 32, 32))),
        RESP_OK_NODATA
    );
    let seen = dev.sink.take();
    assert_eq!(seen[0], Seen::Resize(1, 32, 32));
    assert_eq!(
        seen[1],
        Seen::Update(1, rect(0, 0, 32, 32), expected(rect(32, 16, 32, 32), 0))
    );
    assert_eq!(dev.status(&flush(1, rect(40, 20, 4, 4))), RESP_OK_NODATA);
    assert_eq!(
        dev.sink.take(),
        vec![
            Seen::Update(0, rect(40, 20, 4, 4), expected(rect(40, 20, 4, 4), 0)),
            Seen::Update(1, rect(8, 4, 4, 4), expected(rect(40, 20, 4, 4), 0)),
        ]
    );
    assert_eq!(dev.status(&flush(1, rect(0, 0, 8, 8))), RESP_OK_NODATA);
    assert_eq!(
        dev.sink.take(),
        vec![Seen::Update(
            0,
            rect(0, 0, 8, 8),
            expected(rect(0, 0, 8, 8), 0)
        )]
    );
    // Every request used its queue; each raised the interrupt.
    assert!(dev.irq.status() & crate::virtio::INT_VRING != 0);

    // Setting the same scanout again changes nothing; unref turns it off.
    assert_eq!(dev.status(&set_scanout(0, 1, all)), RESP_OK_NODATA);
    assert!(dev.sink.take().is_empty());
    assert_eq!(
        dev.status(&cmd(CMD_RESOURCE_UNREF, &[1, 0])),
        RESP_OK_NODATA
    );
    assert_eq!(
        dev.sink.take(),
        vec![Seen::Resize(0, 0, 0), Seen::Resize(1, 0, 0)]
    );
    assert_eq!(dev.frame(), None);
    assert_eq!(dev.host_bytes(), 0, "everything the guest made is gone");
}

/// A fenced request's response carries the fence back.
#[test]
fn fences_are_answered() {
    let mut dev = Dev::new(&[(1280, 800)]);
    let mut req = hdr(CMD_RESOURCE_CREATE_2D, FLAG_FENCE, 0x1234_5678_9abc);
    req.extend(le(&[1, 1, 16, 16]));
    let out = dev.send(&req);
    assert_eq!(out.len(), HDR_LEN);
    assert_eq!(kind(&out), RESP_OK_NODATA);
    assert_eq!(
        u32::from_le_bytes(out[4..8].try_into().unwrap()),
        FLAG_FENCE
    );
    assert_eq!(
        u64::from_le_bytes(out[8..16].try_into().unwrap()),
        0x1234_5678_9abc
    );
    assert_eq!(
        u32::from_le_bytes(out[16..20].try_into().unwrap()),
        5,
        "ctx_id"
    );
    // Without the flag, no fence comes back.
    let out = dev.send(&cmd(CMD_GET_DISPLAY_INFO, &[]));
    assert_eq!(&out[4..24], &[0; 20]);
    // A failed fenced request still answers the fence.
    let mut req = hdr(CMD_RESOURCE_UNREF, FLAG_FENCE, 9);
    req.extend(le(&[77, 0]));
    let out = dev.send(&req);
    assert_eq!(kind(&out), RESP_ERR_INVALID_RESOURCE_ID);
    assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 9);
}

#[test]
fn edid_describes_the_current_mode() {
    let mut dev = Dev::new(&[(1280, 800), (1024, 768)]);
    let out = dev.send(&cmd(CMD_GET_EDID, &[1, 0]));
    assert_eq!(kind(&out), RESP_OK_EDID);
    assert_eq!(out.len(), EDID_RESP_LEN);
    assert_eq!(u32::from_le_bytes(out[24..28].try_into().unwrap()), 128);
    let e = &out[32..160];
    assert_eq!(e, &edid::edid(1024, 768)[..]);
    assert_eq!(e.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
    assert!(out[160..].iter().all(|&b| b == 0));
    assert!(dev.backend.lock().unwrap().set_mode(1, 800, 600));
    let out = dev.send(&cmd(CMD_GET_EDID, &[1, 0]));
    assert_eq!(&out[32..160], &edid::edid(800, 600)[..]);
    assert_eq!(
        dev.status(&cmd(CMD_GET_EDID, &[2, 0])),
        RESP_ERR_INVALID_SCANOUT_ID
    );
}

/// Every hostile request gets its error, and the device goes on working
/// (each case is followed by a request that must succeed).
#[test]
fn hostile_requests_fail_cleanly() {
    let mut dev = Dev::new(&[(1280, 800)]);
    assert_eq!(dev.status(&create(1, 2, 16, 16)), RESP_OK_NODATA);
    assert_eq!(dev.status(&create(9, 2, 64, 64)), RESP_OK_NODATA);
    let big = rect(0, 0, u32::MAX, 1);
    let wrap = rect(u32::MAX, 0, 2, 1);
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "resource id 0",
            create(0, 2, 4, 4),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "an id in use",
            create(1, 2, 4, 4),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "an unknown format",
            create(2, 5, 4, 4),
            RESP_ERR_INVALID_PARAMETER,
        ),
        ("format 0", create(2, 0, 4, 4), RESP_ERR_INVALID_PARAMETER),
        ("no width", create(2, 2, 0, 4), RESP_ERR_INVALID_PARAMETER),
        (
            "too wide",
            create(2, 2, 16385, 1),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "u32::MAX tall",
            create(2, 2, 1, u32::MAX),
            RESP_ERR_INVALID_PARAMETER,
        ),
        ("1 GiB", create(2, 2, 16384, 16384), RESP_ERR_OUT_OF_MEMORY),
        (
            "unref unknown",
            cmd(CMD_RESOURCE_UNREF, &[2, 0]),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "scanout 1 of 1",
            set_scanout(1, 1, rect(0, 0, 4, 4)),
            RESP_ERR_INVALID_SCANOUT_ID,
        ),
        (
            "scanout u32::MAX",
            set_scanout(u32::MAX, 1, rect(0, 0, 4, 4)),
            RESP_ERR_INVALID_SCANOUT_ID,
        ),
        (
            "scanout of unknown",
            set_scanout(0, 3, rect(0, 0, 4, 4)),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "scanout too big",
            set_scanout(0, 1, rect(0, 0, 17, 16)),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "scanout wraps",
            set_scanout(0, 1, wrap),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "scanout empty",
            set_scanout(0, 1, rect(0, 0, 0, 0)),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "flush unknown",
            flush(3, rect(0, 0, 1, 1)),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        ("flush huge", flush(1, big), RESP_ERR_INVALID_PARAMETER),
        ("flush wraps", flush(1, wrap), RESP_ERR_INVALID_PARAMETER),
        (
            "transfer unknown",
            transfer(3, rect(0, 0, 1, 1), 0),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "transfer unbacked",
            transfer(1, rect(0, 0, 1, 1), 0),
            RESP_ERR_UNSPEC,
        ),
        (
            "transfer huge",
            transfer(1, big, 0),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "detach unbacked",
            cmd(CMD_RESOURCE_DETACH_BACKING, &[1, 0]),
            RESP_ERR_UNSPEC,
        ),
        (
            "detach unknown",
            cmd(CMD_RESOURCE_DETACH_BACKING, &[3, 0]),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "cursor scanout",
            cursor_cmd(CMD_UPDATE_CURSOR, 4, 0, 0, 1),
            RESP_ERR_INVALID_SCANOUT_ID,
        ),
        (
            "cursor unknown",
            cursor_cmd(CMD_UPDATE_CURSOR, 0, 0, 0, 3),
            RESP_ERR_INVALID_RESOURCE_ID,
        ),
        (
            "move scanout",
            cursor_cmd(CMD_MOVE_CURSOR, 4, 0, 0, 0),
            RESP_ERR_INVALID_SCANOUT_ID,
        ),
        ("3D context", cmd(0x0200, &[0; 8]), RESP_ERR_UNSPEC),
        ("capset info", cmd(0x0108, &[0, 0]), RESP_ERR_UNSPEC),
        ("blob", cmd(0x010c, &[0; 12]), RESP_ERR_UNSPEC),
        ("unknown", cmd(0xffff_ffff, &[]), RESP_ERR_UNSPEC),
        ("a response type", cmd(RESP_OK_NODATA, &[]), RESP_ERR_UNSPEC),
        (
            "short create",
            cmd(CMD_RESOURCE_CREATE_2D, &[2, 2, 4]),
            RESP_ERR_UNSPEC,
        ),
        ("short header", vec![0u8; 10], RESP_ERR_UNSPEC),
        (
            "attach too many",
            attach_head(1, MAX_BACKING_ENTRIES as u32 + 1),
            RESP_ERR_INVALID_PARAMETER,
        ),
        (
            "attach u32::MAX entries",
            attach_head(1, u32::MAX),
            RESP_ERR_INVALID_PARAMETER,
        ),
        ("attach entries missing", attach_head(1, 2), RESP_ERR_UNSPEC),
    ];
    for (what, req, want) in cases {
        assert_eq!(dev.status(&req), want, "{what}");
        assert_eq!(
            dev.status(&cmd(CMD_GET_DISPLAY_INFO, &[])),
            RESP_OK_DISPLAY_INFO
        );
    }

    // Backing entries: outside RAM, wrapping, straddling its end; an
    // attach to an unknown resource; a second attach.
    let end = RAM as u64;
    for list in [
        vec![(end, 4096)],
        vec![(end - 4096, 8192)],
        vec![(FB, 1024), (u64::MAX - 10, 100)],
    ] {
        assert_eq!(dev.attach(1, &list), RESP_ERR_INVALID_PARAMETER, "{list:?}");
    }
    assert_eq!(dev.attach(3, &[(FB, 1024)]), RESP_ERR_INVALID_RESOURCE_ID);
    // Too short for the resource: attached, but transfers past it fail.
    assert_eq!(dev.attach(1, &[(FB, 100)]), RESP_OK_NODATA);
    assert_eq!(dev.attach(1, &[(FB, 1024)]), RESP_ERR_UNSPEC);
    assert_eq!(
        dev.status(&transfer(1, rect(0, 0, 16, 1), 0)),
        RESP_OK_NODATA
    );
    assert_eq!(
        dev.status(&transfer(1, rect(0, 0, 16, 2), 0)),
        RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(
        dev.status(&transfer(1, rect(0, 0, 1, 1), u64::MAX - 2)),
        RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(
        dev.status(&cmd(CMD_RESOURCE_DETACH_BACKING, &[1, 0])),
        RESP_OK_NODATA
    );
    // Overlapping entries (the same page three times) are harmless.
    draw(dev.mem, FB, 16, 4, 7);
    assert_eq!(
        dev.attach(1, &[(FB, 256), (FB, 256), (FB, 256), (FB, 256)]),
        RESP_OK_NODATA
    );
    assert_eq!(
        dev.status(&transfer(1, rect(0, 0, 16, 16), 0)),
        RESP_OK_NODATA
    );
    assert_eq!(
        dev.status(&set_scanout(0, 1, rect(0, 0, 16, 16))),
        RESP_OK_NODATA
    );
    let f = dev.frame().unwrap();
    assert_eq!(f.pixel(3, 6), Some(0xff00_0000 | (colour(3, 2) + 7)));
    // A cursor larger than 256×256 is refused; the cursor queue answers
    // nothing, even for errors.
    assert_eq!(dev.status(&create(5, 1, 257, 4)), RESP_OK_NODATA);
    assert_eq!(
        dev.status(&cursor_cmd(CMD_UPDATE_CURSOR, 0, 0, 0, 5)),
        RESP_ERR_INVALID_PARAMETER
    );
    let bad = cursor_cmd(CMD_UPDATE_CURSOR, 7, 0, 0, 5);
    assert_eq!(dev.send_on(GpuQueue::Cursor, &[&bad], 64).0, 0);

    // Chains the device cannot use complete with nothing written: a
    // response buffer too small, none at all, a request outside RAM,
    // a readable buffer after the response buffer.
    let info = cmd(CMD_GET_DISPLAY_INFO, &[]);
    assert_eq!(dev.send_on(GpuQueue::Control, &[&info], 100).0, 0);
    assert_eq!(dev.send_on(GpuQueue::Control, &[&info], 0).0, 0);
    let n = dev.next_desc;
    assert_eq!(
        dev.send_descs(
            GpuQueue::Control,
            &[d(end - 8, 24, F_NEXT, n + 1), d(RESP, 512, F_WRITE, 0)]
        )
        .0,
        0
    );
    assert_eq!(dev.status(&info), RESP_OK_DISPLAY_INFO);
}

/// The host memory the guest can make the device hold is capped: by the
/// resource count, by each resource's size, and altogether.
#[test]
fn host_memory_is_bounded() {
    let mut dev = Dev::new(&[(1280, 800)]);
    // 8192×4096 is 128 MiB: two fit, a third does not, nor does one
    // pixel more.
    assert_eq!(dev.status(&create(1, 2, 8192, 4096)), RESP_OK_NODATA);
    assert_eq!(dev.status(&create(2, 2, 8192, 4096)), RESP_OK_NODATA);
    assert_eq!(dev.host_bytes(), MAX_HOST_BYTES);
    assert_eq!(dev.status(&create(3, 2, 1, 1)), RESP_ERR_OUT_OF_MEMORY);
    // Nor does a backing list, nor a scanout's frame.
    assert_eq!(dev.attach(1, &[(FB, 4096)]), RESP_ERR_OUT_OF_MEMORY);
    assert_eq!(
        dev.status(&set_scanout(0, 1, rect(0, 0, 64, 64))),
        RESP_ERR_OUT_OF_MEMORY
    );
    assert_eq!(
        dev.status(&cmd(CMD_RESOURCE_UNREF, &[2, 0])),
        RESP_OK_NODATA
    );
    assert_eq!(
        dev.status(&set_scanout(0, 1, rect(0, 0, 64, 64))),
        RESP_OK_NODATA
    );
    assert_eq!(dev.attach(1, &[(FB, 4096), (FB, 4096)]), RESP_OK_NODATA);
    assert_eq!(
        dev.host_bytes(),
        (128 << 20) + 64 * 64 * 4 + 2 * resources::ENTRY_COST
    );
    assert_eq!(
        dev.status(&cmd(CMD_RESOURCE_UNREF, &[1, 0])),
        RESP_OK_NODATA
    );
    assert_eq!(dev.host_bytes(), 0);
    // The resource count.
    for id in 1..=backend::MAX_RESOURCES as u32 {
        assert_eq!(
            dev.backend.lock().unwrap().execute(
                dev.mem,
                Command::ResourceCreate2d {
                    resource_id: id,
                    format: 1,
                    width: 1,
                    height: 1
                }
            ),
            Response::NoData(RESP_OK_NODATA)
        );
    }
    assert_eq!(dev.status(&create(99_999, 2, 1, 1)), RESP_ERR_OUT_OF_MEMORY);
}

/// The cursor queue: an update with an image, a move, hiding; nothing
/// is written back.
#[test]
fn the_cursor_follows_the_guest() {
    let mut dev = Dev::new(&[(1280, 800)]);
    assert_eq!(dev.status(&create(7, 1, 64, 64)), RESP_OK_NODATA);
    assert_eq!(dev.attach(7, &[(FB, 64 * 64 * 4)]), RESP_OK_NODATA);
    dev.mem
        .write_slice(&[0x10, 0x20, 0x30, 0x80], GuestAddress(FB))
        .unwrap();
    assert_eq!(
        dev.status(&transfer(7, rect(0, 0, 64, 64), 0)),
        RESP_OK_NODATA
    );
    let update = cursor_cmd(CMD_UPDATE_CURSOR, 0, 100, 200, 7);
    assert_eq!(dev.send_on(GpuQueue::Cursor, &[&update], 64).0, 0);
    let mv = cursor_cmd(CMD_MOVE_CURSOR, 0, 101, 202, 0);
    assert_eq!(dev.send_on(GpuQueue::Cursor, &[&mv], 0).0, 0);
    let hide = cursor_cmd(CMD_UPDATE_CURSOR, 0, 0, 0, 0);
    assert_eq!(dev.send_on(GpuQueue::Cursor, &[&hide], 0).0, 0);
    assert_eq!(
        dev.sink.take(),
        vec![
            Seen::Cursor {
                x: 100,
                y: 200,
                image: Some((64, 64, 0x8030_2010)),
                changed: true
            },
            Seen::Cursor {
                x: 101,
                y: 202,
                image: Some((64, 64, 0x8030_2010)),
                changed: false
            },
            Seen::Cursor {
                x: 0,
                y: 0,
                image: None,
                changed: true
            },
        ]
    );
    let c = dev.backend.lock().unwrap().cursor.clone();
    assert_eq!((c.hot_x, c.hot_y, c.image), (2, 3, None));
}

/// A device reset forgets the guest's objects and turns the display off.
#[test]
fn reset_forgets_everything() {
    let mut dev = Dev::new(&[(1280, 800)]);
    assert_eq!(dev.status(&create(1, 2, 16, 16)), RESP_OK_NODATA);
    assert_eq!(
        dev.status(&set_scanout(0, 1, rect(0, 0, 16, 16))),
        RESP_OK_NODATA
    );
    dev.sink.take();
    dev.backend.lock().unwrap().reset();
    assert_eq!(dev.sink.take(), vec![Seen::Resize(0, 0, 0)]);
    assert_eq!(dev.host_bytes(), 0);
    assert_eq!(
        dev.status(&flush(1, rect(0, 0, 1, 1))),
        RESP_ERR_INVALID_RESOURCE_ID
    );
    assert_eq!(dev.status(&create(1, 2, 16, 16)), RESP_OK_NODATA);
}

mod transport;
