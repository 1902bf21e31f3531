//! The device behind a virtio-mmio transport, with its worker thread:
//! dynamic resolution (event, config interrupt, new display info), and
//! the state's save → restore → save round trip with the restored device
//! showing the same picture.

use crate::test_util::{json, set_up_driver, wait_for};
use crate::virtio::mmio::persist::MmioTransportState;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::{VirtioDeviceState, INT_CONFIG};
use crate::BusDevice;

use super::*;

/// A driver on a transport: the two queues in guest memory, requests
/// sent one at a time and waited for.
struct Driver {
    mem: &'static GuestMemoryMmap,
    t: MmioTransport,
    irq: Arc<Interrupt>,
    queues: [MockSplitQueue<'static, GuestMemoryMmap>; 2],
    next_desc: [u16; 2],
    used: [u16; 2],
}

const QSIZE: u16 = 256;

impl Driver {
    fn new(mem: &'static GuestMemoryMmap, gpu: Gpu) -> Driver {
        let queues = [
            MockSplitQueue::create(mem, GuestAddress(0x1_0000), QSIZE),
            MockSplitQueue::create(mem, GuestAddress(0x2_0000), QSIZE),
        ];
        Driver::with_queues(mem, gpu, queues)
    }

    /// A driver for `gpu` on queues another driver set up (a restored
    /// device's: they go on where they were).
    fn with_queues(
        mem: &'static GuestMemoryMmap,
        gpu: Gpu,
        queues: [MockSplitQueue<'static, GuestMemoryMmap>; 2],
    ) -> Driver {
        let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(Interrupt::new(line));
        let t = MmioTransport::new(Box::new(gpu), mem.clone(), irq.clone()).unwrap();
        Driver {
            mem,
            t,
            irq,
            queues,
            next_desc: [0; 2],
            used: [0; 2],
        }
    }

    fn start(&mut self) {
        let [a, b] = &self.queues;
        set_up_driver(
            &mut self.t,
            &[a, b],
            &[QSIZE, QSIZE],
            1 << VIRTIO_GPU_F_EDID,
        );
        assert_eq!(self.t.status() & 0xf, 0xf, "the device runs");
    }

    /// Sends `parts` on queue `q` (0 control, 1 cursor) and waits for it;
    /// the response.
    fn send(&mut self, q: usize, parts: &[&[u8]]) -> Vec<u8> {
        let base = self.next_desc[q];
        let mut descs = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let at = REQ + i as u64 * 0x1_0000;
            self.mem.write_slice(p, GuestAddress(at)).unwrap();
            descs.push(d(at, p.len() as u32, F_NEXT, base + i as u16 + 1));
        }
        descs.push(d(RESP, 2048, F_WRITE, 0));
        self.queues[q].add_desc_chains(&descs, base).unwrap();
        self.next_desc[q] = (base + descs.len() as u16) % 240;
        self.t.queue_events()[q].write(1).unwrap();
        let want = self.used[q] + 1;
        let used = &self.queues[q];
        assert!(wait_for(|| used.used().idx().load() == want), "served");
        let elem = used
            .used()
            .ring()
            .ref_at(usize::from(self.used[q]))
            .unwrap()
            .load();
        self.used[q] = want;
        let mut out = vec![0u8; elem.len() as usize];
        self.mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
        out
    }

    fn status(&mut self, req: &[u8]) -> u32 {
        kind(&self.send(0, &[req]))
    }

    fn config(&mut self, offset: u64) -> u32 {
        let mut v = [0u8; 4];
        self.t.read(0, 0x100 + offset, &mut v);
        u32::from_le_bytes(v)
    }

