//! `--share` on `run`, `create` and `edit`: shares name existing host
//! directories by absolute path (a managed VM starts from another working
//! directory), and each tag once.

use crate::CliError;

/// `shares` with each host directory made absolute and checked.
pub(crate) fn absolute(shares: Vec<vmm::ShareConfig>) -> Result<Vec<vmm::ShareConfig>, CliError> {
    let mut out: Vec<vmm::ShareConfig> = Vec::with_capacity(shares.len());
    for mut share in shares {
        let path = std::fs::canonicalize(&share.path)
            .map_err(|e| CliError::Usage(format!("--share: {}: {e}", share.path.display())))?;
        if !path.is_dir() {
            return Err(CliError::Usage(format!(
                "--share: {} is not a directory",
                path.display()
            )));
        }
        if out.iter().any(|s| s.tag == share.tag) {
            return Err(CliError::Usage(format!(
                "--share: the tag {} is given twice",
                share.tag
            )));
        }
        share.path = path;
        out.push(share);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_become_absolute_and_tags_unique() {
        let here = std::env::current_dir().unwrap();
        let s: vmm::ShareConfig = ".:here".parse().unwrap();
        let out = absolute(vec![s.clone()]).unwrap();
        assert_eq!(out[0].path, std::fs::canonicalize(&here).unwrap());
        assert!(absolute(vec![s.clone(), s]).is_err(), "tag twice");
        let missing: vmm::ShareConfig = "/no/such/dir/hv:x".parse().unwrap();
        assert!(absolute(vec![missing]).is_err());
        let file: vmm::ShareConfig = "/etc/hostname:x".parse().unwrap();
        assert!(absolute(vec![file]).is_err());
    }
}
