//! A cgroup v2 of its own for a managed VM's process, where the host lets
//! hostvisor have one: `create --cpu-limit 50% --memory-limit 1G` (and
//! `edit`) store the limits; at start the VM process makes the group,
//! writes `cpu.max` and `memory.max` and moves itself in (all its
//! threads: vCPUs, device workers, API).
//!
//! Where: as root, `hostvisor.slice/NAME` under the cgroup v2 mount;
//! otherwise a child of the process's own cgroup, which works where that
//! cgroup was delegated (`systemd-run --user --scope -p Delegate=yes`).
//! When the controllers are not there (no cgroup v2, a hybrid host whose
//! cpu and memory controllers sit on cgroup v1, a cgroup not delegated),
//! a VM with limits does not start and says why; a VM without limits
//! never touches cgroups.

use std::io::Write;
use std::path::{Path, PathBuf};

use vmm::config::{HostLimits, MemorySize};

/// `--cpu-limit` and `--memory-limit` for `create` and `edit`.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Cap the VM process's CPU time (cgroup v2 cpu.max): a percentage of
    /// one host CPU, like 50% or 200%; none removes the cap.
    #[arg(long, value_name = "PERCENT", value_parser = cpu_arg)]
    pub cpu_limit: Option<Limit<u32>>,
    /// Cap the VM process's memory, guest RAM included (cgroup v2
    /// memory.max): a size like 1G, at least the guest's memory; none
    /// removes the cap.
    #[arg(long, value_name = "SIZE", value_parser = memory_arg)]
    pub memory_limit: Option<Limit<MemorySize>>,
}

/// A limit, or `none` (no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit<T>(pub Option<T>);

fn cpu_arg(s: &str) -> Result<Limit<u32>, String> {
    if s == "none" {
        return Ok(Limit(None));
    }
    parse_cpu_limit(s).map(|n| Limit(Some(n)))
}

fn memory_arg(s: &str) -> Result<Limit<MemorySize>, String> {
    if s == "none" {
        return Ok(Limit(None));
    }
    parse_memory_limit(s).map(|n| Limit(Some(n)))
}

impl LimitArgs {
    /// Sets the limits given (what is not given stays) and checks them
    /// against the guest's memory.
    pub fn apply(&self, config: &mut vmm::VmConfig) -> Result<(), String> {
        if let Some(Limit(cpu)) = self.cpu_limit {
            config.limits.cpu_percent = cpu;
        }
        if let Some(Limit(memory)) = self.memory_limit {
            config.limits.memory = memory;
        }
        check(&config.limits, config.memory)
    }
}

/// The scheduler period written to `cpu.max`, µs (the kernel's default).
const PERIOD_US: u64 = 100_000;
/// The largest `--cpu-limit`: 1024 CPUs' worth.
const MAX_CPU_PERCENT: u32 = 102_400;
/// Where a root hostvisor puts its VMs' groups, under the mount.
const SLICE: &str = "hostvisor.slice";

/// Why a VM's limits could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("CPU and memory limits need cgroup v2, and no cgroup2 file system is mounted")]
    NoCgroup2,
    #[error("cannot tell this process's cgroup from /proc/self/cgroup")]
    NoOwnGroup,
    #[error(
        "the {controller} controller is not available in {} (on a host whose cgroup v2 \
         lacks it — a hybrid hierarchy keeps it on cgroup v1 — the VM cannot be limited)",
        parent.display()
    )]
    NoController {
        controller: &'static str,
        parent: PathBuf,
    },
    #[error(
        "cannot set up {} for the VM's limits (they need root, or a cgroup delegated \
         to hostvisor, e.g. under `systemd-run --user --scope -p Delegate=yes`)",
        path.display()
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `--cpu-limit`: a percentage of one host CPU, `50%` or `50` (`200%`:
/// two CPUs' worth).
pub fn parse_cpu_limit(s: &str) -> Result<u32, String> {
    let digits = s.trim().strip_suffix('%').unwrap_or(s.trim());
    match digits.parse::<u32>() {
        Ok(0) => Err("a CPU limit must be at least 1%".into()),
        Ok(n) if n <= MAX_CPU_PERCENT => Ok(n),
        Ok(_) => Err(format!("`{s}` is more than {MAX_CPU_PERCENT}% (1024 CPUs)")),
        Err(_) => Err(format!(
            "use a whole percentage of one host CPU, like 50% or 200%, not `{s}`"
        )),
    }
}

/// `--memory-limit`: a size like `1G` (the whole process: guest RAM and
/// the VMM's own).
pub fn parse_memory_limit(s: &str) -> Result<MemorySize, String> {
    let size: MemorySize = s
        .parse()
        .map_err(|e: vmm::config::SizeError| e.to_string())?;
    if size.bytes() < 1 << 20 {
        return Err(format!(
            "a memory limit of {size} is too small (at least 1M)"
        ));
    }
    Ok(size)
}

/// Refuses limits a VM of `memory` could not run under: a process limit
/// below its guest RAM ends in the OOM killer once the guest uses it.
pub fn check(limits: &HostLimits, memory: MemorySize) -> Result<(), String> {
    match limits.memory {
        Some(max) if max < memory => Err(format!(
            "--memory-limit {max} is below the guest's memory ({memory}): the VM would be \
             killed once the guest used its RAM; leave room for the VMM too"
        )),
        _ => Ok(()),
    }
}

/// Where cgroups are and which one this process is in.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The cgroup2 mount point.
    pub mount: PathBuf,
    /// This process's group, relative to the mount.
    pub own: PathBuf,
    /// Running as root: groups go under [`SLICE`].
    pub root: bool,
}

