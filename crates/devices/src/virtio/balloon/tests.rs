use std::sync::Arc;
use std::time::Duration;

use memory::GuestMemoryMmap;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::queues::*;
use super::*;
use crate::test_util::{desc as d, F_NEXT, F_WRITE};
use crate::virtio::mmio::persist::MmioTransportState;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::Interrupt;

const MIB: u64 = 1 << 20;

/// 4 MiB of RAM, then a hole, then 1 MiB at 8 MiB.
fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20), (GuestAddress(8 * MIB), 1 << 20)])
        .unwrap()
}

fn irq() -> (Interrupt, EventFd) {
    let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    (Interrupt::new(line.try_clone().unwrap()), line)
}

fn pfns(list: &[u32]) -> Vec<u8> {
    list.iter().flat_map(|p| p.to_le_bytes()).collect()
}

fn stat(tag: u16, value: u64) -> Vec<u8> {
    let mut v = tag.to_le_bytes().to_vec();
    v.extend(value.to_le_bytes());
    v
}

fn read(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn page_numbers_sort_merge_and_dedup() {
    assert_eq!(
        pfn_ranges(&pfns(&[5, 3, 4, 4, 9, 3])),
        vec![(3 << 12, 3 << 12), (9 << 12, 1 << 12)]
    );
    // A trailing partial number is ignored.
    let mut b = pfns(&[1]);
    b.extend([7, 7]);
    assert_eq!(pfn_ranges(&b), vec![(1 << 12, 1 << 12)]);
    assert!(pfn_ranges(&[]).is_empty());
    // The top page number does not overflow.
    assert_eq!(
        pfn_ranges(&pfns(&[u32::MAX, u32::MAX - 1])),
        vec![((u64::from(u32::MAX) - 1) << 12, 2 << 12)]
    );
    // At most MAX_PFNS numbers are taken from a buffer.
    let many: Vec<u32> = (0..(MAX_PFNS as u32 + 100)).collect();
    let runs = pfn_ranges(&pfns(&many));
    assert_eq!(runs, vec![(0, (MAX_PFNS as u64) << 12)]);
}

#[test]
fn statistics_parse_and_malformed_buffers_do_no_harm() {
    let mut b = Vec::new();
    for (tag, v) in [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5 << 20), (5, 256 << 20)] {
        b.extend(stat(tag, v));
    }
    b.extend(stat(6, 100 << 20));
    b.extend(stat(7, 10 << 20));
    b.extend(stat(999, 7)); // unknown
    b.extend(stat(6, 101 << 20)); // twice: the last counts
    b.extend([1, 2, 3]); // a partial entry
    let s = parse_stats(&b);
    assert_eq!(s.swap_in, Some(1));
    assert_eq!(s.minor_faults, Some(4));
    assert_eq!(s.total_memory, Some(256 << 20));
    assert_eq!(s.available_memory, Some(101 << 20));
    assert_eq!(s.disk_caches, Some(10 << 20));
    assert_eq!(s.hugetlb_allocations, None);
    assert_eq!(parse_stats(&[]), GuestStats::default());
    assert_eq!(parse_stats(&[0xff; 9]), GuestStats::default());
    // Entries past MAX_STATS are not read.
    let mut long = stat(8, 1).repeat(MAX_STATS);
    long.extend(stat(9, 5));
    assert_eq!(parse_stats(&long).hugetlb_failures, None);
}

