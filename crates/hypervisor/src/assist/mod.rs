//! Instruction assists: completing, in the VMM, an instruction that the
//! accelerator reported it could not emulate.
//!
//! Some nested KVMs (PVM, which emulates guest kernel mode) fail on a few
//! instructions at CPL0 — seen: `INT3`, `INT n`, `FWAIT`, `POPCNT`,
//! `CMPXCHG8B/16B`, `XRSTOR`, `CLAC`/`STAC`, x87/SSE control words — and stop with an emulation
//! failure. Each of those has exact, architecturally defined behaviour that
//! needs only registers and memory, so the VMM performs it and resumes the
//! guest: exceptions and software interrupts are delivered through the
//! guest's IDT, everything else computes its result and advances RIP.
//!
//! Decoding is iced-x86's; what is written here is the execution of the few
//! instructions above, which no crate offers for a VMM's register model.
//! Everything goes through [`CpuState`] and guest memory, so this is also the
//! seed of a software-emulation backend.

mod interrupt;
pub mod paging;
mod x87;
mod xsave;

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::x86::{
    CR0_NE, CR0_PE, EFER_LMA, RFLAGS_AC, RFLAGS_AF, RFLAGS_CF, RFLAGS_OF, RFLAGS_PF, RFLAGS_SF,
    RFLAGS_ZF,
};
use crate::{CpuState, EmulationFailure, GuestMemoryMmap, SpecialRegisters, StandardRegisters};
use interrupt::{deliver, Event};
use paging::{read_virt, translate, Access};

const FSW_ES: u16 = 1 << 7;

const VECTOR_UD: u8 = 6;
const VECTOR_GP: u8 = 13;
const VECTOR_PF: u8 = 14;
const VECTOR_MF: u8 = 16;

