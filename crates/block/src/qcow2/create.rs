//! Creating new, empty images.

use super::{check, header, Qcow2Error};
use crate::file::{to_index, Storage};
use header::Header;

/// Creation parameters for a new image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_bits: u32,
    pub version: u32,
    pub refcount_order: u32,
    /// Backing file name as stored, and its format.
    pub backing: Option<(String, String)>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_bits: 16,
            version: 3,
            refcount_order: 4,
            backing: None,
        }
    }
}

/// Writes a new, empty qcow2 image onto empty `storage`.
pub fn create(storage: &dyn Storage, opts: &CreateOptions) -> Result<(), Qcow2Error> {
    if !(9..=21).contains(&opts.cluster_bits) {
        return Err(Qcow2Error::Invalid(
            "the cluster size must be a power of two from 512 bytes to 2 MiB".into(),
        ));
    }
    if opts.version == 2 && opts.refcount_order != 4 {
        return Err(Qcow2Error::Invalid(
            "version 2 images have 16-bit refcounts".into(),
        ));
    }
    if opts.refcount_order > 6 {
        return Err(Qcow2Error::Invalid("refcount bits go up to 64".into()));
    }
    let cs = 1u64 << opts.cluster_bits;
    let l1_size = header::l1_entries_for(opts.size, opts.cluster_bits)?;
    let l1_clusters = (u64::from(l1_size) * 8).div_ceil(cs).max(1);
    let h = Header {
        version: opts.version,
        cluster_bits: opts.cluster_bits,
        size: opts.size,
        l1_size,
        l1_table_offset: cs,
        refcount_table_offset: 0,
        refcount_table_clusters: 0,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: opts.refcount_order,
        header_length: if opts.version == 3 {
            header::V3_HEADER_LEN
        } else {
            header::V2_HEADER_LEN
        },
        compression_type: 0,
        backing_file: opts.backing.as_ref().map(|(name, _)| name.clone()),
        backing_format: opts.backing.as_ref().map(|(_, format)| format.clone()),
        feature_names: Vec::new(),
        other_extensions: Vec::new(),
    };
    let bytes = h.serialize()?;
    storage.set_len(0)?;
    storage.write_at(&bytes, 0)?;
    storage.set_len((1 + l1_clusters) * cs)?;
    let refs = vec![1u32; to_index(1 + l1_clusters)?];
    check::write_refcounts_from(storage, &h, &refs)?;
    storage.sync()?;
    Ok(())
}
