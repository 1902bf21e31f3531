#![allow(clippy::unwrap_used)]

use super::*;
use crate::file::MemFile;

/// A small deterministic generator for test patterns.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn new_image(opts: &CreateOptions) -> Arc<MemFile> {
    let mem = Arc::new(MemFile::default());
    create(&*mem, opts).unwrap();
    mem
}

fn open_rw(mem: &Arc<MemFile>) -> Qcow2 {
    Qcow2::open(Box::new(mem.clone()), false, b"t".to_vec(), None).unwrap()
}

fn opts(size: u64, cluster_bits: u32) -> CreateOptions {
    CreateOptions {
        size,
        cluster_bits,
        ..CreateOptions::default()
    }
}

fn assert_clean(img: &Qcow2) {
    let report = img.check(false).unwrap();
    assert_eq!(
        (report.leaks, report.corruptions),
        (0, 0),
        "{:#?}",
        report.messages
    );
}

/// Random writes, zeroes and discards against a byte-for-byte model.
fn exercise(img: &Qcow2, model: &mut [u8], rng: &mut Rng, ops: usize) {
    exercise_logged(img, model, rng, ops, &mut Vec::new());
}

/// As `exercise`, also noting each changed byte range.
fn exercise_logged(
    img: &Qcow2,
    model: &mut [u8],
    rng: &mut Rng,
    ops: usize,
    ranges: &mut Vec<std::ops::Range<usize>>,
) {
    let size = model.len() as u64;
    for i in 0..ops {
        let off = rng.below(size);
        let len = rng.below(size - off).clamp(1, 3 * 65536);
        let range = us(off)..us(off + len);
        ranges.push(range.clone());
        match rng.below(10) {
            0 => {
                img.discard(off, len).unwrap();
                model[range].fill(0);
            }
            1 => {
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[range].fill(0);
            }
            2 => img.flush().unwrap(),
            _ => {
                let byte = u8::try_from(i % 251).unwrap() + 1;
                let data = vec![byte; len as usize];
                img.write_at(&data, off).unwrap();
                model[range].fill(byte);
            }
        }
    }
}

/// A test-sized offset or length as an index.
fn us(x: u64) -> usize {
    usize::try_from(x).unwrap()
}

fn read_all(img: &dyn DiskImage) -> Vec<u8> {
    let mut buf = vec![0u8; us(img.size())];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn refcount_entries_of_every_width_round_trip() {
    for order in 0..=6u32 {
        let mut block = vec![0u8; 512];
        let entries = (512 * 8) >> order;
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << order)) - 1
        };
        for i in 0..entries {
            set_refcount(&mut block, order, i, (i as u64 * 7) & max);
        }
        for i in 0..entries {
            assert_eq!(
                get_refcount(&block, order, i),
                (i as u64 * 7) & max,
                "order {order}"
            );
        }
    }
}

#[test]
fn a_new_image_reads_zeroes_and_checks_clean() {
    let mem = new_image(&opts(10 << 20, 16));
    let img = open_rw(&mem);
    assert_eq!(img.size(), 10 << 20);
    assert!(read_all(&img).iter().all(|&b| b == 0));
    assert_clean(&img);
}

#[test]
fn random_io_matches_a_model_across_reopens() {
    for (cluster_bits, order) in [(16, 4), (12, 0), (9, 6), (9, 3), (21, 4)] {
        let size = 6 << 20;
        let mem = new_image(&CreateOptions {
            refcount_order: order,
            ..opts(size, cluster_bits)
        });
        let mut model = vec![0u8; us(size)];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(cluster_bits));
        {
            let img = open_rw(&mem);
            exercise(&img, &mut model, &mut rng, 200);
            assert!(read_all(&img) == model, "bits {cluster_bits} order {order}");
            assert_clean(&img);
        }
        let img = open_rw(&mem);
        assert!(read_all(&img) == model, "after reopen: bits {cluster_bits}");
        exercise(&img, &mut model, &mut rng, 100);
        drop(img);
        let img = Qcow2::open(Box::new(mem.clone()), true, vec![], None).unwrap();
        assert!(read_all(&img) == model);
        assert_clean(&img);
    }
}

