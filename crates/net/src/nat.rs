//! `nat`: the default, unprivileged user-mode network, as QEMU's
//! `-netdev user`: the guest sits alone on 10.0.2.0/24 behind a gateway
//! (10.0.2.2, which is also the host's loopback) that hands out 10.0.2.15
//! by DHCP, forwards DNS sent to 10.0.2.3 to the host's resolver, and turns
//! the guest's TCP, UDP and ICMP echo into the host's own sockets.
//! Port forwards (`hostfwd`) listen on the host and connect into the guest.
//!
//! The engine is libslirp, the C library QEMU, podman (slirp4netns) and
//! libvirt's user networking use, loaded at run time (`libslirp`) with the
//! types of `libslirp-sys`. It was
//! chosen over a Rust TCP/IP stack (smoltcp) because smoltcp is a stack,
//! not a NAT: the DHCP server, the DNS relay and the proxying of every
//! guest connection to a host socket would all be ours to write and
//! harden, while libslirp has had them in production (and under OSS-Fuzz)
//! for years. Its known cost is TCP throughput: it does not scale its
//! receive window past 64 KiB, which caps one connection at 64 KiB per
//! round trip; `bench/net.py` measures it against QEMU's use of the same
//! library. See docs/architecture.md.
//!
//! libslirp is single-threaded: an [`Engine`] lives on one thread. [`Nat`]
//! runs an engine on its own thread and hands the device a datagram
//! socket pair: one message per Ethernet frame, each way.

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use libslirp_sys as sys;
use serde_with::{DeserializeFromStr, SerializeDisplay};
use vmm_sys_util::eventfd::EventFd;

use crate::{Backend, NetError, MAX_PACKET};

mod libslirp;
pub use libslirp::{version as libslirp_version, INSTALL_HINT as LIBSLIRP_HINT};

pub const NETWORK: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
/// The gateway; connections to it reach the host's loopback.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The DNS relay.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest's address (the first the DHCP server gives).
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// IPv6: QEMU's site-local prefix, gateway ::2 and DNS ::3 in it.
const PREFIX6: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0);
const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 2);
const DNS6: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 3);

/// The link's MTU: libslirp's largest (as passt's default), so the guest
/// sends and receives 64 KiB TCP segments instead of 1500-byte ones. Each
/// packet costs the guest's kernel an interrupt and a trip through its
/// stack, so a large MTU is the cheapest throughput there is (the same
/// reason TSO exists on real NICs).
pub const NAT_MTU: u16 = 65_520;

/// Frames the engine holds for a guest that does not read them; more are
/// dropped (the guest's TCP resends).
const MAX_QUEUED: usize = 4096;
/// Guest frames taken per loop turn, so host sockets are served too.
const INPUT_BATCH: usize = 256;

/// A port forward, in QEMU's syntax: `[tcp|udp]:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`.
/// An empty host address is every address (0.0.0.0), as in QEMU; an empty
/// guest address is the guest's DHCP address.
#[derive(Debug, Clone, PartialEq, Eq, SerializeDisplay, DeserializeFromStr)]
pub struct HostFwd {
    pub udp: bool,
    pub host_addr: Ipv4Addr,
    pub host_port: u16,
    pub guest_addr: Ipv4Addr,
    pub guest_port: u16,
}

impl std::fmt::Display for HostFwd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}-{}:{}",
            if self.udp { "udp" } else { "tcp" },
            self.host_addr,
            self.host_port,
            self.guest_addr,
            self.guest_port
        )
    }
}

impl FromStr for HostFwd {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            |why: &str| format!("hostfwd `{s}`: {why} (expected e.g. tcp:127.0.0.1:8080-:80)");
        let (udp, rest) = match s.split_once(':') {
            Some(("tcp", rest)) => (false, rest),
            Some(("udp", rest)) => (true, rest),
            Some(("", rest)) => (false, rest),
            _ => return Err(bad("starts with tcp: or udp:")),
        };
        let (host, guest) = rest
            .split_once('-')
            .ok_or_else(|| bad("host and guest sides are separated by `-`"))?;
        let addr_port = |side: &str, default: Ipv4Addr| -> Result<(Ipv4Addr, u16), String> {
            let (a, p) = side
                .rsplit_once(':')
                .ok_or_else(|| bad("each side is ADDR:PORT, ADDR may be empty"))?;
            let addr = if a.is_empty() {
                default
            } else {
                a.parse()
                    .map_err(|_| bad(&format!("`{a}` is not an IPv4 address")))?
            };
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad(&format!("`{p}` is not a port (1-65535)")))?;
            Ok((addr, port))
        };
        let (host_addr, host_port) = addr_port(host, Ipv4Addr::UNSPECIFIED)?;
        let (guest_addr, guest_port) = addr_port(guest, GUEST)?;
        Ok(HostFwd {
            udp,
            host_addr,
            host_port,
            guest_addr,
            guest_port,
        })
    }
}

