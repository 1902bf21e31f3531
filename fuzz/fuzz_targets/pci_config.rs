//! A hostile guest's PCI traffic: configuration mechanism #1 on the root,
//! a function's configuration space (BARs, capabilities, MSI-X's control
//! register) and its MSI-X table and pending bits, with any widths and
//! offsets. Nothing may panic; the function's identity and BAR types
//! never change; its state restores and saves the same.

#![no_main]

use std::sync::Arc;

use devices::pci::config::{Bar, BarKind, PciConfig, PciId, BAR0};
use devices::pci::msix::{MsiMessage, MsiTarget, Msix, CAP_ID};
use devices::pci::{PciRoot, CONFIG_ADDRESS_PORT};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;

struct Drop;

impl MsiTarget for Drop {
    fn send(&self, _: MsiMessage) {}
}

const ID: PciId = PciId {
    vendor: 0x1af4,
    device: 0x1041,
    revision: 1,
    class: (2, 0, 0),
    subsystem_vendor: 0x1af4,
    subsystem: 1,
};

fn function() -> (PciConfig, Msix, usize) {
    let mut c = PciConfig::new(ID);
    c.add_bar(0, Bar { kind: BarKind::Io, size: 0x20 }).unwrap();
    let bar = Bar { kind: BarKind::Memory64 { prefetchable: false }, size: 0x4000 };
    c.add_bar(1, bar).unwrap();
    let msix = Msix::new(3, Arc::new(Drop)).unwrap();
    let (body, writable) = msix.capability(1, 0, 1, 0x2000);
    let cap = c.add_capability(CAP_ID, &body, &writable).unwrap();
    (c, msix, cap)
}

fuzz_target!(|data: &[u8]| {
    let mut root = PciRoot::new();
    let (mut config, mut msix, cap) = function();
    for op in data.chunks_exact(12) {
        let width = [1usize, 2, 4, 8][usize::from(op[1] % 4)];
        let value = &op[4..4 + width];
        let offset = u64::from(u16::from_le_bytes([op[2], op[3]]));
        let mut buf = [0u8; 8];
        match op[0] % 8 {
            0 => root.write(CONFIG_ADDRESS_PORT, offset % 8, value),
            1 => root.read(CONFIG_ADDRESS_PORT, offset % 8, &mut buf[..width]),
            2 => {
                config.write(usize::from(op[2]), value);
                let mut control = [0u8; 2];
                config.read(cap + 2, &mut control);
                msix.set_control(u16::from_le_bytes(control));
            }
            3 => config.read(usize::from(op[2]), &mut buf[..width]),
            4 => msix.table_write(offset, value),
            5 => msix.table_read(offset, &mut buf[..width]),
            6 => msix.pba_read(offset, &mut buf[..width]),
            _ => msix.notify(u16::from_le_bytes([op[2], op[3]])),
        }
    }
    let mut id = [0u8; 4];
    config.read(0, &mut id);
    assert_eq!(id, [0xf4, 0x1a, 0x41, 0x10]);
    let mut bar0 = [0u8; 4];
    config.read(BAR0, &mut bar0);
    assert_eq!(bar0[0] & 1, 1, "BAR 0 is still I/O");
    let (mut fresh, mut fresh_msix, _) = function();
    fresh.restore(&config.state()).unwrap();
    assert_eq!(fresh.state(), config.state());
    fresh_msix.restore(&msix.state()).unwrap();
    assert_eq!(fresh_msix.state(), msix.state());
});
