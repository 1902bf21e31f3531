//! The `hostvisor snapshot` subcommands: locks, recovery, and what a
//! person (or `--json`) sees. A stopped VM's files are changed here; a
//! running VM's process is asked through its API (`/vm/snapshots...`,
//! [`super::served`]), which runs the same operations with its VMM at hand.

use clap::Subcommand;

use super::{access, Access, SnapshotError, Snapshots};
use crate::store::VmDir;
use crate::CliError;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Freeze the VM's disks (and, when it runs, its running state) as a
    /// new snapshot on top of the current one.
    Take {
        name: String,
        /// The snapshot's name (default: snap-1, snap-2, ...).
        snapshot: Option<String>,
        #[arg(long, value_name = "TEXT", default_value = "")]
        description: String,
    },
    /// Show the snapshot tree: parents, dates, sizes and where the VM's
    /// current state stands.
    List {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Put the VM back to a snapshot: its disks get new empty overlays on
    /// the snapshot's layers and the changes since are discarded. A
    /// running VM is killed first, and started again from the snapshot's
    /// running state when it has one.
    Restore { name: String, snapshot: String },
    /// Delete a snapshot, merging its disk changes into the snapshots and
    /// the current state that build on it; every other snapshot keeps its
    /// contents.
    Delete { name: String, snapshot: String },
}

pub fn run(cmd: SnapshotCommand) -> Result<i32, CliError> {
    match cmd {
        SnapshotCommand::Take {
            name,
            snapshot,
            description,
        } => take(&name, snapshot, description),
        SnapshotCommand::List { name, json } => list(&name, json),
        SnapshotCommand::Restore { name, snapshot } => restore(&name, &snapshot),
        SnapshotCommand::Delete { name, snapshot } => delete(&name, &snapshot),
    }
}

fn open(name: &str) -> Result<VmDir, SnapshotError> {
    Ok(VmDir::open(name)?)
}

/// The snapshot lock, the VM's lock (or its running process), and any
/// interrupted operation finished or undone.
fn enter(vm: &VmDir) -> Result<(Snapshots, Access), SnapshotError> {
    let snaps = Snapshots::lock(vm)?;
    let access = access(vm)?;
    snaps.recover(&access)?;
    Ok((snaps, access))
}

/// Where an operation runs: here on a stopped VM's files, or in the
/// running VM's process.
enum Via {
    Here(Snapshots, Access),
    Api(api::Client),
}

fn via(vm: &VmDir) -> Result<Via, SnapshotError> {
    match access(vm)? {
        Access::Running => Ok(Via::Api(api::Client::new(&vm.socket()))),
        stopped => {
            let snaps = Snapshots::lock(vm)?;
            snaps.recover(&stopped)?;
            Ok(Via::Here(snaps, stopped))
        }
    }
}

