//! Client and agent together on the host: a Unix socket stands in for the
//! vsock device's (answering `CONNECT` as the muxer does), and a recording
//! `System` stands in for the guest's clock and power.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use agent::client::{AgentError, Client, ExecIo, Transport};
use agent::server::{handle_connection, System};
use agent::{recv, send, ExecRequest, FromAgent, ToAgent};

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl System for Recorder {
    fn set_time(&self, unix_ns: i64) -> std::io::Result<()> {
        self.0.lock().unwrap().push(format!("time {unix_ns}"));
        Ok(())
    }
    fn shutdown(&self, reboot: bool) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap()
            .push(format!("shutdown reboot={reboot}"));
        Ok(())
    }
}

struct Fixture {
    dir: PathBuf,
    sock: PathBuf,
    system: Arc<Recorder>,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        Self::with_damage(name, 0)
    }

    /// As `new`, but the first `damaged` connections that carry more than
    /// 200 kB towards the agent get one byte of it flipped on the way (a
    /// host that corrupts data).
    fn with_damage(name: &str, damaged: usize) -> Fixture {
        let dir = std::env::temp_dir().join(format!("hv-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("v.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let system = Arc::new(Recorder::default());
        let sys = system.clone();
        let damage = Arc::new(AtomicUsize::new(damaged));
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let mut s = s.unwrap();
                let sys = sys.clone();
                let damage = damage.clone();
                std::thread::spawn(move || {
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    assert_eq!(line, b"CONNECT 52");
                    s.write_all(b"OK 1073741824\n").unwrap();
                    if damage.load(Ordering::SeqCst) == 0 {
                        let _ = handle_connection(s, &*sys);
                        return;
                    }
                    // A proxy that flips byte 200000 of what the host sends.
                    let (agent_end, proxy_end) = UnixStream::pair().unwrap();
                    let mut agent_out = proxy_end.try_clone().unwrap();
                    let mut host_in = s.try_clone().unwrap();
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut agent_out, &mut host_in);
                    });
                    let (mut from_host, mut to_host) = (s, proxy_end);
                    let damage = damage.clone();
                    std::thread::spawn(move || {
                        let mut seen = 0usize;
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let n = match from_host.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if seen <= 200_000 && seen + n > 200_000 {
                                let left = damage.load(Ordering::SeqCst);
                                if left > 0 {
                                    damage.store(left - 1, Ordering::SeqCst);
                                    buf[200_000 - seen] ^= 0x40;
                                }
                            }
                            seen += n;
                            if to_host.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                    let _ = handle_connection(agent_end, &*sys);
                });
            }
        });
        Fixture { dir, sock, system }
    }

    fn client(&self) -> Client {
        Client::new(Transport::Muxer(self.sock.clone()))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(
    c: &Client,
    argv: &[&str],
    stdin: Option<&'static [u8]>,
) -> (agent::ExitStatus, Vec<u8>, Vec<u8>) {
    let req = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let io = ExecIo {
        stdin: stdin.map(|b| Box::new(b) as Box<dyn Read + Send>),
        stdout: &mut out,
        stderr: &mut err,
    };
    let status = c.exec(&req, io).unwrap();
    (status, out, err)
}

#[test]
fn exec_streams_output_and_reports_codes_and_signals() {
    let fx = Fixture::new("exec");
    let c = fx.client();
    let (st, out, err) = run(&c, &["sh", "-c", "echo out; echo err >&2; exit 3"], None);
    assert_eq!((st.code, st.signal, st.timed_out), (Some(3), None, false));
    assert_eq!((&out[..], &err[..]), (&b"out\n"[..], &b"err\n"[..]));
    let (st, _, _) = run(&c, &["sh", "-c", "kill -TERM $$"], None);
    assert_eq!((st.code, st.signal), (None, Some(15)));
    let (st, out, _) = run(&c, &["cat"], Some(b"piped through\n"));
    assert_eq!((st.code, &out[..]), (Some(0), &b"piped through\n"[..]));
    // Environment and working directory.
    let req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "echo $GREETING; pwd".into()],
        env: vec![("GREETING".into(), "hi".into())],
        cwd: Some("/".into()),
        ..Default::default()
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let io = ExecIo {
        stdin: None,
        stdout: &mut out,
        stderr: &mut err,
    };
    c.exec(&req, io).unwrap();
    assert_eq!(out, b"hi\n/\n");
    // A timeout kills it.
    let req = ExecRequest {
        argv: vec!["sleep".into(), "30".into()],
        timeout_ms: Some(200),
        ..Default::default()
    };
    let io = ExecIo {
        stdin: None,
        stdout: &mut out,
        stderr: &mut err,
    };
    let st = c.exec(&req, io).unwrap();
    assert_eq!((st.signal, st.timed_out), (Some(9), true));
    // A megabyte through `cat`: stdin and stdout flow together (neither
    // side blocks the other).
    let big: &'static [u8] = Box::leak(
        (0..1_000_000u32)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    );
    let (st, mut out, _) = run(&c, &["cat"], Some(big));
    assert_eq!(st.code, Some(0));
    assert!(out == big, "cat returned {} bytes", out.len());
    // A command that closes its output and lives on still times out.
    let req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "exec >&- 2>&-; sleep 30".into()],
        timeout_ms: Some(300),
        ..Default::default()
    };
    let io = ExecIo {
        stdin: None,
        stdout: &mut out.clone(),
        stderr: &mut err,
    };
    let st = c.exec(&req, io).unwrap();
    assert_eq!((st.signal, st.timed_out), (Some(9), true));
    // A program that does not exist is an error, not a hang.
    let req = ExecRequest {
        argv: vec!["/no/such/program".into()],
        ..Default::default()
    };
    let io = ExecIo {
        stdin: None,
        stdout: &mut out,
        stderr: &mut err,
    };
    match c.exec(&req, io) {
        Err(AgentError::Remote(text)) => assert!(text.contains("/no/such/program"), "{text}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn files_round_trip_with_their_mode() {
    let fx = Fixture::new("files");
    let c = fx.client();
    let src = fx.dir.join("src.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o640)).unwrap();
    let remote = fx.dir.join("remote.bin");
    assert_eq!(
        c.upload(&src, remote.to_str().unwrap()).unwrap().bytes,
        data.len() as u64
    );
    assert_eq!(std::fs::read(&remote).unwrap(), data);
    assert_eq!(
        std::fs::metadata(&remote).unwrap().permissions().mode() & 0o777,
        0o640
    );
    let back = fx.dir.join("back.bin");
    c.download(remote.to_str().unwrap(), &back).unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), data);
    assert_eq!(
        std::fs::metadata(&back).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // Failures name the file and leave nothing behind.
    match c.upload(&src, "/no/such/dir/x") {
        Err(AgentError::Remote(t)) => assert!(t.contains("/no/such/dir/x"), "{t}"),
        other => panic!("{other:?}"),
    }
    match c.download("/no/such/file", &fx.dir.join("y")) {
        Err(AgentError::Remote(t)) => assert!(t.contains("/no/such/file"), "{t}"),
        other => panic!("{other:?}"),
    }
    let mut names: Vec<_> = std::fs::read_dir(&fx.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["back.bin", "remote.bin", "src.bin", "v.sock"]);
}

#[test]
fn damaged_copies_are_detected_and_made_again() {
    let src_fx = Fixture::new("damage-src");
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let src = src_fx.dir.join("src.bin");
    std::fs::write(&src, &data).unwrap();
    // Once damaged: the agent notices, the client copies again.
    let fx = Fixture::with_damage("damage1", 1);
    let remote = fx.dir.join("remote.bin");
    let copied = fx.client().upload(&src, remote.to_str().unwrap()).unwrap();
    assert_eq!((copied.bytes, copied.attempts), (1_000_000, 2));
    assert_eq!(std::fs::read(&remote).unwrap(), data);
    // Damaged every time: an error naming the mismatch, and no file.
    let fx = Fixture::with_damage("damage9", 9);
    let remote = fx.dir.join("remote.bin");
    match fx.client().upload(&src, remote.to_str().unwrap()) {
        Err(AgentError::Remote(t)) => assert!(t.contains("SHA-256"), "{t}"),
        other => panic!("{other:?}"),
    }
    assert!(!remote.exists());
    assert_eq!(
        std::fs::read_dir(&fx.dir).unwrap().count(),
        1,
        "only the socket"
    );
}

#[test]
fn ping_info_time_and_shutdown() {
    let fx = Fixture::new("misc");
    let c = fx.client();
    let (version, guest_ns) = c.ping().unwrap();
    assert_eq!(version, agent::VERSION);
    assert!(guest_ns > 1_600_000_000_000_000_000);
    let info = c.info().unwrap();
    assert!(!info.kernel_release.is_empty());
    assert!(info.mem_total_kib > 0);
    assert!(info
        .addresses
        .iter()
        .any(|a| a.address == "127.0.0.1" && a.prefix == 8));
    // In sync: nothing is set. One hour off: it is.
    let drift = c.sync_time(std::time::Duration::from_secs(1)).unwrap();
    assert!(drift.abs() < 1.0);
    assert!(fx.system.0.lock().unwrap().is_empty());
    c.set_time(42).unwrap();
    c.shutdown(false).unwrap();
    c.shutdown(true).unwrap();
    // The agent answers before it acts.
    let want = ["time 42", "shutdown reboot=false", "shutdown reboot=true"];
    let start = std::time::Instant::now();
    while fx.system.0.lock().unwrap().len() < want.len()
        && start.elapsed() < std::time::Duration::from_secs(5)
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Each request is its own connection, served by whichever pool thread
    // takes it, and the agent answers before it acts: the two shutdowns
    // may be carried out in either order.
    let mut seen = fx.system.0.lock().unwrap().clone();
    seen.sort();
    let mut want = want.to_vec();
    want.sort_unstable();
    assert_eq!(seen, want);
}

#[test]
fn protocol_violations_get_errors_not_crashes() {
    let fx = Fixture::new("hostile");
    let connect = || {
        let mut s = UnixStream::connect(&fx.sock).unwrap();
        s.write_all(b"CONNECT 52\n").unwrap();
        let mut ok = [0u8; 14];
        s.read_exact(&mut ok).unwrap();
        s
    };
    let mut s = connect();
    send(&mut s, &ToAgent::Hello { protocol: 99 }).unwrap();
    match recv::<FromAgent>(&mut s).unwrap() {
        FromAgent::Error(t) => assert!(t.contains("99"), "{t}"),
        other => panic!("{other:?}"),
    }
    let mut s = connect();
    send(&mut s, &ToAgent::Ping).unwrap();
    assert!(matches!(
        recv::<FromAgent>(&mut s).unwrap(),
        FromAgent::Error(_)
    ));
    let mut s = connect();
    send(
        &mut s,
        &ToAgent::Hello {
            protocol: agent::PROTOCOL_VERSION,
        },
    )
    .unwrap();
    let _ = recv::<FromAgent>(&mut s).unwrap();
    send(&mut s, &ToAgent::End).unwrap();
    assert!(matches!(
        recv::<FromAgent>(&mut s).unwrap(),
        FromAgent::Error(_)
    ));
    // Garbage and a huge declared frame: the connection ends, the agent
    // lives on.
    let mut s = connect();
    s.write_all(&[0xff; 64]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let mut s = connect();
    s.write_all(&[1, 0, 0, 0, 250]).unwrap();
    let _ = s.read_to_end(&mut rest);
    assert!(fx.client().ping().is_ok());
}

/// The agent powers the guest off only once the host has read the answer
/// (it closes the connection), so the answer is not lost with the guest;
/// a host that never closes delays it by at most a bounded wait.
#[test]
fn shutdown_waits_for_the_host_to_read_the_answer() {
    let fx = Fixture::new("shutdown-order");
    let mut s = UnixStream::connect(&fx.sock).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    let mut ok = [0u8; 14];
    s.read_exact(&mut ok).unwrap();
    send(
        &mut s,
        &ToAgent::Hello {
            protocol: agent::PROTOCOL_VERSION,
        },
    )
    .unwrap();
    send(&mut s, &ToAgent::Shutdown { reboot: false }).unwrap();
    assert!(matches!(
        recv::<FromAgent>(&mut s).unwrap(),
        FromAgent::Hello { .. }
    ));
    assert!(matches!(
        recv::<FromAgent>(&mut s).unwrap(),
        FromAgent::Done
    ));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        fx.system.0.lock().unwrap().is_empty(),
        "the agent acted before the host closed the connection"
    );
    let closed = std::time::Instant::now();
    drop(s);
    while fx.system.0.lock().unwrap().is_empty() {
        assert!(closed.elapsed() < std::time::Duration::from_secs(5));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(closed.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(
        *fx.system.0.lock().unwrap(),
        ["shutdown reboot=false".to_string()]
    );
}
