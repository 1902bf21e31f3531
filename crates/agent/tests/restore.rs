//! A restored or cloned guest is told so: the client's `reseed`,
//! `set_identity` and `announce_restore` against the real agent handler on
//! the host (a Unix socket stands in for the vsock device's, as in
//! roundtrip.rs). The guest's pool and machine id are scratch files, run
//! through the agent's real code; the hostname is set for real in a
//! private UTS namespace (needs root: skipped otherwise, unless
//! HOSTVISOR_REQUIRE_UTSNS=1 or HOSTVISOR_REQUIRE_NETNS=1 — CI's
//! namespace requirement — make it fail). Older agents are played by a
//! proxy in front of the handler.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::client::{AgentError, Client, Transport};
use agent::identity::{self, IdentityError, MAX_SEED, SEED_LEN};
use agent::server::{handle_connection, System, UNKNOWN_REQUEST};
use agent::{recv, send, FromAgent, Identity, Reseeded, ToAgent, PROTOCOL_VERSION};

/// A guest whose random pool and machine id are files in `dir`, whose
/// clock runs `offset_ns` behind the host's, and whose hostname changes
/// are recorded (or made for real, in a namespace).
struct Sandbox {
    dir: PathBuf,
    offset_ns: i64,
    real_hostname: bool,
    log: Mutex<Vec<String>>,
}

impl Sandbox {
    fn log(&self, what: String) {
        self.log.lock().unwrap().push(what);
    }
}

impl System for Sandbox {
    fn now_ns(&self) -> i64 {
        agent::now_ns() - self.offset_ns
    }
    fn set_time(&self, unix_ns: i64) -> std::io::Result<()> {
        let off = (agent::now_ns() - unix_ns).abs();
        self.log(format!("time within 1s: {}", off < 1_000_000_000));
        Ok(())
    }
    fn shutdown(&self, _reboot: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn reseed(&self, seed: &[u8]) -> std::io::Result<Reseeded> {
        self.log(format!("reseed {}", seed.len()));
        identity::mix_into_pool(&self.dir.join("urandom"), seed)
    }
    fn set_hostname(&self, name: &str) -> std::io::Result<()> {
        self.log(format!("hostname {name}"));
        if self.real_hostname {
            identity::set_hostname(name)?;
        }
        Ok(())
    }
    fn set_machine_id(&self, id: &str) -> std::io::Result<()> {
        self.log(format!("machine-id {id}"));
        identity::write_machine_id(&self.dir.join("machine-id"), id)
    }
}

/// How the agent behind the socket treats requests newer than `Info`.
#[derive(Clone, Copy, PartialEq)]
enum Agent {
    /// This agent.
    Current,
    /// An agent from before `Reseed`: it cannot decode them and closes
    /// the connection (its `Hello` already sent).
    Silent,
    /// An agent that cannot decode them and says so (the new variant
    /// number is made unknown on the way).
    Unknown,
}

struct Fixture {
    dir: PathBuf,
    sock: PathBuf,
    system: Arc<Sandbox>,
}

impl Fixture {
    fn new(name: &str, agent: Agent) -> Fixture {
        Self::start(name, agent, 0, false)
    }

    /// Serves on a thread of its own; `in_thread` runs first on it (to
    /// enter a namespace, which the handler threads it starts inherit).
    fn start(name: &str, agent: Agent, offset_ns: i64, real_hostname: bool) -> Fixture {
        Self::start_in(name, agent, offset_ns, real_hostname, || true).unwrap()
    }

    fn start_in(
        name: &str,
        agent: Agent,
        offset_ns: i64,
        real_hostname: bool,
        in_thread: impl FnOnce() -> bool + Send + 'static,
    ) -> Option<Fixture> {
        let dir = std::env::temp_dir().join(format!("hv-restore-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("urandom"), b"").unwrap();
        std::fs::write(dir.join("machine-id"), "0123456789abcdef0123456789abcdef\n").unwrap();
        let sock = dir.join("v.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let system = Arc::new(Sandbox {
            dir: dir.clone(),
            offset_ns,
            real_hostname,
            log: Mutex::new(Vec::new()),
        });
        let sys = system.clone();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ok = in_thread();
            ready_tx.send(ok).unwrap();
            if !ok {
                return;
            }
            for s in listener.incoming() {
                let mut s = s.unwrap();
                let sys = sys.clone();
                std::thread::spawn(move || {
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    assert_eq!(line, b"CONNECT 52");
                    s.write_all(b"OK 1073741824\n").unwrap();
                    if agent == Agent::Current {
                        let _ = handle_connection(s, &*sys);
                    } else {
                        older_agent(s, agent, &sys);
                    }
                });
            }
        });
        if !ready.recv().unwrap() {
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
        Some(Fixture { dir, sock, system })
    }

    fn client(&self) -> Client {
        Client::new(Transport::Muxer(self.sock.clone()))
    }

    fn log(&self) -> Vec<String> {
        self.system.log.lock().unwrap().clone()
    }

