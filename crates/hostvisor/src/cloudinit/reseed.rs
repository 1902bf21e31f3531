//! A clone's own seed. A copied seed would keep its source's instance id
//! (cloud-init on the clone would not run again: same hostname) and a
//! network config naming the source's MAC (the clone's NIC has a new one,
//! so it would get no network). A clone of a VM with a NoCloud seed gets
//! a new seed instead: the same user-data, a new instance id, the clone's
//! hostname and its first NIC.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::Path;

use super::{nocloud, seed};

/// The files at the root of a NoCloud seed disk (read through its backing
/// chain), or `None` when the disk is not one: not a FAT volume labelled
/// `cidata`, or larger than any seed hostvisor makes.
pub fn read_seed(path: &Path, format: Option<block::Format>) -> Option<BTreeMap<String, Vec<u8>>> {
    let image = block::open_image(
        path,
        block::OpenOptions {
            read_only: true,
            format,
            ..block::OpenOptions::default()
        },
    )
    .ok()?;
    let size = usize::try_from(image.size()).ok()?;
    if size > seed::MAX_SIZE {
        return None;
    }
    let mut data = vec![0u8; size];
    image.read_at(&mut data, 0).ok()?;
    let fs = fatfs::FileSystem::new(Cursor::new(data), fatfs::FsOptions::new()).ok()?;
    let root_label = fs.read_volume_label_from_root_dir().ok().flatten();
    let labelled = |l: &str| l.trim().eq_ignore_ascii_case(seed::LABEL);
    if !labelled(&fs.volume_label()) && !root_label.as_deref().is_some_and(labelled) {
        return None;
    }
    let mut files = BTreeMap::new();
    for entry in fs.root_dir().iter() {
        let entry = entry.ok()?;
        if entry.is_file() {
            let mut data = Vec::new();
            entry.to_file().read_to_end(&mut data).ok()?;
            files.insert(entry.file_name(), data);
        }
    }
    files.contains_key("meta-data").then_some(files)
}

/// When `src` is a NoCloud seed: writes the clone's seed as a new qcow2
/// image at `to` (clones' disks are qcow2) and returns true. `config` is
/// the clone's definition (its NICs have their new MACs).
pub fn reseed(
    src: &Path,
    format: Option<block::Format>,
    to: &Path,
    hostname: &str,
    config: &vmm::VmConfig,
) -> Result<bool, String> {
    let Some(old) = read_seed(src, format) else {
        return Ok(false);
    };
    let instance_id = uuid::Uuid::new_v4();
    let mac = config
        .nets
        .first()
        .and_then(|n| n.mac)
        .map(|m| m.to_string());
    let meta = nocloud::meta_data(&instance_id.to_string(), hostname);
    let network = nocloud::network_config(mac.as_deref());
    let mut files: Vec<(&str, &[u8])> = vec![
        ("meta-data", meta.as_bytes()),
        ("network-config", network.as_bytes()),
    ];
    // user-data first, as hostvisor writes it; any other file the seed
    // had stays.
    let keep: Vec<(&str, &[u8])> = old
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "meta-data" | "network-config"))
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    files.splice(0..0, keep);
    let id = instance_id.as_bytes();
    let raw = to.with_extension("seed.tmp");
    let result = seed::write(
        &raw,
        u32::from_le_bytes([id[0], id[1], id[2], id[3]]),
        &files,
    )
    .map_err(|e| vmm::error_chain(&e))
    .and_then(|()| {
        block::tools::convert(
            &raw,
            Some(block::Format::Raw),
            to,
            block::Format::Qcow2,
            &mut |_, _| {},
        )
        .map_err(|e| format!("{}: {}", to.display(), vmm::error_chain(&e)))
    });
    let _ = std::fs::remove_file(&raw);
    result.map(|()| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_gets_a_new_instance_hostname_and_mac_and_the_same_user_data() {
        let dir = std::env::temp_dir().join(format!("hv-reseed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("cidata.img");
        let old_meta = nocloud::meta_data("old-id", "src");
        let old_net = nocloud::network_config(Some("52:54:00:00:00:01"));
        seed::write(
            &src,
            7,
            &[
                ("user-data", b"#cloud-config\nusers: []\n"),
                ("meta-data", old_meta.as_bytes()),
                ("network-config", old_net.as_bytes()),
            ],
        )
        .unwrap();
        let mut config: vmm::VmConfig =
            toml::from_str("kernel = \"\"\nnets = [\"nat,mac=52:54:00:00:00:02\"]\n").unwrap();
        config.cpus = 1;
        let to = dir.join("disk1.qcow2");
        assert!(reseed(&src, Some(block::Format::Raw), &to, "dst", &config).unwrap());
        assert_eq!(block::probe(&to).unwrap(), block::Format::Qcow2);
        let files = read_seed(&to, None).unwrap();
        assert_eq!(files["user-data"], b"#cloud-config\nusers: []\n");
        let meta: serde_yaml::Value = serde_yaml::from_slice(&files["meta-data"]).unwrap();
        assert_eq!(meta["local-hostname"], "dst");
        let id = meta["instance-id"].as_str().unwrap();
        assert!(id != "old-id" && uuid::Uuid::parse_str(id).is_ok(), "{id}");
        let net: serde_yaml::Value = serde_yaml::from_slice(&files["network-config"]).unwrap();
        assert_eq!(
            net["ethernets"]["primary"]["match"]["macaddress"],
            "52:54:00:00:00:02"
        );
        assert!(!dir.join("disk1.seed.tmp").exists());

        // Another disk is left to the clone's copy.
        let other = dir.join("data.raw");
        std::fs::write(&other, vec![0u8; 1 << 20]).unwrap();
        assert!(!reseed(&other, None, &dir.join("x.qcow2"), "dst", &config).unwrap());
        assert!(!dir.join("x.qcow2").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
