//! The qcow2 header (versions 2 and 3) and its extensions, as the qcow2
//! specification in QEMU's `docs/interop/qcow2.txt` lays them out.

use super::Qcow2Error;

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
pub const V2_HEADER_LEN: u32 = 72;
/// The v3 header QEMU writes: 104 bytes plus the compression type, padded
/// to a multiple of 8.
pub const V3_HEADER_LEN: u32 = 112;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible features this implementation handles.
const INCOMPAT_SUPPORTED: u64 = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

/// Byte offsets of fields that are rewritten in place.
pub const OFF_SIZE: u64 = 24;
pub const OFF_L1: u64 = 36; // l1_size (u32) then l1_table_offset (u64)
pub const OFF_REFTABLE: u64 = 48; // offset (u64) then clusters (u32)
pub const OFF_INCOMPAT: u64 = 72;
pub const OFF_AUTOCLEAR: u64 = 88;

/// Limits that keep a hostile header from making us allocate without
/// bound (the same values QEMU uses).
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const MAX_BACKING_NAME: u32 = 1023;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Feature names the image declares: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// Extensions we do not interpret, kept when the header is rewritten.
    pub other_extensions: Vec<(u32, Vec<u8>)>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn corrupt(msg: impl Into<String>) -> Qcow2Error {
    Qcow2Error::Invalid(msg.into())
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The cluster size as a buffer length (at most 2 MiB).
    pub fn cluster_bytes(&self) -> usize {
        1 << self.cluster_bits
    }

    /// Parses the header from the start of the file (`buf` holds at least
    /// the first cluster, or the whole file if shorter).
    pub fn parse(buf: &[u8]) -> Result<Header, Qcow2Error> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(corrupt("the file is too short for a qcow2 header"));
        }
        if be32(buf, 0) != MAGIC {
            return Err(corrupt("not a qcow2 image (bad magic)"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Unsupported(format!(
                "qcow2 version {version} (2 and 3 are supported)"
            )));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} is outside 9..=21"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        if be32(buf, 32) != 0 {
            return Err(Qcow2Error::Unsupported("encrypted images".into()));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            other_extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(corrupt("the file is too short for a qcow2 v3 header"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 || u64::from(h.header_length) > cluster_size {
                return Err(corrupt(format!(
                    "header_length {} is invalid",
                    h.header_length
                )));
            }
            if h.header_length > 104 {
                if buf.len() < 105 {
                    return Err(corrupt("the header is truncated"));
                }
                h.compression_type = buf[104];
            }
            if h.refcount_order > 6 {
                return Err(corrupt(format!(
                    "refcount_order {} is above 6",
                    h.refcount_order
                )));
            }
        }
        // Extensions follow the header, inside the first cluster.
        let limit = (1usize << cluster_bits).min(buf.len());
        let mut at = h.header_length as usize;
        while at + 8 <= limit {
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            if kind == EXT_END {
                break;
            }
            if len > limit - at {
                return Err(corrupt("a header extension runs past the first cluster"));
            }
            let data = &buf[at..at + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    h.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let name = &entry[2..];
                        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                        h.feature_names.push((
                            entry[0],
                            entry[1],
                            String::from_utf8_lossy(&name[..end]).into_owned(),
                        ));
                    }
                }
                _ => h.other_extensions.push((kind, data.to_vec())),
            }
            at += len.div_ceil(8) * 8;
        }
        let backing_offset = be64(buf, 8);
        let backing_len = be32(buf, 16);
        if backing_offset != 0 && backing_len != 0 {
            if backing_len > MAX_BACKING_NAME {
                return Err(corrupt("the backing file name is too long"));
            }
            let end = backing_offset
                .checked_add(u64::from(backing_len))
                .filter(|&end| end <= limit as u64)
                .ok_or_else(|| corrupt("the backing file name lies outside the first cluster"))?;
            // Both at most `limit`, a buffer length.
            let (Ok(start), Ok(end)) = (usize::try_from(backing_offset), usize::try_from(end))
            else {
                return Err(corrupt(
                    "the backing file name lies outside the first cluster",
                ));
            };
            let name = &buf[start..end];
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        h.validate()?;
        Ok(h)
    }

    fn feature_name(&self, kind: u8, bit: u8) -> String {
        self.feature_names
            .iter()
            .find(|(k, b, _)| *k == kind && *b == bit)
            .map(|(_, _, name)| name.clone())
            .unwrap_or_else(|| format!("unknown incompatible feature bit {bit}"))
    }

    fn validate(&self) -> Result<(), Qcow2Error> {
        let unknown = self.incompatible & !INCOMPAT_SUPPORTED;
        if unknown != 0 {
            let names: Vec<String> = (0..64u8)
                .filter(|bit| unknown & (1 << bit) != 0)
                .map(|bit| self.feature_name(0, bit))
                .collect();
            return Err(Qcow2Error::Unsupported(format!(
                "the image needs features hostvisor does not have: {}",
                names.join(", ")
            )));
        }
        let zstd = self.incompatible & INCOMPAT_COMPRESSION != 0;
        match (zstd, self.compression_type) {
            (false, 0) | (true, 1) => {}
            (_, t) => {
                return Err(Qcow2Error::Unsupported(format!("compression type {t}")));
            }
        }
        let cs = self.cluster_size();
        for (name, off) in [
            ("L1 table", self.l1_table_offset),
            ("refcount table", self.refcount_table_offset),
            ("snapshot table", self.snapshots_offset),
        ] {
            if off % cs != 0 {
                return Err(corrupt(format!(
                    "the {name} offset {off:#x} is not cluster-aligned"
                )));
            }
        }
        if self.refcount_table_offset == 0 || self.refcount_table_clusters == 0 {
            return Err(corrupt("the image has no refcount table"));
        }
        if u64::from(self.refcount_table_clusters) * cs > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "the refcount table ({} clusters) is larger than {} MiB",
                self.refcount_table_clusters,
                MAX_REFTABLE_BYTES >> 20
            )));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "the L1 table ({} entries) is larger than {} MiB",
                self.l1_size,
                MAX_L1_BYTES >> 20
            )));
        }
        if self.l1_size < l1_entries_for(self.size, self.cluster_bits)? {
            return Err(corrupt(format!(
                "the L1 table ({} entries) is too small for {} bytes",
                self.l1_size, self.size
            )));
        }
        if self.l1_size > 0 && self.l1_table_offset == 0 {
            return Err(corrupt("the L1 table offset is zero"));
        }
        Ok(())
    }

    /// The header, its extensions and the backing file name, as the first
    /// cluster holds them. Fails if they do not fit in one cluster.
    pub fn serialize(&self) -> Result<Vec<u8>, Qcow2Error> {
        let mut b = Vec::with_capacity(self.cluster_bytes());
        let header_len = if self.version == 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        };
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // backing offset, set below
        b.extend_from_slice(&0u32.to_be_bytes()); // backing length
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&header_len.to_be_bytes());
            b.push(self.compression_type);
            b.resize(header_len as usize, 0);
        }
        let push_ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            let len = u32::try_from(data.len()).map_err(|_| {
                Qcow2Error::Invalid(format!("header extension {kind:#x} is too large"))
            })?;
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
            Ok::<(), Qcow2Error>(())
        };
        if let Some(format) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, format.as_bytes())?;
        }
        if self.version == 3 {
            let mut table = Vec::new();
            for (kind, bit, name) in FEATURE_NAMES {
                let mut entry = [0u8; 48];
                entry[0] = *kind;
                entry[1] = *bit;
                entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
                table.extend_from_slice(&entry);
            }
            push_ext(&mut b, EXT_FEATURE_TABLE, &table)?;
        }
        for (kind, data) in &self.other_extensions {
            push_ext(&mut b, *kind, data)?;
        }
        push_ext(&mut b, EXT_END, &[])?;
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(Qcow2Error::Invalid(
                    "the backing file name is too long".into(),
                ));
            }
            let at = b.len() as u64;
            b.extend_from_slice(name.as_bytes());
            b[8..16].copy_from_slice(&at.to_be_bytes());
            let len = u32::try_from(name.len())
                .map_err(|_| Qcow2Error::Invalid("the backing file name is too long".into()))?;
            b[16..20].copy_from_slice(&len.to_be_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(Qcow2Error::Invalid(
                "the header and backing file name do not fit in the first cluster".into(),
            ));
        }
        Ok(b)
    }
}

