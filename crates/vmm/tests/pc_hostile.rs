//! A hostile guest on the `pc` machine: a tiny 64-bit guest plays a
//! random script of writes and reads at PCI configuration space (ports
//! 0xCF8/0xCFC and ECAM), the virtio-pci BARs (common configuration,
//! notifications, device configuration, MSI-X table and pending bits),
//! the fw_cfg ports (DMA included, with random descriptor addresses) and
//! the ACPI PM registers. hostvisor must neither panic nor hang: the run
//! ends with an outcome (the script's end, or whatever the guest did to
//! itself — a reset, a triple fault), and a kill is answered.
//!
//! The script is random but reproducible: its seed is printed, and
//! `HOSTVISOR_HOSTILE_SEED` replays one.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::kvm;
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::control::{ControlRequest, VmControl};
use vmm::{Machine, MachineSpec, RunOptions, VmOutcome};

const CODE: u64 = 0x10_0000;
const SCRIPT: u64 = 0x20_0000;
const ENTRY: usize = 16;
/// Script steps: enough to hit every register many times.
const STEPS: usize = 20_000;

/// What a step does.
#[derive(Clone, Copy)]
enum Op {
    Out32 = 0,
    Out8 = 1,
    In32 = 2,
    MmioWrite = 3,
    MmioRead = 4,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One step: (op, address or port, value).
fn step(r: &mut Rng) -> (Op, u64, u32) {
    let value = r.next() as u32;
    match r.below(8) {
        // PCI configuration address: usually enabled and on bus 0.
        0 => {
            let addr = 0x8000_0000 | (r.below(0x4000) as u32 & 0xfffc);
            (Op::Out32, 0xcf8, if r.below(4) == 0 { value } else { addr })
        }
        1 => {
            let op = if r.below(2) == 0 { Op::Out32 } else { Op::In32 };
            (op, 0xcfc + r.below(4), value)
        }
        // fw_cfg: selector, data, DMA address halves.
        2 => {
            let port = 0x510 + r.below(0xc);
            let op = [Op::Out32, Op::Out8, Op::In32][r.below(3) as usize];
            let value = if port >= 0x514 {
                value & 0x00ff_ffff
            } else {
                value
            };
            (op, port, value)
        }
        // ACPI PM block, but neither PM1 control (S5 would end the run
        // early) nor the reset register.
        3 => {
            let port = 0x600 + r.below(0x10);
            if (0x601..=0x605).contains(&port) {
                // A dword here would reach PM1 control.
                (Op::In32, port, 0)
            } else {
                (Op::Out32, port, value)
            }
        }
        // ECAM, bus 0.
        4 => {
            let op = if r.below(2) == 0 {
                Op::MmioWrite
            } else {
                Op::MmioRead
            };
            (op, 0xd800_0000 + (r.below(1 << 20) & !3), value)
        }
        // The BARs, where hostvisor placed them (4 functions x 32 KiB).
        _ => {
            let op = if r.below(3) == 0 {
                Op::MmioRead
            } else {
                Op::MmioWrite
            };
            // Queue addresses: often inside guest RAM, so activation is tried.
            let value = if r.below(2) == 0 {
                (r.below(8 << 20) as u32) & !0xfff
            } else {
                value
            };
            (op, 0xe000_0000 + (r.below(4 * 0x8000) & !3), value)
        }
    }
}

/// The guest: plays the script at SCRIPT, then writes 0 to the
/// debug-exit port.
fn guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut next = a.create_label();
    let mut out32 = a.create_label();
    let mut out8 = a.create_label();
    let mut in32 = a.create_label();
    let mut mw = a.create_label();
    let mut cont = a.create_label();
    a.cli().unwrap();
    a.mov(rsi, SCRIPT).unwrap();
    a.mov(rcx, STEPS as u64).unwrap();
    a.set_label(&mut next).unwrap();
    a.mov(rdx, qword_ptr(rsi)).unwrap();
    a.mov(eax, dword_ptr(rsi + 8)).unwrap();
    a.movzx(ebx, byte_ptr(rsi + 12)).unwrap();
    a.cmp(ebx, Op::Out32 as i32).unwrap();
    a.je(out32).unwrap();
    a.cmp(ebx, Op::Out8 as i32).unwrap();
    a.je(out8).unwrap();
    a.cmp(ebx, Op::In32 as i32).unwrap();
    a.je(in32).unwrap();
    a.cmp(ebx, Op::MmioWrite as i32).unwrap();
    a.je(mw).unwrap();
    a.mov(eax, dword_ptr(rdx)).unwrap();
    a.jmp(cont).unwrap();
    a.set_label(&mut out32).unwrap();
    a.out(dx, eax).unwrap();
    a.jmp(cont).unwrap();
    a.set_label(&mut out8).unwrap();
    a.out(dx, al).unwrap();
    a.jmp(cont).unwrap();
    a.set_label(&mut in32).unwrap();
    a.in_(eax, dx).unwrap();
    a.jmp(cont).unwrap();
    a.set_label(&mut mw).unwrap();
    a.mov(dword_ptr(rdx), eax).unwrap();
    a.set_label(&mut cont).unwrap();
    a.add(rsi, ENTRY as i32).unwrap();
    a.dec(rcx).unwrap();
    a.jnz(next).unwrap();
    a.mov(al, 0).unwrap();
    a.out(0xf4, al).unwrap();
    a.hlt().unwrap();
    a.assemble(CODE).unwrap()
}

