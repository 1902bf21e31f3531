//! A managed VM's snapshot metadata, as it lies on disk under
//! `vms/NAME/snapshots/`:
//!
//! ```text
//! snapshots/
//!   lock                 flock: one snapshot operation at a time
//!   current.json         which snapshot the VM's disks stand on (+ resume mark)
//!   journal.json         the operation in flight, if any (crash recovery)
//!   <id>/meta.json       one snapshot: name, parent, date, frozen layers
//!   <id>/config.toml     the VM's definition when it was taken
//!   <id>/state/          the running state (only for a running VM's snapshot)
//! ```
//!
//! Every file here is replaced as a whole: written to a temporary file,
//! fsynced, renamed over the old one, and the directory fsynced, so a
//! `kill -9` leaves either the old or the new contents. The tree itself
//! (children, ancestors, drawing) is pure logic on a list of
//! [`SnapshotMeta`], unit-tested below.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One disk's layer frozen by a snapshot: the image file the VM wrote to
/// until the snapshot was taken; it is never written again (a delete may
/// rebase it, which keeps what it reads).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrozenLayer {
    /// Absolute path of the image.
    pub path: PathBuf,
    /// True for an overlay hostvisor made (in the VM's `disks/`); false for
    /// the disk as it was before the first snapshot (the base), which is
    /// never deleted or rebased.
    pub removable: bool,
    /// The image's format as the VM's definition named it (probed when
    /// `None`): a raw base stays raw whatever its first bytes are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<block::Format>,
    /// For a base: its length and modification time when frozen, so a
    /// base changed behind hostvisor's back is noticed before a restore
    /// would give wrong contents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
}

/// A file's length and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub len: u64,
    pub mtime_s: i64,
    pub mtime_nsec: i64,
}

impl Fingerprint {
    pub fn of(path: &Path) -> io::Result<Fingerprint> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Fingerprint {
            len: m.len(),
            mtime_s: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }
}

/// One snapshot (`<id>/meta.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub id: String,
    pub name: String,
    /// The snapshot this one was taken on top of (`None`: a root).
    pub parent: Option<String>,
    /// RFC 3339, UTC.
    pub created: String,
    #[serde(default)]
    pub description: String,
    /// One per disk of the VM's definition, in order.
    pub disks: Vec<FrozenLayer>,
    /// True when `<id>/state/` holds the running VM's saved state.
    #[serde(default)]
    pub saved_state: bool,
    /// Host bytes the snapshot's own files took when it was taken (its
    /// removable layers and saved state); `list` shows the current figure.
    #[serde(default)]
    pub size: u64,
}

/// A VM to resume from a saved state at its next start, rather than boot:
/// set by restoring (or cloning) a snapshot that has one, cleared by the
/// start that uses it. Valid only while the disks are exactly the empty
/// overlays made with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeMark {
    pub state_dir: PathBuf,
    /// The top overlay of each disk and its fingerprint when made.
    pub tops: Vec<(PathBuf, Fingerprint)>,
}

/// `current.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    /// The snapshot the disks' top overlays are backed by.
    pub current: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<ResumeMark>,
}

/// The operation in flight (`journal.json`), written before its first
/// change to any file and removed after its last. Recovery (run by every
/// snapshot command, `start` and `clone` under the locks) finishes or
/// undoes it; see each variant for how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Journal {
    /// Commit point: the definition's disks are `new_tops` (stopped VM),
    /// or all `new_tops` exist (a running VM's take: the VMM made them and
    /// switched to them). Before it: undo (remove the snapshot and any new
    /// overlay); after it: finish (definition, current).
    Take {
        id: String,
        old_tops: Vec<PathBuf>,
        new_tops: Vec<PathBuf>,
        running: bool,
    },
    /// Commit point: the definition's disks are `new_tops`. Before it:
    /// remove the new overlays; after it: set current, remove `old_tops`.
    Restore {
        id: String,
        old_tops: Vec<PathBuf>,
        new_tops: Vec<PathBuf>,
        /// Set the resume mark to the snapshot's saved state.
        resume: bool,
    },
    /// Always finished: every step is idempotent (rebases of the layers
    /// backed by the deleted ones, re-parenting, removal).
    Delete {
        id: String,
        parent: Option<String>,
        layers: Vec<FrozenLayer>,
    },
}

