//! Each backing as the host kernel sees it: the mapping's flags, name and
//! page size in /proc/self/smaps, preallocation's resident set, and the
//! errors for too few huge pages and a low locked-memory limit.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use memory::{Backing, MemoryError, MemoryOptions};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Tests that read their own smaps totals or change the huge-page pool
/// run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// One mapping's entry in /proc/self/smaps.
struct Smaps {
    header: String,
    fields: Vec<(String, String)>,
}

impl Smaps {
    fn of(ptr: *mut u8) -> Smaps {
        let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", ptr as usize);
        let mut lines = text.lines().skip_while(|l| !l.starts_with(&start));
        let header = lines.next().expect("the mapping is in smaps").to_string();
        let fields = lines
            .take_while(|l| !l.contains('-') || l.starts_with("VmFlags"))
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Smaps { header, fields }
    }
    fn get(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
    }
    fn kib(&self, key: &str) -> u64 {
        self.get(key)
            .trim_end_matches(" kB")
            .parse()
            .unwrap_or_else(|_| panic!("{key} in {}", self.header))
    }
    fn flags(&self) -> Vec<&str> {
        self.get("VmFlags").split_whitespace().collect()
    }
}

fn opts(text: &str) -> MemoryOptions {
    text.parse().unwrap()
}

fn make(size: usize, text: &str) -> Result<memory::GuestMemoryMmap, MemoryError> {
    memory::create(&[(GuestAddress(0), size)], &opts(text), &|_, _| {})
}

fn first_ptr(mem: &memory::GuestMemoryMmap) -> *mut u8 {
    mem.iter().next().unwrap().as_ptr()
}

#[test]
fn anon_is_private_named_lazy_and_advised_huge_pages() {
    let mem = make(16 << 20, "").unwrap();
    let smaps = Smaps::of(first_ptr(&mem));
    assert!(!smaps.flags().contains(&"sh"), "{}", smaps.header);
    assert!(!smaps.flags().contains(&"mg"), "KSM is off by default");
    if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
        assert!(
            smaps.flags().contains(&"hg"),
            "MADV_HUGEPAGE: {:?}",
            smaps.flags()
        );
    }
    // Named where the kernel can name anonymous mappings (5.17+).
    if smaps.header.contains("[anon:") {
        assert!(
            smaps.header.contains("[anon:hostvisor-guest-ram]"),
            "{}",
            smaps.header
        );
    }
    // Nothing is populated before the guest touches it.
    assert!(smaps.kib("Rss") < 4096, "{}", smaps.kib("Rss"));
    assert!(mem.iter().next().unwrap().file_offset().is_none());
}

#[test]
fn memfd_is_a_shared_file_the_regions_know() {
    let ranges = [
        (GuestAddress(0), 8 << 20),
        (GuestAddress(16 << 20), 4 << 20),
    ];
    let mem = memory::create(&ranges, &opts("backing=memfd"), &|_, _| {}).unwrap();
    let smaps = Smaps::of(first_ptr(&mem));
    assert!(
        smaps.header.contains("/memfd:hostvisor-guest-ram"),
        "{}",
        smaps.header
    );
    assert!(smaps.flags().contains(&"sh"), "{:?}", smaps.flags());
    // The regions sit back to back in one file, at their file offsets.
    mem.write_slice(b"low", GuestAddress(4096)).unwrap();
    mem.write_slice(b"high", GuestAddress(16 << 20)).unwrap();
    let regions: Vec<_> = mem.iter().collect();
    let (low, high) = (
        regions[0].file_offset().unwrap(),
        regions[1].file_offset().unwrap(),
    );
    assert_eq!((low.start(), high.start()), (0, 8 << 20));
    let mut buf = [0u8; 4];
    high.file().read_exact_at(&mut buf, high.start()).unwrap();
    assert_eq!(&buf, b"high");
    low.file().read_exact_at(&mut buf[..3], 4096).unwrap();
    assert_eq!(&buf[..3], b"low");
    assert_eq!(low.file().metadata().unwrap().len(), 12 << 20);
}

#[test]
fn merge_marks_ram_mergeable() {
    if !std::path::Path::new("/sys/kernel/mm/ksm").exists() {
        let err = make(4 << 20, "merge").unwrap_err();
        assert!(err.to_string().contains("KSM"), "{err}");
        return;
    }
    let mem = make(4 << 20, "merge").unwrap();
    assert!(Smaps::of(first_ptr(&mem)).flags().contains(&"mg"));
}

