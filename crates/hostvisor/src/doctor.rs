//! `hostvisor doctor`: checks the host and says, one line a check, what is
//! wrong and how to fix it. VirtualBox users' most common first error is
//! "kernel driver not installed"; this is the command hostvisor's own host
//! errors point to.

use std::ffi::CString;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde::Serialize;

use crate::CliError;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, with a cost or a limit worth knowing.
    Warn,
    /// Missing or broken.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// A short stable name (`kvm`, `libslirp`, ...).
    pub name: &'static str,
    pub status: Status,
    /// Whether hostvisor cannot run VMs as it does by default without it;
    /// a failed required check makes `doctor` exit 1.
    pub required: bool,
    pub message: String,
    /// What to do about it; for a check that passed, how to get more from
    /// it (empty when there is nothing to say).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl Check {
    fn new(name: &'static str, required: bool, status: Status, message: impl Into<String>) -> Self {
        Check {
            name,
            status,
            required,
            message: message.into(),
            fix: String::new(),
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = fix.into();
        self
    }
}

/// Runs every check, in the order they are printed.
pub fn checks() -> Vec<Check> {
    let mut out = kvm_checks();
    out.push(libslirp());
    out.push(default_guest());
    out.push(qemu_img());
    out.push(tap());
    out.push(hugepages());
    out.push(user_namespaces());
    out.push(landlock());
    out
}

/// `hostvisor doctor [--json]`: exit 0 when every required check passed.
pub fn run(json: bool) -> Result<i32, CliError> {
    let checks = checks();
    if json {
        let text =
            serde_json::to_string_pretty(&checks).map_err(|e| CliError::Failure(e.to_string()))?;
        println!("{text}");
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            let label = if c.status == Status::Ok {
                "hint"
            } else {
                "fix"
            };
            if c.fix.is_empty() {
                println!("{tag} {:<16} {}", c.name, c.message);
            } else {
                println!("{tag} {:<16} {} — {label}: {}", c.name, c.message, c.fix);
            }
        }
    }
    let failed = checks
        .iter()
        .any(|c| c.required && c.status == Status::Fail);
    Ok(if failed {
        vmm::exit_code::HOSTVISOR_ERROR
    } else {
        0
    })
}

/// The device, access to it, its capabilities, and what kind of KVM it is.
fn kvm_checks() -> Vec<Check> {
    let device = hypervisor::kvm::KvmHypervisor::DEVICE;
    let report = match hypervisor::kvm::probe() {
        Ok(r) => r,
        Err(e) => {
            let errno = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<vmm_sys_util::errno::Error>())
                .map(|e| e.errno());
            return vec![kvm_unusable(device, errno, &vmm::error_chain(&e))];
        }
    };
    let mut out = Vec::new();
    out.push(Check::new(
        "kvm",
        true,
        Status::Ok,
        format!("{device} is usable (up to {} vCPUs a VM)", report.max_vcpus),
    ));
    out.push(if report.api_version != 12 {
        Check::new(
            "kvm-api",
            true,
            Status::Fail,
            format!("KVM API version {}, hostvisor needs 12", report.api_version),
        )
        .fix("use a Linux kernel from this decade")
    } else if !report.missing_capabilities.is_empty() {
        Check::new(
            "kvm-api",
            true,
            Status::Fail,
            format!("KVM lacks {}", report.missing_capabilities.join(", ")),
        )
        .fix("use a newer host kernel (hostvisor needs an in-kernel irqchip, irqfd and immediate exit)")
    } else {
        Check::new(
            "kvm-api",
            true,
            Status::Ok,
            format!(
                "KVM API 12 with all {} capabilities hostvisor needs",
                report.required_capabilities
            ),
        )
    });
    out.push(kvm_kind(report.profile.emulated_cpl0, running_in_a_vm()));
    out
}

