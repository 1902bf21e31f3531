//! Tiny assembly guests on real KVM: port and MMIO dispatch, the UART, the
//! i8042 reset, the debug-exit port, and every instruction assist.
//!
//! Each guest starts in 64-bit mode (hostvisor's boot GDT and identity
//! page tables) and reports values on a recorder port. The assertions are
//! architectural results, true on any x86 host; on hosts that emulate guest
//! kernel mode (nested PVM), the same instructions go through hostvisor's
//! assists, and the tests also check that they did.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

mod common;

use common::{kvm, skip};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hypervisor::{GuestMemoryMmap, Hypervisor};
use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use vm_memory::{Bytes, GuestAddress};
use vmm::{Machine, MachineSpec, VmOutcome};

const CODE: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const IDT: u64 = 0x3000;
const IDTR: u64 = 0x2ff0;
const RECORDER_PORT: u16 = 0x510;
const MMIO_DEVICE: u64 = 0xd000_0000;

/// Collects 32-bit port writes (pairs of them form 64-bit values).
#[derive(Default)]
struct Recorder {
    words: Vec<u32>,
    reads: u32,
}

impl devices::BusDevice for Recorder {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.reads += 1;
        let value = 0x1234_5678u32.wrapping_add(offset as u32);
        let n = data.len().min(4);
        data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
    }
    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        self.words.push(u32::from_le_bytes(b));
    }
}

#[derive(Clone, Default)]
struct SharedOut(Arc<Mutex<Vec<u8>>>);

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Run {
    outcome: VmOutcome,
    values: Vec<u64>,
    words: Vec<u32>,
    mmio: Vec<u32>,
    serial: String,
    assists: Vec<(&'static str, u64)>,
    emulated_cpl0: bool,
}

impl Run {
    fn assisted(&self, name: &str) -> u64 {
        self.assists
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, c)| *c)
    }

    /// On hosts that emulate CPL0, the instruction must have gone through
    /// hostvisor's assist; elsewhere the CPU runs it natively.
    fn expect_assist_where_emulated(&self, name: &str) {
        if self.emulated_cpl0 {
            assert!(
                self.assisted(name) > 0,
                "no {name} assist counted: {:?}",
                self.assists
            );
        }
    }
}

/// Guest code under construction, with interrupt handlers.
struct Guest {
    a: CodeAssembler,
    gates: Vec<(u8, CodeLabel)>,
}

impl Guest {
    fn new() -> Self {
        let mut a = CodeAssembler::new(64).unwrap();
        // Load the IDT that the harness writes at IDT.
        a.mov(rax, IDTR).unwrap();
        a.lidt(ptr(rax)).unwrap();
        Guest {
            a,
            gates: Vec::new(),
        }
    }

    /// Sends `reg` (64 bits) to the recorder as two 32-bit writes.
    fn record(&mut self, reg: AsmRegister64) {
        let a = &mut self.a;
        a.push(rdx).unwrap();
        a.push(rax).unwrap();
        if reg != rax {
            a.mov(rax, reg).unwrap();
        }
        a.mov(dx, u32::from(RECORDER_PORT)).unwrap();
        a.out(dx, eax).unwrap();
        a.shr(rax, 32).unwrap();
        a.out(dx, eax).unwrap();
        a.pop(rax).unwrap();
        a.pop(rdx).unwrap();
    }

    fn exit(&mut self, code: u8) {
        let a = &mut self.a;
        a.mov(al, u32::from(code)).unwrap();
        a.out(0xf4, al).unwrap();
        let mut spin = a.create_label();
        a.set_label(&mut spin).unwrap();
        a.hlt().unwrap();
        a.jmp(spin).unwrap();
    }