/// Inflated pages are given back (the guest reads zeros); page numbers
/// outside RAM, in the hole or at the top of the 32-bit range, and
/// duplicates do no harm and are counted.
#[test]
fn inflate_releases_ram_and_skips_what_is_not_ram() {
    let m = mem();
    m.write_slice(&[0xaa; 3 * 4096], GuestAddress(0x200000))
        .unwrap();
    m.write_slice(&[0xbb; 4096], GuestAddress(8 * MIB)).unwrap();
    let list = pfns(&[0x200, 0x201, 0x201, 0x3ff, 0x800, u32::MAX, 0x400]);
    m.write_slice(&list, GuestAddress(0x1000)).unwrap();
    let mock = MockSplitQueue::new(&m, 16);
    mock.build_desc_chain(&[d(0x1000, list.len() as u32, 0, 0)])
        .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let (irq, line) = irq();
    let mut c = BalloonCounters::default();
    process_pfns(&mut q, &m, &irq, true, &mut c);
    assert_eq!(read(&m, 0x200000, 2 * 4096), vec![0; 2 * 4096]);
    assert_eq!(read(&m, 0x202000, 4096), vec![0xaa; 4096], "not inflated");
    assert_eq!(read(&m, 8 * MIB, 4096), vec![0; 4096]);
    assert_eq!(c.inflated_pages, 6, "duplicates count once");
    // 0x400 (4 MiB, the hole) and u32::MAX are not RAM.
    assert_eq!(c.refused, 2);
    assert_eq!(c.released_bytes, 4 * 4096);
    assert_eq!(mock.used().idx().load(), 1);
    assert_eq!(line.read().unwrap(), 1);

    // Deflating only counts.
    m.write_slice(&[0xcc; 4096], GuestAddress(0x300000))
        .unwrap();
    let list = pfns(&[0x300, 0x300]);
    m.write_slice(&list, GuestAddress(0x1000)).unwrap();
    let mock = MockSplitQueue::new(&m, 16);
    mock.build_desc_chain(&[d(0x1000, 8, 0, 0)]).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    process_pfns(&mut q, &m, &irq, false, &mut c);
    assert_eq!(c.deflated_pages, 1);
    assert_eq!(read(&m, 0x300000, 4096), vec![0xcc; 4096]);
}

/// Buffers outside RAM or of absurd sizes end that buffer's read only.
#[test]
fn hostile_inflate_buffers_complete_without_harm() {
    let m = mem();
    m.write_slice(&[0x11; 4096], GuestAddress(0x200000))
        .unwrap();
    // The giant buffer names that page first, but cannot be read whole.
    m.write_slice(&pfns(&[0x200]), GuestAddress(0x3ff000))
        .unwrap();
    let mock = MockSplitQueue::new(&m, 16);
    mock.build_multiple_desc_chains(&[
        d(0xffff_ffff_f000, 64, 0, 0),
        d(0x3ff000, u32::MAX, 0, 0),
        d(0x2000, 16, F_WRITE, 0),
    ])
    .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let (irq, _line) = irq();
    let mut c = BalloonCounters::default();
    process_pfns(&mut q, &m, &irq, true, &mut c);
    assert_eq!(mock.used().idx().load(), 3);
    // The giant buffer reads past RAM's end: nothing of it is taken.
    assert_eq!(c.inflated_pages, 0);
    assert!(read(&m, 0x200000, 4096) == vec![0x11; 4096]);
}

#[test]
fn reported_ranges_are_checked_whole() {
    let m = mem();
    m.write_slice(&vec![0x77; 4 * MIB as usize], GuestAddress(0))
        .unwrap();
    let mock = MockSplitQueue::new(&m, 16);
    // One report of three ranges (Linux hands them device-writable), then
    // a misaligned one, one crossing RAM's end into the hole, one of
    // 4 GiB, and one at the top of the address space.
    mock.build_multiple_desc_chains(&[
        d(0x100000, 0x10000, F_WRITE | F_NEXT, 1),
        d(0x200000, 0x1000, F_WRITE | F_NEXT, 2),
        d(8 * MIB, 0x2000, F_WRITE, 0),
        d(0x300800, 0x1000, F_WRITE, 0),
        d(0x3ff000, 0x2000, F_WRITE, 0),
        d(0, u32::MAX - 0xfff, F_WRITE, 0),
        d(0xffff_ffff_ffff_f000, 0x1000, F_WRITE, 0),
    ])
    .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let (irq, _line) = irq();
    let mut c = BalloonCounters::default();
    process_reports(&mut q, &m, &irq, &mut c);
    assert_eq!(mock.used().idx().load(), 5);
    assert_eq!(read(&m, 0x100000, 0x10000), vec![0; 0x10000]);
    assert_eq!(read(&m, 0x200000, 0x1000), vec![0; 0x1000]);
    assert_eq!(read(&m, 0x300000, 0x2000), vec![0x77; 0x2000]);
    assert_eq!(read(&m, 0x3ff000, 0x1000), vec![0x77; 0x1000]);
    assert_eq!(c.released_bytes, 0x10000 + 0x1000 + 0x2000);
    assert_eq!(c.refused, 4);
}

