//! Consistency check and repair, internal snapshot table, and building a
//! fresh refcount structure (for new images and for repairs).

use super::header::{self, Header};
use super::{
    classify, get_refcount, read_table, set_refcount, Inner, Mapping, Qcow2Error, OFFSET_MASK,
    OFLAG_COPIED,
};
use crate::file::{to_index, Storage};

/// Messages kept in a report; the counts stay exact beyond them.
const MAX_MESSAGES: usize = 50;
const MAX_SNAPSHOTS: u32 = 65536;

/// What `check` found (after a repair: what is left).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CheckReport {
    /// Clusters with a refcount but no reference: wasted space only.
    pub leaks: u64,
    /// Errors that can lose or expose data: references to clusters whose
    /// refcount is too low, entries outside the file, wrong flags.
    pub corruptions: u64,
    /// Leaks and corruptions a repair fixed.
    pub repaired: u64,
    pub messages: Vec<String>,
    /// Data clusters the active image maps, and how many it could map.
    pub allocated_clusters: u64,
    pub total_clusters: u64,
    pub image_end_offset: u64,
}

impl CheckReport {
    fn note(&mut self, msg: String) {
        if self.messages.len() < MAX_MESSAGES {
            self.messages.push(msg);
        }
    }

    fn corruption(&mut self, msg: String) {
        self.corruptions += 1;
        self.note(format!("ERROR {msg}"));
    }
}

/// An internal snapshot, as `disk info` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    #[serde(skip)]
    pub l1_table_offset: u64,
    #[serde(skip)]
    pub l1_size: u32,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// Reads the snapshot table; returns the snapshots and the table's length.
fn snapshot_table(storage: &dyn Storage, h: &Header) -> Result<(Vec<Snapshot>, u64), Qcow2Error> {
    let bad = |m: &str| Qcow2Error::Invalid(format!("snapshot table: {m}"));
    if h.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(bad("too many snapshots"));
    }
    if h.snapshots_offset == 0 {
        return Err(bad("no table offset"));
    }
    let mut pos = h.snapshots_offset;
    let mut out = Vec::new();
    for _ in 0..h.nb_snapshots {
        let mut fixed = [0u8; 40];
        storage
            .read_at(&mut fixed, pos)
            .map_err(|_| bad("truncated"))?;
        let id_len = usize::from(be16(&fixed, 12));
        let name_len = usize::from(be16(&fixed, 14));
        let extra_len = usize::try_from(be32(&fixed, 36))
            .ok()
            .filter(|&n| n <= 1024)
            .ok_or_else(|| bad("extra data too large"))?;
        let var_len = extra_len + id_len + name_len;
        let mut var = vec![0u8; var_len];
        storage
            .read_at(&mut var, pos + 40)
            .map_err(|_| bad("truncated"))?;
        let extra = &var[..extra_len];
        let vm_state_size = if extra.len() >= 8 {
            be64(extra, 0)
        } else {
            u64::from(be32(&fixed, 32))
        };
        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        if !l1_table_offset.is_multiple_of(h.cluster_size())
            || u64::from(l1_size) * 8 > header::MAX_L1_BYTES
        {
            return Err(bad("bad L1 table"));
        }
        let id_end = extra_len + id_len;
        out.push(Snapshot {
            id: String::from_utf8_lossy(&var[extra_len..id_end]).into_owned(),
            name: String::from_utf8_lossy(&var[id_end..]).into_owned(),
            date_sec: be32(&fixed, 16),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size,
            l1_table_offset,
            l1_size,
        });
        pos += (40 + var_len as u64).div_ceil(8) * 8;
    }
    Ok((out, pos - h.snapshots_offset))
}

pub fn read_snapshots(storage: &dyn Storage, h: &Header) -> Result<Vec<Snapshot>, Qcow2Error> {
    Ok(snapshot_table(storage, h)?.0)
}

/// References counted while walking the metadata.
struct Refs {
    counts: Vec<u32>,
    cluster_bits: u32,
    file_len: u64,
}

