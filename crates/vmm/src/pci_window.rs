//! The `pc` machine's 32-bit PCI window on the memory bus. An access goes
//! to the function whose BAR decodes that address *now*, so the guest may
//! move BARs (SeaBIOS assigns every BAR itself; an OS may reassign them),
//! and each function's queue-notify ioeventfds follow its BAR
//! ([`notify_follower`]).

use std::sync::{Arc, Mutex};

use arch::layout;
use devices::virtio::pci::{
    BarMoved, VirtioPciTransport, BAR_SIZE, NOTIFY_MULTIPLIER, NOTIFY_OFFSET,
};
use devices::BusDevice;
use hypervisor::Vm;
use vmm_sys_util::eventfd::EventFd;

/// The window's base and length on the memory bus.
pub const WINDOW_START: u64 = layout::PCI_MMIO32_START;
pub const WINDOW_LEN: u64 = layout::PCI_MMIO32_END + 1 - layout::PCI_MMIO32_START;

/// The functions whose BARs live in the window.
#[derive(Default)]
pub(crate) struct PciWindow {
    functions: Vec<Arc<Mutex<VirtioPciTransport>>>,
}

fn lock<T>(t: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PciWindow {
    pub fn add(&mut self, function: Arc<Mutex<VirtioPciTransport>>) {
        self.functions.push(function);
    }

    /// Runs `f` on the function whose BAR holds `[addr, addr + len)`,
    /// with the offset into the BAR.
    fn route(
        &self,
        addr: u64,
        len: usize,
        f: impl FnOnce(&mut VirtioPciTransport, u64, u64),
    ) -> bool {
        let len = u64::try_from(len).unwrap_or(u64::MAX);
        for function in &self.functions {
            let mut t = lock(function);
            let Some(bar) = t.bar_address() else { continue };
            if addr >= bar && addr.saturating_add(len) <= bar.saturating_add(BAR_SIZE) {
                f(&mut t, bar, addr - bar);
                return true;
            }
        }
        false
    }
}

impl BusDevice for PciWindow {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let addr = base.saturating_add(offset);
        let len = data.len();
        if !self.route(addr, len, |t, bar, off| t.read(bar, off, data)) {
            // Nothing decodes there: a PCI master abort reads all ones.
            data.fill(0xff);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let addr = base.saturating_add(offset);
        if !self.route(addr, data.len(), |t, bar, off| t.write(bar, off, data)) {
            tracing::debug!(addr, "write to the PCI window where no BAR decodes");
        }
    }
}

/// Keeps a function's queue-notify ioeventfds (`events`, queue order) at
/// its BAR: registered at `initial`, moved wherever the guest puts the
/// BAR inside the window, dropped while it decodes nowhere (or outside
/// the window, where the memory bus does not reach it either).
pub(crate) fn notify_follower(vm: Arc<dyn Vm>, events: Vec<EventFd>, initial: u64) -> BarMoved {
    let at = |bar: u64, queue: u64| bar + NOTIFY_OFFSET + queue * u64::from(NOTIFY_MULTIPLIER);
    // Where each queue's event is registered now.
    let mut placed: Vec<Option<u64>> = (0u64..)
        .zip(&events)
        .map(|(queue, _)| Some(at(initial, queue)))
        .collect();
    Box::new(move |moved: Option<u64>| {
        for (slot, event) in placed.iter_mut().zip(&events) {
            if let Some(old) = slot.take() {
                if let Err(e) = vm.unregister_mmio_notify(event, old) {
                    tracing::warn!("cannot move a queue notification away from {old:#x}: {e}");
                }
            }
        }
        let inside = |bar: u64| {
            bar >= WINDOW_START && bar.saturating_add(BAR_SIZE) <= WINDOW_START + WINDOW_LEN
        };
        let Some(new) = moved.filter(|&b| inside(b)) else {
            return;
        };
        for ((queue, slot), event) in (0u64..).zip(placed.iter_mut()).zip(&events) {
            let addr = at(new, queue);
            match vm.register_mmio_notify(event, addr) {
                Ok(()) => *slot = Some(addr),
                // The notification still reaches the device, through the
                // window's slow path.
                Err(e) => tracing::warn!("cannot place a queue notification at {addr:#x}: {e}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use devices::pci::msix::{MsiMessage, MsiTarget};
    use devices::pci::PciDevice;
    use devices::virtio::pci::{PciVectors, SharedPciTransport};
    use devices::virtio::rng::Rng;
    use hypervisor::GuestMemoryMmap;
    use vm_memory::GuestAddress;

    use super::*;

    struct Nowhere;
    impl MsiTarget for Nowhere {
        fn send(&self, _: MsiMessage) {}
    }

    fn function(at: u64) -> Arc<Mutex<VirtioPciTransport>> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vectors = Arc::new(PciVectors::new(1, Arc::new(Nowhere)).unwrap());
        let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = VirtioPciTransport::interrupt(line, &vectors);
        let mut t = VirtioPciTransport::new(Box::new(Rng::new()), mem, irq, vectors).unwrap();
        t.set_bar_address(at);
        Arc::new(Mutex::new(t))
    }

    fn num_queues(w: &mut PciWindow, bar: u64) -> u16 {
        let mut b = [0u8; 2];
        w.read(WINDOW_START, bar - WINDOW_START + 0x12, &mut b);
        u16::from_le_bytes(b)
    }

    /// Accesses follow a BAR the guest moves (as SeaBIOS moves all of
    /// them); where nothing decodes reads all ones.
    #[test]
    fn accesses_follow_moved_bars() {
        let mut w = PciWindow::default();
        let a = function(WINDOW_START);
        let b = function(WINDOW_START + BAR_SIZE);
        w.add(a.clone());
        w.add(b.clone());
        assert_eq!(num_queues(&mut w, WINDOW_START), 1);
        assert_eq!(num_queues(&mut w, WINDOW_START + BAR_SIZE), 1);

        let moved = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen = moved.clone();
        let mut shared = SharedPciTransport::new(a.clone())
            .on_bar_moved(Box::new(move |at| seen.lock().unwrap().push(at)));
        let new = WINDOW_START + 4 * BAR_SIZE;
        // Sizing, then the new address, as firmware does it.
        shared.config_write(0x10, &u32::MAX.to_le_bytes());
        shared.config_write(0x10, &u32::try_from(new).unwrap().to_le_bytes());
        // (The sizing value reads back as the top of 4 GiB: outside the
        // window, where no notification is placed.)
        assert_eq!(moved.lock().unwrap().last(), Some(&Some(new)));
        assert_eq!(num_queues(&mut w, new), 1);
        assert_eq!(
            num_queues(&mut w, WINDOW_START),
            0xffff,
            "nothing decodes there now"
        );
        // Memory decoding off: the BAR decodes nowhere.
        shared.config_write(0x04, &0u16.to_le_bytes());
        assert_eq!(num_queues(&mut w, new), 0xffff);
        assert_eq!(moved.lock().unwrap().last(), Some(&None));
    }
}
