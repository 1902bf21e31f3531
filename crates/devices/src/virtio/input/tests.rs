use std::sync::Arc;
use std::time::Duration;

use memory::GuestMemoryMmap;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::config::*;
use super::events::*;
use super::*;
use crate::test_util::{desc as d, json, set_up_driver, wait_for, F_WRITE};
use crate::virtio::mmio::MmioTransport;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

fn irq() -> Interrupt {
    Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
}

/// What Linux's `virtinput_cfg_select` does: write select and subsel,
/// read size; then the payload bytes one at a time as `virtio_cread_bytes`
/// may.
fn query(dev: &mut Input, select: u8, subsel: u8) -> Vec<u8> {
    dev.write_config(0, &[select]);
    dev.write_config(1, &[subsel]);
    let mut size = [0u8];
    dev.read_config(2, &mut size);
    (0..u64::from(size[0]))
        .map(|i| {
            let mut b = [0u8];
            dev.read_config(PAYLOAD_OFFSET as u64 + i, &mut b);
            b[0]
        })
        .collect()
}

fn has_bit(bits: &[u8], n: u16) -> bool {
    bits.get(usize::from(n / 8))
        .is_some_and(|b| b & (1 << (n % 8)) != 0)
}

#[test]
fn keyboard_answers_what_linux_asks_at_probe() {
    let (mut kbd, _h) = Input::new(InputKind::Keyboard).unwrap();
    assert_eq!((kbd.device_type(), kbd.name()), (18, "input"));
    assert_eq!(
        query(&mut kbd, CFG_ID_NAME, 0),
        b"hostvisor virtio keyboard"
    );
    assert_eq!(query(&mut kbd, CFG_ID_SERIAL, 0), b"hostvisor-keyboard");
    let ids = query(&mut kbd, CFG_ID_DEVIDS, 0);
    assert_eq!(ids.len(), 8, "struct virtio_input_devids");
    assert_eq!(u16::from_le_bytes([ids[0], ids[1]]), 0x06, "BUS_VIRTUAL");
    assert!(query(&mut kbd, CFG_PROP_BITS, 0).is_empty());
    let keys = query(&mut kbd, CFG_EV_BITS, EV_KEY as u8);
    for key in [1u16, 30, 42, 54, 28, 57, 103, 125, 127, KEY_F13, KEY_F24] {
        assert!(has_bit(&keys, key), "key {key} offered");
    }
    assert!(!has_bit(&keys, 0) && !has_bit(&keys, BTN_LEFT));
    let leds = query(&mut kbd, CFG_EV_BITS, EV_LED as u8);
    assert_eq!(leds, [0b111]);
    assert_eq!(query(&mut kbd, CFG_EV_BITS, EV_REP as u8).len(), 1);
    for none in [EV_REL, EV_ABS, 0x04, 0x05, 0x12] {
        assert!(query(&mut kbd, CFG_EV_BITS, none as u8).is_empty());
    }
    assert!(query(&mut kbd, CFG_ABS_INFO, ABS_X as u8).is_empty());
    assert!(query(&mut kbd, CFG_UNSET, 0).is_empty());
    assert!(query(&mut kbd, 0xff, 0xff).is_empty());
}