    /// A handler for `vector` that records the vector and the saved RIP,
    /// and returns past nothing (IRETQ to the saved RIP).
    fn handler(&mut self, vector: u8, skip_error_code: bool) {
        let mut label = self.a.create_label();
        self.a.set_label(&mut label).unwrap();
        self.gates.push((vector, label));
        if skip_error_code {
            self.a.add(rsp, 8).unwrap();
        }
        self.a.mov(rax, u64::from(vector)).unwrap();
        self.record(rax);
        self.a.mov(rax, qword_ptr(rsp)).unwrap();
        self.record(rax);
        self.a.iretq().unwrap();
    }

    /// A handler for a fault: records vector and saved RIP, then exits
    /// with `code` (the faulting instruction would fault again).
    fn fault_handler(&mut self, vector: u8, has_error_code: bool, code: u8) {
        let mut label = self.a.create_label();
        self.a.set_label(&mut label).unwrap();
        self.gates.push((vector, label));
        self.a.mov(rax, u64::from(vector)).unwrap();
        self.record(rax);
        let rip_slot = if has_error_code { 8 } else { 0 };
        self.a.mov(rax, qword_ptr(rsp + rip_slot)).unwrap();
        self.record(rax);
        self.exit(code);
    }

    fn assemble(mut self) -> (Vec<u8>, Vec<(u8, u64)>) {
        let result = self
            .a
            .assemble_options(CODE, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .unwrap();
        let gates = self
            .gates
            .iter()
            .map(|(v, l)| (*v, result.label_ip(l).unwrap()))
            .collect();
        (result.inner.code_buffer, gates)
    }
}

fn write_idt(mem: &GuestMemoryMmap, gates: &[(u8, u64)]) {
    for &(vector, handler) in gates {
        let low = (handler & 0xffff)
            | (u64::from(arch::regs::BOOT_CS) << 16)
            | (0x8e << 40)
            | (((handler >> 16) & 0xffff) << 48);
        let at = IDT + u64::from(vector) * 16;
        mem.write_obj(low, GuestAddress(at)).unwrap();
        mem.write_obj(handler >> 32, GuestAddress(at + 8)).unwrap();
    }
    mem.write_obj((256u16 * 16) - 1, GuestAddress(IDTR))
        .unwrap();
    mem.write_obj(IDT, GuestAddress(IDTR + 2)).unwrap();
}

/// Boots `guest` and returns what it reported.
fn run(guest: Guest, prepare: impl FnOnce(&GuestMemoryMmap)) -> Option<Run> {
    let hv = kvm()?;
    let emulated_cpl0 = hv.host_profile().emulated_cpl0;
    let serial = SharedOut::default();
    let spec = MachineSpec {
        cpus: 1,
        memory: 32 << 20,
        memory_options: Default::default(),
        hidden_features: Vec::new(),
        serial_out: Box::new(serial.clone()),
    };
    let mut machine = Machine::new(&hv, spec).unwrap();
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    machine
        .pio_bus()
        .insert(recorder.clone(), u64::from(RECORDER_PORT), 4)
        .unwrap();
    let mmio = Arc::new(Mutex::new(Recorder::default()));
    machine
        .mmio_bus()
        .insert(mmio.clone(), MMIO_DEVICE, 0x1000)
        .unwrap();
    let (code, gates) = guest.assemble();
    write_idt(machine.memory(), &gates);
    prepare(machine.memory());
    machine.load_code(CODE, &code, 0).unwrap();
    let stats = machine.stats();
    let outcome = machine.run(false, Instant::now(), None).unwrap();
    let words = recorder.lock().unwrap().words.clone();
    let values = words
        .chunks(2)
        .map(|c| u64::from(c[0]) | (u64::from(*c.get(1).unwrap_or(&0)) << 32))
        .collect();
    let mmio_words = mmio.lock().unwrap().words.clone();
    let serial = String::from_utf8_lossy(&serial.0.lock().unwrap()).into_owned();
    Some(Run {
        outcome,
        values,
        words,
        mmio: mmio_words,
        serial,
        assists: stats.assist_counts(),
        emulated_cpl0,
    })
}

#[test]
fn port_io_reaches_devices_in_both_directions() {
    let mut g = Guest::new();
    g.a.mov(dx, u32::from(RECORDER_PORT + 2)).unwrap();
    g.a.in_(eax, dx).unwrap(); // 0x1234_5678 + offset 2
    g.a.add(eax, 1).unwrap();
    g.a.mov(dx, u32::from(RECORDER_PORT)).unwrap();
    g.a.out(dx, eax).unwrap();
    // A port nobody claims reads as all ones.
    g.a.mov(dx, 0x7770u32).unwrap();
    g.a.in_(eax, dx).unwrap();
    g.a.mov(dx, u32::from(RECORDER_PORT)).unwrap();
    g.a.out(dx, eax).unwrap();
    g.exit(0);
    let Some(r) = run(g, |_| {}) else { return };
    assert_eq!(r.outcome, VmOutcome::DebugExit(0));
    assert_eq!(r.words, vec![0x1234_567b, 0xffff_ffff]);
}

#[test]
fn mmio_reaches_devices_in_both_directions() {
    let mut g = Guest::new();
    g.a.mov(rbx, MMIO_DEVICE).unwrap();
    g.a.mov(eax, dword_ptr(rbx + 0x10)).unwrap();
    g.a.mov(dword_ptr(rbx + 0x20), eax).unwrap();
    g.a.mov(dword_ptr(rbx + 0x24), 0xcafe_u32).unwrap();
    g.exit(0);
    let Some(r) = run(g, |_| {}) else { return };
    assert_eq!(r.outcome, VmOutcome::DebugExit(0));
    assert_eq!(r.mmio, vec![0x1234_5688, 0xcafe]);
}

#[test]
fn serial_output_reaches_the_console() {
    let mut g = Guest::new();
    for &b in b"hello from the guest\n" {
        g.a.mov(dx, 0x3f8u32).unwrap();
        g.a.mov(al, u32::from(b)).unwrap();
        g.a.out(dx, al).unwrap();
    }
    // LSR says the transmitter is empty.
    g.a.mov(dx, 0x3fdu32).unwrap();
    g.a.in_(al, dx).unwrap();
    g.a.movzx(eax, al).unwrap();
    g.record(rax);
    g.exit(0);
    let Some(r) = run(g, |_| {}) else { return };
    assert_eq!(r.outcome, VmOutcome::DebugExit(0));
    assert_eq!(r.serial, "hello from the guest\n");
    assert_eq!(r.values[0] & 0x60, 0x60, "THRE and TEMT set");
}

#[test]
fn i8042_reset_ends_the_vm_as_a_reset() {
    let mut g = Guest::new();
    g.a.mov(al, 0xfeu32).unwrap();
    g.a.out(0x64, al).unwrap();
    g.exit(9); // never reached
    let Some(r) = run(g, |_| {}) else { return };
    assert_eq!(r.outcome, VmOutcome::Reset);
    assert_eq!(r.outcome.exit_code(), 0);
}

#[test]
fn debug_exit_reports_failure_codes() {
    let mut g = Guest::new();
    g.exit(42);
    let Some(r) = run(g, |_| {}) else { return };
    assert_eq!(r.outcome, VmOutcome::DebugExit(42));
    assert_eq!(r.outcome.exit_code(), 3);
}

#[test]
fn a_fault_without_handlers_is_a_crash() {
    let mut g = Guest::new();
    // No gates: #UD cannot be delivered -> #GP -> #DF -> triple fault.
    g.a.ud2().unwrap();
    g.exit(0);
    let Some(r) = run(g, |_| {}) else { return };
    match &r.outcome {
        VmOutcome::Crashed(why) => eprintln!("crash: {why}"),
        other => panic!("expected a crash, got {other:?}"),
    }
    assert_eq!(r.outcome.exit_code(), 3);
}

#[test]
fn int3_is_delivered_to_the_guest_idt() {
    let mut g = Guest::new();
    let mut over = g.a.create_label();
    g.a.jmp(over).unwrap();
    g.handler(3, false);
    g.a.set_label(&mut over).unwrap();
    g.a.int3().unwrap();
    g.a.mov(rax, 0x600du64).unwrap();
    g.record(rax);
    g.exit(0);
    let Some(r) = run(g, |_| {}) else { return };
    assert_eq!(r.outcome, VmOutcome::DebugExit(0));
    assert_eq!(r.values.len(), 3, "{:x?}", r.values);
    assert_eq!(r.values[0], 3);
    assert_eq!(r.values[2], 0x600d, "IRETQ returned after INT3");
    r.expect_assist_where_emulated("int3");
}

#[test]
fn int_n_uses_its_vector() {
    let mut g = Guest::new();
    let mut over = g.a.create_label();
    g.a.jmp(over).unwrap();
    g.handler(0x40, false);
    g.a.set_label(&mut over).unwrap();
    g.a.int(0x40).unwrap();
    g.a.mov(rax, 0x600du64).unwrap();
    g.record(rax);
    g.exit(0);
    let Some(r) = run(g, |_| {}) else { return };
    assert_eq!(r.outcome, VmOutcome::DebugExit(0));
    assert_eq!((r.values[0], r.values[2]), (0x40, 0x600d));
    r.expect_assist_where_emulated("int n");
}

#[test]
fn fwait_continues_without_pending_x87_exception() {
    let mut g = Guest::new();
    g.a.fninit().unwrap();
    g.a.wait().unwrap();
    g.a.mov(rax, 0x600du64).unwrap();
    g.record(rax);
    g.exit(0);
    let Some(r) = run(g, |_| {}) else { return };
    assert_eq!(r.outcome, VmOutcome::DebugExit(0));
    assert_eq!(r.values, vec![0x600d]);
    r.expect_assist_where_emulated("fwait");
}

/// Enables XSAVE (CR4.OSXSAVE, XCR0 = x87|SSE) and XRSTORs x87 state from
/// `area` with XSTATE_BV = `bv`, then runs FWAIT. The x87 state in the area
/// has divide-by-zero unmasked and pending, so FWAIT raises #MF exactly when
/// XRSTOR loaded it (bv bit 0), and continues when XRSTOR put x87 in its
/// initial state (bv = 0). Only XRSTOR and FWAIT touch x87 state: some
/// nested KVMs cannot execute other x87/SSE instructions in kernel mode.
fn xrstor_then_fwait(bv: u64) -> Option<Run> {
    if !std::arch::is_x86_feature_detected!("xsave") {
        skip("HOSTVISOR_REQUIRE_XSAVE", "the host CPU has no XSAVE");
        return None;
    }
    let area = DATA;
    let mut g = Guest::new();
    let mut over = g.a.create_label();
    g.a.jmp(over).unwrap();
    g.fault_handler(16, false, 0);
    g.a.set_label(&mut over).unwrap();
    g.a.mov(rax, cr4).unwrap();
    g.a.or(rax, 1 << 18).unwrap();
    g.a.mov(cr4, rax).unwrap();
    g.a.xor(ecx, ecx).unwrap();
    g.a.xor(edx, edx).unwrap();
    g.a.mov(eax, 3u32).unwrap();
    g.a.xsetbv().unwrap();
    g.a.fninit().unwrap();
    g.a.mov(rdi, area).unwrap();
    g.a.mov(eax, 3u32).unwrap();
    g.a.xor(edx, edx).unwrap();
    g.a.xrstor(ptr(rdi)).unwrap();
    g.a.wait().unwrap();
    g.a.mov(rax, 0x600du64).unwrap();
    g.record(rax);
    g.exit(0);
    run(g, |mem| {
        let mut xsave = vec![0u8; 4096];
        xsave[0..2].copy_from_slice(&0x037bu16.to_le_bytes()); // FCW: ZE unmasked
        xsave[2..4].copy_from_slice(&0x0084u16.to_le_bytes()); // FSW: ES | ZE
        xsave[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
        xsave[512..520].copy_from_slice(&bv.to_le_bytes()); // XSTATE_BV
        mem.write_slice(&xsave, GuestAddress(area)).unwrap();
    })
}

#[test]
fn xrstor_loads_x87_state_and_fwait_reports_its_exception() {
    let Some(r) = xrstor_then_fwait(1) else {
        return;
    };
    assert_eq!(r.outcome, VmOutcome::DebugExit(0), "{:x?}", r.values);
    assert_eq!(
        r.values.first(),
        Some(&16),
        "#MF delivered: {:x?}",
        r.values
    );
    r.expect_assist_where_emulated("xrstor");
    r.expect_assist_where_emulated("fwait");
}

#[test]
fn xrstor_with_clear_xstate_bv_initialises_x87() {
    let Some(r) = xrstor_then_fwait(0) else {
        return;
    };
    assert_eq!(r.outcome, VmOutcome::DebugExit(0));
    assert_eq!(r.values, vec![0x600d], "no exception after init state");
    r.expect_assist_where_emulated("xrstor");
}

#[test]
fn popcnt_register_and_memory_forms() {
    let mut g = Guest::new();
    g.a.mov(rax, 0xf0f0_0000_0000_0001u64).unwrap();
    g.a.popcnt(rbx, rax).unwrap();
    g.record(rbx);
    g.a.mov(rsi, DATA).unwrap();
    g.a.mov(dword_ptr(rsi), 0x0101_0101u32).unwrap();
    g.a.mov(rcx, u64::MAX).unwrap();
    g.a.popcnt(ecx, dword_ptr(rsi)).unwrap();
    g.record(rcx);
    // ZF is set for a zero source.
    g.a.xor(edx, edx).unwrap();
    g.a.popcnt(rax, rdx).unwrap();
    g.a.setz(al).unwrap();
    g.a.movzx(eax, al).unwrap();
    g.record(rax);
    g.exit(0);
    let Some(r) = run(g, |_| {}) else { return };
    assert_eq!(r.outcome, VmOutcome::DebugExit(0));
    assert_eq!(r.values, vec![9, 4, 1]);
    r.expect_assist_where_emulated("popcnt");
}

#[test]
fn cmpxchg16b_succeeds_and_fails_like_the_cpu() {
    let mut g = Guest::new();
    g.a.mov(rdi, DATA).unwrap();
    // Success: memory holds (1, 2).
    g.a.mov(eax, 1u32).unwrap();
    g.a.mov(edx, 2u32).unwrap();
    g.a.mov(ebx, 0xaau32).unwrap();
    g.a.mov(ecx, 0xbbu32).unwrap();
    g.a.lock().cmpxchg16b(xmmword_ptr(rdi)).unwrap();
    g.a.setz(al).unwrap();
    g.a.movzx(eax, al).unwrap();
    g.record(rax);
    g.a.mov(rax, qword_ptr(rdi)).unwrap();
    g.record(rax);
    g.a.mov(rax, qword_ptr(rdi + 8)).unwrap();
    g.record(rax);
    // Failure: expects (1, 2) again, finds (0xaa, 0xbb) and loads it.
    g.a.mov(eax, 1u32).unwrap();
    g.a.mov(edx, 2u32).unwrap();
    g.a.lock().cmpxchg16b(xmmword_ptr(rdi)).unwrap();
    g.a.mov(rsi, rax).unwrap();
    g.a.setz(al).unwrap();
    g.a.movzx(eax, al).unwrap();
    g.record(rax);
    g.record(rsi);
    g.record(rdx);
    g.exit(0);
    let Some(r) = run(g, |mem| {
        mem.write_obj(1u64, GuestAddress(DATA)).unwrap();
        mem.write_obj(2u64, GuestAddress(DATA + 8)).unwrap();
    }) else {
        return;
    };
    assert_eq!(r.outcome, VmOutcome::DebugExit(0));
    assert_eq!(r.values, vec![1, 0xaa, 0xbb, 0, 0xaa, 0xbb]);
    r.expect_assist_where_emulated("cmpxchg16b");
}

#[test]
fn clac_and_stac_toggle_ac() {
    if !std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .contains(" smap")
    {
        skip(
            "HOSTVISOR_REQUIRE_SMAP",
            "the host CPU has no SMAP (CLAC/STAC would be #UD)",
        );
        return;
    }
    let mut g = Guest::new();
    g.a.stac().unwrap();
    g.a.pushfq().unwrap();
    g.a.pop(rax).unwrap();
    g.a.shr(rax, 18).unwrap();
    g.a.and(eax, 1).unwrap();
    g.record(rax);
    g.a.clac().unwrap();
    g.a.pushfq().unwrap();
    g.a.pop(rax).unwrap();
    g.a.shr(rax, 18).unwrap();
    g.a.and(eax, 1).unwrap();
    g.record(rax);
    g.exit(0);
    let Some(r) = run(g, |_| {}) else { return };
    assert_eq!(r.outcome, VmOutcome::DebugExit(0));
    assert_eq!(r.values, vec![1, 0]);
    r.expect_assist_where_emulated("clac");
}

#[test]
fn pause_freezes_the_guest_and_its_clock_until_resume() {
    use std::time::Duration;
    use vmm::control::{ControlError, ControlRequest, RunState, VmControl};
    let Some(hv) = kvm() else { return };
    let spec = MachineSpec {
        cpus: 2,
        memory: 32 << 20,
        memory_options: Default::default(),
        hidden_features: Vec::new(),
        serial_out: Box::new(std::io::sink()),
    };
    let mut machine = Machine::new(&hv, spec).unwrap();
    // Both vCPUs count in memory forever (the second starts in the same
    // code: the harness points every vCPU at it).
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.mov(rbx, DATA).unwrap();
    a.set_label(&mut top).unwrap();
    a.lock().inc(qword_ptr(rbx)).unwrap();
    a.jmp(top).unwrap();
    let code = a.assemble(CODE).unwrap();
    machine.load_code(CODE, &code, 0).unwrap();
    let mem = machine.memory().clone();
    let count = move || mem.read_obj::<u64>(GuestAddress(DATA)).unwrap();
    let control = VmControl::new();
    let c = control.clone();
    let vm = std::thread::spawn(move || machine.run(false, Instant::now(), Some(&c)).unwrap());
    let wait_running = Instant::now();
    while control.request(ControlRequest::Info).is_err() {
        assert!(wait_running.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(count() > 0, "the guest runs");
    assert_eq!(
        control.request(ControlRequest::Resume),
        Err(ControlError::Conflict("the VM is not paused".into()))
    );
    control.request(ControlRequest::Pause).unwrap();
    let frozen = count();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(), frozen, "no vCPU runs while paused");
    let status = control.request(ControlRequest::Info).unwrap().unwrap();
    assert_eq!(status.state, RunState::Paused);
    assert!(status.paused_ms >= 250, "{status:?}");
    assert_eq!(status.vcpus, 2);
    assert!(matches!(
        control.request(ControlRequest::Pause),
        Err(ControlError::Conflict(_))
    ));
    control.request(ControlRequest::Resume).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(count() > frozen, "running again");
    let status = control.request(ControlRequest::Info).unwrap().unwrap();
    assert_eq!(status.state, RunState::Running);
    // Paused while killed: the parked vCPUs still leave.
    control.request(ControlRequest::Pause).unwrap();
    control.request(ControlRequest::Kill).unwrap();
    assert_eq!(vm.join().unwrap(), VmOutcome::Killed);
    assert_eq!(
        control.request(ControlRequest::Info),
        Err(ControlError::NotRunning)
    );
}
