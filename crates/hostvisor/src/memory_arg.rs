//! `--memory SIZE[,backing=anon|memfd|hugetlb][,prealloc][,lock][,merge]`
//! for `run`, `create` and `edit`.

use vmm::config::MemorySize;

/// `--memory SIZE[,OPTIONS]`: the options are `None` when only a size is
/// given (so `edit --memory 1G` keeps a VM's backing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemoryArg {
    pub size: MemorySize,
    pub options: Option<memory::MemoryOptions>,
}

pub(crate) fn parse_memory(s: &str) -> Result<MemoryArg, String> {
    let (size, options) = match s.split_once(',') {
        Some((size, options)) => (size, Some(options)),
        None => (s, None),
    };
    let size: MemorySize = size
        .parse()
        .map_err(|e: vmm::config::SizeError| e.to_string())?;
    let min = MemorySize(vmm::MIN_MEMORY);
    if size < min {
        return Err(format!("{size} is too small; a VM needs at least {min}"));
    }
    let options = options
        .map(|o| o.parse::<memory::MemoryOptions>())
        .transpose()
        .map_err(|e| e.to_string())?;
    if let Some(o) = &options {
        o.check_size(size.bytes()).map_err(|e| e.to_string())?;
    }
    Ok(MemoryArg { size, options })
}

#[cfg(test)]
mod tests {
    use super::*;
    use memory::Backing;

    #[test]
    fn a_size_alone_still_works_and_leaves_options_unset() {
        let arg = parse_memory("256M").unwrap();
        assert_eq!(arg.size, MemorySize::mib(256));
        assert_eq!(arg.options, None);
    }

    #[test]
    fn options_follow_the_size() {
        let arg = parse_memory("2G,backing=memfd,prealloc,lock,merge").unwrap();
        assert_eq!(arg.size, MemorySize(2 << 30));
        let o = arg.options.unwrap();
        assert_eq!(o.backing, Backing::Memfd);
        assert!(o.prealloc && o.lock && o.merge);
        let arg = parse_memory("512M,backing=hugetlb").unwrap();
        assert_eq!(arg.options.unwrap().backing, Backing::Hugetlb);
    }

    #[test]
    fn bad_combinations_are_refused_clearly() {
        let err = parse_memory("257M,backing=hugetlb").unwrap_err();
        assert!(err.contains("multiple of 2 MiB"), "{err}");
        let err = parse_memory("256M,swap=on").unwrap_err();
        assert!(err.contains("unknown memory option `swap=on`"), "{err}");
        let err = parse_memory("256M,backing=pmem").unwrap_err();
        assert!(err.contains("anon, memfd or hugetlb"), "{err}");
        let err = parse_memory("lots,prealloc").unwrap_err();
        assert!(err.contains("invalid size"), "{err}");
        let err = parse_memory("1M,prealloc").unwrap_err();
        assert!(err.contains("too small"), "{err}");
    }
}