    fn connect(&self) -> UnixStream {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.write_all(b"CONNECT 52\n").unwrap();
        let mut ok = [0u8; 14];
        s.read_exact(&mut ok).unwrap();
        send(
            &mut s,
            &ToAgent::Hello {
                protocol: PROTOCOL_VERSION,
            },
        )
        .unwrap();
        assert!(matches!(
            recv::<FromAgent>(&mut s).unwrap(),
            FromAgent::Hello { .. }
        ));
        s
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads one raw frame (length and body).
fn read_frame(r: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    r.read_exact(&mut body).ok()?;
    Some([&len[..], &body].concat())
}

/// The variant number of `Reseed`, the first request older agents lack.
const FIRST_NEW_REQUEST: u8 = 12;

/// Plays an older agent in front of the real handler: frames pass until
/// one carries a request newer than `Info`.
fn older_agent(host: UnixStream, agent: Agent, sys: &Sandbox) {
    let (agent_end, mut proxy) = UnixStream::pair().unwrap();
    let mut to_host = host.try_clone().unwrap();
    let mut from_agent = proxy.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_agent, &mut to_host);
    });
    let mut from_host = host;
    std::thread::spawn(move || {
        // An older agent's first read takes what has arrived: when that is
        // `Hello` and a request it cannot decode (a client sending both in
        // one write), it ends the connection before its `Hello` leaves.
        let mut first_read = vec![0u8; 256 << 10];
        let n = from_host.read(&mut first_read).unwrap_or(0);
        first_read.truncate(n);
        let hello_len = first_read.get(..4).map_or(0, |l| {
            4 + u32::from_le_bytes(l.try_into().unwrap()) as usize
        });
        if agent == Agent::Silent
            && first_read
                .get(hello_len + 4)
                .is_some_and(|&v| v >= FIRST_NEW_REQUEST)
        {
            let _ = from_host.shutdown(std::net::Shutdown::Both);
            let _ = proxy.shutdown(std::net::Shutdown::Both);
            return;
        }
        let mut from_host = std::io::Cursor::new(first_read).chain(from_host);
        let mut first = true;
        while let Some(mut frame) = read_frame(&mut from_host) {
            if !first && frame.get(4).is_some_and(|&v| v >= FIRST_NEW_REQUEST) {
                if agent == Agent::Silent {
                    let _ = from_host.get_ref().1.shutdown(std::net::Shutdown::Both);
                    let _ = proxy.shutdown(std::net::Shutdown::Both);
                    return;
                }
                frame[4] = 200;
            }
            first = false;
            if proxy.write_all(&frame).is_err() {
                return;
            }
        }
    });
    let _ = handle_connection(agent_end, sys);
}

fn identity() -> Identity {
    Identity {
        hostname: Some("clone-2".into()),
        machine_id: Some(identity::new_machine_id().unwrap()),
    }
}

#[test]
fn announce_restore_reseeds_steps_the_clock_and_sets_the_identity_in_order() {
    // The guest's clock is an hour behind, as after a restore.
    let fx = Fixture::start("announce", Agent::Current, 3_600_000_000_000, false);
    let id = identity();
    let report = fx.client().announce_restore(Some(&id)).unwrap();
    assert_eq!(
        report.reseeded,
        Reseeded {
            bytes: SEED_LEN as u32,
            credited: false,
            crng_reseeded: false
        }
    );
    assert!((report.clock_drift_secs + 3600.0).abs() < 1.0, "{report:?}");
    assert!(report.clock_stepped && report.identity_set);
    let machine_id = id.machine_id.clone().unwrap();
    assert_eq!(
        fx.log(),
        [
            format!("reseed {SEED_LEN}"),
            "time within 1s: true".into(),
            "hostname clone-2".into(),
            format!("machine-id {machine_id}"),
        ]
    );
    assert_eq!(
        std::fs::read_to_string(fx.dir.join("machine-id")).unwrap(),
        format!("{machine_id}\n")
    );
    // A fresh seed each time: two restores (or two clones) never get the
    // same bytes.
    let first = std::fs::read(fx.dir.join("urandom")).unwrap();
    assert_eq!(first.len(), SEED_LEN);
    let report = fx.client().announce_restore(None).unwrap();
    assert!(!report.identity_set);
    // (A plain file stands in for the pool: each seed is written at its
    // start.)
    let second = std::fs::read(fx.dir.join("urandom")).unwrap();
    assert_eq!(second.len(), SEED_LEN);
    assert_ne!(first, second);
    assert_eq!(fx.log().len(), 6, "{:?}", fx.log());
}

#[test]
fn a_clock_in_time_is_left_alone() {
    let fx = Fixture::new("in-time", Agent::Current);
    let report = fx.client().announce_restore(None).unwrap();
    assert!(!report.clock_stepped, "{report:?}");
    assert_eq!(fx.log(), [format!("reseed {SEED_LEN}")]);
}

