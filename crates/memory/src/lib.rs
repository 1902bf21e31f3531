//! Guest RAM: the one guest-memory type of the workspace (so that the
//! hypervisor, the platform code and the devices agree on it without
//! depending on each other), and how it is made — its backing (anonymous,
//! memfd, hugetlb), preallocation, locking and KSM; and the VMM's own
//! memory beside it (`overhead`).

pub mod options;
pub mod overhead;
pub mod prealloc;
pub mod ram;

pub use options::{Backing, MemoryOptions, OptionsError};
pub use ram::{create, MemoryError, RAM_NAME};

pub mod discard;

/// Guest RAM: host `mmap` regions, from vm-memory.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
