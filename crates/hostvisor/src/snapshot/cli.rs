//! The `hostvisor snapshot` subcommands: locks, recovery, and what a
//! person (or `--json`) sees.

use clap::Subcommand;

use super::{access, layers, Access, SnapshotError, Snapshots};
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

fn no_such(vm: &VmDir, key: &str) -> SnapshotError {
    SnapshotError::Refused(format!(
        "{} has no snapshot named `{key}` (see hostvisor snapshot list {})",
        vm.name, vm.name
    ))
}

fn take(name: &str, snapshot: Option<String>, description: String) -> Result<i32, CliError> {
    let vm = open(name)?;
    let (snaps, access) = enter(&vm)?;
    let m = snaps.take(&access, snapshot, description)?;
    println!(
        "took snapshot `{}` of {name} (id {}{})",
        m.name,
        m.id,
        if m.saved_state {
            ", with its running state"
        } else {
            ""
        }
    );
    Ok(0)
}

fn list(name: &str, json: bool) -> Result<i32, CliError> {
    let vm = open(name)?;
    let (snaps, _access) = enter(&vm)?;
    let tree = snaps.tree()?;
    let current = snaps.current()?;
    let size_of = |m: &super::meta::SnapshotMeta| -> u64 {
        m.disks
            .iter()
            .filter(|l| l.removable)
            .map(|l| layers::allocated(&l.path))
            .sum::<u64>()
            + layers::allocated_dir(&snaps.state_dir(&m.id))
    };
    if json {
        let mut list: Vec<&super::meta::SnapshotMeta> = tree.nodes.values().collect();
        list.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        let rows: Vec<serde_json::Value> = list
            .iter()
            .map(|m| {
                serde_json::json!({
                    "id": m.id,
                    "name": m.name,
                    "parent": m.parent,
                    "created": m.created,
                    "description": m.description,
                    "saved_state": m.saved_state,
                    "size": size_of(m),
                    "current": current.current.as_deref() == Some(m.id.as_str()),
                    "disks": m.disks,
                })
            })
            .collect();
        let out = serde_json::json!({
            "vm": vm.name,
            "current": current.current,
            "resume_pending": current.resume.is_some(),
            "snapshots": rows,
        });
        println!("{out:#}");
        return Ok(0);
    }
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
    let resume = {
        // Check before stopping anything.
        let (snaps, access) = enter(&vm)?;
        let tree = snaps.tree()?;
        let m = tree.find(key).ok_or_else(|| no_such(&vm, key))?.clone();
        let was_running = access.running();
        if was_running {
            drop(access);
            drop(snaps);
            eprintln!("{name} is running: killing it to restore `{}`", m.name);
            crate::manage::kill(name)?;
        } else {
            drop(access);
            drop(snaps);
        }
        let (snaps, access) = enter(&vm)?;
        if access.running() {
            return Err(CliError::Failure(format!(
                "{name} was started again meanwhile; not restoring"
            )));
        }
        snaps.restore(&m)?;
        println!("restored {name} to snapshot `{}`", m.name);
        if m.saved_state && !was_running {
            println!("its next start resumes the snapshot's running state");
        } else if was_running && !m.saved_state {
            println!("{name} stays stopped: the snapshot was taken while it was stopped");
        }
        // A VM that ran goes on from the snapshot's running state; one
        // that was stopped stays so (as VirtualBox's "saved" state).
        m.saved_state && was_running
    };
    if resume {
        println!("starting {name} from the snapshot's running state");
        return crate::manage::start(name);
    }
    Ok(0)
}

fn delete(name: &str, key: &str) -> Result<i32, CliError> {
    let vm = open(name)?;
    let (snaps, access) = enter(&vm)?;
    let tree = snaps.tree()?;
    let m = tree.find(key).ok_or_else(|| no_such(&vm, key))?.clone();
    let bar = crate::progress::spinner(&format!("deleting snapshot `{}`", m.name));
    let result = snaps.delete(&access, &m);
    bar.finish_and_clear();
    result?;
    println!("deleted snapshot `{}` of {name}", m.name);
    Ok(0)
}
