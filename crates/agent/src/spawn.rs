//! Starting a guest command with as few system calls as possible.
//!
//! On nested hosts every guest system call runs emulated and costs about a
//! millisecond. `std::process::Command` goes through glibc's
//! `posix_spawn`, whose child resets every signal's disposition one by one
//! (about 125 `rt_sigaction` calls, measured with strace) and whose parent
//! checks the file limit six times; with a fresh `/dev/null`, pipe closes
//! and signal masks it took ~150 system calls per command. Here the child
//! is a `CLONE_VM | CLONE_VFORK` clone on a reused stack that makes only
//! the calls it needs: its three `dup2`s, `chdir` when asked, one
//! `sigaction` (Rust ignores SIGPIPE; commands expect the default) and
//! `execve` — no signal handler of the agent can run in it (the agent has
//! none but Rust's fault handlers, and the child only makes system calls).
//! The parent makes two `pipe2`s (three with stdin), the clone and the
//! closes of the child's ends. Exec failures come back through the shared
//! memory (the parent runs again only once the child has exec-ed or
//! exited), not through a pipe.

use std::cell::RefCell;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

/// Where a guest's busybox is, for commands that are only its applets.
pub const BUSYBOX: &str = "/bin/busybox";

/// The search path when the environment has none.
const DEFAULT_PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";

/// The child's stack: `execve` and its wrappers need little.
const STACK: usize = 64 << 10;

