//! Interoperability with QEMU's own qcow2 code (`qemu-img`, `qemu-io` from
//! Debian's qemu-utils): images hostvisor writes pass `qemu-img check`,
//! and images QEMU writes read back byte-identically through hostvisor.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use block::{open_image, CacheMode, DiskImage, Format, OpenOptions};

/// A scratch directory removed at the end of the test.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("hv-qimg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether qemu-img is here; CI (HOSTVISOR_REQUIRE_QEMU_IMG=1) fails
/// without it instead of skipping.
fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img").arg("--version").output().is_ok();
    if !ok {
        assert!(
            std::env::var("HOSTVISOR_REQUIRE_QEMU_IMG").as_deref() != Ok("1"),
            "qemu-img is missing (install qemu-utils)"
        );
        eprintln!("SKIPPED: qemu-img is not installed (Debian package qemu-utils)");
    }
    ok
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(image: &Path, format: &str, commands: &[&str]) {
    let mut args = vec!["-f", format];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    let p = image.to_str().unwrap();
    args.push(p);
    run("qemu-io", &args);
}

/// `qemu-img check`: 0 is clean, 3 is leaks only; anything else fails.
fn qemu_check(image: &Path, allow_leaks: bool) {
    let out = Command::new("qemu-img")
        .args(["check", image.to_str().unwrap()])
        .output()
        .unwrap();
    let code = out.status.code();
    let ok = code == Some(0) || (allow_leaks && code == Some(3));
    assert!(
        ok,
        "qemu-img check {}: exit {code:?}\n{}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The image's contents as QEMU reads them.
fn qemu_read(image: &Path, dir: &Dir) -> Vec<u8> {
    let out = dir.path("qemu-read.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            image.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

fn hv_read(image: &Path) -> Vec<u8> {
    let disk = open_image(
        image,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    buf
}

fn open_rw(image: &Path, cache: CacheMode) -> std::sync::Arc<dyn DiskImage> {
    open_image(
        image,
        OpenOptions {
            cache,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

fn sha256(data: &[u8], dir: &Dir) -> String {
    let p = dir.path("hash-input");
    std::fs::write(&p, data).unwrap();
    let out = run("sha256sum", &[p.to_str().unwrap()]);
    std::fs::remove_file(&p).unwrap();
    out.split_whitespace().next().unwrap().to_string()
}

fn assert_same_contents(image: &Path, dir: &Dir) {
    let ours = hv_read(image);
    let theirs = qemu_read(image, dir);
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{}: sizes differ",
        image.display()
    );
    assert_eq!(
        sha256(&ours, dir),
        sha256(&theirs, dir),
        "{}: hostvisor and qemu-img read different data",
        image.display()
    );
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn images_qemu_writes_read_identically_through_hostvisor() {
    if !have_qemu_img() {
        return;
    }
    let dir = Dir::new("read");
    let raw = dir.path("src.raw");
    let mut src = pattern(8 << 20, 1);
    src[3 << 20..4 << 20].fill(0); // a zero run, for sparse outputs
    std::fs::write(&raw, &src).unwrap();
    let raw_s = raw.to_str().unwrap();

    // Plain images of several layouts, with data and zero clusters.
    for (name, options) in [
        ("v3", "compat=1.1"),
        ("v2", "compat=0.10"),
        ("c512", "cluster_size=512"),
        ("c2m", "cluster_size=2M"),
        ("rc1", "refcount_bits=1"),
        ("rc64", "refcount_bits=64"),
        ("lazy", "lazy_refcounts=on"),
    ] {
        let img = dir.path(&format!("{name}.qcow2"));
        let p = img.to_str().unwrap();
        run(
            "qemu-img",
            &["convert", "-O", "qcow2", "-o", options, raw_s, p],
        );
        let zero = if name == "v2" {
            "write -P 0 0 64k"
        } else {
            "write -z 0 64k"
        };
        qemu_io(
            &img,
            "qcow2",
            &[zero, "write -P 0x5a 100k 300k", "discard 1M 128k"],
        );
        assert_same_contents(&img, &dir);
    }

    // Compressed clusters, deflate and zstd.
    for (name, options) in [
        ("zlib", "compression_type=zlib"),
        ("zstd", "compression_type=zstd"),
    ] {
        let img = dir.path(&format!("{name}.qcow2"));
        let p = img.to_str().unwrap();
        run(
            "qemu-img",
            &["convert", "-c", "-O", "qcow2", "-o", options, raw_s, p],
        );
        let info = run("qemu-img", &["info", p]);
        assert!(
            info.contains(&format!("compression type: {name}")),
            "{info}"
        );
        assert_same_contents(&img, &dir);
    }

    // A backing chain: raw base <- qcow2 <- qcow2 <- qcow2, each layer
    // writing, zeroing and discarding some of it; the top is larger.
    let mut below = ("src.raw".to_string(), "raw");
    for layer in 1..=3 {
        let name = format!("layer{layer}.qcow2");
        let img = dir.path(&name);
        let size = if layer == 3 { "10M" } else { "8M" };
        run(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-b",
                &below.0,
                "-F",
                below.1,
                img.to_str().unwrap(),
                size,
            ],
        );
        let off = layer * 512 * 1024;
        qemu_io(
            &img,
            "qcow2",
            &[
                &format!("write -P {} {off} 200k", layer * 16),
                &format!("write -z {} 64k", off + 1024 * 1024),
                &format!("write -P 7 {} 4k", (7 << 20) + layer * 8192),
            ],
        );
        below = (name, "qcow2");
    }
    assert_same_contents(&dir.path("layer3.qcow2"), &dir);

    // Internal snapshots: the active layer reads as QEMU reads it, and
    // hostvisor's writes copy shared clusters instead of changing the
    // snapshot.
    let snap = dir.path("snap.qcow2");
    let sp = snap.to_str().unwrap();
    run("qemu-img", &["convert", "-O", "qcow2", raw_s, sp]);
    run("qemu-img", &["snapshot", "-c", "one", sp]);
    qemu_io(&snap, "qcow2", &["write -P 0x11 0 1M"]);
    run("qemu-img", &["snapshot", "-c", "two", sp]);
    qemu_io(&snap, "qcow2", &["write -P 0x22 512k 1M"]);
    assert_same_contents(&snap, &dir);
    // Snapshot "one" as QEMU reads it.
    let snapshot_one = || {
        let out = dir.path("one.raw");
        run(
            "qemu-img",
            &[
                "convert",
                "-l",
                "one",
                "-O",
                "raw",
                sp,
                out.to_str().unwrap(),
            ],
        );
        let data = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        data
    };
    let one_before = snapshot_one();
    {
        let disk = open_rw(&snap, CacheMode::Writeback);
        disk.write_at(&[0x33; 70000], 4000).unwrap();
        disk.write_zeroes(2 << 20, 1 << 20, true).unwrap();
        disk.flush().unwrap();
    }
    qemu_check(&snap, false);
    assert_same_contents(&snap, &dir);
    assert!(snapshot_one() == one_before, "snapshot one changed");
    let info = run("qemu-img", &["snapshot", "-l", sp]);
    assert!(info.contains("one") && info.contains("two"), "{info}");
}

#[test]
fn images_hostvisor_writes_pass_qemu_img_check() {
    if !have_qemu_img() {
        return;
    }
    let dir = Dir::new("write");
    for (name, options, cache) in [
        ("default", "", CacheMode::Writeback),
        ("direct", "", CacheMode::None),
        ("v2", "compat=0.10", CacheMode::Writeback),
        (
            "c512-rc64",
            "cluster_size=512,refcount_bits=64",
            CacheMode::Unsafe,
        ),
        (
            "c4k-rc2",
            "cluster_size=4096,refcount_bits=2",
            CacheMode::Writeback,
        ),
    ] {
        let img = dir.path(&format!("{name}.qcow2"));
        let mut args = vec!["create", "-f", "qcow2"];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        let p = img.to_str().unwrap().to_string();
        args.extend([p.as_str(), "16M"]);
        run("qemu-img", &args);
        let mut model = vec![0u8; 16 << 20];
        {
            let disk = open_rw(&img, cache);
            let mut seed = 0x1234_5678_9abc_def0u64 ^ name.len() as u64;
            for i in 0..300usize {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let off = (seed % (16 << 20)) as usize / 512 * 512;
                let len = ((seed >> 32) as usize % (256 << 10))
                    .min((16 << 20) - off)
                    .max(512)
                    / 512
                    * 512;
                match i % 7 {
                    5 => {
                        disk.discard(off as u64, len as u64).unwrap();
                        model[off..off + len].fill(0);
                    }
                    6 => {
                        disk.write_zeroes(off as u64, len as u64, false).unwrap();
                        model[off..off + len].fill(0);
                    }
                    _ => {
                        let data = pattern(len, i as u8);
                        disk.write_at(&data, off as u64).unwrap();
                        model[off..off + len].copy_from_slice(&data);
                    }
                }
                if i % 50 == 0 {
                    disk.flush().unwrap();
                }
            }
        }
        qemu_check(&img, false);
        assert!(
            qemu_read(&img, &dir) == model,
            "{name}: QEMU reads other data"
        );
    }
}

#[test]
fn the_format_is_probed_or_forced() {
    if !have_qemu_img() {
        return;
    }
    let dir = Dir::new("probe");
    let q = dir.path("a.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", q.to_str().unwrap(), "1M"],
    );
    assert_eq!(block::probe(&q).unwrap(), Format::Qcow2);
    let disk = open_image(&q, OpenOptions::default()).unwrap();
    assert_eq!(disk.size(), 1 << 20);
    drop(disk);
    // Forced raw: the guest sees the file itself.
    let raw = open_image(
        &q,
        OpenOptions {
            format: Some(Format::Raw),
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert_eq!(raw.size(), std::fs::metadata(&q).unwrap().len());
    // A backing chain that loops is an error, not a hang.
    let a = dir.path("loop-a.qcow2");
    let b = dir.path("loop-b.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", b.to_str().unwrap(), "1M"],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "loop-b.qcow2",
            "-F",
            "qcow2",
            a.to_str().unwrap(),
            "1M",
        ],
    );
    run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-b",
            "loop-a.qcow2",
            "-F",
            "qcow2",
            b.to_str().unwrap(),
        ],
    );
    let err = open_image(
        &a,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("deeper than"), "{err}");
}
