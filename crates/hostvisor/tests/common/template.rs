//! Booted guests without a boot: a managed VM definition (a [`Template`])
//! is booted once, settled, saved with its running state (`snapshot
//! take`) and stopped; each test that only needs "a booted guest with
//! these devices" gets a linked clone of that snapshot in a store of its
//! own ([`TestVm::from_template`]), which resumes in about a second where
//! a boot of the default guest takes 15–30 s here.
//!
//! Templates are shared by every test binary of one target directory:
//! they live in a cache directory keyed on the guest's kernel and
//! initramfs and the hostvisor binary (each file's identity and
//! modification time), the template's options and this file's format
//! version, so a changed guest or a rebuilt hostvisor never
//! resumes a stale template (the stale one is removed). A file lock makes
//! parallel tests and binaries wait for the one that builds it; within a
//! process a template is looked up once.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{hostvisor, temp_dir, TestVm, BIN, BOOT};

/// Bumped when what a template holds, or how it is laid out, changes.
const FORMAT: &str = "template-v1";

/// The template VM's vsock CID: high, so that the lowest free CID in a
/// test's store (what a clone gets, as a `create` would) is 3.
const TEMPLATE_CID: &str = "cid=1000";

/// A file the fixture leaves in the template guest's tmpfs before saving
/// it: a clone that has it was resumed, not booted.
const RESUMED_MARK: &str = "/run/hostvisor-template-resumed";

/// A managed VM definition to boot once and resume many times.
pub struct Template {
    /// Its name in the cache (letters, digits, '-').
    pub name: &'static str,
    /// `hostvisor create` options (the vsock CID is the fixture's).
    /// `{net}` stands for an internal network name of the template's own.
    pub create: &'static [&'static str],
    /// A guest shell command that succeeds once the booted guest has
    /// settled (it is saved then).
    pub settled: &'static str,
}

/// What a bare `hostvisor create` gives (a NAT NIC, the agent's vsock,
/// 1 vCPU), saved once the DHCP lease is applied (init's network setup
/// has ended: nothing is left half done across the snapshot).
pub const DEFAULT: Template = Template {
    name: "default",
    create: &[],
    settled: "test -f /run/udhcpc.eth0",
};

/// As [`DEFAULT`], with its NIC on an internal network (a restore must
/// keep the NIC's kind: each backend offers the guest other features).
/// Clones move to a network of their own with `--net internal=NAME`.
pub const INTERNAL: Template = Template {
    name: "internal",
    create: &["--net", "internal={net}"],
    settled: "test -e /sys/class/net/eth0",
};

/// Where this target directory's templates are cached: short (the VM's
/// Unix sockets live below it), in the temporary directory, named after
/// the target directory so that other checkouts keep theirs.
fn cache_root() -> PathBuf {
    let target = env!("CARGO_TARGET_TMPDIR");
    let tag = &sha256_hex(target.as_bytes())[..8];
    let dir = std::env::temp_dir().join(format!("hvtpl-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What identifies the guest's files and the hostvisor binary: path,
/// device, inode, size and modification time of each (a rebuilt binary or
/// guest is a new file, or at least a newly written one; hashing their
/// ~150 MB took seconds per test binary here).
fn inputs_digest() -> &'static str {
    static DIGEST: OnceLock<String> = OnceLock::new();
    DIGEST.get_or_init(|| {
        use std::os::unix::fs::MetadataExt;
        let guest = super::default_guest().expect("the caller checked for the default guest");
        [
            guest.join("vmlinux"),
            guest.join("initramfs.cpio"),
            PathBuf::from(BIN),
        ]
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            format!(
                "{} {} {} {} {}.{}\n",
                f.display(),
                m.dev(),
                m.ino(),
                m.len(),
                m.mtime(),
                m.mtime_nsec()
            )
        })
        .collect()
    })
}

/// An exclusive or shared flock on `path`, released when dropped.
struct FileLock(std::fs::File);

impl FileLock {
    fn take(path: &Path, exclusive: bool) -> FileLock {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap();
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock(2) on a descriptor this struct owns; it blocks
        // until the lock is ours and touches no memory.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        assert_eq!(
            r,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        FileLock(file)
    }
}

impl Template {
    /// The store (an `XDG_DATA_HOME`) holding the stopped VM `template`
    /// with its snapshot `booted`; built on first use.
    fn store(&self) -> PathBuf {
        type Slot = Arc<OnceLock<PathBuf>>;
        static SEEN: OnceLock<Mutex<HashMap<&'static str, Slot>>> = OnceLock::new();
        let slot = SEEN
            .get_or_init(Default::default)
            .lock()
            .unwrap()
            .entry(self.name)
            .or_default()
            .clone();
        slot.get_or_init(|| self.find_or_build()).clone()
    }

