//! A 16550A UART (vm-superio) on the port bus: transmit-empty and
//! receive interrupts through an [`EventFd`], output to any writer, input
//! pushed in by the VMM.

use std::io::Write;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use snapshot::Persist;
use vm_superio::serial::{SerialEvents, SerialState};
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

/// The UART's registers and receive FIFO (vm-superio's `SerialState`,
/// which is not serde). What the guest transmitted went to the output at
/// once; nothing of it is kept.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Bytes in the receive FIFO, not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

// vm-superio's `SerialState` is not serde: the two types mirror each
// other field for field, and these two conversions are the one place that
// says so.
impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The receive FIFO's size (vm-superio's).
pub const FIFO_SIZE: usize = 64;

/// What a restored UART is wired to, as [`SerialDevice::new`] takes.
pub struct SerialArgs {
    pub irq: EventFd,
    pub out: Output,
    pub input_space: Arc<EventFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    #[error("{0} bytes in the serial receive FIFO, which holds {FIFO_SIZE}")]
    Fifo(usize),
    #[error("the restored serial port cannot raise its interrupt: {0}")]
    Restore(String),
}

impl SerialDevice {
    /// Takes a saved state in place (the UART already on the bus, wired
    /// to its interrupt, output and input-space event); nothing changes if
    /// it is refused. (After the checks the only failure left is an
    /// interrupt eventfd that cannot be written, which would leave the
    /// UART's output in a sink.)
    pub fn restore_state(&mut self, s: &SerialDeviceState) -> Result<(), SerialStateError> {
        if s.in_buffer.len() > FIFO_SIZE {
            return Err(SerialStateError::Fifo(s.in_buffer.len()));
        }
        let irq = self
            .inner
            .interrupt_evt()
            .0
            .try_clone()
            .map_err(|e| SerialStateError::Restore(e.to_string()))?;
        let space = self.inner.events().0.clone();
        let spare = irq
            .try_clone()
            .map_err(|e| SerialStateError::Restore(e.to_string()))?;
        // The output moves to the restored UART; a sink holds its place
        // for a moment.
        let placeholder = Serial::with_events(
            EventFdTrigger(spare),
            InputSpace(space.clone()),
            Box::new(std::io::sink()) as Output,
        );
        let out = std::mem::replace(&mut self.inner, placeholder).into_writer();
        let args = SerialArgs {
            irq,
            out,
            input_space: space,
        };
        *self = SerialDevice::restore(args, s)?;
        Ok(())
    }
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type Args = SerialArgs;
    type Error = SerialStateError;

    fn save(&self) -> SerialDeviceState {
        self.inner.state().into()
    }

    /// Any register values are accepted (the guest can write any byte to
    /// them); the FIFO must fit. A pending interrupt is raised again.
    fn restore(args: SerialArgs, s: &SerialDeviceState) -> Result<Self, SerialStateError> {
        if s.in_buffer.len() > FIFO_SIZE {
            return Err(SerialStateError::Fifo(s.in_buffer.len()));
        }
        let state = SerialState::from(s);
        let inner = Serial::from_state(
            &state,
            EventFdTrigger(args.irq),
            InputSpace(args.input_space),
            args.out,
        )
        .map_err(|e| SerialStateError::Restore(e.to_string()))?;
        Ok(SerialDevice { inner })
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

    #[test]
    fn state_round_trips_and_the_restored_uart_goes_on() {
        let (mut dev, _irq, _space, _out) = device();
        dev.write(COM1_PORT, 3, &[0x03]); // LCR: 8N1
        dev.write(COM1_PORT, 7, &[0x5a]); // scratch
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        let saved = dev.save();
        let (irq, space) = (
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        );
        let out = Shared::default();
        let args = SerialArgs {
            irq: irq.try_clone().unwrap(),
            out: Box::new(out.clone()),
            input_space: space,
        };
        let mut restored = SerialDevice::restore(args, &saved).unwrap();
        let json = crate::test_util::json(&saved);
        let back: SerialDeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(crate::test_util::json(&restored.save()), json);
        assert_eq!(back, saved);
        // The scratch register, the FIFO's bytes and the output carry on.
        let mut b = [0u8];
        restored.read(COM1_PORT, 7, &mut b);
        assert_eq!(b[0], 0x5a);
        restored.read(COM1_PORT, 0, &mut b);
        assert_eq!(b[0], b'a');
        restored.write(COM1_PORT, 0, b"z");
        assert_eq!(*out.0.lock().unwrap(), b"z");
    }

    #[test]
    fn an_overfull_fifo_is_refused() {
        let (dev, _irq, _space, _out) = device();
        let mut saved = dev.save();
        saved.in_buffer = vec![0; FIFO_SIZE + 1];
        let args = SerialArgs {
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            out: Box::new(std::io::sink()),
            input_space: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        };
        assert!(matches!(
            SerialDevice::restore(args, &saved),
            Err(SerialStateError::Fifo(65))
        ));
    }

    #[test]
    fn a_uart_on_the_bus_takes_a_state_in_place() {
        let (mut src, _i, _s, _o) = device();
        src.write(COM1_PORT, 7, &[0x77]);
        src.enqueue_input(b"q");
        let saved = src.save();
        let (mut dev, irq, _space, out) = device();
        let mut bad = saved.clone();
        bad.in_buffer = vec![0; 100];
        assert!(dev.restore_state(&bad).is_err());
        dev.restore_state(&saved).unwrap();
        assert_eq!(
            crate::test_util::json(&dev.save()),
            crate::test_util::json(&saved)
        );
        let mut b = [0u8];
        dev.read(COM1_PORT, 0, &mut b);
        assert_eq!(b[0], b'q');
        // Still wired to the same output and interrupt.
        dev.write(COM1_PORT, 1, &[0x02]);
        assert!(irq.read().is_ok());
        dev.write(COM1_PORT, 0, b"k");
        assert_eq!(*out.0.lock().unwrap(), b"k");
    }
}
