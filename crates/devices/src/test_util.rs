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
