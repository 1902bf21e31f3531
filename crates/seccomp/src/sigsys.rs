//! The SIGSYS report: a filtered call traps (`SECCOMP_RET_TRAP`) into
//! [`install_handler`]'s handler, which writes one line naming the call
//! and the thread to stderr and ends the process with
//! [`crate::DENIED_EXIT_STATUS`]. The handler is async-signal-safe: it
//! reads a thread-local filled when the filter was installed, formats
//! into a stack buffer, and calls only write(2) and _exit(2) (both in
//! every list).

use std::cell::Cell;

use crate::ThreadKind;

/// Thread names are at most 15 bytes (the kernel's `comm`); ours too.
const NAME_MAX: usize = 16;

thread_local! {
    /// This thread's name (from std, else its kind's), NUL-padded.
    static NAME: Cell<[u8; NAME_MAX]> = const { Cell::new([0; NAME_MAX]) };
    /// This thread's filter kind, by index; `usize::MAX` before one.
    static KIND: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Records, for the report, the calling thread's name and filter.
pub(crate) fn set_thread(kind: ThreadKind) {
    let current = std::thread::current();
    let name = current.name().unwrap_or(kind.name()).as_bytes();
    let mut buf = [0u8; NAME_MAX];
    let n = name.len().min(NAME_MAX - 1);
    buf[..n].copy_from_slice(&name[..n]);
    NAME.with(|c| c.set(buf));
    KIND.with(|c| c.set(kind.index()));
}

/// Installs the process's SIGSYS handler.
pub(crate) fn install_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is valid; the handler is an
    // `extern "C"` function of the SA_SIGINFO signature that lives for
    // the whole process.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Where `si_syscall` sits in a `siginfo_t` on x86_64 (after signo,
/// errno, code, padding and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel hands a whole siginfo_t (128 bytes); for a
        // seccomp SIGSYS the int at this offset is the call's number.
        unsafe {
            info.cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<i32>()
                .read_unaligned()
        }
    };
    let name = NAME.try_with(Cell::get).unwrap_or([0; NAME_MAX]);
    let kind = KIND
        .try_with(Cell::get)
        .ok()
        .and_then(|i| ThreadKind::ALL.get(i).copied());
    let mut line = [0u8; 256];
    let len = format_line(&mut line, i64::from(nr), &name, kind);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is
    // ours and `len` is within it.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::_exit(crate::DENIED_EXIT_STATUS);
    }
}

/// A fixed-size writer: what does not fit is dropped.
struct Line<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Line<'_> {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut v = n.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Formats the report into `buf` without allocating; returns its length.
/// `thread` is NUL-padded.
pub fn format_line(buf: &mut [u8], nr: i64, thread: &[u8], kind: Option<ThreadKind>) -> usize {
    let mut line = Line { buf, len: 0 };
    line.push(b"hostvisor: seccomp: thread \"");
    let end = thread.iter().position(|&b| b == 0).unwrap_or(thread.len());
    line.push(&thread[..end]);
    line.push(b"\"");
    if let Some(kind) = kind {
        line.push(b" (");
        line.push(kind.name().as_bytes());
        line.push(b" filter)");
    }
    line.push(b" made the forbidden system call ");
    match crate::syscall_name(nr) {
        Some(name) => {
            line.push(name.as_bytes());
            line.push(b" (");
            line.number(nr);
            line.push(b")");
        }
        None => {
            line.push(b"number ");
            line.number(nr);
        }
    }
    line.push(b"; ending the VM process\n");
    line.len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(nr: i64, thread: &[u8], kind: Option<ThreadKind>) -> String {
        let mut buf = [0u8; 256];
        let n = format_line(&mut buf, nr, thread, kind);
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn the_line_names_the_call_and_the_thread() {
        let mut name = [0u8; NAME_MAX];
        name[..10].copy_from_slice(b"virtio-rng");
        assert_eq!(
            text(135, &name, Some(ThreadKind::Rng)),
            "hostvisor: seccomp: thread \"virtio-rng\" (virtio-rng filter) made the forbidden system call personality (135); ending the VM process\n"
        );
    }

    #[test]
    fn an_unknown_call_is_named_by_its_number() {
        assert_eq!(
            text(9999, b"vcpu0", None),
            "hostvisor: seccomp: thread \"vcpu0\" made the forbidden system call number 9999; ending the VM process\n"
        );
        assert!(text(-1, b"", None).contains("number -1;"));
    }

    #[test]
    fn a_short_buffer_truncates() {
        let mut buf = [0u8; 10];
        assert_eq!(format_line(&mut buf, 0, b"x", None), 10);
        assert_eq!(&buf, b"hostvisor:");
    }

    /// The whole path in a child process: the filter traps a call, the
    /// handler writes the line and the process ends with status 159.
    #[test]
    fn a_denied_call_ends_the_process_with_its_report() {
        let program = crate::filters::compile(ThreadKind::Rng, crate::SeccompMode::On).unwrap();
        set_thread(ThreadKind::Rng);
        let me = std::thread::current().name().unwrap_or("").to_string();
        let mut fds = [0; 2];
        // SAFETY: a valid array of two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes system calls (no allocation: the
        // program and the thread record were made before the fork) and
        // ends with _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: see above.
            unsafe {
                libc::dup2(fds[1], 2);
                if install_handler().is_err() || seccompiler::apply_filter(&program).is_err() {
                    libc::_exit(1);
                }
                libc::syscall(libc::SYS_personality, 0xffff_ffff_u64);
                libc::_exit(0);
            }
        }
        assert!(pid > 0);
        // SAFETY: our descriptors; the child has its own copies.
        let mut out = unsafe {
            libc::close(fds[1]);
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0])
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut out, &mut text).unwrap();
        let mut status = 0;
        // SAFETY: waiting for our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "{status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), crate::DENIED_EXIT_STATUS);
        let thread: String = me.chars().take(NAME_MAX - 1).collect();
        assert_eq!(
            text,
            format!("hostvisor: seccomp: thread \"{thread}\" (virtio-rng filter) made the forbidden system call personality (135); ending the VM process\n")
        );
    }

    #[test]
    fn the_thread_record_is_padded() {
        std::thread::Builder::new()
            .name("a-very-long-thread-name".into())
            .spawn(|| {
                set_thread(ThreadKind::Vcpu);
                let name = NAME.with(Cell::get);
                assert_eq!(&name[..15], b"a-very-long-thr");
                assert_eq!(name[15], 0);
                assert_eq!(KIND.with(Cell::get), ThreadKind::Vcpu.index());
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
