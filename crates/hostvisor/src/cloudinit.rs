//! `hostvisor create NAME --image FILE [--cloud-init ...]`: a managed VM
//! on a distribution's disk image (a cloud image). Its first disk is a new
//! qcow2 overlay in the VM's directory backed by FILE (which is never
//! written, so one downloaded image serves many VMs), and with
//! `--cloud-init` its second a read-only NoCloud seed (a `cidata` VFAT
//! volume) from which cloud-init sets up the user, ssh keys, hostname and
//! network on first boot — as Multipass and Lima do. docs/cloud-images.md
//! describes it for users.

mod nocloud;
mod reseed;
pub mod seed;

use std::path::{Path, PathBuf};

use crate::CliError;

/// The overlay on the image, in the VM's directory.
const OVERLAY: &str = "disk.qcow2";
/// The NoCloud seed, in the VM's directory.
const SEED: &str = "cidata.img";

/// `create`'s options for a VM on a disk image.
#[derive(Debug, Default, clap::Args)]
pub struct ImageArgs {
    /// A distribution's disk image (qcow2 or raw, e.g. a cloud image):
    /// the VM's first disk becomes a new qcow2 overlay on it in the VM's
    /// directory (FILE is never written). Boots through --firmware bios on
    /// a pc machine unless --firmware, --machine or --kernel say otherwise.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Grow the VM's disk (the overlay) to SIZE, like 10G; cloud-init
    /// grows the root partition to fill it at first boot.
    #[arg(long, value_name = "SIZE", value_parser = block::tools::parse_size)]
    pub disk_size: Option<u64>,
    /// Give the VM a cloud-init NoCloud seed (a read-only second disk):
    /// a user named after you (or `hostvisor` for root) with your ssh
    /// keys and password-less sudo, the VM's hostname, DHCP on its NIC.
    #[arg(long)]
    pub cloud_init: bool,
    /// An ssh public key for the user (repeatable); without one, those in
    /// ~/.ssh/id_*.pub.
    #[arg(long = "ssh-key", value_name = "KEY.pub")]
    pub ssh_keys: Vec<PathBuf>,
    /// Your own cloud-init user data (#cloud-config, a #! script or a
    /// MIME multipart archive), used as it is instead of hostvisor's.
    #[arg(long, value_name = "FILE", conflicts_with = "ssh_keys")]
    pub user_data: Option<PathBuf>,
    /// The guest's hostname (default: the VM's name).
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
}

impl ImageArgs {
    /// The options that only mean something with another: a one-line
    /// usage error naming both (clap's own puts the name on a second line).
    fn check_combination(&self) -> Result<(), CliError> {
        let needs = |opt: &str, other: &str| Err(CliError::Usage(format!("{opt} needs {other}")));
        if self.image.is_none() {
            if self.cloud_init {
                return needs("--cloud-init", "--image FILE (the cloud image to boot)");
            }
            if self.disk_size.is_some() {
                return needs("--disk-size", "--image FILE");
            }
        }
        if !self.cloud_init {
            if !self.ssh_keys.is_empty() {
                return needs("--ssh-key", "--cloud-init");
            }
            if self.user_data.is_some() {
                return needs("--user-data", "--cloud-init");
            }
            if self.hostname.is_some() {
                return needs("--hostname", "--cloud-init");
            }
        }
        Ok(())
    }
}

/// What the seed will hold, checked before anything is made.
#[derive(Debug)]
struct SeedPlan {
    user_data: Vec<u8>,
    hostname: String,
    instance_id: uuid::Uuid,
}

/// A VM on an image, checked and ready to be put in its directory.
#[derive(Debug)]
pub struct Prepared {
    image: PathBuf,
    format: block::Format,
    disk_size: Option<u64>,
    seed: Option<SeedPlan>,
}

fn usage(e: nocloud::InputError) -> CliError {
    CliError::Usage(e.0)
}

/// The ssh keys in ~/.ssh/id_*.pub (as Lima and Multipass users have
/// them), for a user-data made without --ssh-key.
fn home_keys() -> Vec<PathBuf> {
    let Some(home) = std::env::var_os("HOME") else {
        return Vec::new();
    };
    let dir = Path::new(&home).join(".ssh");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut keys: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("id_") && n.ends_with(".pub"))
        })
        .collect();
    keys.sort();
    keys
}

impl Prepared {
    /// The image the user named (canonical): the overlay's backing file,
    /// allowed as such in the VM's definition.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// Checks `--image` and the cloud-init options and sets the boot
    /// defaults for an image on `run` (bios firmware on a pc machine,
    /// unless the user chose a firmware, a kernel or the microvm).
    /// `None` without `--image`.
    pub fn new(
        name: &str,
        args: ImageArgs,
        run: &mut crate::RunArgs,
    ) -> Result<Option<Prepared>, CliError> {
        args.check_combination()?;
        let Some(image) = args.image else {
            return Ok(None);
        };
        let image = std::fs::canonicalize(&image)
            .map_err(|e| CliError::Usage(format!("--image {}: {e}", image.display())))?;
        if !image.is_file() {
            return Err(CliError::Usage(format!(
                "--image {}: not a disk image file",
                image.display()
            )));
        }
        let info = block::tools::info(&image, None)
            .map_err(|e| CliError::Usage(format!("--image: {}", vmm::error_chain(&e))))?;
        if let Some(size) = args.disk_size {
            if size < info.virtual_size {
                return Err(CliError::Usage(format!(
                    "--disk-size {size} is smaller than the image ({} bytes); it can only grow",
                    info.virtual_size
                )));
            }
        }
        let seed = if args.cloud_init {
            Some(seed_plan(
                name,
                &args.user_data,
                &args.ssh_keys,
                args.hostname,
            )?)
        } else {
            None
        };
        if run.firmware.is_none()
            && run.kernel.is_none()
            && run.machine != Some(vmm::MachineType::Microvm)
        {
            // Cloud images boot through firmware and their boot loader.
            run.firmware = Some(vmm::firmware::Firmware::Bios);
        }
        Ok(Some(Prepared {
            image,
            format: info.format,
            disk_size: args.disk_size,
            seed,
        }))
    }