impl Refs {
    /// Counts a reference to every cluster overlapping the byte range;
    /// false if the range leaves the file.
    fn add(&mut self, offset: u64, len: u64, times: u32) -> bool {
        let Some(end) = offset.checked_add(len.max(1)) else {
            return false;
        };
        if end > self.file_len.div_ceil(1 << self.cluster_bits) << self.cluster_bits {
            return false;
        }
        let first = usize::try_from(offset >> self.cluster_bits);
        let last = usize::try_from((end - 1) >> self.cluster_bits);
        let (Ok(first), Ok(last)) = (first, last) else {
            return false;
        };
        let Some(counts) = self.counts.get_mut(first..=last) else {
            return false;
        };
        for n in counts {
            *n = n.saturating_add(times);
        }
        true
    }
}

/// An entry the repair rewrites: (host offset of the entry, new value).
type Fix = (u64, u64);

struct Walk<'a> {
    storage: &'a dyn Storage,
    h: &'a Header,
    refs: Refs,
    report: CheckReport,
    fixes: Vec<Fix>,
    /// Active L1/L2 entries pointing at a cluster: (entry's offset, entry,
    /// host cluster), for the COPIED-flag check.
    active: Vec<(u64, u64, u64)>,
    /// L2 tables to walk: how many L1 entries point to each, and whether
    /// the active L1 is one of them.
    l2_uses: std::collections::BTreeMap<u64, (u32, bool)>,
}

impl Walk<'_> {
    /// Counts an L1 table's references to L2 tables; the tables are walked
    /// later, once each however many L1 entries share them (snapshots do;
    /// a hostile image may repeat one millions of times).
    fn walk_l1(&mut self, l1_offset: u64, l1: &[u64], active: bool) {
        let cs = self.h.cluster_size();
        for (i, &l1e) in l1.iter().enumerate() {
            let off = l1e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let at = l1_offset + i as u64 * 8;
            if !off.is_multiple_of(cs) || !self.refs.add(off, cs, 1) {
                self.report
                    .corruption(format!("L2 table at {off:#x} is unaligned or past the end"));
                if active {
                    self.fixes.push((at, 0));
                }
                continue;
            }
            if active {
                self.active.push((at, l1e, off));
            }
            let uses = self.l2_uses.entry(off).or_insert((0, false));
            uses.0 = uses.0.saturating_add(1);
            uses.1 |= active;
        }
    }

    /// Counts the references of every L2 table found by `walk_l1`.
    fn walk_l2_tables(&mut self) {
        let cs = self.h.cluster_size();
        let tables = std::mem::take(&mut self.l2_uses);
        for (off, (times, active)) in tables {
            let table = match read_table(self.storage, off, cs / 8) {
                Ok(t) => t,
                Err(e) => {
                    self.report
                        .corruption(format!("cannot read the L2 table at {off:#x}: {e}"));
                    continue;
                }
            };
            for (j, &e) in table.iter().enumerate() {
                let at = off + j as u64 * 8;
                match classify(e, self.h.cluster_bits, self.h.version) {
                    Err(_) => {
                        self.report.corruption(format!("invalid L2 entry {e:#x}"));
                        if active {
                            self.fixes.push((at, 0));
                        }
                    }
                    Ok(Mapping::Unallocated | Mapping::Zero(None)) => {}
                    Ok(Mapping::Compressed { offset, len }) => {
                        if !self.refs.add(offset & !511, len, times) {
                            self.report.corruption(format!(
                                "compressed cluster at {offset:#x} is past the end"
                            ));
                            if active {
                                self.fixes.push((at, 0));
                            }
                        } else if active {
                            self.report.allocated_clusters += 1;
                        }
                    }
                    Ok(Mapping::Data(host) | Mapping::Zero(Some(host))) => {
                        if !self.refs.add(host, cs, times) {
                            self.report
                                .corruption(format!("data cluster at {host:#x} is past the end"));
                            if active {
                                self.fixes.push((at, 0));
                            }
                        } else if active {
                            self.report.allocated_clusters += 1;
                            self.active.push((at, e, host));
                        }
                    }
                }
            }
        }
    }
}