    fn find_or_build(&self) -> PathBuf {
        let key = sha256_hex(
            format!(
                "{FORMAT}\n{}\n{:?}\n{}",
                inputs_digest(),
                self.create,
                self.settled
            )
            .as_bytes(),
        );
        let root = cache_root();
        let store = root.join(format!("{}-{}", self.name, &key[..16]));
        let _lock = FileLock::take(&root.join(format!("{}.lock", self.name)), true);
        if store.join("ready").exists() {
            return store;
        }
        // Stale templates (other guests or binaries) and a half-built
        // one go, with the VM a killed build may have left running.
        for e in std::fs::read_dir(&root).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&format!("{}-", self.name)) && e.path().is_dir() {
                let _ = hv(&e.path(), &["kill", "template"]);
                std::fs::remove_dir_all(e.path()).unwrap();
            }
        }
        self.build(&store);
        store
    }

    fn build(&self, store: &Path) {
        let started = Instant::now();
        std::fs::create_dir_all(store).unwrap();
        /// Kills the template VM, and removes the half-built store, when
        /// a build step fails.
        struct Building<'a>(&'a Path, bool);
        impl Drop for Building<'_> {
            fn drop(&mut self) {
                let _ = hv(self.0, &["kill", "template"]);
                if !self.1 {
                    let _ = std::fs::remove_dir_all(self.0);
                }
            }
        }
        let mut guard = Building(store, false);
        let net = format!("hvtpl{}", std::process::id());
        let mut args = vec!["create".to_string(), "template".into()];
        args.extend(self.create.iter().map(|a| a.replace("{net}", &net)));
        args.extend(["--vsock".into(), TEMPLATE_CID.into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ok(store, &args);
        ok(store, &["start", "template"]);
        let settle = format!("{} && touch {RESUMED_MARK} && echo SETTLED", self.settled);
        let deadline = Instant::now() + BOOT;
        loop {
            let out = hv(store, &["exec", "template", "--", "sh", "-c", &settle]);
            if out.stdout.contains("SETTLED") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "template {} did not settle within {BOOT:?}: {}{}",
                self.name,
                out.stdout,
                out.stderr
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let out = ok(store, &["snapshot", "take", "template", "booted"]);
        assert!(out.contains("running state"), "{out}");
        ok(store, &["kill", "template"]);
        std::fs::write(store.join("ready"), b"").unwrap();
        guard.1 = true;
        eprintln!(
            "template {}: booted and saved in {:.1} s ({})",
            self.name,
            started.elapsed().as_secs_f64(),
            store.display()
        );
    }
}

fn hv(store: &Path, args: &[&str]) -> super::Output {
    hostvisor(args, &[("XDG_DATA_HOME", store.to_str().unwrap())], BOOT)
}

fn ok(store: &Path, args: &[&str]) -> String {
    let out = hv(store, args);
    assert_eq!(
        out.code, 0,
        "hostvisor {args:?}: {}{}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// Copies a VM directory: the saved state's files (only read from here
/// on) as hard links, the rest (small, and rewritten in place by some
/// commands) as copies.
fn copy_vm_dir(from: &Path, to: &Path, in_state: bool) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let kind = e.file_type().unwrap();
        if kind.is_dir() {
            copy_vm_dir(&src, &dst, in_state || e.file_name() == "state");
        } else if kind.is_file() {
            if in_state {
                std::fs::hard_link(&src, &dst).unwrap();
            } else {
                std::fs::copy(&src, &dst).unwrap();
            }
        }
    }
}

impl TestVm {
    /// VM `name` in a store of its own, running without a boot: a linked
    /// clone of `template`'s booted snapshot, its definition changed by
    /// `edit` (`hostvisor edit` options; a NIC may move to another
    /// network of the same kind), started — so it resumes the template's
    /// running state. Returns once the guest's agent answers with the
    /// clone's own identity (hostname = `name`, MAC from its definition).
    /// Dropping it kills and deletes the VM, as for [`TestVm::start`].
    pub fn from_template(name: &str, template: &Template, edit: &[&str]) -> TestVm {
        let started = Instant::now();
        let store = template.store();
        let vm = TestVm {
            data: temp_dir(&format!("vm-{name}")),
            name: name.to_string(),
            bin: std::path::PathBuf::from(BIN),
        };
        {
            // Shared: a build (which may remove a stale store) waits.
            let _lock =
                FileLock::take(&cache_root().join(format!("{}.lock", template.name)), false);
            copy_vm_dir(
                &store.join("hostvisor/vms/template"),
                &vm.data.join("hostvisor/vms/template"),
                false,
            );
        }
        vm.ok(&[
            "clone",
            "template",
            name,
            "--snapshot",
            "booted",
            "--linked",
        ]);
        if !edit.is_empty() {
            let mut args = vec!["edit", name];
            args.extend_from_slice(edit);
            vm.ok(&args);
        }
        vm.ok(&["start", name]);
        // The agent gives a resumed clone its identity just after it
        // answers; tests see the VM once that is done.
        let show: serde_json::Value =
            serde_json::from_str(&vm.ok(&["show", name, "--json"])).unwrap();
        let mac = show["config"]["nets"][0]
            .as_str()
            .and_then(|nic| nic.split("mac=").nth(1))
            .map(str::to_ascii_lowercase);
        let want_host = name.replace('_', "-");
        let look = format!(
            "hostname; cat /sys/class/net/eth0/address 2>/dev/null || echo no-nic; \
             test -e {RESUMED_MARK} && echo resumed || echo booted"
        );
        loop {
            let out = vm.exec(&["sh", "-c", &look]);
            let lines: Vec<&str> = out.stdout.lines().collect();
            if out.code == 0 {
                assert_eq!(
                    lines.get(2).copied(),
                    Some("resumed"),
                    "{name} booted instead of resuming template {}",
                    template.name
                );
                let mac_ok = mac.as_deref().is_none_or(|m| lines.get(1) == Some(&m));
                if lines.first() == Some(&want_host.as_str()) && mac_ok {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{name} did not take its identity ({want_host}, {mac:?}): {}{}",
                out.stdout,
                out.stderr
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        eprintln!(
            "{name}: resumed from template {} in {:.1} s",
            template.name,
            started.elapsed().as_secs_f64()
        );
        vm
    }
}
