//! `hostvisor disk` and qcow2 disks in VMs: the tools' images pass
//! `qemu-img check` and compare equal under `qemu-img compare`; a guest's
//! writes through hostvisor's qcow2 survive SIGKILLs of the VMM.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn hv(args: &[&str]) -> Output {
    hostvisor(args, &[], Duration::from_secs(120))
}

fn ok(args: &[&str]) -> String {
    let out = hv(args);
    assert_eq!(
        out.code, 0,
        "hostvisor {args:?}: {}{}",
        out.stdout, out.stderr
    );
    out.stdout
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `qemu-img check` passes (exit 0: no errors, no leaks).
fn qemu_clean(image: &Path) {
    tool("qemu-img", &["check", p(image)]);
}

fn qemu_same(a: &Path, b: &Path) {
    let out = tool("qemu-img", &["compare", p(a), p(b)]);
    assert!(out.contains("identical"), "{out}");
}

#[test]
fn disk_tools_make_images_qemu_img_accepts() {
    if !qemu_img_usable() {
        return;
    }
    let dir = temp_dir("disktools");
    let base = dir.join("base.raw");
    let over = dir.join("over.qcow2");
    // create: raw and qcow2 overlays; sizes default to the backing file's.
    ok(&[
        "disk",
        "create",
        p(&base),
        "--size",
        "16M",
        "--format",
        "raw",
    ]);
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x41 0 4M", p(&base)],
    );
    let out = ok(&["disk", "create", p(&over), "--backing", "base.raw"]);
    assert!(out.contains("backed by base.raw"), "{out}");
    qemu_clean(&over);
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x42 2M 4M",
            "-c",
            "write -z 8M 1M",
            p(&over),
        ],
    );
    // info: the whole chain, as text and JSON.
    let text = ok(&["disk", "info", p(&over)]);
    for needle in [
        "file format: qcow2",
        "virtual size: 16 MiB",
        "backing file: base.raw (format raw)",
        "file format: raw",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["disk", "info", "--json", p(&over)])).unwrap();
    assert_eq!(json["format"], "qcow2");
    assert_eq!(json["virtual_size"], 16 << 20);
    assert_eq!(json["cluster_size"], 65536);
    assert_eq!(json["backing"]["format"], "raw");
    assert!(json["actual_size"].as_u64().unwrap() > 4 << 20);
    // convert: to qcow2 and raw, sparse, same contents.
    let flat = dir.join("flat.qcow2");
    ok(&["disk", "convert", p(&over), p(&flat), "--format", "qcow2"]);
    qemu_clean(&flat);
    qemu_same(&over, &flat);
    let raw = dir.join("flat.raw");
    ok(&["disk", "convert", p(&over), p(&raw), "-O", "raw"]);
    qemu_same(&over, &raw);
    let meta = std::fs::metadata(&raw).unwrap();
    assert_eq!(meta.len(), 16 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < 8 << 20,
        "zeroes are not written: the output is sparse"
    );
    // resize: grow by a delta and to a size; shrinking is refused.
    ok(&["disk", "resize", p(&flat), "+5G"]);
    qemu_clean(&flat);
    let info = tool("qemu-img", &["info", "--output=json", p(&flat)]);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", (16u64 << 20) + (5 << 30))),
        "{info}"
    );
    let out = hv(&["disk", "resize", p(&flat), "1G"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("shrinking would lose data"),
        "{}",
        out.stderr
    );
    ok(&["disk", "resize", p(&raw), "32M"]);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 32 << 20);
    // check: clean images exit 0.
    let out = ok(&["disk", "check", p(&over)]);
    assert!(out.contains("No errors"), "{out}");
    // rebase (safe): onto another base, then onto none; contents unchanged.
    let before = dir.join("before.raw");
    tool("qemu-img", &["convert", "-O", "raw", p(&over), p(&before)]);
    let base2 = dir.join("base2.raw");
    std::fs::copy(&base, &base2).unwrap();
    tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x43 12M 1M", p(&base2)],
    );
    ok(&["disk", "rebase", p(&over), "-b", "base2.raw", "-F", "raw"]);
    qemu_clean(&over);
    qemu_same(&over, &before);
    assert!(tool("qemu-img", &["info", p(&over)]).contains("backing file: base2.raw"));
    ok(&["disk", "rebase", p(&over), "-b", ""]);
    qemu_clean(&over);
    qemu_same(&over, &before);
    assert!(!tool("qemu-img", &["info", p(&over)]).contains("backing file"));
    // rebase -u only rewrites the name.
    ok(&[
        "disk",
        "rebase",
        p(&over),
        "-u",
        "-b",
        "base.raw",
        "-F",
        "raw",
    ]);
    qemu_clean(&over);
    // commit: the overlay's data moves into a qcow2 base; both stay valid.
    let qbase = dir.join("qbase.qcow2");
    ok(&["disk", "convert", p(&base), p(&qbase), "-O", "qcow2"]);
    let top = dir.join("top.qcow2");
    ok(&["disk", "create", p(&top), "-b", "qbase.qcow2"]);
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 1M 3M",
            "-c",
            "write -z 0 64k",
            p(&top),
        ],
    );
    let top_before = dir.join("top-before.raw");
    tool(
        "qemu-img",
        &["convert", "-O", "raw", p(&top), p(&top_before)],
    );
    ok(&["disk", "commit", p(&top)]);
    qemu_clean(&top);
    qemu_clean(&qbase);
    qemu_same(&qbase, &top_before);
    qemu_same(&top, &top_before);
    let map = tool("qemu-img", &["map", "--output=json", p(&top)]);
    assert!(
        !map.contains("\"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"),
        "the overlay is empty after commit: {map}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn disk_tool_errors_are_clear_and_lose_nothing() {
    if !qemu_img_usable() {
        return;
    }
    let dir = temp_dir("diskerrors");
    let img = dir.join("a.qcow2");
    ok(&["disk", "create", p(&img), "--size", "1M"]);
    let before = std::fs::read(&img).unwrap();
    for (args, code, needle) in [
        (
            vec!["disk", "create", p(&img), "--size", "1M"],
            1,
            "already exists",
        ),
        (
            vec!["disk", "create", "/tmp/x.img"],
            1,
            "give the image a size",
        ),
        (
            vec!["disk", "create", "/tmp/x.img", "--size", "lots"],
            2,
            "is not a size",
        ),
        (
            vec!["disk", "create", "/tmp/x.img", "--size", "1000"],
            1,
            "multiple of 512",
        ),
        (
            vec![
                "disk",
                "create",
                "/tmp/x.img",
                "--size",
                "1M",
                "--format",
                "vmdk",
            ],
            2,
            "unknown image format",
        ),
        (
            vec![
                "disk",
                "create",
                "/tmp/x.img",
                "--size",
                "1M",
                "--cluster-size",
                "3000",
            ],
            1,
            "power of two",
        ),
        (
            vec![
                "disk",
                "create",
                "/tmp/x.img",
                "--format",
                "raw",
                "-b",
                "a.qcow2",
            ],
            1,
            "cannot have a backing file",
        ),
        (
            vec!["disk", "info", "/nonexistent.qcow2"],
            1,
            "cannot open the disk image",
        ),
        (vec!["disk", "resize", p(&img), "-1G"], 2, "shrinking"),
        (vec!["disk", "commit", p(&img)], 1, "has no backing file"),
    ] {
        let out = hv(&args);
        assert_one_line_error(&out, code, needle);
    }
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "the failed commands left the image alone"
    );
    assert!(!Path::new("/tmp/x.img").exists());
    // A damaged image: check reports it (exit 2), --repair fixes it, and
    // QEMU agrees. Cluster 0's refcount is zeroed in the first refcount block.
    tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 1 0 512k", p(&img)],
    );
    let bytes = std::fs::read(&img).unwrap();
    let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(bytes[rt..rt + 8].try_into().unwrap()) as usize;
    let mut damaged = bytes.clone();
    damaged[rb..rb + 2].copy_from_slice(&[0, 0]);
    std::fs::write(&img, &damaged).unwrap();
    let out = hv(&["disk", "check", p(&img)]);
    assert_eq!(out.code, 2, "{}", out.stdout);
    assert!(out.stdout.contains("errors were found"), "{}", out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&hv(&["disk", "check", "--json", p(&img)]).stdout).unwrap();
    assert_eq!(json["corruptions"], 1);
    let out = ok(&["disk", "check", "--repair", p(&img)]);
    assert!(out.contains("No errors"), "{out}");
    qemu_clean(&img);
    let data = tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 1 0 512k", p(&img)],
    );
    assert!(!data.contains("Pattern verification failed"), "{data}");
    // A truncated image is an error, not a crash.
    std::fs::write(&img, &bytes[..100]).unwrap();
    let out = hv(&["disk", "info", p(&img)]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("invalid qcow2 image"), "{}", out.stderr);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What a 64 KiB chunk of the crash-test disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Zero,
    Base(usize),
    Source(usize),
}