/// Checks `inner`'s image (its caches already written back); with
/// `repair`, fixes it and reports what remains.
pub(super) fn check(inner: &mut Inner, repair: bool) -> Result<CheckReport, Qcow2Error> {
    let h = inner.h.clone();
    let storage = &*inner.storage;
    let cs = h.cluster_size();
    let file_len = storage.len()?;
    let nfc = file_len.div_ceil(cs);
    let file_clusters = to_index(nfc)?;
    let mut walk = Walk {
        storage,
        h: &h,
        refs: Refs {
            counts: vec![0; file_clusters],
            cluster_bits: h.cluster_bits,
            file_len,
        },
        report: CheckReport {
            image_end_offset: file_len,
            total_clusters: h.size.div_ceil(cs),
            ..CheckReport::default()
        },
        fixes: Vec::new(),
        active: Vec::new(),
        l2_uses: std::collections::BTreeMap::new(),
    };
    walk.refs.add(0, cs, 1);
    if !walk
        .refs
        .add(h.l1_table_offset, u64::from(h.l1_size) * 8, 1)
    {
        return Err(Qcow2Error::Invalid("the L1 table is past the end".into()));
    }
    walk.walk_l1(h.l1_table_offset, &inner.l1, true);
    match snapshot_table(storage, &h) {
        Ok((snapshots, len)) => {
            if len > 0 && !walk.refs.add(h.snapshots_offset, len, 1) {
                walk.report
                    .corruption("the snapshot table is past the end".into());
            }
            for s in snapshots {
                let l1_len = u64::from(s.l1_size) * 8;
                if !walk.refs.add(s.l1_table_offset, l1_len, 1) {
                    walk.report
                        .corruption(format!("snapshot {}'s L1 table is past the end", s.id));
                    continue;
                }
                match read_table(storage, s.l1_table_offset, u64::from(s.l1_size)) {
                    Ok(l1) => walk.walk_l1(s.l1_table_offset, &l1, false),
                    Err(e) => walk
                        .report
                        .corruption(format!("snapshot {}'s L1 table: {e}", s.id)),
                }
            }
        }
        Err(e) => walk.report.corruption(e.to_string()),
    }
    walk.walk_l2_tables();
    // The refcount structure's own clusters, kept apart: a rebuild
    // replaces them.
    let data_refs = walk.refs.counts.clone();
    let reftable_len = u64::from(h.refcount_table_clusters) * cs;
    if !walk.refs.add(h.refcount_table_offset, reftable_len, 1) {
        walk.report
            .corruption("the refcount table is past the end".into());
    }
    let mut blocks = Vec::new();
    for (bi, &e) in inner.reftable.iter().enumerate() {
        let off = e & OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if !off.is_multiple_of(cs) || !walk.refs.add(off, cs, 1) {
            walk.report.corruption(format!(
                "refcount block {bi} at {off:#x} is unaligned or past the end"
            ));
            continue;
        }
        blocks.push((bi as u64, off));
    }
    // Compare the stored refcounts with the references.
    let rb_bits = h.cluster_bits + 3 - h.refcount_order;
    let mut stored = vec![0u64; file_clusters];
    for &(bi, off) in &blocks {
        if bi << rb_bits >= nfc {
            // Covers only clusters past the end of the file: nothing to
            // compare (a rebuild drops it).
            continue;
        }
        let mut block = vec![0u8; h.cluster_bytes()];
        if let Err(e) = storage.read_at(&mut block, off) {
            walk.report
                .corruption(format!("cannot read refcount block {bi}: {e}"));
            continue;
        }
        // The block's clusters that lie in the file (first < nfc above).
        let first = to_index(bi << rb_bits)?;
        let count = to_index((1u64 << rb_bits).min(nfc - (bi << rb_bits)))?;
        for (index, slot) in stored[first..first + count].iter_mut().enumerate() {
            *slot = get_refcount(&block, h.refcount_order, index);
        }
    }
    for (c, &have) in stored.iter().enumerate() {
        let want = u64::from(walk.refs.counts[c]);
        if have < want {
            walk.report.corruption(format!(
                "cluster {c} has refcount {have} but {want} references"
            ));
        } else if have > want {
            walk.report.leaks += 1;
            walk.report.note(format!(
                "leaked cluster {c}: refcount {have}, {want} references"
            ));
        }
    }
    // COPIED flags of the active tables: set exactly when refcount is 1.
    for &(at, entry, host) in &walk.active {
        // Counted by `Refs::add`, so inside `counts`.
        let refs = usize::try_from(host / cs)
            .ok()
            .and_then(|c| walk.refs.counts.get(c))
            .copied()
            .unwrap_or(0);
        let copied = refs == 1;
        if (entry & OFLAG_COPIED != 0) != copied {
            walk.report.corruption(format!(
                "entry at {at:#x} has COPIED={} but refcount {}",
                entry & OFLAG_COPIED != 0,
                refs
            ));
            let fixed = if copied {
                entry | OFLAG_COPIED
            } else {
                entry & !OFLAG_COPIED
            };
            walk.fixes.push((at, fixed));
        }
    }
    let report = walk.report;
    let fixes = walk.fixes;
    if !repair {
        return Ok(report);
    }
    if report.leaks == 0 && report.corruptions == 0 {
        clear_corrupt_bit(inner)?;
        return Ok(report);
    }
    // Repair: entries first, then a fresh refcount structure from the
    // references counted above (dropped entries were never counted).
    for (at, value) in fixes {
        storage.write_at(&value.to_be_bytes(), at)?;
    }
    storage.sync()?;
    let (offset, clusters) = write_refcounts_from(storage, &h, &data_refs)?;
    inner.h.refcount_table_offset = offset;
    inner.h.refcount_table_clusters = clusters;
    inner.reload()?;
    let mut after = check(inner, false)?;
    if after.corruptions == 0 {
        clear_corrupt_bit(inner)?;
    }
    after.repaired =
        (report.leaks + report.corruptions).saturating_sub(after.leaks + after.corruptions);
    Ok(after)
}

