//! The one VM configuration type, shared by every front end (CLI flags,
//! later the VM store's TOML and the HTTP API). Unknown fields are refused.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_with::{DeserializeFromStr, SerializeDisplay};

pub use crate::sandbox_config::{SandboxConfig, UserSpec};
pub use crate::share_config::{ShareCache, ShareConfig, ShareConfigError};

/// A memory size, written like `512M`, `2G` or a byte count.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, SerializeDisplay, DeserializeFromStr,
)]
pub struct MemorySize(pub u64);

impl MemorySize {
    pub const fn mib(n: u64) -> Self {
        MemorySize(n << 20)
    }
    pub fn bytes(self) -> u64 {
        self.0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid size `{0}`: use a number with an optional K, M, G or T suffix, like 512M or 2G")]
pub struct SizeError(String);

impl FromStr for MemorySize {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<Self, SizeError> {
        let err = || SizeError(s.to_string());
        let t = s.trim();
        let t = t.strip_suffix(['B', 'b']).unwrap_or(t);
        let t = t.strip_suffix(['i']).unwrap_or(t);
        let (digits, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(err()),
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        let n: u64 = digits.trim().parse().map_err(|_| err())?;
        n.checked_mul(1 << shift).map(MemorySize).ok_or_else(err)
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if b != 0 && b.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}")
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// This process's terminal: output to stdout, input from stdin.
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Discarded.
    None,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid serial `{0}`: use stdio, file:PATH or none")]
pub struct SerialConfigError(String);

impl FromStr for SerialConfig {
    type Err = SerialConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialConfig::Stdio),
            "none" => Ok(SerialConfig::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(SerialConfig::File(path.into())),
                _ => Err(SerialConfigError(s.to_string())),
            },
        }
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialConfig::Stdio => f.write_str("stdio"),
            SerialConfig::File(p) => write!(f, "file:{}", p.display()),
            SerialConfig::None => f.write_str("none"),
        }
    }
}

impl Serialize for SerialConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SerialConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which device is the guest's console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleDevice {
    /// The 16550A UART: `ttyS0`.
    #[default]
    Serial,
    /// A virtio-console port: `hvc0`. The UART's output is then discarded.
    Virtio,
}

/// The machine a VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    /// virtio-mmio devices, no ACPI, no PCI devices: the fastest boot of
    /// a kernel hostvisor is handed.
    #[default]
    Microvm,
    /// A PC: PCI with virtio-pci (MSI-X), ACPI (power button, S5, reset
    /// register), what an OS on its own disk expects.
    Pc,
}

impl std::str::FromStr for MachineType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "microvm" => Ok(MachineType::Microvm),
            "pc" => Ok(MachineType::Pc),
            _ => Err(format!("unknown machine `{s}` (expected microvm or pc)")),
        }
    }
}

impl std::fmt::Display for MachineType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MachineType::Microvm => "microvm",
            MachineType::Pc => "pc",
        })
    }
}

/// What a guest reset does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResetAction {
    /// The VM stops, as after a power-off (until ACPI exists this is how
    /// guests power off: `reboot=k` and a reset).
    #[default]
    Shutdown,
    /// The VM boots again from its kernel.
    Restart,
}

/// A virtual disk:
/// `path=FILE[,readonly=on][,cache=writeback|none|unsafe][,format=raw|qcow2][,iops=N][,bps=SIZE]`
/// on the command line. Without `format`, the file's format is probed.
/// `iops` and `bps` cap the guest's requests and bytes a second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub cache: block::CacheMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<block::Format>,
    /// At most this many requests a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    /// At most this many bytes a second (`1M`: 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps: Option<MemorySize>,
}

impl DiskConfig {
    /// A disk at `path` with every option at its default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            readonly: false,
            cache: block::CacheMode::default(),
            format: None,
            iops: None,
            bps: None,
        }
    }

    /// The device's rate limits.
    pub fn rate_limit(&self) -> RateLimitConfig {
        RateLimitConfig::per_second(self.bps.map(MemorySize::bytes), self.iops)
    }
}

pub use devices::virtio::rate_limit::RateLimitConfig;

/// The largest rate accepted (bytes or operations a second): far above
/// any device, and small enough that bucket arithmetic never overflows.
pub const MAX_RATE: u64 = 1 << 50;

