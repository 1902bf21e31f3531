//! `hostvisor`: run virtual machines on KVM.

mod balloon;
mod cgroup;
mod clone;
mod cloudinit;
mod disk;
mod doctor;
mod guest;
mod manage;
mod memory_arg;
mod progress;
mod sandbox;
mod share;
mod snapshot;
mod store;
mod vmproc;

pub(crate) use memory_arg::{parse_memory, MemoryArg};

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use vmm::config::{ResetAction, SerialConfig, VmConfig};
use vmm::{exit_code, VmOutcome, VmmError};

#[derive(Debug, Parser)]
#[command(name = "hostvisor", version, about = "A hosted hypervisor on KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Allow backing files (and files a snapshot names) at or below DIR,
    /// besides each image's own directory (repeatable; also
    /// HOSTVISOR_ALLOW_BACKING, `:` between). `create` keeps them in the
    /// VM's definition. See docs/security.md.
    #[arg(long, value_name = "DIR", global = true)]
    allow_backing: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a VM in the foreground with its console on this terminal.
    ///
    /// Without --kernel, boots the default guest built by guest/build.sh.
    /// Exit status: 0 the guest shut down, 1 hostvisor failed, 2 bad usage,
    /// 3 the guest crashed. Ctrl-A x kills the VM; Ctrl-A h lists the keys.
    Run(RunCmd),
    /// Create and manage disk images (raw and qcow2), interoperable with
    /// qemu-img.
    Disk {
        #[command(subcommand)]
        command: disk::DiskCommand,
    },
    /// Define a managed VM (stored under $XDG_DATA_HOME/hostvisor/vms/NAME)
    /// with `run`'s options, or on a distribution's cloud image with
    /// --image FILE --cloud-init (docs/cloud-images.md).
    Create {
        name: String,
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        image: cloudinit::ImageArgs,
        #[command(flatten)]
        limits: cgroup::LimitArgs,
    },
    /// List managed VMs and their states.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a VM's definition, state and (when running) counters.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Start a VM in the background (console in its console.log).
    Start { name: String },
    /// Follow a running VM's console; Ctrl-A d detaches.
    Console { name: String },
    /// Stop a VM: ask the guest to power off, kill it after --timeout.
    Stop {
        name: String,
        /// Seconds to wait for the guest (at most a day).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
        timeout: u64,
    },
    /// End a VM at once.
    Kill { name: String },
    /// Pause a running VM (its vCPUs and clock stop).
    Pause { name: String },
    /// Resume a paused VM.
    Resume { name: String },
    /// Change a stopped VM's definition.
    Edit {
        name: String,
        #[command(flatten)]
        changes: manage::EditArgs,
    },
    /// Print a VM's console log; -f follows it while the VM runs.
    Logs {
        name: String,
        #[arg(short, long)]
        follow: bool,
    },
    /// Delete a stopped VM and every file in its directory.
    Delete { name: String },
    /// Take, list, restore and delete a VM's snapshots (a tree).
    Snapshot {
        #[command(subcommand)]
        command: snapshot::cli::SnapshotCommand,
    },
    /// Make a new VM from SRC: a full copy of its disks (flattened), or
    /// with --linked new overlays on a snapshot's frozen disks. The clone
    /// gets its own MAC addresses, vsock CID, hostname and machine id.
    Clone {
        src: String,
        dst: String,
        /// Clone this snapshot's state rather than SRC's current one.
        #[arg(long, value_name = "SNAP")]
        snapshot: Option<String>,
        /// Share SRC's snapshot disks read-only instead of copying them
        /// (takes a snapshot of SRC when --snapshot is not given).
        #[arg(long)]
        linked: bool,
    },
    /// Set a running VM's balloon target (SIZE, like 64M: memory the
    /// guest gives back; 0 deflates it), or show its figures with --stats.
    Balloon {
        name: String,
        #[arg(value_parser = balloon::parse_size, required_unless_present = "stats")]
        size: Option<vmm::MemorySize>,
        /// Show the balloon and the guest's memory statistics (asked for
        /// afresh).
        #[arg(long, conflicts_with = "size")]
        stats: bool,
        #[arg(long, requires = "stats")]
        json: bool,
    },
    /// Run a command in a running VM through its guest agent.
    ///
    /// Exit status: the command's; 128+N if a signal N ended it; 124 it
    /// timed out; 125 hostvisor or the agent failed; 127 it could not be
    /// started.
    Exec {
        name: String,
        /// Kill the command after this many seconds.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Send this terminal's standard input to the command.
        #[arg(short, long)]
        interactive: bool,
        /// An environment variable for the command (repeatable).
        #[arg(short, long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// The command's working directory in the guest.
        #[arg(short, long, value_name = "DIR")]
        workdir: Option<String>,
        /// Seconds to wait for the agent (a VM just started is still
        /// booting).
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        wait: u64,
        /// The command and its arguments (after --).
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Copy a file into or out of a running VM: `cp FILE NAME:PATH` or
    /// `cp NAME:PATH FILE`. A PATH ending in / or a local directory
    /// keeps the file's name; the mode is kept.
    Cp {
        src: String,
        dst: String,
        /// Seconds to wait for the agent.
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        wait: u64,
    },
    /// What the guest agent reports: OS, kernel, addresses, uptime,
    /// memory, clock.
    GuestInfo {
        name: String,
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the agent.
        #[arg(long, value_name = "SECS", default_value_t = 120)]
        wait: u64,
    },
    /// Check the host: KVM and access to it, libslirp, the default guest,
    /// qemu-img, TAP, huge pages, user namespaces. One line a check, with
    /// its fix; exit status 1 when something required is missing.
    Doctor {
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script: `hostvisor completions bash >
    /// /etc/bash_completion.d/hostvisor` (or zsh, fish, elvish,
    /// powershell).
    Completions { shell: clap_complete::Shell },
    /// Write man pages (hostvisor.1 and one per command) into DIR.
    Man { dir: PathBuf },
    /// The process behind a started VM (used by `start`).
    #[command(hide = true)]
    VmProcess {
        name: String,
        /// Resume from this saved state instead of booting.
        #[arg(long, value_name = "DIR")]
        restore: Option<PathBuf>,
    },
}

/// `run`: a VM's options, or a snapshot to resume, and an API socket.
#[derive(Debug, clap::Args)]
struct RunCmd {
    #[command(flatten)]
    vm: RunArgs,
    /// Serve the per-VM HTTP API (docs/api.yaml) on this Unix socket:
    /// pause, resume, snapshot, status.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Resume the VM saved in this snapshot directory (made by `PUT
    /// /vm/snapshot`) instead of booting one; the VM's options come from
    /// the snapshot (only --serial and --api-socket apply).
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "machine", "firmware", "kernel", "initrd", "cmdline", "append", "cpus", "memory", "console",
        "on_reset", "disk", "rng", "hide_cpu_features", "vsock", "net", "balloon", "share",
    ])]
    restore: Option<PathBuf>,
    /// With --restore: read all of guest RAM at once instead of on first
    /// touch (for snapshots on slow or remote storage).
    #[arg(long, requires = "restore")]
    restore_eager: bool,
    /// With --restore: a new qcow2 file for each writable disk of the
    /// snapshot, in order (repeatable). The restored VM writes there, on
    /// top of the snapshot's image, which stays as it was — so the
    /// snapshot restores the same way again.
    #[arg(long, value_name = "FILE", requires = "restore")]
    disk_overlay: Vec<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The VMM threads' seccomp filters: on (a forbidden system call ends
    /// the VM process with a line naming it), log (allowed, logged by the
    /// kernel) or off. Default: on.
    #[arg(long, value_name = "MODE")]
    seccomp: Option<seccomp::SeccompMode>,
    /// The machine: microvm (virtio-mmio, no ACPI: the fastest boot of a
    /// kernel you hand it) or pc (PCI with virtio-pci and MSI-X, ACPI
    /// with a power button: what an OS expects). Default: pc with
    /// --firmware, microvm otherwise.
    #[arg(long, value_name = "TYPE")]
    machine: Option<vmm::MachineType>,
    /// Boot through firmware from the disks: bios (SeaBIOS), uefi (OVMF)
    /// or an image file. Needs a pc machine.
    #[arg(long, value_name = "FIRMWARE")]
    firmware: Option<vmm::firmware::Firmware>,
    /// Kernel image: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line, replacing the default.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Text appended to the kernel command line.
    #[arg(long, value_name = "STR")]
    append: Option<String>,
    /// Number of vCPUs (at most the host's CPU count).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_cpus)]
    cpus: u32,
    /// Guest RAM, like 512M or 2G, then options:
    /// SIZE[,backing=anon|memfd|hugetlb][,prealloc][,lock][,merge] (docs/memory.md).
    #[arg(long, value_name = "SIZE[,OPTIONS]", default_value = "256M", value_parser = parse_memory)]
    memory: MemoryArg,
    /// Where the serial console goes: stdio, file:PATH or none.
    #[arg(long, value_name = "WHERE", default_value = "stdio")]
    serial: SerialConfig,
    /// Which device is the console: serial (ttyS0) or virtio (hvc0).
    #[arg(long, value_name = "DEVICE", default_value = "serial", value_parser = parse_console)]
    console: vmm::ConsoleDevice,
    /// What a guest reset does: shutdown (exit 0) or restart.
    #[arg(long, value_name = "ACTION", default_value = "shutdown", value_parser = parse_reset)]
    on_reset: ResetAction,
    /// A virtual disk: path=FILE[,readonly=on][,cache=writeback|none|unsafe][,format=raw|qcow2][,iops=N][,bps=SIZE] (format probed when not given;
    /// iops and bps cap requests and bytes a second, e.g. bps=10M).
    /// Repeatable; the first is the guest's /dev/vda.
    #[arg(long, value_name = "OPTIONS")]
    disk: Vec<vmm::DiskConfig>,
    /// Give the guest a virtio-rng device (entropy from the host).
    #[arg(long)]
    rng: bool,
    /// CPU features to hide from the guest, comma-separated (e.g. cx16,xsave).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    hide_cpu_features: Vec<String>,
    /// A virtio-vsock device (the guest agent's channel):
    /// cid=N[,socket=PATH][,pool=PORT[:PORT...]] (pool: guest ports whose
    /// connections are opened ahead of time), auto (the agent's port
    /// pooled) or none. Managed VMs get one by default, with a CID no
    /// other managed VM has; `run` only when asked.
    #[arg(long, value_name = "OPTIONS")]
    vsock: Option<VsockArg>,
    /// A NIC: nat[,hostfwd=tcp:127.0.0.1:8080-:80]... (user-mode NAT,
    /// no root), tap=IFNAME (bridged or host-only) or internal=NAME
    /// (VM-to-VM only), each with [,mac=52:54:00:12:34:56] and rate
    /// limits [,bps=SIZE][,pps=N] (bytes and frames a second, each
    /// direction apart). Repeatable:
    /// eth0, eth1, ... Managed VMs get one nat NIC unless given `none`;
    /// `run` gets NICs only when asked.
    #[arg(long, value_name = "OPTIONS")]
    net: Vec<NetArg>,
    /// A virtio-balloon: on (alone: `--balloon`), off (or none), or
    /// [reporting=on|off][,deflate-on-oom=on|off][,stats=on|off|SECONDS].
    /// Free page reporting (on by default) gives memory the guest frees
    /// back to the host. Every VM gets one (all on) unless given off.
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "on")]
    balloon: Option<balloon::BalloonArg>,
    /// A host directory shared with the guest (virtio-fs):
    /// HOSTDIR:TAG[,readonly][,cache=auto|always|never][,owner=UID:GID][,mount=PATH].
    /// Repeatable. The default guest mounts it at /mnt/TAG (or PATH).
    #[arg(long, value_name = "OPTIONS")]
    share: Vec<vmm::ShareConfig>,
    /// Confine the VMM's file access with Landlock: on (default) or off
    /// (for debugging).
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = vmm::sandbox_config::parse_on_off)]
    landlock: bool,
    /// When started as root: run the VM as USER[:GROUP] once TAP devices,
    /// huge pages and /dev/kvm are open.
    #[arg(long, value_name = "USER[:GROUP]")]
    user: Option<vmm::config::UserSpec>,
}