#[test]
fn small_clusters_grow_the_refcount_table() {
    // 512-byte clusters with 64-bit refcounts: 64 clusters per block, so a
    // few MiB of data needs far more blocks than the first table holds.
    let mem = new_image(&CreateOptions {
        refcount_order: 6,
        ..opts(8 << 20, 9)
    });
    let before = Header::parse(&mem.contents()).unwrap();
    let img = open_rw(&mem);
    let data: Vec<u8> = (0..(4 << 20)).map(|i| (i % 253) as u8).collect();
    img.write_at(&data, 1 << 20).unwrap();
    img.flush().unwrap();
    assert_clean(&img);
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, 1 << 20).unwrap();
    assert!(back == data);
    drop(img);
    let after = Header::parse(&mem.contents()).unwrap();
    assert!(after.refcount_table_clusters > before.refcount_table_clusters);
    assert_ne!(after.refcount_table_offset, before.refcount_table_offset);
}

#[test]
fn freed_clusters_are_reused() {
    let mem = new_image(&opts(4 << 20, 16));
    let img = open_rw(&mem);
    img.write_at(&vec![1u8; 2 << 20], 0).unwrap();
    img.flush().unwrap();
    let full = mem.len().unwrap();
    img.discard(0, 2 << 20).unwrap();
    img.flush().unwrap();
    img.write_at(&vec![2u8; 2 << 20], 2 << 20).unwrap();
    img.flush().unwrap();
    assert_eq!(
        mem.len().unwrap(),
        full,
        "the discarded clusters were reused"
    );
    assert_clean(&img);
}

#[test]
fn zero_clusters_keep_or_release_their_space() {
    let mem = new_image(&opts(1 << 20, 16));
    let img = open_rw(&mem);
    img.write_at(&[5u8; 65536], 0).unwrap();
    img.write_at(&[6u8; 65536], 65536).unwrap();
    img.write_zeroes(0, 65536, false).unwrap();
    img.write_zeroes(65536, 65536, true).unwrap();
    img.flush().unwrap();
    let mut inner = img.lock();
    assert!(matches!(inner.mapping(0).unwrap(), Mapping::Zero(Some(_))));
    assert_eq!(inner.mapping(1).unwrap(), Mapping::Zero(None));
    drop(inner);
    assert!(read_all(&img).iter().all(|&b| b == 0));
    // Writing into a preallocated zero cluster reuses it.
    img.write_at(&[7u8; 512], 512).unwrap();
    let mut buf = [0u8; 1024];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 0) && buf[512..].iter().all(|&b| b == 7));
    assert_clean(&img);
}

#[test]
fn version_2_images_without_zero_flags_still_discard() {
    let mem = new_image(&CreateOptions {
        version: 2,
        ..opts(2 << 20, 16)
    });
    let img = open_rw(&mem);
    let mut model = vec![0u8; 2 << 20];
    exercise(&img, &mut model, &mut Rng(7), 150);
    assert!(read_all(&img) == model);
    assert_clean(&img);
    assert_eq!(img.header().version, 2);
}

fn open_overlay(mem: &Arc<MemFile>, base: Arc<dyn DiskImage>, read_only: bool) -> Qcow2 {
    let opener = move |_: &str, _: Option<&str>| -> Result<Arc<dyn DiskImage>, Qcow2Error> {
        Ok(base.clone())
    };
    Qcow2::open(Box::new(mem.clone()), read_only, vec![], Some(&opener)).unwrap()
}