/// `value` as a rate of operations a second: a whole number from 1.
pub fn parse_ops_rate(key: &str, value: &str) -> Result<u64, String> {
    match value.trim().parse::<u64>() {
        Ok(0) => Err(format!(
            "{key} must be at least 1 (leave it out for no limit)"
        )),
        Ok(n) if n <= MAX_RATE => Ok(n),
        Ok(_) => Err(format!("{key}={value} is too large (at most {MAX_RATE})")),
        Err(_) => Err(format!(
            "{key} takes a whole number of operations a second, not `{value}`"
        )),
    }
}

/// `value` as bytes a second: a size like `1M` (1 MiB), `512K` or a byte
/// count, from 1.
pub fn parse_byte_rate(key: &str, value: &str) -> Result<MemorySize, String> {
    let size: MemorySize = value.parse().map_err(|_| {
        format!("{key} takes bytes a second with an optional K, M, G or T suffix (like 10M), not `{value}`")
    })?;
    match size.bytes() {
        0 => Err(format!(
            "{key} must be at least 1 (leave it out for no limit)"
        )),
        n if n <= MAX_RATE => Ok(size),
        _ => Err(format!(
            "{key}={value} is too large (at most {MAX_RATE} bytes a second)"
        )),
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskConfigError {
    #[error("a disk needs path=FILE")]
    NoPath,
    #[error("unknown disk option `{0}` (known: path, readonly, cache, format, iops, bps)")]
    UnknownKey(String),
    #[error("{0}")]
    Rate(String),
    #[error("`{0}` is not key=value")]
    NotKeyValue(String),
    #[error("readonly takes on or off, not `{0}`")]
    BadBool(String),
    #[error(transparent)]
    Cache(#[from] block::CacheModeError),
    #[error(transparent)]
    Format(#[from] block::FormatError),
}

impl FromStr for DiskConfig {
    type Err = DiskConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut path = None;
        let mut readonly = false;
        let mut cache = block::CacheMode::default();
        let mut format = None;
        let mut iops = None;
        let mut bps = None;
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| DiskConfigError::NotKeyValue(part.to_string()))?;
            match key {
                "path" if !value.is_empty() => path = Some(PathBuf::from(value)),
                "path" => return Err(DiskConfigError::NoPath),
                "readonly" => {
                    readonly = match value {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        other => return Err(DiskConfigError::BadBool(other.to_string())),
                    }
                }
                "cache" => cache = value.parse()?,
                "format" => format = Some(value.parse()?),
                "iops" => iops = Some(parse_ops_rate(key, value).map_err(DiskConfigError::Rate)?),
                "bps" => bps = Some(parse_byte_rate(key, value).map_err(DiskConfigError::Rate)?),
                other => return Err(DiskConfigError::UnknownKey(other.to_string())),
            }
        }
        Ok(DiskConfig {
            path: path.ok_or(DiskConfigError::NoPath)?,
            readonly,
            cache,
            format,
            iops,
            bps,
        })
    }
}

/// A virtio-vsock device: `cid=N[,socket=PATH]` on the command line.
/// Host programs reach guest port P by connecting to `socket` and writing
/// `CONNECT P\n`; guest connections to host port P go to `socket_P`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 or above).
    pub cid: u32,
    /// The host-side socket; `None`: [`VsockConfig::default_socket`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// Guest ports whose connections the device opens ahead of time, so
    /// a `CONNECT` there is answered at once (`pool=52` for the agent's;
    /// several as `pool=52:53`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pool: Vec<u32>,
}

impl VsockConfig {
    /// `$XDG_RUNTIME_DIR/hostvisor-vsock-CID.sock` (or under /tmp).
    pub fn default_socket(cid: u32) -> PathBuf {
        let dir = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        dir.join(format!("hostvisor-vsock-{cid}.sock"))
    }

    /// Where the host side listens.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| Self::default_socket(self.cid))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VsockConfigError {
    #[error("a vsock device needs cid=N")]
    NoCid,
    #[error("cid must be a number from 3 to 4294967294, not `{0}`")]
    BadCid(String),
    #[error("pool takes up to 4 guest ports separated by `:`, not `{0}`")]
    BadPool(String),
    #[error("unknown vsock option `{0}` (known: cid, socket, pool)")]
    UnknownKey(String),
    #[error("`{0}` is not key=value")]
    NotKeyValue(String),
}

