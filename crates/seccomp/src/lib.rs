//! seccomp filters for the threads of a VMM process, one per thread kind
//! (docs/security.md, "seccomp").
//!
//! A VMM process calls [`enable`] once, early, with the mode its
//! configuration asks for: that sets `no_new_privs`, installs the SIGSYS
//! handler ([`sigsys`]) and starts the spawner thread. Then every thread
//! calls [`apply`] with its [`ThreadKind`] when its setup is over: from
//! then on it can make only the system calls its kind's list allows
//! ([`filters`]); any other traps into the SIGSYS handler, which writes
//! one line naming the call and the thread to stderr and ends the process
//! with [`DENIED_EXIT_STATUS`]. Without [`enable`] (library users, unit
//! tests), [`apply`] does nothing.
//!
//! Filters are inherited by the threads a thread starts and stack with
//! theirs. A vCPU thread starts device workers (the guest activates a
//! device by a register write), so threads are started through
//! [`spawn`]: by the spawner thread, whose filter allows what every kind
//! allows, so a new thread gets only its own kind's restrictions.

pub mod filters;
mod names;
pub mod sigsys;
mod spawner;

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use seccompiler::BpfProgram;
use serde::{Deserialize, Serialize};

pub use filters::ThreadKind;
pub use spawner::spawn;

/// The exit status of a process one of whose threads made a forbidden
/// system call (128 + SIGSYS, as a shell reports a death by that signal).
pub const DENIED_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

/// Whether and how the filters act (`--seccomp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// A call outside the thread's list ends the process (SIGSYS report).
    #[default]
    On,
    /// A call outside the list is allowed and logged by the kernel
    /// (`SECCOMP_RET_LOG`: the audit log / `dmesg`), for finding what a
    /// list lacks.
    Log,
    /// No filters (`no_new_privs` is still set).
    Off,
}

impl SeccompMode {
    /// Whether this is the default (for `skip_serializing_if`).
    pub fn is_default(&self) -> bool {
        *self == SeccompMode::On
    }
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(SeccompMode::On),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            other => Err(format!("unknown seccomp mode {other:?} (on, log or off)")),
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompMode::On => "on",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

/// Why the filters could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    #[error("cannot build the seccomp filter of the {0} threads")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    #[error("cannot install the seccomp filter of the {0} threads (does the kernel have seccomp? --seccomp off runs without)")]
    Install(&'static str, #[source] seccompiler::Error),
    #[error("cannot start the thread spawner")]
    Spawner(#[source] std::io::Error),
}

/// 0: not enabled (no filters); else 1 + the mode's index.
static MODE: AtomicU8 = AtomicU8::new(0);

/// The compiled filters, by [`ThreadKind::index`].
static PROGRAMS: OnceLock<Vec<BpfProgram>> = OnceLock::new();

thread_local! {
    /// Whether this thread has its filter (one per thread: a thread that
    /// runs several machines in turn keeps its first).
    static INSTALLED: Cell<bool> = const { Cell::new(false) };
}

/// The mode [`enable`] set, if it was called.
pub fn mode() -> Option<SeccompMode> {
    match MODE.load(Ordering::Acquire) {
        1 => Some(SeccompMode::On),
        2 => Some(SeccompMode::Log),
        3 => Some(SeccompMode::Off),
        _ => None,
    }
}

/// Sets `no_new_privs` for the process and, unless `mode` is off,
/// compiles the filters, installs the SIGSYS handler and starts the
/// spawner. Called once per process before its threads start; later
/// calls keep the first mode.
pub fn enable(mode: SeccompMode) -> Result<(), SeccompError> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(SeccompError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    if self::mode().is_some() {
        return Ok(());
    }
    if mode != SeccompMode::Off {
        let mut programs = Vec::new();
        for kind in ThreadKind::ALL {
            programs.push(filters::compile(kind, mode)?);
        }
        let _ = PROGRAMS.set(programs);
        sigsys::install_handler().map_err(SeccompError::Handler)?;
    }
    let index = match mode {
        SeccompMode::On => 1,
        SeccompMode::Log => 2,
        SeccompMode::Off => 3,
    };
    MODE.store(index, Ordering::Release);
    if mode != SeccompMode::Off {
        spawner::start().map_err(SeccompError::Spawner)?;
    }
    Ok(())
}

/// Installs `kind`'s filter on the calling thread, when [`enable`] turned
/// filters on and the thread has none of ours yet. A thread calls this
/// once its setup is done. A failure here ends the process (fail closed:
/// a thread never runs unfiltered when filters are on).
pub fn apply(kind: ThreadKind) {
    if let Err(e) = try_apply(kind) {
        let mut text = format!("hostvisor: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        eprintln!("{text}");
        std::process::exit(DENIED_EXIT_STATUS);
    }
}

/// [`apply`], with its error.
pub fn try_apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(mode) = mode() else { return Ok(()) };
    if mode == SeccompMode::Off || INSTALLED.with(Cell::get) {
        return Ok(());
    }
    let Some(program) = PROGRAMS.get().and_then(|p| p.get(kind.index())) else {
        return Ok(());
    };
    sigsys::set_thread(kind);
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind.name(), e))?;
    INSTALLED.with(|i| i.set(true));
    test_hook(kind);
    Ok(())
}

/// Debug and test builds only: when `HOSTVISOR_SECCOMP_TEST_DENY` names
/// this thread kind (`virtio-rng`, `vcpu`, ...), the thread makes a call
/// outside its list right after installing its filter — how the e2e test
/// sees a denied call end the process with its report.
fn test_hook(kind: ThreadKind) {
    #[cfg(debug_assertions)]
    if std::env::var("HOSTVISOR_SECCOMP_TEST_DENY").is_ok_and(|k| k == kind.name()) {
        // SAFETY: personality(0xffffffff) only reads the persona; no filter
        // allows it, so with filters on it traps.
        unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) };
    }
    #[cfg(not(debug_assertions))]
    let _ = kind;
}

/// The x86_64 name of system call `nr`, if known.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    names::SYSCALLS
        .binary_search_by_key(&nr, |&(n, _)| n)
        .ok()
        .map(|i| names::SYSCALLS[i].1)
}

/// The number of the x86_64 system call `name`.
pub fn syscall_number(name: &str) -> Option<i64> {
    names::SYSCALLS
        .iter()
        .find(|&&(_, n)| n == name)
        .map(|&(nr, _)| nr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [SeccompMode::On, SeccompMode::Log, SeccompMode::Off] {
            assert_eq!(m.to_string().parse::<SeccompMode>().unwrap(), m);
        }
        assert!("kill".parse::<SeccompMode>().is_err());
        assert_eq!(SeccompMode::default(), SeccompMode::On);
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(syscall_name(0), Some("read"));
        assert_eq!(syscall_name(16), Some("ioctl"));
        assert_eq!(syscall_name(435), Some("clone3"));
        assert_eq!(syscall_name(100_000), None);
        assert_eq!(syscall_number("openat"), Some(libc::SYS_openat));
        assert_eq!(syscall_number("no_such_call"), None);
        // Sorted, so the binary search finds every one.
        assert!(names::SYSCALLS.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
