//! `hostvisor run`'s side of the sandbox (docs/security.md): what a
//! restored snapshot may name, and confining the process before it starts
//! threads.

use std::path::Path;

use vmm::config::VmConfig;

use crate::CliError;

/// Refuses a state file in `dir` whose configuration names files outside
/// where it may (`vmm::restore_paths`); allows backing files where it may
/// name files (an overlay kept inside the snapshot's directory on a disk
/// beside it).
pub fn check_restored(config: &VmConfig, dir: &Path) -> Result<(), CliError> {
    vmm::restore_paths::check(config, dir, &[crate::default_guest_dir()])
        .map_err(|e| CliError::Failure(format!("{}: {}", dir.display(), vmm::error_chain(&e))))?;
    for root in dir
        .canonicalize()
        .iter()
        .flat_map(|d| [d.as_path(), d.parent().unwrap_or(d)])
    {
        let _ = block::backing::allow(root);
    }
    Ok(())
}

/// Confines this process before it starts threads: the VM's files, the
/// API socket's directory (where the API's snapshots go), and the
/// snapshot restored from.
pub fn enter(
    config: &VmConfig,
    api_socket: Option<&Path>,
    restore: Option<&Path>,
) -> Result<(), CliError> {
    let mut extra = vmm::sandbox::Extra::default();
    if let Some(dir) = api_socket.and_then(Path::parent) {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        extra.read_write.push(dir.to_path_buf());
    }
    extra.read.extend(restore.map(Path::to_path_buf));
    vmm::sandbox::enter(config, &extra)
        .map(drop)
        .map_err(|e| CliError::Failure(vmm::error_chain(&e)))
}