impl FromStr for VsockConfig {
    type Err = VsockConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cid = None;
        let mut socket = None;
        let mut pool = Vec::new();
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| VsockConfigError::NotKeyValue(part.to_string()))?;
            match key {
                "cid" => {
                    cid = Some(
                        value
                            .parse::<u32>()
                            .ok()
                            .filter(|c| (3..u32::MAX).contains(c))
                            .ok_or_else(|| VsockConfigError::BadCid(value.to_string()))?,
                    )
                }
                "socket" | "path" if !value.is_empty() => socket = Some(PathBuf::from(value)),
                "pool" => {
                    pool = value
                        .split(':')
                        .map(str::parse::<u32>)
                        .collect::<Result<Vec<_>, _>>()
                        .ok()
                        .filter(|p| (1..=4).contains(&p.len()))
                        .ok_or_else(|| VsockConfigError::BadPool(value.to_string()))?
                }
                other => return Err(VsockConfigError::UnknownKey(other.to_string())),
            }
        }
        Ok(VsockConfig {
            cid: cid.ok_or(VsockConfigError::NoCid)?,
            socket,
            pool,
        })
    }
}

/// A NIC: `nat[,hostfwd=RULE]...`, `tap=IFNAME` or `internal=NAME`, each
/// with an optional `,mac=52:54:00:12:34:56` and rate limits
/// `,bps=SIZE,pps=N` (each direction apart). Stored as that same string.
#[derive(Debug, Clone, PartialEq, Eq, SerializeDisplay, DeserializeFromStr)]
pub struct NetConfig {
    pub mode: NetMode,
    /// `None`: an address made for the VM (see `hostvisor` for managed
    /// VMs, which store theirs).
    pub mac: Option<net::MacAddr>,
    /// At most this many bytes a second each way.
    pub bps: Option<MemorySize>,
    /// At most this many frames a second each way.
    pub pps: Option<u64>,
}

impl NetConfig {
    /// A NIC in `mode` with a made-up MAC and no limits.
    pub fn new(mode: NetMode) -> Self {
        NetConfig {
            mode,
            mac: None,
            bps: None,
            pps: None,
        }
    }

    /// The device's rate limits (for each direction).
    pub fn rate_limit(&self) -> RateLimitConfig {
        RateLimitConfig::per_second(self.bps.map(MemorySize::bytes), self.pps)
    }
}

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetMode {
    /// The user-mode NAT, with port forwards.
    Nat { hostfwd: Vec<net::nat::HostFwd> },
    /// A host TAP device.
    Tap { ifname: String },
    /// An internal network between VMs.
    Internal { name: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error("a NIC is nat, tap=IFNAME or internal=NAME, not `{0}`")]
    Mode(String),
    #[error("unknown NIC option `{0}` (known: hostfwd with nat, mac, bps, pps)")]
    UnknownKey(String),
    #[error("`{0}` is not key=value")]
    NotKeyValue(String),
    #[error("{0}")]
    Value(String),
}

impl FromStr for NetConfig {
    type Err = NetConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let first = parts.next().unwrap_or_default();
        let mut mode = match first.split_once('=') {
            None if first == "nat" || first == "user" => NetMode::Nat {
                hostfwd: Vec::new(),
            },
            Some(("tap", ifname)) if net::tap::valid_ifname(ifname) => NetMode::Tap {
                ifname: ifname.to_string(),
            },
            Some(("tap", ifname)) => {
                return Err(NetConfigError::Value(format!(
                    "`{ifname}` is not an interface name"
                )))
            }
            Some(("internal", name)) if net::switch::valid_name(name) => NetMode::Internal {
                name: name.to_string(),
            },
            Some(("internal", name)) => {
                return Err(NetConfigError::Value(format!(
                    "`{name}` cannot name an internal network (1-64 letters, digits, - _ .)"
                )))
            }
            _ => return Err(NetConfigError::Mode(first.to_string())),
        };
        let mut mac = None;
        let mut bps = None;
        let mut pps = None;
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| NetConfigError::NotKeyValue(part.to_string()))?;
            match (key, &mut mode) {
                ("mac", _) => mac = Some(value.parse().map_err(NetConfigError::Value)?),
                ("bps", _) => {
                    bps = Some(parse_byte_rate(key, value).map_err(NetConfigError::Value)?)
                }
                ("pps", _) => {
                    pps = Some(parse_ops_rate(key, value).map_err(NetConfigError::Value)?)
                }
                ("hostfwd", NetMode::Nat { hostfwd }) => {
                    hostfwd.push(value.parse().map_err(NetConfigError::Value)?)
                }
                _ => return Err(NetConfigError::UnknownKey(key.to_string())),
            }
        }
        Ok(NetConfig {
            mode,
            mac,
            bps,
            pps,
        })
    }
}