    /// Puts the image's disks (overlay, then seed) before `config`'s
    /// others, at their places in the VM directory `dir`.
    pub fn attach(&self, dir: &Path, config: &mut vmm::VmConfig) {
        let mut disks = vec![vmm::DiskConfig {
            path: dir.join(OVERLAY),
            readonly: false,
            cache: block::CacheMode::default(),
            format: Some(block::Format::Qcow2),
            iops: None,
            bps: None,
        }];
        if self.seed.is_some() {
            disks.push(vmm::DiskConfig {
                path: dir.join(SEED),
                readonly: true,
                cache: block::CacheMode::default(),
                format: Some(block::Format::Raw),
                iops: None,
                bps: None,
            });
        }
        disks.append(&mut config.disks);
        config.disks = disks;
    }

    /// Makes the overlay and the seed in the new VM's directory `dir`
    /// (its NICs have their MACs by now).
    pub fn install(&self, dir: &Path, config: &vmm::VmConfig) -> Result<(), CliError> {
        let overlay = dir.join(OVERLAY);
        let fail = |path: &Path, e: &dyn std::error::Error| {
            CliError::Failure(format!("{}: {}", path.display(), vmm::error_chain(e)))
        };
        block::tools::create_overlay(&overlay, &self.image, self.format)
            .map_err(|e| fail(&overlay, &e))?;
        if let Some(size) = self.disk_size {
            block::tools::resize(
                &overlay,
                Some(block::Format::Qcow2),
                block::tools::NewSize::Absolute(size),
            )
            .map_err(|e| fail(&overlay, &e))?;
        }
        let Some(plan) = &self.seed else {
            return Ok(());
        };
        let mac = config
            .nets
            .first()
            .and_then(|n| n.mac)
            .map(|m| m.to_string());
        let meta = nocloud::meta_data(&plan.instance_id.to_string(), &plan.hostname);
        let network = nocloud::network_config(mac.as_deref());
        let files: [(&str, &[u8]); 3] = [
            ("user-data", &plan.user_data),
            ("meta-data", meta.as_bytes()),
            ("network-config", network.as_bytes()),
        ];
        let id = plan.instance_id.as_bytes();
        let volume_id = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
        let path = dir.join(SEED);
        seed::write(&path, volume_id, &files).map_err(|e| fail(&path, &e))
    }
}

fn seed_plan(
    name: &str,
    user_data: &Option<PathBuf>,
    ssh_keys: &[PathBuf],
    hostname: Option<String>,
) -> Result<SeedPlan, CliError> {
    let hostname = match hostname {
        Some(h) => {
            nocloud::check_hostname(&h).map_err(usage)?;
            h
        }
        None => nocloud::hostname_for(name),
    };
    let user_data = match user_data {
        Some(path) => nocloud::read_user_data(path).map_err(usage)?,
        None => {
            let user = nocloud::default_user(std::env::var("USER").ok().as_deref());
            let (paths, given) = if ssh_keys.is_empty() {
                (home_keys(), false)
            } else {
                (ssh_keys.to_vec(), true)
            };
            let mut keys = Vec::new();
            for p in &paths {
                match nocloud::read_ssh_keys(p) {
                    Ok(k) => keys.extend(k),
                    Err(e) if given => return Err(usage(e)),
                    // A stray file in ~/.ssh is not the user's mistake here.
                    Err(e) => eprintln!("hostvisor: warning: skipping {e}"),
                }
            }
            if keys.is_empty() {
                eprintln!(
                    "hostvisor: warning: no --ssh-key given and none in ~/.ssh/id_*.pub: nobody can log in to {name} as {user} over ssh"
                );
            }
            nocloud::user_data(&user, &keys).into_bytes()
        }
    };
    Ok(SeedPlan {
        user_data,
        hostname,
        instance_id: uuid::Uuid::new_v4(),
    })
}

/// For `clone`: when the source disk `src` is a NoCloud seed, writes the
/// clone's own seed (qcow2) at `to` — same user-data, a new instance id,
/// the clone's hostname (from `dst`, its name) and first NIC — and returns
/// true; false for any other disk.
pub fn reseed_for_clone(
    src: &Path,
    format: Option<block::Format>,
    to: &Path,
    dst: &str,
    config: &vmm::VmConfig,
) -> Result<bool, String> {
    reseed::reseed(src, format, to, &nocloud::hostname_for(dst), config)
}