/// What the NAT is set up with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatConfig {
    pub hostfwd: Vec<HostFwd>,
    /// No outbound connections (only port forwards): libslirp's
    /// `restricted` mode. The fuzz target uses it.
    pub restricted: bool,
}

/// Counters of one NAT.
#[derive(Debug, Default)]
pub struct NatStats {
    /// Frames from the guest that libslirp complained about.
    pub guest_errors: AtomicU64,
    /// Frames for the guest dropped because it did not take them.
    pub dropped: AtomicU64,
}

struct Timer {
    cb: sys::SlirpTimerCb,
    cb_opaque: *mut c_void,
    expire_ms: Option<i64>,
}

/// What libslirp's callbacks reach through their `opaque` pointer.
struct State {
    epoch: Instant,
    out: VecDeque<Vec<u8>>,
    timers: Vec<*mut Timer>,
    pollfds: Vec<libc::pollfd>,
    stats: Arc<NatStats>,
}

/// One libslirp instance. Not `Send`: it must stay on the thread that made
/// it.
pub struct Engine {
    slirp: NonNull<sys::Slirp>,
    /// Owned (from `Box::into_raw`); reached by libslirp's callbacks, so
    /// only borrowed in short scopes that call no libslirp function.
    state: *mut State,
    lib: &'static libslirp::Libslirp,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Engine")
    }
}

/// # Safety
/// `opaque` is the `State` an `Engine` gave libslirp, alive while it is.
unsafe fn state<'a>(opaque: *mut c_void) -> &'a mut State {
    // SAFETY: the caller's promise; libslirp calls back only from inside
    // our calls into it, on the engine's thread, while no other borrow of
    // the state is live.
    unsafe { &mut *opaque.cast::<State>() }
}

unsafe extern "C" fn send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    // SAFETY: libslirp passes its engine's state.
    let st = unsafe { state(opaque) };
    if st.out.len() >= MAX_QUEUED {
        st.stats.dropped.fetch_add(1, Ordering::Relaxed);
    } else {
        // SAFETY: libslirp passes a frame of `len` bytes, valid during the
        // call.
        let frame = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        st.out.push_back(frame.to_vec());
    }
    len as isize
}

unsafe extern "C" fn guest_error(msg: *const c_char, opaque: *mut c_void) {
    // SAFETY: libslirp passes its engine's state and a C string.
    let (st, msg) = unsafe { (state(opaque), CStr::from_ptr(msg)) };
    st.stats.guest_errors.fetch_add(1, Ordering::Relaxed);
    tracing::debug!("nat: guest error: {}", msg.to_string_lossy());
}

unsafe extern "C" fn clock_get_ns(opaque: *mut c_void) -> i64 {
    // SAFETY: libslirp passes its engine's state.
    let st = unsafe { state(opaque) };
    // i64 nanoseconds last 292 years.
    i64::try_from(st.epoch.elapsed().as_nanos()).unwrap_or(i64::MAX)
}

unsafe extern "C" fn timer_new(
    cb: sys::SlirpTimerCb,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    // SAFETY: libslirp passes its engine's state.
    let st = unsafe { state(opaque) };
    let timer = Box::into_raw(Box::new(Timer {
        cb,
        cb_opaque,
        expire_ms: None,
    }));
    st.timers.push(timer);
    timer.cast()
}

unsafe extern "C" fn timer_free(timer: *mut c_void, opaque: *mut c_void) {
    // SAFETY: libslirp passes its engine's state.
    let st = unsafe { state(opaque) };
    let timer = timer.cast::<Timer>();
    if let Some(i) = st.timers.iter().position(|&t| t == timer) {
        st.timers.swap_remove(i);
        // SAFETY: made by `timer_new` with Box::into_raw, freed once (it
        // was still in the list).
        drop(unsafe { Box::from_raw(timer) });
    }
}

