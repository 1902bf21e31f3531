//! The allow-lists, one per thread kind, and their compilation.
//!
//! Each list names the system calls a thread of that kind makes once its
//! setup is over (found by tracing the e2e suite: docs/security.md tells
//! how to redo that), on top of [`BASE`], what the Rust runtime and libc
//! need on any thread. `ioctl` is allowed by request number where that is
//! cheap to check: vCPU threads may issue KVM ioctls only (request type
//! 0xAE). The control and spawner threads allow the union of every list:
//! the control thread builds machines (a managed VM's process builds a new
//! one after a restore through its API) and starts threads; the spawner
//! starts every other thread, whose own filter then narrows it.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::{SeccompError, SeccompMode};

/// The kinds of thread a VMM process runs, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: builds the machine, runs its control loop, takes
    /// and restores snapshots.
    Control,
    /// Starts the other threads (see [`crate::spawn`]).
    Spawner,
    /// A vCPU: `KVM_RUN` and the device emulation of its exits.
    Vcpu,
    /// The virtio-blk worker.
    Block,
    /// The virtio-net worker.
    Net,
    /// The virtio-rng worker.
    Rng,
    /// The virtio-console worker.
    Console,
    /// The virtio-vsock worker (its Unix-socket muxer).
    Vsock,
    /// The virtio-fs worker (passthrough file system).
    Fs,
    /// The virtio-balloon worker.
    Balloon,
    /// A device worker of another name (tests).
    OtherDevice,
    /// The user-mode NAT (libslirp) thread.
    Nat,
    /// The per-VM API server and its connections.
    Api,
    /// The console input (stdin) thread.
    ConsoleInput,
}

impl ThreadKind {
    /// Every kind, in [`index`](Self::index) order.
    pub const ALL: [ThreadKind; 14] = [
        ThreadKind::Control,
        ThreadKind::Spawner,
        ThreadKind::Vcpu,
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Rng,
        ThreadKind::Console,
        ThreadKind::Vsock,
        ThreadKind::Fs,
        ThreadKind::Balloon,
        ThreadKind::OtherDevice,
        ThreadKind::Nat,
        ThreadKind::Api,
        ThreadKind::ConsoleInput,
    ];

    /// Its place in [`ALL`](Self::ALL).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Its name (in reports and `HOSTVISOR_SECCOMP_TEST_DENY`).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Control => "control",
            ThreadKind::Spawner => "spawner",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Block => "virtio-blk",
            ThreadKind::Net => "virtio-net",
            ThreadKind::Rng => "virtio-rng",
            ThreadKind::Console => "virtio-console",
            ThreadKind::Vsock => "virtio-vsock",
            ThreadKind::Fs => "virtio-fs",
            ThreadKind::Balloon => "virtio-balloon",
            ThreadKind::OtherDevice => "device",
            ThreadKind::Nat => "nat",
            ThreadKind::Api => "api",
            ThreadKind::ConsoleInput => "console-input",
        }
    }

    /// The kind of a device worker thread named `name` (its device's
    /// name, as `WorkerThread` names them).
    pub fn for_worker(name: &str) -> ThreadKind {
        [
            ThreadKind::Block,
            ThreadKind::Net,
            ThreadKind::Rng,
            ThreadKind::Console,
            ThreadKind::Vsock,
            ThreadKind::Fs,
            ThreadKind::Balloon,
        ]
        .into_iter()
        .find(|k| k.name() == name)
        .unwrap_or(ThreadKind::OtherDevice)
    }
}