    fn display_info(&mut self) -> (u32, u32) {
        let out = self.send(0, &[&cmd(CMD_GET_DISPLAY_INFO, &[])]);
        let f = |k: usize| u32::from_le_bytes(out[k..k + 4].try_into().unwrap());
        (f(HDR_LEN + 8), f(HDR_LEN + 12))
    }
}

fn gpu(modes: &[(u32, u32)]) -> (Gpu, GpuHandle, Arc<Recorder>) {
    let sink = Arc::new(Recorder::default());
    let options = GpuOptions {
        displays: modes.to_vec(),
        edid: true,
    };
    let (g, h) = Gpu::new(options, sink.clone()).unwrap();
    (g, h, sink)
}

#[test]
fn config_space_and_features() {
    let (g, _h, _) = gpu(&[(1280, 800), (800, 600)]);
    assert_eq!(g.device_type(), 16);
    assert_eq!(g.name(), "gpu");
    assert_eq!(g.features(), 1 << VIRTIO_GPU_F_EDID);
    assert_eq!(g.queue_max_sizes().len(), 2);
    let mut c = [0u8; 16];
    g.read_config(0, &mut c);
    assert_eq!(c, [0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    // Bad options are refused.
    let sink: Arc<dyn DisplaySink> = Arc::new(NullSink);
    for displays in [
        vec![],
        vec![(1280, 800); 17],
        vec![(16, 800)],
        vec![(4096, 800)],
    ] {
        let o = GpuOptions {
            displays,
            edid: true,
        };
        assert!(Gpu::new(o, sink.clone()).is_err());
    }
}

/// A resize from the host: the display event in `events_read`, a
/// configuration interrupt, and the new mode in GET_DISPLAY_INFO; the
/// driver clears the event through `events_clear`.
#[test]
fn a_resize_reaches_the_guest() {
    let m = mem();
    let (g, handle, sink) = gpu(&[(1280, 800)]);
    let mut drv = Driver::new(m, g);
    // Asked before the driver is up: it is told when the device starts.
    handle.request_resize(0, 1024, 768).unwrap();
    drv.start();
    assert!(wait_for(|| drv.irq.status() & INT_CONFIG != 0));
    assert_eq!(drv.config(0), VIRTIO_GPU_EVENT_DISPLAY);
    assert_eq!(drv.display_info(), (1024, 768));
    drv.t
        .write(0, 0x104, &VIRTIO_GPU_EVENT_DISPLAY.to_le_bytes());
    assert_eq!(drv.config(0), 0);
    drv.irq.acknowledge(INT_CONFIG);

    handle.request_resize(0, 1920, 1080).unwrap();
    assert!(wait_for(|| drv.irq.status() & INT_CONFIG != 0));
    assert_eq!(drv.config(0), VIRTIO_GPU_EVENT_DISPLAY);
    assert_eq!(drv.display_info(), (1920, 1080));
    assert_eq!(handle.mode(0), Some((1920, 1080)));
    // Bytes of events_clear the driver did not write are untouched; a
    // write elsewhere is ignored.
    drv.t.write(0, 0x100, &[1, 0, 0, 0]);
    drv.t.write(0, 0x105, &[1]);
    assert_eq!(drv.config(0), VIRTIO_GPU_EVENT_DISPLAY);
    drv.t.write(0, 0x104, &[1]);
    assert_eq!(drv.config(0), 0);

    // Modes the device does not offer, scanouts it does not have.
    assert!(matches!(
        handle.request_resize(1, 800, 600),
        Err(GpuError::NoScanout { .. })
    ));
    assert!(matches!(
        handle.request_resize(0, 0, 600),
        Err(GpuError::Mode { .. })
    ));
    assert!(matches!(
        handle.request_resize(0, 800, 5000),
        Err(GpuError::Mode { .. })
    ));
    assert_eq!(handle.mode(0), Some((1920, 1080)));
    // The guest follows: a new resource shown on the scanout.
    assert_eq!(drv.status(&create(1, 2, 1920, 1080)), RESP_OK_NODATA);
    assert_eq!(
        drv.status(&set_scanout(0, 1, rect(0, 0, 1920, 1080))),
        RESP_OK_NODATA
    );
    let f = handle.frame(0).unwrap();
    assert_eq!((f.width, f.height), (1920, 1080));

    // A guest that sends nothing costs nothing: no sink calls, no
    // interrupts, the worker asleep in epoll.
    sink.take();
    let raised = drv.irq.raised();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(sink.take().is_empty());
    assert_eq!(drv.irq.raised(), raised);
}

/// Sets up what a guest shows: a framebuffer on scanout 0, a small
/// resource whose backing is gone (its pixels only on the host), a
/// cursor; returns the framebuffer's size.
fn draw_a_desktop(drv: &mut Driver) -> (u32, u32) {
    let (w, h) = (32u32, 24u32);
    assert_eq!(drv.status(&create(1, 2, w, h)), RESP_OK_NODATA);
    let head = attach_head(1, 1);
    let list = entries(&[(FB, w * h * 4)]);
    assert_eq!(kind(&drv.send(0, &[&head, &list])), RESP_OK_NODATA);
    draw(drv.mem, FB, w, h, 0);
    assert_eq!(
        drv.status(&set_scanout(0, 1, rect(0, 0, w, h))),
        RESP_OK_NODATA
    );
    assert_eq!(
        drv.status(&transfer(1, rect(0, 0, w, h), 0)),
        RESP_OK_NODATA
    );
    assert_eq!(drv.status(&flush(1, rect(0, 0, w, h))), RESP_OK_NODATA);

    assert_eq!(drv.status(&create(2, 1, 4, 4)), RESP_OK_NODATA);
    let head = attach_head(2, 1);
    let list = entries(&[(FB + 0x10_0000, 64)]);
    assert_eq!(kind(&drv.send(0, &[&head, &list])), RESP_OK_NODATA);
    draw(drv.mem, FB + 0x10_0000, 4, 4, 3);
    assert_eq!(
        drv.status(&transfer(2, rect(0, 0, 4, 4), 0)),
        RESP_OK_NODATA
    );
    assert_eq!(
        drv.status(&cmd(CMD_RESOURCE_DETACH_BACKING, &[2, 0])),
        RESP_OK_NODATA
    );
    // The cursor shows resource 2.
    let c = cursor_cmd(CMD_UPDATE_CURSOR, 0, 10, 12, 2);
    drv.send(1, &[&c]);
    (w, h)
}

#[test]
fn state_round_trips_and_the_picture_comes_back() {
    let m = mem();
    let (g, handle, _sink) = gpu(&[(1280, 800)]);
    let mut drv = Driver::new(m, g);
    drv.start();
    let (w, h) = draw_a_desktop(&mut drv);
    handle.request_resize(0, 1024, 768).unwrap();
    assert!(wait_for(|| drv.irq.status() & INT_CONFIG != 0));
    let frame = handle.frame(0).unwrap();
    assert_eq!(frame.pixels, expected(rect(0, 0, w, h), 0));
    let cursor = handle.cursor();
    assert!(cursor.image.is_some());

    drv.t.sleep().unwrap();
    let saved = drv.t.save_state().unwrap();
    let back: MmioTransportState = serde_json::from_str(&json(&saved)).unwrap();
    assert_eq!(back, saved);
    let VirtioDeviceState::Gpu(gs) = &saved.device else {
        panic!("a gpu state: {:?}", saved.device);
    };
    assert_eq!(gs.modes, vec![(1024, 768)]);
    assert_eq!(gs.events_read, VIRTIO_GPU_EVENT_DISPLAY);
    assert_eq!(gs.resources.len(), 2);
    let (r1, r2) = (&gs.resources[0], &gs.resources[1]);
    assert_eq!((r1.id, r1.format, r1.width, r1.height), (1, 2, w, h));
    assert!(
        r1.backing.is_some() && r1.pixels.is_none(),
        "read back from RAM"
    );
    assert!(r2.backing.is_none() && r2.pixels.as_ref().unwrap().len() == 16 * 8);
    assert_eq!(gs.scanouts[0].resource_id, 1);
    assert_eq!((gs.cursor.x, gs.cursor.y), (10, 12));

    // Restore into a new device: the same state saved again, and once
    // it runs, the same picture and cursor shown.
    let (g2, handle2, sink2) = gpu(&[(1280, 800)]);
    let Driver {
        queues,
        next_desc,
        used,
        ..
    } = drv;
    let mut drv2 = Driver::with_queues(m, g2, queues);
    drv2.next_desc = next_desc;
    drv2.used = used;
    drv2.t.restore(&saved).unwrap();
    drv2.t.sleep().unwrap();
    let again = drv2.t.save_state().unwrap();
    assert_eq!(json(&again), json(&saved), "save → restore → save");
    drv2.t.wake().unwrap();
    assert!(wait_for(|| sink2.seen().len() >= 3));
    let seen = sink2.take();
    assert_eq!(seen[0], Seen::Resize(0, w, h));
    assert_eq!(
        seen[1],
        Seen::Update(0, rect(0, 0, w, h), expected(rect(0, 0, w, h), 0))
    );
    assert!(matches!(
        seen[2],
        Seen::Cursor {
            x: 10,
            y: 12,
            changed: true,
            ..
        }
    ));
    assert_eq!(handle2.frame(0), Some(frame));
    assert_eq!(handle2.cursor(), cursor);
    assert_eq!(handle2.mode(0), Some((1024, 768)));
    assert_eq!(handle2.host_bytes(), handle.host_bytes());

    // The restored device carries on where the saved one stopped: a new
    // frame through the same queues.
    draw(m, FB, w, h, 9);
    assert_eq!(
        drv2.status(&transfer(1, rect(0, 0, w, h), 0)),
        RESP_OK_NODATA
    );
    assert_eq!(drv2.status(&flush(1, rect(0, 0, w, 1))), RESP_OK_NODATA);
    assert_eq!(drv2.config(0), VIRTIO_GPU_EVENT_DISPLAY);
    let f = handle2.frame(0).unwrap();
    assert_eq!(f.pixel(3, 0), Some(0xff00_0000 | (colour(3, 0) + 9)));
    assert_eq!(
        f.pixel(3, 1),
        Some(0xff00_0000 | colour(3, 1)),
        "not flushed"
    );
}

/// States a guest could not have produced are refused.
#[test]
fn hostile_states_are_refused() {
    let m = mem();
    let (g, _handle, _sink) = gpu(&[(1280, 800)]);
    let mut drv = Driver::new(m, g);
    drv.start();
    draw_a_desktop(&mut drv);
    drv.t.sleep().unwrap();
    let VirtioDeviceState::Gpu(good) = drv.t.save_state().unwrap().device else {
        panic!("a gpu state");
    };
    type Edit = Box<dyn Fn(&mut persist::GpuState)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("features", Box::new(|s| s.features = 0)),
        ("two modes", Box::new(|s| s.modes.push((800, 600)))),
        ("a tiny mode", Box::new(|s| s.modes[0] = (1, 1))),
        ("unknown events", Box::new(|s| s.events_read = 6)),
        ("resource 0", Box::new(|s| s.resources[0].id = 0)),
        ("twice", Box::new(|s| s.resources[1].id = 1)),
        ("format", Box::new(|s| s.resources[0].format = 99)),
        ("huge", Box::new(|s| s.resources[0].width = 100_000)),
        (
            "1 GiB",
            Box::new(|s| {
                s.resources[1].width = 16384;
                s.resources[1].height = 16384;
                s.resources[1].pixels = None;
            }),
        ),
        (
            "short pixels",
            Box::new(|s| s.resources[1].pixels = Some("00ff".into())),
        ),
        (
            "not hex",
            Box::new(|s| s.resources[1].pixels = Some("zz".repeat(64))),
        ),
        (
            "pixels and backing",
            Box::new(|s| s.resources[0].pixels = Some("00".repeat(32 * 24 * 4))),
        ),
        (
            "entries",
            Box::new(|s| {
                s.resources[0].backing =
                    Some(vec![MemEntry { addr: 0, len: 1 }; MAX_BACKING_ENTRIES + 1])
            }),
        ),
        (
            "scanout count",
            Box::new(|s| {
                s.scanouts.push(persist::ScanoutState::default());
            }),
        ),
        (
            "scanout resource",
            Box::new(|s| s.scanouts[0].resource_id = 7),
        ),
        (
            "scanout rect",
            Box::new(|s| s.scanouts[0].rect = rect(u32::MAX, 0, 2, 2)),
        ),
        ("cursor scanout", Box::new(|s| s.cursor.scanout = 1)),
        (
            "cursor size",
            Box::new(|s| s.cursor.image = Some((300, 1, "00000000".repeat(300)))),
        ),
        (
            "cursor pixels",
            Box::new(|s| s.cursor.image = Some((2, 2, String::new()))),
        ),
        (
            "too many",
            Box::new(|s| {
                let r = s.resources[1].clone();
                s.resources = (1..=backend::MAX_RESOURCES as u32 + 1)
                    .map(|id| persist::ResourceState { id, ..r.clone() })
                    .collect();
            }),
        ),
    ];
    for (what, edit) in edits {
        let mut bad = good.clone();
        edit(&mut bad);
        let (mut g, _h, _s) = gpu(&[(1280, 800)]);
        assert!(
            g.restore_state(&VirtioDeviceState::Gpu(bad)).is_err(),
            "{what}"
        );
    }
    let (mut g, _h, _s) = gpu(&[(1280, 800)]);
    g.restore_state(&VirtioDeviceState::Gpu(good)).unwrap();
    let (mut g, _h, _s) = gpu(&[(1280, 800)]);
    let other = VirtioDeviceState::Rng(crate::virtio::persist::RngState {});
    assert!(g.restore_state(&other).is_err());
}

/// A reset through the transport stops the worker and forgets the
/// guest's objects; the device starts again.
#[test]
fn a_driver_reset_turns_the_display_off() {
    let m = mem();
    let (g, handle, sink) = gpu(&[(1280, 800)]);
    let mut drv = Driver::new(m, g);
    drv.start();
    draw_a_desktop(&mut drv);
    sink.take();
    drv.t.write(0, 0x70, &0u32.to_le_bytes());
    assert_eq!(drv.t.status(), 0);
    assert_eq!(
        sink.take(),
        vec![
            Seen::Resize(0, 0, 0),
            Seen::Cursor {
                x: 0,
                y: 0,
                image: None,
                changed: true
            }
        ]
    );
    assert_eq!(handle.frame(0), None);
    assert_eq!(handle.host_bytes(), 0);
}
