//! File copies cannot be turned against the side that receives them: a
//! hostile guest's modes never make host files setuid, setgid, sticky or
//! more open than the host user's umask allows (nor the host's, guest
//! files), and a symbolic link or file planted where a copy's temporary
//! file goes is neither followed nor truncated.
//!
//! Every test here sets the same umask (0o027): it is per process, and this
//! file's tests run as threads of one.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use agent::client::{Client, Transport};
use agent::server::{handle_connection, System};
use agent::{recv, send, FromAgent, ToAgent};

const UMASK: u32 = 0o027;

fn set_umask() {
    // SAFETY: umask(2) only changes this process's file-creation mask.
    unsafe { libc::umask(UMASK as libc::mode_t) };
}

fn scratch(name: &str) -> PathBuf {
    set_umask();
    let dir = std::env::temp_dir().join(format!("hv-agent-safety-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

struct NoSystem;

impl System for NoSystem {
    fn set_time(&self, _: i64) -> std::io::Result<()> {
        Ok(())
    }
    fn shutdown(&self, _: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// A stand-in for the VM's vsock socket: answers `CONNECT` as the muxer
/// does, then hands the stream to `agent` (a thread per connection).
fn vsock_socket(dir: &Path, agent: fn(UnixStream)) -> PathBuf {
    let sock = dir.join("v.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let mut s = s.unwrap();
            std::thread::spawn(move || {
                let mut b = [0u8; 1];
                while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {}
                s.write_all(b"OK 1024\n").unwrap();
                agent(s);
            });
        }
    });
    sock
}

const HOSTILE_DATA: &[u8] = b"a guest's file\n";

/// A hostile agent: every download is a file with every mode bit set.
fn hostile_agent(mut s: UnixStream) {
    use sha2::Digest;
    let _hello: ToAgent = recv(&mut s).unwrap();
    let _request: ToAgent = recv(&mut s).unwrap();
    for msg in [
        FromAgent::Hello {
            protocol: agent::PROTOCOL_VERSION,
            version: "hostile".into(),
        },
        FromAgent::FileStart {
            mode: 0o7777,
            size: HOSTILE_DATA.len() as u64,
        },
        FromAgent::Data(HOSTILE_DATA.to_vec()),
        FromAgent::FileEnd {
            sha256: sha2::Sha256::digest(HOSTILE_DATA).into(),
        },
    ] {
        send(&mut s, &msg).unwrap();
    }
}

#[test]
fn a_guest_cannot_make_host_files_setuid_or_wider_than_the_umask() {
    let dir = scratch("host-modes");
    let sock = vsock_socket(&dir, hostile_agent);
    let client = Client::new(Transport::Muxer(sock));
    // A new file, and one that exists with a narrower mode.
    let fresh = dir.join("fresh");
    let existing = dir.join("existing");
    std::fs::write(&existing, b"old").unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o600)).unwrap();
    for local in [&fresh, &existing] {
        client.download("/etc/anything", local).unwrap();
        assert_eq!(std::fs::read(local).unwrap(), HOSTILE_DATA);
        assert_eq!(
            mode(local),
            0o777 & !UMASK,
            "{local:?}: no setuid/setgid/sticky, no bit the umask withholds"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Uploads `data` with `mode` straight to a handler on a socket pair (no
/// client: the host sends whatever mode it likes).
fn raw_upload(path: &Path, mode: u32, data: &[u8]) -> FromAgent {
    use sha2::Digest;
    let (mut host, guest) = UnixStream::pair().unwrap();
    let agent = std::thread::spawn(move || handle_connection(guest, &NoSystem));
    send(
        &mut host,
        &ToAgent::Hello {
            protocol: agent::PROTOCOL_VERSION,
        },
    )
    .unwrap();
    send(
        &mut host,
        &ToAgent::Upload {
            path: path.to_str().unwrap().into(),
            mode,
            size: data.len() as u64,
            sha256: sha2::Sha256::digest(data).into(),
        },
    )
    .unwrap();
    assert!(matches!(
        recv::<FromAgent>(&mut host).unwrap(),
        FromAgent::Hello { .. }
    ));
    assert_eq!(recv::<FromAgent>(&mut host).unwrap(), FromAgent::Done);
    send(&mut host, &ToAgent::Data(data.to_vec())).unwrap();
    send(&mut host, &ToAgent::End).unwrap();
    let reply = recv::<FromAgent>(&mut host).unwrap();
    drop(host);
    agent.join().unwrap().unwrap();
    reply
}

#[test]
fn the_agent_keeps_only_permission_bits_its_umask_allows() {
    let dir = scratch("guest-modes");
    let path = dir.join("uploaded");
    assert_eq!(raw_upload(&path, 0o7777, b"x"), FromAgent::Done);
    assert_eq!(std::fs::read(&path).unwrap(), b"x");
    assert_eq!(mode(&path), 0o777 & !UMASK);
    // A file the host made unreadable is still checked and placed.
    assert_eq!(raw_upload(&path, 0o200, b"y"), FromAgent::Done);
    assert_eq!(
        (std::fs::read(&path).unwrap(), mode(&path)),
        (b"y".to_vec(), 0o200)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn real_agent(s: UnixStream) {
    let _ = handle_connection(s, &NoSystem);
}

/// Where copies used to be written first: a name anyone could predict.
fn old_temp_name(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap().to_str().unwrap();
    path.with_file_name(format!(".{name}.hostvisor-{}", std::process::id()))
}

#[test]
fn links_and_files_planted_at_the_temporary_name_are_left_alone() {
    let dir = scratch("planted");
    let sock = vsock_socket(&dir, real_agent);
    let client = Client::new(Transport::Muxer(sock));
    let src = dir.join("src");
    std::fs::write(&src, b"the copy").unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").unwrap();

    // Both ends (the agent's upload, the client's download), each with a
    // symbolic link to the victim and with a plain file planted.
    let targets = ["up-link", "up-file", "down-link", "down-file"].map(|t| dir.join(t));
    for t in &targets {
        let planted = old_temp_name(t);
        if t.to_str().unwrap().ends_with("link") {
            std::os::unix::fs::symlink(&victim, &planted).unwrap();
        } else {
            std::fs::write(&planted, b"planted").unwrap();
        }
        if t.to_str().unwrap().contains("up-") {
            client.upload(&src, t.to_str().unwrap()).unwrap();
        } else {
            client.download(src.to_str().unwrap(), t).unwrap();
        }
        assert_eq!(std::fs::read(t).unwrap(), b"the copy", "{t:?}");
        assert!(!std::fs::symlink_metadata(t).unwrap().is_symlink(), "{t:?}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    for t in &targets {
        let planted = old_temp_name(t);
        let meta = std::fs::symlink_metadata(&planted).unwrap();
        if meta.is_file() {
            assert_eq!(std::fs::read(&planted).unwrap(), b"planted");
        } else {
            assert!(meta.is_symlink());
        }
    }
    // Nothing else is left behind.
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        3 + 2 * targets.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