impl Layout {
    /// This host's layout, read from /proc.
    pub fn detect() -> Result<Layout, CgroupError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io(Path::new("/proc/self/mountinfo")))?;
        let mount = cgroup2_mount(&mountinfo).ok_or(CgroupError::NoCgroup2)?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(io(Path::new("/proc/self/cgroup")))?;
        let own = own_group(&own).ok_or(CgroupError::NoOwnGroup)?;
        // SAFETY: geteuid has no arguments and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        Ok(Layout { mount, own, root })
    }

    /// The group that holds VM `name`'s group.
    fn parent(&self) -> PathBuf {
        if self.root {
            self.mount.join(SLICE)
        } else {
            self.mount.join(&self.own)
        }
    }
}

/// The cgroup2 mount point in /proc/self/mountinfo's text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent dev root mountpoint options [optional...] - fstype ...
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next()? == "cgroup2")
            .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// The v2 group in /proc/self/cgroup's text (`0::/PATH`), relative.
fn own_group(text: &str) -> Option<PathBuf> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim().trim_start_matches('/')))
}

/// Moves this process into VM `name`'s group with `limits`, if any were
/// asked; returns the group.
pub fn enter(name: &str, limits: &HostLimits) -> Result<Option<PathBuf>, CgroupError> {
    if limits.is_unset() {
        return Ok(None);
    }
    let layout = Layout::detect()?;
    enter_at(&layout, name, limits, std::process::id()).map(Some)
}

/// [`enter`] with a given layout and process (tests use a directory that
/// plays the cgroup file system).
pub fn enter_at(
    layout: &Layout,
    name: &str,
    limits: &HostLimits,
    pid: u32,
) -> Result<PathBuf, CgroupError> {
    let mut wanted = Vec::new();
    if limits.cpu_percent.is_some() {
        wanted.push("cpu");
    }
    if limits.memory.is_some() {
        wanted.push("memory");
    }
    let parent = layout.parent();
    if layout.root {
        // The root group always may enable controllers for its children.
        let mount = layout.mount.clone();
        check_controllers(&mount, &wanted)?;
        std::fs::create_dir_all(&parent).map_err(io(&parent))?;
        enable(&mount, &wanted)?;
    }
    check_controllers(&parent, &wanted)?;
    enable(&parent, &wanted)?;
    let group = parent.join(name);
    match std::fs::create_dir(&group) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(&group)(e)),
    }
    if let Some(percent) = limits.cpu_percent {
        let quota = u64::from(percent) * PERIOD_US / 100;
        write(&group.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
    }
    if let Some(max) = limits.memory {
        write(&group.join("memory.max"), &max.bytes().to_string())?;
    }
    write(&group.join("cgroup.procs"), &pid.to_string())?;
    Ok(group)
}

