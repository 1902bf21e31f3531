//! The VMM process's sandbox: `no_new_privs`, Landlock and dropping root.
//!
//! A VM's process parses what the guest and files hand it; if that code is
//! ever exploited, the process should hold as little as possible. The
//! process that will run a VM calls [`enter`] before it starts any thread
//! (Landlock confines the calling thread and the threads it starts later,
//! not the ones already running): `no_new_privs` is set and, unless the
//! configuration turns it off, a Landlock ruleset lets the process open
//! only what [`rules::for_vm`] lists — the VM's kernel, firmware, disks
//! and their backing chains, shares, sockets, directory, and the devices
//! it needs. Once the first machine is built (TAP, huge pages, `/dev/kvm`
//! opened), `run_vm` calls [`after_setup`], which switches to the
//! configured user when started as root.

mod privileges;
pub mod rules;

use std::io;
use std::sync::Mutex;

pub use privileges::{drop_to, Credentials, PrivilegeError};
pub use rules::{Extra, Rules};

use crate::config::VmConfig;

/// Why the sandbox cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] io::Error),
    #[error("cannot set up Landlock")]
    Landlock(#[source] landlock::RulesetError),
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
}

/// Sets `PR_SET_NO_NEW_PRIVS`: nothing this process executes can gain
/// privileges (set-user-ID bits, file capabilities), and unprivileged
/// processes may install seccomp filters and Landlock rulesets. Idempotent;
/// the seccomp filters and [`enter`] both call it.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS reads only its integer
    // arguments and changes no memory of this process.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `no_new_privs` is set for the calling thread.
pub fn no_new_privs() -> bool {
    // SAFETY: PR_GET_NO_NEW_PRIVS only returns a value.
    unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

/// The kernel's Landlock ABI version, or why there is none (not built
/// in, or not enabled with `lsm=...landlock` at boot).
pub fn landlock_abi() -> Result<u32, io::Error> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag,
    // landlock_create_ruleset only returns the ABI version (or an error);
    // it creates nothing and reads no memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(r).map_err(|_| io::Error::other("a negative Landlock ABI version"))
}

/// What [`enter`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LandlockState {
    /// Turned off in the configuration.
    Off,
    /// The kernel has no Landlock: nothing is confined.
    Unsupported,
    /// Enforced (partially when the kernel's ABI lacks some rights).
    Enforced { fully: bool },
}

/// The user [`after_setup`] switches to, resolved by [`enter`] (while
/// `/etc/passwd` and NSS can still be read).
static PENDING_USER: Mutex<Option<Credentials>> = Mutex::new(None);

/// Sets up the sandbox for running `config` in this process: resolves the
/// user to switch to later, sets `no_new_privs`, and applies Landlock
/// (unless `config.sandbox.landlock` is off) with the rules for `config`
/// and `extra`. Call before starting any thread.
pub fn enter(config: &VmConfig, extra: &Extra) -> Result<LandlockState, SandboxError> {
    if let Some(user) = &config.sandbox.user {
        // SAFETY: geteuid only returns a value.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(PrivilegeError::NotRoot(euid).into());
        }
        let creds = Credentials::resolve(user)?;
        // The serial log is opened again at each boot, as that user.
        if let crate::config::SerialConfig::File(path) = &config.serial {
            if std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .is_ok()
            {
                let _ = std::os::unix::fs::chown(path, Some(creds.uid), Some(creds.gid));
            }
        }
        *PENDING_USER.lock().unwrap_or_else(|e| e.into_inner()) = Some(creds);
    }
    set_no_new_privs().map_err(SandboxError::NoNewPrivs)?;
    let state = if config.sandbox.landlock {
        let rules = Rules::for_vm(config, extra);
        rules.restrict_self().map_err(SandboxError::Landlock)?
    } else {
        LandlockState::Off
    };
    match &state {
        LandlockState::Unsupported => {
            tracing::debug!("the kernel has no Landlock: file access is not confined")
        }
        s => tracing::debug!(state = ?s, "sandbox entered"),
    }
    Ok(state)
}

/// Called once the first machine is built: switches to the user [`enter`]
/// resolved, if any (all threads: glibc applies set*id to every thread),
/// then runs the test hook.
pub fn after_setup() -> Result<(), SandboxError> {
    let pending = PENDING_USER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(creds) = pending {
        drop_to(&creds)?;
        tracing::info!(uid = creds.uid, gid = creds.gid, "switched user");
    }
    test_open_hook();
    Ok(())
}

/// Test hook (debug builds only): with `HOSTVISOR_TEST_SANDBOX_OPEN=PATH`
/// set, tries to open PATH for reading once the sandbox is complete and
/// prints the result on stderr, so a test can see that Landlock refuses
/// a file outside the VM's set.
fn test_open_hook() {
    #[cfg(debug_assertions)]
    if let Some(path) = std::env::var_os("HOSTVISOR_TEST_SANDBOX_OPEN") {
        let path = std::path::PathBuf::from(path);
        match std::fs::File::open(&path) {
            Ok(_) => eprintln!("sandbox test open {}: ok", path.display()),
            Err(e) => eprintln!(
                "sandbox test open {}: errno {}: {e}",
                path.display(),
                e.raw_os_error().unwrap_or(0)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_new_privs_is_set_and_stays() {
        // The test harness thread: setting it affects only this thread
        // (and what it starts), which is all a test can look at.
        std::thread::spawn(|| {
            set_no_new_privs().unwrap();
            assert!(no_new_privs());
            set_no_new_privs().unwrap();
            assert!(no_new_privs());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn the_landlock_version_is_a_number_or_an_error() {
        match landlock_abi() {
            Ok(v) => assert!(v >= 1, "{v}"),
            Err(e) => assert!(e.raw_os_error().is_some(), "{e}"),
        }
    }
}