#[test]
fn overlays_read_through_to_their_backing_file_and_copy_on_write() {
    let base_mem = new_image(&opts(3 << 20, 16));
    let mut model: Vec<u8> = (0..3u32 << 20).map(|i| (i % 241) as u8 + 1).collect();
    {
        let base = open_rw(&base_mem);
        base.write_at(&model, 0).unwrap();
    }
    let base: Arc<dyn DiskImage> =
        Arc::new(Qcow2::open(Box::new(base_mem.clone()), true, vec![], None).unwrap());
    // The overlay is larger than its base: the tail reads as zeroes.
    let overlay_mem = new_image(&CreateOptions {
        backing: Some(("base.qcow2".into(), "qcow2".into())),
        ..opts(4 << 20, 16)
    });
    model.resize(4 << 20, 0);
    let overlay = open_overlay(&overlay_mem, base.clone(), false);
    assert!(read_all(&overlay) == model);
    // Partial-cluster writes keep the backing bytes around them; zeroes
    // hide the backing data.
    overlay.write_at(&[0xaa; 100], 65536 + 10).unwrap();
    model[65536 + 10..65536 + 110].fill(0xaa);
    overlay.write_zeroes(0, 65536, true).unwrap();
    model[..65536].fill(0);
    overlay.discard(131072 + 512, 1024).unwrap();
    model[131072 + 512..131072 + 1536].fill(0);
    exercise(&overlay, &mut model, &mut Rng(99), 100);
    assert!(read_all(&overlay) == model);
    assert!(overlay.is_allocated(65536).unwrap());
    assert_clean(&overlay);
    drop(overlay);
    let overlay = open_overlay(&overlay_mem, base, true);
    assert!(read_all(&overlay) == model);
    let h = overlay.header();
    assert_eq!(h.backing_file.as_deref(), Some("base.qcow2"));
    assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
}

#[test]
fn an_image_with_a_backing_file_needs_an_opener() {
    let mem = new_image(&CreateOptions {
        backing: Some(("base".into(), "raw".into())),
        ..opts(1 << 20, 16)
    });
    let err = Qcow2::open(Box::new(mem), true, vec![], None).unwrap_err();
    assert!(err.to_string().contains("backing file base"), "{err}");
}

#[test]
fn resize_grows_the_l1_table_and_keeps_data() {
    // 512-byte clusters: one L1 entry maps 32 KiB, so growing from 1 MiB
    // to 64 MiB moves the L1 table to larger clusters.
    let mem = new_image(&opts(1 << 20, 9));
    let mut img = open_rw(&mem);
    img.write_at(&[3u8; 4096], (1 << 20) - 4096).unwrap();
    let old_l1 = img.header().l1_table_offset;
    img.resize(64 << 20).unwrap();
    assert_eq!(img.size(), 64 << 20);
    assert_ne!(img.header().l1_table_offset, old_l1);
    img.write_at(&[4u8; 4096], (64 << 20) - 4096).unwrap();
    assert!(img.resize(1 << 20).is_err(), "shrinking is refused");
    img.flush().unwrap();
    assert_clean(&img);
    drop(img);
    let img = open_rw(&mem);
    let mut buf = [0u8; 4096];
    img.read_at(&mut buf, (1 << 20) - 4096).unwrap();
    assert_eq!(buf, [3u8; 4096]);
    img.read_at(&mut buf, (64 << 20) - 4096).unwrap();
    assert_eq!(buf, [4u8; 4096]);
}

#[test]
fn check_finds_and_repair_fixes_leaks_and_corruption() {
    let mem = new_image(&opts(2 << 20, 16));
    {
        let img = open_rw(&mem);
        img.write_at(&vec![9u8; 1 << 20], 0).unwrap();
    }
    let h = Header::parse(&mem.contents()).unwrap();
    let rt = read_table(&*mem, h.refcount_table_offset, 1).unwrap()[0];
    // A leak: refcount 1 for a cluster past everything... and a
    // corruption: cluster 0's refcount set to 0.
    let mut block = vec![0u8; 65536];
    mem.read_at(&mut block, rt).unwrap();
    set_refcount(&mut block, 4, 0, 0);
    let nfc = mem.len().unwrap() >> 16;
    mem.set_len((nfc + 1) << 16).unwrap();
    set_refcount(&mut block, 4, nfc as usize, 1);
    mem.write_at(&block, rt).unwrap();
    let img = open_rw(&mem);
    let report = img.check(false).unwrap();
    assert_eq!(
        (report.leaks, report.corruptions),
        (1, 1),
        "{:#?}",
        report.messages
    );
    let repaired = img.check(true).unwrap();
    assert_eq!(
        (repaired.leaks, repaired.corruptions),
        (0, 0),
        "{:#?}",
        repaired.messages
    );
    assert_eq!(repaired.repaired, 2);
    // The data survived, and the image is writable afterwards.
    let mut buf = vec![0u8; 1 << 20];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 9));
    img.write_at(&[1u8; 65536], 1 << 20).unwrap();
    assert_clean(&img);
}