/// What any thread needs: memory, futexes, signals, time, thread exit,
/// logging to stderr, and what a panic does before it aborts. `ioctl`
/// here is `TCSETS` and `KVM_SIGNAL_MSI` only (a pc machine's device
/// workers raise MSI-X vectors), unless the kind's list has it: the handler that
/// restores the terminal on SIGTERM (vmm::console) runs on any thread.
const BASE: &[&str] = &[
    "brk",
    "ioctl",
    "rt_sigaction",
    "clock_gettime",
    "clock_nanosleep",
    "close",
    "exit",
    "exit_group",
    "futex",
    "getpid",
    // GLib's g_rand_new (libslirp makes one per NAT engine) mixes in the
    // parent's pid when it cannot read /dev/urandom — as under Landlock,
    // when a restore in place builds a new NAT engine.
    "getppid",
    "getrandom",
    // `--user`: glibc makes every thread switch ids (its set*id broadcast
    // runs the calls on each thread; the drop's check that setuid(0) now
    // fails too). They can only keep or lower what the process holds: an
    // unprivileged thread cannot regain root.
    "setgid",
    "setgroups",
    "setresgid",
    "setresuid",
    "setuid",
    "gettid",
    "madvise",
    "mmap",
    "mprotect",
    "mremap",
    "munmap",
    "nanosleep",
    "prctl",
    "restart_syscall",
    "rseq",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sched_getaffinity",
    "sched_yield",
    "set_robust_list",
    "sigaltstack",
    "tgkill",
    "write",
    "writev",
];

/// Waiting on eventfds and sockets with epoll (every device worker).
const EPOLL: &[&str] = &[
    "epoll_create1",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_wait",
    "eventfd2",
    "fcntl",
    "read",
    "timerfd_create",
    "timerfd_settime",
    "timerfd_gettime",
];

const VCPU: &[&str] = &[
    "ioctl", // KVM requests and two others (see `vcpu_ioctl_rules`)
    // A device the guest activates or resets from this thread sets up
    // its events (the worker itself starts through the spawner).
    "epoll_create1",
    "epoll_ctl",
    "timerfd_create",
    "timerfd_settime",
    "read",
    "pread64",
    "pwrite64",
    "lseek",
    "fsync",
    "fdatasync",
    "eventfd2",
    "fcntl",
    "dup",
    "statx",
    "fstat",
    "newfstatat",
];

const BLOCK: &[&str] = &[
    "pread64",
    "preadv",
    "preadv2",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "lseek",
    "fsync",
    "fdatasync",
    "fallocate",
    "ftruncate",
    "fstat",
    "statx",
    "newfstatat",
    "io_uring_enter",
];

/// TAP (`readv`/`writev`, offloads by `ioctl`), NAT and internal
/// switch sockets; the switch lists its network's directory for peers
/// (`openat` of directories only, see [`special_rules`]) and removes its
/// socket when it goes.
const NET: &[&str] = &[
    "readv",
    "writev",
    "recvfrom",
    "recvmsg",
    "sendmsg",
    "sendto",
    "poll",
    "ppoll",
    "ioctl",
    "openat",
    "getdents64",
    "newfstatat",
    "statx",
    "fstat",
    "lseek",
    "unlink",
];

const RNG: &[&str] = &[];

const CONSOLE: &[&str] = &["poll", "ppoll", "dup", "fstat", "statx"];

const VSOCK: &[&str] = &[
    "accept4",
    "bind",
    "connect",
    "getsockopt",
    "listen",
    "recvfrom",
    "recvmsg",
    "sendmsg",
    "sendto",
    "setsockopt",
    "shutdown",
    "socket",
    "socketpair",
    "unlink",
    "unlinkat",
    "poll",
    "ppoll",
    "ioctl",
];

const FS: &[&str] = &[
    "openat",
    "openat2",
    "open_tree",
    "name_to_handle_at",
    "open_by_handle_at",
    "newfstatat",
    "fstat",
    "statx",
    "statfs",
    "fstatfs",
    "getdents64",
    "lseek",
    "pread64",
    "preadv",
    "preadv2",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "readlinkat",
    "mkdirat",
    "mknodat",
    "unlinkat",
    "renameat",
    "renameat2",
    "linkat",
    "symlinkat",
    "fchmod",
    "fchmodat",
    "fchown",
    "fchownat",
    "ftruncate",
    "fallocate",
    "fsync",
    "fdatasync",
    "utimensat",
    "fgetxattr",
    "fsetxattr",
    "flistxattr",
    "fremovexattr",
    "getxattr",
    "setxattr",
    "listxattr",
    "removexattr",
    "lgetxattr",
    "lsetxattr",
    "llistxattr",
    "lremovexattr",
    "dup",
    "flock",
    "copy_file_range",
    "umask",
    "setresuid",
    "setresgid",
    "setfsuid",
    "setfsgid",
    "capget",
    "capset",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "ioctl",
    "mkdir",
    "readlink",
    "fchdir",
    "getcwd",
    "faccessat",
    "faccessat2",
    "syncfs",
];