/// Feature names hostvisor declares in the images it writes (v3).
const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// L1 entries needed to map `size` bytes.
pub fn l1_entries_for(size: u64, cluster_bits: u32) -> Result<u32, Qcow2Error> {
    let l2_bits = cluster_bits - 3;
    let per_l1 = 1u64 << (cluster_bits + l2_bits);
    let n = size.div_ceil(per_l1);
    u32::try_from(n)
        .ok()
        .filter(|&n| u64::from(n) * 8 <= MAX_L1_BYTES)
        .ok_or_else(|| Qcow2Error::Invalid(format!("a virtual size of {size} bytes is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN,
            compression_type: 0,
            backing_file: Some("base.qcow2".into()),
            backing_format: Some("qcow2".into()),
            feature_names: Vec::new(),
            other_extensions: vec![(0x1234_5678, vec![1, 2, 3])],
        }
    }

    #[test]
    fn a_header_round_trips() {
        let h = sample();
        let bytes = h.serialize().unwrap();
        let mut parsed = Header::parse(&bytes).unwrap();
        assert_eq!(parsed.feature_names.len(), FEATURE_NAMES.len());
        parsed.feature_names.clear();
        assert_eq!(parsed, h);
        let v2 = Header {
            version: 2,
            header_length: V2_HEADER_LEN,
            backing_format: None,
            other_extensions: Vec::new(),
            ..sample()
        };
        assert_eq!(Header::parse(&v2.serialize().unwrap()).unwrap(), v2);
    }

    #[test]
    fn hostile_headers_are_refused_with_a_reason() {
        let good = sample().serialize().unwrap();
        type Mangle = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Mangle, &str)> = vec![
            (Box::new(|b| b.truncate(50)), "too short"),
            (Box::new(|b| b[0] = 0), "bad magic"),
            (Box::new(|b| b[7] = 4), "version 4"),
            (Box::new(|b| b[23] = 30), "cluster_bits"),
            (Box::new(|b| b[35] = 1), "encrypted"),
            (
                Box::new(|b| b[36..40].copy_from_slice(&[0xff; 4])),
                "L1 table",
            ),
            (
                Box::new(|b| b[36..40].copy_from_slice(&[0, 0, 0, 0])),
                "too small",
            ),
            (Box::new(|b| b[47] = 1), "not cluster-aligned"),
            (
                Box::new(|b| b[56..60].copy_from_slice(&[0, 0, 1, 0])),
                "refcount table",
            ),
            (Box::new(|b| b[79] = 1 << 4), "extended L2 entries"),
            (
                Box::new(|b| b[72] = 0x80),
                "unknown incompatible feature bit 63",
            ),
            (Box::new(|b| b[104] = 1), "compression type 1"),
            (Box::new(|b| b[99] = 7), "refcount_order"),
            (
                Box::new(|b| b[16..20].copy_from_slice(&[0, 1, 0, 0])),
                "too long",
            ),
            (
                Box::new(|b| b[116..120].copy_from_slice(&[0, 1, 0, 0])),
                "past the first cluster",
            ),
        ];
        for (mangle, want) in cases {
            let mut b = good.clone();
            b.resize(1 << 16, 0);
            mangle(&mut b);
            let err = Header::parse(&b).unwrap_err().to_string();
            assert!(err.contains(want), "wanted `{want}` in `{err}`");
        }
    }
}