/// `--net`: none, or a NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NetArg {
    None,
    Set(vmm::NetConfig),
}

impl std::str::FromStr for NetArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(NetArg::None),
            _ => s.parse().map(NetArg::Set).map_err(|e| format!("{e}")),
        }
    }
}

/// The NICs `--net` asks for: `None` when it was not given, an empty list
/// for `none`.
pub(crate) fn nics(args: &[NetArg]) -> Result<Option<Vec<vmm::NetConfig>>, CliError> {
    if args.is_empty() {
        return Ok(None);
    }
    if args.contains(&NetArg::None) {
        if args.len() > 1 {
            return Err(CliError::Usage(
                "--net none cannot be combined with other --net options".into(),
            ));
        }
        return Ok(Some(Vec::new()));
    }
    Ok(Some(
        args.iter()
            .filter_map(|a| match a {
                NetArg::Set(n) => Some(n.clone()),
                NetArg::None => None,
            })
            .collect(),
    ))
}

/// `--vsock`: none, auto (a free CID) or a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VsockArg {
    None,
    Auto,
    Set(vmm::VsockConfig),
}

impl std::str::FromStr for VsockArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" | "off" => Ok(VsockArg::None),
            "auto" | "on" => Ok(VsockArg::Auto),
            _ => s
                .parse()
                .map(VsockArg::Set)
                .map_err(|e| format!("{e} (or use auto or none)")),
        }
    }
}

