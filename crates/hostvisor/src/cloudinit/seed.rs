//! The NoCloud seed image: a VFAT volume labelled `cidata` with the seed's
//! files at its root — what `cloud-localds --filesystem vfat` makes with
//! mkfs.vfat and mcopy, written here in-process with the `fatfs` crate.
//!
//! cloud-init's NoCloud data source finds the volume by its label
//! (`cidata`, in either case; blkid reports both the root directory's
//! volume-label entry and the boot sector's, and both are set) and reads
//! `user-data`, `meta-data` and `network-config` from its root.

use std::io::{Cursor, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The label cloud-init looks for.
pub const LABEL: &str = "cidata";

/// cloud-localds makes a 128 KiB volume; a larger seed gets the smallest
/// power of two that holds it, up to this.
const MIN_SIZE: usize = 128 << 10;
pub(super) const MAX_SIZE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("the cloud-init seed's files ({0} bytes) do not fit in a {MAX_SIZE}-byte volume")]
    TooLarge(usize),
    #[error("cannot write the cloud-init seed's file system")]
    Format(#[source] std::io::Error),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The files' times: now, in UTC (FAT has no time zone; without a clock
/// the crate would write the invalid date 1980-00-00).
#[derive(Debug)]
struct Now;

static NOW: Now = Now;

impl Now {
    fn parts() -> [u16; 6] {
        // `YYYY-MM-DDTHH:MM:SSZ`; FAT dates start in 1980.
        let text = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let mut parts = [1980, 1, 1, 0, 0, 0];
        for (part, field) in parts
            .iter_mut()
            .zip(text.split(|c: char| !c.is_ascii_digit()))
        {
            if let Ok(v) = field.parse() {
                *part = v;
            }
        }
        parts[0] = parts[0].clamp(1980, 2107);
        parts
    }
}

impl fatfs::TimeProvider for Now {
    fn get_current_date(&self) -> fatfs::Date {
        self.get_current_date_time().date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        let [year, month, day, hour, min, sec] = Now::parts();
        fatfs::DateTime {
            date: fatfs::Date { year, month, day },
            time: fatfs::Time {
                hour,
                min,
                sec,
                millis: 0,
            },
        }
    }
}

/// The label as the FAT boot sector and root directory hold it: 11
/// bytes, space padded.
fn label_bytes() -> [u8; 11] {
    let mut b = [b' '; 11];
    b[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    b
}

/// A VFAT image of `size` bytes holding `files` at its root, or `None`
/// when they do not fit.
fn try_image(
    size: usize,
    volume_id: u32,
    files: &[(&str, &[u8])],
) -> Result<Option<Vec<u8>>, std::io::Error> {
    let mut disk = Cursor::new(vec![0u8; size]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(label_bytes())
            .volume_id(volume_id),
    )?;
    disk.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new().time_provider(&NOW))?;
        {
            let root = fs.root_dir();
            for (name, data) in files {
                let mut file = root.create_file(name)?;
                if let Err(e) = file.write_all(data).and_then(|()| file.flush()) {
                    // Out of clusters: a larger volume is tried.
                    tracing::debug!("seed of {size} bytes too small: {e}");
                    return Ok(None);
                }
            }
        }
        fs.unmount()?;
    }
    Ok(Some(disk.into_inner()))
}

/// The seed volume holding `files` (name, contents) at its root.
pub fn image(volume_id: u32, files: &[(&str, &[u8])]) -> Result<Vec<u8>, SeedError> {
    let total: usize = files.iter().map(|(_, d)| d.len()).sum();
    if total >= MAX_SIZE {
        return Err(SeedError::TooLarge(total));
    }
    let mut size = MIN_SIZE;
    while size <= MAX_SIZE {
        if let Some(img) = try_image(size, volume_id, files).map_err(SeedError::Format)? {
            return Ok(img);
        }
        size *= 2;
    }
    Err(SeedError::TooLarge(total))
}

/// Writes the seed volume to a new file at `path` (which must not exist),
/// durably.
pub fn write(path: &Path, volume_id: u32, files: &[(&str, &[u8])]) -> Result<(), SeedError> {
    let img = image(volume_id, files)?;
    let io = |source| SeedError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(&img).and_then(|()| f.sync_all()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Boot-sector label, root-directory label, files.
    type Volume = (String, Option<String>, Vec<(String, Vec<u8>)>);

    fn read_back(img: Vec<u8>) -> Volume {
        let fs = fatfs::FileSystem::new(Cursor::new(img), fatfs::FsOptions::new()).unwrap();
        let boot = fs.volume_label();
        let root_label = fs.read_volume_label_from_root_dir().unwrap();
        let mut files = Vec::new();
        for e in fs.root_dir().iter() {
            let e = e.unwrap();
            if e.is_file() {
                let mut data = Vec::new();
                e.to_file().read_to_end(&mut data).unwrap();
                files.push((e.file_name(), data));
            }
        }
        (boot, root_label, files)
    }

    #[test]
    fn the_volume_is_labelled_cidata_with_the_files_at_its_root() {
        let img = image(
            0x1234_5678,
            &[
                ("user-data", b"#cloud-config\n"),
                ("meta-data", b"instance-id: x\n"),
                ("network-config", b"version: 2\n"),
            ],
        )
        .unwrap();
        assert_eq!(img.len(), MIN_SIZE, "cloud-localds's size");
        let (boot, root_label, files) = read_back(img);
        assert_eq!(boot, "cidata");
        assert_eq!(root_label.as_deref(), Some("cidata"));
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["user-data", "meta-data", "network-config"]);
        assert_eq!(files[1].1, b"instance-id: x\n");
    }

    #[test]
    fn files_are_dated_now() {
        let before = Now::parts();
        let img = image(1, &[("meta-data", b"m")]).unwrap();
        let after = Now::parts();
        let fs = fatfs::FileSystem::new(Cursor::new(img), fatfs::FsOptions::new()).unwrap();
        let e = fs.root_dir().iter().next().unwrap().unwrap();
        let d = e.modified().date;
        assert!(d.year >= 2024 && (1..=12).contains(&d.month) && (1..=31).contains(&d.day));
        // (Midnight may pass meanwhile.)
        let got = [d.year, d.month, d.day];
        assert!(
            got == before[..3] || got == after[..3],
            "{got:?} {before:?}"
        );
    }

    #[test]
    fn a_large_seed_gets_a_larger_volume() {
        let big = vec![b'x'; 300 << 10];
        let img = image(1, &[("user-data", &big), ("meta-data", b"m")]).unwrap();
        assert!(img.len() > big.len());
        let (_, _, files) = read_back(img);
        assert_eq!(files[0].1, big);
    }

    #[test]
    fn a_seed_too_large_is_refused() {
        let huge = vec![0u8; MAX_SIZE];
        assert!(matches!(
            image(1, &[("user-data", &huge)]),
            Err(SeedError::TooLarge(_))
        ));
    }

    #[test]
    fn an_existing_file_is_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("hv-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("seed.img");
        std::fs::write(&path, b"keep").unwrap();
        assert!(write(&path, 1, &[("meta-data", b"m")]).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