const CHUNK: usize = 64 << 10;
const DISK_CHUNKS: usize = 512; // 32 MiB
const SOURCE_CHUNKS: usize = 64;
const RUNS_PER_IMAGE: usize = 15;

/// The guest's i-th write in run `r`: source chunk, destination chunk.
fn guest_write(r: usize, i: usize) -> (usize, usize) {
    ((i * 7 + r) % SOURCE_CHUNKS, (i * 13 + r * 29) % DISK_CHUNKS)
}

/// Granularity of the comparison: a write cut short by the kill (or split
/// by the guest) may have reached only some pages of its chunk.
const PAGE: usize = 4096;

/// Which of `allowed` the page at `at` (a disk offset) holds.
fn page_matches(
    page: &[u8],
    at: usize,
    allowed: &[Chunk],
    source: &[u8],
    base: Option<&[u8]>,
) -> Option<Chunk> {
    let in_chunk = at % CHUNK;
    allowed.iter().copied().find(|c| match *c {
        Chunk::Zero => page.iter().all(|&b| b == 0),
        Chunk::Base(_) => base.is_some_and(|b| page == &b[at..at + PAGE]),
        Chunk::Source(s) => page == &source[s * CHUNK + in_chunk..s * CHUNK + in_chunk + PAGE],
    })
}

fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Boots the guest on `image` once, to where its writer script waits for a
/// run number, and snapshots it there (the snapshot freezes `image`).
/// Returns the snapshot directory.
fn writer_snapshot(dir: &Path, image: &Path, source: &Path) -> PathBuf {
    let script = format!(
        "echo WAITING-FOR-RUN; read r; \
         i=0; while [ $i -lt 2000 ]; do s=$(( (i*7+r) % {SOURCE_CHUNKS} )); d=$(( (i*13+r*29) % {DISK_CHUNKS} )); \
         dd if=/dev/vdb of=/dev/vda bs={CHUNK} count=1 skip=$s seek=$d conv=fsync 2>/dev/null && echo W-$i-DONE; \
         i=$((i+1)); done"
    );
    let api = dir.join("api.sock");
    let disk = format!("path={}", image.display());
    let src = format!("path={},readonly=on", source.display());
    let append = format!("hostvisor.run={}", base64(script.as_bytes()));
    let mut child = KillOnDrop(
        Command::new(BIN)
            .args(["run", "--disk", &disk, "--disk", &src, "--append", &append])
            .arg("--api-socket")
            .arg(&api)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = child.0.stdout.take().unwrap();
    let seen = read_until(&mut stdout, BOOT, |s| contains(s, b"WAITING-FOR-RUN"));
    assert!(
        contains(&seen, b"WAITING-FOR-RUN"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    let snap = dir.join("writer-snapshot");
    let client = api::Client::new(&api);
    let body = serde_json::json!({"dir": snap, "overlays": [dir.join("writer-top.qcow2")]});
    let r = client
        .request("PUT", "/vm/snapshot", &body.to_string())
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.error_message());
    let _ = client.request("PUT", "/vm/kill", "");
    drop(child);
    snap
}

/// Resumes the writer snapshot of `image` `RUNS_PER_IMAGE` times (each on
/// a new overlay of `image`, telling the guest its run number), SIGKILLs
/// the VMM at a random moment while the guest writes and flushes, and
/// after each kill checks with qemu-img that the overlay has no corruption
/// and that every write the guest reported flushed is there. (One boot for
/// all the runs: each resumes where the guest waits for its number.)
fn crash_loop(dir: &Path, image: &Path, source: &Path, base: Option<&[u8]>, seed: u64) -> usize {
    let source_bytes = std::fs::read(source).unwrap();
    let snap = writer_snapshot(dir, image, source);
    let image_dir = image.parent().unwrap();
    // What each page of the frozen image holds.
    let pages = DISK_CHUNKS * CHUNK / PAGE;
    let initial: Vec<Chunk> = (0..pages)
        .map(|pg| {
            if base.is_some() {
                Chunk::Base(pg * PAGE / CHUNK)
            } else {
                Chunk::Zero
            }
        })
        .collect();
    let mut rng = seed;
    let mut kills = 0;
    for r in 0..RUNS_PER_IMAGE {
        let mut state = initial.clone();
        let overlay = dir.join(format!("run-{r}.qcow2"));
        let image = overlay.as_path();
        let mut child = KillOnDrop(
            Command::new(BIN)
                .args(["run", "--restore", p(&snap), "--disk-overlay", p(image)])
                // The image under the snapshot's overlays is outside the
                // snapshot's directory and the one holding it: allowed by
                // name, as a user would (docs/security.md).
                .args(["--allow-backing", p(image_dir)])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        {
            use std::io::Write;
            let mut stdin = child.0.stdin.take().unwrap();
            stdin.write_all(format!("{r}\n").as_bytes()).unwrap();
        }
        let mut stdout = child.0.stdout.take().unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Kill somewhere between the first acknowledged write and ~4 s later.
        let delay = Duration::from_millis(rng % 4000);
        let mut seen = read_until(&mut stdout, BOOT, |s| contains(s, b"-DONE"));
        assert!(
            contains(&seen, b"W-0-DONE"),
            "run {r}: {}",
            String::from_utf8_lossy(&seen)
        );
        let start = Instant::now();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        while start.elapsed() < delay {
            if let Ok(bytes) = rx.recv_timeout(Duration::from_millis(20)) {
                seen.extend_from_slice(&bytes);
            }
        }
        drop(child); // SIGKILL, mid-write
        while let Ok(bytes) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.extend_from_slice(&bytes);
        }
        drop(rx);
        let _ = reader.join();
        kills += 1;
        // The writes the guest reported done before the kill.
        let text = String::from_utf8_lossy(&seen);
        let acked = text
            .split("W-")
            .skip(1)
            .filter_map(|t| t.split("-DONE").next()?.parse::<usize>().ok())
            .max()
            .unwrap();
        // qemu-img: no corruption (leaks are allowed after a kill).
        let check = Command::new("qemu-img")
            .args(["check", p(image)])
            .output()
            .unwrap();
        assert!(
            matches!(check.status.code(), Some(0 | 3)),
            "run {r}: qemu-img check after the kill:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        // Every acknowledged write is there, unless a later write (perhaps
        // unacknowledged) to the same chunk replaced it.
        let mut expect: HashMap<usize, Vec<Chunk>> = HashMap::new();
        for i in 0..=acked {
            let (s, d) = guest_write(r, i);
            expect.insert(d, vec![Chunk::Source(s)]);
        }
        let mut later: HashMap<usize, Vec<Chunk>> = HashMap::new();
        for i in acked + 1..2000 {
            let (s, d) = guest_write(r, i);
            later.entry(d).or_default().push(Chunk::Source(s));
        }
        let raw = dir.join("readback.raw");
        tool("qemu-img", &["convert", "-O", "raw", p(image), p(&raw)]);
        let contents = std::fs::read(&raw).unwrap();
        std::fs::remove_file(&raw).unwrap();
        for (pg, page_state) in state.iter_mut().enumerate() {
            let at = pg * PAGE;
            let d = at / CHUNK;
            let mut allowed = expect.get(&d).cloned().unwrap_or_else(|| vec![*page_state]);
            allowed.extend(later.get(&d).into_iter().flatten());
            let found = page_matches(&contents[at..at + PAGE], at, &allowed, &source_bytes, base);
            let Some(found) = found else {
                panic!(
                    "run {r} (acked up to write {acked}): page {pg} of chunk {d} holds none of {allowed:?}"
                );
            };
            *page_state = found;
        }
        std::fs::remove_file(&overlay).unwrap();
    }
    kills
}

#[test]
fn qcow2_survives_sigkills_during_guest_writes() {
    if !kvm_usable() || default_guest().is_none() || !qemu_img_usable() {
        return;
    }
    let dir = temp_dir("qcow2crash");
    let source = dir.join("source.raw");
    std::fs::write(&source, noise(SOURCE_CHUNKS * CHUNK, 0x5eed)).unwrap();
    // Two images, each killed RUNS_PER_IMAGE times, in parallel: a plain
    // qcow2 with 64 KiB clusters, and a 4 KiB-cluster overlay of a raw base
    // (16 cluster allocations per guest write, copy-on-write from the base).
    let plain = dir.join("plain.qcow2");
    ok(&["disk", "create", p(&plain), "--size", "32M"]);
    let base_path = dir.join("base.raw");
    let base = noise(DISK_CHUNKS * CHUNK, 0xba5e);
    std::fs::write(&base_path, &base).unwrap();
    let overlay = dir.join("overlay.qcow2");
    ok(&[
        "disk",
        "create",
        p(&overlay),
        "-b",
        "base.raw",
        "--cluster-size",
        "4K",
    ]);
    let jobs: Vec<(PathBuf, Option<Vec<u8>>, u64)> = vec![
        (plain, None, 0x1234_5678),
        (overlay, Some(base), 0x8765_4321),
    ];
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|(image, base, seed)| {
            let dir = dir.clone();
            let source = source.clone();
            std::thread::spawn(move || {
                let sub = dir.join(image.file_stem().unwrap());
                std::fs::create_dir_all(&sub).unwrap();
                crash_loop(&sub, &image, &source, base.as_deref(), seed)
            })
        })
        .collect();
    let kills: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(kills >= 30, "{kills} kills");
    std::fs::remove_dir_all(&dir).unwrap();
}
