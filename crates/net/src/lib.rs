//! Where a guest's Ethernet frames go: the backends behind hostvisor's
//! virtio-net device. This crate knows Ethernet and the host, not virtio:
//! a [`Backend`] moves whole frames through one pollable file descriptor.
//!
//! - [`nat`]: the default, unprivileged user-mode network (libslirp, as in
//!   QEMU's `-netdev user`): DHCP, DNS, outbound TCP/UDP/ICMP echo, port
//!   forwards.
//! - [`tap`]: a host TAP device, for bridged and host-only setups.
//! - [`switch`]: an internal network between VMs, through Unix datagram
//!   sockets, with no host access.

#![warn(clippy::cast_possible_truncation)]

pub mod mac;
pub mod nat;
pub mod switch;
pub mod tap;

use std::os::fd::RawFd;

pub use mac::MacAddr;

/// The virtio-net header that TAP devices with `IFF_VNET_HDR` put before
/// each frame (12 bytes: with `num_buffers`). Kept here because the TAP
/// speaks it; the device fills it for the other backends.
pub const VNET_HDR_LEN: usize = 12;

/// The largest frame a backend hands over: 64 KiB of offloaded (TSO)
/// payload plus an Ethernet header, after the virtio-net header.
pub const MAX_PACKET: usize = VNET_HDR_LEN + 65_550;

/// Checksum and segmentation offloads a backend can take from the guest
/// and give to it (the TAP's `TUN_F_*` flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub ecn: bool,
}

/// A host-side network port for one NIC.
pub trait Backend: Send + std::fmt::Debug {
    /// Readable when frames wait in [`recv`](Backend::recv); writable when
    /// [`send`](Backend::send) would accept one again.
    fn fd(&self) -> RawFd;

    /// Whether frames in both directions start with a virtio-net header
    /// ([`VNET_HDR_LEN`] bytes), which is how offloads are described.
    fn vnet_hdr(&self) -> bool {
        false
    }

    /// Whether every frame [`recv`](Backend::recv) hands over carries
    /// correct IP, TCP and UDP checksums because host code made it (the
    /// NAT), so the guest may skip checking them. Not for frames that
    /// another guest or the outside world made (internal networks, TAP).
    fn checksums_valid(&self) -> bool {
        false
    }

    /// The largest IP packet the backend takes, when it differs from
    /// Ethernet's 1500 (the device then tells the guest).
    fn mtu(&self) -> Option<u16> {
        None
    }

    /// Tells the backend which offloads the guest accepts in received
    /// frames (only meaningful with a virtio-net header).
    fn set_offloads(&mut self, _offloads: Offloads) -> std::io::Result<()> {
        Ok(())
    }

    /// Sends one frame from the guest. `WouldBlock` means: keep it and try
    /// again when [`fd`](Backend::fd) is writable. Other errors lose the
    /// frame (the guest's TCP resends).
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;

    /// Reads one frame for the guest into `buf` (at least [`MAX_PACKET`]
    /// bytes); `WouldBlock` when there is none.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
}

/// Why a backend cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("port forward {0}: cannot listen on the host port (is it in use?)")]
    HostFwd(String),
    #[error("the NAT engine could not start: {0}")]
    Nat(String),
    #[error("the NAT needs libslirp: {0}; {hint} (`hostvisor doctor` checks the host)", hint = nat::LIBSLIRP_HINT)]
    NoLibslirp(String),
    #[error("TAP device {name}: {why}")]
    Tap { name: String, why: String },
    #[error("internal network `{name}`: {why}")]
    Internal { name: String, why: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
