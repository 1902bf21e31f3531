// Register offsets and test values are small constants.
#![allow(clippy::cast_possible_truncation)]

use super::*;

fn id() -> PciId {
    PciId {
        vendor: 0x1af4,
        device: 0x1042,
        revision: 1,
        class: (0x01, 0x00, 0x00),
        subsystem_vendor: 0x1af4,
        subsystem: 0x0040,
    }
}

fn r32(c: &PciConfig, at: usize) -> u32 {
    let mut b = [0u8; 4];
    c.read(at, &mut b);
    u32::from_le_bytes(b)
}

fn w32(c: &mut PciConfig, at: usize, v: u32) {
    c.write(at, &v.to_le_bytes());
}

fn with_bars() -> PciConfig {
    let mut c = PciConfig::new(id());
    c.add_bar(
        0,
        Bar {
            kind: BarKind::Io,
            size: 0x40,
        },
    )
    .unwrap();
    c.add_bar(
        1,
        Bar {
            kind: BarKind::Memory32,
            size: 0x1000,
        },
    )
    .unwrap();
    let bar64 = Bar {
        kind: BarKind::Memory64 { prefetchable: true },
        size: 0x4000,
    };
    c.add_bar(2, bar64).unwrap();
    c
}

#[test]
fn identity_is_read_only() {
    let mut c = PciConfig::new(id());
    assert_eq!(r32(&c, 0), 0x1042_1af4);
    assert_eq!(r32(&c, 8), 0x0100_0001);
    assert_eq!(r32(&c, SUBSYSTEM_VENDOR_ID), 0x0040_1af4);
    for at in (0..0x40).step_by(4) {
        w32(&mut c, at, 0xffff_ffff);
    }
    assert_eq!(r32(&c, 0), 0x1042_1af4);
    assert_eq!(r32(&c, 8), 0x0100_0001);
    // The command register takes only its defined bits; the interrupt
    // line is storage, the pin is not.
    assert_eq!(c.command(), 0x0507);
    c.set_interrupt_pin(1);
    c.write(INTERRUPT_LINE, &[11, 3]);
    let mut b = [0u8; 2];
    c.read(INTERRUPT_LINE, &mut b);
    assert_eq!(b, [11, 1]);
}

#[test]
fn bars_answer_the_sizing_protocol_and_report_their_placement() {
    let mut c = with_bars();
    for i in 0..6 {
        w32(&mut c, BAR0 + 4 * i, 0xffff_ffff);
    }
    assert_eq!(r32(&c, BAR0), 0xffff_ffc1, "I/O, 64 bytes");
    assert_eq!(r32(&c, BAR0 + 4), 0xffff_f000, "memory32, 4 KiB");
    assert_eq!(
        r32(&c, BAR0 + 8),
        0xffff_c00c,
        "memory64 prefetchable, 16 KiB"
    );
    assert_eq!(r32(&c, BAR0 + 12), 0xffff_ffff, "its upper half");
    assert_eq!(r32(&c, BAR0 + 16), 0, "no BAR 4");
    // Placed, but decoding is off: not reported.
    w32(&mut c, BAR0, 0xc040);
    w32(&mut c, BAR0 + 4, 0xfe00_0000);
    w32(&mut c, BAR0 + 8, 0x0000_0000);
    w32(&mut c, BAR0 + 12, 0x1);
    assert_eq!(c.bar_address(1), None);
    c.write(COMMAND, &(COMMAND_IO | COMMAND_MEMORY).to_le_bytes());
    assert_eq!(c.bar_address(0), Some(0xc040));
    assert_eq!(c.bar_address(1), Some(0xfe00_0000));
    assert_eq!(c.bar_address(2), Some(0x1_0000_0000));
    assert_eq!(c.bar_address(3), None);
    // Low bits below the size are not writable.
    w32(&mut c, BAR0 + 4, 0xfe00_0fff);
    assert_eq!(c.bar_address(1), Some(0xfe00_0000));
}