fn prealloc_fills(backing: &str, threads: Option<usize>) {
    let size = 64usize << 20;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let seen = AtomicU64::new(0);
    let progress = |done: u64, total: u64| {
        assert_eq!(total, size as u64);
        seen.fetch_max(done, Ordering::Relaxed);
    };
    let mem = match threads {
        None => memory::create(
            &[(GuestAddress(0), size)],
            &opts(&format!("{backing},prealloc")),
            &progress,
        )
        .unwrap(),
        Some(n) => {
            let mem =
                memory::create(&[(GuestAddress(0), size)], &opts(backing), &|_, _| {}).unwrap();
            memory::prealloc::populate(&mem, n, &progress).unwrap();
            mem
        }
    };
    // Resident before anything ran in it: all of it.
    let smaps = Smaps::of(first_ptr(&mem));
    assert_eq!(smaps.kib("Rss"), (size >> 10) as u64, "{}", smaps.header);
    assert_eq!(seen.load(Ordering::Relaxed), size as u64);
    // And still zero.
    let mut buf = vec![1u8; 4096];
    mem.read_slice(&mut buf, GuestAddress((size - 4096) as u64))
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn prealloc_makes_anon_ram_resident() {
    prealloc_fills("", None);
}

#[test]
fn prealloc_makes_memfd_ram_resident() {
    prealloc_fills("backing=memfd", None);
}

#[test]
fn prealloc_with_one_thread_does_the_same() {
    prealloc_fills("", Some(1));
}

/// Restores `/proc/sys/vm/nr_hugepages` when dropped.
struct HugePool(Option<String>);

impl Drop for HugePool {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", old);
        }
    }
}

/// Makes sure `pages` 2 MiB pages are free, reserving them when root.
fn huge_pages(pages: u64) -> Option<HugePool> {
    if memory::ram::free_huge_pages() >= pages {
        return Some(HugePool(None));
    }
    let old = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").ok()?;
    let want = old.trim().parse::<u64>().ok()? + pages;
    std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string()).ok()?;
    let pool = HugePool(Some(old));
    (memory::ram::free_huge_pages() >= pages).then_some(pool)
}

#[test]
fn hugetlb_uses_2mib_pages_or_fails_clearly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Too few pages: a clear error naming the sysctl, and nothing mapped.
    let short = (memory::ram::free_huge_pages() + 1) * (2 << 20);
    let err = make(short as usize, "backing=hugetlb").unwrap_err();
    assert!(matches!(err, MemoryError::HugePages { .. }), "{err:?}");
    assert!(
        err.to_string().contains("/proc/sys/vm/nr_hugepages"),
        "{err}"
    );
    // A size that is not whole huge pages.
    let err = make((4 << 20) + 4096, "backing=hugetlb").unwrap_err();
    assert!(err.to_string().contains("multiple of 2 MiB"), "{err}");

    let Some(_pool) = huge_pages(4) else {
        assert!(
            std::env::var_os("HOSTVISOR_REQUIRE_HUGEPAGES").is_none(),
            "HOSTVISOR_REQUIRE_HUGEPAGES is set but no 2 MiB huge pages can be reserved"
        );
        println!("SKIPPED: no free 2 MiB huge pages (reserve some in /proc/sys/vm/nr_hugepages)");
        return;
    };
    let mem = make(4 << 20, "backing=hugetlb,prealloc").unwrap();
    let smaps = Smaps::of(first_ptr(&mem));
    assert_eq!(smaps.get("KernelPageSize"), "2048 kB", "{}", smaps.header);
    assert!(smaps.flags().contains(&"ht"), "{:?}", smaps.flags());
    assert_eq!(smaps.kib("Private_Hugetlb"), 4096);
    assert_eq!(opts("backing=hugetlb").backing, Backing::Hugetlb);
}

#[test]
fn lock_pins_ram() {
    // Root may lock any amount; others within RLIMIT_MEMLOCK (8 MiB by
    // default), which 4 MiB fits.
    let mem = match make(4 << 20, "lock") {
        Ok(mem) => mem,
        Err(MemoryError::Lock { .. }) => {
            println!("SKIPPED: RLIMIT_MEMLOCK below 4 MiB here");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let smaps = Smaps::of(first_ptr(&mem));
    assert!(smaps.flags().contains(&"lo"), "{:?}", smaps.flags());
    assert_eq!(smaps.kib("Locked"), 4096);
}

const LOCK_CHILD: &str = "HOSTVISOR_TEST_LOCK_CHILD";

/// Run in a child (below): with a 64 KiB RLIMIT_MEMLOCK and no
/// CAP_IPC_LOCK, `lock` fails with the limit named.
#[test]
fn lock_child() {
    if std::env::var_os(LOCK_CHILD).is_none() {
        return;
    }
    // Drop every capability of this thread (root's CAP_IPC_LOCK would
    // ignore the limit); mlock checks the calling thread's.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    let lim = libc::rlimit {
        rlim_cur: 64 << 10,
        rlim_max: 64 << 10,
    };
    // SAFETY: plain syscalls on structs that live across them.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim), 0);
        assert_eq!(libc::syscall(libc::SYS_capset, &header, data.as_ptr()), 0);
    }
    let err = make(4 << 20, "lock").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, MemoryError::Lock { .. }), "{err:?}");
    assert!(text.contains("RLIMIT_MEMLOCK"), "{text}");
    assert!(text.contains("ulimit -l"), "{text}");
    assert!(text.contains("64 KiB"), "{text}");
    println!("LOCK-ERROR-OK: {text}");
}

#[test]
fn lock_below_the_limit_fails_with_a_clear_error() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "lock_child", "--nocapture", "--test-threads=1"])
        .env(LOCK_CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("LOCK-ERROR-OK"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
