//! `hostvisor create --image FILE --cloud-init`: the overlay on the image
//! and the NoCloud seed, checked against what Debian's `cloud-localds`
//! (cloud-image-utils) makes from the same files and against the rules
//! cloud-init's NoCloud data source applies. Both seeds are read without
//! root through mtools (this host's kernel has no vfat to mount them
//! with, even as root). No VM boots here: a distribution's kernel cannot
//! boot on the development machines' nested KVM, and its image would
//! have to be downloaded. HOSTVISOR_REQUIRE_CLOUD_UTILS=1 makes a missing
//! cloud-localds or mtools a failure instead of a skip.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

struct Env {
    dir: PathBuf,
}

impl Env {
    fn new(name: &str) -> Env {
        let dir = temp_dir(&format!("cloudinit-{name}"));
        std::fs::create_dir_all(dir.join("home")).unwrap();
        Env { dir }
    }

    /// hostvisor with its store, home (no ssh keys unless a test puts
    /// some) and user name in the test's directory.
    fn hv(&self, args: &[&str]) -> Output {
        let data = self.dir.join("data");
        let home = self.dir.join("home");
        hostvisor(
            args,
            &[
                ("XDG_DATA_HOME", data.to_str().unwrap()),
                ("HOME", home.to_str().unwrap()),
                ("USER", "tester"),
            ],
            QUICK,
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.hv(args);
        assert_eq!(
            out.code, 0,
            "hostvisor {args:?}: {}{}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    fn vm(&self, name: &str) -> PathBuf {
        self.dir.join("data/hostvisor/vms").join(name)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn write(&self, file: &str, data: &[u8]) -> String {
        let p = self.path(file);
        std::fs::write(&p, data).unwrap();
        p.to_str().unwrap().to_string()
    }

    /// A small qcow2 image standing in for a cloud image.
    fn base(&self) -> String {
        let p = self.path("base.qcow2");
        if !p.exists() {
            self.ok(&["disk", "create", p.to_str().unwrap(), "--size", "64M"]);
        }
        p.to_str().unwrap().to_string()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether cloud-localds (cloud-image-utils) and mtools are here.
fn cloud_utils() -> bool {
    let missing: Vec<&str> = ["cloud-localds", "mcopy", "mdir", "mlabel", "mkfs.vfat"]
        .into_iter()
        .filter(|c| !have(c))
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip(
        "HOSTVISOR_REQUIRE_CLOUD_UTILS",
        &format!(
            "{} missing (Debian packages cloud-image-utils, mtools, dosfstools)",
            missing.join(", ")
        ),
    );
    false
}

/// mtools on an image file (its sanity checks off: seeds are tiny).
fn mtool(cmd: &str, img: &Path, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(img)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A seed as cloud-init sees it: the volume label and the files at the
/// root (name → contents), read with mtools.
struct Seed {
    label: String,
    files: BTreeMap<String, Vec<u8>>,
    /// Entries that are not plain files at the root (directories).
    dirs: Vec<String>,
}

fn read_seed(img: &Path, scratch: &Path) -> Seed {
    // "Volume label is cidata" (the root directory's label entry).
    let label = mtool("mlabel", img, &["-s", "::"])
        .trim()
        .trim_start_matches("Volume label is")
        .trim()
        .to_string();
    let mut files = BTreeMap::new();
    let mut dirs = Vec::new();
    // `mdir -b`: one bare path a line, long names, directories with '/'.
    for entry in mtool("mdir", img, &["-b", "::"]).lines() {
        let name = entry.trim().trim_start_matches("::/").to_string();
        if name.is_empty() {
            continue;
        }
        if name.ends_with('/') {
            dirs.push(name);
            continue;
        }
        let to = scratch.join(format!("out-{name}"));
        let _ = std::fs::remove_file(&to);
        mtool("mcopy", img, &[&format!("::{name}"), to.to_str().unwrap()]);
        files.insert(name, std::fs::read(&to).unwrap());
    }
    Seed { label, files, dirs }
}

/// blkid's view (what cloud-init searches devices by), when installed.
fn blkid(img: &Path) -> Option<String> {
    let out = Command::new("blkid").arg("-p").arg(img).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_seed_is_what_cloud_localds_makes_from_the_same_files() {
    if !cloud_utils() {
        return;
    }
    let env = Env::new("localds");
    let base = env.base();
    let user_data = env.write(
        "user-data",
        b"#cloud-config\npackages: [htop]\nruncmd:\n  - [sh, -c, 'echo hello > /run/hello']\n",
    );
    env.ok(&[
        "create",
        "vm1",
        "--image",
        &base,
        "--cloud-init",
        "--user-data",
        &user_data,
        "--hostname",
        "web-1",
    ]);
    let ours_img = env.vm("vm1").join("cidata.img");
    let scratch = env.path("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let ours = read_seed(&ours_img, &scratch);

    // cloud-localds from the same user-data and the meta-data and
    // network-config hostvisor wrote.
    let meta = env.write("meta-data", &ours.files["meta-data"]);
    let network = env.write("network-config", &ours.files["network-config"]);
    let theirs_img = env.path("localds.img");
    tool(
        "cloud-localds",
        &[
            "--filesystem",
            "vfat",
            "--network-config",
            &network,
            theirs_img.to_str().unwrap(),
            &user_data,
            &meta,
        ],
    );
    let theirs = read_seed(&theirs_img, &scratch);

    assert_eq!(ours.label, theirs.label);
    assert_eq!(ours.label, "cidata");
    assert_eq!(
        ours.files.keys().collect::<Vec<_>>(),
        theirs.files.keys().collect::<Vec<_>>()
    );
    assert_eq!(ours.files, theirs.files);
    assert_eq!(ours.files["user-data"], std::fs::read(&user_data).unwrap());
    assert!(ours.dirs.is_empty() && theirs.dirs.is_empty());
    // The same size as cloud-localds's volume, and the same file system.
    assert_eq!(
        std::fs::metadata(&ours_img).unwrap().len(),
        std::fs::metadata(&theirs_img).unwrap().len()
    );
    if let (Some(a), Some(b)) = (blkid(&ours_img), blkid(&theirs_img)) {
        for want in [
            "TYPE=\"vfat\"",
            "LABEL=\"cidata\"",
            "LABEL_FATBOOT=\"cidata\"",
        ] {
            assert!(a.contains(want), "ours: {a}");
            assert!(b.contains(want), "cloud-localds's: {b}");
        }
    }
}

/// What cloud-init's NoCloud source requires of a seed (cloudinit/sources/
/// DataSourceNoCloud.py): a vfat or iso9660 volume whose label is
/// `cidata` in any case, `meta-data` and `user-data` at its root (and
/// optionally `network-config`), meta-data a YAML mapping with an
/// `instance-id`.
fn assert_nocloud(seed: &Seed, img: &Path) {
    assert!(seed.label.eq_ignore_ascii_case("cidata"), "{}", seed.label);
    for f in ["user-data", "meta-data", "network-config"] {
        assert!(
            seed.files.contains_key(f),
            "{f} missing: {:?}",
            seed.files.keys()
        );
    }
    let meta: serde_yaml::Value = serde_yaml::from_slice(&seed.files["meta-data"]).unwrap();
    let id = meta["instance-id"].as_str().unwrap();
    assert!(!id.is_empty());
    let net: serde_yaml::Value = serde_yaml::from_slice(&seed.files["network-config"]).unwrap();
    assert_eq!(net["version"], 2);
    if let Some(b) = blkid(img) {
        assert!(b.contains("TYPE=\"vfat\""), "{b}");
    }
}

#[test]
fn a_cloud_image_vm_gets_an_overlay_and_a_nocloud_seed() {
    if !cloud_utils() {
        return;
    }
    let env = Env::new("vm");
    let base = env.base();
    let before = std::fs::read(&base).unwrap();
    let key = env.write(
        "id_test.pub",
        b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostvisorTestKey tester@host\n",
    );
    env.ok(&[
        "create",
        "vm1",
        "--image",
        &base,
        "--cloud-init",
        "--ssh-key",
        &key,
    ]);
    env.ok(&[
        "create",
        "vm2",
        "--image",
        &base,
        "--cloud-init",
        "--ssh-key",
        &key,
    ]);
    let scratch = env.path("scratch");
    std::fs::create_dir_all(&scratch).unwrap();

    let mut ids = Vec::new();
    for name in ["vm1", "vm2"] {
        let dir = env.vm(name);
        let seed = read_seed(&dir.join("cidata.img"), &scratch);
        assert_nocloud(&seed, &dir.join("cidata.img"));
        let meta: serde_yaml::Value = serde_yaml::from_slice(&seed.files["meta-data"]).unwrap();
        assert_eq!(meta["local-hostname"], name);
        ids.push(meta["instance-id"].as_str().unwrap().to_string());

        let ud = String::from_utf8(seed.files["user-data"].clone()).unwrap();
        assert!(ud.starts_with("#cloud-config\n"), "{ud}");
        let ud: serde_yaml::Value = serde_yaml::from_str(&ud).unwrap();
        let user = &ud["users"][0];
        assert_eq!(user["name"], "tester");
        assert_eq!(user["sudo"], "ALL=(ALL) NOPASSWD:ALL");
        assert_eq!(
            user["ssh_authorized_keys"][0],
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostvisorTestKey tester@host"
        );

        // The definition: overlay first, seed second and read-only, a
        // firmware boot on a pc, the NIC the network-config names.
        let config: toml::Value =
            toml::from_str(&std::fs::read_to_string(dir.join("config.toml")).unwrap()).unwrap();
        assert_eq!(config["firmware"].as_str(), Some("bios"));
        assert_eq!(config["machine"].as_str(), Some("pc"));
        let disks = config["disks"].as_array().unwrap();
        assert_eq!(disks.len(), 2);
        assert_eq!(
            Path::new(disks[0]["path"].as_str().unwrap()),
            dir.join("disk.qcow2")
        );
        assert_eq!(disks[0]["readonly"].as_bool(), Some(false));
        assert_eq!(
            Path::new(disks[1]["path"].as_str().unwrap()),
            dir.join("cidata.img")
        );
        assert_eq!(disks[1]["readonly"].as_bool(), Some(true));
        let nic = config["nets"][0].as_str().unwrap();
        let net: serde_yaml::Value = serde_yaml::from_slice(&seed.files["network-config"]).unwrap();
        let mac = net["ethernets"]["primary"]["match"]["macaddress"]
            .as_str()
            .unwrap();
        assert!(nic.ends_with(&format!("mac={mac}")), "{nic} vs {mac}");

        // The overlay is backed by the image itself.
        let info: serde_json::Value = serde_json::from_str(&env.ok(&[
            "disk",
            "info",
            "--json",
            dir.join("disk.qcow2").to_str().unwrap(),
        ]))
        .unwrap();
        let backing = info["backing_file"].as_str().unwrap();
        assert_eq!(
            std::fs::canonicalize(backing).unwrap(),
            std::fs::canonicalize(&base).unwrap()
        );
    }
    assert_ne!(ids[0], ids[1], "each VM is a new instance");
    env.ok(&["delete", "vm1"]);
    assert!(!env.vm("vm1").exists());
    assert_eq!(
        std::fs::read(&base).unwrap(),
        before,
        "the image is never written"
    );
}

#[test]
fn user_choices_are_kept() {
    let env = Env::new("choices");
    let base = env.base();
    env.ok(&[
        "create",
        "u1",
        "--image",
        &base,
        "--cloud-init",
        "--firmware",
        "uefi",
        "--disk-size",
        "1G",
    ]);
    let config = std::fs::read_to_string(env.vm("u1").join("config.toml")).unwrap();
    assert!(config.contains("firmware = \"uefi\""), "{config}");
    let info: serde_json::Value = serde_json::from_str(&env.ok(&[
        "disk",
        "info",
        "--json",
        env.vm("u1").join("disk.qcow2").to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(info["virtual_size"], 1u64 << 30);
    // --image alone: the overlay, no seed.
    env.ok(&["create", "plain", "--image", &base]);
    assert!(env.vm("plain").join("disk.qcow2").exists());
    assert!(!env.vm("plain").join("cidata.img").exists());
}

#[test]
fn bad_input_is_refused_in_one_line_and_leaves_nothing() {
    let env = Env::new("bad");
    let base = env.base();
    let not_cloud = env.write("ud.txt", b"users: []\n");
    let private = env.write(
        "id_ed25519",
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n",
    );
    let not_image = env.path("home");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--image", "/nonexistent/cloud.img", "--cloud-init"],
            "--image /nonexistent/cloud.img: No such file",
        ),
        (
            vec!["--image", not_image.to_str().unwrap(), "--cloud-init"],
            "not a disk image file",
        ),
        (
            vec![
                "--image",
                &base,
                "--cloud-init",
                "--ssh-key",
                "/nonexistent/k.pub",
            ],
            "--ssh-key /nonexistent/k.pub: No such file",
        ),
        (
            vec!["--image", &base, "--cloud-init", "--ssh-key", &private],
            "private key",
        ),
        (
            vec!["--image", &base, "--cloud-init", "--user-data", &not_cloud],
            "not cloud-init user data",
        ),
        (
            vec!["--image", &base, "--cloud-init", "--hostname", "bad_name"],
            "not a valid hostname",
        ),
        (
            vec!["--image", &base, "--disk-size", "1M"],
            "smaller than the image",
        ),
        (
            vec!["--image", &base, "--ssh-key", &private],
            "--ssh-key needs --cloud-init",
        ),
        (
            vec!["--image", &base, "--hostname", "h"],
            "--hostname needs --cloud-init",
        ),
        (vec!["--cloud-init"], "--cloud-init needs --image"),
        (vec!["--disk-size", "1G"], "--disk-size needs --image"),
        (
            vec![
                "--image",
                &base,
                "--cloud-init",
                "--ssh-key",
                &private,
                "--user-data",
                &not_cloud,
            ],
            "cannot be used with",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["create", "x"];
        all.extend(&args);
        let out = env.hv(&all);
        assert_one_line_error(&out, 2, needle);
        assert!(!env.vm("x").exists(), "{args:?} left a VM behind");
    }
}

#[test]
fn a_clone_gets_its_own_seed() {
    if !cloud_utils() {
        return;
    }
    let env = Env::new("clone");
    let base = env.base();
    let key = env.write(
        "id_test.pub",
        b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostvisorTestKey tester@host\n",
    );
    env.ok(&[
        "create",
        "src",
        "--image",
        &base,
        "--cloud-init",
        "--ssh-key",
        &key,
    ]);
    env.ok(&["clone", "src", "full"]);
    env.ok(&["clone", "src", "linked", "--linked"]);
    let scratch = env.path("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let source = read_seed(&env.vm("src").join("cidata.img"), &scratch);
    let meta =
        |s: &Seed| -> serde_yaml::Value { serde_yaml::from_slice(&s.files["meta-data"]).unwrap() };
    for name in ["full", "linked"] {
        let config: toml::Value =
            toml::from_str(&std::fs::read_to_string(env.vm(name).join("config.toml")).unwrap())
                .unwrap();
        let disk = config["disks"][1]["path"].as_str().unwrap();
        assert_eq!(config["disks"][1]["readonly"].as_bool(), Some(true));
        // mtools reads raw images: a copy of the clone's qcow2 seed.
        let raw = env.path(&format!("{name}-seed.raw"));
        env.ok(&[
            "disk",
            "convert",
            disk,
            raw.to_str().unwrap(),
            "--format",
            "raw",
        ]);
        let seed = read_seed(&raw, &scratch);
        assert_nocloud(&seed, &raw);
        assert_eq!(seed.files["user-data"], source.files["user-data"]);
        let m = meta(&seed);
        assert_eq!(m["local-hostname"], name);
        assert_ne!(m["instance-id"], meta(&source)["instance-id"]);
        let net: serde_yaml::Value = serde_yaml::from_slice(&seed.files["network-config"]).unwrap();
        let mac = net["ethernets"]["primary"]["match"]["macaddress"]
            .as_str()
            .unwrap();
        let nic = config["nets"][0].as_str().unwrap();
        assert!(nic.ends_with(&format!("mac={mac}")), "{nic} vs {mac}");
    }
}
