//! Feeds the NAT engine (libslirp) raw guest frames. The input is a list
//! of frames, each a kind byte and a 2-byte length: kind picks an Ethernet
//! header (to the gateway, broadcast, or none, i.e. the fuzzer's own) and
//! an EtherType, so the fuzzer reaches ARP, IPv4 (TCP, UDP with DHCP and
//! DNS, ICMP) and IPv6 parsing without having to find them. The engine is
//! `restricted` (no outbound sockets: nothing leaves the machine) and
//! kept across runs, so connection state builds up as a guest's would;
//! it is remade every 1000 runs to bound what that state can hold.

#![no_main]

use std::cell::RefCell;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use net::nat::{Engine, NatConfig};

const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 10, 0, 2, 2];
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const ETHERTYPES: [[u8; 2]; 4] = [[0x08, 0x00], [0x08, 0x06], [0x86, 0xdd], [0x08, 0x00]];

thread_local! {
    static ENGINE: RefCell<(Option<Engine>, u32)> = const { RefCell::new((None, 0)) };
}

fn engine() -> Engine {
    let config = NatConfig {
        hostfwd: Vec::new(),
        restricted: true,
    };
    Engine::new(&config, Arc::default()).expect("a NAT without port forwards starts")
}

fuzz_target!(|data: &[u8]| {
    ENGINE.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.0.is_none() || cell.1 >= 1000 {
            cell.0 = None; // the old one is cleaned up first
            cell.0 = Some(engine());
            cell.1 = 0;
        }
        cell.1 += 1;
        let engine = cell.0.as_mut().expect("made above");
        let mut rest = data;
        let mut frame = Vec::with_capacity(2048);
        while rest.len() >= 3 {
            let kind = rest[0];
            let len = usize::from(u16::from_le_bytes([rest[1], rest[2]]));
            rest = &rest[3..];
            let body = &rest[..len.min(rest.len())];
            rest = &rest[body.len()..];
            frame.clear();
            match kind % 3 {
                0 => frame.extend_from_slice(&GATEWAY_MAC),
                1 => frame.extend_from_slice(&[0xff; 6]),
                _ => {}
            }
            if kind % 3 != 2 {
                frame.extend_from_slice(&GUEST_MAC);
                frame.extend_from_slice(&ETHERTYPES[usize::from(kind >> 2) % 4]);
            }
            frame.extend_from_slice(body);
            engine.input(&frame);
            // Timers and the (restricted) sockets get their turn.
            engine.poll(0, &mut []);
            while engine.pop_output().is_some() {}
        }
    });
});