#[test]
fn bad_bars_are_refused() {
    let mut c = with_bars();
    let small = Bar {
        kind: BarKind::Memory32,
        size: 8,
    };
    assert_eq!(c.add_bar(4, small), Err(PciConfigError::BarSize(8)));
    let odd = Bar {
        kind: BarKind::Io,
        size: 48,
    };
    assert_eq!(c.add_bar(4, odd), Err(PciConfigError::BarSize(48)));
    let mem = Bar {
        kind: BarKind::Memory32,
        size: 0x1000,
    };
    assert_eq!(
        c.add_bar(3, mem),
        Err(PciConfigError::BarSlot(3)),
        "the 64-bit BAR's upper half"
    );
    let wide = Bar {
        kind: BarKind::Memory64 {
            prefetchable: false,
        },
        size: 0x1000,
    };
    assert_eq!(c.add_bar(5, wide), Err(PciConfigError::BarSlot(5)));
    assert_eq!(c.add_bar(6, mem), Err(PciConfigError::BarSlot(6)));
}

#[test]
fn capabilities_form_a_list_with_their_own_writable_bits() {
    let mut c = PciConfig::new(id());
    let a = c
        .add_capability(0x09, &[0x10, 0, 0xaa, 0xbb], &[0, 0, 0xff])
        .unwrap();
    let b = c
        .add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[])
        .unwrap();
    let mut status = [0u8; 2];
    c.read(STATUS, &mut status);
    assert_ne!(u16::from_le_bytes(status) & (1 << 4), 0);
    let mut p = [0u8; 1];
    c.read(CAPABILITIES_POINTER, &mut p);
    assert_eq!(usize::from(p[0]), a);
    let mut hdr = [0u8; 2];
    c.read(a, &mut hdr);
    assert_eq!((hdr[0], usize::from(hdr[1])), (0x09, b));
    c.read(b, &mut hdr);
    assert_eq!(hdr, [0x11, 0]);
    assert_eq!(b % 4, 0);
    // Only the masked byte changes.
    c.write(a, &[0xff; 6]);
    let mut body = [0u8; 6];
    c.read(a, &mut body);
    assert_eq!(body, [0x09, b as u8, 0x10, 0, 0xff, 0xbb]);
    let big = [0u8; 200];
    assert_eq!(
        c.add_capability(0x09, &big, &[]),
        Err(PciConfigError::NoRoom(202))
    );
}

#[test]
fn hostile_writes_never_panic_nor_change_identity() {
    let mut c = with_bars();
    c.add_capability(0x09, &[0; 6], &[0xff; 6]).unwrap();
    let mut x = 0x853c_49e6_748f_ea9bu64;
    for _ in 0..50_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = (x % 300) as usize;
        let len = [1usize, 2, 4, 8][(x >> 20) as usize % 4];
        c.write(at, &(x >> 8).to_le_bytes()[..len]);
        let mut b = [0u8; 8];
        c.read(at, &mut b[..len]);
    }
    assert_eq!(r32(&c, 0), 0x1042_1af4);
    assert_eq!(
        c.bar(2),
        Some(Bar {
            kind: BarKind::Memory64 { prefetchable: true },
            size: 0x4000
        })
    );
    assert_eq!(r32(&c, BAR0) & 0b11, 0b01, "still an I/O BAR");
}

#[test]
fn state_round_trips_and_cannot_change_the_device() {
    let mut c = with_bars();
    w32(&mut c, BAR0 + 4, 0xfe00_0000);
    c.write(COMMAND, &COMMAND_MEMORY.to_le_bytes());
    c.write(INTERRUPT_LINE, &[10]);
    c.set_interrupt_status(true);
    let saved = c.state();
    let mut r = with_bars();
    r.restore(&saved).unwrap();
    assert_eq!(r.state(), saved);
    assert_eq!(r.bar_address(1), Some(0xfe00_0000));
    // A doctored state: identity and BAR types stay the device's.
    let mut evil = saved.clone();
    evil.regs.fill(0xff);
    let mut r = with_bars();
    r.restore(&evil).unwrap();
    assert_eq!(r32(&r, 0), 0x1042_1af4);
    assert_eq!(r32(&r, BAR0 + 4), 0xffff_f000);
    assert_eq!(
        r.restore(&PciConfigState { regs: vec![0; 255] }),
        Err(PciConfigStateError(255))
    );
}
