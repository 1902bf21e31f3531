//! vCPU and VM state on real KVM: a tiny 64-bit guest counts in a
//! register, an SSE register and memory, reporting each step on a port;
//! it is saved part-way and restored into a second VM that has a copy of
//! its memory, where it must go on counting from exactly where it stopped.
//! Also: save → restore → save gives the same state, and malformed states
//! are refused with an error.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use std::sync::Arc;

use hypervisor::kvm::KvmHypervisor;
use hypervisor::state::{FpuContext, Msr, MSR_IA32_TSC, MSR_KVM_SYSTEM_TIME_NEW, XSAVE_MIN_WORDS};
use hypervisor::x86::{CR0_ET, CR0_NE, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};
use hypervisor::{
    DescriptorTable, GuestMemoryMmap, Hypervisor, HypervisorError, SegmentRegister, Vcpu,
    VcpuState, Vm, VmExit, VmState,
};
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const MEM_SIZE: usize = 4 << 20;
const GDT: u64 = 0x1000;
const PML4: u64 = 0x2000;
const PDPT: u64 = 0x3000;
const PD: u64 = 0x4000;
const CODE: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STACK: u64 = 0x30_0000;
const PORT: u16 = 0x510;
/// Where the guest's TSC starts (far from the host's, so a TSC that was
/// not restored shows).
const BOOT_TSC: u64 = 1 << 30;
/// MSRs the harness gives the guest values to carry: STAR, LSTAR,
/// KERNEL_GS_BASE, and kvmclock's system time (enabled, on a page of
/// guest RAM).
const GUEST_MSRS: [(u32, u64); 4] = [
    (0xc000_0081, 0x0023_0010_0000_0000),
    (0xc000_0082, 0xffff_8000_1234_5000),
    (0xc000_0102, 0x5000),
    (MSR_KVM_SYSTEM_TIME_NEW, (DATA + 0x1000) | 1),
];
/// Where the guest's kvmclock starts (a fresh VM's starts at zero).
const BOOT_CLOCK_NS: u64 = 1000 * 1_000_000_000;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;

/// A test that cannot run here: prints `SKIPPED: why`, or fails when
/// HOSTVISOR_REQUIRE_KVM=1 (as CI sets it).
fn kvm() -> Option<KvmHypervisor> {
    match KvmHypervisor::new() {
        Ok(hv) => Some(hv),
        Err(e) => {
            let why = format!("KVM is unusable here: {e}");
            if std::env::var("HOSTVISOR_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{why}, but HOSTVISOR_REQUIRE_KVM=1 requires this test to run");
            }
            eprintln!("SKIPPED: {why} (set HOSTVISOR_REQUIRE_KVM=1 to make this a failure)");
            None
        }
    }
}

/// The guest: counts forever. Each round starts by reading the round's
/// number from PORT (the host counts the reads), then reports three values
/// on PORT, `count * 4 + kind`: kind 1 from RBX (plus the difference
/// between the number read and RBX, so a read lost or repeated across a
/// restore shows), kind 2 from XMM0, kind 3 from a counter in memory at
/// DATA. Between rounds, XMM0 is the only place its
/// count lives (spilled to scratch memory and reloaded to be incremented),
/// so the XSAVE area must carry it. Only the SSE moves KVM's instruction
/// emulator knows are used: hosts that emulate guest kernel mode (nested
/// PVM) run this code through it.
fn guest_code() -> Vec<u8> {
    let scratch = 16;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut round = a.create_label();
    a.xor(ebx, ebx).unwrap();
    a.mov(rdi, DATA).unwrap();
    a.mov(qword_ptr(rdi + scratch), rbx).unwrap();
    a.mov(qword_ptr(rdi + scratch + 8), rbx).unwrap();
    a.movdqu(xmm0, xmmword_ptr(rdi + scratch)).unwrap();
    a.mov(edx, u32::from(PORT)).unwrap();
    a.set_label(&mut round).unwrap();
    a.inc(rbx).unwrap();
    a.in_(eax, dx).unwrap();
    a.sub(eax, ebx).unwrap();
    a.lea(eax, ptr(rax + rbx * 4 + 1)).unwrap();
    a.out(dx, eax).unwrap();
    a.movdqu(xmmword_ptr(rdi + scratch), xmm0).unwrap();
    a.inc(qword_ptr(rdi + scratch)).unwrap();
    a.movdqu(xmm0, xmmword_ptr(rdi + scratch)).unwrap();
    a.mov(qword_ptr(rdi + scratch), 0).unwrap();
    a.movdqu(xmmword_ptr(rdi + scratch), xmm0).unwrap();
    a.mov(rax, qword_ptr(rdi + scratch)).unwrap();
    a.shl(eax, 2).unwrap();
    a.or(eax, 2).unwrap();
    a.out(dx, eax).unwrap();
    a.inc(qword_ptr(rdi)).unwrap();
    a.mov(rax, qword_ptr(rdi)).unwrap();
    a.shl(eax, 2).unwrap();
    a.or(eax, 3).unwrap();
    a.out(dx, eax).unwrap();
    a.jmp(round).unwrap();
    a.assemble(CODE).unwrap()
}

