//! Helpers shared by the device tests.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// A writer whose output the test can read back.
#[derive(Clone, Default)]
pub(crate) struct SharedOutput(pub(crate) Arc<Mutex<Vec<u8>>>);

impl Write for SharedOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Descriptor flags as descriptors carry them (the bindings' constants
/// are u32).
pub(crate) const F_NEXT: u16 = 1;
pub(crate) const F_WRITE: u16 = 2;

#[test]
fn descriptor_flags_match_the_bindings() {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    assert_eq!(u32::from(F_NEXT), VRING_DESC_F_NEXT);
    assert_eq!(u32::from(F_WRITE), VRING_DESC_F_WRITE);
}

/// A split-ring descriptor for the tests' mock queues.
pub(crate) fn desc(
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> virtio_queue::desc::RawDescriptor {
    virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
        addr, len, flags, next,
    ))
}

/// Plays a virtio driver on `t`: acks `features` (VERSION_1 is added),
/// points queue i at `queues[i]` (mock queues in guest memory) and sets
/// DRIVER_OK, which activates the device.
pub(crate) fn set_up_driver(
    t: &mut crate::virtio::mmio::MmioTransport,
    queues: &[&virtio_queue::mock::MockSplitQueue<'_, memory::GuestMemoryMmap>],
    sizes: &[u16],
    features: u64,
) {
    use crate::BusDevice;
    let mut w = |offset: u64, value: u32| t.write(0, offset, &value.to_le_bytes());
    let features = features | 1 << crate::virtio::VIRTIO_F_VERSION_1;
    w(0x70, 1);
    w(0x70, 3);
    w(0x24, 0);
    w(0x20, u32::try_from(features & 0xffff_ffff).unwrap());
    w(0x24, 1);
    w(0x20, u32::try_from(features >> 32).unwrap());
    w(0x70, 0xb);
    for (i, (q, size)) in queues.iter().zip(sizes).enumerate() {
        w(0x30, u32::try_from(i).unwrap());
        w(0x38, u32::from(*size));
        for (offset, addr) in [
            (0x80, q.desc_table_addr().0),
            (0x90, q.avail_addr().0),
            (0xa0, q.used_addr().0),
        ] {
            w(offset, u32::try_from(addr & 0xffff_ffff).unwrap());
            w(offset + 4, u32::try_from(addr >> 32).unwrap());
        }
        w(0x44, 1);
    }
    w(0x70, 0xf);
}

/// Waits (up to 5 s) until `cond` holds; false if it never did.
pub(crate) fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    cond()
}

/// A save → JSON → restore → save round trip must give the same JSON.
pub(crate) fn json<T: serde::Serialize>(state: &T) -> String {
    serde_json::to_string(state).unwrap()
}
