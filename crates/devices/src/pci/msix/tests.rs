// Offsets and values are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::sync::Mutex;

use super::*;

#[derive(Default)]
struct Sent(Mutex<Vec<MsiMessage>>);

impl MsiTarget for Sent {
    fn send(&self, msg: MsiMessage) {
        self.0.lock().unwrap().push(msg);
    }
}

impl Sent {
    fn take(&self) -> Vec<MsiMessage> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn msix(vectors: u16) -> (Msix, Arc<Sent>) {
    let sent = Arc::new(Sent::default());
    (Msix::new(vectors, sent.clone()).unwrap(), sent)
}

/// Programs vector `v` with a message and unmasks it.
fn program(m: &mut Msix, v: u64, addr: u64, data: u32) {
    let mut entry = [0u8; 16];
    entry[..8].copy_from_slice(&addr.to_le_bytes());
    entry[8..12].copy_from_slice(&data.to_le_bytes());
    m.table_write(v * 16, &entry);
}

fn pba(m: &Msix) -> u64 {
    let mut b = [0u8; 8];
    m.pba_read(0, &mut b);
    u64::from_le_bytes(b)
}

const MSG: MsiMessage = MsiMessage {
    addr: 0xfee0_0000,
    data: 0x4041,
};

#[test]
fn the_capability_describes_the_table() {
    let (m, _) = msix(3);
    let (body, writable) = m.capability(1, 0x2000, 1, 0x3000);
    assert_eq!(u16::from_le_bytes([body[0], body[1]]), 2, "table size - 1");
    assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x2001);
    assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x3001);
    assert_eq!(u16::from_le_bytes([writable[0], writable[1]]), 0xc000);
    assert_eq!(writable[2..], [0; 8]);
    assert_eq!((m.table_len(), m.pba_len()), (48, 8));
    assert!(Msix::new(0, Arc::new(Sent::default())).is_err());
    assert!(Msix::new(2049, Arc::new(Sent::default())).is_err());
}

#[test]
fn vectors_are_sent_when_enabled_and_unmasked_else_held_pending() {
    let (mut m, sent) = msix(2);
    // Disabled: nothing, not even pending (the function uses INTx then).
    m.notify(0);
    assert_eq!((sent.take(), pba(&m)), (vec![], 0));
    m.set_control(1 << 15);
    // Masked after reset: pending.
    m.notify(1);
    assert_eq!((sent.take(), pba(&m)), (vec![], 0b10));
    // Programming the entry clears its mask bit: the pending one goes.
    program(&mut m, 1, MSG.addr, MSG.data);
    assert_eq!((sent.take(), pba(&m)), (vec![MSG], 0));
    m.notify(1);
    assert_eq!(sent.take(), vec![MSG]);
    // The function mask holds every vector; clearing it sends them.
    m.set_control((1 << 15) | (1 << 14));
    m.notify(1);
    m.notify(1);
    assert_eq!((sent.take(), pba(&m)), (vec![], 0b10));
    m.set_control(1 << 15);
    assert_eq!((sent.take(), pba(&m)), (vec![MSG], 0));
    // A vector the function does not have is ignored.
    m.notify(7);
    assert_eq!(sent.take(), vec![]);
}

#[test]
fn only_the_mask_bit_of_vector_control_is_writable() {
    let (mut m, _) = msix(1);
    m.table_write(12, &[0xff; 4]);
    let mut b = [0u8; 4];
    m.table_read(12, &mut b);
    assert_eq!(b, [1, 0, 0, 0]);
    // Out of range and huge offsets: ignored, reads are zero.
    m.table_write(16, &[0xff; 4]);
    m.table_write(u64::MAX - 1, &[0xff; 4]);
    m.table_read(u64::MAX - 1, &mut b);
    assert_eq!(b, [0; 4]);
    m.pba_read(u64::MAX - 2, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn state_round_trips_and_a_mismatched_one_is_refused() {
    let (mut m, _) = msix(4);
    m.set_control(1 << 15);
    program(&mut m, 2, MSG.addr, MSG.data);
    m.table_write(2 * 16 + 12, &[1]);
    m.notify(2);
    let saved = m.state();
    let (mut r, sent) = msix(4);
    r.restore(&saved).unwrap();
    assert_eq!(r.state(), saved);
    assert_eq!(sent.take(), vec![], "still masked");
    r.table_write(2 * 16 + 12, &[0]);
    assert_eq!(sent.take(), vec![MSG]);
    let (mut other, _) = msix(2);
    assert!(other.restore(&saved).is_err());
    // Reserved Vector Control bits in a doctored state stay clear.
    let mut evil = saved;
    evil.table[15] = 0xff;
    let (mut r, _) = msix(4);
    r.restore(&evil).unwrap();
    assert_eq!(r.state().table[15], 0);
}

#[test]
fn a_write_across_two_entries_unmasks_both() {
    let (mut m, sent) = msix(2);
    m.set_control(1 << 15);
    let second = MsiMessage {
        addr: 0xfee0_1000,
        data: 0x22,
    };
    // Entry 0's message, then both pending while masked.
    m.table_write(0, &MSG.addr.to_le_bytes());
    m.table_write(8, &MSG.data.to_le_bytes());
    m.notify(0);
    m.notify(1);
    assert_eq!(pba(&m), 0b11);
    // One 8-byte write: entry 0's Vector Control and entry 1's address.
    let mut w = [0u8; 8];
    w[4..].copy_from_slice(&(second.addr as u32).to_le_bytes());
    m.table_write(12, &w);
    assert_eq!((sent.take(), pba(&m)), (vec![MSG], 0b10));
    program(&mut m, 1, second.addr, second.data);
    assert_eq!((sent.take(), pba(&m)), (vec![second], 0));
}
