//! `internal=NAME`: VMs naming the same internal network exchange Ethernet
//! frames, with no host access and no root, like VirtualBox's internal
//! networks. There is no switch process: each NIC binds a Unix datagram
//! socket named by its MAC in the network's directory
//! (`$XDG_RUNTIME_DIR/hostvisor/net/NAME/`, or `/tmp/hostvisor-UID/...`),
//! and sends each frame straight to the socket of its destination MAC —
//! or, for broadcast, multicast and MACs not on the network, to every
//! other socket there (a switch's flooding). The directory is the user's
//! own (mode 0700), so other users' programs cannot join.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Backend, MacAddr, NetError};

/// How long the list of peers is trusted before the directory is read again.
const PEERS_TTL: Duration = Duration::from_secs(1);

/// Whether `name` can name an internal network.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The directory of internal network `name`.
pub fn network_dir(name: &str) -> PathBuf {
    let base = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("hostvisor"),
        // SAFETY: getuid cannot fail.
        _ => std::env::temp_dir().join(format!("hostvisor-{}", unsafe { libc::getuid() })),
    };
    base.join("net").join(name)
}

#[derive(Debug)]
pub struct Switch {
    name: String,
    sock: UnixDatagram,
    dir: PathBuf,
    path: PathBuf,
    peers: Vec<PathBuf>,
    peers_read: Option<Instant>,
}

impl Switch {
    /// Joins internal network `name` with address `mac`.
    pub fn join(name: &str, mac: MacAddr) -> Result<Switch, NetError> {
        let err = |why: String| NetError::Internal {
            name: name.to_string(),
            why,
        };
        if !valid_name(name) {
            return Err(err(
                "a network name is 1-64 letters, digits, - _ . (not starting with .)".into(),
            ));
        }
        let dir = network_dir(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(format!("{}.sock", mac.dashed()));
        let sock = match UnixDatagram::bind(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                // A socket left by a VM that is gone refuses connections.
                let probe = UnixDatagram::unbound()?;
                if probe.connect(&path).is_ok() {
                    return Err(err(format!("MAC {mac} is already on this network")));
                }
                let _ = std::fs::remove_file(&path);
                UnixDatagram::bind(&path)
                    .map_err(|e| err(format!("cannot bind {}: {e}", path.display())))?
            }
            Err(e) => return Err(err(format!("cannot bind {}: {e}", path.display()))),
        };
        sock.set_nonblocking(true)?;
        Ok(Switch {
            name: name.to_string(),
            sock,
            dir,
            path,
            peers: Vec::new(),
            peers_read: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn refresh_peers(&mut self, force: bool) {
        if !force && self.peers_read.is_some_and(|t| t.elapsed() < PEERS_TTL) {
            return;
        }
        self.peers.clear();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let p = e.path();
                if p != self.path && p.extension().is_some_and(|x| x == "sock") {
                    self.peers.push(p);
                }
            }
        }
        self.peers_read = Some(Instant::now());
    }

    /// Sends to one peer; a full or vanished peer loses the frame, as on a
    /// switch.
    fn send_to(&self, path: &Path, frame: &[u8]) -> bool {
        match self.sock.send_to(frame, path) {
            Ok(_) => true,
            Err(e) => {
                tracing::trace!("internal {}: {}: {e}", self.name, path.display());
                false
            }
        }
    }

    fn flood(&mut self, frame: &[u8]) {
        self.refresh_peers(false);
        for p in &self.peers {
            self.send_to(p, frame);
        }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Backend for Switch {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let Some(dst) = MacAddr::destination(frame) else {
            return Ok(());
        };
        if dst.is_group() {
            self.flood(frame);
        } else {
            let path = self.dir.join(format!("{}.sock", dst.dashed()));
            if path == self.path {
                return Ok(());
            }
            if !self.send_to(&path, frame) && !path.exists() {
                self.refresh_peers(true);
                self.flood(frame);
            }
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: MacAddr, src: MacAddr, tag: u8) -> Vec<u8> {
        [&dst.0[..], &src.0[..], &[0x08, 0x00, tag]].concat()
    }

    fn recv_all(s: &mut Switch) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        let mut got = Vec::new();
        while let Ok(n) = s.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    #[test]
    fn frames_go_to_their_mac_or_to_everyone() {
        let run = std::env::temp_dir().join(format!("hv-switch-{}", std::process::id()));
        std::env::set_var("XDG_RUNTIME_DIR", &run);
        let [a, b, c] = [1u8, 2, 3].map(|i| MacAddr([0x52, 0x54, 0, 0, 0, i]));
        let mut sa = Switch::join("lab", a).unwrap();
        let mut sb = Switch::join("lab", b).unwrap();
        let mut sc = Switch::join("lab", c).unwrap();
        let mut other = Switch::join("other", b).unwrap();
        let e = Switch::join("lab", a).unwrap_err().to_string();
        assert!(e.contains("already on this network"), "{e}");
        assert!(Switch::join("../x", a).is_err());

        // Unicast reaches only its MAC.
        sa.send(&frame(b, a, 1)).unwrap();
        assert_eq!(recv_all(&mut sb), vec![frame(b, a, 1)]);
        assert!(recv_all(&mut sc).is_empty());
        assert!(recv_all(&mut other).is_empty(), "networks are separate");
        // Broadcast reaches every other NIC on the network, not the sender.
        sa.send(&frame(MacAddr::BROADCAST, a, 2)).unwrap();
        assert_eq!(recv_all(&mut sb), vec![frame(MacAddr::BROADCAST, a, 2)]);
        assert_eq!(recv_all(&mut sc), vec![frame(MacAddr::BROADCAST, a, 2)]);
        assert!(recv_all(&mut sa).is_empty());
        // An unknown unicast MAC is flooded.
        let unknown = MacAddr([0x52, 0x54, 0, 0, 0, 9]);
        sb.send(&frame(unknown, b, 3)).unwrap();
        assert_eq!(recv_all(&mut sa).len(), 1);
        assert_eq!(recv_all(&mut sc).len(), 1);
        // A runt frame is ignored.
        sa.send(&[1, 2, 3]).unwrap();
        // A NIC that leaves removes its socket; a stale one is replaced.
        drop(sc);
        assert!(!network_dir("lab").join("52-54-00-00-00-03.sock").exists());
        let stale = network_dir("lab").join("52-54-00-00-00-04.sock");
        drop(UnixDatagram::bind(&stale).unwrap());
        Switch::join("lab", MacAddr([0x52, 0x54, 0, 0, 0, 4])).unwrap();
        let _ = std::fs::remove_dir_all(&run);
    }
}