/// Why `/dev/kvm` cannot be used, and the fix for that reason.
fn kvm_unusable(device: &str, errno: Option<i32>, text: &str) -> Check {
    let check = Check::new("kvm", true, Status::Fail, text.to_string());
    match errno {
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => check.fix(
            "load KVM (sudo modprobe kvm_intel, or kvm_amd) and enable VT-x/AMD-V in the firmware settings; inside a VM, turn on nested virtualization",
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => {
            let group = std::fs::metadata(device)
                .ok()
                .and_then(|m| group_name(m.gid()))
                .unwrap_or_else(|| "kvm".into());
            check.fix(format!(
                "your user may not open {device} (group {group}): sudo usermod -aG {group} $USER, then log out and in again"
            ))
        }
        _ => check.fix(format!("check that {device} is KVM's device (character device 10:232)")),
    }
}

/// A warning for KVMs that are not plain hardware virtualization.
fn kvm_kind(emulated_cpl0: bool, in_a_vm: bool) -> Check {
    if emulated_cpl0 {
        Check::new(
            "kvm-kind",
            false,
            Status::Warn,
            "nested PVM KVM without VT-x/AMD-V (kvm_pvm): guest kernel code is emulated, about 1000x slower; a Linux boot takes ~15 s instead of under 1 s, firmware (BIOS/UEFI) boots take minutes, and stock distribution kernels cannot boot (the default guest's kernel is patched for it)",
        )
        .fix("for full speed, run on hardware with VT-x/AMD-V or on a host that offers nested VT-x")
    } else if in_a_vm {
        Check::new(
            "kvm-kind",
            false,
            Status::Warn,
            "nested KVM (this host is itself a VM): guests run at near full speed, but every VM exit costs several times more than on bare metal",
        )
    } else {
        Check::new("kvm-kind", false, Status::Ok, "hardware virtualization")
    }
}

fn running_in_a_vm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
    })
}

fn group_name(gid: u32) -> Option<String> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _pw = f.next()?;
        (f.next()? == gid.to_string()).then(|| name.to_string())
    })
}

fn libslirp() -> Check {
    match net::nat::libslirp_version() {
        Ok(v) => Check::new(
            "libslirp",
            true,
            Status::Ok,
            format!("libslirp {v} (the NAT network managed VMs get by default)"),
        ),
        Err(why) => Check::new(
            "libslirp",
            true,
            Status::Fail,
            format!(
                "the NAT network (--net nat, every managed VM's default NIC) needs libslirp: {why}"
            ),
        )
        .fix(net::nat::LIBSLIRP_HINT),
    }
}

fn default_guest() -> Check {
    let dir = crate::default_guest_dir();
    let missing: Vec<&str> = ["vmlinux", "initramfs.cpio"]
        .into_iter()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if missing.is_empty() {
        Check::new(
            "default-guest",
            false,
            Status::Ok,
            format!("built in {}", dir.display()),
        )
    } else {
        Check::new(
            "default-guest",
            false,
            Status::Warn,
            format!(
                "not built ({} missing in {}): `run`/`create` without --kernel need it",
                missing.join(", "),
                dir.display()
            ),
        )
        .fix("bash guest/build.sh (in hostvisor's source tree)")
    }
}

fn on_path(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn qemu_img() -> Check {
    match on_path("qemu-img") {
        Some(p) => Check::new(
            "qemu-img",
            false,
            Status::Ok,
            format!("{} (optional: images from and for QEMU)", p.display()),
        ),
        None => Check::new(
            "qemu-img",
            false,
            Status::Warn,
            "not installed (optional: hostvisor disk does the same; qemu-img checks images independently)",
        )
        .fix("apt install qemu-utils"),
    }
}

/// Whether this process may open `path` for reading and writing.
fn accessible(path: &str) -> std::io::Result<()> {
    let c = CString::new(path).map_err(std::io::Error::other)?;
    // SAFETY: a valid NUL-terminated path; access(2) only reads it.
    if unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether this process has CAP_NET_ADMIN (to create TAP devices).
fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
    })
}

