//! Times preallocating guest RAM, for bench/memory.py:
//! `prealloc SIZE_MIB THREADS [BACKING]` prints `prealloc_ms=N`.

use std::time::Instant;

use vm_memory::GuestAddress;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = || -> ! {
        eprintln!("usage: prealloc SIZE_MIB THREADS [anon|memfd|hugetlb]");
        std::process::exit(2)
    };
    let (Some(mib), Some(threads)) = (
        args.get(1).and_then(|s| s.parse::<usize>().ok()),
        args.get(2).and_then(|s| s.parse::<usize>().ok()),
    ) else {
        usage()
    };
    let backing = args.get(3).map_or("anon", String::as_str);
    let opts: memory::MemoryOptions = match format!("backing={backing}").parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            usage()
        }
    };
    let mem = match memory::create(&[(GuestAddress(0), mib << 20)], &opts, &|_, _| {}) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1)
        }
    };
    let start = Instant::now();
    if let Err(e) = memory::prealloc::populate(&mem, threads, &|_, _| {}) {
        eprintln!("{e}");
        std::process::exit(1)
    }
    println!("prealloc_ms={:.1}", start.elapsed().as_secs_f64() * 1e3);
}