pub(crate) fn parse_cpus(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("a VM needs at least one vCPU".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("give a whole number of vCPUs, like 2".into()),
    }
}

pub(crate) fn parse_console(s: &str) -> Result<vmm::ConsoleDevice, String> {
    match s {
        "serial" => Ok(vmm::ConsoleDevice::Serial),
        "virtio" => Ok(vmm::ConsoleDevice::Virtio),
        _ => Err("use serial or virtio".into()),
    }
}

pub(crate) fn parse_reset(s: &str) -> Result<ResetAction, String> {
    match s {
        "shutdown" => Ok(ResetAction::Shutdown),
        "restart" => Ok(ResetAction::Restart),
        _ => Err("use shutdown or restart".into()),
    }
}

/// Where guest/build.sh puts the default guest.
pub(crate) fn default_guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HOSTVISOR_GUEST_DIR") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("hostvisor/guest")
}

#[derive(Debug)]
pub(crate) enum CliError {
    Usage(String),
    Failure(String),
}

fn vm_config(args: RunArgs) -> Result<VmConfig, CliError> {
    let machine = args.machine.unwrap_or(if args.firmware.is_some() {
        vmm::MachineType::Pc
    } else {
        vmm::MachineType::Microvm
    });
    if args.firmware.is_some() && machine != vmm::MachineType::Pc {
        return Err(CliError::Usage(
            "--firmware needs a pc machine (--machine pc)".into(),
        ));
    }
    let (kernel, initrd) = match args.kernel {
        Some(kernel) => (kernel, args.initrd),
        // A firmware boot boots what is on the disks.
        None if args.firmware.is_some() => (PathBuf::new(), args.initrd),
        None => {
            let dir = default_guest_dir();
            let kernel = dir.join("vmlinux");
            if !kernel.exists() {
                return Err(CliError::Failure(format!(
                    "no --kernel given and the default guest is not built ({} is missing); build it with guest/build.sh from the hostvisor source tree",
                    kernel.display()
                )));
            }
            let initrd = args.initrd.or_else(|| Some(dir.join("initramfs.cpio")));
            (kernel, initrd)
        }
    };
    for feature in &args.hide_cpu_features {
        feature
            .parse::<vmm::CpuFeature>()
            .map_err(|e| CliError::Usage(format!("--hide-cpu-features: {e}")))?;
    }
    let nets = nics(&args.net)?.unwrap_or_default();
    let shares = share::absolute(args.share)?;
    Ok(VmConfig {
        seccomp: args.seccomp.unwrap_or_default(),
        machine,
        firmware: args.firmware,
        nets,
        shares,
        cpus: args.cpus,
        memory: args.memory.size,
        memory_options: args.memory.options.unwrap_or_default(),
        kernel,
        initrd,
        cmdline: args.cmdline,
        append: args.append,
        serial: args.serial,
        console: args.console,
        on_reset: args.on_reset,
        disks: args.disk,
        rng: args.rng,
        hide_cpu_features: args.hide_cpu_features,
        vsock: match args.vsock {
            None | Some(VsockArg::None) => None,
            // A VM of its own: the first guest CID will do.
            Some(VsockArg::Auto) => Some(vmm::VsockConfig {
                cid: 3,
                socket: None,
                pool: vec![agent::AGENT_PORT],
            }),
            Some(VsockArg::Set(v)) => Some(v),
        },
        balloon: balloon::config(args.balloon),
        limits: vmm::config::HostLimits::default(),
        sandbox: vmm::config::SandboxConfig {
            landlock: args.landlock,
            user: args.user,
            allow_backing: block::backing::allowed(),
        },
    })
}