#[test]
fn bad_identities_and_seeds_are_refused_at_both_ends() {
    let fx = Fixture::new("bad", Agent::Current);
    let c = fx.client();
    // The client refuses before sending anything.
    let bad_name = Identity {
        hostname: Some("-bad".into()),
        machine_id: None,
    };
    assert!(matches!(
        c.set_identity(&bad_name),
        Err(AgentError::Invalid(IdentityError::Hostname(..)))
    ));
    assert!(matches!(
        c.announce_restore(Some(&bad_name)),
        Err(AgentError::Invalid(_))
    ));
    for seed in [&[][..], &[1; MAX_SEED + 1][..]] {
        assert!(matches!(
            c.reseed(seed),
            Err(AgentError::Invalid(IdentityError::SeedSize(_)))
        ));
    }
    assert!(fx.log().is_empty(), "{:?}", fx.log());
    // The agent refuses them too when sent directly: a good hostname with
    // a bad machine id changes nothing.
    let half_bad = Identity {
        hostname: Some("good".into()),
        machine_id: Some("0123456789ABCDEF0123456789ABCDEF".into()),
    };
    let mut s = fx.connect();
    send(&mut s, &ToAgent::SetIdentity(half_bad)).unwrap();
    match recv::<FromAgent>(&mut s).unwrap() {
        FromAgent::Error(t) => assert!(t.contains("machine id"), "{t}"),
        other => panic!("{other:?}"),
    }
    for seed in [vec![], vec![1; MAX_SEED + 1]] {
        let mut s = fx.connect();
        send(&mut s, &ToAgent::Reseed { seed }).unwrap();
        match recv::<FromAgent>(&mut s).unwrap() {
            FromAgent::Error(t) => assert!(t.contains("seed of"), "{t}"),
            other => panic!("{other:?}"),
        }
    }
    // A seed frame whose length field claims more than it carries: the
    // agent answers that it cannot decode it and lives on.
    let mut frame = agent::encode(&ToAgent::Reseed { seed: vec![9; 64] }).unwrap();
    frame[5] = 70;
    let mut s = fx.connect();
    s.write_all(&frame).unwrap();
    match recv::<FromAgent>(&mut s).unwrap() {
        FromAgent::Error(t) => assert!(t.starts_with(UNKNOWN_REQUEST), "{t}"),
        other => panic!("{other:?}"),
    }
    assert!(fx.log().is_empty(), "{:?}", fx.log());
    assert_eq!(
        std::fs::read_to_string(fx.dir.join("machine-id")).unwrap(),
        "0123456789abcdef0123456789abcdef\n"
    );
    // And it still serves.
    c.reseed(&[3; 16]).unwrap();
    assert_eq!(fx.log(), ["reseed 16"]);
}

#[test]
fn older_agents_give_a_clear_error_not_a_wait() {
    for (name, agent) in [("silent", Agent::Silent), ("unknown", Agent::Unknown)] {
        // Patience would make an unreachable agent a long wait: an agent
        // that answered Hello is not unreachable.
        let fx = Fixture::start(name, agent, 3_600_000_000_000, false);
        let c = fx.client().patient(Duration::from_secs(30));
        let start = Instant::now();
        match c.reseed(&[1; 32]) {
            Err(AgentError::Unsupported { request, agent }) => {
                assert_eq!((request, agent.as_str()), ("Reseed", agent::VERSION))
            }
            other => panic!("{name}: {other:?}"),
        }
        match c.set_identity(&identity()) {
            Err(e @ AgentError::Unsupported { .. }) => {
                let text = e.to_string();
                assert!(text.contains("SetIdentity"), "{text}");
                assert!(
                    text.contains("update the guest's hostvisor-agent"),
                    "{text}"
                );
            }
            other => panic!("{name}: {other:?}"),
        }
        // The restore still steps the clock, then says what is missing.
        assert!(matches!(
            c.announce_restore(None),
            Err(AgentError::Unsupported {
                request: "Reseed",
                ..
            })
        ));
        assert!(start.elapsed() < Duration::from_secs(10), "{name}");
        assert_eq!(fx.log(), ["time within 1s: true"], "{name}");
        // What the older agent knows still works.
        assert!(c.ping().is_ok());
    }
}

/// Runs in a new UTS namespace (root only), or says why not.
fn enter_uts_namespace() -> bool {
    // SAFETY: unshare with a namespace flag has no memory effects; only
    // this thread (and threads it starts) enters the new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWUTS) } == 0 {
        return true;
    }
    let e = std::io::Error::last_os_error();
    let required = ["HOSTVISOR_REQUIRE_UTSNS", "HOSTVISOR_REQUIRE_NETNS"]
        .iter()
        .any(|v| std::env::var(v).as_deref() == Ok("1"));
    assert!(
        !required,
        "a UTS namespace is required (HOSTVISOR_REQUIRE_UTSNS/NETNS=1): {e}"
    );
    eprintln!("SKIPPED: cannot make a UTS namespace ({e}); run as root");
    false
}

#[test]
fn the_hostname_is_set_for_real_in_the_guests_namespace() {
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let Some(fx) = Fixture::start_in("uts", Agent::Current, 0, true, enter_uts_namespace) else {
        return;
    };
    let id = identity();
    let report = fx.client().announce_restore(Some(&id)).unwrap();
    assert!(report.identity_set);
    // The agent's threads see the new name; this process's others do not.
    assert_eq!(fx.client().info().unwrap().hostname, "clone-2");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        host_name
    );
}