/// A hostile guest reporting the same pages twice, in one report and in
/// two, and ranges that overlap: each range is released (again: a no-op
/// for the host) and counted as reported, nothing outside the ranges is
/// touched, the pages stay usable guest RAM, and no more is counted
/// released than was reported.
#[test]
fn duplicate_and_overlapping_reports_do_no_harm() {
    let m = mem();
    m.write_slice(&vec![0x5a; 4 * MIB as usize], GuestAddress(0))
        .unwrap();
    let mock = MockSplitQueue::new(&m, 16);
    // One report naming 0x100000..0x102000 twice and a range overlapping
    // it, then a second report of the same pages and of the last page of
    // RAM's first region twice.
    mock.build_multiple_desc_chains(&[
        d(0x100000, 0x2000, F_WRITE | F_NEXT, 1),
        d(0x100000, 0x2000, F_WRITE | F_NEXT, 2),
        d(0x101000, 0x2000, F_WRITE, 0),
        d(0x100000, 0x3000, F_WRITE | F_NEXT, 4),
        d(0x3ff000, 0x1000, F_WRITE | F_NEXT, 5),
        d(0x3ff000, 0x1000, F_WRITE, 0),
    ])
    .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let (irq, line) = irq();
    let mut c = BalloonCounters::default();
    process_reports(&mut q, &m, &irq, &mut c);
    assert_eq!(mock.used().idx().load(), 2);
    assert_eq!(line.read().unwrap(), 1);
    assert_eq!(read(&m, 0x100000, 0x3000), vec![0; 0x3000]);
    assert_eq!(read(&m, 0x3ff000, 0x1000), vec![0; 0x1000]);
    // Around the ranges, the guest's data is as it was.
    assert_eq!(read(&m, 0xff000, 0x1000), vec![0x5a; 0x1000]);
    assert_eq!(read(&m, 0x103000, 0x1000), vec![0x5a; 0x1000]);
    assert_eq!(read(&m, 0x3fe000, 0x1000), vec![0x5a; 0x1000]);
    let reported = 3 * 0x2000 + 0x3000 + 2 * 0x1000;
    assert_eq!(c.reported_bytes, reported);
    assert_eq!(c.released_bytes, reported, "each range released once");
    assert_eq!(c.refused, 0);
    // The released pages are guest RAM still: written, they read back.
    m.write_slice(&[0x33; 0x3000], GuestAddress(0x100000))
        .unwrap();
    assert_eq!(read(&m, 0x100000, 0x3000), vec![0x33; 0x3000]);
}

/// A flood of statistics buffers: each is parsed, only the newest is held,
/// the others go back at once; a request returns the held one.
#[test]
fn statistics_flood_holds_one_buffer() {
    let m = mem();
    for i in 0..8u64 {
        m.write_slice(&stat(4, i << 20), GuestAddress(0x1000 + i * 0x100))
            .unwrap();
    }
    let mock = MockSplitQueue::new(&m, 16);
    let chains: Vec<_> = (0..8u64)
        .map(|i| d(0x1000 + i * 0x100, STAT_LEN as u32, 0, 0))
        .collect();
    mock.build_multiple_desc_chains(&chains).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let (irq, _line) = irq();
    let mut held = None;
    let mut seen = Vec::new();
    process_stats(&mut q, &m, &irq, &mut held, &mut |s| {
        seen.push(s.free_memory.unwrap())
    });
    assert_eq!(seen.len(), 8);
    assert_eq!(seen[7], 7 << 20);
    assert_eq!(mock.used().idx().load(), 7);
    assert_eq!(held, Some(7));
    assert!(request_stats(&mut q, &m, &irq, &mut held));
    assert_eq!(mock.used().idx().load(), 8);
    assert!(!request_stats(&mut q, &m, &irq, &mut held));
}

