//! Drives the fw_cfg device as a hostile guest would: port reads and
//! writes of any width at any offset, and DMA descriptors (from the
//! fuzzer) in guest RAM. Nothing may panic, and the device must keep
//! answering its signature afterwards; a saved state restores and saves
//! the same.

#![no_main]

use devices::fw_cfg::{key, FwCfg, FW_CFG_PORT, FW_CFG_PORT_LEN};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use snapshot::Persist;
use vm_memory::{Bytes, GuestAddress};

const RAM: usize = 1 << 16;

fn device(mem: &memory::GuestMemoryMmap) -> FwCfg {
    // The device shares the guest RAM the fuzzer writes descriptors into.
    let mut d = FwCfg::new(mem.clone());
    d.set_item(key::RAM_SIZE, (RAM as u64).to_le_bytes().to_vec())
        .unwrap();
    d.add_file("etc/a", vec![0x5a; 100], false).unwrap();
    d.add_file("etc/w", vec![0; 8], true).unwrap();
    d
}

fuzz_target!(|data: &[u8]| {
    let mem = memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    let mut d = device(&mem);
    let mut rest = data;
    while rest.len() >= 11 {
        let (op, tail) = rest.split_at(11);
        rest = tail;
        let offset = u64::from(op[0]) % FW_CFG_PORT_LEN;
        let width = [1usize, 2, 4, 8][usize::from(op[1] % 4)];
        match op[2] % 3 {
            0 => d.write(FW_CFG_PORT, offset, &op[3..3 + width]),
            1 => {
                let mut buf = [0u8; 8];
                d.read(FW_CFG_PORT, offset, &mut buf[..width]);
            }
            _ => {
                // A descriptor (16 bytes from the input) at a guest address
                // from the input, then the DMA register pointed at it.
                let at = u64::from(u16::from_le_bytes([op[3], op[4]]));
                let n = rest.len().min(16);
                let _ = mem.write_slice(&rest[..n], GuestAddress(at));
                rest = &rest[n..];
                d.write(FW_CFG_PORT, 4, &0u32.to_be_bytes());
                d.write(FW_CFG_PORT, 8, &(at as u32).to_be_bytes());
            }
        }
    }
    let saved = d.save();
    let restored = FwCfg::restore(device(&mem), &saved).expect("own state restores");
    assert_eq!(restored.save(), saved);
    d.write(FW_CFG_PORT, 0, &key::SIGNATURE.to_le_bytes());
    let mut sig = [0u8; 4];
    d.read(FW_CFG_PORT, 1, &mut sig);
    assert_eq!(&sig, b"QEMU");
});