unsafe extern "C" fn timer_mod(timer: *mut c_void, expire_ms: i64, opaque: *mut c_void) {
    // SAFETY: libslirp passes its engine's state.
    let st = unsafe { state(opaque) };
    let timer = timer.cast::<Timer>();
    if st.timers.contains(&timer) {
        // SAFETY: a live timer of this engine (it is in the list).
        unsafe { (*timer).expire_ms = Some(expire_ms) };
    }
}

unsafe extern "C" fn poll_fd_changed(_fd: c_int, _opaque: *mut c_void) {
    // Every descriptor is polled afresh each turn (slirp_pollfds_fill).
}

unsafe extern "C" fn notify(_opaque: *mut c_void) {
    // The loop runs the engine after every wake-up anyway.
}

unsafe extern "C" fn add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: libslirp passes the state we gave slirp_pollfds_fill.
    let st = unsafe { state(opaque) };
    let mut ev = 0;
    for (s, p) in POLL_MAP {
        if events & s != 0 {
            ev |= p;
        }
    }
    st.pollfds.push(libc::pollfd {
        fd,
        events: ev,
        revents: 0,
    });
    // libslirp asks for a few descriptors per connection; past c_int
    // it gets an index it cannot use, which it treats as no events.
    c_int::try_from(st.pollfds.len() - 1).unwrap_or(-1)
}

unsafe extern "C" fn get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: libslirp passes the state we gave slirp_pollfds_poll.
    let st = unsafe { state(opaque) };
    let Some(p) = usize::try_from(idx).ok().and_then(|i| st.pollfds.get(i)) else {
        return 0;
    };
    let mut ev = 0;
    for (s, q) in POLL_MAP {
        if p.revents & q != 0 {
            ev |= s;
        }
    }
    ev
}

const POLL_MAP: [(c_int, i16); 5] = [
    (sys::SLIRP_POLL_IN, libc::POLLIN),
    (sys::SLIRP_POLL_OUT, libc::POLLOUT),
    (sys::SLIRP_POLL_PRI, libc::POLLPRI),
    (sys::SLIRP_POLL_ERR, libc::POLLERR),
    (sys::SLIRP_POLL_HUP, libc::POLLHUP),
];

static CALLBACKS: sys::SlirpCb = sys::SlirpCb {
    send_packet: Some(send_packet),
    guest_error: Some(guest_error),
    clock_get_ns: Some(clock_get_ns),
    timer_new: Some(timer_new),
    timer_free: Some(timer_free),
    timer_mod: Some(timer_mod),
    register_poll_fd: Some(poll_fd_changed),
    unregister_poll_fd: Some(poll_fd_changed),
    notify: Some(notify),
};

impl Engine {
    /// A NAT with `config`'s port forwards listening.
    pub fn new(config: &NatConfig, stats: Arc<NatStats>) -> Result<Engine, NetError> {
        let lib = libslirp::get().map_err(NetError::NoLibslirp)?;
        let state = Box::into_raw(Box::new(State {
            epoch: Instant::now(),
            out: VecDeque::new(),
            timers: Vec::new(),
            pollfds: Vec::new(),
            stats,
        }));
        let cfg = sys::SlirpConfig {
            // Version 3: the fields this binding has (libslirp ≥ 4.2).
            version: 3,
            restricted: c_int::from(config.restricted),
            in_enabled: true,
            vnetwork: NETWORK.into(),
            vnetmask: NETMASK.into(),
            vhost: GATEWAY.into(),
            in6_enabled: true,
            vprefix_addr6: PREFIX6.into(),
            vprefix_len: 64,
            vhost6: GATEWAY6.into(),
            vhostname: std::ptr::null(),
            tftp_server_name: std::ptr::null(),
            tftp_path: std::ptr::null(),
            bootfile: std::ptr::null(),
            vdhcp_start: GUEST.into(),
            vnameserver: DNS.into(),
            vnameserver6: DNS6.into(),
            vdnssearch: std::ptr::null_mut(),
            vdomainname: std::ptr::null(),
            if_mtu: usize::from(NAT_MTU),
            if_mru: usize::from(NAT_MTU),
            disable_host_loopback: false,
            enable_emu: false,
            outbound_addr: std::ptr::null(),
            outbound_addr6: std::ptr::null(),
            disable_dns: false,
            disable_dhcp: false,
        };
        // SAFETY: the config is complete for version 3 and read during the
        // call; the callbacks are static; `state` outlives the instance
        // (freed in Drop after slirp_cleanup).
        let slirp = unsafe { (lib.new)(&cfg, &CALLBACKS, state.cast()) };
        let Some(slirp) = NonNull::new(slirp) else {
            // SAFETY: not handed to any libslirp instance.
            drop(unsafe { Box::from_raw(state) });
            return Err(NetError::Nat("slirp_new failed".into()));
        };
        let engine = Engine { slirp, state, lib };
        for fwd in &config.hostfwd {
            // SAFETY: a live instance; plain values.
            let r = unsafe {
                (lib.add_hostfwd)(
                    engine.slirp.as_ptr(),
                    c_int::from(fwd.udp),
                    fwd.host_addr.into(),
                    c_int::from(fwd.host_port),
                    fwd.guest_addr.into(),
                    c_int::from(fwd.guest_port),
                )
            };
            if r != 0 {
                return Err(NetError::HostFwd(fwd.to_string()));
            }
        }
        Ok(engine)
    }

