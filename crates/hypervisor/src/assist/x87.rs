//! x87 and SSE control instructions: `FNINIT`, `FNCLEX`, `FLDCW`,
//! `FNSTCW`, `FNSTSW`, `LDMXCSR`, `STMXCSR`. Seen failing on PVM at CPL0
//! in UEFI firmware's first instructions (OVMF's SEC phase sets up the
//! FPU before anything else). Each only moves a control or status word
//! between memory (or AX) and the FPU state KVM keeps.

use iced_x86::{Code, Instruction, OpKind, Register};

use super::paging::write_virt;
use super::{write_gpr, AssistError, Ctx};

/// FSW bits FNCLEX clears: the exception flags, stack fault, error
/// summary and busy.
const FSW_EXCEPTIONS: u16 = 0x80ff;
/// MXCSR bits that exist (the rest fault on LDMXCSR).
const MXCSR_MASK: u32 = 0xffff;

/// Whether `code` is one of the instructions here.
pub(super) fn handles(code: Code) -> bool {
    matches!(
        code,
        Code::Fninit
            | Code::Fnclex
            | Code::Fldcw_m2byte
            | Code::Fnstcw_m2byte
            | Code::Fnstsw_m2byte
            | Code::Fnstsw_AX
            | Code::Ldmxcsr_m32
            | Code::Stmxcsr_m32
    )
}

/// Executes it. Returns false for #GP (reserved MXCSR bits).
pub(super) fn execute(ctx: &mut Ctx<'_>, insn: &Instruction) -> Result<bool, AssistError> {
    let mut fpu = ctx.cpu.fpu()?;
    match insn.code() {
        Code::Fninit => {
            fpu.fcw = 0x37f;
            fpu.fsw = 0;
            // KVM's abridged tag word: a set bit is a valid register.
            fpu.ftwx = 0;
            fpu.last_opcode = 0;
            fpu.last_ip = 0;
            fpu.last_dp = 0;
        }
        Code::Fnclex => fpu.fsw &= !FSW_EXCEPTIONS,
        Code::Fldcw_m2byte => {
            let mut b = [0u8; 2];
            ctx.read_mem(ctx.memory_address(insn)?, &mut b)?;
            fpu.fcw = u16::from_le_bytes(b);
        }
        Code::Ldmxcsr_m32 => {
            let mut b = [0u8; 4];
            ctx.read_mem(ctx.memory_address(insn)?, &mut b)?;
            let value = u32::from_le_bytes(b);
            if value & !MXCSR_MASK != 0 {
                return Ok(false);
            }
            fpu.mxcsr = value;
        }
        Code::Fnstcw_m2byte => return store(ctx, insn, &fpu.fcw.to_le_bytes()).map(|()| true),
        Code::Fnstsw_m2byte => return store(ctx, insn, &fpu.fsw.to_le_bytes()).map(|()| true),
        Code::Stmxcsr_m32 => return store(ctx, insn, &fpu.mxcsr.to_le_bytes()).map(|()| true),
        Code::Fnstsw_AX => {
            let ax = (ctx.regs.rax & !0xffff) | u64::from(fpu.fsw);
            write_gpr(&mut ctx.regs, Register::RAX, ax);
            return Ok(true);
        }
        _ => {
            return Err(AssistError::UnsupportedMode(
                "not an x87 control instruction",
            ))
        }
    }
    ctx.cpu.set_fpu(&fpu)?;
    Ok(true)
}

fn store(ctx: &mut Ctx<'_>, insn: &Instruction, bytes: &[u8]) -> Result<(), AssistError> {
    debug_assert!(insn.op0_kind() == OpKind::Memory);
    let gva = ctx.memory_address(insn)?;
    write_virt(ctx.mem, &ctx.sregs, ctx.cpl, gva, bytes)
}