fn describe(err: &VmmError) -> CliError {
    let text = vmm::error_chain(err);
    match err {
        VmmError::Kvm(_) => CliError::Failure(format!(
            "{text}; hostvisor needs KVM (the kvm_intel or kvm_amd module, and access to /dev/kvm): `hostvisor doctor` says what is missing and how to fix it"
        )),
        VmmError::NoCpus
        | VmmError::TooManyCpus { .. }
        | VmmError::MemoryTooSmall(_)
        | VmmError::CpuFeature(_) => CliError::Usage(text),
        _ => CliError::Failure(text),
    }
}

fn run(cmd: RunCmd) -> Result<VmOutcome, CliError> {
    let (landlock, user) = (cmd.vm.landlock, cmd.vm.user.clone());
    let (config, restore) = match &cmd.restore {
        None => (vm_config(cmd.vm)?, None),
        Some(dir) => {
            let load = if cmd.restore_eager {
                vmm::snapshot::Load::Eager
            } else {
                vmm::snapshot::Load::Lazy
            };
            // Read once: the configuration comes from it, and the VMM
            // restores from the same document.
            let spec = vmm::RestoreSpec::read(dir, load).map_err(|e| {
                CliError::Failure(format!("{}: {}", dir.display(), vmm::error_chain(&e)))
            })?;
            let mut config = spec.snapshot.config.clone();
            // The state names files: only those it may, checked before
            // anything is opened or put on top of them.
            sandbox::check_restored(&config, dir)?;
            config.serial = cmd.vm.serial;
            if let Some(mode) = cmd.vm.seccomp {
                config.seccomp = mode;
            }
            overlay_restored_disks(&mut config, &cmd.disk_overlay)?;
            (config, Some(spec))
        }
    };
    let mut config = config;
    if cmd.restore.is_some() {
        // The options that are this run's, not the snapshot's.
        config.sandbox.landlock = landlock;
        config.sandbox.user = user;
    }
    sandbox::enter(&config, cmd.api_socket.as_deref(), cmd.restore.as_deref())?;
    // Before any thread starts: each takes its filter.
    seccomp::enable(config.seccomp).map_err(|e| CliError::Failure(vmm::error_chain(&e)))?;
    if let (Some(_), Some(vsock)) = (&restore, &config.vsock) {
        vmproc::announce_restore(&vsock.socket_path(), None, Vec::new());
    }
    let served = cmd
        .api_socket
        .as_deref()
        .map(|socket| vmproc::serve_unmanaged(&config, socket))
        .transpose()
        .map_err(CliError::Failure)?;
    let result = vmm::run_vm(
        &config,
        served.as_ref().map(|s| &s.control),
        restore.as_ref(),
    );
    if let Some(s) = &served {
        s.ended.store(true, std::sync::atomic::Ordering::Release);
    }
    result.map_err(|e| describe(&e))
}