    /// Hands the engine one Ethernet frame from the guest.
    pub fn input(&mut self, frame: &[u8]) {
        if frame.is_empty() || frame.len() > MAX_PACKET {
            return;
        }
        let Ok(len) = c_int::try_from(frame.len()) else {
            return;
        };
        // SAFETY: a live instance; the frame is valid for the call.
        unsafe { (self.lib.input)(self.slirp.as_ptr(), frame.as_ptr(), len) };
    }

    /// The next frame for the guest, without taking it.
    pub fn peek_output(&mut self) -> Option<&[u8]> {
        // SAFETY: no libslirp call while the borrow lives.
        unsafe { (*self.state).out.front().map(Vec::as_slice) }
    }

    /// Takes the next frame for the guest.
    pub fn pop_output(&mut self) -> Option<Vec<u8>> {
        // SAFETY: no libslirp call while the borrow lives.
        unsafe { (*self.state).out.pop_front() }
    }

    /// Waits up to `timeout_ms` for the engine's host sockets and `extra`
    /// (whose `revents` are filled in), then serves the sockets and timers.
    pub fn poll(&mut self, timeout_ms: u32, extra: &mut [libc::pollfd]) {
        let st = self.state;
        let mut timeout = timeout_ms.min(self.next_timer_ms());
        // SAFETY: no libslirp call while the borrow lives.
        unsafe { (*st).pollfds.clear() };
        // SAFETY: a live instance; `add_poll` gets our state.
        unsafe {
            (self.lib.pollfds_fill)(self.slirp.as_ptr(), &mut timeout, Some(add_poll), st.cast())
        };
        let ready = {
            // SAFETY: no libslirp call while the borrow lives.
            let fds = unsafe { &mut (*st).pollfds };
            let own = fds.len();
            fds.extend_from_slice(extra);
            // SAFETY: `fds` is a valid array of its length.
            let ready = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    timeout as c_int,
                )
            };
            for (e, f) in extra.iter_mut().zip(&fds[own..]) {
                e.revents = f.revents;
            }
            fds.truncate(own);
            ready
        };
        // SAFETY: a live instance; `get_revents` gets our state, whose
        // pollfds are those filled above.
        unsafe {
            (self.lib.pollfds_poll)(
                self.slirp.as_ptr(),
                c_int::from(ready < 0),
                Some(get_revents),
                st.cast(),
            )
        };
        self.fire_timers();
    }

    fn now_ms(&self) -> i64 {
        // SAFETY: no libslirp call while the borrow lives.
        let elapsed = unsafe { (*self.state).epoch.elapsed() };
        i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
    }

    /// Milliseconds until the next timer is due.
    fn next_timer_ms(&self) -> u32 {
        let now = self.now_ms();
        // SAFETY: no libslirp call while the borrow lives; the timers in
        // the list are live.
        let timers = unsafe { &(*self.state).timers };
        timers
            .iter()
            // SAFETY: live timers (in the list).
            .filter_map(|&t| unsafe { (*t).expire_ms })
            .map(|e| u32::try_from(e.saturating_sub(now).max(0)).unwrap_or(u32::MAX))
            .min()
            .unwrap_or(u32::MAX)
    }

    fn fire_timers(&mut self) {
        let now = self.now_ms();
        // SAFETY: no libslirp call while the borrow lives.
        let due: Vec<*mut Timer> = unsafe { (*self.state).timers.clone() };
        for t in due {
            // A callback may free or re-arm other timers: re-check each.
            // SAFETY: no libslirp call while the borrow lives.
            if !unsafe { (*self.state).timers.contains(&t) } {
                continue;
            }
            // SAFETY: a live timer (in the list).
            let timer = unsafe { &mut *t };
            if timer.expire_ms.is_some_and(|e| e <= now) {
                timer.expire_ms = None;
                let (cb, arg) = (timer.cb, timer.cb_opaque);
                if let Some(cb) = cb {
                    // SAFETY: libslirp's own callback with its own
                    // argument, on the engine's thread.
                    unsafe { cb(arg) };
                }
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: the instance is live and not used after this; cleanup
        // frees its timers through our callbacks.
        unsafe { (self.lib.cleanup)(self.slirp.as_ptr()) };
        // SAFETY: made by Box::into_raw in `new`; libslirp is gone.
        let state = unsafe { Box::from_raw(self.state) };
        for t in state.timers {
            // SAFETY: timers libslirp did not free, made by `timer_new`.
            drop(unsafe { Box::from_raw(t) });
        }
    }
}

/// The NAT as a backend: an [`Engine`] on its own thread.
#[derive(Debug)]
pub struct Nat {
    sock: OwnedFd,
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
    stats: Arc<NatStats>,
}

fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and ours.
    let pair = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for fd in [&pair.0, &pair.1] {
        let size: c_int = 4 << 20;
        // SAFETY: an int option of the right size. The kernel caps it at
        // wmem_max; failure only means the default size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const c_int).cast(),
                // 4 bytes.
                libc::socklen_t::try_from(std::mem::size_of::<c_int>()).unwrap_or(4),
            )
        };
    }
    Ok(pair)
}

