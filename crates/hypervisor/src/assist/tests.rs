//! Assists against a fake CPU and hand-built guest memory.

use vm_memory::{Bytes, GuestAddress};

use super::paging::tests::paged_memory;
use super::*;
use crate::{FpuState, HypervisorError, XsaveState};

#[derive(Default)]
struct FakeCpu {
    regs: StandardRegisters,
    sregs: SpecialRegisters,
    fpu: FpuState,
    xsave: Option<Box<XsaveState>>,
}

impl CpuState for FakeCpu {
    fn regs(&self) -> crate::Result<StandardRegisters> {
        Ok(self.regs)
    }
    fn set_regs(&mut self, regs: &StandardRegisters) -> crate::Result<()> {
        self.regs = *regs;
        Ok(())
    }
    fn sregs(&self) -> crate::Result<SpecialRegisters> {
        Ok(self.sregs)
    }
    fn set_sregs(&mut self, sregs: &SpecialRegisters) -> crate::Result<()> {
        self.sregs = *sregs;
        Ok(())
    }
    fn fpu(&self) -> crate::Result<FpuState> {
        Ok(self.fpu)
    }
    fn set_fpu(&mut self, fpu: &FpuState) -> crate::Result<()> {
        self.fpu = *fpu;
        Ok(())
    }
    fn xsave(&self) -> crate::Result<XsaveState> {
        Ok(self.xsave.as_deref().map(clone_xsave).unwrap_or_default())
    }
    fn set_xsave(&mut self, xsave: &XsaveState) -> crate::Result<()> {
        self.xsave = Some(Box::new(clone_xsave(xsave)));
        Ok(())
    }
    fn xcr0(&self) -> crate::Result<u64> {
        Err(HypervisorError::MissingCapability("xcr0 in tests"))
    }
}

fn clone_xsave(x: &XsaveState) -> XsaveState {
    XsaveState {
        region: x.region,
        ..Default::default()
    }
}

const HIGH: u64 = 0xffff_8000_0020_0000; // 2 MiB page at physical 0x40_0000
const GDT: u64 = HIGH;
const IDT: u64 = HIGH + 0x1000;
const TSS: u64 = HIGH + 0x2000;
const HANDLER: u64 = HIGH + 0x5000;
const STACK_TOP: u64 = HIGH + 0x8000;
const IST_STACK_TOP: u64 = HIGH + 0x9000;
const CODE: u64 = HIGH + 0x3000;

/// A 64-bit CPL0 machine with a GDT, an IDT whose gates point at HANDLER,
/// and a TSS with one IST stack.
fn machine() -> (GuestMemoryMmap, FakeCpu) {
    let (mem, mut sregs) = paged_memory();
    let phys = |gva: u64| GuestAddress(gva - HIGH + 0x40_0000);
    mem.write_obj(0x00af_9b00_0000_ffffu64, phys(GDT + 8))
        .unwrap();
    mem.write_obj(0x00cf_9300_0000_ffffu64, phys(GDT + 16))
        .unwrap();
    for vector in 0..64u64 {
        let ist = u64::from(vector == 2); // vector 2 uses IST1
        let kind = if vector == 32 { 0x8f } else { 0x8e }; // 32: trap gate
        let low = (HANDLER & 0xffff)
            | (0x08 << 16)
            | (ist << 32)
            | (kind << 40)
            | (((HANDLER >> 16) & 0xffff) << 48);
        mem.write_obj(low, phys(IDT + vector * 16)).unwrap();
        mem.write_obj(HANDLER >> 32, phys(IDT + vector * 16 + 8))
            .unwrap();
    }
    mem.write_obj(IST_STACK_TOP, phys(TSS + 0x24)).unwrap();
    sregs.cr0 |= CR0_NE;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 23;
    sregs.idt.base = IDT;
    sregs.idt.limit = 64 * 16 - 1;
    sregs.tr.base = TSS;
    sregs.cs = crate::SegmentRegister {
        selector: 8,
        l: 1,
        present: 1,
        s: 1,
        type_: 0xb,
        ..Default::default()
    };
    sregs.ss.selector = 0x10;
    let cpu = FakeCpu {
        regs: StandardRegisters {
            rip: CODE,
            rsp: STACK_TOP - 8, // deliberately misaligned by 8
            rflags: 0x202 | RFLAGS_AC,
            ..Default::default()
        },
        sregs,
        ..Default::default()
    };
    (mem, cpu)
}

fn run(mem: &GuestMemoryMmap, cpu: &mut FakeCpu, bytes: &[u8]) -> Result<AssistKind, AssistError> {
    complete(
        cpu,
        mem,
        &EmulationFailure {
            insn_bytes: Some(bytes.to_vec()),
        },
    )
}

