//! The x86_64 platform of hostvisor guests: where things live in guest
//! physical memory ([`layout`]), how a Linux kernel is loaded and entered
//! ([`boot`], [`regs`]), what CPUID the guest sees ([`cpuid`]) and how it
//! finds its CPUs ([`mptable`]).

#![cfg(target_arch = "x86_64")]

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;

pub use hypervisor::GuestMemoryMmap;

/// Errors of platform setup.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("cannot read the kernel {path}")]
    ReadKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Linux kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel { path: String },
    #[error("cannot load the kernel {path}: {reason}")]
    LoadKernel { path: String, reason: String },
    #[error("cannot read the initrd {path}")]
    ReadInitrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the initrd ({size} bytes) does not fit in guest RAM below {limit:#x} after the kernel; give the VM more memory")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("the kernel command line is {len} bytes; the guest kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("guest memory of {0} bytes is too small to boot (at least 16 MiB)")]
    MemoryTooSmall(u64),
    #[error("{count} vCPUs do not fit in the MP table (at most {max})")]
    TooManyCpus { count: u32, max: u32 },
    #[error("cannot write boot data into guest memory at {addr:#x}")]
    GuestMemory { addr: u64 },
}

pub type Result<T> = std::result::Result<T, ArchError>;