/// Puts each writable disk of a restored configuration onto a new overlay
/// from `overlays` (one per writable disk, in order), created on top of
/// the snapshot's image.
fn overlay_restored_disks(config: &mut VmConfig, overlays: &[PathBuf]) -> Result<(), CliError> {
    let writable: Vec<&mut vmm::DiskConfig> =
        config.disks.iter_mut().filter(|d| !d.readonly).collect();
    if writable.len() != overlays.len() {
        return Err(CliError::Usage(format!(
            "the snapshot has {} writable disks and {} --disk-overlay files were given: the restored VM writes to an overlay of each, so that the snapshot's images stay as they were",
            writable.len(),
            overlays.len()
        )));
    }
    for (disk, overlay) in writable.into_iter().zip(overlays) {
        // Recorded at the snapshot (never probed from an image the guest
        // wrote to).
        let format = disk.format.ok_or_else(|| {
            CliError::Failure(format!(
                "the snapshot does not say which format {} is",
                disk.path.display()
            ))
        })?;
        block::tools::create_overlay(overlay, &disk.path, format)
            .map_err(|e| CliError::Failure(format!("{}: {e}", overlay.display())))?;
        disk.path = overlay.clone();
        disk.format = Some(block::Format::Qcow2);
    }
    Ok(())
}