#[test]
fn a_dirty_image_is_repaired_when_opened_for_writing() {
    let mem = new_image(&opts(2 << 20, 16));
    {
        let img = open_rw(&mem);
        img.write_at(&vec![9u8; 1 << 20], 0).unwrap();
    }
    // What QEMU leaves with lazy refcounts after a crash: references
    // without refcounts, and the dirty bit.
    let h = Header::parse(&mem.contents()).unwrap();
    let rt = read_table(&*mem, h.refcount_table_offset, 1).unwrap()[0];
    mem.write_at(&vec![0u8; 65536], rt).unwrap();
    mem.write_at(&header::INCOMPAT_DIRTY.to_be_bytes(), header::OFF_INCOMPAT)
        .unwrap();
    let img = open_rw(&mem);
    assert_eq!(img.header().incompatible & header::INCOMPAT_DIRTY, 0);
    assert_clean(&img);
    let mut buf = vec![0u8; 1 << 20];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 9));
}

#[test]
fn an_image_marked_corrupt_opens_read_only_only() {
    let mem = new_image(&opts(1 << 20, 16));
    mem.write_at(
        &header::INCOMPAT_CORRUPT.to_be_bytes(),
        header::OFF_INCOMPAT,
    )
    .unwrap();
    let err = Qcow2::open(Box::new(mem.clone()), false, vec![], None).unwrap_err();
    assert!(err.to_string().contains("marked corrupt"), "{err}");
    assert!(Qcow2::open(Box::new(mem.clone()), true, vec![], None).is_ok());
    let img = Qcow2::open_with(Box::new(mem.clone()), false, vec![], None, true).unwrap();
    img.check(true).unwrap();
    drop(img);
    assert!(Qcow2::open(Box::new(mem), false, vec![], None).is_ok());
}

/// Builds an image with one data cluster and returns it with the offsets
/// of its L1 table, L2 table and data cluster.
fn image_with_data() -> (Vec<u8>, u64, u64, u64) {
    let mem = new_image(&opts(1 << 20, 16));
    {
        let img = open_rw(&mem);
        img.write_at(&[1u8; 512], 0).unwrap();
    }
    let bytes = mem.contents();
    let h = Header::parse(&bytes).unwrap();
    let l1 = h.l1_table_offset;
    let l2 = read_table(&*mem, l1, 1).unwrap()[0] & OFFSET_MASK;
    let data = read_table(&*mem, l2, 1).unwrap()[0] & OFFSET_MASK;
    (bytes, l1, l2, data)
}

