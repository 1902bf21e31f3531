//! How guest RAM is backed: the options after the size in
//! `--memory SIZE[,backing=anon|memfd|hugetlb][,prealloc][,lock][,merge]`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The size of a huge page hugetlb backing uses.
pub const HUGE_PAGE: u64 = 2 << 20;

/// What guest RAM is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    /// Private anonymous memory (transparent huge pages advised).
    #[default]
    Anon,
    /// A shared mapping of a `memfd`: RAM is a file the VMM holds, so it
    /// can be handed to another process and holes punched in it.
    Memfd,
    /// 2 MiB pages from the host's reserved huge-page pool
    /// (`/proc/sys/vm/nr_hugepages`).
    Hugetlb,
}

impl Backing {
    pub fn as_str(self) -> &'static str {
        match self {
            Backing::Anon => "anon",
            Backing::Memfd => "memfd",
            Backing::Hugetlb => "hugetlb",
        }
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backing {
    type Err = OptionsError;
    fn from_str(s: &str) -> Result<Self, OptionsError> {
        match s {
            "anon" => Ok(Backing::Anon),
            "memfd" => Ok(Backing::Memfd),
            "hugetlb" => Ok(Backing::Hugetlb),
            _ => Err(OptionsError::Backing(s.to_string())),
        }
    }
}

/// Everything about guest RAM but its size. The default is what hostvisor
/// always did: anonymous memory, populated as the guest touches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryOptions {
    #[serde(default)]
    pub backing: Backing,
    /// Touch every page before the first vCPU instruction.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prealloc: bool,
    /// `mlock` guest RAM: never swapped out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lock: bool,
    /// Offer guest RAM to KSM (`MADV_MERGEABLE`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub merge: bool,
}

/// Bad memory options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error(
        "unknown memory option `{0}`: use backing=anon|memfd|hugetlb, prealloc, lock or merge"
    )]
    Unknown(String),
    #[error("unknown memory backing `{0}`: use anon, memfd or hugetlb")]
    Backing(String),
    #[error("memory option `{0}` is given twice")]
    Repeated(String),
    #[error("memory option `{key}` takes on or off, not `{value}`")]
    Switch { key: String, value: String },
    #[error("backing=hugetlb needs a memory size that is a multiple of 2 MiB; {0} bytes is not")]
    HugeAlign(u64),
}

impl MemoryOptions {
    pub fn is_default(&self) -> bool {
        *self == MemoryOptions::default()
    }

    /// Checks the options against the RAM size they are for.
    pub fn check_size(&self, bytes: u64) -> Result<(), OptionsError> {
        if self.backing == Backing::Hugetlb && !bytes.is_multiple_of(HUGE_PAGE) {
            return Err(OptionsError::HugeAlign(bytes));
        }
        Ok(())
    }
}

fn switch(key: &str, value: Option<&str>) -> Result<bool, OptionsError> {
    match value {
        None | Some("on" | "true" | "yes") => Ok(true),
        Some("off" | "false" | "no") => Ok(false),
        Some(v) => Err(OptionsError::Switch {
            key: key.to_string(),
            value: v.to_string(),
        }),
    }
}

/// Parses `backing=memfd,prealloc,lock` (comma-separated; `prealloc`,
/// `lock` and `merge` may also be written `=on` or `=off`). The empty
/// string is the defaults.
impl FromStr for MemoryOptions {
    type Err = OptionsError;
    fn from_str(s: &str) -> Result<Self, OptionsError> {
        let mut opts = MemoryOptions::default();
        let mut seen: Vec<&str> = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v.trim())),
                None => (item, None),
            };
            if seen.contains(&key) {
                return Err(OptionsError::Repeated(key.to_string()));
            }
            match key {
                "backing" => {
                    opts.backing = value
                        .ok_or_else(|| OptionsError::Backing(String::new()))?
                        .parse()?;
                }
                "prealloc" => opts.prealloc = switch(key, value)?,
                "lock" => opts.lock = switch(key, value)?,
                "merge" => opts.merge = switch(key, value)?,
                _ => return Err(OptionsError::Unknown(item.to_string())),
            }
            seen.push(key);
        }
        Ok(opts)
    }
}

