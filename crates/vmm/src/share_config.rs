//! A shared host directory (virtio-fs):
//! `HOSTDIR:TAG[,readonly][,cache=auto|always|never][,owner=UID:GID][,mount=PATH]`
//! on the command line. The default guest mounts each share at boot from
//! the `hostvisor.share=TAG:PATH` parameter hostvisor adds for it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How much the guest caches of a share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShareCache {
    /// Close-to-open consistency, attributes cached for a second.
    #[default]
    Auto,
    /// The guest caches everything (only hostvisor's guest changes the
    /// directory).
    Always,
    /// Nothing is cached (the host changes the directory too).
    Never,
}

impl fmt::Display for ShareCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShareCache::Auto => "auto",
            ShareCache::Always => "always",
            ShareCache::Never => "never",
        })
    }
}

/// A shared directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareConfig {
    /// The host directory.
    pub path: PathBuf,
    /// The name the guest mounts it by (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
    #[serde(default)]
    pub cache: ShareCache,
    /// The guest owner (uid, gid) of the host user's files that no guest
    /// user has claimed (default 0:0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<(u32, u32)>,
    /// Where the default guest mounts it; `None`: `/mnt/TAG`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShareConfigError {
    #[error("a share is HOSTDIR:TAG, not `{0}`")]
    Form(String),
    #[error("a share tag is 1 to 36 letters, digits, `-`, `_` or `.`, not `{0}`")]
    Tag(String),
    #[error("unknown share option `{0}` (known: readonly, cache, owner, mount)")]
    UnknownKey(String),
    #[error("cache takes auto, always or never, not `{0}`")]
    Cache(String),
    #[error("owner takes UID:GID, not `{0}`")]
    Owner(String),
    #[error("a guest mount point is an absolute path without spaces, `,` or `:`, not `{0}`")]
    Mount(String),
}

/// Tags go into the config space (36 bytes) and onto the guest's command
/// line: a conservative alphabet.
pub fn check_tag(tag: &str) -> Result<(), ShareConfigError> {
    let ok = !tag.is_empty()
        && tag.len() <= 36
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ShareConfigError::Tag(tag.to_string()))
    }
}

fn check_mount(m: &str) -> Result<(), ShareConfigError> {
    let ok = m.starts_with('/')
        && m.len() <= 256
        && !m
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b",:\0".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ShareConfigError::Mount(m.to_string()))
    }
}

impl ShareConfig {
    /// Where the default guest mounts it.
    pub fn mount_point(&self) -> String {
        self.mount
            .clone()
            .unwrap_or_else(|| format!("/mnt/{}", self.tag))
    }

    /// The kernel command line parameter the default guest's init reads.
    pub fn cmdline_param(&self) -> String {
        format!("hostvisor.share={}:{}", self.tag, self.mount_point())
    }

    /// Checks what a stored configuration (not parsed here) holds.
    pub fn validate(&self) -> Result<(), ShareConfigError> {
        check_tag(&self.tag)?;
        if let Some(m) = &self.mount {
            check_mount(m)?;
        }
        Ok(())
    }
}

impl fmt::Display for ShareConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.tag)?;
        if self.readonly {
            f.write_str(",readonly")?;
        }
        if self.cache != ShareCache::Auto {
            write!(f, ",cache={}", self.cache)?;
        }
        if let Some((u, g)) = self.owner {
            write!(f, ",owner={u}:{g}")?;
        }
        if let Some(m) = &self.mount {
            write!(f, ",mount={m}")?;
        }
        Ok(())
    }
}

impl FromStr for ShareConfig {
    type Err = ShareConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let first = parts.next().unwrap_or_default();
        let (path, tag) = first
            .rsplit_once(':')
            .filter(|(p, _)| !p.is_empty())
            .ok_or_else(|| ShareConfigError::Form(s.to_string()))?;
        check_tag(tag)?;
        let mut share = ShareConfig {
            path: PathBuf::from(path),
            tag: tag.to_string(),
            readonly: false,
            cache: ShareCache::Auto,
            owner: None,
            mount: None,
        };
        for part in parts {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            match key {
                "readonly" | "ro" if value.is_empty() || value == "on" => share.readonly = true,
                "cache" => {
                    share.cache = match value {
                        "auto" => ShareCache::Auto,
                        "always" => ShareCache::Always,
                        "never" | "none" => ShareCache::Never,
                        other => return Err(ShareConfigError::Cache(other.to_string())),
                    }
                }
                "owner" => {
                    let bad = || ShareConfigError::Owner(value.to_string());
                    let (u, g) = value.split_once(':').ok_or_else(bad)?;
                    share.owner =
                        Some((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?));
                }
                "mount" => {
                    check_mount(value)?;
                    share.mount = Some(value.to_string());
                }
                _ => return Err(ShareConfigError::UnknownKey(part.to_string())),
            }
        }
        Ok(share)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse_and_print_back() {
        let s: ShareConfig = "/home/me/src:src".parse().unwrap();
        assert_eq!(s.path, PathBuf::from("/home/me/src"));
        assert_eq!(s.tag, "src");
        assert!(!s.readonly);
        assert_eq!(s.cmdline_param(), "hostvisor.share=src:/mnt/src");
        let s: ShareConfig = "/a:b:data,readonly,cache=never,owner=1000:100,mount=/srv/d"
            .parse()
            .unwrap();
        assert_eq!(s.path, PathBuf::from("/a:b"));
        assert_eq!(s.tag, "data");
        assert!(s.readonly);
        assert_eq!(s.cache, ShareCache::Never);
        assert_eq!(s.owner, Some((1000, 100)));
        assert_eq!(s.cmdline_param(), "hostvisor.share=data:/srv/d");
        assert_eq!(s.to_string().parse::<ShareConfig>().unwrap(), s);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ShareConfig>(&json).unwrap(), s);
    }

    #[test]
    fn bad_shares_are_refused() {
        for bad in [
            "/only-a-path",
            ":tag",
            "/d:",
            "/d:bad tag",
            "/d:a,b",
            &format!("/d:{}", "t".repeat(37)),
            "/d:t,cache=sometimes",
            "/d:t,owner=me",
            "/d:t,mount=relative",
            "/d:t,mount=/a b",
            "/d:t,mount=/a:b",
            "/d:t,size=1",
        ] {
            assert!(bad.parse::<ShareConfig>().is_err(), "{bad}");
        }
    }
}
