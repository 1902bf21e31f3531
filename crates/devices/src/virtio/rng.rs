//! virtio-rng: fills the guest's buffers from the host's getrandom(2).

use memory::GuestMemoryMmap;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::persist::{OwnState, RngState};
use super::worker::{stop_worker, WorkerError, WorkerThread};
use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, VirtioDeviceState, VirtioStateError,
};

const QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets, however large its buffers: the guest
/// asks again for more.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct Rng {
    worker: Option<WorkerThread<Queue>>,
}

impl Rng {
    pub fn new() -> Self {
        Rng::default()
    }
}

/// Host randomness into `buf`.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Serves every available request of `queue`. Device-readable
/// descriptors, addresses outside RAM and oversized requests are not
/// errors the guest can use against the VMM: the request completes with
/// the bytes actually written.
pub fn process_queue(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut written = 0usize;
        for desc in chain {
            if !desc.is_write_only() || written >= MAX_REQUEST {
                break;
            }
            let len = (desc.len() as usize).min(MAX_REQUEST - written);
            let mut bytes = vec![0u8; len];
            if fill_random(&mut bytes).is_err() {
                break;
            }
            if mem
                .write_slice(&bytes, GuestAddress(desc.addr().0))
                .is_err()
            {
                tracing::debug!(
                    addr = desc.addr().0,
                    len,
                    "virtio-rng buffer outside guest RAM"
                );
                break;
            }
            written += len;
        }
        if let Err(e) = queue.add_used(mem, head, super::len_u32(written)) {
            tracing::warn!("virtio-rng cannot return a buffer: {e}");
            break;
        }
        used_any = true;
    }
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn name(&self) -> &'static str {
        "rng"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let (mem, interrupt, [(queue, event)]) = a.take_queues::<1>()?;
        let worker = WorkerThread::start("virtio-rng", vec![event], queue, move |queue, _| {
            process_queue(queue, &mem, &interrupt);
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, WorkerError> {
        Ok(stop_worker(&mut self.worker)?.map(|q| vec![q]))
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Rng(RngState {})
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioStateError> {
        let s = RngState::own(state, self.name(), self.worker.is_some())?;
        let RngState {} = s;
        Ok(())
    }
}

#[cfg(test)]
// Test lengths, indices and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::test_util::desc;
    use std::sync::Arc;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EventFd;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn interrupt() -> (Interrupt, EventFd) {
        let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (Interrupt::new(line.try_clone().unwrap()), line)
    }

    fn used_len(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>, i: u16) -> u32 {
        let _ = mem;
        mock.used().ring().ref_at(i.into()).unwrap().load().len()
    }

    #[test]
    fn fills_writable_buffers() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let descs = [
            desc(0x8000, 16, crate::test_util::F_WRITE | 1, 1),
            desc(0x9000, 32, crate::test_util::F_WRITE, 0),
        ];
        mock.build_desc_chain(&descs).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let (irq, line) = interrupt();
        process_queue(&mut queue, &mem, &irq);
        assert_eq!(used_len(&mem, &mock, 0), 48);
        let mut a = [0u8; 16];
        mem.read_slice(&mut a, GuestAddress(0x8000)).unwrap();
        assert_ne!(a, [0u8; 16], "random bytes arrived");
        assert_eq!(line.read().unwrap(), 1);
    }

    #[test]
    fn hostile_chains_complete_without_harm() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        // A device-readable buffer, a buffer outside RAM, and a giant one.
        mock.build_multiple_desc_chains(&[
            desc(0x8000, 16, 0, 0),
            desc(0xffff_0000_0000, 64, crate::test_util::F_WRITE, 0),
            desc(0x1000, u32::MAX, crate::test_util::F_WRITE, 0),
        ])
        .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let (irq, _line) = interrupt();
        process_queue(&mut queue, &mem, &irq);
        assert_eq!(used_len(&mem, &mock, 0), 0);
        assert_eq!(used_len(&mem, &mock, 1), 0);
        assert_eq!(used_len(&mem, &mock, 2), MAX_REQUEST as u32);
    }

    #[test]
    fn activation_needs_exactly_one_queue() {
        let mut rng = Rng::new();
        let (irq, _line) = interrupt();
        let err = rng
            .activate(Activation {
                mem: memory(),
                interrupt: Arc::new(irq),
                queues: vec![],
                acked_features: 0,
            })
            .unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 1,
                got: 0
            }
        ));
    }
}