/// The options as `FromStr` reads them, defaults left out: `""` for the
/// defaults, else like `backing=memfd,prealloc`.
impl fmt::Display for MemoryOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<&str> = Vec::new();
        let backing = format!("backing={}", self.backing);
        if self.backing != Backing::Anon {
            parts.push(&backing);
        }
        for (on, name) in [
            (self.prealloc, "prealloc"),
            (self.lock, "lock"),
            (self.merge, "merge"),
        ] {
            if on {
                parts.push(name);
            }
        }
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_parses() {
        assert_eq!("".parse(), Ok(MemoryOptions::default()));
        assert_eq!(
            "backing=memfd,prealloc,lock,merge".parse(),
            Ok(MemoryOptions {
                backing: Backing::Memfd,
                prealloc: true,
                lock: true,
                merge: true,
            })
        );
        let huge: MemoryOptions = "backing=hugetlb".parse().unwrap();
        assert_eq!(huge.backing, Backing::Hugetlb);
        let anon: MemoryOptions = "backing=anon,prealloc=on,lock=off,merge=false"
            .parse()
            .unwrap();
        assert_eq!(
            anon,
            MemoryOptions {
                backing: Backing::Anon,
                prealloc: true,
                lock: false,
                merge: false,
            }
        );
    }

    #[test]
    fn bad_options_are_refused_with_their_name() {
        let err = "swap".parse::<MemoryOptions>().unwrap_err();
        assert_eq!(err, OptionsError::Unknown("swap".into()));
        assert!(
            err.to_string().contains("backing=anon|memfd|hugetlb"),
            "{err}"
        );
        let err = "backing=shm".parse::<MemoryOptions>().unwrap_err();
        assert!(err.to_string().contains("`shm`"), "{err}");
        assert!(err.to_string().contains("anon, memfd or hugetlb"), "{err}");
        assert!("backing".parse::<MemoryOptions>().is_err());
        let err = "prealloc=maybe".parse::<MemoryOptions>().unwrap_err();
        assert!(err.to_string().contains("on or off"), "{err}");
        assert_eq!(
            "lock,lock=off".parse::<MemoryOptions>(),
            Err(OptionsError::Repeated("lock".into()))
        );
        assert!("prealloc,size=2G".parse::<MemoryOptions>().is_err());
    }

    #[test]
    fn hugetlb_needs_a_whole_number_of_huge_pages() {
        let huge: MemoryOptions = "backing=hugetlb".parse().unwrap();
        assert!(huge.check_size(256 << 20).is_ok());
        let err = huge.check_size((256 << 20) + 4096).unwrap_err();
        assert!(err.to_string().contains("multiple of 2 MiB"), "{err}");
        assert!(huge.check_size(3 << 20).is_err());
        // Other backings take any size.
        assert!(MemoryOptions::default().check_size(3 << 20).is_ok());
    }

    #[test]
    fn display_reads_back() {
        for text in [
            "",
            "backing=memfd",
            "prealloc,lock",
            "backing=hugetlb,prealloc,merge",
        ] {
            let opts: MemoryOptions = text.parse().unwrap();
            assert_eq!(opts.to_string(), text);
        }
        assert_eq!(
            "backing=anon".parse::<MemoryOptions>().unwrap().to_string(),
            ""
        );
    }

    #[test]
    fn serde_keeps_defaults_out_and_refuses_unknown_fields() {
        let opts: MemoryOptions = "backing=memfd,prealloc".parse().unwrap();
        let json = serde_json::to_string(&opts).unwrap();
        assert_eq!(json, r#"{"backing":"memfd","prealloc":true}"#);
        assert_eq!(serde_json::from_str::<MemoryOptions>(&json).unwrap(), opts);
        assert_eq!(
            serde_json::from_str::<MemoryOptions>("{}").unwrap(),
            MemoryOptions::default()
        );
        assert!(serde_json::from_str::<MemoryOptions>(r#"{"swap":true}"#).is_err());
        assert!(serde_json::from_str::<MemoryOptions>(r#"{"backing":"shm"}"#).is_err());
    }
}
