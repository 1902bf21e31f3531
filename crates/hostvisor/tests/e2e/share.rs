//! Shared directories end to end: one boot of the default guest runs every
//! check of the share in its script (`hostvisor.run`), the host checks
//! what the guest left and what it printed. The same runs again with
//! hostvisor as an unprivileged host user.
//!
//! Sizes fit the development machines' emulating KVM (guest memory fills
//! at ~25 MB/min): the large file is 8 MiB each way, not 64 MiB.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use common::*;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Bytes of the file copied each way (the guest's is `seq 1 1200000`,
/// 8.5 MB: made in user space, as /dev/urandom runs emulated here).
const BIG: usize = 8 << 20;
/// Small files the guest creates.
const MANY: usize = 1000;
/// One boot, and everything the script does on this slow KVM.
const LIMIT: Duration = Duration::from_secs(600);

/// The guest's part. No pipelines (see cli.rs: on PVM hosts a guest
/// pipeline segfaults now and then).
const SCRIPT: &str = r#"S=/mnt/share
echo "HOSTSUM $(sha256sum $S/host.bin)"
seq 1 1200000 > $S/guest.bin
echo "GUESTSUM $(sha256sum $S/guest.bin)"
mkdir $S/many
i=0; while [ $i -lt 1000 ]; do echo $i > $S/many/f$i; i=$((i+1)); done
set -- $S/many/*; echo "MANY $#"
mkdir $S/ops; echo one > $S/ops/a; mv $S/ops/a $S/ops/b; ln -s b $S/ops/link
chmod 640 $S/ops/b; echo two > $S/ops/del; rm $S/ops/del; mkdir $S/ops/sub; rmdir $S/ops/sub
echo "LINKREAD $(cat $S/ops/link)"
echo "MODE $(stat -c %a $S/ops/b)"
mkdir $S/u; chown 1000:1000 $S/u
su user -c 'cd /mnt/share/u && echo mine > f && mkdir d && ln -s f l && chmod 600 f && chown 1000:1000 f && chgrp 1000 d && echo USER-OPS-OK'
echo "UOWN $(stat -c %u:%g:%a $S/u/f) $(stat -c %u:%g $S/u/d)"
echo "HOSTOWN $(stat -c %u:%g $S/host.bin)"
mkdir $S/bin && cp /bin/busybox $S/bin/busybox && $S/bin/busybox echo MMAP-EXEC-OK
mknod $S/blk b 8 0 2>/dev/null && echo MKNOD-ALLOWED || echo MKNOD-REFUSED
cat $S/hostlink/secret 2>/dev/null && echo ESCAPED || echo ESCAPE-BLOCKED
echo x > /mnt/ro/new 2>/dev/null && echo RO-WRITE-ALLOWED || echo RO-WRITE-REFUSED
mkdir /mnt/ro/d 2>/dev/null && echo RO-MKDIR-ALLOWED || echo RO-MKDIR-REFUSED
echo "RO-READ $(cat /mnt/ro/file)"
sync
"#;

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Lays out `base`: the share (with host.bin and a symlink to a host
/// directory outside it), the read-only share, and that outside directory.
fn lay_out(base: &Path) -> (PathBuf, PathBuf) {
    let _ = std::fs::remove_dir_all(base);
    let share = base.join("share");
    let ro = base.join("ro");
    let outside = base.join("outside");
    for d in [&share, &ro, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    let data: Vec<u8> = (0..BIG)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(share.join("host.bin"), &data).unwrap();
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    std::os::unix::fs::symlink(&outside, share.join("hostlink")).unwrap();
    std::fs::write(ro.join("file"), b"read-only data").unwrap();
    (share, ro)
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} line in:\n{out}"))
        .trim()
}

/// Runs the script with the two shares, as `as_user` (uid, gid) or as the
/// test's own user, and checks everything.
fn check_shares(base: &Path, guest: &Path, as_user: Option<(u32, u32)>) {
    let (share, ro) = lay_out(base);
    let host_ids = match as_user {
        Some(ids) => {
            Command::new("chown")
                .arg("-R")
                .arg(format!("{}:{}", ids.0, ids.1))
                .arg(base)
                .status()
                .unwrap();
            ids
        }
        // SAFETY: reads the process's credentials only.
        None => unsafe { (libc::geteuid(), libc::getegid()) },
    };
    let append = format!("hostvisor.run={}", base64(SCRIPT.as_bytes()));
    let share_arg = format!("{}:share", share.display());
    let ro_arg = format!("{}:ro,readonly", ro.display());
    let kernel = guest.join("vmlinux");
    let initrd = guest.join("initramfs.cpio");
    let args = [
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--share",
        &share_arg,
        "--share",
        &ro_arg,
        "--append",
        &append,
    ];
    let mut cmd = match as_user {
        Some((uid, gid)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(args)
        .env("HOME", base)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = run_with_limit(cmd, LIMIT);
    let text = &out.stdout;
    assert_eq!(out.code, 0, "stdout: {text}\nstderr: {}", out.stderr);
    assert!(text.contains("HOSTVISOR-RUN-EXIT 0"), "{text}");

    // A host file read in the guest, a guest file read on the host.
    assert!(line(text, "HOSTSUM").starts_with(&sha256(&share.join("host.bin"))));
    let guest_bin = share.join("guest.bin");
    assert!(std::fs::metadata(&guest_bin).unwrap().len() >= BIG as u64);
    assert!(line(text, "GUESTSUM").starts_with(&sha256(&guest_bin)));
    // 1,000 small files, the host user's.
    assert_eq!(line(text, "MANY"), MANY.to_string());
    let mut n = 0;
    for e in std::fs::read_dir(share.join("many")).unwrap() {
        let m = e.unwrap().metadata().unwrap();
        assert_eq!((m.uid(), m.gid()), host_ids);
        n += 1;
    }
    assert_eq!(n, MANY);
    assert_eq!(
        std::fs::read_to_string(share.join("many/f999")).unwrap(),
        "999\n"
    );
    // rename, symlink, chmod, unlink, mkdir/rmdir.
    let ops = share.join("ops");
    assert_eq!(std::fs::read_to_string(ops.join("b")).unwrap(), "one\n");
    assert!(!ops.join("a").exists() && !ops.join("del").exists() && !ops.join("sub").exists());
    assert_eq!(
        std::fs::read_link(ops.join("link")).unwrap(),
        Path::new("b")
    );
    assert_eq!(
        std::fs::metadata(ops.join("b"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    assert_eq!(line(text, "LINKREAD"), "one");
    assert_eq!(line(text, "MODE"), "640");
    // The guest's uid 1000 made, chmodded and chowned its files; on the
    // host they are the host user's.
    assert!(text.contains("USER-OPS-OK"), "{text}");
    assert_eq!(line(text, "UOWN"), "1000:1000:600 1000:1000");
    let f = std::fs::metadata(share.join("u/f")).unwrap();
    assert_eq!((f.uid(), f.gid()), host_ids);
    assert_eq!(f.permissions().mode() & 0o777, 0o600);
    assert!(share.join("u/d").is_dir());
    assert_eq!(
        std::fs::read_link(share.join("u/l")).unwrap(),
        Path::new("f")
    );
    // Host files the guest did not claim show as the guest's root.
    assert_eq!(line(text, "HOSTOWN"), "0:0");
    // A binary run from the share (the kernel maps its pages).
    assert!(text.contains("MMAP-EXEC-OK"), "{text}");
    // No device nodes, no way out through a host symlink.
    assert!(text.contains("MKNOD-REFUSED"), "{text}");
    assert!(!share.join("blk").exists());
    assert!(text.contains("ESCAPE-BLOCKED"), "{text}");
    assert!(!text.contains("host secret"), "{text}");
    // The read-only share.
    assert!(text.contains("RO-WRITE-REFUSED"), "{text}");
    assert!(text.contains("RO-MKDIR-REFUSED"), "{text}");
    assert_eq!(line(text, "RO-READ"), "read-only data");
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 1);
    assert_clean_boot_log(text);
}

#[test]
fn a_share_works_both_ways_in_one_boot() {
    if !kvm_usable() {
        return;
    }
    let Some(guest) = default_guest() else {
        return;
    };
    let base = temp_dir("share");
    check_shares(&base, &guest, None);
    let _ = std::fs::remove_dir_all(&base);
}

/// Puts /dev/kvm's mode back when dropped.
struct KvmMode(u32);

impl Drop for KvmMode {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(self.0));
    }
}

/// The same checks with hostvisor run by `nobody` (uid 65534): no root,
/// no capabilities. /dev/kvm is opened up to others for the run (it is
/// root's only here) and put back afterwards.
#[test]
fn a_share_works_for_an_unprivileged_host_user() {
    if !kvm_usable() {
        return;
    }
    let Some(guest) = default_guest() else {
        return;
    };
    // SAFETY: reads the process's credentials only.
    if unsafe { libc::geteuid() } != 0 || Command::new("setpriv").arg("--help").output().is_err() {
        skip(
            "HOSTVISOR_REQUIRE_SETPRIV",
            "switching to an unprivileged user needs root and setpriv",
        );
        return;
    }
    let base = std::env::temp_dir().join(format!("hostvisor-share-nobody-{}", std::process::id()));
    let mode = std::fs::metadata("/dev/kvm").unwrap().permissions().mode() & 0o7777;
    let _restore = KvmMode(mode);
    if mode & 0o006 != 0o006 {
        std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(mode | 0o006))
            .unwrap();
    }
    // The default guest may lie in root's home, which nobody cannot read.
    let guest_copy =
        std::env::temp_dir().join(format!("hostvisor-share-guest-{}", std::process::id()));
    std::fs::create_dir_all(&guest_copy).unwrap();
    for f in ["vmlinux", "initramfs.cpio"] {
        std::fs::copy(guest.join(f), guest_copy.join(f)).unwrap();
    }
    check_shares(&base, &guest_copy, Some((65534, 65534)));
    let _ = std::fs::remove_dir_all(&base);
    let _ = std::fs::remove_dir_all(&guest_copy);
}

/// Managed VMs remember their shares (no boot: create, show, edit).
#[test]
fn managed_vms_remember_their_shares() {
    let base = temp_dir("share-managed");
    let data = base.join("data");
    let src = base.join("src");
    let other = base.join("other");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    let env = [("XDG_DATA_HOME", data.to_str().unwrap())];
    let hv = |args: &[&str]| hostvisor(args, &env, Duration::from_secs(60));
    let share = format!("{}:src,readonly", src.display());
    let out = hv(&[
        "create",
        "vm",
        "--kernel",
        "/bin/true",
        "--vsock",
        "none",
        "--net",
        "none",
        "--share",
        &share,
    ]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let out = hv(&["show", "vm"]);
    let canon = std::fs::canonicalize(&src).unwrap();
    assert!(
        out.stdout.contains(&format!(
            "share: {}:src,readonly (guest: /mnt/src)",
            canon.display()
        )),
        "{}",
        out.stdout
    );
    let out = hv(&["show", "vm", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["config"]["shares"][0]["tag"], "src");
    assert_eq!(v["config"]["shares"][0]["readonly"], true);
    // edit replaces the list; --no-shares empties it.
    let two = format!("{}:o,cache=never,mount=/srv/o", other.display());
    let out = hv(&["edit", "vm", "--share", &share, "--share", &two]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&hv(&["show", "vm", "--json"]).stdout).unwrap();
    assert_eq!(v["config"]["shares"].as_array().unwrap().len(), 2);
    assert_eq!(v["config"]["shares"][1]["mount"], "/srv/o");
    assert_eq!(v["config"]["shares"][1]["cache"], "never");
    let out = hv(&["edit", "vm", "--no-shares"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&hv(&["show", "vm", "--json"]).stdout).unwrap();
    assert!(v["config"]["shares"].is_null(), "{v}");
    // Bad shares are refused with one clear line.
    let missing = format!("{}:x", base.join("missing").display());
    let out = hv(&["edit", "vm", "--share", &missing]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("--share"), "{}", out.stderr);
    let out = hv(&["edit", "vm", "--share", "/tmp:bad tag"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("tag"), "{}", out.stderr);
    let _ = hv(&["delete", "vm"]);
    let _ = std::fs::remove_dir_all(&base);
}