/// The `n`-th value (from 0) the guest reports.
fn expected(n: u32) -> u32 {
    (n / 3 + 1) * 4 + n % 3 + 1
}

struct TestVm {
    vm: Arc<dyn Vm>,
    vcpu: Box<dyn Vcpu>,
    mem: GuestMemoryMmap,
    /// How many times the guest read PORT (a device's state, which the
    /// VMM would save alongside).
    reads: u32,
    /// The CPUID the vCPU was given.
    cpuid: hypervisor::CpuId,
}

/// A VM with `mem` as its RAM, its platform devices, and one vCPU with
/// the host's CPUID.
fn new_vm(hv: &KvmHypervisor, mem: GuestMemoryMmap) -> TestVm {
    new_vm_with(hv, mem, &hv.supported_cpuid().unwrap())
}

/// As [`new_vm`], the vCPU with `cpuid`.
fn new_vm_with(hv: &KvmHypervisor, mem: GuestMemoryMmap, cpuid: &hypervisor::CpuId) -> TestVm {
    let vm = hv.create_vm().unwrap();
    for (slot, region) in (0u32..).zip(mem.iter()) {
        // SAFETY: the region belongs to `mem`, which TestVm keeps for as
        // long as the VM exists.
        unsafe {
            vm.map_memory(
                slot,
                region.start_addr().0,
                region.len(),
                region.as_ptr() as u64,
            )
        }
        .unwrap();
    }
    vm.create_platform_devices().unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    vcpu.set_cpuid(cpuid).unwrap();
    TestVm {
        vm,
        vcpu,
        mem,
        reads: 0,
        cpuid: cpuid.clone(),
    }
}

fn segment(selector: u16, type_: u8, l: u8, db: u8) -> SegmentRegister {
    SegmentRegister {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// A fresh VM at the guest's first instruction, in 64-bit mode on
/// identity-mapped 2 MiB pages.
fn boot(hv: &KvmHypervisor) -> TestVm {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let gdt: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT + 8 * i as u64))
            .unwrap();
    }
    mem.write_obj(PDPT | 3, GuestAddress(PML4)).unwrap();
    mem.write_obj(PD | 3, GuestAddress(PDPT)).unwrap();
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))
            .unwrap();
    }
    mem.write_slice(&guest_code(), GuestAddress(CODE)).unwrap();
    let mut t = new_vm(hv, mem);
    let mut sregs = t.vcpu.sregs().unwrap();
    let code = segment(0x8, 0xb, 1, 0);
    let data = segment(0x10, 0x3, 0, 1);
    (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) =
        (code, data, data, data, data, data);
    sregs.tr = SegmentRegister {
        type_: 0xb,
        s: 0,
        limit: 0x67,
        g: 0,
        db: 0,
        selector: 0x18,
        ..data
    };
    sregs.gdt = DescriptorTable {
        base: GDT,
        limit: 31,
        ..Default::default()
    };
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = PML4;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    t.vcpu.set_sregs(&sregs).unwrap();
    let regs = hypervisor::StandardRegisters {
        rip: CODE,
        rsp: STACK,
        rflags: 2,
        ..Default::default()
    };
    t.vcpu.set_regs(&regs).unwrap();
    let msrs: Vec<hypervisor::MsrEntry> = GUEST_MSRS
        .iter()
        .chain(&[(MSR_IA32_TSC, BOOT_TSC)])
        .map(|&(index, data)| hypervisor::MsrEntry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    t.vcpu.set_msrs(&msrs).unwrap();
    t.vm.set_clock(BOOT_CLOCK_NS).unwrap();
    t
}