fn read_stack(mem: &GuestMemoryMmap, cpu: &FakeCpu, slots: usize) -> Vec<u64> {
    (0..slots)
        .map(|i| {
            let gva = cpu.regs.rsp + 8 * i as u64;
            mem.read_obj(GuestAddress(gva - HIGH + 0x40_0000)).unwrap()
        })
        .collect()
}

#[test]
fn int3_is_delivered_through_the_idt() {
    let (mem, mut cpu) = machine();
    assert_eq!(run(&mem, &mut cpu, &[0xcc]).unwrap(), AssistKind::Int3);
    assert_eq!(cpu.regs.rip, HANDLER);
    // Aligned down to 16, then 5 slots: RIP, CS, RFLAGS, RSP, SS.
    assert_eq!(cpu.regs.rsp, STACK_TOP - 16 - 40);
    assert_eq!(
        read_stack(&mem, &cpu, 5),
        vec![CODE + 1, 8, 0x202 | RFLAGS_AC, STACK_TOP - 8, 0x10]
    );
    // Interrupt gate: IF cleared; AC untouched in 64-bit delivery.
    assert_eq!(cpu.regs.rflags & crate::x86::RFLAGS_IF, 0);
    assert_ne!(cpu.regs.rflags & RFLAGS_AC, 0);
}

#[test]
fn int_n_uses_its_vector_gate_kind_and_ist() {
    let (mem, mut cpu) = machine();
    // int 0x20: trap gate keeps IF.
    assert_eq!(
        run(&mem, &mut cpu, &[0xcd, 0x20]).unwrap(),
        AssistKind::IntN
    );
    assert_eq!(cpu.regs.rip, HANDLER);
    assert_ne!(cpu.regs.rflags & crate::x86::RFLAGS_IF, 0);
    assert_eq!(read_stack(&mem, &cpu, 1), vec![CODE + 2]);

    let (mem, mut cpu) = machine();
    // int 2 switches to IST1.
    run(&mem, &mut cpu, &[0xcd, 0x02]).unwrap();
    assert_eq!(cpu.regs.rsp, IST_STACK_TOP - 40);
}

#[test]
fn int_beyond_the_idt_limit_is_refused() {
    let (mem, mut cpu) = machine();
    let before = cpu.regs;
    assert!(matches!(
        run(&mem, &mut cpu, &[0xcd, 0x80]),
        Err(AssistError::BadDescriptor(_))
    ));
    assert_eq!(cpu.regs.rip, before.rip, "a failed assist changes nothing");
}

#[test]
fn fwait_without_pending_exception_advances() {
    let (mem, mut cpu) = machine();
    assert_eq!(run(&mem, &mut cpu, &[0x9b]).unwrap(), AssistKind::Fwait);
    assert_eq!(cpu.regs.rip, CODE + 1);
}

#[test]
fn fwait_with_pending_exception_raises_mf() {
    let (mem, mut cpu) = machine();
    cpu.fpu.fsw = FSW_ES | 1;
    run(&mem, &mut cpu, &[0x9b]).unwrap();
    assert_eq!(cpu.regs.rip, HANDLER);
    assert_eq!(read_stack(&mem, &cpu, 1), vec![CODE], "#MF is a fault");
}

#[test]
fn popcnt_register_forms_and_flags() {
    let (mem, mut cpu) = machine();
    cpu.regs.rbx = 0xf0f0_0000_0000_0001;
    cpu.regs.rflags |= RFLAGS_CF | RFLAGS_ZF;
    // popcnt rax, rbx
    assert_eq!(
        run(&mem, &mut cpu, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3]).unwrap(),
        AssistKind::Popcnt
    );
    assert_eq!(cpu.regs.rax, 9);
    assert_eq!(cpu.regs.rip, CODE + 5);
    assert_eq!(cpu.regs.rflags & (RFLAGS_CF | RFLAGS_ZF), 0);

    // popcnt eax, ebx: 32-bit destination zero-extends.
    let (mem, mut cpu) = machine();
    cpu.regs.rax = u64::MAX;
    cpu.regs.rbx = 0xffff_ffff_0000_0003;
    run(&mem, &mut cpu, &[0xf3, 0x0f, 0xb8, 0xc3]).unwrap();
    assert_eq!(cpu.regs.rax, 2);

    // popcnt cx, dx of zero: ZF set, upper bits of RCX kept.
    let (mem, mut cpu) = machine();
    cpu.regs.rcx = 0x1234_0000;
    cpu.regs.rdx = 0xffff_0000;
    run(&mem, &mut cpu, &[0x66, 0xf3, 0x0f, 0xb8, 0xca]).unwrap();
    assert_eq!(cpu.regs.rcx, 0x1234_0000);
    assert_ne!(cpu.regs.rflags & RFLAGS_ZF, 0);
}