fn clear_corrupt_bit(inner: &mut Inner) -> Result<(), Qcow2Error> {
    if inner.h.incompatible & header::INCOMPAT_CORRUPT != 0 {
        inner.h.incompatible &= !header::INCOMPAT_CORRUPT;
        inner
            .storage
            .write_at(&inner.h.incompatible.to_be_bytes(), header::OFF_INCOMPAT)?;
        inner.storage.sync()?;
    }
    Ok(())
}

/// Writes a new refcount table and blocks past the end of the file,
/// holding `refs` (one count per cluster) plus themselves, then points the
/// header at them. Returns the table's offset and size in clusters.
pub(super) fn write_refcounts_from(
    storage: &dyn Storage,
    h: &Header,
    refs: &[u32],
) -> Result<(u64, u32), Qcow2Error> {
    let cs = h.cluster_size();
    let order = h.refcount_order;
    let rb_bits = h.cluster_bits + 3 - order;
    let per_block = 1u64 << rb_bits;
    let per_cluster = cs / 8;
    let max = if order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    };
    let start = storage.len()?.div_ceil(cs).max(refs.len() as u64);
    let (mut table_clusters, mut blocks) = (1u64, 0u64);
    loop {
        let total = start + table_clusters + blocks;
        let need_blocks = total.div_ceil(per_block);
        let need_table = need_blocks.div_ceil(per_cluster).max(1);
        if need_blocks == blocks && need_table == table_clusters {
            break;
        }
        blocks = need_blocks;
        table_clusters = need_table;
    }
    let too_large = || Qcow2Error::Invalid("the image is too large for its refcount table".into());
    if table_clusters * cs > header::MAX_REFTABLE_BYTES {
        return Err(too_large());
    }
    let clusters = u32::try_from(table_clusters).map_err(|_| too_large())?;
    let table_start = start;
    let blocks_start = start + table_clusters;
    let end = blocks_start + blocks;
    // At most 8 MiB (checked above).
    let mut table = vec![0u64; to_index(table_clusters * per_cluster)?];
    // `blocks` entries fit the table (need_table covers them).
    for (bi, entry) in (0..blocks).zip(table.iter_mut()) {
        let mut block = vec![0u8; h.cluster_bytes()];
        for index in 0..to_index(per_block)? {
            let c = bi * per_block + index as u64;
            let count = if c >= table_start && c < end {
                1
            } else {
                usize::try_from(c)
                    .ok()
                    .and_then(|c| refs.get(c))
                    .map_or(0, |&n| u64::from(n))
            };
            if count > max {
                return Err(Qcow2Error::Invalid(format!(
                    "cluster {c} has {count} references, more than {}-bit refcounts hold",
                    1u32 << order
                )));
            }
            set_refcount(&mut block, order, index, count);
        }
        let off = (blocks_start + bi) * cs;
        storage.write_at(&block, off)?;
        *entry = off;
    }
    let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
    storage.write_at(&bytes, table_start * cs)?;
    storage.sync()?;
    let mut fields = Vec::with_capacity(12);
    fields.extend_from_slice(&(table_start * cs).to_be_bytes());
    fields.extend_from_slice(&clusters.to_be_bytes());
    storage.write_at(&fields, header::OFF_REFTABLE)?;
    storage.sync()?;
    Ok((table_start * cs, clusters))
}
