//! The virtio-vsock packet header (virtio 1.2, 5.10.6): 44 little-endian
//! bytes before each packet's payload. virtio-bindings has no vsock
//! header, so it is laid out here from the specification.

/// Header length in bytes.
pub const HDR_LEN: usize = 44;

/// The only socket type this device carries.
pub const TYPE_STREAM: u16 = 1;

/// The host's context ID, as every vsock device uses.
pub const HOST_CID: u64 = 2;

/// Largest payload the device accepts in one packet (as Linux sends).
pub const MAX_PAYLOAD: u32 = 64 << 10;

/// Shutdown flags: the sender will receive / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    fn from_u16(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub op: Op,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a packet from the guest is dropped (and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("the header is {0} bytes, not {HDR_LEN}")]
    Short(usize),
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    #[error("socket type {0} is not stream")]
    UnknownType(u16),
    #[error("payload length {0} is above {MAX_PAYLOAD}")]
    TooLong(u32),
    #[error("payload length {declared} but {available} bytes were given")]
    LengthMismatch { declared: u32, available: usize },
    #[error("a {0:?} packet carries a payload")]
    UnexpectedPayload(Op),
    #[error("source CID {src} is not the guest's ({guest})")]
    WrongSource { src: u64, guest: u64 },
    #[error("destination CID {0} is not the host")]
    WrongDestination(u64),
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

impl Header {
    /// Parses and validates a header the guest sent, whose payload has
    /// `available` bytes in the descriptor chain.
    pub fn parse_from_guest(
        b: &[u8],
        available: usize,
        guest_cid: u64,
    ) -> Result<Header, PacketError> {
        if b.len() < HDR_LEN {
            return Err(PacketError::Short(b.len()));
        }
        let kind = le16(b, 28);
        let op = le16(b, 30);
        let op = Op::from_u16(op).ok_or(PacketError::UnknownOp(op))?;
        if kind != TYPE_STREAM {
            return Err(PacketError::UnknownType(kind));
        }
        let h = Header {
            src_cid: le64(b, 0),
            dst_cid: le64(b, 8),
            src_port: le32(b, 16),
            dst_port: le32(b, 20),
            len: le32(b, 24),
            op,
            flags: le32(b, 32),
            buf_alloc: le32(b, 36),
            fwd_cnt: le32(b, 40),
        };
        if h.len > MAX_PAYLOAD {
            return Err(PacketError::TooLong(h.len));
        }
        if h.len as usize > available {
            return Err(PacketError::LengthMismatch {
                declared: h.len,
                available,
            });
        }
        if h.len != 0 && op != Op::Rw {
            return Err(PacketError::UnexpectedPayload(op));
        }
        if h.src_cid != guest_cid {
            return Err(PacketError::WrongSource {
                src: h.src_cid,
                guest: guest_cid,
            });
        }
        if h.dst_cid != HOST_CID {
            return Err(PacketError::WrongDestination(h.dst_cid));
        }
        Ok(h)
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&TYPE_STREAM.to_le_bytes());
        b[30..32].copy_from_slice(&(self.op as u16).to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(guest: u64) -> Header {
        Header {
            src_cid: guest,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 52,
            len: 0,
            op: Op::Request,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn headers_round_trip() {
        let h = request(3);
        assert_eq!(Header::parse_from_guest(&h.to_bytes(), 0, 3), Ok(h));
        let rw = Header {
            op: Op::Rw,
            len: 100,
            ..h
        };
        assert_eq!(Header::parse_from_guest(&rw.to_bytes(), 100, 3), Ok(rw));
    }

    #[test]
    fn hostile_headers_are_refused() {
        let good = request(3);
        let mut b = good.to_bytes();
        assert_eq!(
            Header::parse_from_guest(&b[..40], 0, 3),
            Err(PacketError::Short(40))
        );
        b[30] = 9;
        assert_eq!(
            Header::parse_from_guest(&b, 0, 3),
            Err(PacketError::UnknownOp(9))
        );
        let mut b = good.to_bytes();
        b[28] = 2;
        assert_eq!(
            Header::parse_from_guest(&b, 0, 3),
            Err(PacketError::UnknownType(2))
        );
        let long = Header {
            op: Op::Rw,
            len: MAX_PAYLOAD + 1,
            ..good
        };
        assert!(matches!(
            Header::parse_from_guest(&long.to_bytes(), usize::MAX, 3),
            Err(PacketError::TooLong(_))
        ));
        let lying = Header {
            op: Op::Rw,
            len: 100,
            ..good
        };
        assert!(matches!(
            Header::parse_from_guest(&lying.to_bytes(), 99, 3),
            Err(PacketError::LengthMismatch { .. })
        ));
        let payload = Header { len: 4, ..good };
        assert_eq!(
            Header::parse_from_guest(&payload.to_bytes(), 4, 3),
            Err(PacketError::UnexpectedPayload(Op::Request))
        );
        assert!(matches!(
            Header::parse_from_guest(&good.to_bytes(), 0, 4),
            Err(PacketError::WrongSource { .. })
        ));
        let elsewhere = Header { dst_cid: 7, ..good };
        assert_eq!(
            Header::parse_from_guest(&elsewhere.to_bytes(), 0, 3),
            Err(PacketError::WrongDestination(7))
        );
    }
}
