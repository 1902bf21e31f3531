//! The state file: a fixed header and a JSON payload.
//!
//! ```text
//! 0   magic            "HVSNAP\r\n"   (the CR-LF catches text-mode mangling)
//! 8   format version   u32 LE          (FORMAT_VERSION)
//! 12  reserved         u32 LE, 0
//! 16  payload length   u64 LE
//! 24  payload CRC-32   u32 LE          (IEEE, of the payload bytes)
//! 28  reserved         u32 LE, 0
//! 32  payload          JSON
//! ```
//!
//! JSON because it is self-describing: a state struct that gains a field
//! (with `#[serde(default)]`) still reads older files, and a person can
//! look inside one. The state is small (registers, device registers, queue
//! positions: tens of KiB); guest RAM is in the memory file.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::SnapshotError;

pub const MAGIC: [u8; 8] = *b"HVSNAP\r\n";
/// Bumped when a change cannot be read by older code (a renamed or
/// retyped field); added fields do not bump it.
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 32;
/// The largest payload read back: far above any real state (a 64-vCPU VM
/// with its XSAVE areas is a few MiB), so a corrupt length cannot make a
/// reader allocate without bound.
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// The bytes of a state file holding `state`.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    let payload = serde_json::to_vec(state).map_err(SnapshotError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Checks the header and checksum of a state file's bytes and returns the
/// payload.
pub fn payload(bytes: &[u8]) -> Result<&[u8], SnapshotError> {
    if bytes.len() < HEADER_LEN {
        if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64,
            got: bytes.len() as u64,
        });
    }
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::NotASnapshot);
    }
    let version = le_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let len = le_u64(bytes, 16);
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge(len));
    }
    let body = &bytes[HEADER_LEN..];
    let got = body.len() as u64;
    if got < len {
        return Err(SnapshotError::Truncated {
            expected: HEADER_LEN as u64 + len,
            got: bytes.len() as u64,
        });
    }
    if got > len {
        return Err(SnapshotError::TrailingBytes(got - len));
    }
    let crc = le_u32(bytes, 24);
    if crc32fast::hash(body) != crc {
        return Err(SnapshotError::Checksum);
    }
    Ok(body)
}

/// Decodes a state file's bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    serde_json::from_slice(payload(bytes)?).map_err(SnapshotError::Decode)
}

/// Writes `state` to `path` atomically: a temporary file beside it,
/// synced, renamed over `path`, and the directory synced — so a crash
/// leaves either the old file or the whole new one.
pub fn write_file<T: Serialize>(path: &Path, state: &T) -> Result<(), SnapshotError> {
    let bytes = encode(state)?;
    crate::write_atomically(path, |f| f.write_all(&bytes))
}

/// Reads and decodes the state file at `path`.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    // One byte past the largest valid file, so an oversized file is
    // recognised without reading it all.
    file.take(HEADER_LEN as u64 + MAX_PAYLOAD + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct S {
        a: u64,
        b: Vec<u8>,
        #[serde(default)]
        added_later: u32,
    }

    fn sample() -> S {
        S {
            a: 7,
            b: vec![1, 2, 3],
            added_later: 9,
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..8], b"HVSNAP\r\n");
        assert_eq!(decode::<S>(&bytes).unwrap(), sample());
        // Encoding is deterministic: the same state, the same bytes.
        assert_eq!(encode(&sample()).unwrap(), bytes);
    }

    #[test]
    fn a_field_added_later_reads_older_files() {
        #[derive(serde::Serialize)]
        struct Old {
            a: u64,
            b: Vec<u8>,
        }
        let bytes = encode(&Old { a: 1, b: vec![] }).unwrap();
        let s: S = decode(&bytes).unwrap();
        assert_eq!((s.a, s.added_later), (1, 0));
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode(&sample()).unwrap();
        for n in 0..bytes.len() {
            let e = decode::<S>(&bytes[..n]).unwrap_err();
            assert!(
                matches!(e, SnapshotError::Truncated { .. }),
                "{n} bytes: {e}"
            );
            assert!(e.to_string().contains("truncated"), "{e}");
        }
    }

    #[test]
    fn every_bit_flip_is_refused() {
        let bytes = encode(&sample()).unwrap();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            // Reserved header words are not checked; every other bit is.
            if (12..16).contains(&(i / 8)) || (28..32).contains(&(i / 8)) {
                continue;
            }
            assert!(decode::<S>(&b).is_err(), "bit {i} flipped was accepted");
        }
    }

    #[test]
    fn wrong_version_and_magic_say_so() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[8] = 2;
        let e = decode::<S>(&bytes).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the snapshot's format version is 2; this hostvisor reads version 1"
        );
        let e = decode::<S>(b"not a snapshot at all, just some text").unwrap_err();
        assert!(matches!(e, SnapshotError::NotASnapshot), "{e}");
    }

    #[test]
    fn an_oversized_length_is_refused_before_reading() {
        let mut bytes = encode(&sample()).unwrap();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<S>(&bytes).unwrap_err(),
            SnapshotError::TooLarge(_)
        ));
    }

    #[test]
    fn a_well_formed_file_of_the_wrong_shape_is_a_decode_error() {
        let bytes = encode(&vec!["x"]).unwrap();
        let e = decode::<S>(&bytes).unwrap_err();
        assert!(matches!(e, SnapshotError::Decode(_)), "{e}");
    }

    #[test]
    fn files_are_written_atomically_and_read_back() {
        let dir = std::env::temp_dir().join(format!("hv-snapfmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        write_file(&path, &sample()).unwrap();
        assert_eq!(read_file::<S>(&path).unwrap(), sample());
        assert!(
            std::fs::read_dir(&dir).unwrap().count() == 1,
            "no temp left"
        );
        let e = read_file::<S>(&dir.join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
