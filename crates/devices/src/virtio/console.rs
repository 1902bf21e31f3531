//! virtio-console with one port (no multiport): the guest's `hvc0`.
//! What the guest transmits goes to a writer; what the host types is
//! queued in a [`ConsoleInput`] and handed to the guest's receive buffers.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use memory::GuestMemoryMmap;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::persist::OwnState;
use super::worker::{stop_worker, WorkerError, WorkerThread};
use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, VirtioDeviceState, VirtioStateError,
};

const QUEUE_SIZE: u16 = 256;
const TX: usize = 1;
/// Host input held for the guest at most; typing never comes near it.
pub const INPUT_LIMIT: usize = 1 << 20;
/// Largest transmit buffer taken at once.
const TX_LIMIT: usize = 64 * 1024;

/// Host input waiting for the guest.
#[derive(Debug)]
pub struct ConsoleInput {
    bytes: Mutex<VecDeque<u8>>,
    ready: EventFd,
}

impl ConsoleInput {
    pub fn new() -> std::io::Result<Self> {
        Ok(ConsoleInput {
            bytes: Mutex::new(VecDeque::new()),
            ready: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Queues input for the guest; returns how much was taken.
    pub fn push(&self, input: &[u8]) -> usize {
        let mut bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let n = input.len().min(INPUT_LIMIT.saturating_sub(bytes.len()));
        bytes.extend(&input[..n]);
        drop(bytes);
        let _ = self.ready.write(1);
        n
    }
}

type Output = Arc<Mutex<Box<dyn Write + Send>>>;

pub struct Console {
    output: Output,
    input: Arc<ConsoleInput>,
    /// The worker owns the receive and transmit queues.
    worker: Option<WorkerThread<[Queue; 2]>>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    pub fn new(output: Box<dyn Write + Send>, input: Arc<ConsoleInput>) -> Self {
        Console {
            output: Arc::new(Mutex::new(output)),
            input,
            worker: None,
        }
    }
}

/// Writes what the guest transmitted to `output`.
pub fn process_tx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    output: &Output,
    interrupt: &Interrupt,
) {
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut out = output.lock().unwrap_or_else(|e| e.into_inner());
        for desc in chain {
            if desc.is_write_only() {
                break;
            }
            let len = (desc.len() as usize).min(TX_LIMIT);
            let mut bytes = vec![0u8; len];
            if mem
                .read_slice(&mut bytes, GuestAddress(desc.addr().0))
                .is_err()
            {
                break;
            }
            let _ = out.write_all(&bytes);
        }
        let _ = out.flush();
        drop(out);
        if queue.add_used(mem, head, 0).is_err() {
            break;
        }
        used_any = true;
    }
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
}

/// Moves queued host input into the guest's receive buffers.
pub fn process_rx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    input: &ConsoleInput,
    interrupt: &Interrupt,
) {
    let mut used_any = false;
    let mut pending = input.bytes.lock().unwrap_or_else(|e| e.into_inner());
    while !pending.is_empty() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let mut written = 0u32;
        for desc in chain {
            if !desc.is_write_only() || pending.is_empty() {
                break;
            }
            let n = (desc.len() as usize).min(pending.len());
            let bytes: Vec<u8> = pending.iter().take(n).copied().collect();
            if mem
                .write_slice(&bytes, GuestAddress(desc.addr().0))
                .is_err()
            {
                break;
            }
            pending.drain(..n);
            written = written.saturating_add(super::len_u32(n));
        }
        if queue.add_used(mem, head, written).is_err() {
            break;
        }
        used_any = true;
    }
    drop(pending);
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used();
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }
    fn name(&self) -> &'static str {
        "console"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let (mem, interrupt, [(rx, rx_evt), (tx, tx_evt)]) = a.take_queues::<2>()?;
        let ready = self.input.ready.try_clone().map_err(ActivateError::Event)?;
        let (input, output) = (self.input.clone(), self.output.clone());
        let events = vec![rx_evt, tx_evt, ready];
        let worker = WorkerThread::start("virtio-console", events, [rx, tx], move |[rx, tx], i| {
            if i == TX {
                process_tx(tx, &mem, &output, &interrupt);
            } else {
                // The receive queue got buffers, or the host typed.
                process_rx(rx, &mem, &input, &interrupt);
            }
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        // Input typed before the driver was ready.
        let _ = self.input.ready.write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, WorkerError> {
        // Host input typed while asleep waits in `input`; waking (as
        // activating) looks at it again.
        Ok(stop_worker(&mut self.worker)?.map(Vec::from))
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Console(self.state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioStateError> {
        let s = persist::ConsoleState::own(state, self.name(), self.worker.is_some())?;
        self.restore(s)
    }
}

pub mod persist;

#[cfg(test)]
// Test lengths, indices and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::test_util::desc as d;
    use crate::test_util::SharedOutput as Shared;
    use virtio_queue::mock::MockSplitQueue;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn irq() -> Interrupt {
        Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let m = mem();
        m.write_slice(b"hello ", GuestAddress(0x1000)).unwrap();
        m.write_slice(b"hvc0\n", GuestAddress(0x2000)).unwrap();
        let mock = MockSplitQueue::new(&m, 16);
        mock.build_desc_chain(&[
            d(0x1000, 6, crate::test_util::F_NEXT, 1),
            d(0x2000, 5, 0, 0),
        ])
        .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let out = Shared::default();
        let output: Output = Arc::new(Mutex::new(Box::new(out.clone())));
        process_tx(&mut q, &m, &output, &irq());
        assert_eq!(*out.0.lock().unwrap(), b"hello hvc0\n");
    }

    #[test]
    fn input_fills_receive_buffers_in_order() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let w = crate::test_util::F_WRITE;
        mock.build_multiple_desc_chains(&[d(0x1000, 4, w, 0), d(0x2000, 4, w, 0)])
            .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let input = ConsoleInput::new().unwrap();
        assert_eq!(input.push(b"abcdef"), 6);
        process_rx(&mut q, &m, &input, &irq());
        let mut a = [0u8; 4];
        m.read_slice(&mut a, GuestAddress(0x1000)).unwrap();
        assert_eq!(&a, b"abcd");
        let mut b = [0u8; 2];
        m.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!(&b, b"ef");
        assert_eq!(mock.used().ring().ref_at(1).unwrap().load().len(), 2);
        assert!(input.bytes.lock().unwrap().is_empty());
    }

    #[test]
    fn input_waits_for_buffers_and_is_bounded() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        let mut q: Queue = mock.create_queue().unwrap();
        let input = ConsoleInput::new().unwrap();
        input.push(b"x");
        process_rx(&mut q, &m, &input, &irq());
        assert_eq!(
            input.bytes.lock().unwrap().len(),
            1,
            "kept until the guest gives a buffer"
        );
        assert_eq!(input.push(&vec![0u8; INPUT_LIMIT]), INPUT_LIMIT - 1);
    }

    #[test]
    fn receive_buffers_outside_ram_do_not_lose_input_or_panic() {
        let m = mem();
        let mock = MockSplitQueue::new(&m, 16);
        mock.build_desc_chain(&[d(0xffff_0000_0000, 8, crate::test_util::F_WRITE, 0)])
            .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let input = ConsoleInput::new().unwrap();
        input.push(b"keep");
        process_rx(&mut q, &m, &input, &irq());
        assert_eq!(input.bytes.lock().unwrap().len(), 4);
    }
}
