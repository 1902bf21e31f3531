//! Running a VM from its configuration: opening KVM, the host's
//! defaults (command line, hidden CPU features), and the boot loop that
//! restarts a VM on reset when asked.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

use arch::cpuid::CpuFeature;
use hypervisor::kvm::KvmHypervisor;
use hypervisor::{HostProfile, Hypervisor};

use crate::config::{ConsoleDevice, ResetAction, SerialConfig, VmConfig};
use crate::console::RawTerminal;
use crate::console_input::StdinConsole;
use crate::control::VmControl;
use crate::error::VmmError;
use crate::machine::{Machine, MachineSpec, RunEnd, RunOptions};
use crate::outcome::VmOutcome;
use crate::snapshot::RestoreSpec;

/// The address of NIC `index` of a VM whose configuration names none: one
/// of its own for this run (`hostvisor` stores one per managed VM, which
/// stays the same across its runs).
pub fn ephemeral_mac(index: usize) -> net::MacAddr {
    let boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // NICs are few; the index only varies the derived address.
    let index = u32::try_from(index).unwrap_or(u32::MAX);
    net::MacAddr::for_vm(&format!("{}-{boot}", std::process::id()), index)
}

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Records when the process started, for timing logs. Call first in main.
pub fn mark_process_start() {
    let _ = PROCESS_START.set(Instant::now());
}

/// The kernel command line hostvisor uses when none is given. (No
/// `pci=off`: the machine has a PCI root with a host bridge, and without
/// one Linux calls the missing config space "Fatal".)
///
/// On hosts that emulate guest kernel mode (nested PVM), it adds what such
/// a guest needs: features the emulator cannot execute are cleared
/// (`noxsave`, `clearcpuid=`) and costly work is skipped (`quiet`: every
/// console byte is an exit there). A VM that can be paused (a managed
/// one) also keeps time with kvmclock there (`clocksource=kvm-clock`): its
/// TSC is the host's and cannot be held back, so only kvmclock lets a
/// paused guest's clock stand still. (It costs ~2 s of boot on PVM, so
/// VMs that cannot be paused go without.)
pub fn default_cmdline(profile: HostProfile, console: ConsoleDevice, pausable: bool) -> String {
    let console = match console {
        ConsoleDevice::Serial => "console=ttyS0",
        ConsoleDevice::Virtio => "console=hvc0",
    };
    let mut args = vec![console, "reboot=k", "panic=-1"];
    if profile.emulated_cpl0 {
        args.extend([
            "quiet",
            "noxsave",
            "clearcpuid=cx16,erms,fsrm,popcnt,smap",
            "random.trust_cpu=on",
            "percpu_alloc=page",
            "rodata=off",
        ]);
        if pausable {
            args.push("clocksource=kvm-clock");
        }
    }
    args.join(" ")
}

/// CPU features hidden on this host whatever the configuration says.
///
/// On emulated-CPL0 (PVM) hosts the KVM paravirtual send-IPI hypercall
/// never reaches the target vCPU, so secondary CPUs hang in bring-up;
/// without the feature Linux sends IPIs through the LAPIC, which works.
pub fn host_hidden_features(profile: HostProfile) -> Vec<CpuFeature> {
    if profile.emulated_cpl0 {
        vec!["pv-send-ipi"
            .parse()
            .expect("pv-send-ipi is a known feature")]
    } else {
        Vec::new()
    }
}

fn serial_output(config: &SerialConfig) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match config {
        SerialConfig::Stdio => Box::new(std::io::stdout()),
        SerialConfig::None => Box::new(std::io::sink()),
        SerialConfig::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    })
}

/// Opens KVM.
pub fn open_hypervisor() -> Result<KvmHypervisor, VmmError> {
    KvmHypervisor::new().map_err(VmmError::Kvm)
}

/// Loads the kernel `config` names, with its command line.
fn boot_linux(
    hv: &KvmHypervisor,
    machine: &mut Machine,
    config: &VmConfig,
    pausable: bool,
) -> Result<(), VmmError> {
    let cmdline = kernel_cmdline(hv, config, pausable);
    tracing::debug!(%cmdline, "booting");
    machine.load_linux(&config.kernel, config.initrd.as_deref(), &cmdline)
}