#[test]
fn config_space_has_the_target_and_the_guests_actual() {
    let (mut b, handle) = Balloon::new(BalloonOptions::default(), 256 * MIB).unwrap();
    handle.set_target(64 * MIB + 100).unwrap();
    assert_eq!(
        handle.set_target(257 * MIB),
        Err(BalloonError::TooLarge {
            target: 257 * MIB,
            ram: 256 * MIB
        })
    );
    let mut c = [0u8; 8];
    b.read_config(0, &mut c);
    assert_eq!(u32::from_le_bytes(c[..4].try_into().unwrap()), 16384);
    b.write_config(4, &1000u32.to_le_bytes());
    // The target is the host's; writes beyond the space are ignored.
    b.write_config(0, &7u32.to_le_bytes());
    b.write_config(6, &[1, 2, 3, 4]);
    b.write_config(u64::MAX, &[1]);
    let s = handle.status();
    assert_eq!(s.target_bytes, 64 * MIB);
    assert_eq!(s.actual_bytes, 1000 * 4096);
    // One byte of actual.
    b.write_config(5, &[1]);
    assert_eq!(
        handle.status().actual_bytes,
        (1000 & !0xff00 | 0x100) * 4096
    );
    assert_eq!(
        b.features(),
        1 << F_STATS_VQ | 1 << F_DEFLATE_ON_OOM | 1 << F_REPORTING
    );
    assert_eq!(b.queue_max_sizes().len(), 4);
    let (b, _) = Balloon::new(
        BalloonOptions {
            reporting: false,
            stats: false,
            deflate_on_oom: false,
            stats_interval: None,
        },
        MIB,
    )
    .unwrap();
    assert_eq!((b.features(), b.queue_max_sizes().len()), (0, 2));
    // Without a statistics queue, asking for fresh ones does not wait.
    let (_, plain) = Balloon::new(
        BalloonOptions {
            stats: false,
            ..BalloonOptions::default()
        },
        MIB,
    )
    .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(plain.fresh_status(Duration::from_secs(5)).stats, None);
    assert!(started.elapsed() < Duration::from_secs(1));
}

// Through the transport: activation, a target's config interrupt, the
// statistics round trip, and save → restore → save.

fn transport(device: Balloon, m: &GuestMemoryMmap) -> MmioTransport {
    let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    MmioTransport::new(Box::new(device), m.clone(), Arc::new(Interrupt::new(line))).unwrap()
}

fn all_features() -> u64 {
    BalloonOptions::default().features()
}