/// Why an instruction could not be completed. The VMM then stops the guest
/// and reports this.
#[derive(Debug, thiserror::Error)]
pub enum AssistError {
    #[error("cannot read or write guest CPU state")]
    Cpu(#[from] crate::HypervisorError),
    #[error("cannot fetch the instruction at {rip:#x}")]
    Fetch { rip: u64 },
    #[error("undecodable instruction bytes {}", hex(.0))]
    Undecodable(Vec<u8>),
    #[error("no assist for `{text}` (bytes {})", hex(.bytes))]
    Unsupported { text: String, bytes: Vec<u8> },
    #[error("unsupported CPU mode: {0}")]
    UnsupportedMode(&'static str),
    #[error("guest page fault at {gva:#x} while completing the instruction")]
    PageFault { gva: u64 },
    #[error("guest physical address {0:#x} is not RAM")]
    BadPhysicalAddress(u64),
    #[error("bad guest descriptor: {0}")]
    BadDescriptor(&'static str),
}

/// Instruction bytes as "0f 0b", for messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The instructions that assists complete, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AssistKind {
    Int3,
    IntN,
    Fwait,
    Popcnt,
    Cmpxchg8b,
    Cmpxchg16b,
    Xrstor,
    Clac,
    Stac,
    /// An x87/SSE control instruction (FNINIT, FLDCW, LDMXCSR, ...).
    X87Control,
}

impl AssistKind {
    pub const ALL: [AssistKind; 10] = [
        AssistKind::Int3,
        AssistKind::IntN,
        AssistKind::Fwait,
        AssistKind::Popcnt,
        AssistKind::Cmpxchg8b,
        AssistKind::Cmpxchg16b,
        AssistKind::Xrstor,
        AssistKind::Clac,
        AssistKind::Stac,
        AssistKind::X87Control,
    ];

    pub fn name(self) -> &'static str {
        match self {
            AssistKind::Int3 => "int3",
            AssistKind::IntN => "int n",
            AssistKind::Fwait => "fwait",
            AssistKind::Popcnt => "popcnt",
            AssistKind::Cmpxchg8b => "cmpxchg8b",
            AssistKind::Cmpxchg16b => "cmpxchg16b",
            AssistKind::Xrstor => "xrstor",
            AssistKind::Clac => "clac",
            AssistKind::Stac => "stac",
            AssistKind::X87Control => "x87 control",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Registers of the vCPU being assisted, written back once at the end.
pub(crate) struct Ctx<'a> {
    cpu: &'a mut dyn CpuState,
    mem: &'a GuestMemoryMmap,
    regs: StandardRegisters,
    sregs: SpecialRegisters,
    sregs_dirty: bool,
    cpl: u8,
}

impl Ctx<'_> {
    fn long_mode(&self) -> bool {
        self.sregs.efer & EFER_LMA != 0 && self.sregs.cs.l == 1
    }

    fn read_u64(&self, gva: u64, cpl: u8) -> Result<u64, AssistError> {
        let mut b = [0u8; 8];
        read_virt(self.mem, &self.sregs, cpl, gva, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_mem(&self, gva: u64, buf: &mut [u8]) -> Result<(), AssistError> {
        read_virt(self.mem, &self.sregs, self.cpl, gva, buf)
    }

    /// Segment base for a segment register, as 64-bit mode applies it.
    fn segment_base(&self, seg: Register) -> u64 {
        let s = &self.sregs;
        match seg {
            Register::FS => s.fs.base,
            Register::GS => s.gs.base,
            _ if self.long_mode() => 0,
            Register::ES => s.es.base,
            Register::CS => s.cs.base,
            Register::SS => s.ss.base,
            _ => s.ds.base,
        }
    }

    /// The linear address of `insn`'s memory operand.
    fn memory_address(&self, insn: &Instruction) -> Result<u64, AssistError> {
        let operand = (0..insn.op_count())
            .find(|&i| insn.op_kind(i) == OpKind::Memory)
            .ok_or(AssistError::BadDescriptor(
                "instruction has no memory operand",
            ))?;
        insn.virtual_address(operand, 0, |reg, _, _| {
            if reg.is_segment_register() {
                Some(self.segment_base(reg))
            } else {
                read_gpr(&self.regs, reg)
            }
        })
        .ok_or(AssistError::BadDescriptor(
            "cannot compute the memory operand",
        ))
    }

    fn set_flags(&mut self, clear: u64, set: u64) {
        self.regs.rflags = (self.regs.rflags & !clear) | set;
    }
}

/// Completes the instruction at the vCPU's RIP, which the accelerator failed
/// to emulate, and updates the vCPU. Returns what was completed.
pub fn complete(
    cpu: &mut dyn CpuState,
    mem: &GuestMemoryMmap,
    failure: &EmulationFailure,
) -> Result<AssistKind, AssistError> {
    let regs = cpu.regs()?;
    let sregs = cpu.sregs()?;
    let cpl = if sregs.cr0 & CR0_PE != 0 {
        sregs.cs.dpl
    } else {
        0
    };
    let mut ctx = Ctx {
        cpu,
        mem,
        regs,
        sregs,
        sregs_dirty: false,
        cpl,
    };
    let (bitness, rip_mask) = if ctx.long_mode() {
        (64, u64::MAX)
    } else if ctx.sregs.cr0 & CR0_PE != 0 && ctx.sregs.cs.db == 1 {
        (32, 0xffff_ffff)
    } else {
        (16, 0xffff)
    };
    let bytes = match &failure.insn_bytes {
        Some(b) => b.clone(),
        None => fetch(&ctx, bitness)?,
    };
    let mut decoder = Decoder::with_ip(bitness, &bytes, ctx.regs.rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(AssistError::Undecodable(bytes));
    }
    let next_rip = ctx.regs.rip.wrapping_add(insn.len() as u64) & rip_mask;

    let kind = match execute(&mut ctx, &insn, next_rip) {
        Ok(kind) => kind,
        Err(AssistError::PageFault { gva }) => {
            // A data access faulted: deliver #PF as the CPU would.
            ctx.sregs.cr2 = gva;
            ctx.sregs_dirty = true;
            let code = if insn.op0_kind() == OpKind::Memory {
                2
            } else {
                0
            };
            deliver(
                &mut ctx,
                VECTOR_PF,
                Event::Fault {
                    error_code: Some(code),
                },
            )?;
            kind_of(&insn).ok_or_else(|| unsupported(&insn, &bytes))?
        }
        Err(AssistError::Unsupported { .. }) => return Err(unsupported(&insn, &bytes)),
        Err(e) => return Err(e),
    };
    if ctx.sregs_dirty {
        ctx.cpu.set_sregs(&ctx.sregs)?;
    }
    ctx.cpu.set_regs(&ctx.regs)?;
    Ok(kind)
}

fn unsupported(insn: &Instruction, bytes: &[u8]) -> AssistError {
    AssistError::Unsupported {
        text: insn.to_string(),
        bytes: bytes[..insn.len().min(bytes.len())].to_vec(),
    }
}

/// Fetches up to 15 instruction bytes at CS:RIP, stopping at an unmapped
/// page.
fn fetch(ctx: &Ctx<'_>, bitness: u32) -> Result<Vec<u8>, AssistError> {
    let base = if bitness == 64 { 0 } else { ctx.sregs.cs.base };
    let linear = base.wrapping_add(ctx.regs.rip);
    let mut bytes = vec![0u8; 15];
    if ctx.read_mem(linear, &mut bytes).is_ok() {
        return Ok(bytes);
    }
    let to_page_end = (paging::PAGE_SIZE - linear % paging::PAGE_SIZE) as usize;
    bytes.truncate(to_page_end.min(15));
    ctx.read_mem(linear, &mut bytes)
        .map_err(|_| AssistError::Fetch { rip: ctx.regs.rip })?;
    Ok(bytes)
}

fn kind_of(insn: &Instruction) -> Option<AssistKind> {
    Some(match insn.code() {
        Code::Int3 => AssistKind::Int3,
        Code::Int_imm8 => AssistKind::IntN,
        Code::Wait => AssistKind::Fwait,
        Code::Popcnt_r16_rm16 | Code::Popcnt_r32_rm32 | Code::Popcnt_r64_rm64 => AssistKind::Popcnt,
        Code::Cmpxchg8b_m64 => AssistKind::Cmpxchg8b,
        Code::Cmpxchg16b_m128 => AssistKind::Cmpxchg16b,
        Code::Xrstor_mem | Code::Xrstor64_mem => AssistKind::Xrstor,
        Code::Clac => AssistKind::Clac,
        Code::Stac => AssistKind::Stac,
        c if x87::handles(c) => AssistKind::X87Control,
        _ => return None,
    })
}

fn execute(
    ctx: &mut Ctx<'_>,
    insn: &Instruction,
    next_rip: u64,
) -> Result<AssistKind, AssistError> {
    let kind = kind_of(insn).ok_or(AssistError::Unsupported {
        text: String::new(),
        bytes: Vec::new(),
    })?;
    match kind {
        AssistKind::Int3 => {
            deliver(ctx, 3, Event::Software { next_rip })?;
            return Ok(kind);
        }
        AssistKind::IntN => {
            deliver(ctx, insn.immediate8(), Event::Software { next_rip })?;
            return Ok(kind);
        }
        AssistKind::Fwait => {
            let fpu = ctx.cpu.fpu()?;
            if fpu.fsw & FSW_ES != 0 && ctx.sregs.cr0 & CR0_NE != 0 {
                // A pending unmasked x87 exception is reported here.
                deliver(ctx, VECTOR_MF, Event::Fault { error_code: None })?;
                return Ok(kind);
            }
        }
        AssistKind::Popcnt => popcnt(ctx, insn)?,
        AssistKind::Cmpxchg8b
        | AssistKind::Cmpxchg16b
        | AssistKind::Xrstor
        | AssistKind::X87Control => {
            // Each returns false for a general-protection fault.
            let done = match kind {
                AssistKind::Xrstor => xsave::xrstor(ctx, insn)?,
                AssistKind::X87Control => x87::execute(ctx, insn)?,
                _ => cmpxchg(ctx, insn, kind)?,
            };
            if !done {
                deliver(
                    ctx,
                    VECTOR_GP,
                    Event::Fault {
                        error_code: Some(0),
                    },
                )?;
                return Ok(kind);
            }
        }
        AssistKind::Clac | AssistKind::Stac => {
            if ctx.cpl != 0 {
                deliver(ctx, VECTOR_UD, Event::Fault { error_code: None })?;
                return Ok(kind);
            }
            if kind == AssistKind::Clac {
                ctx.set_flags(RFLAGS_AC, 0);
            } else {
                ctx.set_flags(0, RFLAGS_AC);
            }
        }
    }
    ctx.regs.rip = next_rip;
    Ok(kind)
}

fn popcnt(ctx: &mut Ctx<'_>, insn: &Instruction) -> Result<(), AssistError> {
    let size = insn.op0_register().size();
    let src = match insn.op1_kind() {
        OpKind::Register => read_gpr(&ctx.regs, insn.op1_register())
            .ok_or(AssistError::BadDescriptor("bad POPCNT source register"))?,
        _ => {
            let addr = ctx.memory_address(insn)?;
            let mut b = [0u8; 8];
            ctx.read_mem(addr, &mut b[..size])?;
            u64::from_le_bytes(b)
        }
    };
    write_gpr(
        &mut ctx.regs,
        insn.op0_register(),
        u64::from(src.count_ones()),
    );
    let zf = if src == 0 { RFLAGS_ZF } else { 0 };
    ctx.set_flags(
        RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF,
        zf,
    );
    Ok(())
}

/// CMPXCHG8B/16B, atomically on the host mapping of guest memory so other
/// vCPUs see a locked operation. Returns false for #GP (misalignment).
fn cmpxchg(ctx: &mut Ctx<'_>, insn: &Instruction, kind: AssistKind) -> Result<bool, AssistError> {
    let size: u64 = if kind == AssistKind::Cmpxchg16b {
        16
    } else {
        8
    };
    let gva = ctx.memory_address(insn)?;
    if size == 16 && gva % 16 != 0 {
        return Ok(false);
    }
    if gva % paging::PAGE_SIZE + size > paging::PAGE_SIZE {
        // Crossing a page cannot be done as one host access; the guest
        // kernel never does this (it aligns these operands).
        return Err(AssistError::UnsupportedMode(
            "CMPXCHG operand crossing a page",
        ));
    }
    let gpa = translate(ctx.mem, &ctx.sregs, gva, Access::Write, ctx.cpl)?;
    // The whole operand must lie in one RAM region for the host access.
    let host = ctx
        .mem
        .get_slice(GuestAddress(gpa), size as usize)
        .map_err(|_| AssistError::BadPhysicalAddress(gpa))?
        .ptr_guard_mut()
        .as_ptr();
    let r = &mut ctx.regs;
    let equal = if size == 16 {
        let (lo, hi, eq) = host_cmpxchg16b(host, r.rax, r.rdx, r.rbx, r.rcx);
        if !eq {
            r.rax = lo;
            r.rdx = hi;
        }
        eq
    } else {
        let expected = (r.rdx << 32) | (r.rax & 0xffff_ffff);
        let new = (r.rcx << 32) | (r.rbx & 0xffff_ffff);
        let (old, eq) = host_cmpxchg8b(host, expected, new);
        if !eq {
            r.rax = old & 0xffff_ffff;
            r.rdx = old >> 32;
        }
        eq
    };
    ctx.set_flags(RFLAGS_ZF, if equal { RFLAGS_ZF } else { 0 });
    Ok(true)
}

/// `lock cmpxchg16b` on host memory. Inline assembly because Rust has no
/// stable 128-bit atomic; RBX is reserved by the compiler, hence the swap.
fn host_cmpxchg16b(
    ptr: *mut u8,
    exp_lo: u64,
    exp_hi: u64,
    new_lo: u64,
    new_hi: u64,
) -> (u64, u64, bool) {
    let (lo, hi, ok): (u64, u64, u8);
    // SAFETY: `ptr` addresses 16 bytes of mapped guest RAM (checked by
    // get_slice), aligned to 16 (checked by the caller), so the locked
    // access is valid; guest memory may be changed concurrently, which is
    // what the lock prefix is for. RBX is restored before the block ends.
    unsafe {
        std::arch::asm!(
            "xchg {tmp}, rbx",
            "lock cmpxchg16b xmmword ptr [{ptr}]",
            "sete {ok}",
            "mov rbx, {tmp}",
            ptr = in(reg) ptr,
            tmp = inout(reg) new_lo => _,
            ok = out(reg_byte) ok,
            inout("rax") exp_lo => lo,
            inout("rdx") exp_hi => hi,
            in("rcx") new_hi,
            options(nostack),
        );
    }
    (lo, hi, ok != 0)
}

/// `lock cmpxchg` of 8 bytes on host memory, which is what CMPXCHG8B does.
fn host_cmpxchg8b(ptr: *mut u8, expected: u64, new: u64) -> (u64, bool) {
    let (old, ok): (u64, u8);
    // SAFETY: `ptr` addresses 8 bytes of mapped guest RAM within one page
    // (checked by the caller); x86 permits locked unaligned accesses.
    unsafe {
        std::arch::asm!(
            "lock cmpxchg qword ptr [{ptr}], {new}",
            "sete {ok}",
            ptr = in(reg) ptr,
            new = in(reg) new,
            ok = out(reg_byte) ok,
            inout("rax") expected => old,
            options(nostack),
        );
    }
    (old, ok != 0)
}

fn gpr_slot(regs: &mut StandardRegisters, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::BH | Register::CH | Register::DH
    )
}

/// Reads a general-purpose register of any width.
fn read_gpr(regs: &StandardRegisters, reg: Register) -> Option<u64> {
    let mut copy = *regs;
    let full = *gpr_slot(&mut copy, reg.full_register())?;
    Some(match reg.size() {
        8 => full,
        4 => full & 0xffff_ffff,
        2 => full & 0xffff,
        1 if is_high_byte(reg) => (full >> 8) & 0xff,
        1 => full & 0xff,
        _ => return None,
    })
}

/// Writes a general-purpose register with x86-64 semantics: 32-bit writes
/// zero the upper half, 16- and 8-bit writes keep the other bits.
fn write_gpr(regs: &mut StandardRegisters, reg: Register, value: u64) {
    let size = reg.size();
    let high = is_high_byte(reg);
    if let Some(slot) = gpr_slot(regs, reg.full_register()) {
        *slot = match size {
            8 => value,
            4 => value & 0xffff_ffff,
            2 => (*slot & !0xffff) | (value & 0xffff),
            1 if high => (*slot & !0xff00) | ((value & 0xff) << 8),
            _ => (*slot & !0xff) | (value & 0xff),
        };
    }
}

#[cfg(test)]
mod tests;
