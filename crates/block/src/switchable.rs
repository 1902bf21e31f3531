//! A disk whose image can be replaced while the VM runs: a snapshot
//! freezes the image a disk writes to and moves the disk onto a new
//! overlay backed by it. The device keeps one [`Switchable`]; the VMM
//! keeps another handle on it and switches it while the device sleeps.

use std::io;
use std::sync::{Arc, RwLock};

use crate::DiskImage;

#[derive(Debug)]
pub struct Switchable {
    current: RwLock<Arc<dyn DiskImage>>,
    /// The first image's identifier: the guest read it once as the disk's
    /// serial, and the disk stays the same disk.
    id: Vec<u8>,
}

impl Switchable {
    pub fn new(image: Arc<dyn DiskImage>) -> Self {
        let id = image.id();
        Switchable {
            current: RwLock::new(image),
            id,
        }
    }

    fn image(&self) -> Arc<dyn DiskImage> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the image with the one `open_new` makes and opens. The
    /// old image is flushed and closed first (the new one is usually an
    /// overlay backed by it, and an image open for writing is locked
    /// against readers). If the new one cannot be had, or differs in size
    /// or writability, `reopen_old` brings the old one back.
    pub fn switch(
        &self,
        open_new: impl FnOnce() -> io::Result<Arc<dyn DiskImage>>,
        reopen_old: impl FnOnce() -> io::Result<Arc<dyn DiskImage>>,
    ) -> io::Result<()> {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        current.flush()?;
        let (size, read_only) = (current.size(), current.read_only());
        *current = Arc::new(Detached { size, read_only });
        let opened = open_new().and_then(|image| {
            if image.size() != size {
                Err(io::Error::other(format!(
                    "the new image has {} bytes, the disk {size}",
                    image.size()
                )))
            } else if image.read_only() != read_only {
                Err(io::Error::other(
                    "the new image is not writable as the disk is",
                ))
            } else {
                Ok(image)
            }
        });
        match opened {
            Ok(image) => {
                *current = image;
                Ok(())
            }
            Err(e) => {
                // Back onto the old image; if even that fails, the disk
                // fails its I/O (the guest sees errors, nothing is lost).
                *current = reopen_old()?;
                Err(e)
            }
        }
    }
}

/// The disk between two images: every I/O fails.
#[derive(Debug)]
struct Detached {
    size: u64,
    read_only: bool,
}

impl DiskImage for Detached {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(detached())
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(detached())
    }
    fn flush(&self) -> io::Result<()> {
        Err(detached())
    }
    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Err(detached())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(detached())
    }
    fn id(&self) -> Vec<u8> {
        Vec::new()
    }
}

fn detached() -> io::Error {
    io::Error::other("the disk's image is being switched")
}

impl DiskImage for Switchable {
    fn size(&self) -> u64 {
        self.image().size()
    }
    fn read_only(&self) -> bool {
        self.image().read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image().read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.image().write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.image().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.image().discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.image().write_zeroes(offset, len, unmap)
    }
    fn id(&self) -> Vec<u8> {
        self.id.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::{create, CreateSpec};
    use crate::{open_image, Format, OpenOptions};

    #[test]
    fn writes_go_to_the_new_overlay_and_the_old_image_stays() {
        let dir = std::env::temp_dir().join(format!("hv-switch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.qcow2");
        create(&CreateSpec {
            path: base.clone(),
            size: Some(1 << 20),
            format: Format::Qcow2,
            backing: None,
            backing_format: None,
            cluster_size: None,
        })
        .unwrap();
        let rw = OpenOptions::default();
        let disk = Switchable::new(open_image(&base, rw).unwrap());
        let id = disk.id();
        disk.write_at(b"before", 0).unwrap();
        let top = dir.join("top.qcow2");
        let overlay = |path: &std::path::Path, backing: &std::path::Path| {
            create(&CreateSpec {
                path: path.to_path_buf(),
                size: None,
                format: Format::Qcow2,
                backing: Some(backing.to_string_lossy().into_owned()),
                backing_format: Some(Format::Qcow2),
                cluster_size: None,
            })
            .map_err(std::io::Error::other)?;
            open_image(path, rw).map_err(std::io::Error::other)
        };
        let reopen = |path: &std::path::Path| open_image(path, rw).map_err(std::io::Error::other);
        disk.switch(|| overlay(&top, &base), || reopen(&base))
            .unwrap();
        let mut b = [0u8; 6];
        disk.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"before", "the overlay reads through to its backing");
        disk.write_at(b"after!", 0).unwrap();
        disk.flush().unwrap();
        assert_eq!(disk.id(), id, "the disk keeps its serial");
        drop(disk);
        let frozen = open_image(
            &base,
            OpenOptions {
                read_only: true,
                ..rw
            },
        )
        .unwrap();
        frozen.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"before", "the frozen image did not change");
        let other = dir.join("other.qcow2");
        create(&CreateSpec {
            path: other.clone(),
            size: Some(2 << 20),
            format: Format::Qcow2,
            backing: None,
            backing_format: None,
            cluster_size: None,
        })
        .unwrap();
        // A differently sized image is refused and the disk stays on its
        // image; so does an overlay that cannot be created.
        let disk = Switchable::new(open_image(&top, rw).unwrap());
        assert!(disk.switch(|| reopen(&other), || reopen(&top)).is_err());
        assert!(disk
            .switch(|| overlay(&dir.join("nope/x.qcow2"), &top), || reopen(&top))
            .is_err());
        disk.read_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"after!");
        drop(disk);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A snapshot's overlay is like the layer below it: a qcow2's cluster
    /// size, the default over a raw image; its backing is an absolute
    /// path.
    #[test]
    fn overlays_inherit_the_backing_cluster_size() {
        use crate::tools::{create_overlay, info};
        let dir = std::env::temp_dir().join(format!("hv-overlay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small.qcow2");
        create(&CreateSpec {
            path: small.clone(),
            size: Some(1 << 20),
            format: Format::Qcow2,
            backing: None,
            backing_format: None,
            cluster_size: Some(4096),
        })
        .unwrap();
        let top = dir.join("top.qcow2");
        create_overlay(&top, &small, Format::Qcow2).unwrap();
        let i = info(&top, None).unwrap();
        assert_eq!(i.cluster_size, Some(4096));
        assert_eq!(i.virtual_size, 1 << 20);
        assert_eq!(
            i.backing_file.as_deref(),
            Some(std::fs::canonicalize(&small).unwrap().to_str().unwrap())
        );
        let raw = dir.join("base.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let over_raw = dir.join("over-raw.qcow2");
        create_overlay(&over_raw, &raw, Format::Raw).unwrap();
        assert_eq!(info(&over_raw, None).unwrap().cluster_size, Some(65536));
        assert!(
            create_overlay(&over_raw, &raw, Format::Raw).is_err(),
            "never overwrites"
        );
        // A raw image holding a qcow2 header stays raw under its overlay.
        let tricky = dir.join("tricky.raw");
        let mut bytes = std::fs::read(&small).unwrap();
        bytes.resize(1 << 20, 0);
        std::fs::write(&tricky, &bytes).unwrap();
        let over_tricky = dir.join("over-tricky.qcow2");
        create_overlay(&over_tricky, &tricky, Format::Raw).unwrap();
        assert_eq!(
            info(&over_tricky, None).unwrap().backing_format.as_deref(),
            Some("raw")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
