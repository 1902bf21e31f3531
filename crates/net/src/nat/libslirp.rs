//! libslirp, loaded when the first NAT starts rather than linked.
//!
//! Linking it would make the loader refuse to start `hostvisor` at all on a
//! host without the library (`error while loading shared libraries`), so
//! that disks, VMs without a NAT, and `hostvisor doctor` — the command that
//! would explain the problem — would all be unusable. Loaded with `dlopen`
//! (through `libloading`), a missing library fails only what needs it, with
//! an error that says what to install. The types come from `libslirp-sys`;
//! only its functions are taken from the library found at run time.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use libslirp_sys as sys;

/// The library's name: its soname, as Debian's `libslirp0` installs it.
/// `HOSTVISOR_LIBSLIRP` names another file (a build of one's own — and
/// the tests use it to stand for a host without the library).
const SONAME: &str = "libslirp.so.0";

/// What to tell a user who lacks the library.
pub const INSTALL_HINT: &str =
    "install libslirp (Debian/Ubuntu: apt install libslirp0; Fedora: dnf install libslirp)";

/// The functions hostvisor calls, from the loaded library.
pub(crate) struct Libslirp {
    pub new: unsafe extern "C" fn(
        *const sys::SlirpConfig,
        *const sys::SlirpCb,
        *mut c_void,
    ) -> *mut sys::Slirp,
    pub cleanup: unsafe extern "C" fn(*mut sys::Slirp),
    pub pollfds_fill:
        unsafe extern "C" fn(*mut sys::Slirp, *mut u32, sys::SlirpAddPollCb, *mut c_void),
    pub pollfds_poll:
        unsafe extern "C" fn(*mut sys::Slirp, c_int, sys::SlirpGetREventsCb, *mut c_void),
    pub input: unsafe extern "C" fn(*mut sys::Slirp, *const u8, c_int),
    pub add_hostfwd: unsafe extern "C" fn(
        *mut sys::Slirp,
        c_int,
        sys::in_addr,
        c_int,
        sys::in_addr,
        c_int,
    ) -> c_int,
    version_string: unsafe extern "C" fn() -> *const c_char,
    /// Keeps the functions above mapped: the library is never unloaded.
    _lib: libloading::Library,
}

static LIBRARY: OnceLock<Result<Libslirp, String>> = OnceLock::new();

/// The library, loaded on first use; the error says why it cannot be had.
pub(crate) fn get() -> Result<&'static Libslirp, String> {
    LIBRARY.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// libslirp's version, or why it cannot be loaded (for `hostvisor doctor`).
pub fn version() -> Result<String, String> {
    let lib = get()?;
    // SAFETY: returns a pointer to a static NUL-terminated string.
    let v = unsafe { (lib.version_string)() };
    if v.is_null() {
        return Ok("unknown".into());
    }
    // SAFETY: non-null, NUL-terminated, static.
    Ok(unsafe { CStr::from_ptr(v) }.to_string_lossy().into_owned())
}

fn load() -> Result<Libslirp, String> {
    let name = std::env::var_os("HOSTVISOR_LIBSLIRP").unwrap_or_else(|| SONAME.into());
    // SAFETY: loading libslirp runs its and glib's initialisers, which have
    // no preconditions on the process.
    let lib = unsafe { libloading::Library::new(&name) }
        .map_err(|e| format!("cannot load {}: {e}", name.to_string_lossy()))?;
    /// Copies a function pointer out of the library (its type is the
    /// binding's field it is assigned to).
    macro_rules! func {
        ($name:literal) => {
            // SAFETY: the symbol is libslirp's function of that name, whose
            // signature (libslirp.h, ≥ 4.2) is the field's type; the library
            // stays loaded for the life of the process (`_lib`).
            *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("{} has no {}: {e}", name.to_string_lossy(), $name))?
        };
    }
    let new = func!("slirp_new");
    let cleanup = func!("slirp_cleanup");
    let pollfds_fill = func!("slirp_pollfds_fill");
    let pollfds_poll = func!("slirp_pollfds_poll");
    let input = func!("slirp_input");
    let add_hostfwd = func!("slirp_add_hostfwd");
    let version_string = func!("slirp_version_string");
    Ok(Libslirp {
        new,
        cleanup,
        pollfds_fill,
        pollfds_poll,
        input,
        add_hostfwd,
        version_string,
        _lib: lib,
    })
}