impl std::fmt::Display for NetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.mode {
            NetMode::Nat { hostfwd } => {
                f.write_str("nat")?;
                for h in hostfwd {
                    write!(f, ",hostfwd={h}")?;
                }
            }
            NetMode::Tap { ifname } => write!(f, "tap={ifname}")?,
            NetMode::Internal { name } => write!(f, "internal={name}")?,
        }
        if let Some(mac) = self.mac {
            write!(f, ",mac={mac}")?;
        }
        if let Some(bps) = self.bps {
            write!(f, ",bps={bps}")?;
        }
        if let Some(pps) = self.pps {
            write!(f, ",pps={pps}")?;
        }
        Ok(())
    }
}

/// A virtio-balloon:
/// `[reporting=on|off][,deflate-on-oom=on|off][,stats=on|off|SECONDS]` on
/// the command line (`on` alone: the defaults). Free page reporting is on
/// by default (memory the guest frees goes back to the host); `stats=N`
/// asks the guest for statistics every N seconds besides on request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalloonConfig {
    pub reporting: bool,
    pub deflate_on_oom: bool,
    pub stats: bool,
    /// Seconds between statistics requests; 0: only on request.
    pub stats_interval_s: u32,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            reporting: true,
            deflate_on_oom: true,
            stats: true,
            stats_interval_s: 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonConfigError {
    #[error("unknown balloon option `{0}` (known: reporting, deflate-on-oom, stats)")]
    UnknownKey(String),
    #[error("`{0}` is not key=value")]
    NotKeyValue(String),
    #[error("{key} takes on or off, not `{value}`")]
    BadBool { key: String, value: String },
    #[error("stats takes on, off or a number of seconds up to 86400, not `{0}`")]
    BadStats(String),
}

fn on_off(key: &str, value: &str) -> Result<bool, BalloonConfigError> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(BalloonConfigError::BadBool {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

impl FromStr for BalloonConfig {
    type Err = BalloonConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut c = BalloonConfig::default();
        if s == "on" || s.is_empty() {
            return Ok(c);
        }
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| BalloonConfigError::NotKeyValue(part.to_string()))?;
            match key {
                "reporting" => c.reporting = on_off(key, value)?,
                "deflate-on-oom" | "deflate_on_oom" => c.deflate_on_oom = on_off(key, value)?,
                "stats" => match value {
                    "on" => c.stats = true,
                    "off" => c.stats = false,
                    n => {
                        c.stats = true;
                        c.stats_interval_s = n
                            .parse()
                            .ok()
                            .filter(|&n| n <= 86_400)
                            .ok_or_else(|| BalloonConfigError::BadStats(n.to_string()))?;
                    }
                },
                other => return Err(BalloonConfigError::UnknownKey(other.to_string())),
            }
        }
        Ok(c)
    }
}

impl BalloonConfig {
    /// The device options this configuration asks for.
    pub fn options(&self) -> devices::virtio::balloon::BalloonOptions {
        devices::virtio::balloon::BalloonOptions {
            reporting: self.reporting,
            deflate_on_oom: self.deflate_on_oom,
            stats: self.stats,
            stats_interval: (self.stats_interval_s > 0)
                .then(|| std::time::Duration::from_secs(u64::from(self.stats_interval_s))),
        }
    }
}

/// Host resources a managed VM's process may use, enforced by a cgroup
/// v2 of its own (`--cpu-limit`, `--memory-limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostLimits {
    /// CPU time, in percent of one host CPU (200: two CPUs' worth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<u32>,
    /// Memory of the whole process, guest RAM included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemorySize>,
}

impl HostLimits {
    pub fn is_unset(&self) -> bool {
        self.cpu_percent.is_none() && self.memory.is_none()
    }
}

fn default_cpus() -> u32 {
    1
}

fn default_memory() -> MemorySize {
    MemorySize::mib(256)
}