#[test]
fn malformed_images_give_errors_not_panics() {
    let (good, l1, l2, data) = image_with_data();
    let put = |b: &mut Vec<u8>, at: u64, v: u64| {
        b[us(at)..us(at) + 8].copy_from_slice(&v.to_be_bytes());
    };
    type Mangle = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mangle)> = vec![
        ("truncated header", Box::new(|b| b.truncate(40))),
        ("truncated L1", Box::new(move |b| b.truncate(us(l1) + 4))),
        (
            "huge L1 size",
            Box::new(|b| b[36..40].copy_from_slice(&u32::MAX.to_be_bytes())),
        ),
        (
            "huge virtual size",
            Box::new(|b| b[24..32].copy_from_slice(&u64::MAX.to_be_bytes())),
        ),
        (
            "L2 past EOF",
            Box::new(move |b| put(b, l1, (1 << 40) | OFLAG_COPIED)),
        ),
        ("unaligned L2", Box::new(move |b| put(b, l1, l2 + 512))),
        (
            "data past EOF",
            Box::new(move |b| put(b, l2, (1 << 40) | OFLAG_COPIED)),
        ),
        ("unaligned data", Box::new(move |b| put(b, l2, data + 512))),
        (
            "data over the header",
            Box::new(move |b| put(b, l2, OFLAG_COPIED)),
        ),
        (
            "data over the L1 table",
            Box::new(move |b| put(b, l2, l1 | OFLAG_COPIED)),
        ),
        (
            "L2 is its own L1 (a loop)",
            Box::new(move |b| put(b, l1, l1 | OFLAG_COPIED)),
        ),
        (
            "compressed garbage",
            Box::new(move |b| put(b, l2, OFLAG_COMPRESSED | data | (3u64 << 54))),
        ),
        (
            "compressed past EOF",
            Box::new(move |b| put(b, l2, OFLAG_COMPRESSED | (1 << 40))),
        ),
        (
            "refcount table past EOF",
            Box::new(|b| b[48..56].copy_from_slice(&(1u64 << 40).to_be_bytes())),
        ),
        (
            "refcount block past EOF",
            Box::new(|b| {
                let h = Header::parse(b).unwrap();
                let at = us(h.refcount_table_offset);
                b[at..at + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
            }),
        ),
        (
            "refcount block is the header (a loop)",
            Box::new(|b| {
                let h = Header::parse(b).unwrap();
                let at = us(h.refcount_table_offset);
                b[at..at + 8].copy_from_slice(&0u64.to_be_bytes());
                b[at + 8..at + 16].copy_from_slice(&0x10000u64.to_be_bytes());
            }),
        ),
        (
            "snapshot table garbage",
            Box::new(|b| {
                b[60..64].copy_from_slice(&1000u32.to_be_bytes());
                b[64..72].copy_from_slice(&0x10000u64.to_be_bytes());
            }),
        ),
    ];
    for (name, mangle) in cases {
        let mut bytes = good.clone();
        mangle(&mut bytes);
        let mem = Arc::new(MemFile::new(bytes));
        // The damage is noticed: the image does not open, a read fails,
        // or check reports it.
        let noticed = match Qcow2::open(Box::new(mem.clone()), true, vec![], None) {
            Err(_) => true,
            Ok(img) => {
                let mut buf = vec![0u8; 1 << 20];
                let read_failed = img.read_at(&mut buf, 0).is_err();
                let _ = img.snapshots();
                read_failed
                    || img
                        .check(false)
                        .map_or(true, |r| r.corruptions + r.leaks > 0)
            }
        };
        assert!(noticed, "{name}: not noticed");
        // Writing to it is an error or works, never a panic.
        if let Ok(img) = Qcow2::open(Box::new(mem.clone()), false, vec![], None) {
            let _ = img.write_at(&[2u8; 70000], 1000);
            let _ = img.write_zeroes(0, 1 << 20, true);
            let _ = img.flush();
            let _ = img.check(true);
        }
    }
}

#[test]
fn compressed_clusters_read_back() {
    // A deflate-compressed cluster, made the way QEMU stores them (raw
    // deflate, sector-granular length), spliced into an image.
    use std::io::Write;
    let (bytes, _l1, l2, _data) = image_with_data();
    let plain: Vec<u8> = (0..65536u32)
        .map(|i| u8::try_from(i / 300).unwrap())
        .collect();
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&plain).unwrap();
    let compressed = enc.finish().unwrap();
    let mem = Arc::new(MemFile::new(bytes));
    let at = mem.len().unwrap() + 100; // byte-granular, as QEMU packs them
    mem.write_at(&compressed, at).unwrap();
    let sectors = ((at & 511) + compressed.len() as u64).div_ceil(512);
    let shift = 62 - (16 - 8);
    let entry = OFLAG_COMPRESSED | at | ((sectors - 1) << shift);
    mem.write_at(&entry.to_be_bytes(), l2 + 8).unwrap();
    // Raise the refcounts of the clusters the compressed data spans.
    let img = Qcow2::open_with(Box::new(mem.clone()), false, vec![], None, true).unwrap();
    img.check(true).unwrap();
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 65536).unwrap();
    assert!(buf == plain);
    // Writing into it copies it out, decompressed, to a new cluster.
    img.write_at(&[0xee; 10], 65536 + 5).unwrap();
    img.read_at(&mut buf, 65536).unwrap();
    assert_eq!(&buf[5..15], &[0xee; 10]);
    assert_eq!(&buf[15..], &plain[15..]);
    img.flush().unwrap();
    assert_clean(&img);
}