/// Writes `bytes` to `path` atomically and durably: a temporary file in
/// the same directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Makes a directory's entries (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Serializes and writes atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let mut text = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    text.push(b'\n');
    write_atomic(path, &text)
}

/// Reads a JSON file; `None` if it does not exist.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Now as RFC 3339 (UTC, milliseconds: snapshots taken within one second
/// still sort in order).
pub fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// A time as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC, milliseconds).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A fresh identifier: 12 hex digits from the clock and the process id
/// (callers holding the snapshot lock check it is unused).
pub fn new_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // FNV-1a over the time and pid: well spread, stable in width.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in nanos
        .to_le_bytes()
        .into_iter()
        .chain(std::process::id().to_le_bytes())
    {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

/// Whether `id` is a snapshot id ([`new_id`] makes 12 hex digits; up to
/// 64 are accepted): it names a directory, so nothing else may pass.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The snapshots of one VM, by id, with tree queries.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    pub nodes: BTreeMap<String, SnapshotMeta>,
}

impl Tree {
    pub fn new(list: Vec<SnapshotMeta>) -> Tree {
        Tree {
            nodes: list.into_iter().map(|m| (m.id.clone(), m)).collect(),
        }
    }

    /// A snapshot by name or id (names first).
    pub fn find(&self, key: &str) -> Option<&SnapshotMeta> {
        self.nodes
            .values()
            .find(|m| m.name == key)
            .or_else(|| self.nodes.get(key))
    }

    /// Children of `id` (`None`: the roots), oldest first.
    pub fn children(&self, id: Option<&str>) -> Vec<&SnapshotMeta> {
        let mut c: Vec<&SnapshotMeta> = self
            .nodes
            .values()
            .filter(|m| m.parent.as_deref() == id)
            .collect();
        c.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        c
    }

    /// `id` and its ancestors, nearest first (stops at a loop or a
    /// missing parent).
    pub fn path_to_root(&self, id: &str) -> Vec<&SnapshotMeta> {
        let mut out: Vec<&SnapshotMeta> = Vec::new();
        let mut next = self.nodes.get(id);
        while let Some(m) = next {
            if out.iter().any(|o| o.id == m.id) {
                break;
            }
            out.push(m);
            next = m.parent.as_deref().and_then(|p| self.nodes.get(p));
        }
        out
    }

    /// The first `snap-N` no snapshot is named.
    pub fn default_name(&self) -> String {
        (1..)
            .map(|n| format!("snap-{n}"))
            .find(|n| self.nodes.values().all(|m| &m.name != n))
            .unwrap_or_else(|| "snap".into())
    }

    /// The tree drawn with box characters, one line per snapshot (from
    /// `label`), and a `current` line under the current snapshot (or at
    /// the top level when there is none).
    pub fn draw(
        &self,
        current: Option<&str>,
        label: &dyn Fn(&SnapshotMeta) -> String,
        current_label: &str,
    ) -> Vec<String> {
        let mut lines = Vec::new();
        self.draw_level(None, "", current, label, current_label, &mut lines, 0);
        lines
    }