/// Runs until the guest has reported `n` more values; returns them.
fn run_reports(t: &mut TestVm, n: usize) -> Vec<u32> {
    let mut got = Vec::new();
    while got.len() < n {
        if let Some(value) = step(t) {
            got.push(value);
        }
    }
    got
}

/// Runs until the guest reads PORT, and answers it: the vCPU then stops
/// with that IN half done (KVM stores the data in RAX on the next run).
fn run_to_read(t: &mut TestVm) {
    let reads = t.reads;
    while t.reads == reads {
        assert_eq!(step(t), None, "a report before the read");
    }
}

/// One exit: returns a reported value. Instructions the accelerator
/// cannot emulate (nested PVM) go through hostvisor's assists, as in the
/// VMM.
fn step(t: &mut TestVm) -> Option<u32> {
    let failure = match t.vcpu.run().unwrap() {
        VmExit::IoOut { port, data } if port == PORT => {
            return Some(u32::from_le_bytes(data.try_into().unwrap()));
        }
        VmExit::IoIn { port, data } if port == PORT => {
            t.reads += 1;
            data.copy_from_slice(&t.reads.to_le_bytes()[..data.len()]);
            return None;
        }
        VmExit::Interrupted => {
            t.vcpu.clear_kick();
            return None;
        }
        VmExit::EmulationFailure(failure) => failure,
        other => panic!("unexpected exit {other:?}"),
    };
    hypervisor::assist::complete(t.vcpu.as_mut(), &t.mem, &failure).unwrap();
    None
}

/// Finishes the instruction of the last exit, as a VMM does before saving.
fn complete(t: &mut TestVm) {
    // The guest does no string I/O, so one call completes everything.
    match t.vcpu.complete_pending_io().unwrap() {
        VmExit::Interrupted => {}
        other => panic!("unexpected exit {other:?} while completing I/O"),
    }
    t.vcpu.clear_kick();
}

fn copy_memory(mem: &GuestMemoryMmap) -> GuestMemoryMmap {
    let copy = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut buf = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    copy.write_slice(&buf, GuestAddress(0)).unwrap();
    copy
}

fn save(t: &TestVm) -> (VcpuState, VmState) {
    (t.vcpu.save_state().unwrap(), t.vm.save_state().unwrap())
}

/// A second VM with a copy of `from`'s memory and the saved state (the
/// vCPU given the saved CPUID, as a snapshot restore does).
fn restore(hv: &KvmHypervisor, from: &TestVm, state: &(VcpuState, VmState)) -> TestVm {
    let cpuid = state
        .0
        .saved_cpuid()
        .unwrap()
        .expect("the state has the CPUID");
    let mut t = new_vm_with(hv, copy_memory(&from.mem), &cpuid);
    t.reads = from.reads;
    t.vm.restore_state(&state.1).unwrap();
    t.vcpu.restore_state(&state.0).unwrap();
    t
}

#[test]
fn a_guest_continues_in_a_second_vm_from_where_it_was_saved() {
    let Some(hv) = kvm() else { return };
    let mut first = boot(&hv);
    // Two whole rounds and the read of the third: the vCPU stops with the
    // read half done, which completing must finish (or the restored guest
    // would lose the value read, or read again).
    let before = run_reports(&mut first, 6);
    assert_eq!(before, (0..6).map(expected).collect::<Vec<_>>());
    run_to_read(&mut first);
    complete(&mut first);
    let state = save(&first);
    // The CPUID the vCPU was given is saved, leaf for leaf (what it was
    // given, not what the host supports now: that can differ from one
    // call to the next, in per-CPU fields).
    let given: Vec<_> = first
        .cpuid
        .as_slice()
        .iter()
        .map(hypervisor::state::CpuidEntry::from_kvm)
        .collect();
    assert_eq!(state.0.cpuid.as_ref(), Some(&given));
    assert!(
        state.0.regs.rip > CODE && state.0.regs.rbx == 3,
        "saved mid-round: {:?}",
        state.0.regs
    );
    let mut second = restore(&hv, &first, &state);
    let after = run_reports(&mut second, 8);
    assert_eq!(
        after,
        (6..14).map(expected).collect::<Vec<_>>(),
        "the restored guest must report the values that follow {before:?}"
    );
    // The first VM, untouched by the restore, goes on the same way.
    assert_eq!(run_reports(&mut first, 2), vec![expected(6), expected(7)]);
}

