//! The VMM's errors.

use std::path::PathBuf;

use crate::config::MemorySize;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("KVM is not usable")]
    Kvm(#[source] hypervisor::HypervisorError),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    #[error(transparent)]
    Arch(#[from] arch::ArchError),
    #[error("a VM needs at least one vCPU")]
    NoCpus,
    #[error("{requested} vCPUs requested, but at most {max} are possible ({why})")]
    TooManyCpus {
        requested: u32,
        max: u32,
        why: &'static str,
    },
    #[error("{} of memory is too small; a VM needs at least {}", MemorySize(*.0), MemorySize(arch::layout::MIN_MEMORY))]
    MemoryTooSmall(u64),
    #[error("cannot allocate guest memory: {0}")]
    GuestMemory(String),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error("unknown CPU feature to hide")]
    CpuFeature(#[from] arch::cpuid::UnknownFeature),
    #[error("cannot open the serial output file {path}")]
    SerialFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("device bus")]
    Bus(#[from] devices::BusError),
    #[error(transparent)]
    Disk(#[from] block::BlockError),
    #[error("vsock device")]
    Vsock(#[from] devices::virtio::vsock::VsockError),
    #[error("shared directory")]
    Share(#[from] devices::virtio::fs::FsError),
    #[error(transparent)]
    ShareConfig(#[from] crate::config::ShareConfigError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("no interrupt line is left for another device")]
    TooManyDevices,
    #[error("virtio device: {0}")]
    Virtio(String),
    #[error("ACPI tables: {0}")]
    Acpi(String),
    #[error("firmware {0}")]
    Firmware(String),
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(String),
    #[error("sandbox")]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}

/// "outer: inner: innermost" for an error and its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chains_do_not_repeat() {
        let e = VmmError::SerialFile {
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let text = error_chain(&e);
        assert!(
            text.starts_with("cannot open the serial output file /x: No such file"),
            "{text}"
        );
    }
}
