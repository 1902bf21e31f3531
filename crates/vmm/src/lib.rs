//! The virtual machine monitor: turns a [`VmConfig`] into a running VM and
//! reports how it ended.
//!
//! Modules depend on each other in one direction only (`lib` only
//! re-exports): `run` → `machine` → {`persist`, `reopen`, `pc`, `firmware`, `builder`, `pci_window`, `vcpu`,
//! `control`, `console_input`} → {`event`, `console`, `panic_watch`} →
//! {`request`, `snapshot`, `shared`, `error`, `outcome`, `config`} →
//! {`share_config`, `sandbox_config`}.

#![warn(clippy::cast_possible_truncation)]

pub mod builder;
pub mod config;
pub mod console;
pub mod console_input;
pub mod control;
pub mod error;
pub mod event;
pub mod firmware;
pub mod machine;
pub mod outcome;
pub mod panic_watch;
pub mod pc;
pub mod pci_window;
pub mod persist;
pub mod reopen;
pub mod request;
pub mod restore_paths;
pub mod run;
pub mod sandbox;
pub mod sandbox_config;
pub mod share_config;
pub mod shared;
pub mod snapshot;
pub mod vcpu;

/// A CPU feature that can be hidden from the guest (`hide_cpu_features`).
pub use arch::cpuid::{CpuFeature, UnknownFeature};
/// The least guest RAM a VM can have.
pub use arch::layout::MIN_MEMORY;
pub use config::{
    BalloonConfig, ConsoleDevice, DiskConfig, MachineType, MemorySize, NetConfig, NetMode,
    ResetAction, SerialConfig, ShareCache, ShareConfig, VmConfig, VsockConfig,
};
pub use error::{error_chain, VmmError};
pub use event::VmmEvent;
pub use machine::{Machine, MachineSpec, RunEnd, RunOptions};
pub use outcome::{exit_code, VmOutcome};
pub use run::{
    default_cmdline, ephemeral_mac, host_hidden_features, mark_process_start, open_hypervisor, run,
    run_controlled, run_vm,
};
pub use snapshot::{RestoreSpec, SnapshotRequest, VmSnapshot};