#[test]
fn tablet_answers_axes_buttons_and_wheel() {
    let (mut tab, _h) = Input::new(InputKind::Tablet).unwrap();
    assert_eq!(query(&mut tab, CFG_ID_NAME, 0), b"hostvisor virtio tablet");
    let keys = query(&mut tab, CFG_EV_BITS, EV_KEY as u8);
    for b in [BTN_LEFT, BTN_RIGHT, BTN_MIDDLE] {
        assert!(has_bit(&keys, b));
    }
    assert!(!has_bit(&keys, 30), "no keyboard keys");
    assert_eq!(query(&mut tab, CFG_EV_BITS, EV_ABS as u8), [0b11]);
    assert!(has_bit(
        &query(&mut tab, CFG_EV_BITS, EV_REL as u8),
        REL_WHEEL
    ));
    assert!(query(&mut tab, CFG_EV_BITS, EV_REP as u8).is_empty());
    for axis in [ABS_X, ABS_Y] {
        let info = query(&mut tab, CFG_ABS_INFO, axis as u8);
        let word = |i: usize| u32::from_le_bytes(info[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(info.len(), 20, "struct virtio_input_absinfo");
        assert_eq!((word(0), word(1), word(2), word(3)), (0, 32767, 0, 0));
    }
    assert!(query(&mut tab, CFG_ABS_INFO, 2).is_empty(), "no ABS_Z");
}

#[test]
fn hostile_config_accesses_are_harmless() {
    let (mut kbd, _h) = Input::new(InputKind::Keyboard).unwrap();
    // One 4-byte write sets select and subsel; the rest is read-only.
    kbd.write_config(0, &[CFG_ID_NAME, 0, 99, 99]);
    let mut image = [0u8; CONFIG_SIZE];
    kbd.read_config(0, &mut image);
    assert_eq!(&image[..3], &[CFG_ID_NAME, 0, 25]);
    assert_eq!(&image[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 8], b"hostviso");
    for offset in [CONFIG_SIZE as u64, 4096, u64::MAX] {
        let mut b = [0xaau8; 4];
        kbd.read_config(offset, &mut b);
        assert_eq!(b, [0; 4]);
        kbd.write_config(offset, &[1, 2, 3]);
    }
    kbd.write_config(u64::MAX - 1, &[7, 7, 7]);
    kbd.read_config(0, &mut image[..2]);
    assert_eq!(
        &image[..2],
        &[CFG_ID_NAME, 0],
        "wrapping writes change nothing"
    );
}

/// Posts `n` 8-byte event buffers at 0x100000 + 0x100 * i.
fn event_buffers(q: &MockSplitQueue<GuestMemoryMmap>, n: u16, start: u16) {
    let descs: Vec<_> = (0..n)
        .map(|i| d(0x100000 + 0x100 * u64::from(start + i), 8, F_WRITE, 0))
        .collect();
    q.add_desc_chains(&descs, start).unwrap();
}

fn delivered(m: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, n: u16) -> Vec<InputEvent> {
    (0..n)
        .map(|i| {
            let e = q.used().ring().ref_at(i.into()).unwrap().load();
            assert_eq!(e.len(), 8, "used length of buffer {i}");
            let mut b = [0u8; 8];
            m.read_slice(
                &mut b,
                GuestAddress(0x100000 + 0x100 * u64::from(e.id() as u16)),
            )
            .unwrap();
            InputEvent::from_bytes(b)
        })
        .collect()
}

#[test]
fn key_events_arrive_framed() {
    let m = mem();
    let mock = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    event_buffers(&mock, 4, 0);
    let mut q: Queue = mock.create_queue().unwrap();
    let (dev, h) = Input::new(InputKind::Keyboard).unwrap();
    h.key(30, true).unwrap();
    h.key(30, false).unwrap();
    fill_events(&mut q, &m, &mut dev.queue.lock(), &irq());
    assert_eq!(
        delivered(&m, &mock, 4),
        [
            InputEvent::new(EV_KEY, 30, 1),
            InputEvent::syn(),
            InputEvent::new(EV_KEY, 30, 0),
            InputEvent::syn(),
        ]
    );
    assert_eq!(h.pending(), 0);
    // A report that ends with its SYN_REPORT is not given another.
    h.send(&[InputEvent::new(EV_KEY, 2, 1), InputEvent::syn()])
        .unwrap();
    assert_eq!(h.pending(), 2);
    h.send(&[]).unwrap();
    assert_eq!(h.pending(), 2);
}

#[test]
fn pointer_events_arrive_framed_and_clamped() {
    let m = mem();
    let mock = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    event_buffers(&mock, 7, 0);
    let mut q: Queue = mock.create_queue().unwrap();
    let (dev, h) = Input::new(InputKind::Tablet).unwrap();
    // Left and right held, one wheel click down, x beyond the range.
    h.pointer(40000, 123, 0b101, -1).unwrap();
    fill_events(&mut q, &m, &mut dev.queue.lock(), &irq());
    assert_eq!(
        delivered(&m, &mock, 7),
        [
            InputEvent::new(EV_ABS, ABS_X, 32767),
            InputEvent::new(EV_ABS, ABS_Y, 123),
            InputEvent::new(EV_KEY, BTN_LEFT, 1),
            InputEvent::new(EV_KEY, BTN_MIDDLE, 0),
            InputEvent::new(EV_KEY, BTN_RIGHT, 1),
            InputEvent::new(EV_REL, REL_WHEEL, u32::MAX),
            InputEvent::syn(),
        ]
    );
}

#[test]
fn events_wait_for_buffers_and_a_full_queue_refuses_more() {
    let m = mem();
    let mock = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    let mut q: Queue = mock.create_queue().unwrap();
    let (dev, h) = Input::new(InputKind::Keyboard).unwrap();
    // The guest never posts a buffer: each key is 2 events.
    let mut accepted = 0;
    for i in 0..10 * EVENT_LIMIT {
        match h.key(30, i % 2 == 0) {
            Ok(()) => accepted += 1,
            Err(e) => assert_eq!(
                e,
                InputError::QueueFull {
                    pending: EVENT_LIMIT,
                    refused: 2
                }
            ),
        }
        fill_events(&mut q, &m, &mut dev.queue.lock(), &irq());
    }
    assert_eq!(accepted, EVENT_LIMIT / 2);
    assert_eq!(h.pending(), EVENT_LIMIT);
    assert!(
        dev.queue.lock().capacity() <= 2 * EVENT_LIMIT,
        "the queue did not grow past its limit"
    );
    // A report larger than the whole queue is refused, not split.
    let (_dev2, h2) = Input::new(InputKind::Keyboard).unwrap();
    let huge = vec![InputEvent::new(EV_KEY, 30, 1); EVENT_LIMIT];
    assert!(h2.send(&huge).is_err());
    assert_eq!(h2.pending(), 0);
    // Once the guest reads, the oldest events go first.
    event_buffers(&mock, 2, 0);
    fill_events(&mut q, &m, &mut dev.queue.lock(), &irq());
    assert_eq!(
        delivered(&m, &mock, 2),
        [InputEvent::new(EV_KEY, 30, 1), InputEvent::syn()]
    );
    assert_eq!(h.pending(), EVENT_LIMIT - 2);
}

#[test]
fn unusable_event_buffers_come_back_empty_and_keep_the_event() {
    let m = mem();
    let mock = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    mock.add_desc_chains(
        &[
            d(0x100000, 8, 0, 0),               // device-readable
            d(0x100100, 7, F_WRITE, 0),         // too short
            d(0xffff_0000_0000, 8, F_WRITE, 0), // outside RAM
            d(0x100300, u32::MAX, F_WRITE, 0),  // huge: one event only
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let (dev, h) = Input::new(InputKind::Keyboard).unwrap();
    h.key(16, true).unwrap();
    let mut pending = dev.queue.lock().clone();
    fill_events(&mut q, &m, &mut pending, &irq());
    let used = |i: u16| mock.used().ring().ref_at(i.into()).unwrap().load().len();
    assert_eq!((used(0), used(1), used(2), used(3)), (0, 0, 0, 8));
    let mut b = [0u8; 8];
    m.read_slice(&mut b, GuestAddress(0x100300)).unwrap();
    assert_eq!(InputEvent::from_bytes(b), InputEvent::new(EV_KEY, 16, 1));
    assert_eq!(pending, [InputEvent::syn()]);
}

#[test]
fn status_buffers_are_read_and_dropped() {
    let m = mem();
    m.write_slice(
        &InputEvent::new(EV_LED, LED_CAPSL, 1).to_bytes(),
        GuestAddress(0x100000),
    )
    .unwrap();
    let mock = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    mock.add_desc_chains(
        &[
            d(0x100000, 8, 0, 0),
            d(0x100100, 8, F_WRITE, 0),
            d(0x100200, 3, 0, 0),
            d(0xffff_0000_0000, 8, 0, 0),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Interrupt::new(line.try_clone().unwrap());
    drain_status(&mut q, &m, &irq);
    assert_eq!(mock.used().idx().load(), 4);
    for i in 0..4 {
        assert_eq!(mock.used().ring().ref_at(i).unwrap().load().len(), 0);
    }
    assert_eq!(line.read().unwrap(), 1, "one interrupt for the batch");
}

fn transport(device: Input, m: &GuestMemoryMmap) -> MmioTransport {
    let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    MmioTransport::new(Box::new(device), m.clone(), Arc::new(Interrupt::new(line))).unwrap()
}

#[test]
fn the_worker_delivers_host_input_and_pending_events_survive_a_snapshot() {
    let m = mem();
    let eventq = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    let statusq = MockSplitQueue::create(&m, GuestAddress(0x20000), 16);
    let (dev, h) = Input::new(InputKind::Keyboard).unwrap();
    let mut t = transport(dev, &m);
    set_up_driver(&mut t, &[&eventq, &statusq], &[16, 16], 0);
    event_buffers(&eventq, 2, 0);
    t.queue_events()[0].write(1).unwrap();
    h.key(30, true).unwrap();
    assert!(wait_for(|| eventq.used().idx().load() == 2));
    assert_eq!(
        delivered(&m, &eventq, 2),
        [InputEvent::new(EV_KEY, 30, 1), InputEvent::syn()]
    );

    // Typed while asleep: nothing reaches the guest, the state keeps it.
    t.sleep().unwrap();
    event_buffers(&eventq, 2, 2);
    h.key(30, false).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(eventq.used().idx().load(), 2);
    let saved = t.save_state().unwrap();
    let want = persist::InputState {
        kind: InputKind::Keyboard,
        select: 0,
        subsel: 0,
        pending: vec![(EV_KEY, 30, 0), (0, 0, 0)],
    };
    assert_eq!(saved.device, VirtioDeviceState::Input(want.clone()));

    // save → restore → save gives the same state.
    let (mut idle, _) = Input::new(InputKind::Keyboard).unwrap();
    idle.restore_state(&saved.device).unwrap();
    assert_eq!(json(&idle.save_state()), json(&saved.device));
    // Another kind, or more events than a device holds, is refused.
    let (mut tablet, _) = Input::new(InputKind::Tablet).unwrap();
    assert!(tablet.restore_state(&saved.device).is_err());
    let mut huge = want;
    huge.pending = vec![(1, 30, 1); EVENT_LIMIT + 1];
    let (mut k2, _) = Input::new(InputKind::Keyboard).unwrap();
    assert!(k2.restore_state(&VirtioDeviceState::Input(huge)).is_err());

    // The restored device delivers the pending events into the buffers
    // posted before the snapshot.
    let (dev2, _h2) = Input::new(InputKind::Keyboard).unwrap();
    let mut t2 = transport(dev2, &m);
    t2.restore(&saved).unwrap();
    assert!(wait_for(|| eventq.used().idx().load() == 4));
    let e = eventq.used().ring().ref_at(2).unwrap().load();
    let mut b = [0u8; 8];
    m.read_slice(
        &mut b,
        GuestAddress(0x100000 + 0x100 * u64::from(e.id() as u16)),
    )
    .unwrap();
    assert_eq!(InputEvent::from_bytes(b), InputEvent::new(EV_KEY, 30, 0));
    t2.sleep().unwrap();
    let after = t2.save_state().unwrap();
    assert_eq!(
        after.device,
        VirtioDeviceState::Input(persist::InputState {
            kind: InputKind::Keyboard,
            select: 0,
            subsel: 0,
            pending: vec![],
        })
    );
}