const BALLOON: &[&str] = &["fallocate", "madvise", "mincore"];

const NAT: &[&str] = &[
    "poll",
    "ppoll",
    "read",
    "readv",
    "recvfrom",
    "recvmsg",
    "sendmsg",
    "sendto",
    "socket",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "getsockname",
    "getpeername",
    "getsockopt",
    "setsockopt",
    "shutdown",
    "fcntl",
    "ioctl",
    "eventfd2",
    "pipe2",
    "openat",
    "fstat",
    "statx",
    "newfstatat",
    "lseek",
    "uname",
    "writev",
    "getrandom",
];

/// The API thread makes its socket, tiny_http's threads accept and read
/// connections, requests read and write the VM's store (snapshots,
/// console log) and reach the guest agent through the vsock muxer.
const API: &[&str] = &[
    "accept",
    "accept4",
    "bind",
    "listen",
    "chmod",
    "fchmod",
    "fchmodat",
    "unlink",
    "unlinkat",
    "mkdir",
    "mkdirat",
    "rename",
    "renameat",
    "renameat2",
    "flock",
    "fsync",
    "fdatasync",
    "ftruncate",
    "pread64",
    "pwrite64",
    "readlink",
    "getsockname",
    "getpeername",
    "ioctl",
    "kill",
    "pipe2",
    "eventfd2",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "poll",
    "ppoll",
    "read",
    "recvfrom",
    "recvmsg",
    "sendmsg",
    "sendto",
    "socket",
    "connect",
    "setsockopt",
    "getsockopt",
    "shutdown",
    "fcntl",
    "openat",
    "fstat",
    "statx",
    "newfstatat",
    "lseek",
    "getdents64",
    "readlinkat",
    "clone3",
    "clone",
];

const CONSOLE_INPUT: &[&str] = &["read", "poll", "ppoll", "ioctl", "fcntl"];

/// What the control thread needs beyond every other list (building
/// machines, snapshots, starting threads).
const CONTROL: &[&str] = &[
    "access",
    "arch_prctl",
    "chmod",
    "clone",
    "clone3",
    "dup2",
    "dup3",
    "execve",
    "fadvise64",
    "flock",
    "getcwd",
    "getdents64",
    "getsockname",
    "memfd_create",
    "mincore",
    "mlock",
    "mlock2",
    "munlock",
    "msync",
    "prlimit64",
    "readlink",
    "rename",
    "rt_sigaction",
    "sched_setaffinity",
    "seccomp",
    "set_tid_address",
    "sysinfo",
    "umask",
    "unlink",
    "uname",
    "wait4",
    "userfaultfd",
];

/// The calls a kind allows beyond [`BASE`].
fn extra(kind: ThreadKind) -> &'static [&'static [&'static str]] {
    match kind {
        ThreadKind::Vcpu => &[VCPU],
        ThreadKind::Block => &[EPOLL, BLOCK],
        ThreadKind::Net => &[EPOLL, NET],
        ThreadKind::Rng => &[EPOLL, RNG],
        ThreadKind::Console => &[EPOLL, CONSOLE],
        ThreadKind::Vsock => &[EPOLL, VSOCK],
        ThreadKind::Fs => &[EPOLL, FS],
        ThreadKind::Balloon => &[EPOLL, BALLOON],
        ThreadKind::OtherDevice => &[EPOLL, BLOCK, NET, CONSOLE, VSOCK, FS, BALLOON],
        ThreadKind::Nat => &[NAT],
        ThreadKind::Api => &[API],
        ThreadKind::ConsoleInput => &[CONSOLE_INPUT],
        ThreadKind::Control | ThreadKind::Spawner => &[
            VCPU,
            EPOLL,
            BLOCK,
            NET,
            CONSOLE,
            VSOCK,
            FS,
            BALLOON,
            NAT,
            API,
            CONSOLE_INPUT,
            CONTROL,
        ],
    }
}

/// The names `kind` allows (sorted, without repeats).
pub fn allowed(kind: ThreadKind) -> Vec<&'static str> {
    let mut names: Vec<&str> = BASE.to_vec();
    for list in extra(kind) {
        names.extend_from_slice(list);
    }
    names.sort_unstable();
    names.dedup();
    names
}