#[test]
fn popcnt_memory_operand() {
    let (mem, mut cpu) = machine();
    let data = HIGH + 0x6000;
    mem.write_obj(0x0101_0101u32, GuestAddress(0x40_6000))
        .unwrap();
    cpu.regs.rsi = data - 0x10;
    // popcnt edx, [rsi+0x10]
    run(&mem, &mut cpu, &[0xf3, 0x0f, 0xb8, 0x56, 0x10]).unwrap();
    assert_eq!(cpu.regs.rdx, 4);
    // popcnt rdx, [rip+0x2ff7]: RIP-relative, data at CODE+9+0x2ff7-... .
    let (mem, mut cpu) = machine();
    mem.write_obj(u64::MAX, GuestAddress(0x40_6000)).unwrap();
    let disp = (data - (CODE + 9)) as u32;
    let mut bytes = vec![0xf3, 0x48, 0x0f, 0xb8, 0x15];
    bytes.extend_from_slice(&disp.to_le_bytes());
    run(&mem, &mut cpu, &bytes).unwrap();
    assert_eq!(cpu.regs.rdx, 64);
}

#[test]
fn popcnt_on_unmapped_memory_raises_page_fault() {
    let (mem, mut cpu) = machine();
    cpu.regs.rsi = 0x9000; // not mapped
    run(&mem, &mut cpu, &[0xf3, 0x0f, 0xb8, 0x16]).unwrap();
    assert_eq!(cpu.regs.rip, HANDLER);
    assert_eq!(cpu.sregs.cr2, 0x9000);
    // Frame: error code, then the faulting RIP.
    assert_eq!(read_stack(&mem, &cpu, 2), vec![0, CODE]);
}

#[test]
fn cmpxchg16b_success_and_failure() {
    let (mem, mut cpu) = machine();
    let target = HIGH + 0x6000;
    mem.write_obj(1u64, GuestAddress(0x40_6000)).unwrap();
    mem.write_obj(2u64, GuestAddress(0x40_6008)).unwrap();
    cpu.regs.rdi = target;
    cpu.regs.rax = 1;
    cpu.regs.rdx = 2;
    cpu.regs.rbx = 0xaa;
    cpu.regs.rcx = 0xbb;
    // lock cmpxchg16b [rdi]
    let insn = [0xf0, 0x48, 0x0f, 0xc7, 0x0f];
    assert_eq!(run(&mem, &mut cpu, &insn).unwrap(), AssistKind::Cmpxchg16b);
    assert_ne!(cpu.regs.rflags & RFLAGS_ZF, 0);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x40_6000)).unwrap(), 0xaa);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x40_6008)).unwrap(), 0xbb);
    assert_eq!(cpu.regs.rip, CODE + 5);

    // Again with the old expected value: fails and loads memory.
    cpu.regs.rip = CODE;
    cpu.regs.rax = 1;
    cpu.regs.rdx = 2;
    run(&mem, &mut cpu, &insn).unwrap();
    assert_eq!(cpu.regs.rflags & RFLAGS_ZF, 0);
    assert_eq!((cpu.regs.rax, cpu.regs.rdx), (0xaa, 0xbb));
}

#[test]
fn cmpxchg16b_misaligned_raises_gp() {
    let (mem, mut cpu) = machine();
    cpu.regs.rdi = HIGH + 0x6008;
    run(&mem, &mut cpu, &[0x48, 0x0f, 0xc7, 0x0f]).unwrap();
    assert_eq!(cpu.regs.rip, HANDLER);
    assert_eq!(read_stack(&mem, &cpu, 2), vec![0, CODE]);
}

#[test]
fn cmpxchg8b_compares_edx_eax() {
    let (mem, mut cpu) = machine();
    mem.write_obj(0x0000_0002_0000_0001u64, GuestAddress(0x40_6000))
        .unwrap();
    cpu.regs.rdi = HIGH + 0x6000;
    cpu.regs.rax = 0xffff_ffff_0000_0001; // upper half ignored
    cpu.regs.rdx = 2;
    cpu.regs.rbx = 3;
    cpu.regs.rcx = 4;
    assert_eq!(
        run(&mem, &mut cpu, &[0x0f, 0xc7, 0x0f]).unwrap(),
        AssistKind::Cmpxchg8b
    );
    assert_ne!(cpu.regs.rflags & RFLAGS_ZF, 0);
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0x40_6000)).unwrap(),
        0x0000_0004_0000_0003
    );
}

