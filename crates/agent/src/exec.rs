//! `Exec`: runs a command and serves it from the connection's thread
//! alone — its output, stdin from the host, the host hanging up (which
//! kills it) and the timeout, in one poll loop. (Threads per command cost
//! ~70 ms each on nested hosts, where every guest system call is
//! emulated.)
//!
//! Costs per command are counted in system calls: see [`crate::spawn`] for
//! the start, [`Conn`] for the frames. Without stdin, `Started` waits in
//! the connection's buffer for the first output or the exit (the host
//! needs it only before it sends stdin), so a short command's whole answer
//! — `Hello`, `Started`, its output, `Exited` — is one write; outputs that
//! hang up without data are closed without a read.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::conn::Conn;
use crate::spawn::{self, SpawnError};
use crate::{ExecRequest, ExitStatus, FrameError, FromAgent, ToAgent, CHUNK};

fn kill(pid: libc::pid_t) {
    // SAFETY: kill(2) with our child's pid and a plain signal.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

fn set_nonblocking(fd: i32) {
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

pub(crate) fn exec<S: Read + Write + AsRawFd>(
    conn: &mut Conn<S>,
    req: ExecRequest,
) -> Result<(), FrameError> {
    let program = req.argv.first().cloned().unwrap_or_default();
    let child = match spawn::spawn(&req.argv, &req.env, req.cwd.as_deref(), req.stdin) {
        Ok(c) => c,
        Err(SpawnError::Empty) => return conn.send(&FromAgent::Error("an empty command".into())),
        Err(e) => return conn.send(&FromAgent::Error(format!("cannot run {program}: {e}"))),
    };
    conn.queue(&FromAgent::Started {
        pid: child.pid.unsigned_abs(),
    })?;
    if req.stdin {
        conn.flush()?;
    }
    let (status, timed_out, _closed_after_reply) = run_child(conn, child, &req)?;
    let (code, signal) = spawn::decode_status(status);
    conn.send(&FromAgent::Exited(ExitStatus {
        code,
        signal,
        timed_out,
    }))
}

fn run_child<S: Read + Write + AsRawFd>(
    conn: &mut Conn<S>,
    child: spawn::Child,
    req: &ExecRequest,
) -> Result<(libc::c_int, bool, Vec<File>), FrameError> {
    let pid = child.pid;
    let mut outputs: [Option<File>; 2] = [Some(child.stdout), Some(child.stderr)];
    // Ended outputs, closed only after the reply is sent (two system calls
    // off the way to the host).
    let mut ended = Vec::with_capacity(2);
    let mut stdin = child.stdin;
    if let Some(i) = &stdin {
        set_nonblocking(i.as_raw_fd());
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut stdin_eof = false;
    let mut host_gone = false;
    let mut deadline = req
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let mut timed_out = false;
    let mut buf = vec![0u8; CHUNK];
    let expire = |deadline: &mut Option<Instant>, timed_out: &mut bool| {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            kill(pid);
            *timed_out = true;
            *deadline = None;
        }
    };
    // Output is sent as soon as there is some: streamed, not held.
    let mut hold = !req.stdin;
    while outputs.iter().any(Option::is_some) {
        // What to watch: open outputs, stdin while bytes wait for it, the
        // host while no stdin bytes wait (backpressure) and it is there.
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(4);
        let mut what = Vec::with_capacity(4);
        for (i, o) in outputs.iter().enumerate() {
            if let Some(o) = o {
                fds.push(libc::pollfd {
                    fd: o.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                what.push(i);
            }
        }
        if let (Some(i), false) = (&stdin, pending.is_empty()) {
            fds.push(libc::pollfd {
                fd: i.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            });
            what.push(2);
        }
        let watch_host = !host_gone && pending.is_empty();
        if watch_host {
            fds.push(libc::pollfd {
                fd: conn.fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            what.push(3);
        }
        if !hold && conn.pending() && conn.flush().is_err() && !host_gone {
            host_gone = true;
            kill(pid);
        }
        // A message from the host that already arrived is served now.
        let buffered = watch_host && conn.has_message();
        let timeout = if buffered {
            0
        } else {
            deadline.map_or(-1, |d| {
                d.saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(i32::MAX as u128) as i32
            })
        };
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        expire(&mut deadline, &mut timed_out);
        for (fd, which) in fds.iter().zip(what) {
            if fd.revents == 0 && !(which == 3 && buffered) {
                continue;
            }
            match which {
                0 | 1 => {
                    if fd.revents & libc::POLLIN == 0 {
                        // Hung up with nothing left to read.
                        ended.extend(outputs[which].take());
                        continue;
                    }
                    let Some(o) = outputs[which].as_mut() else {
                        continue;
                    };
                    match o.read(&mut buf) {
                        Ok(0) => ended.extend(outputs[which].take()),
                        Ok(n) => {
                            let data = buf[..n].to_vec();
                            let msg = if which == 0 {
                                FromAgent::Stdout(data)
                            } else {
                                FromAgent::Stderr(data)
                            };
                            hold = false;
                            conn.queue(&msg)?;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => ended.extend(outputs[which].take()),
                    }
                }
                2 => {
                    if let Some(i) = stdin.as_mut() {
                        match i.write(&pending) {
                            Ok(n) => {
                                pending.drain(..n);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => {
                                // The command closed its stdin.
                                pending.clear();
                                stdin = None;
                            }
                        }
                    }
                    if pending.is_empty() && stdin_eof {
                        stdin = None;
                    }
                }
                _ => match conn.recv::<ToAgent>() {
                    Ok(ToAgent::Stdin(data)) if stdin.is_some() => pending = data,
                    Ok(ToAgent::StdinEof) => {
                        stdin_eof = true;
                        if pending.is_empty() {
                            stdin = None;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        host_gone = true;
                        kill(pid);
                    }
                },
            }
        }
    }
    drop(stdin);
    // The outputs are closed; the command may still run.
    let status = loop {
        let Some(d) = deadline else {
            break spawn::wait(pid, true)?;
        };
        if let Some(status) = spawn::wait(pid, false)? {
            break Some(status);
        }
        expire(&mut deadline, &mut timed_out);
        std::thread::sleep(
            d.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(20)),
        );
    };
    Ok((status.unwrap_or(0), timed_out, ended))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::server::{handle_connection, Stream, System};

    /// The agent's end of a connection, counting its reads and writes.
    struct Counted {
        s: UnixStream,
        reads: Arc<AtomicUsize>,
        writes: Arc<AtomicUsize>,
    }

    impl Read for Counted {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            self.s.read(buf)
        }
    }

    impl Write for Counted {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.s.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl AsRawFd for Counted {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.s.as_raw_fd()
        }
    }

    impl Stream for Counted {}

    struct Nothing;

    impl System for Nothing {
        fn set_time(&self, _: i64) -> std::io::Result<()> {
            Ok(())
        }
        fn shutdown(&self, _: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `argv` as a host would, returning the replies and the agent's
    /// reads and writes on the connection.
    fn exec_counted(argv: &[&str]) -> (Vec<FromAgent>, usize, usize) {
        let (mut host, agent) = UnixStream::pair().unwrap();
        let (reads, writes) = (Arc::default(), Arc::default());
        let counted = Counted {
            s: agent,
            reads: Arc::clone(&reads),
            writes: Arc::clone(&writes),
        };
        let mut request = crate::encode(&ToAgent::Hello {
            protocol: crate::PROTOCOL_VERSION,
        })
        .unwrap();
        let exec = ToAgent::Exec(ExecRequest {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        });
        request.extend(crate::encode(&exec).unwrap());
        host.write_all(&request).unwrap();
        handle_connection(counted, &Nothing).unwrap();
        let mut replies = Vec::new();
        loop {
            match crate::recv::<FromAgent>(&mut host) {
                Ok(m) => replies.push(m),
                Err(FrameError::Closed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        (
            replies,
            reads.load(Ordering::SeqCst),
            writes.load(Ordering::SeqCst),
        )
    }

    #[test]
    fn a_short_command_costs_one_read_and_one_write() {
        let (replies, reads, writes) = exec_counted(&["sh", "-c", "true"]);
        assert!(matches!(replies[0], FromAgent::Hello { .. }), "{replies:?}");
        assert!(
            matches!(replies[1], FromAgent::Started { .. }),
            "{replies:?}"
        );
        assert_eq!(
            replies[2],
            FromAgent::Exited(ExitStatus {
                code: Some(0),
                signal: None,
                timed_out: false
            })
        );
        assert_eq!((reads, writes), (1, 1));
        // Output is streamed when it comes, the exit follows.
        let (replies, reads, writes) = exec_counted(&["sh", "-c", "echo hi; exit 3"]);
        assert_eq!(replies[2], FromAgent::Stdout(b"hi\n".to_vec()));
        assert!(matches!(replies[3], FromAgent::Exited(s) if s.code == Some(3)));
        assert_eq!(reads, 1);
        assert!(writes <= 2, "{writes} writes");
    }
}
