//! Checksum offload for backends that take bare Ethernet frames (the NAT,
//! internal networks): the device does what a NIC's hardware would.
//!
//! Why: on a slow guest (nested KVM, where the guest's kernel code is
//! emulated) the per-byte work of its network stack sets the NIC's
//! throughput, and the checksum of every sent and received byte is half
//! of it. With `VIRTIO_NET_F_CSUM` the guest leaves a frame's TCP/UDP
//! checksum partial (`NEEDS_CSUM`: the pseudo-header's sum in the field)
//! and the device completes it here, on the host, before the backend sees
//! the frame; with `VIRTIO_NET_F_GUEST_CSUM` the device marks received
//! frames `DATA_VALID` when the backend vouches for their checksums (the
//! NAT: libslirp, host code, makes every frame itself) so the guest skips
//! verifying them. Segmentation (TSO) is not offered to these backends:
//! the NAT's MTU is already 64 KiB.
//!
//! The header is the guest's: every offset is checked against the frame,
//! and a header asking for what was not offered (segmentation) drops the
//! frame.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
};

use super::HDR_LEN;

/// The header's flags byte: the guest left the checksum partial.
const NEEDS_CSUM: u8 = flag(VIRTIO_NET_HDR_F_NEEDS_CSUM);
/// The header's flags byte: the frame's checksums are known good.
pub const DATA_VALID: u8 = flag(VIRTIO_NET_HDR_F_DATA_VALID);

/// A header flag as the byte it is (the bindings make them u32; both
/// are single low bits).
const fn flag(bit: u32) -> u8 {
    assert!(bit <= 0xff);
    bit.to_le_bytes()[0]
}

/// Why a transmitted packet's virtio-net header cannot be honoured.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxHeaderError {
    #[error("the header asks for segmentation (gso_type {0}), which was not offered")]
    Segmentation(u8),
    #[error("the checksum at {start}+{offset} is not inside the {len}-byte frame")]
    ChecksumOutside {
        start: usize,
        offset: usize,
        len: usize,
    },
    #[error("the packet is shorter than its virtio-net header")]
    Short,
}

/// Completes the checksum the guest left partial in `packet` (a virtio-net
/// header, then the frame): the Internet checksum of the frame from
/// `csum_start` to its end, stored at `csum_start + csum_offset`. A
/// packet without `NEEDS_CSUM` is left alone.
pub fn complete_tx_checksum(packet: &mut [u8]) -> Result<(), TxHeaderError> {
    if packet.len() < HDR_LEN {
        return Err(TxHeaderError::Short);
    }
    let (hdr, frame) = packet.split_at_mut(HDR_LEN);
    let gso = hdr[1];
    if u32::from(gso) != VIRTIO_NET_HDR_GSO_NONE {
        return Err(TxHeaderError::Segmentation(gso));
    }
    if hdr[0] & NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
    let offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
    // Both are u16: the sum cannot overflow.
    let field = start + offset;
    if field + 2 > frame.len() {
        return Err(TxHeaderError::ChecksumOutside {
            start,
            offset,
            len: frame.len(),
        });
    }
    let sum = !fold(ones_complement_sum(&frame[start..]));
    // A computed zero is sent as 0xffff (the same value in ones'
    // complement; zero means "no checksum" to UDP), as Linux does.
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    // The frame is complete now: no flag for the backend to act on.
    hdr[0] &= !NEEDS_CSUM;
    Ok(())
}