fn tap() -> Check {
    const TUN: &str = "/dev/net/tun";
    let is_device = std::fs::metadata(TUN).is_ok_and(|m| m.file_type().is_char_device());
    if !is_device {
        return Check::new(
            "tap",
            false,
            Status::Warn,
            format!(
                "{TUN} is missing: --net tap=IFNAME cannot work (nat and internal networks can)"
            ),
        )
        .fix("sudo modprobe tun");
    }
    if let Err(e) = accessible(TUN) {
        return Check::new(
            "tap",
            false,
            Status::Warn,
            format!("{TUN} cannot be opened ({e}): --net tap=IFNAME cannot work"),
        )
        .fix(format!("sudo chmod 0666 {TUN} (its usual mode)"));
    }
    if has_net_admin() {
        Check::new(
            "tap",
            false,
            Status::Ok,
            "TAP devices can be created and attached (CAP_NET_ADMIN)",
        )
    } else {
        Check::new(
            "tap",
            false,
            Status::Ok,
            "TAP devices made for this user can be attached (creating one needs root)",
        )
        .fix("to make one: sudo ip tuntap add hv0 mode tap user $USER && sudo ip link set hv0 up")
    }
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn hugepages() -> Check {
    let total = meminfo("HugePages_Total").unwrap_or(0);
    let free = meminfo("HugePages_Free").unwrap_or(0);
    let size_kib = meminfo("Hugepagesize").unwrap_or(2048);
    if total == 0 {
        Check::new(
            "hugepages",
            false,
            Status::Ok,
            "none reserved (only needed to back guest RAM with huge pages)",
        )
        .fix("to reserve 1 GiB of 2 MiB pages: echo 512 | sudo tee /proc/sys/vm/nr_hugepages")
    } else {
        Check::new(
            "hugepages",
            false,
            Status::Ok,
            format!(
                "{total} reserved of {} KiB, {free} free ({} MiB)",
                size_kib,
                free * size_kib / 1024
            ),
        )
    }
}

fn read_number(path: impl AsRef<Path>) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn user_namespaces() -> Check {
    let max = read_number("/proc/sys/user/max_user_namespaces");
    let debian = read_number("/proc/sys/kernel/unprivileged_userns_clone");
    let apparmor = read_number("/proc/sys/kernel/apparmor_restrict_unprivileged_userns");
    let (status, message, fix) = if max == Some(0) {
        (
            Status::Warn,
            "user namespaces are turned off (user.max_user_namespaces = 0)",
            "sudo sysctl -w user.max_user_namespaces=15000",
        )
    } else if debian == Some(0) {
        (
            Status::Warn,
            "unprivileged user namespaces are turned off (kernel.unprivileged_userns_clone = 0)",
            "sudo sysctl -w kernel.unprivileged_userns_clone=1",
        )
    } else if apparmor == Some(1) {
        (
            Status::Warn,
            "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1)",
            "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile for hostvisor",
        )
    } else {
        (
            Status::Ok,
            "unprivileged user namespaces are available (for sandboxing VM processes)",
            "",
        )
    };
    Check::new("user-namespaces", false, status, message).fix(fix)
}

/// Landlock, which confines each VM process's file access
/// (docs/security.md); without it VMs run unconfined.
fn landlock() -> Check {
    match vmm::sandbox::landlock_abi() {
        Ok(abi) => Check::new(
            "landlock",
            false,
            Status::Ok,
            format!("Landlock is available (ABI version {abi}): VM processes open only their own files"),
        ),
        Err(e) => Check::new(
            "landlock",
            false,
            Status::Warn,
            format!("Landlock is not available ({e}): VM processes run with the user's whole file access"),
        )
        .fix("a kernel 5.13 or later with CONFIG_SECURITY_LANDLOCK=y and landlock in its lsm= list"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_kvm_names_the_fix_for_each_reason() {
        let missing = kvm_unusable("/dev/kvm", Some(libc::ENOENT), "cannot open /dev/kvm");
        assert_eq!(missing.status, Status::Fail);
        assert!(missing.required);
        assert!(
            missing.fix.contains("modprobe kvm_intel"),
            "{}",
            missing.fix
        );
        let denied = kvm_unusable("/nonexistent/kvm", Some(libc::EACCES), "denied");
        assert!(denied.fix.contains("usermod -aG kvm"), "{}", denied.fix);
    }

    #[test]
    fn kvm_kind_warns_about_emulating_and_nested_kvms() {
        let pvm = kvm_kind(true, true);
        assert_eq!(pvm.status, Status::Warn);
        assert!(pvm.message.contains("1000x slower"));
        assert_eq!(kvm_kind(false, true).status, Status::Warn);
        assert_eq!(kvm_kind(false, false).status, Status::Ok);
    }

    #[test]
    fn group_names_come_from_etc_group() {
        assert_eq!(group_name(0).as_deref(), Some("root"));
    }
}