    #[allow(clippy::too_many_arguments)]
    fn draw_level(
        &self,
        parent: Option<&str>,
        prefix: &str,
        current: Option<&str>,
        label: &dyn Fn(&SnapshotMeta) -> String,
        current_label: &str,
        lines: &mut Vec<String>,
        depth: usize,
    ) {
        if depth > self.nodes.len() {
            return;
        }
        let kids = self.children(parent);
        let here = current == parent;
        let count = kids.len() + usize::from(here);
        let top = parent.is_none();
        for (i, m) in kids.iter().enumerate() {
            let last = i + 1 == count;
            let (branch, cont) = match (top, last) {
                (true, _) => ("", ""),
                (false, true) => ("└── ", "    "),
                (false, false) => ("├── ", "│   "),
            };
            lines.push(format!("{prefix}{branch}{}", label(m)));
            let inner = format!("{prefix}{cont}");
            self.draw_level(
                Some(&m.id),
                &inner,
                current,
                label,
                current_label,
                lines,
                depth + 1,
            );
        }
        if here {
            let branch = if top { "" } else { "└── " };
            lines.push(format!("{prefix}{branch}{current_label}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, parent: Option<&str>, created: &str) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            name: format!("n-{id}"),
            parent: parent.map(Into::into),
            created: created.into(),
            description: String::new(),
            disks: Vec::new(),
            saved_state: false,
            size: 0,
        }
    }

    fn sample() -> Tree {
        Tree::new(vec![
            node("a", None, "1"),
            node("b", Some("a"), "2"),
            node("c", Some("b"), "3"),
            node("d", Some("a"), "4"),
        ])
    }

    #[test]
    fn dates_are_rfc3339() {
        let at = |secs: u64, ms: u64| {
            rfc3339(
                std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(secs)
                    + std::time::Duration::from_millis(ms),
            )
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 42), "2000-02-29T00:00:00.042Z");
        assert_eq!(at(1_798_761_599, 999), "2026-12-31T23:59:59.999Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
        let now = now_rfc3339();
        assert_eq!(now.len(), "2026-11-27T21:18:21.123Z".len(), "{now}");
        assert!(now.ends_with('Z') && now.as_bytes()[19] == b'.', "{now}");
    }

    #[test]
    fn ids_name_nothing_but_a_directory() {
        assert!(valid_id(&new_id()));
        for bad in ["", "..", "../x", "a/b", "abc ", &"a".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn tree_queries() {
        let t = sample();
        let kids: Vec<_> = t.children(Some("a")).iter().map(|m| &m.id).collect();
        assert_eq!(kids, ["b", "d"]);
        let path: Vec<_> = t.path_to_root("c").iter().map(|m| &m.id).collect();
        assert_eq!(path, ["c", "b", "a"]);
        assert_eq!(t.find("n-b").map(|m| m.id.as_str()), Some("b"));
        assert_eq!(t.find("d").map(|m| m.id.as_str()), Some("d"));
        assert!(t.find("zz").is_none());
        assert_eq!(t.default_name(), "snap-1");
    }

    #[test]
    fn a_parent_loop_does_not_hang() {
        let t = Tree::new(vec![node("x", Some("y"), "1"), node("y", Some("x"), "2")]);
        assert_eq!(t.path_to_root("x").len(), 2);
        assert!(t.draw(None, &|m| m.id.clone(), "now").len() <= 2);
    }

    #[test]
    fn drawing_marks_the_current_state() {
        let t = sample();
        let lines = t.draw(Some("b"), &|m| m.id.clone(), "* now");
        assert_eq!(
            lines,
            ["a", "├── b", "│   ├── c", "│   └── * now", "└── d",]
        );
        let none = Tree::default().draw(None, &|m| m.id.clone(), "* now");
        assert_eq!(none, ["* now"]);
    }

    #[test]
    fn journal_round_trips() {
        let j = Journal::Delete {
            id: "a".into(),
            parent: None,
            layers: vec![FrozenLayer {
                path: "/x".into(),
                removable: false,
                format: Some(block::Format::Raw),
                fingerprint: Some(Fingerprint {
                    len: 1 << 20,
                    mtime_s: 1_700_000_000,
                    mtime_nsec: 5,
                }),
            }],
        };
        let text = serde_json::to_string(&j).unwrap_or_default();
        assert!(text.contains("\"op\":\"delete\""), "{text}");
        let back: Journal = serde_json::from_str(&text).expect("journal parses");
        assert_eq!(back, j);
    }

    #[test]
    fn atomic_writes_replace_whole_files() {
        let dir = std::env::temp_dir().join(format!("hv-meta-{}", new_id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let p = dir.join("current.json");
        write_json(&p, &Current::default()).expect("write");
        let c = Current {
            current: Some("abc".into()),
            resume: None,
        };
        write_json(&p, &c).expect("rewrite");
        assert_eq!(read_json::<Current>(&p).expect("read"), Some(c));
        assert_eq!(std::fs::read_dir(&dir).expect("list").count(), 1);
        assert_eq!(read_json::<Current>(&dir.join("none")).expect("read"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