/// `TCSETS` (the terminal restored on a fatal signal).
const TCSETS: u64 = 0x5402;
/// `FIONBIO` (a descriptor made non-blocking: `set_nonblocking`).
const FIONBIO: u64 = 0x5421;
/// `FIOCLEX` (close-on-exec).
const FIOCLEX: u64 = 0x5451;

/// The vCPU's ioctls: a KVM request (type 0xAE, `_IOC_TYPE` in bits
/// 8–15) or making a descriptor non-blocking or close-on-exec (devices
/// the guest activates set up their sockets).
fn vcpu_ioctl_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let request = |op, value| SeccompCondition::new(1, SeccompCmpArgLen::Dword, op, value);
    Ok(vec![
        SeccompRule::new(vec![request(SeccompCmpOp::MaskedEq(0xff00), 0xae00)?])?,
        SeccompRule::new(vec![request(SeccompCmpOp::Eq, FIONBIO)?])?,
        SeccompRule::new(vec![request(SeccompCmpOp::Eq, FIOCLEX)?])?,
        SeccompRule::new(vec![request(SeccompCmpOp::Eq, TCSETS)?])?,
    ])
}

/// `KVM_SIGNAL_MSI` (`_IOW(0xAE, 0xa5, struct kvm_msi)`, 32 bytes): on
/// the pc machine a device worker raises its queue's MSI-X vector itself.
const KVM_SIGNAL_MSI: u64 = 0x4020_aea5;

/// `TCSETS` and `KVM_SIGNAL_MSI` only (kinds whose lists do not name
/// `ioctl`).
fn terminal_ioctl_rules() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let request =
        |value| SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value);
    Ok(vec![
        SeccompRule::new(vec![request(TCSETS)?])?,
        SeccompRule::new(vec![request(KVM_SIGNAL_MSI)?])?,
    ])
}

/// Argument checks a kind puts on a call beyond `ioctl`'s; `None`: any
/// arguments.
fn special_rules(
    kind: ThreadKind,
    name: &str,
) -> Result<Option<Vec<SeccompRule>>, seccompiler::BackendError> {
    match (kind, name) {
        // The net worker opens directories only (the switch's peers).
        (ThreadKind::Net, "openat") => {
            Ok(Some(vec![SeccompRule::new(vec![SeccompCondition::new(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(libc::O_DIRECTORY as u64),
                libc::O_DIRECTORY as u64,
            )?])?]))
        }
        _ => Ok(None),
    }
}

/// Whether `kind`'s own lists allow `ioctl` with any request.
fn any_ioctl(kind: ThreadKind) -> bool {
    kind != ThreadKind::Vcpu && extra(kind).iter().any(|list| list.contains(&"ioctl"))
}

/// Builds `kind`'s filter for `mode`.
pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    build(kind, mismatch)
}

