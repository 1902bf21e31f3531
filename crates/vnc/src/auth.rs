//! VNC Authentication (RFC 6143 7.2.2): the server sends 16 random bytes,
//! the client DES-encrypts them with its password as the key and sends
//! them back. The key is the password's first 8 bytes, zero-padded, each
//! byte's bits reversed (as every VNC implementation does).
//!
//! It keeps casual connections out of a loopback-only server's screen
//! and is what every viewer speaks; it is not strong cryptography (DES,
//! 8 characters, no channel encryption): a display on an untrusted
//! network still belongs behind a tunnel.

use des::cipher::generic_array::GenericArray;
use des::cipher::{BlockEncrypt, KeyInit};

/// The longest password VNC Authentication can use.
pub const MAX_PASSWORD: usize = 8;

/// 16 random bytes from the host's getrandom(2).
pub fn challenge() -> std::io::Result<[u8; 16]> {
    let mut buf = [0u8; 16];
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += usize::try_from(n).unwrap_or(0);
    }
    Ok(buf)
}

/// What a client that knows `password` answers to `challenge`.
pub fn response(password: &[u8], challenge: &[u8; 16]) -> [u8; 16] {
    let mut key = [0u8; 8];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    let cipher = des::Des::new(GenericArray::from_slice(&key));
    let mut out = *challenge;
    for block in out.chunks_exact_mut(8) {
        cipher.encrypt_block(GenericArray::from_mut_slice(block));
    }
    out
}

/// Whether `answer` is the right response (compared in constant time).
pub fn check(password: &[u8], challenge: &[u8; 16], answer: &[u8; 16]) -> bool {
    let want = response(password, challenge);
    want.iter()
        .zip(answer)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn responses_match_a_known_vector() {
        // vncdotool's des_encrypt(_vnc_des(password), challenge), an
        // independent implementation, gives these bytes.
        let r = response(b"password", &[0; 16]);
        assert_eq!(hex(&r), "ff97502e9422f089ff97502e9422f089");
        let mut counting = [0u8; 16];
        for (i, b) in counting.iter_mut().enumerate() {
            *b = u8::try_from(i).unwrap();
        }
        let r = response(b"secret", &counting);
        assert_eq!(hex(&r), "ee22539f33a5983ec12f9c2edbc995dd");
        let c = challenge().unwrap();
        assert!(check(b"secret", &c, &response(b"secret", &c)));
        assert!(!check(b"secret", &c, &response(b"Secret", &c)));
        // Only 8 bytes count.
        assert!(check(b"12345678", &c, &response(b"12345678xyz", &c)));
    }
}
