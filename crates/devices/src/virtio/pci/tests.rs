//! virtio-pci as Linux's driver uses it: find the capabilities, negotiate
//! through the common configuration, place the rings, enable MSI-X and
//! assign vectors; a used buffer then sends the queue's message. Plus
//! INTx through the ISR, hostile writes and the state round trip.

use std::sync::Mutex as StdMutex;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::pci::msix::MsiMessage;
use crate::test_util::{desc as d, wait_for, F_WRITE};
use crate::virtio::rng::Rng;

#[derive(Debug, Default)]
struct Sent(StdMutex<Vec<MsiMessage>>);

impl MsiTarget for Sent {
    fn send(&self, msg: MsiMessage) {
        self.0.lock().unwrap().push(msg);
    }
}

impl Sent {
    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

struct Rig {
    t: VirtioPciTransport,
    sent: Arc<Sent>,
    line: EventFd,
    mem: GuestMemoryMmap,
}

fn rig() -> Rig {
    rig_in(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap())
}

fn rig_in(mem: GuestMemoryMmap) -> Rig {
    let sent = Arc::new(Sent::default());
    let vectors = Arc::new(PciVectors::new(1, sent.clone()).unwrap());
    let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = VirtioPciTransport::interrupt(line.try_clone().unwrap(), &vectors);
    let t = VirtioPciTransport::new(Box::new(Rng::new()), mem.clone(), irq, vectors).unwrap();
    Rig { t, sent, line, mem }
}

impl Rig {
    fn cfg(&self, offset: u8, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.t.config_read(offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn r(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.t.bar_read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn w(&mut self, offset: u64, len: usize, v: u64) {
        self.t.bar_write(offset, &v.to_le_bytes()[..len]);
    }

    /// The virtio capabilities by type: (offset in the BAR, length).
    fn caps(&self) -> Vec<(u8, u32, u32)> {
        let mut out = Vec::new();
        let mut at = self.cfg(0x34, 1);
        while at != 0 {
            let a = u8::try_from(at).unwrap();
            if self.cfg(a, 1) == u32::from(CAP_VENDOR) {
                let t = u8::try_from(self.cfg(a + 3, 1)).unwrap();
                out.push((t, self.cfg(a + 8, 4), self.cfg(a + 12, 4)));
            }
            at = self.cfg(a + 1, 1);
        }
        out
    }

    /// The driver's setup of queue 0 at `base`, as Linux does it.
    fn set_up(&mut self, queue: &MockSplitQueue<GuestMemoryMmap>, msix: bool) {
        if msix {
            self.enable_msix();
        }
        self.w(0x14, 1, 0);
        self.w(0x14, 1, u64::from(VIRTIO_CONFIG_S_ACKNOWLEDGE));
        self.w(
            0x14,
            1,
            u64::from(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER),
        );
        self.w(0x08, 4, 1);
        self.w(0x0c, 4, 1); // VERSION_1
        self.w(0x08, 4, 0);
        self.w(0x0c, 4, 0);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.w(0x14, 1, u64::from(s));
        assert_eq!(self.r(0x14, 1), u64::from(s), "features accepted");
        self.w(0x16, 2, 0);
        self.w(0x18, 2, 16);
        if msix {
            self.w(0x1a, 2, 0);
            assert_eq!(self.r(0x1a, 2), 0, "vector 0 accepted");
        }
        for (off, addr) in [
            (0x20, queue.desc_table_addr().0),
            (0x28, queue.avail_addr().0),
            (0x30, queue.used_addr().0),
        ] {
            self.w(off, 4, addr & 0xffff_ffff);
            self.w(off + 4, 4, addr >> 32);
        }
        self.w(0x1c, 2, 1);
        self.w(0x14, 1, u64::from(s | VIRTIO_CONFIG_S_DRIVER_OK));
    }

    fn enable_msix(&mut self) {
        let cap = self.t.msix_cap;
        let control = u16::try_from(self.cfg(u8::try_from(cap + 2).unwrap(), 2)).unwrap();
        self.t.config_write(
            u8::try_from(cap + 2).unwrap(),
            &(control | 0x8000).to_le_bytes(),
        );
        // Vector 0 → queue 0, vector 1 → config; unmask both.
        for v in 0..2u64 {
            let e = MSIX_TABLE_OFFSET + v * 16;
            self.w(e, 4, 0xfee0_0000);
            self.w(e + 4, 4, 0);
            self.w(e + 8, 4, 0x40 + v);
            self.w(e + 12, 4, 0);
        }
        self.w(0x10, 2, 1);
    }
}

#[test]
fn identity_bar_and_capabilities_are_what_linux_looks_for() {
    let r = rig();
    assert_eq!(r.cfg(0, 2), 0x1af4);
    assert_eq!(r.cfg(2, 2), 0x1040 + 4, "modern entropy device");
    assert_eq!(r.cfg(8, 1), 1, "revision 1: modern only");
    // BAR sizing.
    let mut t = r.t;
    t.config_write(0x10, &u32::MAX.to_le_bytes());
    let mut b = [0u8; 4];
    t.config_read(0x10, &mut b);
    assert_eq!(
        u32::from_le_bytes(b) & !0xf,
        !(u32::try_from(BAR_SIZE).unwrap() - 1)
    );
    let r = Rig { t, ..rig() };
    let caps = r.caps();
    let types: Vec<u8> = caps.iter().map(|c| c.0).collect();
    assert_eq!(types, [CAP_COMMON, CAP_ISR, CAP_DEVICE, CAP_NOTIFY]);
    for (_, off, len) in caps {
        assert!(u64::from(off) + u64::from(len) <= BAR_SIZE);
    }
}

#[test]
fn a_used_buffer_sends_the_queues_msix_message_or_goes_pending() {
    let mut r = rig();
    let m = r.mem.clone();
    let q = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    r.set_up(&q, true);
    assert!(r.t.common.activated);
    q.add_desc_chains(&[d(0x100000, 16, F_WRITE, 0)], 0)
        .unwrap();
    r.w(NOTIFY_OFFSET, 2, 0);
    assert!(wait_for(|| r.sent.count() == 1));
    assert_eq!(
        r.sent.0.lock().unwrap()[0],
        MsiMessage {
            addr: 0xfee0_0000,
            data: 0x40
        }
    );
    assert_eq!(r.r(ISR_OFFSET, 1), 0, "MSI-X leaves the ISR alone");
    assert!(r.line.read().is_err(), "and the INTx line");

    // Masked: the message waits in the PBA and goes out on unmask.
    r.w(MSIX_TABLE_OFFSET + 12, 4, 1);
    q.add_desc_chains(&[d(0x101000, 16, F_WRITE, 0)], 1)
        .unwrap();
    r.w(NOTIFY_OFFSET, 2, 0);
    assert!(wait_for(|| r.r(MSIX_PBA_OFFSET, 8) == 1));
    assert_eq!(r.sent.count(), 1);
    r.w(MSIX_TABLE_OFFSET + 12, 4, 0);
    assert_eq!(r.sent.count(), 2);
    assert_eq!(r.r(MSIX_PBA_OFFSET, 8), 0);
    let mut used = [0u8; 16];
    m.read_slice(&mut used, GuestAddress(0x101000)).unwrap();
}

#[test]
fn without_msix_the_line_fires_and_the_isr_clears_on_read() {
    let mut r = rig();
    let m = r.mem.clone();
    let q = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    r.set_up(&q, false);
    q.add_desc_chains(&[d(0x100000, 16, F_WRITE, 0)], 0)
        .unwrap();
    r.w(NOTIFY_OFFSET, 2, 0);
    assert!(wait_for(|| r.line.read().is_ok()));
    assert_eq!(r.r(ISR_OFFSET, 1), 1);
    assert_eq!(r.r(ISR_OFFSET, 1), 0, "read to clear");
    assert_eq!(r.sent.count(), 0);
}

#[test]
fn vectors_beyond_the_table_read_back_as_no_vector_and_reset_unassigns() {
    let mut r = rig();
    r.w(0x10, 2, 7);
    assert_eq!(r.r(0x10, 2), u64::from(NO_VECTOR));
    r.w(0x10, 2, 1);
    assert_eq!(r.r(0x10, 2), 1);
    r.w(0x14, 1, 0);
    assert_eq!(r.r(0x10, 2), u64::from(NO_VECTOR));
    assert_eq!(r.r(0x12, 2), 1, "one queue");
}

#[test]
fn hostile_writes_anywhere_neither_panic_nor_escape() {
    let mut r = rig();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = [1usize, 2, 4, 8][usize::try_from(x & 3).unwrap()];
        let offset = (x >> 8) % (BAR_SIZE + 0x100);
        if x & 0x30 == 0 {
            let reg = u8::try_from((x >> 24) & 0xff).unwrap();
            r.t.config_write(reg, &x.to_le_bytes()[..len.min(4)]);
            let _ = r.cfg(reg, 1);
        } else if x & 0x40 == 0 {
            r.w(offset, len, x >> 3);
        } else {
            let _ = r.r(offset, len);
        }
    }
    // Still a virtio device with its identity.
    assert_eq!(r.cfg(0, 2), 0x1af4);
}

#[test]
fn state_round_trips_and_the_restored_function_keeps_its_vectors() {
    let mut r = rig();
    let m = r.mem.clone();
    let q = MockSplitQueue::create(&m, GuestAddress(0x10000), 16);
    r.set_up(&q, true);
    q.add_desc_chains(&[d(0x100000, 16, F_WRITE, 0)], 0)
        .unwrap();
    r.w(NOTIFY_OFFSET, 2, 0);
    assert!(wait_for(|| r.sent.count() == 1));
    r.t.sleep().unwrap();
    let saved = r.t.save_state().unwrap();
    let json = serde_json::to_string(&saved).unwrap();

    let mut r2 = rig_in(m.clone());
    r2.t.restore(&serde_json::from_str(&json).unwrap()).unwrap();
    r2.t.sleep().unwrap();
    let again = r2.t.save_state().unwrap();
    assert_eq!(serde_json::to_string(&again).unwrap(), json);
    r2.t.wake().unwrap();
    q.add_desc_chains(&[d(0x101000, 16, F_WRITE, 0)], 1)
        .unwrap();
    r2.w(NOTIFY_OFFSET, 2, 0);
    assert!(
        wait_for(|| r2.sent.count() >= 1),
        "queue 0's vector survived"
    );

    // A state for another queue count is refused.
    let mut bad = saved.clone();
    bad.queue_vectors.push(0);
    assert!(matches!(
        rig().t.restore(&bad),
        Err(PciStateError::Vectors { .. })
    ));
}