/// The ones'-complement sum of `data` as big-endian 16-bit words (an odd
/// last byte padded with zero), not yet folded.
fn ones_complement_sum(data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(2);
    let mut sum: u64 = words
        .by_ref()
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    if let [last] = words.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a sum into 16 bits, carries added back in.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 bits.
    u16::try_from(sum).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 UDP frame with a checksum Linux left partial (the
    /// pseudo-header's sum in the field), behind its virtio-net header.
    fn partial_udp(payload: &[u8]) -> Vec<u8> {
        let udp_len = 8 + payload.len();
        let mut f = vec![0u8; HDR_LEN + 14 + 20];
        f[0] = NEEDS_CSUM;
        f[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start: UDP header
        f[8..10].copy_from_slice(&6u16.to_le_bytes()); // csum_offset: UDP checksum
        let eth = HDR_LEN;
        f[eth + 12..eth + 14].copy_from_slice(&[0x08, 0x00]);
        let ip = eth + 14;
        f[ip] = 0x45;
        f[ip + 2..ip + 4].copy_from_slice(&u16::try_from(20 + udp_len).unwrap().to_be_bytes());
        f[ip + 8] = 64;
        f[ip + 9] = 17;
        f[ip + 12..ip + 16].copy_from_slice(&[10, 0, 2, 15]);
        f[ip + 16..ip + 20].copy_from_slice(&[10, 0, 2, 2]);
        let mut udp = vec![0u8; 8];
        udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        udp[2..4].copy_from_slice(&5001u16.to_be_bytes());
        udp[4..6].copy_from_slice(&u16::try_from(udp_len).unwrap().to_be_bytes());
        // The pseudo-header: addresses, protocol, length (not complemented).
        let pseudo =
            fold(ones_complement_sum(&f[ip + 12..ip + 20]) + 17 + u64::try_from(udp_len).unwrap());
        udp[6..8].copy_from_slice(&pseudo.to_be_bytes());
        f.extend_from_slice(&udp);
        f.extend_from_slice(payload);
        f
    }

    /// Whether a frame's UDP checksum verifies (the sum over the
    /// pseudo-header and the datagram is all ones).
    fn udp_verifies(frame: &[u8]) -> bool {
        let ip = 14;
        let udp = &frame[ip + 20..];
        let sum = ones_complement_sum(&frame[ip + 12..ip + 20])
            + 17
            + u64::try_from(udp.len()).unwrap()
            + ones_complement_sum(udp);
        fold(sum) == 0xffff
    }

    #[test]
    fn a_partial_checksum_is_completed_as_a_receiver_verifies_it() {
        for payload in [&b"hello, host"[..], b"odd", b"", &[0xff; 1001]] {
            let mut p = partial_udp(payload);
            assert!(!udp_verifies(&p[HDR_LEN..]));
            complete_tx_checksum(&mut p).unwrap();
            assert!(udp_verifies(&p[HDR_LEN..]), "{payload:?}");
            assert_eq!(p[0] & NEEDS_CSUM, 0);
        }
    }

    #[test]
    fn a_known_checksum() {
        // RFC 1071's example words 0001 f203 f4f5 f6f7: sum ddf2, checksum 220d.
        let mut p = vec![0u8; HDR_LEN];
        p[0] = NEEDS_CSUM;
        p.extend_from_slice(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7, 0, 0]);
        p[8..10].copy_from_slice(&8u16.to_le_bytes());
        complete_tx_checksum(&mut p).unwrap();
        assert_eq!(&p[HDR_LEN + 8..], &[0x22, 0x0d]);
        // A zero result goes out as 0xffff.
        let mut z = vec![0u8; HDR_LEN + 4];
        z[0] = NEEDS_CSUM;
        z[8..10].copy_from_slice(&2u16.to_le_bytes());
        z[HDR_LEN..HDR_LEN + 2].copy_from_slice(&[0xff, 0xff]);
        complete_tx_checksum(&mut z).unwrap();
        assert_eq!(&z[HDR_LEN + 2..], &[0xff, 0xff]);
    }

    #[test]
    fn a_frame_without_the_flag_is_untouched() {
        let mut p = partial_udp(b"data");
        p[0] = 0;
        let before = p.clone();
        complete_tx_checksum(&mut p).unwrap();
        assert_eq!(p, before);
    }

    #[test]
    fn hostile_headers_are_refused_without_touching_memory_outside() {
        let base = partial_udp(b"data");
        let len = base.len() - HDR_LEN;
        // Offsets past the end, at the very end, and at the u16 limits.
        for (start, offset) in [
            (len - 1, 0),
            (len - 2, 1),
            (len, 0),
            (0, len - 1),
            (usize::from(u16::MAX), usize::from(u16::MAX)),
            (usize::from(u16::MAX), 0),
        ] {
            let mut p = base.clone();
            p[6..8].copy_from_slice(&u16::try_from(start).unwrap().to_le_bytes());
            p[8..10].copy_from_slice(&u16::try_from(offset).unwrap().to_le_bytes());
            assert!(
                matches!(
                    complete_tx_checksum(&mut p),
                    Err(TxHeaderError::ChecksumOutside { .. })
                ),
                "{start}+{offset}"
            );
            assert_eq!(p, {
                let mut b = base.clone();
                b[6..10].copy_from_slice(&p[6..10]);
                b
            });
        }
        // The last two bytes are a valid place.
        let mut p = base.clone();
        p[6..8].copy_from_slice(&0u16.to_le_bytes());
        p[8..10].copy_from_slice(&u16::try_from(len - 2).unwrap().to_le_bytes());
        complete_tx_checksum(&mut p).unwrap();
        // Segmentation was not offered.
        let mut p = base.clone();
        p[1] = 1;
        assert_eq!(
            complete_tx_checksum(&mut p),
            Err(TxHeaderError::Segmentation(1))
        );
        assert_eq!(
            complete_tx_checksum(&mut [0u8; 4]),
            Err(TxHeaderError::Short)
        );
    }
}
