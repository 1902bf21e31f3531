//! Snapshots of a running VM end to end, on the default guest (2 vCPUs)
//! booted once:
//! `hostvisor run --api-socket` saves it with `PUT /vm/snapshot` while the
//! guest keeps a file in tmpfs, a counter in a running process, disk
//! writes and the agent busy; the first process is killed; `hostvisor run
//! --restore` resumes it (twice, from the same snapshot, in new
//! processes) and everything is as it was at the snapshot: the file, the
//! counter, the uptime clock, the disk's contents (SHA-256), and the agent
//! and the network work. Bad snapshots are refused with one-line errors.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::client::{Client, ExecIo, Transport};
use agent::ExecRequest;
use common::*;

/// How long a boot of the default guest may take here (nested PVM, CI
/// under load).
const BOOT: Duration = Duration::from_secs(240);

/// Runs `script` in the guest with `sh -c`; its stdout (panics on a
/// failure, with stderr).
fn sh(client: &Client, script: &str) -> String {
    eprintln!("guest$ {script}");
    let mut out = Vec::new();
    let mut err = Vec::new();
    let status = client
        .exec(
            &ExecRequest {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                env: vec![],
                cwd: None,
                stdin: false,
                timeout_ms: Some(60_000),
            },
            ExecIo {
                stdin: None,
                stdout: &mut out,
                stderr: &mut err,
            },
        )
        .unwrap();
    assert_eq!(
        status.code,
        Some(0),
        "{script}: {status:?} {}",
        String::from_utf8_lossy(&err)
    );
    String::from_utf8(out).unwrap()
}

/// A `hostvisor run` VM with an API socket and vsock.
struct RunVm {
    child: Child,
    api: PathBuf,
    client: Client,
    console: PathBuf,
}

impl RunVm {
    fn spawn(dir: &Path, tag: &str, args: &[&str]) -> RunVm {
        let api = dir.join(format!("api-{tag}.sock"));
        let console = dir.join(format!("console-{tag}.log"));
        let child = Command::new(BIN)
            .env("HOSTVISOR_LOG", "warn,hostvisor::vmproc=info")
            .args(["run", "--serial"])
            .arg(format!("file:{}", console.display()))
            .arg("--api-socket")
            .arg(&api)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        RunVm {
            child,
            api,
            client: Client::new(Transport::Muxer(dir.join("v.sock"))),
            console,
        }
    }

    fn request(&self, method: &str, path: &str, body: &str) -> api::Response {
        let start = Instant::now();
        loop {
            match api::Client::new(&self.api).request(method, path, body) {
                Ok(r) => return r,
                Err(e) if start.elapsed() < Duration::from_secs(20) => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("{method} {path}: {e}"),
            }
        }
    }

    fn snapshot(&self, dir: &Path, overlay: &Path) {
        let body = serde_json::json!({"dir": dir, "overlays": [overlay]}).to_string();
        let r = self.request("PUT", "/vm/snapshot", &body);
        assert_eq!(r.status, 204, "{}", r.error_message());
    }

    /// Kills the VM through the API and waits for the process; its log
    /// (stderr).
    fn kill(mut self) -> String {
        let r = self.request("PUT", "/vm/kill", "");
        assert_eq!(r.status, 204, "{}", r.error_message());
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < Duration::from_secs(20), "kill took long");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut log = String::new();
        use std::io::Read;
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut log);
        log
    }
}

impl Drop for RunVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the test checks in the guest.
#[derive(Debug, PartialEq)]
struct GuestState {
    note: String,
    count: u64,
    disk: String,
}