/// Storage that logs every write, so a test can rebuild the file as it was
/// at any moment — what a SIGKILL of the VMM would leave.
#[derive(Debug, Default)]
struct Recorder {
    file: MemFile,
    log: std::sync::Mutex<Vec<Logged>>,
}

#[derive(Debug, Clone)]
enum Logged {
    Write(u64, Vec<u8>),
    SetLen(u64),
    /// The guest's flush returned; the model at that point is `models[n]`.
    Flushed(usize),
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(Logged::Write(offset, buf.to_vec()));
        self.file.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.log.lock().unwrap().push(Logged::SetLen(len));
        self.file.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch(&self, offset: u64, len: u64, zero_only: bool) -> io::Result<()> {
        self.file.punch(offset, len, zero_only)
    }
}

#[test]
fn the_file_is_consistent_after_every_single_write() {
    // Small clusters and a small cache, so that allocation, refcount-block
    // creation, refcount-table growth, evictions and deferred frees all
    // happen; then the file is rebuilt after each logged write (a kill at
    // that moment) and must check without corruption and hold every byte
    // the guest had flushed.
    let size = 1u64 << 20;
    let initial = {
        let mem = MemFile::default();
        create(
            &mem,
            &CreateOptions {
                refcount_order: 6,
                ..opts(size, 9)
            },
        )
        .unwrap();
        mem.into_inner()
    };
    let rec = Arc::new(Recorder {
        file: MemFile::new(initial.clone()),
        ..Recorder::default()
    });
    let mut models = Vec::new();
    // The byte ranges the guest changed before each flush.
    let mut changed: Vec<Vec<std::ops::Range<usize>>> = Vec::new();
    let mut model = vec![0u8; us(size)];
    {
        let img = Qcow2::open(Box::new(rec.clone()), false, vec![], None).unwrap();
        img.lock().l2_cache.set_capacity(4);
        img.lock().rb_cache.set_capacity(4);
        let mut rng = Rng(0xdead_beef);
        for round in 0..6 {
            let mut ranges = Vec::new();
            exercise_logged(&img, &mut model, &mut rng, 12, &mut ranges);
            img.flush().unwrap();
            models.push(model.clone());
            changed.push(ranges);
            rec.log
                .lock()
                .unwrap()
                .push(Logged::Flushed(models.len() - 1));
            assert_clean(&img);
            let _ = round;
        }
    }
    let log = rec.log.lock().unwrap().clone();
    let mut file = initial;
    let mut last_flushed: Option<usize> = None;
    // Sectors written since the last completed flush may hold either
    // version; all others must hold the flushed data.
    let mut touched = vec![false; (size / 512) as usize];
    let writes = log
        .iter()
        .filter(|l| matches!(l, Logged::Write(..)))
        .count();
    assert!(writes > 150, "only {writes} writes logged");
    for (k, entry) in log.iter().enumerate() {
        match entry {
            Logged::Write(off, data) => {
                let end = us(*off) + data.len();
                if file.len() < end {
                    file.resize(end, 0);
                }
                file[us(*off)..end].copy_from_slice(data);
            }
            Logged::SetLen(len) => file.resize(us(*len), 0),
            Logged::Flushed(n) => {
                last_flushed = Some(*n);
                touched.fill(false);
                continue;
            }
        }
        // The sectors the guest changed after that flush.
        let next = last_flushed.map_or(0, |n| n + 1);
        for r in changed.get(next).into_iter().flatten() {
            for t in &mut touched[r.start / 512..r.end.div_ceil(512)] {
                *t = true;
            }
        }
        let img = Qcow2::open(Box::new(MemFile::new(file.clone())), true, vec![], None)
            .unwrap_or_else(|e| panic!("after write {k}: {e}"));
        let report = img.check(false).unwrap();
        assert_eq!(
            report.corruptions, 0,
            "after write {k}: {:#?}",
            report.messages
        );
        if let Some(n) = last_flushed {
            let data = read_all(&img);
            for (s, &t) in touched.iter().enumerate() {
                let r = s * 512..(s + 1) * 512;
                assert!(
                    t || data[r.clone()] == models[n][r],
                    "after write {k}: sector {s} lost flushed data"
                );
            }
        }
    }
}