/// Everything needed to build and boot one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The machine type (`microvm` unless asked).
    #[serde(default, skip_serializing_if = "is_microvm")]
    pub machine: MachineType,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory")]
    pub memory: MemorySize,
    /// Guest RAM's backing and handling (`--memory SIZE,OPTIONS`).
    #[serde(default, skip_serializing_if = "memory::MemoryOptions::is_default")]
    pub memory_options: memory::MemoryOptions,
    /// Boot through this firmware (a `pc` machine) instead of loading the
    /// kernel directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<crate::firmware::Firmware>,
    /// The kernel to boot; empty for a firmware boot from a disk.
    #[serde(default)]
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// The whole kernel command line; `None` means hostvisor's default for
    /// this host (see [`crate::default_cmdline`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Appended to the command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append: Option<String>,
    /// Where the console goes.
    #[serde(default)]
    pub serial: SerialConfig,
    /// Which device the console is.
    #[serde(default)]
    pub console: ConsoleDevice,
    #[serde(default)]
    pub on_reset: ResetAction,
    /// Virtual disks, in order: the first is the guest's /dev/vda.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// A virtio-rng device fed from the host's getrandom.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rng: bool,
    /// CPU features hidden from the guest (see `arch::cpuid::FEATURES`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hide_cpu_features: Vec<String>,
    /// A virtio-vsock device (the guest agent's channel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// NICs, in order: eth0, eth1, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
    /// A virtio-balloon device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// Shared host directories (virtio-fs), after every other device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<ShareConfig>,
    /// The VM process's CPU and memory limits (managed VMs).
    #[serde(default, skip_serializing_if = "HostLimits::is_unset")]
    pub limits: HostLimits,
    /// Landlock, the user to run as, allowed backing files
    /// (docs/security.md).
    #[serde(default, skip_serializing_if = "SandboxConfig::is_default")]
    pub sandbox: SandboxConfig,
    /// The VMM threads' seccomp filters (`--seccomp`; on by default).
    #[serde(default, skip_serializing_if = "seccomp::SeccompMode::is_default")]
    pub seccomp: seccomp::SeccompMode,
}