fn msr(state: &VcpuState, index: u32) -> Option<u64> {
    state.msrs.iter().find(|m| m.index == index).map(|m| m.data)
}

/// What may legitimately move between two saves of one stopped guest:
/// the TSC (it counts host time whether or not the vCPU runs), the
/// kvmclock, and the PIT's last-load timestamp (host time, set anew when
/// the PIT is restored). Returns both states with those fields cleared,
/// as JSON.
fn without_moving_parts(vcpu: &VcpuState, vm: &VmState) -> serde_json::Value {
    let mut vcpu = vcpu.clone();
    for m in &mut vcpu.msrs {
        if m.index == MSR_IA32_TSC {
            m.data = 0;
        }
    }
    let mut vm = vm.clone();
    vm.clock_ns = 0;
    for channel in &mut vm.pit.channels {
        channel.count_load_time = 0;
    }
    serde_json::json!({ "vcpu": vcpu, "vm": vm })
}

/// The fields (`vcpu.regs`, `vm.pit`, an MSR by index) where two states
/// differ, for a readable failure.
fn differences(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    for part in ["vcpu", "vm"] {
        for (key, value) in a[part].as_object().unwrap() {
            if *value == b[part][key] {
                continue;
            }
            if key == "msrs" {
                let (x, y) = (value.as_array().unwrap(), b[part][key].as_array().unwrap());
                let moved = x.iter().filter(|m| !y.contains(m)).map(|m| m.to_string());
                out.extend(moved.map(|m| format!("{part}.msrs: {m}")));
                out.extend(
                    (x.len() != y.len())
                        .then(|| format!("{part}.msrs: count {} vs {}", x.len(), y.len())),
                );
            } else {
                out.push(format!("{part}.{key}"));
            }
        }
    }
    out
}

#[test]
fn save_restore_save_gives_the_same_state() {
    let Some(hv) = kvm() else { return };
    let mut first = boot(&hv);
    run_reports(&mut first, 5);
    complete(&mut first);
    let state = save(&first);
    let second = restore(&hv, &first, &state);
    let again = save(&second);

    let a = without_moving_parts(&state.0, &state.1);
    let b = without_moving_parts(&again.0, &again.1);
    assert_eq!(
        differences(&a, &b),
        Vec::<String>::new(),
        "the state changed across a restore"
    );
    assert_eq!(a.to_string(), b.to_string());

    for (index, data) in GUEST_MSRS {
        assert_eq!(msr(&again.0, index), Some(data), "MSR {index:#x}");
    }
    // The moving parts were restored too: they went on from the saved
    // values (a fresh VM's start elsewhere), by no more than the few
    // seconds this test takes.
    let tsc = (
        msr(&state.0, MSR_IA32_TSC).unwrap(),
        msr(&again.0, MSR_IA32_TSC).unwrap(),
    );
    let khz = u64::from(state.0.tsc_khz.unwrap_or(1_000_000));
    let settable = tsc.0 >= BOOT_TSC && tsc.0 - BOOT_TSC < 30 * khz * 1000;
    if settable {
        assert!(
            tsc.1 >= tsc.0 && tsc.1 - tsc.0 < 30 * khz * 1000,
            "TSC {tsc:?}"
        );
    } else {
        // The host ignored the TSC written at boot (nested PVM: its
        // guests read the host's TSC), so restoring cannot set it either.
        eprintln!("this host's KVM does not let the TSC be set: TSC not compared");
    }
    let clock = (state.1.clock_ns, again.1.clock_ns);
    assert!(clock.0 >= BOOT_CLOCK_NS, "kvmclock {clock:?}");
    assert!(
        clock.1 >= clock.0 && clock.1 - clock.0 < 30_000_000_000,
        "kvmclock {clock:?}"
    );
    // And the whole state survives its encoding.
    let json = serde_json::to_string(&state.0).unwrap();
    assert_eq!(serde_json::from_str::<VcpuState>(&json).unwrap(), state.0);
    let json = serde_json::to_string(&state.1).unwrap();
    assert_eq!(serde_json::from_str::<VmState>(&json).unwrap(), state.1);
}

fn assert_refused(t: &mut TestVm, state: &VcpuState, what: &str) {
    match t.vcpu.restore_state(state) {
        Err(e) => eprintln!("{what}: refused: {e}"),
        Ok(()) => panic!("{what}: restored without error"),
    }
}

