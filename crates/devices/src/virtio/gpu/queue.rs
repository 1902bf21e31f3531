//! The control and cursor queues: each chain's device-readable bytes are
//! one request (decoded by `protocol`), its device-writable bytes take
//! the response. A chain the device cannot read or answer completes with
//! nothing written; nothing a guest puts in a chain makes the device
//! allocate more than [`MAX_REQUEST_LEN`] bytes for it.

use std::io::{Read, Write};
use std::sync::Mutex;

use memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT, Reader, Writer};

use super::backend::GpuBackend;
use super::protocol::{decode, Response, MAX_REQUEST_LEN};
use crate::virtio::Interrupt;

/// Which queue a chain came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuQueue {
    /// Queue 0: every command, each answered.
    Control,
    /// Queue 1: cursor updates and moves, not answered (as Linux's driver
    /// expects: it gives no response buffer).
    Cursor,
}

impl GpuQueue {
    fn index(self) -> usize {
        match self {
            GpuQueue::Control => 0,
            GpuQueue::Cursor => 1,
        }
    }
}

/// Serves every available chain of `queue` with `backend`, locked for
/// the time of each request.
pub fn process_queue(
    which: GpuQueue,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    backend: &Mutex<GpuBackend>,
) {
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let request = Reader::new(mem, chain.clone())
            .ok()
            .and_then(|mut r| read_request(&mut r));
        let written = match request {
            Some(bytes) => {
                let response = {
                    let mut backend = backend.lock().unwrap_or_else(|e| e.into_inner());
                    serve(which, &bytes, mem, &mut backend)
                };
                match response {
                    Some(out) => answer(mem, chain, &out),
                    None => 0,
                }
            }
            None => {
                tracing::debug!("virtio-gpu: a request outside guest memory");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, written) {
            tracing::warn!("virtio-gpu cannot return a buffer: {e}");
            break;
        }
        used_any = true;
    }
    if used_any && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_queue(which.index());
    }
}

/// The device-readable bytes of a chain, at most [`MAX_REQUEST_LEN`].
fn read_request(r: &mut Reader<'_>) -> Option<Vec<u8>> {
    let n = r.available_bytes().min(MAX_REQUEST_LEN);
    let mut bytes = vec![0u8; n];
    r.read_exact(&mut bytes).ok()?;
    Some(bytes)
}

/// Carries out one request; the response's bytes, if it has one.
pub fn serve(
    which: GpuQueue,
    bytes: &[u8],
    mem: &GuestMemoryMmap,
    backend: &mut GpuBackend,
) -> Option<Vec<u8>> {
    let (hdr, response) = match decode(bytes) {
        Ok((hdr, cmd)) => (hdr, backend.execute(mem, cmd)),
        Err((hdr, e)) => {
            tracing::debug!("virtio-gpu: {e}");
            (hdr.unwrap_or_default(), Response::NoData(e.response()))
        }
    };
    match which {
        GpuQueue::Control => Some(response.encode(&hdr)),
        GpuQueue::Cursor => None,
    }
}

/// Writes `out` into the chain's device-writable part; the bytes written
/// (none when they do not fit: the driver's buffer is too small).
fn answer<M>(mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<M>, out: &[u8]) -> u32
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory + Sized,
{
    let Ok(mut w) = Writer::new(mem, chain) else {
        tracing::debug!("virtio-gpu: a response buffer outside guest memory");
        return 0;
    };
    if w.available_bytes() < out.len() {
        tracing::debug!(
            need = out.len(),
            got = w.available_bytes(),
            "virtio-gpu: the response does not fit the driver's buffer"
        );
        return 0;
    }
    match w.write_all(out) {
        Ok(()) => crate::virtio::len_u32(out.len()),
        Err(_) => 0,
    }
}