thread_local! {
    /// Each thread's stack for its children, reused (see the agent's
    /// `keep_buffers_mapped` for why buffers are kept).
    static CHILD_STACK: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A started command.
#[derive(Debug)]
pub struct Child {
    pub pid: libc::pid_t,
    /// The command's stdin when the host sends it.
    pub stdin: Option<File>,
    pub stdout: File,
    pub stderr: File,
}

/// What the child needs, prepared by the parent (the child must not
/// allocate: it shares the parent's memory).
struct ChildArgs {
    /// Programs to try in turn (the search path's entries).
    candidates: Vec<CString>,
    /// Tried when every candidate was missing.
    fallback: Option<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: Option<CString>,
    /// The child's stdin, stdout and stderr.
    fds: [RawFd; 3],
    /// The errno that stopped the child (0 if it exec-ed).
    error: AtomicI32,
    /// Whether `chdir` failed (rather than `execve`).
    chdir_failed: AtomicI32,
}

/// Why a command did not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("an empty command")]
    Empty,
    #[error("an argument or variable holds a NUL byte")]
    Nul,
    #[error("cannot change to directory {0}: {1}")]
    Chdir(String, std::io::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn cstring(bytes: &[u8]) -> Result<CString, SpawnError> {
    CString::new(bytes).map_err(|_| SpawnError::Nul)
}

/// /dev/null, opened once for every command that gets no stdin.
fn dev_null() -> std::io::Result<RawFd> {
    static NULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = NULL.get() {
        return Ok(fd.as_raw_fd());
    }
    let file = File::open("/dev/null")?;
    Ok(NULL.get_or_init(|| OwnedFd::from(file)).as_raw_fd())
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts `argv` with the agent's environment plus `env`, in `cwd`, with
/// pipes for its output (and its stdin when `stdin`). A program name
/// without a slash is looked up in PATH; when it is found nowhere and the
/// guest has busybox, busybox runs it as an applet (hostvisor's default
/// guest has no applet links: they cost seconds of boot).
pub fn spawn(
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
    stdin: bool,
) -> Result<Child, SpawnError> {
    let program = argv.first().ok_or(SpawnError::Empty)?;
    let argv_c = argv
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    // The environment: the agent's, with the request's on top.
    let mut vars: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os().collect();
    for (k, v) in env {
        vars.retain(|(old, _)| old.as_bytes() != k.as_bytes());
        vars.push((k.into(), v.into()));
    }
    let envp_c = vars
        .iter()
        .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<Result<Vec<_>, _>>()?;
    let (candidates, fallback) = if program.contains('/') {
        (vec![cstring(program.as_bytes())?], None)
    } else {
        let path = vars
            .iter()
            .find(|(k, _)| k == "PATH")
            .map_or(OsStr::new(DEFAULT_PATH), |(_, v)| v.as_os_str());
        let mut c = Vec::new();
        for dir in path.as_bytes().split(|&b| b == b':') {
            let dir = if dir.is_empty() { &b"."[..] } else { dir };
            c.push(cstring(&[dir, b"/", program.as_bytes()].concat())?);
        }
        (c, Some(cstring(BUSYBOX.as_bytes())?))
    };
    let cwd_c = cwd.map(|d| cstring(d.as_bytes())).transpose()?;

    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (in_r, in_w) = if stdin {
        let (r, w) = pipe()?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    let stdin_fd = match &in_r {
        Some(r) => r.as_raw_fd(),
        None => dev_null()?,
    };
    let with_null = |v: &[CString]| -> Vec<*const libc::c_char> {
        v.iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect()
    };
    let args = ChildArgs {
        candidates,
        fallback,
        argv: with_null(&argv_c),
        envp: with_null(&envp_c),
        cwd: cwd_c,
        fds: [stdin_fd, out_w.as_raw_fd(), err_w.as_raw_fd()],
        error: AtomicI32::new(0),
        chdir_failed: AtomicI32::new(0),
    };
    let pid = CHILD_STACK.with(|stack| {
        let mut stack = stack.borrow_mut();
        if stack.len() < STACK {
            stack.resize(STACK, 0);
        }
        // The stack grows down from its end, 16-byte aligned.
        let top = stack.as_mut_ptr().wrapping_add(STACK);
        let top = top.wrapping_sub(top as usize % 16);
        // SAFETY: the child runs `child_main` on its own stack (`top`,
        // inside the buffer borrowed here until the clone returns, which
        // with CLONE_VFORK is after the child exec-ed or exited); `args`
        // and everything it points to live until then too. The child only
        // makes system calls and writes `args`' atomics.
        unsafe {
            libc::clone(
                child_main,
                top.cast(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                std::ptr::addr_of!(args).cast_mut().cast(),
            )
        }
    });
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let errno = args.error.load(Ordering::SeqCst);
    if errno != 0 {
        // The child exited: reap it.
        let mut status = 0;
        // SAFETY: waitpid on our own child, `status` outlives the call.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let e = std::io::Error::from_raw_os_error(errno);
        if args.chdir_failed.load(Ordering::SeqCst) != 0 {
            return Err(SpawnError::Chdir(cwd.unwrap_or_default().into(), e));
        }
        return Err(e.into());
    }
    drop((out_w, err_w, in_r));
    Ok(Child {
        pid,
        stdin: in_w.map(File::from),
        stdout: File::from(out_r),
        stderr: File::from(err_r),
    })
}

/// The child, between the clone and `execve`: system calls only.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive and not moved while
    // the parent waits for this child to exec or exit.
    let args = unsafe { &*arg.cast::<ChildArgs>() };
    let fail = |errno: i32| -> libc::c_int {
        args.error.store(errno.max(1), Ordering::SeqCst);
        // SAFETY: _exit ends only this child.
        unsafe { libc::_exit(127) }
    };
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    for (target, &fd) in args.fds.iter().enumerate() {
        let target = target as RawFd;
        // SAFETY: dup2/fcntl on descriptors the parent keeps open.
        let ok = unsafe {
            if fd == target {
                // Already in place: only drop its close-on-exec flag.
                libc::fcntl(fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, target) == target
            }
        };
        if !ok {
            return fail(errno());
        }
    }
    if let Some(cwd) = &args.cwd {
        // SAFETY: chdir with a NUL-terminated path.
        if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
            let e = errno();
            args.chdir_failed.store(1, Ordering::SeqCst);
            return fail(e);
        }
    }
    // SAFETY: restores SIGPIPE's default disposition (Rust's runtime
    // ignores it, and an ignored signal stays ignored across execve).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // As execvp: go on past missing entries and ones we may not run.
    let mut first_error = 0;
    let mut all_missing = true;
    for path in &args.candidates {
        // SAFETY: NUL-terminated path, NULL-terminated argv and envp
        // arrays of NUL-terminated strings; returns only on failure.
        unsafe { libc::execve(path.as_ptr(), args.argv.as_ptr(), args.envp.as_ptr()) };
        let e = errno();
        match e {
            libc::ENOENT | libc::ENOTDIR => {}
            libc::EACCES => {
                all_missing = false;
                if first_error == 0 {
                    first_error = e;
                }
            }
            _ => return fail(e),
        }
    }
    if all_missing {
        if let Some(busybox) = &args.fallback {
            // SAFETY: as above.
            unsafe { libc::execve(busybox.as_ptr(), args.argv.as_ptr(), args.envp.as_ptr()) };
        }
        return fail(libc::ENOENT);
    }
    fail(first_error)
}

/// How a command ended, from waitpid's status.
pub fn decode_status(status: libc::c_int) -> (Option<i32>, Option<i32>) {
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

/// Waits for `pid` (without blocking when `block` is false: `None` while
/// it runs).
pub fn wait(pid: libc::pid_t, block: bool) -> std::io::Result<Option<libc::c_int>> {
    loop {
        let mut status = 0;
        let flags = if block { 0 } else { libc::WNOHANG };
        // SAFETY: waitpid on our own child, `status` outlives the call.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r == pid {
            return Ok(Some(status));
        }
        if r == 0 {
            return Ok(None);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn run(argv: &[&str], env: &[(&str, &str)], cwd: Option<&str>) -> (String, String, i32) {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut c = spawn(&argv, &env, cwd, false).unwrap();
        let (mut out, mut err) = (String::new(), String::new());
        c.stdout.read_to_string(&mut out).unwrap();
        c.stderr.read_to_string(&mut err).unwrap();
        let status = wait(c.pid, true).unwrap().unwrap();
        (out, err, decode_status(status).0.unwrap_or(-1))
    }

    #[test]
    fn commands_run_with_their_environment_directory_and_streams() {
        let (out, err, code) = run(
            &["sh", "-c", "echo $A $HOME; pwd; echo e >&2; exit 4"],
            &[("A", "set"), ("HOME", "/elsewhere")],
            Some("/"),
        );
        assert_eq!(
            (out.as_str(), err.as_str(), code),
            ("set /elsewhere\n/\n", "e\n", 4)
        );
        // The agent's own variables are passed on.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(
            run(&["sh", "-c", "echo $PATH"], &[], None).0,
            format!("{path}\n")
        );
        // stdin is /dev/null; SIGPIPE is back to its default.
        let (out, _, _) = run(
            &["sh", "-c", "cat; grep SigIgn /proc/self/status"],
            &[],
            None,
        );
        let ignored = u64::from_str_radix(out.trim().rsplit('\t').next().unwrap(), 16).unwrap();
        assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
    }

    #[test]
    fn stdin_flows_when_asked() {
        use std::io::Write;
        let argv = vec!["cat".to_string()];
        let mut c = spawn(&argv, &[], None, true).unwrap();
        c.stdin.take().unwrap().write_all(b"through").unwrap();
        let mut out = String::new();
        c.stdout.read_to_string(&mut out).unwrap();
        assert_eq!(out, "through");
        assert_eq!(
            decode_status(wait(c.pid, true).unwrap().unwrap()),
            (Some(0), None)
        );
    }

    #[test]
    fn failures_are_errors_with_the_reason() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = spawn(&s(&["/no/such/program"]), &[], None, false).unwrap_err();
        assert!(matches!(&e, SpawnError::Io(e) if e.kind() == std::io::ErrorKind::NotFound));
        let e = spawn(&s(&["true"]), &[], Some("/no/such/dir"), false).unwrap_err();
        assert!(e.to_string().contains("/no/such/dir"), "{e}");
        let e = spawn(&s(&["/"]), &[], None, false).unwrap_err();
        assert!(matches!(&e, SpawnError::Io(e) if e.raw_os_error() == Some(libc::EACCES)));
        assert!(matches!(
            spawn(&[], &[], None, false),
            Err(SpawnError::Empty)
        ));
        assert!(matches!(
            spawn(&s(&["a\0b"]), &[], None, false),
            Err(SpawnError::Nul)
        ));
        // A name found nowhere on PATH and not in busybox either.
        if !std::path::Path::new(BUSYBOX).exists() {
            let e = spawn(&s(&["no-such-program-anywhere"]), &[], None, false).unwrap_err();
            assert!(matches!(&e, SpawnError::Io(e) if e.kind() == std::io::ErrorKind::NotFound));
        }
    }
}
