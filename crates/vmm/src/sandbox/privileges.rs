//! Dropping root: `--user USER[:GROUP]`.

use std::ffi::CString;
use std::io;

use crate::sandbox_config::UserSpec;

/// Why the user cannot be switched to.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("no such user `{0}`")]
    NoUser(String),
    #[error("no such group `{0}`")]
    NoGroup(String),
    #[error("--user needs hostvisor to be started as root (it is uid {0})")]
    NotRoot(u32),
    #[error("cannot switch to uid {uid} gid {gid}: {call} failed")]
    Switch {
        uid: u32,
        gid: u32,
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("after switching to uid {uid} the process could become root again; refusing to go on")]
    Regained { uid: u32 },
}

/// A resolved user and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
}

impl Credentials {
    /// Looks `spec` up (names through the system's user database; numbers
    /// as they are). Without a group, the user's primary group.
    pub fn resolve(spec: &UserSpec) -> Result<Credentials, PrivilegeError> {
        let (uid, primary) = match spec.user.parse::<u32>() {
            Ok(uid) => (uid, lookup_user_by_id(uid)),
            Err(_) => {
                let (uid, gid) = lookup_user(&spec.user)
                    .ok_or_else(|| PrivilegeError::NoUser(spec.user.clone()))?;
                (uid, Some(gid))
            }
        };
        let gid = match &spec.group {
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => lookup_group(g).ok_or_else(|| PrivilegeError::NoGroup(g.clone()))?,
            },
            // A uid with no entry and no group: its own number as group,
            // never root's group.
            None => primary.unwrap_or(uid),
        };
        Ok(Credentials { uid, gid })
    }
}

/// getpwnam_r/getpwuid_r/getgrnam_r need a buffer; this is plenty for
/// one entry.
const BUF: usize = 16 * 1024;

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; BUF];
    // SAFETY: all-zero is a valid passwd (null pointers, zero ids); it is
    // only read after getpwnam_r filled it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name is
    // NUL-terminated, the buffer has its stated length, and `result`
    // ends up null or pointing at `pwd`.
    let r = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (r == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

fn lookup_user_by_id(uid: u32) -> Option<u32> {
    let mut buf = vec![0 as libc::c_char; BUF];
    // SAFETY: as in `lookup_user`.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: as in `lookup_user`.
    let r = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    (r == 0 && !result.is_null()).then_some(pwd.pw_gid)
}

fn lookup_group(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; BUF];
    // SAFETY: all-zero is a valid group entry; read only once filled.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in `lookup_user`, for a group entry.
    let r = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (r == 0 && !result.is_null()).then_some(grp.gr_gid)
}

/// Switches every thread of the process to `creds`: supplementary groups
/// to just the group, then the group, then the user (real, effective and
/// saved ids all, so nothing is kept to switch back with); then checks
/// that root cannot be regained.
pub fn drop_to(creds: &Credentials) -> Result<(), PrivilegeError> {
    // SAFETY: geteuid only returns a value.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(PrivilegeError::NotRoot(euid));
    }
    let fail = |call: &'static str| PrivilegeError::Switch {
        uid: creds.uid,
        gid: creds.gid,
        call,
        source: io::Error::last_os_error(),
    };
    let groups = [creds.gid];
    // SAFETY: `groups` holds one gid_t, as the count says. glibc applies
    // setgroups/setresgid/setresuid to every thread of the process.
    if unsafe { libc::setgroups(1, groups.as_ptr()) } != 0 {
        return Err(fail("setgroups"));
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::setresgid(creds.gid, creds.gid, creds.gid) } != 0 {
        return Err(fail("setresgid"));
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::setresuid(creds.uid, creds.uid, creds.uid) } != 0 {
        return Err(fail("setresuid"));
    }
    if creds.uid != 0 {
        // SAFETY: plain integer arguments; must fail now.
        let back = unsafe { libc::setuid(0) } == 0 || unsafe { libc::seteuid(0) } == 0;
        if back {
            return Err(PrivilegeError::Regained { uid: creds.uid });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_by_name_and_number() {
        let root: UserSpec = "root".parse().unwrap();
        assert_eq!(
            Credentials::resolve(&root).unwrap(),
            Credentials { uid: 0, gid: 0 }
        );
        let numeric: UserSpec = "4242:4343".parse().unwrap();
        assert_eq!(
            Credentials::resolve(&numeric).unwrap(),
            Credentials {
                uid: 4242,
                gid: 4343
            }
        );
        // A number with no entry keeps its own number as group.
        let lone: UserSpec = "4242".parse().unwrap();
        assert_eq!(Credentials::resolve(&lone).unwrap().gid, 4242);
        let missing: UserSpec = "no-such-user-hv".parse().unwrap();
        assert!(matches!(
            Credentials::resolve(&missing),
            Err(PrivilegeError::NoUser(_))
        ));
        let bad_group: UserSpec = "root:no-such-group-hv".parse().unwrap();
        assert!(matches!(
            Credentials::resolve(&bad_group),
            Err(PrivilegeError::NoGroup(_))
        ));
    }
}