#[test]
fn clac_and_stac() {
    let (mem, mut cpu) = machine();
    assert_eq!(
        run(&mem, &mut cpu, &[0x0f, 0x01, 0xca]).unwrap(),
        AssistKind::Clac
    );
    assert_eq!(cpu.regs.rflags & RFLAGS_AC, 0);
    assert_eq!(cpu.regs.rip, CODE + 3);
    assert_eq!(
        run(&mem, &mut cpu, &[0x0f, 0x01, 0xcb]).unwrap(),
        AssistKind::Stac
    );
    assert_ne!(cpu.regs.rflags & RFLAGS_AC, 0);
}

#[test]
fn unknown_and_garbage_instructions_are_errors() {
    let (mem, mut cpu) = machine();
    let err = run(&mem, &mut cpu, &[0x0f, 0x0b]).unwrap_err(); // ud2
    assert!(matches!(err, AssistError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("ud2"), "{err}");
    assert!(matches!(
        run(&mem, &mut cpu, &[0x0f]),
        Err(AssistError::Undecodable(_))
    ));
    assert_eq!(cpu.regs.rip, CODE);
}

#[test]
fn instruction_is_fetched_from_memory_when_not_given() {
    let (mem, mut cpu) = machine();
    mem.write_slice(&[0xcd, 0x21], GuestAddress(0x40_3000))
        .unwrap();
    complete(&mut cpu, &mem, &EmulationFailure::default()).unwrap();
    assert_eq!(read_stack(&mem, &cpu, 1), vec![CODE + 2]);
}

#[test]
fn hostile_descriptor_table_bases_do_not_overflow() {
    let (mem, mut cpu) = machine();
    cpu.sregs.idt.base = u64::MAX - 8;
    assert!(run(&mem, &mut cpu, &[0xcc]).is_err());
    let (mem, mut cpu) = machine();
    cpu.regs.rsp = 8; // the frame would wrap below zero
    assert!(run(&mem, &mut cpu, &[0xcc]).is_err());
    let (mem, mut cpu) = machine();
    cpu.regs.rip = u64::MAX;
    assert!(
        run(&mem, &mut cpu, &[0x0f, 0x01, 0xca]).is_ok(),
        "RIP wraps like the CPU's"
    );
}

#[test]
fn x87_and_sse_control_words_move_between_memory_and_the_fpu() {
    let (mem, mut cpu) = machine();
    let data = HIGH + 0x6000;
    cpu.regs.rsi = data;
    mem.write_obj(0x027fu16, GuestAddress(0x40_6000)).unwrap();
    // fldcw [rsi]
    assert_eq!(
        run(&mem, &mut cpu, &[0xd9, 0x2e]).unwrap(),
        AssistKind::X87Control
    );
    assert_eq!(cpu.fpu.fcw, 0x027f);
    assert_eq!(cpu.regs.rip, CODE + 2);
    // ldmxcsr [rsi+4]
    mem.write_obj(0x9fc0u32, GuestAddress(0x40_6004)).unwrap();
    run(&mem, &mut cpu, &[0x0f, 0xae, 0x56, 0x04]).unwrap();
    assert_eq!(cpu.fpu.mxcsr, 0x9fc0);
    // stmxcsr [rsi+8]; fnstcw [rsi+12]
    run(&mem, &mut cpu, &[0x0f, 0xae, 0x5e, 0x08]).unwrap();
    run(&mem, &mut cpu, &[0xd9, 0x7e, 0x0c]).unwrap();
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x40_6008)).unwrap(),
        0x9fc0
    );
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(0x40_600c)).unwrap(),
        0x027f
    );
    // fninit resets the control and status words; fnstsw ax reads 0.
    cpu.fpu.fsw = 0x80ff;
    cpu.regs.rax = 0xdead_beef;
    run(&mem, &mut cpu, &[0xdb, 0xe3]).unwrap();
    assert_eq!((cpu.fpu.fcw, cpu.fpu.fsw), (0x37f, 0));
    run(&mem, &mut cpu, &[0xdf, 0xe0]).unwrap();
    assert_eq!(cpu.regs.rax, 0xdead_0000);
    // fnclex clears the exception bits only.
    cpu.fpu.fsw = 0x3881;
    run(&mem, &mut cpu, &[0xdb, 0xe2]).unwrap();
    assert_eq!(cpu.fpu.fsw, 0x3800);
}

#[test]
fn ldmxcsr_with_reserved_bits_raises_gp() {
    let (mem, mut cpu) = machine();
    cpu.regs.rsi = HIGH + 0x6000;
    mem.write_obj(0x1_0000u32, GuestAddress(0x40_6000)).unwrap();
    cpu.fpu.mxcsr = 0x1f80;
    run(&mem, &mut cpu, &[0x0f, 0xae, 0x16]).unwrap();
    assert_eq!(cpu.fpu.mxcsr, 0x1f80, "unchanged");
    assert_eq!(cpu.regs.rip, HANDLER, "#GP delivered");
}
