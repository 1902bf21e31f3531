//! What a VM's sandbox is to be (`VmConfig::sandbox`): Landlock on or off,
//! the user to run as, and the backing files the user allowed. How it is
//! applied is `sandbox`'s business.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_with::{DeserializeFromStr, SerializeDisplay};

/// A VM's sandbox settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Confine the VMM process's file access with Landlock (where the
    /// kernel has it). Off only for debugging.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub landlock: bool,
    /// When started as root: the user (and group) to switch to once what
    /// needs root is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserSpec>,
    /// Files and directories the user allowed as backing files of the
    /// VM's images besides each image's own directory (`create --image`
    /// puts its image here, `--allow-backing` its directories).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_backing: Vec<PathBuf>,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            landlock: true,
            user: None,
            allow_backing: Vec::new(),
        }
    }
}

impl SandboxConfig {
    pub fn is_default(&self) -> bool {
        *self == SandboxConfig::default()
    }
}

/// `USER[:GROUP]`, each a name or a number; without a group, the user's
/// own.
#[derive(Debug, Clone, PartialEq, Eq, SerializeDisplay, DeserializeFromStr)]
pub struct UserSpec {
    pub user: String,
    pub group: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad user `{0}`: use USER or USER:GROUP (names or numbers)")]
pub struct UserSpecError(String);

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl std::str::FromStr for UserSpec {
    type Err = UserSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        if !valid_part(user) || group.is_some_and(|g| !valid_part(g)) {
            return Err(UserSpecError(s.to_string()));
        }
        Ok(UserSpec {
            user: user.to_string(),
            group: group.map(str::to_string),
        })
    }
}

impl std::fmt::Display for UserSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.user)?;
        if let Some(g) = &self.group {
            write!(f, ":{g}")?;
        }
        Ok(())
    }
}

/// `--landlock on|off`.
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("`{s}`: use on or off")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_specs_parse_and_print_back() {
        for text in ["nobody", "nobody:nogroup", "1000:1000", "a.b-c_d"] {
            let spec: UserSpec = text.parse().unwrap();
            assert_eq!(spec.to_string(), text);
        }
        for bad in ["", ":", "a:", ":g", "a:b:c", "a b", "../x"] {
            assert!(bad.parse::<UserSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_default_is_landlock_on_and_is_not_written() {
        let c = SandboxConfig::default();
        assert!(c.landlock && c.is_default());
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, "{}");
        let off: SandboxConfig = serde_json::from_str(r#"{"landlock":false}"#).unwrap();
        assert!(!off.landlock);
        assert!(serde_json::from_str::<SandboxConfig>(r#"{"landlok":false}"#).is_err());
    }
}