fn is_microvm(m: &MachineType) -> bool {
    *m == MachineType::Microvm
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            machine: MachineType::default(),
            firmware: None,
            cpus: default_cpus(),
            memory: default_memory(),
            memory_options: Default::default(),
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            append: None,
            serial: SerialConfig::default(),
            console: ConsoleDevice::default(),
            on_reset: ResetAction::default(),
            disks: Vec::new(),
            rng: false,
            hide_cpu_features: Vec::new(),
            vsock: None,
            nets: Vec::new(),
            balloon: None,
            shares: Vec::new(),
            limits: HostLimits::default(),
            sandbox: SandboxConfig::default(),
            seccomp: seccomp::SeccompMode::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_options_parse() {
        assert_eq!(
            "cid=3".parse(),
            Ok(VsockConfig {
                cid: 3,
                socket: None,
                pool: Vec::new(),
            })
        );
        assert_eq!(
            "cid=3,pool=52:53".parse(),
            Ok(VsockConfig {
                cid: 3,
                socket: None,
                pool: vec![52, 53],
            })
        );
        assert_eq!(
            "cid=7,socket=/run/v.sock".parse(),
            Ok(VsockConfig {
                cid: 7,
                socket: Some("/run/v.sock".into()),
                pool: Vec::new(),
            })
        );
        for (bad, err) in [
            ("", VsockConfigError::NotKeyValue(String::new())),
            ("socket=/x", VsockConfigError::NoCid),
            ("cid=2", VsockConfigError::BadCid("2".into())),
            (
                "cid=4294967295",
                VsockConfigError::BadCid("4294967295".into()),
            ),
            ("cid=x", VsockConfigError::BadCid("x".into())),
            ("cid=3,port=1", VsockConfigError::UnknownKey("port".into())),
            ("cid=3,pool=", VsockConfigError::BadPool(String::new())),
            ("cid=3,pool=x", VsockConfigError::BadPool("x".into())),
            (
                "cid=3,pool=1:2:3:4:5",
                VsockConfigError::BadPool("1:2:3:4:5".into()),
            ),
        ] {
            assert_eq!(bad.parse::<VsockConfig>(), Err(err), "{bad}");
        }
        // Configs written before the pool read as without one; a pool is
        // kept.
        let old: VsockConfig = serde_json::from_str(r#"{"cid":3}"#).unwrap();
        assert!(old.pool.is_empty());
        assert_eq!(serde_json::to_string(&old).unwrap(), r#"{"cid":3}"#);
        let pooled: VsockConfig = "cid=3,pool=52".parse().unwrap();
        let json = serde_json::to_string(&pooled).unwrap();
        assert_eq!(json, r#"{"cid":3,"pool":[52]}"#);
        assert_eq!(serde_json::from_str::<VsockConfig>(&json).unwrap(), pooled);
    }

    #[test]
    fn balloon_options_parse() {
        assert_eq!("on".parse(), Ok(BalloonConfig::default()));
        let c: BalloonConfig = "reporting=off,deflate-on-oom=off,stats=5".parse().unwrap();
        assert_eq!(
            c,
            BalloonConfig {
                reporting: false,
                deflate_on_oom: false,
                stats: true,
                stats_interval_s: 5,
            }
        );
        assert_eq!(
            c.options().stats_interval,
            Some(std::time::Duration::from_secs(5))
        );
        assert!(
            !"stats=off"
                .parse::<BalloonConfig>()
                .unwrap()
                .options()
                .stats
        );
        for bad in [
            "reporting",
            "reporting=maybe",
            "stats=-1",
            "stats=99999999",
            "size=1G",
        ] {
            assert!(bad.parse::<BalloonConfig>().is_err(), "{bad}");
        }
        // Stored configurations without a balloon have none.
        let d: VmConfig = serde_json::from_str(r#"{"kernel":"/k"}"#).unwrap();
        assert_eq!(d.balloon, None);
        let mut with = VmConfig::new("/k");
        with.balloon = Some(c);
        let json = serde_json::to_string(&with).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), with);
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("512M".parse(), Ok(MemorySize(512 << 20)));
        assert_eq!("2G".parse(), Ok(MemorySize(2 << 30)));
        assert_eq!("2GiB".parse(), Ok(MemorySize(2 << 30)));
        assert_eq!("1k".parse(), Ok(MemorySize(1024)));
        assert_eq!("4096".parse(), Ok(MemorySize(4096)));
        for bad in ["", "M", "12X", "-1G", "1.5G", "99999999999T"] {
            assert!(bad.parse::<MemorySize>().is_err(), "{bad}");
        }
        assert_eq!(MemorySize(512 << 20).to_string(), "512M");
        assert_eq!(MemorySize(3 << 30).to_string(), "3G");
        assert_eq!(MemorySize(1000).to_string(), "1000");
    }

    #[test]
    fn serial_options() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("none".parse(), Ok(SerialConfig::None));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(SerialConfig::File("/tmp/x".into()))
        );
        assert!("file:".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn disk_options() {
        assert_eq!("path=/d.img".parse(), Ok(DiskConfig::new("/d.img")));
        assert_eq!(
            "path=/d.img,readonly=on,cache=none,format=qcow2".parse(),
            Ok(DiskConfig {
                readonly: true,
                cache: block::CacheMode::None,
                format: Some(block::Format::Qcow2),
                ..DiskConfig::new("/d.img")
            })
        );
        assert_eq!(
            "readonly=on".parse::<DiskConfig>(),
            Err(DiskConfigError::NoPath)
        );
        assert_eq!(
            "/d.img".parse::<DiskConfig>(),
            Err(DiskConfigError::NotKeyValue("/d.img".into()))
        );
        assert_eq!(
            "path=/d,size=1G".parse::<DiskConfig>(),
            Err(DiskConfigError::UnknownKey("size".into()))
        );
        assert!("path=/d,cache=direct".parse::<DiskConfig>().is_err());
        assert!("path=/d,readonly=maybe".parse::<DiskConfig>().is_err());
        assert!("path=/d,format=vmdk".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn disk_rate_limits_parse_with_sizes_and_clear_errors() {
        let d: DiskConfig = "path=/d,iops=500,bps=1M".parse().unwrap();
        assert_eq!(d.iops, Some(500));
        assert_eq!(d.bps, Some(MemorySize(1 << 20)));
        // Sizes as everywhere else: 1M, 1MiB and the byte count agree.
        for same in ["1MiB", "1048576", "1024K"] {
            let e: DiskConfig = format!("path=/d,bps={same}").parse().unwrap();
            assert_eq!(e.bps, d.bps, "{same}");
        }
        let limits = d.rate_limit();
        assert_eq!(limits.bytes.unwrap().rate(), 1 << 20);
        assert_eq!(limits.ops.unwrap().rate(), 500);
        assert!(!DiskConfig::new("/d").rate_limit().is_limited());
        // Stored and read back; older stored disks have no limits.
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains(r#""bps":"1M""#), "{json}");
        assert_eq!(serde_json::from_str::<DiskConfig>(&json).unwrap(), d);
        let old: DiskConfig = serde_json::from_str(r#"{"path":"/d"}"#).unwrap();
        assert_eq!(old, DiskConfig::new("/d"));
        for (bad, needle) in [
            ("path=/d,iops=0", "at least 1"),
            ("path=/d,bps=0", "at least 1"),
            ("path=/d,bps=0M", "at least 1"),
            ("path=/d,iops=fast", "whole number"),
            ("path=/d,iops=-1", "whole number"),
            ("path=/d,iops=1.5", "whole number"),
            ("path=/d,bps=lots", "like 10M"),
            ("path=/d,bps=1X", "like 10M"),
            ("path=/d,bps=99999999999T", "like 10M"),
            ("path=/d,bps=2000T", "too large"),
            ("path=/d,iops=99999999999999999999", "whole number"),
            ("path=/d,iops=9999999999999999", "too large"),
        ] {
            let e = bad.parse::<DiskConfig>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn nic_rate_limits_parse_print_and_round_trip() {
        let n: NetConfig = "nat,mac=52:54:00:00:00:01,bps=1MiB,pps=1000"
            .parse()
            .unwrap();
        assert_eq!(n.bps, Some(MemorySize(1 << 20)));
        assert_eq!(n.pps, Some(1000));
        assert_eq!(n.to_string(), "nat,mac=52:54:00:00:00:01,bps=1M,pps=1000");
        assert_eq!(n.to_string().parse::<NetConfig>().unwrap(), n);
        assert_eq!(n.rate_limit().bytes.unwrap().rate(), 1 << 20);
        let t: NetConfig = "tap=tap0,bps=10M".parse().unwrap();
        assert_eq!(t.to_string(), "tap=tap0,bps=10M");
        assert!(!"nat"
            .parse::<NetConfig>()
            .unwrap()
            .rate_limit()
            .is_limited());
        for (bad, needle) in [
            ("nat,bps=0", "at least 1"),
            ("nat,pps=0", "at least 1"),
            ("nat,bps=fast", "like 10M"),
            ("nat,pps=x", "whole number"),
        ] {
            let e = bad.parse::<NetConfig>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn config_round_trips_and_refuses_unknown_fields() {
        let mut c = VmConfig::new("/k");
        c.cpus = 2;
        c.disks.push("path=/d.img,cache=unsafe".parse().unwrap());
        c.serial = SerialConfig::File("/tmp/s".into());
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), c);
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","cpu":2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `cpu`"), "{err}");
        let d: VmConfig = serde_json::from_str(r#"{"kernel":"/k"}"#).unwrap();
        assert_eq!(d, VmConfig::new("/k"));
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","memory":"lots"}"#).is_err());
    }

    #[test]
    fn nics_parse_print_and_round_trip() {
        let n: NetConfig =
            "nat,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=udp::53-:53,mac=52:54:00:00:00:01"
                .parse()
                .unwrap();
        let NetMode::Nat { hostfwd } = &n.mode else {
            panic!("{n:?}")
        };
        assert_eq!(hostfwd.len(), 2);
        assert_eq!(n.mac.unwrap().to_string(), "52:54:00:00:00:01");
        assert_eq!(n.to_string().parse::<NetConfig>().unwrap(), n);
        let json = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<NetConfig>(&json).unwrap(), n);
        assert_eq!(
            "tap=tap0".parse::<NetConfig>().unwrap().mode,
            NetMode::Tap {
                ifname: "tap0".into()
            }
        );
        assert_eq!(
            "internal=lab".parse::<NetConfig>().unwrap().to_string(),
            "internal=lab"
        );
        for (bad, needle) in [
            ("", "nat, tap=IFNAME or internal=NAME"),
            ("bridge=br0", "nat, tap=IFNAME"),
            ("tap=", "not an interface name"),
            ("internal=a/b", "cannot name"),
            ("tap=tap0,hostfwd=tcp::1-:2", "unknown NIC option `hostfwd`"),
            ("nat,hostfwd=tcp:1-2", "hostfwd"),
            ("nat,mac=01:00:00:00:00:00", "multicast"),
            ("nat,mac", "not key=value"),
            ("nat,speed=10", "unknown NIC option"),
        ] {
            let e = bad.parse::<NetConfig>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