/// Refuses a parent whose group cannot hand its children `wanted`.
fn check_controllers(group: &Path, wanted: &[&'static str]) -> Result<(), CgroupError> {
    let path = group.join("cgroup.controllers");
    let available = std::fs::read_to_string(&path).map_err(io(&path))?;
    for &controller in wanted {
        if !available.split_whitespace().any(|c| c == controller) {
            return Err(CgroupError::NoController {
                controller,
                parent: group.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Enables `wanted` for `group`'s children.
fn enable(group: &Path, wanted: &[&str]) -> Result<(), CgroupError> {
    let path = group.join("cgroup.subtree_control");
    let on = std::fs::read_to_string(&path).unwrap_or_default();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|c| !on.split_whitespace().any(|o| o == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(&path, &missing.join(" "))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all(value.as_bytes()).map_err(io(path))
}

/// Removes VM `name`'s group when the VM is deleted (best effort: it is
/// empty once its process ended).
pub fn remove(name: &str) {
    if let Ok(layout) = Layout::detect() {
        let _ = std::fs::remove_dir(layout.parent().join(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_limits_parse() {
        assert_eq!(parse_cpu_limit("50%"), Ok(50));
        assert_eq!(parse_cpu_limit("200"), Ok(200));
        for (bad, needle) in [
            ("0%", "at least 1%"),
            ("half", "whole percentage"),
            ("50.5%", "whole percentage"),
            ("-5%", "whole percentage"),
            ("999999%", "more than"),
            ("99999999999999%", "whole percentage"),
        ] {
            let e = parse_cpu_limit(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn memory_limits_parse_and_must_hold_the_guest() {
        assert_eq!(parse_memory_limit("1G"), Ok(MemorySize(1 << 30)));
        assert_eq!(parse_memory_limit("1GiB"), Ok(MemorySize(1 << 30)));
        assert!(parse_memory_limit("0").unwrap_err().contains("too small"));
        assert!(parse_memory_limit("lots")
            .unwrap_err()
            .contains("invalid size"));
        let limits = HostLimits {
            cpu_percent: None,
            memory: Some(MemorySize::mib(128)),
        };
        let e = check(&limits, MemorySize::mib(256)).unwrap_err();
        assert!(e.contains("below the guest's memory (256M)"), "{e}");
        assert!(check(&limits, MemorySize::mib(64)).is_ok());
    }

    #[test]
    fn the_mount_and_own_group_are_found() {
        let info = "22 1 0:20 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                    30 22 0:26 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("22 1 0:20 / /x rw - tmpfs tmpfs rw\n"), None);
        let own = "4:memory:/a\n0::/user.slice/session-1.scope\n";
        assert_eq!(
            own_group(own),
            Some(PathBuf::from("user.slice/session-1.scope"))
        );
    }

    /// A directory playing cgroupfs: the files the kernel would have.
    fn fake_mount(name: &str, controllers: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hv-cg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
        std::fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
        dir
    }

    #[test]
    fn as_root_the_group_goes_under_the_slice_with_its_limits() {
        let mount = fake_mount("root", "cpuset cpu io memory pids");
        // The kernel gives a new group these files; the fake gets them
        // before enter_at looks.
        let slice = mount.join(SLICE);
        std::fs::create_dir_all(&slice).unwrap();
        std::fs::write(slice.join("cgroup.controllers"), "cpu memory").unwrap();
        let layout = Layout {
            mount: mount.clone(),
            own: PathBuf::from("user.slice"),
            root: true,
        };
        let limits = HostLimits {
            cpu_percent: Some(50),
            memory: Some(MemorySize(1 << 30)),
        };
        let group = enter_at(&layout, "web", &limits, 4242).unwrap();
        assert_eq!(group, slice.join("web"));
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(group.join("cpu.max")), "50000 100000");
        assert_eq!(read(group.join("memory.max")), "1073741824");
        assert_eq!(read(group.join("cgroup.procs")), "4242");
        assert_eq!(read(mount.join("cgroup.subtree_control")), "+cpu +memory");
        assert_eq!(read(slice.join("cgroup.subtree_control")), "+cpu +memory");
        // Starting again reuses the group.
        enter_at(&layout, "web", &limits, 4243).unwrap();
        let _ = std::fs::remove_dir_all(&mount);
    }

    #[test]
    fn a_missing_controller_is_a_clear_error() {
        // This host's kind: cgroup2 with only hugetlb (cpu and memory on v1).
        let mount = fake_mount("hybrid", "hugetlb");
        std::fs::create_dir_all(mount.join("me")).unwrap();
        std::fs::write(mount.join("me/cgroup.controllers"), "hugetlb").unwrap();
        let layout = Layout {
            mount: mount.clone(),
            own: PathBuf::from("me"),
            root: false,
        };
        let limits = HostLimits {
            cpu_percent: Some(50),
            memory: None,
        };
        let e = enter_at(&layout, "web", &limits, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("the cpu controller is not available"), "{e}");
        assert!(!mount.join("me/web").exists(), "nothing made");
        let _ = std::fs::remove_dir_all(&mount);
    }

    #[test]
    fn no_limits_touch_nothing() {
        assert_eq!(enter("web", &HostLimits::default()).unwrap(), None);
    }
}
