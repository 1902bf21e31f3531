//! Feeds the vsock packet parser and connection state machine a stream of
//! guest packets (headers and payloads from the fuzzer) interleaved with
//! host-side events. Nothing may panic, and the flow-control invariants
//! must hold: the host never buffers more than it advertised, and never
//! sends the guest more than the guest's credit.

#![no_main]

use std::collections::HashMap;

use devices::virtio::vsock::connection::{Connection, Reply, State, BUF_ALLOC};
use devices::virtio::vsock::packet::{Header, Op, HDR_LEN};
use libfuzzer_sys::fuzz_target;

const GUEST: u64 = 3;

fuzz_target!(|data: &[u8]| {
    let mut conns: HashMap<(u32, u32), Connection> = HashMap::new();
    // One host-initiated connection to exercise that path too.
    let mut c = Connection::host_initiated(GUEST, 1_000_000, 52);
    let _ = c.next_control();
    conns.insert((1_000_000, 52), c);
    let mut rest = data;
    while rest.len() > 2 {
        let (kind, tail) = (rest[0], &rest[1..]);
        match kind % 4 {
            // A guest packet: a header and up to 255 payload bytes.
            0 | 1 => {
                if tail.len() < HDR_LEN + 1 {
                    break;
                }
                let avail = usize::from(tail[HDR_LEN]).min(tail.len() - HDR_LEN - 1);
                let (hdr, after) = tail.split_at(HDR_LEN);
                let payload = &after[1..1 + avail];
                rest = &after[1 + avail..];
                let Ok(h) = Header::parse_from_guest(hdr, payload.len(), GUEST) else {
                    continue;
                };
                let payload = &payload[..h.len as usize];
                let key = (h.dst_port, h.src_port);
                match conns.get_mut(&key) {
                    Some(c) => {
                        if let Reply::Data(bytes) = c.from_guest(&h, payload) {
                            assert!(bytes.len() <= payload.len());
                        }
                        assert!(c.rx_buffered() <= BUF_ALLOC);
                        if c.state() == State::Closed {
                            while c.next_control().is_some() {}
                            conns.remove(&key);
                        }
                    }
                    None if h.op == Op::Request => {
                        conns.insert(key, Connection::guest_initiated(GUEST, &h));
                    }
                    None => {
                        let rst = Connection::reset_for(GUEST, &h);
                        assert_eq!(rst.op, Op::Rst);
                    }
                }
            }
            // The host consumes some of what it received.
            2 => {
                let n = u32::from(tail[0]) * 64;
                rest = &tail[1..];
                for c in conns.values_mut() {
                    let n = n.min(c.rx_buffered());
                    c.delivered(n);
                    while c.next_control().is_some() {}
                }
            }
            // The host sends data (within the credit) or closes.
            _ => {
                let n = u32::from(tail[0]) * 97;
                rest = &tail[1..];
                for c in conns.values_mut() {
                    if n == 0 {
                        c.host_closed();
                        continue;
                    }
                    let credit = c.send_credit();
                    match c.data_to_guest(n) {
                        Some(h) => assert!(h.len <= credit),
                        None => assert!(n > credit || n == 0),
                    }
                }
            }
        }
    }
});
