//! The one guest-memory type of the workspace, so that the hypervisor,
//! the platform code and the devices agree on it without depending on each
//! other.

pub mod discard;

/// Guest RAM: host `mmap` regions, from vm-memory.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