/// Writes `hostvisor.1` and `hostvisor-COMMAND.1` (and
/// `hostvisor-disk-COMMAND.1`) for every visible command into `dir`.
fn man_pages(dir: &Path) -> Result<i32, CliError> {
    let fail = |e: std::io::Error| CliError::Failure(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(fail)?;
    clap_mangen::generate_to(Cli::command(), dir).map_err(fail)?;
    Ok(0)
}

/// Prints an error as its one line; returns its exit code.
fn report(e: CliError) -> i32 {
    match e {
        CliError::Usage(msg) => {
            eprintln!("hostvisor: {msg}");
            exit_code::USAGE
        }
        CliError::Failure(msg) => {
            eprintln!("hostvisor: {msg}");
            exit_code::HOSTVISOR_ERROR
        }
    }
}

/// The exit of a command that is not `run`: its code, or its error.
fn exit_with(result: Result<i32, CliError>) -> ! {
    std::process::exit(result.unwrap_or_else(report))
}

fn main() -> ExitCode {
    vmm::mark_process_start();
    memory::overhead::limit_allocator_arenas();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOSTVISOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's first line, without the usage block.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("hostvisor: {first} (see hostvisor --help)");
            return ExitCode::from(exit_code::USAGE as u8);
        }
    };
    block::backing::allow_from_env();
    // Images in the VM store name backing files hostvisor wrote there.
    let _ = block::backing::trust_images_below(&store::root());
    for dir in &cli.allow_backing {
        if let Err(e) = block::backing::allow(dir) {
            return ExitCode::from(report(CliError::Usage(format!(
                "--allow-backing {}: {e}",
                dir.display()
            ))) as u8);
        }
    }
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Disk { command } => exit_with(disk::run(command)),
        Command::Create {
            name,
            mut run,
            image,
            limits,
        } => {
            let vsock = run.vsock.clone();
            let default_nic = run.net.is_empty();
            exit_with(
                cloudinit::Prepared::new(&name, image, &mut run).and_then(|image| {
                    let mut c = vm_config(run)?;
                    limits.apply(&mut c).map_err(CliError::Usage)?;
                    // Named by the user: the overlay may sit on it.
                    if let Some(image) = &image {
                        c.sandbox.allow_backing.push(image.image().to_path_buf());
                    }
                    manage::create(&name, c, vsock, default_nic, image)
                }),
            )
        }
        Command::List { json } => exit_with(manage::list(json)),
        Command::Show { name, json } => exit_with(manage::show(&name, json)),
        Command::Start { name } => exit_with(manage::start(&name)),
        Command::Console { name } => exit_with(manage::console(&name)),
        Command::Stop { name, timeout } => exit_with(manage::stop(&name, timeout)),
        Command::Kill { name } => exit_with(manage::kill(&name)),
        Command::Pause { name } => exit_with(manage::pause(&name, false)),
        Command::Resume { name } => exit_with(manage::pause(&name, true)),
        Command::Edit { name, changes } => exit_with(manage::edit(&name, changes)),
        Command::Logs { name, follow } => exit_with(manage::logs(&name, follow)),
        Command::Delete { name } => exit_with(manage::delete(&name)),
        Command::Snapshot { command } => exit_with(snapshot::cli::run(command)),
        Command::Clone {
            src,
            dst,
            snapshot,
            linked,
        } => exit_with(clone::clone(&src, &dst, snapshot.as_deref(), linked)),
        Command::Exec {
            name,
            timeout,
            interactive,
            env,
            workdir,
            wait,
            command,
        } => std::process::exit(guest::exec(guest::ExecArgs {
            name,
            command,
            env,
            workdir,
            timeout,
            interactive,
            wait,
        })),
        Command::Balloon {
            name,
            size,
            stats,
            json,
        } => exit_with(balloon::run(&name, size, stats, json)),
        Command::Cp { src, dst, wait } => exit_with(guest::cp(&src, &dst, wait)),
        Command::GuestInfo { name, json, wait } => exit_with(guest::guest_info(&name, json, wait)),
        Command::Doctor { json } => exit_with(doctor::run(json)),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "hostvisor",
                &mut std::io::stdout(),
            );
            std::process::exit(0)
        }
        Command::Man { dir } => exit_with(man_pages(&dir)),
        Command::VmProcess { name, restore } => {
            exit_with(vmproc::run(&name, restore.as_deref()).map_err(CliError::Failure))
        }
    };
    let code = match result {
        Ok(outcome) => {
            match &outcome {
                VmOutcome::Crashed(why) => eprintln!("hostvisor: the guest crashed: {why}"),
                VmOutcome::DebugExit(code) if *code != 0 => {
                    eprintln!("hostvisor: the guest reported failure {code} on the debug-exit port")
                }
                VmOutcome::Terminated => eprintln!("hostvisor: VM terminated"),
                _ => {}
            }
            outcome.exit_code()
        }
        Err(e) => report(e),
    };
    ExitCode::from(code as u8)
}