/// `kind`'s filter, doing `mismatch` for a call it does not allow.
fn build(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let fail = |e| SeccompError::Compile(kind.name(), e);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for name in allowed(kind) {
        let Some(nr) = crate::syscall_number(name) else {
            // A unit test keeps every name known.
            continue;
        };
        let rule = match name {
            "ioctl" if kind == ThreadKind::Vcpu => vcpu_ioctl_rules().map_err(fail)?,
            "ioctl" if !any_ioctl(kind) => terminal_ioctl_rules().map_err(fail)?,
            _ => special_rules(kind, name).map_err(fail)?.unwrap_or_default(),
        };
        rules.insert(nr, rule);
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(fail)?;
    BpfProgram::try_from(filter).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_a_known_call() {
        for kind in ThreadKind::ALL {
            for name in allowed(kind) {
                assert!(
                    crate::syscall_number(name).is_some(),
                    "{name} in the {} list",
                    kind.name()
                );
            }
        }
    }

    #[test]
    fn every_filter_compiles() {
        for mode in [SeccompMode::On, SeccompMode::Log] {
            for kind in ThreadKind::ALL {
                let program = compile(kind, mode).unwrap();
                assert!(!program.is_empty(), "{}", kind.name());
            }
        }
    }

    #[test]
    fn kinds_are_indexed_in_order() {
        for (i, kind) in ThreadKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i);
        }
    }

    #[test]
    fn ioctl_is_checked_where_the_list_does_not_need_it_whole() {
        assert!(!any_ioctl(ThreadKind::Vcpu));
        assert!(!any_ioctl(ThreadKind::Block));
        assert!(!any_ioctl(ThreadKind::Rng));
        assert!(any_ioctl(ThreadKind::Fs));
        assert!(any_ioctl(ThreadKind::Control));
    }

    #[test]
    fn workers_get_their_device_kind() {
        assert_eq!(ThreadKind::for_worker("virtio-blk"), ThreadKind::Block);
        assert_eq!(ThreadKind::for_worker("virtio-fs"), ThreadKind::Fs);
        assert_eq!(ThreadKind::for_worker("stuck"), ThreadKind::OtherDevice);
    }

    #[test]
    fn the_control_and_spawner_lists_hold_every_other() {
        let union = allowed(ThreadKind::Control);
        for kind in ThreadKind::ALL {
            for name in allowed(kind) {
                assert!(union.contains(&name), "{name} ({})", kind.name());
            }
        }
        assert_eq!(union, allowed(ThreadKind::Spawner));
    }

    #[test]
    fn device_workers_cannot_start_processes_or_open_sockets() {
        for kind in [
            ThreadKind::Block,
            ThreadKind::Rng,
            ThreadKind::Balloon,
            ThreadKind::Vcpu,
        ] {
            let names = allowed(kind);
            for banned in ["execve", "socket", "openat", "clone3", "ptrace"] {
                assert!(!names.contains(&banned), "{banned} in {}", kind.name());
            }
        }
    }

    /// The argument checks, installed in threads of their own (refusals
    /// give EPERM here instead of the trap, so the test process lives).
    #[test]
    fn argument_checks_hold() {
        let refuse = SeccompAction::Errno(libc::EPERM as u32);
        let net = build(ThreadKind::Net, refuse.clone()).unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&net).unwrap();
            assert!(std::fs::read_dir("/").is_ok(), "a directory opens");
            let file = std::fs::File::open("/proc/self/status");
            assert_eq!(file.unwrap_err().raw_os_error(), Some(libc::EPERM));
        })
        .join()
        .unwrap();
        let vcpu = build(ThreadKind::Vcpu, refuse).unwrap();
        std::thread::spawn(move || {
            seccompiler::apply_filter(&vcpu).unwrap();
            // SAFETY: ioctls on a bad descriptor touch no memory.
            unsafe {
                // KVM_GET_API_VERSION passes the filter (EBADF), TIOCGWINSZ not.
                assert_eq!(libc::ioctl(-1, 0xae00, 0), -1);
                assert_eq!(*libc::__errno_location(), libc::EBADF);
                assert_eq!(libc::ioctl(-1, libc::TIOCGWINSZ, 0), -1);
                assert_eq!(*libc::__errno_location(), libc::EPERM);
            }
        })
        .join()
        .unwrap();
    }

    /// A filter, installed in a thread of its own, lets the thread's
    /// allowed calls through and traps another (seen as SIGSYS with the
    /// call in `Log` mode's absence: here `Errno` replaces `Trap` so the
    /// test process survives).
    #[test]
    fn an_installed_list_allows_its_calls_and_refuses_others() {
        std::thread::spawn(|| {
            let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
            for name in allowed(ThreadKind::Rng) {
                rules.insert(crate::syscall_number(name).unwrap(), Vec::new());
            }
            let filter = SeccompFilter::new(
                rules,
                SeccompAction::Errno(libc::EPERM as u32),
                SeccompAction::Allow,
                TargetArch::x86_64,
            )
            .unwrap();
            let program = BpfProgram::try_from(filter).unwrap();
            seccompiler::apply_filter(&program).unwrap();
            // SAFETY: getsid(0) only reads the session id; the filter
            // refuses it.
            let refused = unsafe { libc::getsid(0) };
            assert_eq!(refused, -1);
            // Allowed: memory and a write to stderr.
            let v = vec![1u8; 1 << 20];
            assert_eq!(v.len(), 1 << 20);
        })
        .join()
        .unwrap();
    }
}
