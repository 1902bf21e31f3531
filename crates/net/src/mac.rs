//! Ethernet MAC addresses.

use serde_with::{DeserializeFromStr, SerializeDisplay};

/// A MAC address, `52:54:00:xx:xx:xx` by default (QEMU's locally
/// administered prefix, so both tools' VMs look familiar on a bridge).
/// Stored as its text (serde through Display and FromStr).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, SerializeDisplay, DeserializeFromStr,
)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// A stable address for NIC `index` of the VM named `name`.
    pub fn for_vm(name: &str, index: u32) -> MacAddr {
        // FNV-1a: stable across runs and builds (std's hasher is not).
        let mut h: u32 = 0x811c_9dc5;
        for b in name.bytes().chain(index.to_le_bytes()) {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        let [a, b, c, _] = h.to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, a, b, c])
    }

    /// Broadcast and multicast addresses (the group bit).
    pub fn is_group(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// The destination of an Ethernet frame, if it has a header.
    pub fn destination(frame: &[u8]) -> Option<MacAddr> {
        Some(MacAddr(frame.get(..6)?.try_into().ok()?))
    }

    /// The source of an Ethernet frame, if it has a header.
    pub fn source(frame: &[u8]) -> Option<MacAddr> {
        Some(MacAddr(frame.get(6..12)?.try_into().ok()?))
    }

    /// `52-54-00-12-34-56`: for file names.
    pub fn dashed(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a MAC address like 52:54:00:12:34:56");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        let mac = MacAddr(mac);
        if mac.is_group() {
            return Err(format!(
                "{s} is a multicast address; a NIC needs a unicast one"
            ));
        }
        Ok(mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_print_and_are_stable_per_vm() {
        let m: MacAddr = "52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(m.dashed(), "52-54-00-ab-cd-ef");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:00",
            "52-54-00-ab-cd-ef",
            "zz:54:00:ab:cd:ef",
            "01:00:5e:00:00:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let a = MacAddr::for_vm("web", 0);
        assert_eq!(a, MacAddr::for_vm("web", 0));
        assert_ne!(a, MacAddr::for_vm("web", 1));
        assert_ne!(a, MacAddr::for_vm("db", 0));
        assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
        assert!(!a.is_group() && MacAddr::BROADCAST.is_group());
        let frame = [[0xffu8; 6], m.0].concat();
        assert_eq!(MacAddr::destination(&frame), Some(MacAddr::BROADCAST));
        assert_eq!(MacAddr::source(&frame), Some(m));
        assert_eq!(MacAddr::source(&frame[..11]), None);
    }
}