#[test]
fn random_writes_to_pci_fw_cfg_and_acpi_registers_never_break_hostvisor() {
    let Some(hv) = kvm() else {
        return;
    };
    let seed = std::env::var("HOSTVISOR_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("hostile script seed {seed} (HOSTVISOR_HOSTILE_SEED replays it)");
    let spec = MachineSpec {
        cpus: 1,
        memory: 32 << 20,
        hidden_features: Vec::new(),
        serial_out: Box::new(std::io::sink()),
    };
    let mut machine = Machine::new(&hv, spec).unwrap();
    machine.make_pc(None).unwrap();
    let dir = std::env::temp_dir().join(format!("hv-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let image = block::open_image(&disk, block::OpenOptions::default()).unwrap();
    machine
        .add_virtio_device(Box::new(devices::virtio::block::Block::new(Arc::new(
            block::switchable::Switchable::new(image),
        ))))
        .unwrap();
    machine
        .add_virtio_device(Box::new(devices::virtio::rng::Rng::new()))
        .unwrap();
    let mut r = Rng(seed);
    let mut script = vec![0u8; STEPS * ENTRY];
    for entry in script.chunks_exact_mut(ENTRY) {
        let (op, addr, value) = step(&mut r);
        entry[..8].copy_from_slice(&addr.to_le_bytes());
        entry[8..12].copy_from_slice(&value.to_le_bytes());
        entry[12] = op as u8;
    }
    machine
        .memory()
        .write_slice(&script, GuestAddress(SCRIPT))
        .unwrap();
    machine.load_code(CODE, &guest(), 0).unwrap();

    let control = VmControl::new();
    let killer = control.clone();
    // A guest that sent itself an INIT, or halted with interrupts off, is
    // stuck by its own doing: the VM must still answer a kill.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(240));
        let _ = killer.request(ControlRequest::Kill);
    });
    let end = machine
        .run_with(RunOptions {
            started: Instant::now(),
            control: Some(&control),
            stdin: None,
        })
        .unwrap();
    eprintln!("outcome: {:?}", end.outcome);
    assert!(
        end.stuck.is_empty(),
        "threads did not stop: {:?}",
        end.stuck
    );
    match end.outcome {
        VmOutcome::DebugExit(0) | VmOutcome::Reset | VmOutcome::Killed | VmOutcome::PoweredOff => {}
        VmOutcome::Crashed(why) => assert!(
            why.contains("triple-faulted") || why.contains("could not emulate"),
            "hostvisor failed rather than the guest: {why}"
        ),
        other => panic!("unexpected end: {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
