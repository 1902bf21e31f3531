//! A 16550A UART (vm-superio) on the port bus: transmit-empty and
//! receive interrupts through an [`EventFd`], output to any writer, input
//! pushed in by the VMM.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const UART_PORT_LEN: u64 = 8;

/// Raises the UART's interrupt line by writing an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals `input_space` whenever the guest has drained the receive FIFO,
/// so that a blocked input feeder can push more.
#[derive(Debug)]
pub struct InputSpace(pub Arc<EventFd>);

impl SerialEvents for InputSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

type Output = Box<dyn Write + Send>;

pub struct SerialDevice {
    inner: Serial<EventFdTrigger, InputSpace, Output>,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes what the guest sends to `out`.
    /// `input_space` is signalled when the receive FIFO empties.
    pub fn new(irq: EventFd, out: Output, input_space: Arc<EventFd>) -> Self {
        SerialDevice {
            inner: Serial::with_events(EventFdTrigger(irq), InputSpace(input_space), out),
        }
    }

    /// Queues bytes for the guest; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(reg)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.inner.read(reg);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(reg)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.inner.write(reg, value) {
                // The console sink failed (a closed pipe, a full disk): the
                // guest must not notice; say so once in the log.
                tracing::debug!("serial output lost: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::SharedOutput as Shared;

    fn device() -> (SerialDevice, EventFd, Arc<EventFd>, Shared) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let space = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let out = Shared::default();
        let dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            Box::new(out.clone()),
            space.clone(),
        );
        (dev, irq, space, out)
    }

    #[test]
    fn output_reaches_the_writer() {
        let (mut dev, _irq, _space, out) = device();
        for b in b"hi\n" {
            dev.write(COM1_PORT, 0, &[*b]);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn transmit_empty_interrupt_is_raised() {
        let (mut dev, irq, _space, _out) = device();
        // IER: enable THR-empty interrupt; the UART signals at once.
        dev.write(COM1_PORT, 1, &[0x02]);
        assert_eq!(irq.read().unwrap(), 1);
        // The interrupt handler reads IIR (acknowledging THR-empty), then
        // sends a byte: the UART raises THR-empty again.
        let mut iir = [0u8];
        dev.read(COM1_PORT, 2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02, "IIR says THR empty");
        dev.write(COM1_PORT, 0, b"x");
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn input_is_queued_and_read_back() {
        let (mut dev, _irq, space, _out) = device();
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        let mut b = [0u8];
        dev.read(COM1_PORT, 5, &mut b);
        assert_eq!(b[0] & 1, 1, "LSR data ready");
        dev.read(COM1_PORT, 0, &mut b);
        assert_eq!(b[0], b'a');
        dev.read(COM1_PORT, 0, &mut b);
        assert_eq!(b[0], b'b');
        assert_eq!(space.read().unwrap(), 1, "drained FIFO is signalled");
        // A full FIFO takes what fits.
        assert_eq!(dev.enqueue_input(&[b'z'; 100]), 64);
        assert_eq!(dev.enqueue_input(b"more"), 0);
    }
}
