//! `tap`: frames through a host TAP device, for bridged and host-only
//! setups (docs/networking.md shows both). An existing TAP the user may
//! open (`ip tuntap add dev tap0 mode tap user $USER`) is attached to
//! without privileges; a missing one is created when hostvisor runs with
//! CAP_NET_ADMIN, and then disappears with the VM.
//!
//! The ioctls are written here (a few lines each) because no rust-vmm
//! crate exports a TAP; Firecracker and Cloud Hypervisor each keep their
//! own for the same reason.
//!
//! Frames carry a virtio-net header (`IFF_VNET_HDR`, 12 bytes), so the
//! guest's checksum and segmentation offloads pass through the kernel
//! untouched.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::{Backend, NetError, Offloads, VNET_HDR_LEN};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_UP: libc::c_short = 0x0001;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// `struct ifreq` with the flags member of its union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }
}

#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Whether `name` can be an interface name.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Tap {
    /// Attaches to (or, privileged, creates) the TAP device `name`.
    pub fn open(name: &str) -> Result<Tap, NetError> {
        let err = |why: String| NetError::Tap {
            name: name.to_string(),
            why,
        };
        if !valid_ifname(name) {
            return Err(err(format!(
                "not an interface name (1-{} letters, digits, - _ .)",
                libc::IFNAMSIZ - 1
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| err(format!("cannot open /dev/net/tun: {e}")))?;
        let mut req = IfReq::new(name);
        req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(err(match e.raw_os_error() {
                Some(libc::EPERM) => format!(
                    "not allowed to attach ({e}); create it for your user first: \
                     sudo ip tuntap add dev {name} mode tap user $USER"
                ),
                Some(libc::EBUSY) => format!("in use by another program ({e})"),
                Some(libc::EINVAL) => format!("exists but is not a TAP device ({e})"),
                _ => format!("cannot attach: {e}"),
            }));
        }
        let hdr_len = libc::c_int::try_from(VNET_HDR_LEN).unwrap_or(libc::c_int::MAX);
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(err(format!(
                "cannot set the virtio-net header size: {}",
                std::io::Error::last_os_error()
            )));
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        // No offloads towards the guest until it accepts them.
        tap.offload(Offloads::default())
            .map_err(|e| err(format!("cannot set offloads: {e}")))?;
        if let Err(e) = bring_up(name) {
            tracing::debug!("tap {name}: not brought up here ({e}); its owner does that");
        }
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn offload(&self, o: Offloads) -> std::io::Result<()> {
        let mut flags = 0;
        if o.csum {
            flags |= TUN_F_CSUM;
            if o.tso4 {
                flags |= TUN_F_TSO4;
            }
            if o.tso6 {
                flags |= TUN_F_TSO6;
            }
            if o.ecn && (o.tso4 || o.tso6) {
                flags |= TUN_F_TSO_ECN;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes the flags as its argument value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Sets IFF_UP on `name` (needs CAP_NET_ADMIN).
fn bring_up(name: &str) -> std::io::Result<()> {
    // SAFETY: a new socket, closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut req = IfReq::new(name);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq.
    let r = unsafe {
        if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) < 0 {
            -1
        } else if req.flags & IFF_UP != 0 {
            0
        } else {
            req.flags |= IFF_UP;
            libc::ioctl(sock, libc::SIOCSIFFLAGS, &mut req)
        }
    };
    let e = std::io::Error::last_os_error();
    // SAFETY: the socket made above.
    unsafe { libc::close(sock) };
    if r < 0 {
        return Err(e);
    }
    Ok(())
}

impl Backend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn vnet_hdr(&self) -> bool {
        true
    }

    fn set_offloads(&mut self, offloads: Offloads) -> std::io::Result<()> {
        self.offload(offloads)
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write(frame).map(drop)
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked_before_any_ioctl() {
        assert!(valid_ifname("tap0") && valid_ifname("hv-tap_1.2"));
        for bad in ["", "a/b", "sixteen-chars-xx", "tap 0", "tap\0"] {
            assert!(!valid_ifname(bad), "{bad:?}");
            let e = Tap::open(bad).unwrap_err().to_string();
            assert!(e.contains("not an interface name"), "{e}");
        }
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
