//! Feeds the guest agent's frame reader and message decoders arbitrary
//! bytes, as a hostile host (or a damaged stream) would send them to the
//! agent, and a hostile guest to the host's client. Nothing may panic or
//! allocate beyond the frame limit; whatever decodes must encode and
//! decode back to the same bytes.

#![no_main]

use agent::{decode, encode, recv, FromAgent, ToAgent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The bytes as one frame body of each direction.
    if let Ok(msg) = decode::<ToAgent>(data) {
        let again = encode(&msg).expect("a decoded message encodes");
        let back = decode::<ToAgent>(&again[4..]).expect("round trip");
        // Compared as bytes: a NaN uptime is not equal to itself.
        assert_eq!(encode(&back).expect("encodes"), again);
    }
    if let Ok(msg) = decode::<FromAgent>(data) {
        let again = encode(&msg).expect("a decoded message encodes");
        let back = decode::<FromAgent>(&again[4..]).expect("round trip");
        // Compared as bytes: a NaN uptime is not equal to itself.
        assert_eq!(encode(&back).expect("encodes"), again);
    }
    // The bytes as a stream of frames, read until the first error.
    let mut stream = data;
    for _ in 0..64 {
        if recv::<ToAgent>(&mut stream).is_err() {
            break;
        }
    }
    let mut stream = data;
    for _ in 0..64 {
        if recv::<FromAgent>(&mut stream).is_err() {
            break;
        }
    }
});
