//! Feeds the RFB client-message decoder a stream of bytes as a viewer's
//! socket would deliver them. Nothing may panic; each decoded message
//! takes between 1 byte and what was there; a message's shorter prefixes
//! are incomplete (never another message or an error); pixel formats the
//! decoder accepts can be encoded in (Raw and ZRLE) and keysyms looked up.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vnc::encoding::{encode_raw, ZrleEncoder};
use vnc::protocol::{decode_client_message, ClientMessage};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut zrle = ZrleEncoder::default();
    while let Ok(Some((msg, n))) = decode_client_message(rest) {
        assert!(n > 0 && n <= rest.len(), "took {n} of {}", rest.len());
        for cut in [1, n / 2, n - 1] {
            if cut > 0 && cut < n {
                assert_eq!(decode_client_message(&rest[..cut]), Ok(None));
            }
        }
        match msg {
            ClientMessage::SetPixelFormat(pf) => {
                let pixels: Vec<u32> = (0..70 * 3).map(|i| i * 0x0101_0305).collect();
                assert_eq!(
                    encode_raw(&pixels, &pf).len(),
                    pixels.len() * pf.bytes_per_pixel()
                );
                let _ = zrle.encode(&pixels, 70, 3, &pf);
            }
            ClientMessage::KeyEvent { keysym, .. } => {
                let _ = vnc::keysym::to_key(keysym);
            }
            _ => {}
        }
        rest = &rest[n..];
    }
});
