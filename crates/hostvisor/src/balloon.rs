//! `hostvisor balloon NAME SIZE` and `hostvisor balloon NAME --stats`:
//! the balloon of a running managed VM, through its API (`/vm/balloon`),
//! and the `--balloon` option's value.

use std::time::Duration;

use api::Client;
use vmm::config::{BalloonConfig, MemorySize};

use crate::store::VmDir;
use crate::CliError;

/// How long `GET /vm/balloon` waits for the guest's fresh statistics.
pub const FRESH_STATS_WAIT: Duration = Duration::from_secs(2);

/// `--balloon`: off, or a balloon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BalloonArg {
    Off,
    Set(BalloonConfig),
}

impl std::str::FromStr for BalloonArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" => Ok(BalloonArg::Off),
            _ => s
                .parse()
                .map(BalloonArg::Set)
                .map_err(|e| format!("{e} (or use on or off)")),
        }
    }
}

/// The balloon a VM gets from `--balloon`: without the option, one with
/// everything on (free page reporting gives what an idle guest frees back
/// to the host within seconds, with nobody setting a target); `off` for
/// none.
pub(crate) fn config(arg: Option<BalloonArg>) -> Option<BalloonConfig> {
    match arg {
        None => Some(BalloonConfig::default()),
        Some(BalloonArg::Off) => None,
        Some(BalloonArg::Set(b)) => Some(b),
    }
}

/// A balloon size: like `--memory`'s, 0 allowed.
pub(crate) fn parse_size(s: &str) -> Result<MemorySize, String> {
    s.parse().map_err(|e: vmm::config::SizeError| e.to_string())
}

fn fail(e: impl std::fmt::Display) -> CliError {
    CliError::Failure(e.to_string())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

pub fn run(name: &str, size: Option<MemorySize>, stats: bool, json: bool) -> Result<i32, CliError> {
    let vm = VmDir::open(name).map_err(fail)?;
    let client = Client::new(&vm.socket());
    let not_running = |e| fail(format!("{name} is not running ({e})"));
    if let (Some(size), false) = (size, stats) {
        let body = serde_json::json!({ "target_bytes": size.bytes() }).to_string();
        let r = client
            .request("PUT", "/vm/balloon", &body)
            .map_err(not_running)?;
        if r.status >= 300 {
            return Err(fail(format!("{name}: {}", r.error_message())));
        }
        println!("{name}: balloon target {size}");
        return Ok(0);
    }
    let r = client
        .request("GET", "/vm/balloon", "")
        .map_err(not_running)?;
    if r.status >= 300 {
        return Err(fail(format!("{name}: {}", r.error_message())));
    }
    let v = r.json().map_err(fail)?;
    if json {
        println!("{v:#}");
    } else {
        print!("{}", describe(&v));
    }
    Ok(0)
}

/// The balloon's figures as lines of text (`balloon --stats`, `show`).
pub fn describe(v: &serde_json::Value) -> String {
    let n = |key: &str| v[key].as_u64().unwrap_or(0);
    let mut out = format!(
        "balloon: target {}, actual {}\n",
        mib(n("target_bytes")),
        mib(n("actual_bytes"))
    );
    let c = &v["counters"];
    let cn = |key: &str| c[key].as_u64().unwrap_or(0);
    out += &format!(
        "balloon given back: {} (reported free {}), refused {}\n",
        mib(cn("released_bytes")),
        mib(cn("reported_bytes")),
        cn("refused")
    );
    if let Some(stats) = v["stats"].as_object() {
        let age = v["stats_age_ms"].as_u64().map_or(String::new(), |ms| {
            format!(" ({:.1} s old)", ms as f64 / 1000.0)
        });
        out += &format!("guest memory{age}:\n");
        for (key, label, bytes) in [
            ("total_memory", "total", true),
            ("free_memory", "free", true),
            ("available_memory", "available", true),
            ("disk_caches", "caches", true),
            ("swap_in", "swapped in", true),
            ("swap_out", "swapped out", true),
            ("major_faults", "major faults", false),
            ("minor_faults", "minor faults", false),
        ] {
            if let Some(x) = stats.get(key).and_then(serde_json::Value::as_u64) {
                let shown = if bytes { mib(x) } else { x.to_string() };
                out += &format!("  {label}: {shown}\n");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `run` (and `create`) without `--balloon` get a balloon with free
    /// page reporting; `--balloon off` or `none` opts out.
    #[test]
    fn vms_get_a_reporting_balloon_unless_told_otherwise() {
        use clap::Parser;
        let config = |extra: &[&str]| {
            let mut args = vec!["hostvisor", "run", "--kernel", "/k"];
            args.extend_from_slice(extra);
            let cli = crate::Cli::try_parse_from(args).unwrap();
            let crate::Command::Run(cmd) = cli.command else {
                unreachable!()
            };
            crate::vm_config(cmd.vm)
                .map_err(|e| format!("{e:?}"))
                .unwrap()
        };
        let b = config(&[]).balloon.expect("a balloon by default");
        assert!(b.reporting && b.deflate_on_oom, "{b:?}");
        assert_eq!(b, BalloonConfig::default());
        assert_eq!(config(&["--balloon", "off"]).balloon, None);
        assert_eq!(config(&["--balloon", "none"]).balloon, None);
        assert_eq!(
            config(&["--balloon"]).balloon,
            Some(BalloonConfig::default())
        );
        let b = config(&["--balloon", "reporting=off"]).balloon.unwrap();
        assert!(!b.reporting, "{b:?}");
    }

    #[test]
    fn balloon_args_and_figures() {
        assert_eq!("off".parse::<BalloonArg>(), Ok(BalloonArg::Off));
        assert_eq!(
            "on".parse::<BalloonArg>(),
            Ok(BalloonArg::Set(BalloonConfig::default()))
        );
        assert!("reporting=maybe"
            .parse::<BalloonArg>()
            .unwrap_err()
            .contains("reporting"));
        assert_eq!(parse_size("0").unwrap().bytes(), 0);
        let v = serde_json::json!({
            "target_bytes": 64u64 << 20,
            "actual_bytes": 32u64 << 20,
            "stats": {"total_memory": 256u64 << 20, "major_faults": 3},
            "stats_age_ms": 1500,
            "counters": {"released_bytes": 1u64 << 20, "reported_bytes": 0, "refused": 0},
        });
        let text = describe(&v);
        assert!(text.contains("target 64.0 MiB, actual 32.0 MiB"), "{text}");
        assert!(text.contains("total: 256.0 MiB"), "{text}");
        assert!(text.contains("major faults: 3"), "{text}");
        assert!(text.contains("(1.5 s old)"), "{text}");
    }
}