/// The kernel command line `config` asks for.
fn kernel_cmdline(hv: &KvmHypervisor, config: &VmConfig, pausable: bool) -> String {
    let mut cmdline = match &config.cmdline {
        Some(c) => c.clone(),
        None => {
            let mut line = default_cmdline(hv.host_profile(), config.console, pausable);
            if config.machine == crate::config::MachineType::Microvm {
                // The default guest's kernel has ACPI for pc machines; a
                // microvm has no tables, which Linux would report as a
                // firmware bug ("A valid RSDP was not found").
                line.push_str(" acpi=off");
            }
            line
        }
    };
    for share in &config.shares {
        cmdline.push(' ');
        cmdline.push_str(&share.cmdline_param());
    }
    if let Some(extra) = &config.append {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    cmdline
}

/// Boots the VM `config` describes and runs it to the end, rebooting it on
/// reset when `on_reset = restart`. Prints the assist counts at the end.
pub fn run(config: &VmConfig) -> Result<VmOutcome, VmmError> {
    run_controlled(config, None)
}

/// As [`run`], with a handle through which another thread controls the VM.
pub fn run_controlled(
    config: &VmConfig,
    control: Option<&VmControl>,
) -> Result<VmOutcome, VmmError> {
    run_vm(config, control, None)
}

/// As [`run_controlled`]; with `restore`, the VM resumes from that
/// snapshot (which must fit `config`: same vCPUs, RAM and devices) instead
/// of booting; a reset after that boots it as usual.
pub fn run_vm(
    config: &VmConfig,
    control: Option<&VmControl>,
    restore: Option<&RestoreSpec>,
) -> Result<VmOutcome, VmmError> {
    if let Some(from) = restore {
        from.snapshot.check_fits(config)?;
    }
    if config.firmware.is_some() && config.machine != crate::config::MachineType::Pc {
        return Err(VmmError::Firmware(
            "boots need a pc machine (--machine pc)".into(),
        ));
    }
    // no_new_privs and the SIGSYS handler; threads take their filters.
    seccomp::enable(config.seccomp)?;
    let mut restore = restore.map(|from| (from, &from.snapshot));
    let started = *PROCESS_START.get_or_init(Instant::now);
    let hv = open_hypervisor()?;
    let mut hidden = config
        .hide_cpu_features
        .iter()
        .map(|f| f.parse())
        .collect::<Result<Vec<_>, _>>()?;
    for feature in host_hidden_features(hv.host_profile()) {
        if !hidden.contains(&feature) {
            hidden.push(feature);
        }
    }
    let _raw = match config.serial {
        SerialConfig::Stdio => RawTerminal::enter(),
        _ => None,
    };
    // One console input thread for every boot of this VM (dropping it
    // stops it).
    let stdin = match config.serial {
        SerialConfig::Stdio => Some(StdinConsole::start().map_err(VmmError::Thread)?),
        _ => None,
    };
    // Chosen once, so a rebooting guest keeps its addresses; a restored
    // guest keeps the ones it had unless the configuration names one.
    let macs: Vec<net::MacAddr> = match &restore {
        Some((_, snap)) => config
            .nets
            .iter()
            .zip(&snap.macs)
            .map(|(nic, saved)| match nic.mac {
                Some(mac) => Ok(mac),
                None => saved.parse(),
            })
            .collect::<Result<_, _>>()
            .map_err(|e| {
                crate::snapshot::SnapshotError::Mismatch(format!("a bad MAC address: {e}"))
            })?,
        None => config
            .nets
            .iter()
            .enumerate()
            .map(|(i, nic)| nic.mac.unwrap_or_else(|| ephemeral_mac(i)))
            .collect(),
    };
    loop {
        if stdin.as_ref().is_some_and(|s| s.exit_requested()) {
            // `Ctrl-A x` between two boots.
            return Ok(VmOutcome::Terminated);
        }
        let (uart_out, virtio_out) = match config.console {
            ConsoleDevice::Serial => (serial_output(&config.serial)?, None),
            ConsoleDevice::Virtio => (
                serial_output(&SerialConfig::None)?,
                Some(serial_output(&config.serial)?),
            ),
        };
        let spec = MachineSpec {
            cpus: config.cpus,
            memory: config.memory.bytes(),
            memory_options: config.memory_options,
            hidden_features: hidden.clone(),
            serial_out: uart_out,
        };
        let from = restore.take();
        let mut machine = match &from {
            Some((spec_from, snap)) => Machine::for_restore(&hv, spec, spec_from, snap)?,
            None => Machine::new(&hv, spec)?,
        };
        if config.machine == crate::config::MachineType::Pc {
            machine.make_pc(from.and_then(|(_, snap)| snap.devices.legacy.acpi_pm.as_ref()))?;
        }
        if let (Some(firmware), Some(_)) = (&config.firmware, &from) {
            machine.map_firmware(&firmware.image())?;
        }
        let (devices, disks) = crate::builder::configured_devices(config, &macs)?;
        for device in devices {
            machine.add_virtio_device(device)?;
        }
        if let Some(balloon) = &config.balloon {
            machine.add_balloon(balloon)?;
        }
        machine.attach_disks(disks);
        if let Some(out) = virtio_out {
            machine.add_virtio_console(out)?;
        }
        machine.describe(config.clone(), macs.clone());
        if let Some((_, snap)) = from {
            machine.restore_state(snap)?;
            tracing::info!(target: "hostvisor::timing",
                "restored at {:.3} ms", started.elapsed().as_secs_f64() * 1e3);
        } else if let Some(firmware) = &config.firmware {
            let cmdline = kernel_cmdline(&hv, config, control.is_some());
            let kernel = (!config.kernel.as_os_str().is_empty()).then(|| {
                crate::firmware::KernelForFirmware {
                    kernel: &config.kernel,
                    initrd: config.initrd.as_deref(),
                    cmdline: &cmdline,
                }
            });
            machine.load_firmware(&firmware.image(), kernel)?;
        } else {
            boot_linux(&hv, &mut machine, config, control.is_some())?;
        }
        // What needs root is open now: switch user (once; a reboot
        // builds the next machine as that user).
        crate::sandbox::after_setup()?;
        let stats = machine.stats();
        let RunEnd { outcome, stuck } = machine.run_with(RunOptions {
            started,
            control,
            stdin: stdin.as_ref(),
        })?;
        let assists = stats.assist_counts();
        if !assists.is_empty() {
            let list: Vec<String> = assists.iter().map(|(n, c)| format!("{n} x{c}")).collect();
            eprintln!(
                "\r\nhostvisor: instructions completed for KVM: {}",
                list.join(", ")
            );
        }
        tracing::debug!(
            exits = stats.exits.load(std::sync::atomic::Ordering::Relaxed),
            unhandled = stats
                .unhandled_accesses
                .load(std::sync::atomic::Ordering::Relaxed),
            ?outcome,
            "VM ended"
        );
        if outcome == VmOutcome::Reset && config.on_reset == ResetAction::Restart {
            if stuck.is_empty() {
                continue;
            }
            // What is stuck would be stuck again (console output nobody
            // reads) and would pile up with every boot.
            eprintln!(
                "\r\nhostvisor: not restarting the VM: {} did not stop",
                stuck.join(", ")
            );
        }
        return Ok(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_command_line_depends_on_the_host() {
        let native = HostProfile {
            emulated_cpl0: false,
        };
        assert_eq!(
            default_cmdline(native, ConsoleDevice::Serial, true),
            "console=ttyS0 reboot=k panic=-1"
        );
        assert!(default_cmdline(native, ConsoleDevice::Virtio, false).starts_with("console=hvc0 "));
        assert!(host_hidden_features(native).is_empty());
        let pvm = HostProfile {
            emulated_cpl0: true,
        };
        let line = default_cmdline(pvm, ConsoleDevice::Serial, false);
        assert!(
            line.contains("noxsave") && line.contains("clearcpuid=cx16"),
            "{line}"
        );
        assert!(!line.contains("clocksource"));
        assert!(
            default_cmdline(pvm, ConsoleDevice::Serial, true).ends_with(" clocksource=kvm-clock")
        );
        assert!(
            !line.contains("nopv"),
            "SMP works through the CPUID fix instead"
        );
        let hidden: Vec<_> = host_hidden_features(pvm).iter().map(|f| f.name()).collect();
        assert_eq!(hidden, ["pv-send-ipi"]);
    }
}