/// Sends a snapshot request to the running VM's process; its JSON answer.
fn ask(
    vm: &VmDir,
    client: &api::Client,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, SnapshotError> {
    let r = client
        .slow_request("PUT", path, &body.to_string())
        .map_err(|e| SnapshotError::Refused(format!("{}: {e}", vm.name)))?;
    if r.status >= 300 {
        return Err(SnapshotError::Refused(format!(
            "{}: {}",
            vm.name,
            r.error_message()
        )));
    }
    Ok(r.json().unwrap_or(serde_json::Value::Null))
}

fn no_such(vm: &VmDir, key: &str) -> SnapshotError {
    SnapshotError::Refused(format!(
        "{} has no snapshot named `{key}` (see hostvisor snapshot list {})",
        vm.name, vm.name
    ))
}

fn take(name: &str, snapshot: Option<String>, description: String) -> Result<i32, CliError> {
    let vm = open(name)?;
    let (snap, id, saved_state) = match via(&vm)? {
        Via::Here(snaps, access) => {
            let m = snaps.take(&access, snapshot, description)?;
            (m.name, m.id, m.saved_state)
        }
        Via::Api(client) => {
            let body = serde_json::json!({ "name": snapshot, "description": description });
            let m = ask(&vm, &client, "/vm/snapshots/take", body)?;
            let text = |k: &str| m[k].as_str().unwrap_or_default().to_string();
            (text("name"), text("id"), m["saved_state"] == true)
        }
    };
    println!(
        "took snapshot `{snap}` of {name} (id {id}{})",
        if saved_state {
            ", with its running state"
        } else {
            ""
        }
    );
    Ok(0)
}

fn list(name: &str, json: bool) -> Result<i32, CliError> {
    let vm = open(name)?;
    let (snaps, _access) = match via(&vm)? {
        Via::Here(snaps, access) => (snaps, access),
        Via::Api(client) => {
            // The VM's process lists (finishing, with its VMM at hand, an
            // operation that failed midway, which this process could not).
            let r = client
                .slow_request("GET", "/vm/snapshots", "")
                .map_err(|e| SnapshotError::Refused(format!("{name}: {e}")))?;
            if r.status != 200 {
                return Err(
                    SnapshotError::Refused(format!("{name}: {}", r.error_message())).into(),
                );
            }
            if json {
                let list = r
                    .json()
                    .map_err(|e| SnapshotError::Refused(format!("{name}: {e}")))?;
                println!("{list:#}");
                return Ok(0);
            }
            enter(&vm)?
        }
    };
    let tree = snaps.tree()?;
    let current = snaps.current()?;
    if json {
        println!("{:#}", super::served::list_json(&snaps)?);
        return Ok(0);
    }
    let size_of = |m: &super::meta::SnapshotMeta| super::served::size_of(&snaps, m);
    if tree.nodes.is_empty() {
        println!("{name} has no snapshots");
        return Ok(0);
    }
    let label = |m: &super::meta::SnapshotMeta| {
        let mut s = format!(
            "{}  [{}]  {}  {}",
            m.name,
            m.id,
            m.created,
            block::tools::human_size(size_of(m))
        );
        if m.saved_state {
            s.push_str("  (running state)");
        }
        if !m.description.is_empty() {
            s.push_str(&format!("  — {}", m.description));
        }
        s
    };
    let here = if current.resume.is_some() {
        "* current state (resumes from the snapshot's running state at start)"
    } else {
        "* current state"
    };
    for line in tree.draw(current.current.as_deref(), &label, here) {
        println!("{line}");
    }
    Ok(0)
}

fn restore(name: &str, key: &str) -> Result<i32, CliError> {
    let vm = open(name)?;
    match via(&vm)? {
        Via::Here(snaps, _stopped) => {
            let tree = snaps.tree()?;
            let m = tree.find(key).ok_or_else(|| no_such(&vm, key))?.clone();
            snaps.restore(&m)?;
            println!("restored {name} to snapshot `{}`", m.name);
            if m.saved_state {
                println!("its next start resumes the snapshot's running state");
            }
        }
        Via::Api(client) => {
            // The VM process restores in place: the VM goes on from the
            // snapshot's running state, or is powered off when it has none
            // (as VirtualBox does).
            let body = serde_json::json!({ "snapshot": key });
            let r = ask(&vm, &client, "/vm/snapshots/restore", body)?;
            let snap = r["snapshot"].as_str().unwrap_or(key);
            println!("restored {name} to snapshot `{snap}`");
            if r["state"] == "running" {
                println!("{name} runs on from the snapshot's running state");
            } else {
                println!("{name} is stopped: the snapshot was taken while it was stopped");
            }
        }
    }
    Ok(0)
}

fn delete(name: &str, key: &str) -> Result<i32, CliError> {
    let vm = open(name)?;
    let bar = crate::progress::spinner(&format!("deleting snapshot `{key}`"));
    let result = match via(&vm) {
        Ok(Via::Here(snaps, access)) => snaps.tree().and_then(|tree| {
            let m = tree.find(key).ok_or_else(|| no_such(&vm, key))?.clone();
            snaps.delete(&access, &m).map(|()| m.name)
        }),
        // The VM pauses while the layers it has open are merged.
        Ok(Via::Api(client)) => {
            let body = serde_json::json!({ "snapshot": key });
            ask(&vm, &client, "/vm/snapshots/delete", body).map(|_| key.to_string())
        }
        Err(e) => Err(e),
    };
    bar.finish_and_clear();
    println!("deleted snapshot `{}` of {name}", result?);
    Ok(0)
}