/// Pokes the guest's counter process once and reads what it counted, the
/// note in tmpfs and the disk's hash.
fn look(client: &Client) -> GuestState {
    let out = sh(
        client,
        "echo > /tmp/poke; sleep 0.2; cat /tmp/note; cat /tmp/count; \
         sha256sum /dev/vda | cut -d' ' -f1",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    GuestState {
        note: lines[0].to_string(),
        count: lines[1].parse().unwrap(),
        disk: lines[2].to_string(),
    }
}

fn uptime(client: &Client) -> f64 {
    sh(client, "cut -d' ' -f1 /proc/uptime")
        .trim()
        .parse()
        .unwrap()
}

/// SHA-256 of a disk image's guest-visible contents (through its chain).
fn image_hash(dir: &Path, image: &Path) -> String {
    let raw = dir.join("flat.raw");
    let _ = std::fs::remove_file(&raw);
    let out = hostvisor(
        &[
            "disk",
            "convert",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
            "--format",
            "raw",
        ],
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let hash = tool("sha256sum", &[raw.to_str().unwrap()]);
    std::fs::remove_file(&raw).unwrap();
    hash.split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_running_guest_is_saved_and_resumed_in_new_processes() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    let dir = temp_dir("restore");
    let disk = dir.join("disk.qcow2");
    create_disk(&disk, "4M");
    let (port, _) = http_server(b"served by the host\n");
    // A download in flight across the snapshot (1 MiB: seconds here).
    let big: &'static [u8] = Box::leak(
        (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>()
            .into_boxed_slice(),
    );
    let big_hash = {
        let path = dir.join("big");
        std::fs::write(&path, big).unwrap();
        let h = tool("sha256sum", &[path.to_str().unwrap()]);
        h.split_whitespace().next().unwrap().to_string()
    };
    let (big_port, _) = http_server(big);
    let vsock = format!("cid=21,socket={}", dir.join("v.sock").display());
    let first = RunVm::spawn(
        &dir,
        "first",
        &[
            "--cpus",
            "2",
            "--vsock",
            &vsock,
            "--rng",
            "--net",
            "nat",
            "--disk",
            &format!("path={}", disk.display()),
        ],
    );
    first.client.wait_ready(BOOT).unwrap();
    // A note in tmpfs, a counter process that counts pokes (it holds the
    // FIFO open for reading and writing, so pokes neither block nor race
    // its reopening), disk data.
    sh(
        &first.client,
        "echo kept > /tmp/note; mkfifo /tmp/poke; \
         (exec 3<>/tmp/poke; n=0; while read x <&3; do n=$((n+1)); echo $n > /tmp/count; done) \
           </dev/null >/dev/null 2>&1 & \
         dd if=/dev/urandom of=/dev/vda bs=4k count=64 conv=fsync 2>/dev/null",
    );
    for _ in 0..4 {
        sh(&first.client, "echo > /tmp/poke");
    }
    let before = look(&first.client);
    assert_eq!((before.note.as_str(), before.count), ("kept", 5));
    let up_before = uptime(&first.client);

    let snap = dir.join("snap");
    let top = dir.join("after-snap.qcow2");
    let taken = Instant::now();
    sh(
        &first.client,
        &format!(
            "(wget -q -O /tmp/big http://10.0.2.2:{big_port}/ && touch /tmp/got) \
               </dev/null >/dev/null 2>&1 &"
        ),
    );
    first.snapshot(&snap, &top);
    // The VM runs on, on the new overlay; the guest saw a pause only.
    assert!(top.exists());
    let after = look(&first.client);
    // The download in flight went on to the end, intact.
    let got = sh(
        &first.client,
        "i=0; while [ ! -e /tmp/got ] && [ $i -lt 120 ]; do sleep 0.5; i=$((i+1)); done; \
         sha256sum /tmp/big | cut -d' ' -f1",
    );
    assert_eq!(got.trim(), big_hash, "the download across the snapshot");
    assert_eq!((after.count, &after.disk), (6, &before.disk));
    sh(
        &first.client,
        "echo changed > /tmp/note; \
         dd if=/dev/urandom of=/dev/vda bs=4k count=64 conv=fsync 2>/dev/null; \
         for i in 1 2 3 4 5 6 7 8 9 10; do echo > /tmp/poke; done; sleep 3",
    );
    let changed = look(&first.client);
    assert_eq!((changed.note.as_str(), changed.count), ("changed", 17));
    assert_ne!(changed.disk, before.disk);
    // The image the snapshot names did not change.
    assert_eq!(image_hash(&dir, &disk), before.disk);
    // A paused VM changes nothing in guest RAM, even with a host program
    // connecting to the agent meanwhile: two snapshots of it, with that
    // connection in between, hold the same memory; once resumed, the
    // connection is served.
    let r = first.request("PUT", "/vm/pause", "");
    assert_eq!(r.status, 204, "{}", r.error_message());
    let (p1, p2) = (dir.join("paused-1"), dir.join("paused-2"));
    first.snapshot(&p1, &dir.join("paused-1.qcow2"));
    let waiting =
        Client::new(Transport::Muxer(dir.join("v.sock"))).patient(Duration::from_secs(60));
    let pinger = std::thread::spawn(move || waiting.ping());
    std::thread::sleep(Duration::from_millis(500));
    first.snapshot(&p2, &dir.join("paused-2.qcow2"));
    assert!(
        std::fs::read(p1.join("memory")).unwrap() == std::fs::read(p2.join("memory")).unwrap(),
        "guest RAM changed while the VM was paused"
    );
    let r = first.request("PUT", "/vm/resume", "");
    assert_eq!(r.status, 204, "{}", r.error_message());
    pinger.join().unwrap().unwrap();
    // A snapshot whose disk cannot move onto its overlay fails whole: no
    // state file is left to restore, and the VM runs on, on its disk.
    let failed = dir.join("failed");
    let body = serde_json::json!({"dir": failed, "overlays": [dir.join("no/such/dir.qcow2")]});
    let r = first.request("PUT", "/vm/snapshot", &body.to_string());
    assert_eq!(r.status, 500, "{}", r.error_message());
    assert!(
        r.error_message().contains("overlay"),
        "{}",
        r.error_message()
    );
    assert!(!failed.join("state").exists() && !failed.join("memory").exists());
    assert_eq!(look(&first.client).note, "changed");
    std::fs::remove_dir_all(&p1).unwrap();
    std::fs::remove_dir_all(&p2).unwrap();
    assert!(!first.console.to_string_lossy().is_empty());
    first.kill();

    // Twice from the same snapshot, each in a new process: the same state.
    for round in 1..=2 {
        let overlay = dir.join(format!("restored-{round}.qcow2"));
        let started = Instant::now();
        let vm = RunVm::spawn(
            &dir,
            &format!("restored-{round}"),
            &[
                "--restore",
                snap.to_str().unwrap(),
                "--disk-overlay",
                overlay.to_str().unwrap(),
            ],
        );
        vm.client.wait_ready(Duration::from_secs(60)).unwrap();
        let up = uptime(&vm.client);
        let now = look(&vm.client);
        assert_eq!(
            now,
            GuestState {
                note: "kept".into(),
                count: 6,
                disk: before.disk.clone()
            },
            "round {round}"
        );
        // The uptime clock continues from the snapshot: it did not count
        // the time since (the first VM ran on for several seconds).
        assert!(
            taken.elapsed() > Duration::from_secs(4),
            "the test needs a gap"
        );
        assert!(
            up >= up_before && up <= up_before + started.elapsed().as_secs_f64() + 5.0,
            "uptime {up} s after restore, {up_before} s before the snapshot"
        );
        // Both vCPUs came back.
        assert_eq!(sh(&vm.client, "nproc"), "2\n", "round {round}");
        // The network and the disk work on.
        let page = sh(&vm.client, &format!("wget -q -O - http://10.0.2.2:{port}/"));
        assert_eq!(page, "served by the host\n");
        sh(
            &vm.client,
            "dd if=/dev/zero of=/dev/vda bs=4k count=16 conv=fsync 2>/dev/null",
        );
        let log = vm.kill();
        // The guest was told it was restored: fresh randomness for its
        // RNG (two resumes must not share a random stream), its clock.
        assert!(
            log.contains("the restored guest was reseeded and its clock set"),
            "{log}"
        );
        assert_eq!(
            image_hash(&dir, &disk),
            before.disk,
            "the snapshot's image stays as it was"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A one-file HTTP server on the host's loopback (the guest reaches it as
/// 10.0.2.2); its port, and the number of requests served.
fn http_server(body: &'static [u8]) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(body);
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    (port, hits)
}

/// Bad snapshots are refused before anything runs, with one line saying
/// why: not a snapshot, truncated, bit-flipped, another format version, a
/// memory file too short.
#[test]
fn bad_snapshots_are_refused_with_clear_errors() {
    let dir = temp_dir("bad-snapshots");
    let restore = |snap: &Path| {
        hostvisor(
            &["run", "--restore", snap.to_str().unwrap()],
            &[],
            Duration::from_secs(30),
        )
    };
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_one_line_error(&restore(&empty), 1, "not a snapshot directory");
    assert_one_line_error(
        &restore(&dir.join("missing")),
        1,
        "not a snapshot directory",
    );

    // A well-formed state file to damage: written by the format's own
    // encoder around a real-looking document is not needed — any damage
    // must be caught by the header and checksum before the document.
    let state = snapshot_bytes();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", state[..state.len() / 2].to_vec(), "truncated"),
        (
            "flipped",
            {
                let mut b = state.clone();
                let at = b.len() - 10;
                b[at] ^= 0x20;
                b
            },
            "checksum",
        ),
        (
            "version",
            {
                let mut b = state.clone();
                b[8] = 99;
                b
            },
            "format version is 99",
        ),
        ("text", b"hello, I am not a snapshot".to_vec(), "bad magic"),
    ];
    for (name, bytes, needle) in cases {
        let snap = dir.join(name);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("state"), bytes).unwrap();
        assert_one_line_error(&restore(&snap), 1, needle);
    }
    // Options that do not go with --restore.
    let out = hostvisor(
        &["run", "--restore", empty.to_str().unwrap(), "--cpus", "2"],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A state file in the snapshot format (its payload need not be a VM's:
/// the damage is found before it is read).
fn snapshot_bytes() -> Vec<u8> {
    let payload = br#"{"writer":"test"}"#;
    let mut out = b"HVSNAP\r\n".to_vec();
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32(payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// CRC-32 (IEEE), bit by bit: the test's own, independent of the crate's.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