/// Sends one message without blocking.
pub(crate) fn send_msg(fd: RawFd, msg: &[u8]) -> std::io::Result<()> {
    // SAFETY: `msg` is valid for its length.
    let n = unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message without blocking.
pub(crate) fn recv_msg(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

impl Nat {
    /// Starts the NAT; fails if a port forward cannot listen.
    pub fn start(config: &NatConfig) -> Result<Nat, NetError> {
        let (ours, theirs) = seqpacket_pair()?;
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let kill_theirs = kill.try_clone()?;
        let stats = Arc::new(NatStats::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let config = config.clone();
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("net-nat".into())
            .spawn(move || {
                let engine = match Engine::new(&config, thread_stats) {
                    Ok(e) => {
                        let _ = ready_tx.send(Ok(()));
                        e
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                seccomp::apply(seccomp::ThreadKind::Nat);
                run(engine, &theirs, &kill_theirs);
            })?;
        let nat = Nat {
            sock: ours,
            kill,
            thread: Some(thread),
            stats,
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(nat),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NetError::Nat("the NAT thread ended".into())),
        }
    }

    pub fn stats(&self) -> Arc<NatStats> {
        self.stats.clone()
    }
}

/// The NAT thread: frames from the device into the engine, the engine's
/// frames back, host sockets and timers served in between.
fn run(mut engine: Engine, sock: &OwnedFd, kill: &EventFd) {
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let out_waiting = engine.peek_output().is_some();
        let mut extra = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN | if out_waiting { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: kill.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        engine.poll(1000, &mut extra);
        if extra[1].revents != 0 {
            return;
        }
        for _ in 0..INPUT_BATCH {
            match recv_msg(sock.as_raw_fd(), &mut buf) {
                // The device side is gone.
                Ok(0) => return,
                Ok(n) => engine.input(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        while let Some(frame) = engine.peek_output() {
            match send_msg(sock.as_raw_fd(), frame) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // Too large for the socket, or the device is gone: lose it.
                Err(_) => {}
            }
            engine.pop_output();
        }
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        let _ = self.kill.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Backend for Nat {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn checksums_valid(&self) -> bool {
        // libslirp builds every frame it hands the guest (its own TCP,
        // UDP, ICMP, DHCP and DNS replies), checksums computed.
        true
    }

    fn mtu(&self) -> Option<u16> {
        Some(NAT_MTU)
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        send_msg(self.sock.as_raw_fd(), frame)
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        recv_msg(self.sock.as_raw_fd(), buf)
    }
}

#[cfg(test)]
// Test lengths and byte patterns are small constants.
#[allow(clippy::cast_possible_truncation)]
mod tests;