#[test]
fn malformed_states_are_refused_with_an_error() {
    let Some(hv) = kvm() else { return };
    let mut first = boot(&hv);
    run_reports(&mut first, 2);
    complete(&mut first);
    let (good, good_vm) = save(&first);
    let mut t = new_vm(&hv, copy_memory(&first.mem));
    t.reads = first.reads;

    let mut s = good.clone();
    s.fpu = FpuContext::Xsave(vec![0; XSAVE_MIN_WORDS - 1]);
    assert_refused(&mut t, &s, "a short XSAVE area");
    // Longer than any area this host's KVM exchanges (at most 64 KiB
    // passes validation; the host's own size is the real bound).
    let mut s = good.clone();
    s.fpu = FpuContext::Xsave(vec![0; 16 * 1024]);
    assert_refused(&mut t, &s, "an XSAVE area larger than the host's");

    let mut s = good.clone();
    s.mp_state = 1234;
    assert_refused(&mut t, &s, "a bogus MP state");

    let mut s = good.clone();
    s.msrs = (0..5000).map(|i| Msr { index: i, data: 0 }).collect();
    assert_refused(&mut t, &s, "too many MSRs");

    let mut s = good.clone();
    s.msrs.push(Msr {
        index: 0xdead_beef,
        data: 1,
    });
    match t.vcpu.restore_state(&s) {
        Err(HypervisorError::InvalidState(why)) => {
            assert!(why.contains("0xdeadbeef"), "{why}")
        }
        other => panic!("an MSR KVM does not know: {other:?}"),
    }

    // Paging on without protected mode: KVM refuses the sregs.
    let mut s = good.clone();
    s.sregs.cr0 = CR0_PG;
    assert_refused(&mut t, &s, "paging without protected mode");

    let mut vm = good_vm.clone();
    vm.ioapic.redirection.push(0);
    assert!(t.vm.restore_state(&vm).is_err(), "25 IOAPIC pins");

    // A KVM struct of the wrong length is refused when decoding.
    let mut json = serde_json::to_value(&good).unwrap();
    json["lapic"].as_array_mut().unwrap().truncate(100);
    assert!(serde_json::from_value::<VcpuState>(json).is_err());

    // After all that, the good state still restores and runs on.
    t.vm.restore_state(&good_vm).unwrap();
    t.vcpu.restore_state(&good).unwrap();
    assert_eq!(run_reports(&mut t, 2), vec![expected(2), expected(3)]);
}

#[test]
fn every_part_of_a_state_is_restored() {
    let Some(hv) = kvm() else { return };
    let mut first = boot(&hv);
    run_reports(&mut first, 2);
    complete(&mut first);
    let (saved, saved_vm) = save(&first);
    // Values a fresh vCPU would not have, in the parts the guest above
    // leaves at their defaults: a hardware breakpoint, a pending NMI, a
    // halted vCPU, a raised task priority, a masked PIC line.
    let mut state = saved.clone();
    let mut debug = state.debug_regs.unwrap_or_default();
    debug.db[0] = 0x10_2000;
    debug.dr7 = 0x401;
    state.debug_regs = Some(debug);
    let mut events = state.events.unwrap_or_default();
    events.nmi.pending = 1;
    state.events = Some(events);
    state.mp_state = 3;
    // TPR, and what follows from it: the processor priority and CR8.
    state.lapic.regs[0x80] = 0x20;
    state.lapic.regs[0xa0] = 0x20;
    state.sregs.cr8 = 2;
    let mut vm_state = saved_vm.clone();
    vm_state.pic_master.imr = 0xfb;

    let second = restore(&hv, &first, &(state.clone(), vm_state.clone()));
    let again = save(&second);
    let a = without_moving_parts(&state, &vm_state);
    let b = without_moving_parts(&again.0, &again.1);
    assert_eq!(
        differences(&a, &b),
        Vec::<String>::new(),
        "a part of the state was not restored"
    );
    // The host's KVM may lack a part (debug registers, events); then the
    // state says so, and there is nothing to compare for it.
    if saved.debug_regs.is_some() {
        assert_eq!(again.0.debug_regs.unwrap().db[0], 0x10_2000);
    }
    if saved.events.is_some() {
        assert_eq!(again.0.events.unwrap().nmi.pending, 1);
    }
    assert_eq!(again.0.mp_state, 3);
    assert_eq!(again.1.pic_master.imr, 0xfb);
}
