//! `hostvisor snapshot` and `hostvisor clone` on stopped VMs, end to end
//! through the CLI on real qcow2 files (no guest boots): a tree three
//! levels deep with branches, every node restoring to its own contents
//! (SHA-256 of the guest-visible disk) before and after inner nodes are
//! deleted, images passing `qemu-img check` and `hostvisor disk check`;
//! full and linked clones; bad input. The "running" cases use a stand-in
//! VM process (the VM's lock held, a fake API on its socket).
#![allow(clippy::unwrap_used)]

use super::common;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{hostvisor, Output};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

/// A store of its own (XDG_DATA_HOME) in a temporary directory.
struct Env {
    dir: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Env {
        let dir = std::env::temp_dir().join(format!("hv-snap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Env { dir }
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn run(&self, args: &[&str]) -> Output {
        let data = self.data();
        hostvisor(
            args,
            &[("XDG_DATA_HOME", data.as_str())],
            Duration::from_secs(120),
        )
    }

    /// Runs a command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.code, 0,
            "hostvisor {args:?} failed:\n{}{}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// Runs a command that must fail with status 1; its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(
            out.code, 1,
            "hostvisor {args:?} should have failed:\n{}{}",
            out.stdout, out.stderr
        );
        out.stderr
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.dir.join("data/hostvisor/vms").join(name)
    }

    fn config(&self, name: &str) -> toml::Value {
        let text = std::fs::read_to_string(self.vm_dir(name).join("config.toml")).unwrap();
        toml::from_str(&text).unwrap()
    }

    /// The image disk 0 of VM `name` writes to.
    fn top(&self, name: &str) -> PathBuf {
        PathBuf::from(self.config(name)["disks"][0]["path"].as_str().unwrap())
    }

    /// A VM with one 4 MiB qcow2 disk (not booted: /bin/true as kernel).
    fn create_vm(&self, name: &str) -> PathBuf {
        let base = self.dir.join(format!("{name}-base.qcow2"));
        self.ok(&["disk", "create", base.to_str().unwrap(), "--size", "4M"]);
        let disk = format!("path={}", base.display());
        self.ok(&["create", name, "--kernel", "/bin/true", "--disk", &disk]);
        base
    }

    fn list(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["snapshot", "list", name, "--json"])).unwrap()
    }

    /// Snapshot name -> id.
    fn ids(&self, name: &str) -> BTreeMap<String, String> {
        self.list(name)["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_string(),
                    s["id"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Opens an image. Tests run in parallel and spawn processes: a child
/// forked by another test thread holds a copy of this process's open
/// image (and its lock) until it execs, so a lock conflict is retried.
fn open(image: &Path, read_only: bool) -> Arc<dyn block::DiskImage> {
    // The test reads the chains hostvisor wrote in its temporary stores,
    // whose bottom layers (the tests' own base disks) sit beside them:
    // allowed here as a user would with --allow-backing.
    block::backing::allow(&std::env::temp_dir()).unwrap();
    let opts = block::OpenOptions {
        read_only,
        ..Default::default()
    };
    let start = std::time::Instant::now();
    loop {
        match block::open_image(image, opts) {
            Err(block::BlockError::Locked { .. }) if start.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other.unwrap(),
        }
    }
}

/// Writes `byte` over 64 KiB at `offset` of the image (through its chain).
fn write(image: &Path, offset: u64, byte: u8) {
    let disk = open(image, false);
    disk.write_at(&[byte; 65536], offset).unwrap();
    disk.flush().unwrap();
}

/// SHA-256 of the guest-visible contents of an image and its chain.
fn digest(image: &Path) -> String {
    let disk = open(image, true);
    let mut buf = vec![0u8; disk.size() as usize];
    disk.read_at(&mut buf, 0).unwrap();
    Sha256::digest(&buf)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
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
        eprintln!("SKIPPED: qemu-img checks: qemu-img is not installed (qemu-utils)");
    }
    ok
}

/// Every image of the VM passes `hostvisor disk check` and, when
/// installed, `qemu-img check` (and qemu-img reads the same contents).
fn check_images(env: &Env, name: &str, qemu: bool) {
    let disks = env.vm_dir(name).join("disks");
    for e in std::fs::read_dir(&disks).unwrap() {
        let p = e.unwrap().path();
        let ps = p.to_str().unwrap();
        env.ok(&["disk", "check", ps]);
        if qemu {
            let out = Command::new("qemu-img")
                .args(["check", "-U", ps])
                .output()
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "qemu-img check {ps}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    if qemu {
        // qemu-img's view of the current disk equals ours.
        let raw = env.dir.join("flat.raw");
        let top = env.top(name);
        let out = Command::new("qemu-img")
            .args(["convert", "-U", "-O", "raw"])
            .arg(&top)
            .arg(&raw)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let bytes = std::fs::read(&raw).unwrap();
        let q: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(q, digest(&top), "qemu-img reads other contents");
        std::fs::remove_file(&raw).unwrap();
    }
}

/// Restores each snapshot and checks the disk reads its own contents.
fn assert_all_restore(env: &Env, name: &str, expect: &BTreeMap<&str, String>, qemu: bool) {
    for (snap, hash) in expect {
        env.ok(&["snapshot", "restore", name, snap]);
        assert_eq!(
            &digest(&env.top(name)),
            hash,
            "snapshot {snap} restored other contents"
        );
        check_images(env, name, qemu);
    }
}

#[test]
fn a_tree_with_branches_restores_every_node_after_inner_deletes() {
    let env = Env::new("tree");
    let qemu = have_qemu_img();
    let base = env.create_vm("vm");
    write(&base, 0, 0xb0);
    let mut expect: BTreeMap<&str, String> = BTreeMap::new();
    // Each node overwrites cluster 0 and one cluster of its own, so every
    // layer holds data the others read through it.
    let mut node = |env: &Env, snap: &'static str, k: u64, byte: u8| {
        let top = env.top("vm");
        write(&top, 0, byte);
        write(&top, k * MIB / 4, byte);
        expect.insert(snap, digest(&top));
        env.ok(&["snapshot", "take", "vm", snap, "--description", snap]);
    };
    node(&env, "s1", 1, 0x11); // root (freezes the base)
    node(&env, "s2", 2, 0x22); // s1 -> s2
    node(&env, "s3", 3, 0x33); // s1 -> s2 -> s3 (three levels)
    env.ok(&["snapshot", "restore", "vm", "s1"]);
    node(&env, "s4", 4, 0x44); // a branch off s1
    env.ok(&["snapshot", "restore", "vm", "s2"]);
    node(&env, "s5", 5, 0x55); // a branch off s2 (s2 has s3 and s5)
                               // The current state has changes of its own, discarded by a restore.
    let top = env.top("vm");
    write(&top, 6 * MIB / 4, 0x66);
    let expect_cl = expect.clone();

    let listing = env.list("vm");
    let ids = env.ids("vm");
    let parent = |s: &str| {
        listing["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == s)
            .unwrap()["parent"]
            .as_str()
            .map(str::to_string)
    };
    assert_eq!(parent("s1"), None);
    assert_eq!(parent("s2").as_deref(), Some(ids["s1"].as_str()));
    assert_eq!(parent("s3").as_deref(), Some(ids["s2"].as_str()));
    assert_eq!(parent("s4").as_deref(), Some(ids["s1"].as_str()));
    assert_eq!(parent("s5").as_deref(), Some(ids["s2"].as_str()));
    assert_eq!(listing["current"], ids["s5"].as_str());
    let human = env.ok(&["snapshot", "list", "vm"]);
    assert!(
        human.contains("├── s2") || human.contains("└── s2"),
        "{human}"
    );
    assert!(human.contains("* current state"), "{human}");

    assert_all_restore(&env, "vm", &expect_cl, qemu);

    // Delete an inner node with two children, then the root.
    env.ok(&["snapshot", "delete", "vm", "s2"]);
    let mut left = expect_cl.clone();
    left.remove("s2");
    let ids2 = env.ids("vm");
    assert!(!ids2.contains_key("s2"));
    let listing = env.list("vm");
    for s in ["s3", "s5"] {
        let p = listing["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == s)
            .unwrap()["parent"]
            .clone();
        assert_eq!(p, ids["s1"].as_str(), "{s} moves up to s1");
    }
    assert_all_restore(&env, "vm", &left, qemu);

    env.ok(&["snapshot", "restore", "vm", "s3"]);
    env.ok(&["snapshot", "delete", "vm", "s1"]);
    left.remove("s1");
    assert_all_restore(&env, "vm", &left, qemu);
    // Deleting the current snapshot: the current state keeps its contents.
    env.ok(&["snapshot", "restore", "vm", "s4"]);
    let top = env.top("vm");
    write(&top, 7 * MIB / 4, 0x77);
    let now = digest(&top);
    env.ok(&["snapshot", "delete", "vm", "s4"]);
    assert_eq!(digest(&env.top("vm")), now);
    assert_eq!(env.list("vm")["current"], serde_json::Value::Null);
    left.remove("s4");
    assert_all_restore(&env, "vm", &left, qemu);
    // The base the VM was created with is never removed.
    assert!(base.exists());
    // No files leak: the two remaining snapshots' layers and the top.
    let files = std::fs::read_dir(env.vm_dir("vm").join("disks"))
        .unwrap()
        .count();
    assert_eq!(files, 3, "disks/ holds only live layers");
}

/// The MAC of a definition's first NIC (`nets = ["nat,mac=..."]`).
fn mac_of(config: &toml::Value) -> String {
    let nic = config["nets"][0].as_str().unwrap();
    nic.split(',')
        .find_map(|kv| kv.strip_prefix("mac="))
        .unwrap()
        .to_string()
}

#[test]
fn clones_get_their_own_disks_and_identity() {
    let env = Env::new("clone");
    let base = env.create_vm("src");
    write(&base, 0, 0x01);
    env.ok(&["snapshot", "take", "src", "one"]);
    write(&env.top("src"), MIB, 0x02);
    let one_two = digest(&env.top("src"));
    env.ok(&["snapshot", "take", "src", "two"]);
    write(&env.top("src"), 2 * MIB, 0x03);
    let current = digest(&env.top("src"));

    // What a killed clone left (its process gone) is cleared away.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let stale = env
        .dir
        .join("data/hostvisor/vms")
        .join(format!(".clone-full-{}", gone.id()));
    std::fs::create_dir_all(stale.join("disks")).unwrap();
    // Full clone of a snapshot: one flat image with that snapshot's data.
    env.ok(&["clone", "src", "full", "--snapshot", "two"]);
    assert!(!stale.exists(), "a stale clone stage is left");
    let full = env.top("full");
    assert!(full.starts_with(env.vm_dir("full")));
    assert_eq!(digest(&full), one_two);
    assert_eq!(
        block::tools::backing_of(&full).unwrap(),
        None,
        "a full clone stands alone"
    );
    // Linked clone of a snapshot: an overlay on its frozen layer.
    env.ok(&["clone", "src", "linked", "--snapshot", "two", "--linked"]);
    let linked = env.top("linked");
    assert_eq!(digest(&linked), one_two);
    assert!(block::tools::backing_of(&linked).unwrap().is_some());
    // Full clone of a stopped VM's current state.
    env.ok(&["clone", "src", "now"]);
    assert_eq!(digest(&env.top("now")), current);
    // A linked clone without --snapshot takes one.
    env.ok(&["clone", "src", "quick", "--linked"]);
    assert_eq!(digest(&env.top("quick")), current);
    assert!(env.ids("src").contains_key("base of quick"));

    // The source reads as before (the last clone froze its disks in a
    // snapshot, which changes no contents).
    assert_eq!(digest(&env.top("src")), current);

    // Each clone has its own identity.
    let ident = |name: &str| {
        let c = env.config(name);
        (
            mac_of(&c),
            c["vsock"]["cid"].as_integer().unwrap(),
            c["append"].as_str().unwrap_or("").to_string(),
        )
    };
    let src_c = env.config("src");
    let src_mac = mac_of(&src_c);
    let src_cid = src_c["vsock"]["cid"].as_integer().unwrap();
    let mut macs = vec![src_mac];
    let mut cids = vec![src_cid];
    for name in ["full", "linked", "now", "quick"] {
        let (mac, cid, append) = ident(name);
        assert!(
            append.contains(&format!("hostvisor.hostname={name}")),
            "{append}"
        );
        assert!(append.contains("hostvisor.machine_id="), "{append}");
        assert!(!macs.contains(&mac), "{name} shares a MAC");
        assert!(!cids.contains(&cid), "{name} shares a CID");
        macs.push(mac);
        cids.push(cid);
    }
    // Writing to a clone leaves the source and the other clones alone.
    write(&linked, 0, 0xee);
    assert_eq!(digest(&full), one_two);
    env.ok(&["snapshot", "restore", "src", "two"]);
    assert_eq!(digest(&env.top("src")), one_two);

    // A snapshot a linked clone stands on cannot be deleted.
    // ("quick" stands on it too, through the snapshot taken for it.)
    let err = env.fails(&["snapshot", "delete", "src", "two"]);
    assert!(err.contains("the linked clone"), "{err}");
    // So can the VM itself.
    let err = env.fails(&["delete", "src"]);
    assert!(err.contains("linked clones"), "{err}");
    assert!(err.contains("linked") && err.contains("quick"), "{err}");
    env.ok(&["delete", "linked"]);
    env.ok(&["delete", "quick"]);
    // A second clone of that name gets a snapshot of its own.
    env.ok(&["clone", "src", "quick", "--linked"]);
    assert!(env.ids("src").contains_key("base of quick (2)"));
    env.ok(&["delete", "quick"]);
    env.ok(&["snapshot", "delete", "src", "two"]);
    assert_eq!(digest(&env.top("src")), one_two);

    // Bad input.
    let err = env.fails(&["clone", "src", "full"]);
    assert!(err.contains("already exists"), "{err}");
    let err = env.fails(&["clone", "nosuch", "x"]);
    assert!(err.contains("no VM named nosuch"), "{err}");
    let err = env.fails(&["clone", "src", "x", "--snapshot", "nope"]);
    assert!(err.contains("no snapshot named `nope`"), "{err}");
    assert!(!env.vm_dir("x").exists());
}

#[test]
fn bad_input_is_refused_clearly() {
    let env = Env::new("bad");
    env.create_vm("vm");
    let err = env.fails(&["snapshot", "take", "ghost"]);
    assert!(err.contains("no VM named ghost"), "{err}");
    env.ok(&["snapshot", "take", "vm", "a"]);
    let err = env.fails(&["snapshot", "take", "vm", "a"]);
    assert!(err.contains("already has a snapshot named `a`"), "{err}");
    let err = env.fails(&["snapshot", "restore", "vm", "b"]);
    assert!(err.contains("no snapshot named `b`"), "{err}");
    let err = env.fails(&["snapshot", "delete", "vm", "b"]);
    assert!(err.contains("no snapshot named `b`"), "{err}");
    // Default names count up.
    env.ok(&["snapshot", "take", "vm"]);
    env.ok(&["snapshot", "take", "vm"]);
    let ids = env.ids("vm");
    assert!(
        ids.contains_key("snap-1") && ids.contains_key("snap-2"),
        "{ids:?}"
    );
    // One snapshot operation at a time.
    {
        let lock = std::fs::File::open(env.vm_dir("vm").join("snapshots/lock")).unwrap();
        // SAFETY: flock on a descriptor this test owns.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(locked, 0);
        let err = env.fails(&["snapshot", "take", "vm"]);
        assert!(
            err.contains("another snapshot or clone operation on vm is in progress"),
            "{err}"
        );
    }
    // Edited metadata names files only inside the VM's directory: a
    // removable layer elsewhere is not removed by a delete ...
    let ids = env.ids("vm");
    let meta_path = env
        .vm_dir("vm")
        .join("snapshots")
        .join(&ids["snap-2"])
        .join("meta.json");
    let original = std::fs::read(&meta_path).unwrap();
    let mut meta: serde_json::Value = serde_json::from_slice(&original).unwrap();
    let victim = env.dir.join("victim.qcow2");
    env.ok(&["disk", "create", victim.to_str().unwrap(), "--size", "1M"]);
    meta["disks"][0]["path"] = victim.to_str().unwrap().into();
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    env.ok(&["snapshot", "delete", "vm", "snap-2"]);
    assert!(victim.exists(), "a file outside the VM was removed");
    // ... and an id is never a path.
    let a = env.ids("vm")["a"].clone();
    let a_meta = env
        .vm_dir("vm")
        .join("snapshots")
        .join(&a)
        .join("meta.json");
    let saved = std::fs::read(&a_meta).unwrap();
    let mut meta: serde_json::Value = serde_json::from_slice(&saved).unwrap();
    meta["id"] = "../../elsewhere".into();
    std::fs::write(&a_meta, meta.to_string()).unwrap();
    let err = env.fails(&["snapshot", "list", "vm"]);
    assert!(err.contains("the metadata is damaged"), "{err}");
    std::fs::write(&a_meta, &saved).unwrap();
    // A base changed behind hostvisor's back is noticed.
    let base = env.dir.join("vm-base.qcow2");
    write(&base, 0, 0x99);
    let err = env.fails(&["snapshot", "restore", "vm", "a"]);
    assert!(
        err.contains("was changed after the snapshot was taken"),
        "{err}"
    );
}

/// A raw base disk is the read-only bottom of the first overlay.
#[test]
fn a_raw_base_disk_becomes_the_bottom_layer() {
    let env = Env::new("raw");
    let raw = env.dir.join("base.raw");
    env.ok(&[
        "disk",
        "create",
        raw.to_str().unwrap(),
        "--size",
        "1M",
        "--format",
        "raw",
    ]);
    write(&raw, 0, 0x5a);
    let disk = format!("path={},format=raw", raw.display());
    env.ok(&["create", "vm", "--kernel", "/bin/true", "--disk", &disk]);
    let before = digest(&raw);
    env.ok(&["snapshot", "take", "vm", "r"]);
    write(&env.top("vm"), 0, 0x01);
    assert_eq!(digest(&raw), before, "the raw base is not written");
    env.ok(&["snapshot", "restore", "vm", "r"]);
    assert_eq!(digest(&env.top("vm")), before);
    assert_eq!(
        env.config("vm")["disks"][0]["format"].as_str(),
        Some("qcow2")
    );
}

/// A raw base whose guest wrote a qcow2 header into its first sector stays
/// raw under its overlays: the format comes from the definition, not a
/// probe (which would read the guest's bytes as an image header).
#[test]
fn a_raw_base_that_looks_like_qcow2_stays_raw() {
    let env = Env::new("rawmagic");
    let raw = env.dir.join("base.raw");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..4].copy_from_slice(b"QFI\xfb");
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    bytes[4096] = 0x77;
    std::fs::write(&raw, &bytes).unwrap();
    let want: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let disk = format!("path={},format=raw", raw.display());
    env.ok(&["create", "vm", "--kernel", "/bin/true", "--disk", &disk]);
    env.ok(&["snapshot", "take", "vm", "a"]);
    assert_eq!(digest(&env.top("vm")), want);
    env.ok(&["snapshot", "take", "vm", "b"]);
    env.ok(&["snapshot", "restore", "vm", "a"]);
    assert_eq!(digest(&env.top("vm")), want);
    env.ok(&["snapshot", "delete", "vm", "b"]);
    env.ok(&["clone", "vm", "full", "--snapshot", "a"]);
    assert_eq!(digest(&env.top("full")), want);
    env.ok(&["clone", "vm", "linked", "--snapshot", "a", "--linked"]);
    assert_eq!(digest(&env.top("linked")), want);
}

/// A stand-in VM process: holds the VM's lock and answers its API (GET
/// /vm); it records every other request and refuses it.
#[derive(Default)]
struct FakeVm(std::sync::Mutex<Vec<api::Action>>);

impl api::Backend for FakeVm {
    fn act(&self, action: api::Action) -> Result<serde_json::Value, api::ApiError> {
        if action == api::Action::Info {
            return Ok(serde_json::json!({"state": "running", "pid": 1}));
        }
        if action == api::Action::SnapshotList {
            return Ok(serde_json::json!({"vm": "listed by the VM process", "snapshots": []}));
        }
        self.0.lock().unwrap().push(action);
        Err(api::ApiError::conflict("fake says no"))
    }
    fn console(&self) -> Result<Box<dyn std::io::Read + Send>, api::ApiError> {
        Err(api::ApiError::conflict("fake"))
    }
    fn console_input(&self, _: &[u8]) -> Result<(), api::ApiError> {
        Err(api::ApiError::conflict("fake"))
    }
}

/// While the VM runs, the CLI's take, restore and delete are carried out
/// by the VM's process (asked through its API: one implementation, with
/// the VMM at hand); the CLI changes no file itself, and says why the VM
/// refused. `list` is answered by the VM process too.
#[test]
fn a_running_vms_snapshots_are_changed_by_its_process() {
    let env = Env::new("running");
    env.create_vm("vm");
    env.ok(&["snapshot", "take", "vm", "a"]);
    env.ok(&["snapshot", "take", "vm", "b"]);
    let ids = env.ids("vm");
    let dir = env.vm_dir("vm");
    let lock = std::fs::File::create(dir.join("lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(locked, 0);
    let vm = Arc::new(FakeVm::default());
    let _server = api::serve(&dir.join("api.sock"), vm.clone()).unwrap();
    let before = std::fs::read_to_string(dir.join("config.toml")).unwrap();

    let err = env.fails(&["snapshot", "take", "vm", "live", "--description", "d"]);
    assert!(err.contains("fake says no"), "{err}");
    let err = env.fails(&["snapshot", "delete", "vm", "a"]);
    assert!(err.contains("fake says no"), "{err}");
    let err = env.fails(&["snapshot", "restore", "vm", "b"]);
    assert!(err.contains("fake says no"), "{err}");
    assert_eq!(
        *vm.0.lock().unwrap(),
        [
            api::Action::SnapshotTake {
                name: Some("live".into()),
                description: "d".into()
            },
            api::Action::SnapshotDelete {
                snapshot: "a".into()
            },
            api::Action::SnapshotRestore {
                snapshot: "b".into()
            },
        ]
    );
    assert_eq!(env.list("vm")["vm"], "listed by the VM process");
    drop(_server);
    drop(lock);
    assert_eq!(env.ids("vm"), ids);
    assert_eq!(
        std::fs::read_to_string(dir.join("config.toml")).unwrap(),
        before
    );
}

/// Starts `hostvisor args` and kills it with SIGKILL after `delay`
/// (or lets it finish first).
fn kill_during(env: &Env, args: &[&str], delay: Duration) {
    let mut child = Command::new(common::BIN)
        .args(args)
        .env("XDG_DATA_HOME", env.data())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = child.kill();
    let _ = child.wait();
}

/// How long a command takes when not killed.
fn timed(env: &Env, args: &[&str]) -> Duration {
    let start = std::time::Instant::now();
    env.ok(args);
    start.elapsed()
}

#[test]
fn kill_9_during_take_and_delete_keeps_every_snapshot() {
    let env = Env::new("kill");
    let base = env.create_vm("vm");
    write(&base, 0, 0xb0);
    let mut rng = common::KillRng::new();
    // name -> contents of every snapshot that exists.
    let mut expect: BTreeMap<String, String> = BTreeMap::new();
    let snap = |env: &Env, name: &str, byte: u8, expect: &mut BTreeMap<String, String>| {
        let top = env.top("vm");
        write(&top, u64::from(byte % 48) * 65536, byte);
        expect.insert(name.to_string(), digest(&top));
        env.ok(&["snapshot", "take", "vm", name]);
    };
    snap(&env, "root", 1, &mut expect);
    snap(&env, "mid", 2, &mut expect);
    let take_time = timed(&env, &["snapshot", "take", "vm", "probe"]);
    expect.insert("probe".into(), digest(&env.top("vm")));

    // Takes killed at random moments.
    let journal = env.vm_dir("vm").join("snapshots/journal.json");
    let mut interrupted = 0;
    for i in 0..20u8 {
        let name = format!("k{i}");
        let top = env.top("vm");
        write(&top, u64::from(i % 48) * 65536 + 4096, 0x80 | i);
        let before = digest(&top);
        let delay = rng.below(take_time.as_micros() as u64 * 3 / 2);
        kill_during(
            &env,
            &["snapshot", "take", "vm", &name],
            Duration::from_micros(delay),
        );
        interrupted += usize::from(journal.exists());
        // The next command finishes or undoes it.
        let ids = env.ids("vm");
        if ids.contains_key(&name) {
            expect.insert(name.clone(), before.clone());
        }
        assert_eq!(
            digest(&env.top("vm")),
            before,
            "take {name} changed the disk"
        );
        assert!(!env.vm_dir("vm").join("snapshots/journal.json").exists());
    }
    for (name, hash) in &expect {
        env.ok(&["snapshot", "restore", "vm", name]);
        assert_eq!(&digest(&env.top("vm")), hash, "{name} after killed takes");
    }
    check_images(&env, "vm", false);

    // Deletes of inner nodes (with a child and data to merge) killed at
    // random moments.
    for i in 0..20u8 {
        env.ok(&["snapshot", "restore", "vm", "mid"]);
        let (inner, child) = (format!("d{i}"), format!("e{i}"));
        for (n, name) in [(0u8, &inner), (1, &child)] {
            let top = env.top("vm");
            for k in 0..8u64 {
                write(&top, (k * 6 + u64::from(n)) * 65536, 0x40 | i);
            }
            expect.insert(name.clone(), digest(&top));
            env.ok(&["snapshot", "take", "vm", name]);
        }
        // Deletes take about as long as takes (a little more): kill
        // anywhere in up to twice that.
        let delay = rng.below(take_time.as_micros() as u64 * 2);
        kill_during(
            &env,
            &["snapshot", "delete", "vm", &inner],
            Duration::from_micros(delay),
        );
        interrupted += usize::from(journal.exists());
        if !env.ids("vm").contains_key(&inner) {
            expect.remove(&inner);
        }
        check_images(&env, "vm", false);
        for name in [&inner, &child] {
            if let Some(hash) = expect.get(name) {
                env.ok(&["snapshot", "restore", "vm", name]);
                assert_eq!(
                    &digest(&env.top("vm")),
                    hash,
                    "{name} after a killed delete"
                );
            }
        }
    }
    for (name, hash) in &expect {
        env.ok(&["snapshot", "restore", "vm", name]);
        assert_eq!(&digest(&env.top("vm")), hash, "{name} after killed deletes");
    }
    eprintln!("{interrupted} of 40 operations were killed midway (a journal was left)");
    check_images(&env, "vm", have_qemu_img());
}

/// A snapshot with a running state (made by hand here: the VMM's side
/// comes separately) is resumed by the next start after a restore or a
/// clone, and only while the disks are untouched since.
#[test]
fn a_saved_running_state_is_handed_to_start_while_the_disks_are_untouched() {
    let env = Env::new("resume");
    env.create_vm("vm");
    env.ok(&["snapshot", "take", "vm", "live"]);
    let id = env.ids("vm")["live"].clone();
    let node = env.vm_dir("vm").join("snapshots").join(&id);
    let meta_path = node.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["saved_state"] = serde_json::Value::Bool(true);
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    std::fs::create_dir(node.join("state")).unwrap();
    std::fs::write(node.join("state/vm.state"), b"state").unwrap();

    env.ok(&["snapshot", "restore", "vm", "live"]);
    assert_eq!(env.list("vm")["resume_pending"], true);
    // The VM process is handed the state (which the VMM then refuses: it
    // is not a real one).
    let err = env.fails(&["start", "vm"]);
    assert!(err.contains("is not a snapshot directory"), "{err}");
    assert!(err.contains(&format!("snapshots/{id}/state")), "{err}");

    // A clone of it resumes from its own copy of the state.
    env.ok(&["clone", "vm", "copy", "--snapshot", "live"]);
    let copied = env.vm_dir("copy").join("resume-state/vm.state");
    assert_eq!(std::fs::read(&copied).unwrap(), b"state");
    let err = env.fails(&["start", "copy"]);
    assert!(err.contains("copy/resume-state"), "{err}");

    // Once the disk moved on, the state no longer fits: start boots.
    write(&env.top("vm"), 0, 1);
    let err = env.fails(&["start", "vm"]);
    assert!(!err.contains("saved state"), "{err}");
}

/// The one guest boot: a linked clone comes up with its own hostname,
/// machine id and MAC, on its source snapshot's disk contents.
#[test]
fn a_linked_clone_boots_with_its_own_identity() {
    if !common::kvm_usable() || common::default_guest().is_none() {
        return;
    }
    let env = Env::new("boot");
    let base = env.dir.join("src.qcow2");
    env.ok(&["disk", "create", base.to_str().unwrap(), "--size", "4M"]);
    write(&base, 0, 0x42);
    let disk = format!("path={}", base.display());
    env.ok(&["create", "src", "--disk", &disk]);
    env.ok(&["snapshot", "take", "src", "gold"]);
    write(&env.top("src"), 0, 0x17); // the source moves on
    env.ok(&["clone", "src", "c_1", "--snapshot", "gold", "--linked"]);
    env.ok(&["start", "c_1"]);
    let out = env.run(&[
        "exec",
        "c_1",
        "--",
        "sh",
        "-c",
        "echo host=$(hostname) id=$(cat /etc/machine-id) mac=$(cat /sys/class/net/eth0/address) disk=$(head -c 2 /dev/vda | od -An -tx1 | tr -d ' ')",
    ]);
    env.ok(&["kill", "c_1"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let config = env.config("c_1");
    let append = config["append"].as_str().unwrap();
    let id = append
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hostvisor.machine_id="))
        .unwrap();
    let want = format!(
        "host=c-1 id={id} mac={} disk=4242",
        mac_of(&config).to_ascii_lowercase()
    );
    assert!(out.stdout.contains(&want), "{} (want {want})", out.stdout);
    assert_ne!(mac_of(&config), mac_of(&env.config("src")));
}

/// A stand-in VM process: holds the VM's lock and serves its API as the
/// VMM side will: `PUT /vm/snapshot` writes a state file into `dir` and
/// makes each overlay backed by the disk's current image (switching to
/// it); `PUT /vm/kill` releases the lock and ends the stand-in.
fn fake_vmm(dir: &Path, mut tops: Vec<PathBuf>) -> std::thread::JoinHandle<()> {
    use std::io::{BufRead, BufReader, Read, Write};
    let lock = std::fs::File::create(dir.join("lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_eq!(locked, 0);
    let socket = dir.join("api.sock");
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                head.push_str(&line);
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).unwrap();
            let mut out = stream;
            if head.starts_with("PUT /vm/snapshot ") {
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let dir = PathBuf::from(req["dir"].as_str().unwrap());
                std::fs::write(dir.join("vm.state"), b"running state").unwrap();
                let overlays: Vec<PathBuf> = req["overlays"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| PathBuf::from(o.as_str().unwrap()))
                    .collect();
                for (overlay, top) in overlays.iter().zip(&tops) {
                    block::tools::create(&block::tools::CreateSpec {
                        path: overlay.clone(),
                        size: None,
                        format: block::Format::Qcow2,
                        backing: Some(top.display().to_string()),
                        backing_format: None,
                        cluster_size: None,
                    })
                    .unwrap();
                }
                tops = overlays;
                let _ = out.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
                continue;
            }
            if head.starts_with("PUT /vm/kill ") {
                drop(lock);
                let _ = std::fs::remove_file(&socket);
                let _ = out.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
                return;
            }
            let body = br#"{"state":"running","pid":1}"#;
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = out.write_all(body);
        }
    })
}

#[test]
fn a_running_vm_is_snapshotted_through_its_vmm() {
    let env = Env::new("live");
    let base = env.create_vm("vm");
    write(&base, 0, 0x31);
    let dir = env.vm_dir("vm");
    let expect = digest(&base);
    let vmm = fake_vmm(&dir, vec![base.clone()]);
    // Cloning a running VM's current state snapshots it first (through
    // the VMM: `PUT /vm/snapshot`) and copies the frozen disks.
    let out = env.ok(&["clone", "vm", "copy"]);
    assert!(out.contains("full clone"), "{out}");
    assert_eq!(digest(&env.top("copy")), expect);
    // The stand-in ends (a running VM's list would come from it).
    let r = api::Client::new(&dir.join("api.sock"))
        .request("PUT", "/vm/kill", "")
        .unwrap();
    assert_eq!(r.status, 204);
    vmm.join().unwrap();
    // The definition names the overlay the VMM made; the snapshot is
    // current and holds the state.
    let top = env.top("vm");
    assert!(top.starts_with(dir.join("disks")), "{}", top.display());
    let list = env.list("vm");
    let snap = &list["snapshots"][0];
    assert_eq!(snap["name"], "base of copy");
    assert_eq!(snap["saved_state"], true);
    assert_eq!(list["current"], snap["id"]);
    let id = snap["id"].as_str().unwrap().to_string();
    assert!(dir
        .join("snapshots")
        .join(&id)
        .join("state/vm.state")
        .exists());
    assert!(!dir.join("snapshots/journal.json").exists());
}

/// A store reached through a symbolic link: hostvisor's own overlays are
/// still told from a base (compared as canonical paths), so a deleted
/// snapshot's layer is merged and removed.
#[test]
fn a_store_behind_a_symlink_still_merges_deleted_layers() {
    let env = Env::new("symlink");
    std::fs::create_dir(env.dir.join("real")).unwrap();
    std::os::unix::fs::symlink(env.dir.join("real"), env.dir.join("data")).unwrap();
    env.create_vm("vm");
    let mut expect = BTreeMap::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        write(&env.top("vm"), i as u64 * 65536, 0x10 + i as u8);
        expect.insert(name, digest(&env.top("vm")));
        env.ok(&["snapshot", "take", "vm", name]);
    }
    let disks = env.vm_dir("vm").join("disks");
    let before = std::fs::read_dir(&disks).unwrap().count();
    env.ok(&["snapshot", "delete", "vm", "b"]);
    assert_eq!(std::fs::read_dir(&disks).unwrap().count(), before - 1);
    expect.remove("b");
    assert_all_restore(&env, "vm", &expect, false);
}