#[test]
fn a_running_balloon_saves_and_restores_with_its_held_buffer() {
    let m = mem();
    let queues: Vec<_> = (0..4u64)
        .map(|i| MockSplitQueue::create(&m, GuestAddress(0x10000 + i * 0x10000), 16))
        .collect();
    let refs: Vec<_> = queues.iter().collect();
    let (dev, handle) = Balloon::new(BalloonOptions::default(), 9 * MIB).unwrap();
    let mut t = transport(dev, &m);
    crate::test_util::set_up_driver(&mut t, &refs, &[16; 4], all_features());
    // The guest's first statistics.
    let mut first = stat(6, 100 << 20);
    first.extend(stat(5, 200 << 20));
    m.write_slice(&first, GuestAddress(0x80000)).unwrap();
    queues[2]
        .add_desc_chains(&[d(0x80000, 20, 0, 0)], 0)
        .unwrap();
    t.queue_events()[2].write(1).unwrap();
    assert!(handle.wait_for(Duration::from_secs(5), |s| s.stats.is_some()));
    assert_eq!(handle.status().stats.unwrap().total_memory, Some(200 << 20));
    // A report through queue 3 (reporting follows statistics).
    m.write_slice(&[9; 4096], GuestAddress(0x100000)).unwrap();
    queues[3]
        .add_desc_chains(&[d(0x100000, 4096, F_WRITE, 0)], 0)
        .unwrap();
    t.queue_events()[3].write(1).unwrap();
    assert!(
        handle.wait_for(Duration::from_secs(5), |s| s.counters.released_bytes
            == 4096)
    );
    assert_eq!(read(&m, 0x100000, 4096), vec![0; 4096]);
    handle.set_target(2 * MIB).unwrap();
    crate::BusDevice::write(&mut t, 0, 0x100 + 4, &512u32.to_le_bytes());

    t.sleep().unwrap();
    let saved = t.save_state().unwrap();
    let json = serde_json::to_string(&saved).unwrap();
    let back: MmioTransportState = serde_json::from_str(&json).unwrap();
    let VirtioDeviceState::Balloon(bs) = &saved.device else {
        panic!("{:?}", saved.device)
    };
    assert_eq!((bs.target_pages, bs.actual_pages), (512, 512));
    assert_eq!(bs.stats_head, Some(0), "the statistics buffer is held");
    assert_eq!(bs.counters.released_bytes, 4096);

    let (dev2, handle2) = Balloon::new(BalloonOptions::default(), 9 * MIB).unwrap();
    let mut t2 = transport(dev2, &m);
    t2.restore(&back).unwrap();
    t2.sleep().unwrap();
    let again = t2.save_state().unwrap();
    assert_eq!(
        serde_json::to_string(&again).unwrap(),
        json,
        "save → restore → save"
    );
    t2.wake().unwrap();
    assert_eq!(handle2.status().target_bytes, 2 * MIB);
    // The restored device returns the buffer the saved one held.
    let used_before = queues[2].used().idx().load();
    let _ = handle2.fresh_status(Duration::from_millis(10));
    assert!(crate::test_util::wait_for(
        || queues[2].used().idx().load() == used_before + 1
    ));
    let entry = queues[2].used().ring().ref_at(0).unwrap().load();
    assert_eq!(entry.id(), 0);

    // A balloon offering other features refuses the state.
    let (dev3, _) = Balloon::new(
        BalloonOptions {
            reporting: false,
            ..BalloonOptions::default()
        },
        9 * MIB,
    )
    .unwrap();
    let mut t3 = transport(dev3, &m);
    assert!(t3.restore(&back).is_err());
}

/// A driver that accepts fewer queue features than offered does not get
/// a device whose queues it numbered differently.
#[test]
fn activation_needs_the_offered_queue_features() {
    let m = mem();
    let (mut dev, _) = Balloon::new(BalloonOptions::default(), 9 * MIB).unwrap();
    let queues: Vec<_> = (0..4)
        .map(|_| {
            (
                <Queue as virtio_queue::QueueT>::new(16).unwrap(),
                EventFd::new(0).unwrap(),
            )
        })
        .collect();
    let (irq, _line) = irq();
    let err = dev
        .activate(Activation {
            mem: m,
            interrupt: Arc::new(irq),
            queues,
            acked_features: 1 << F_REPORTING,
        })
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueCount { .. }), "{err}");
}

#[test]
fn a_hostile_saved_state_is_refused() {
    let (mut dev, _) = Balloon::new(BalloonOptions::default(), 4 * MIB).unwrap();
    let too_big = persist::BalloonState {
        features: all_features(),
        target_pages: 2000,
        ..Default::default()
    };
    assert!(dev
        .restore_state(&VirtioDeviceState::Balloon(too_big))
        .is_err());
    let (mut plain, _) = Balloon::new(
        BalloonOptions {
            stats: false,
            ..BalloonOptions::default()
        },
        4 * MIB,
    )
    .unwrap();
    let held = persist::BalloonState {
        features: plain.features(),
        stats_head: Some(3),
        ..Default::default()
    };
    assert!(plain
        .restore_state(&VirtioDeviceState::Balloon(held))
        .is_err());
}
