//! Delivering an interrupt or exception through the guest's IDT, in 64-bit
//! (IA-32e) mode, as the CPU does: gate lookup, stack selection (same
//! level, privilege change through the TSS, or IST), the frame push, and the
//! new CS:RIP and RFLAGS.

use super::paging::{read_virt, write_virt};
use super::{AssistError, Ctx};
use crate::x86::{RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_TF, RFLAGS_VM};
use crate::SegmentRegister;

const GATE_INTERRUPT: u8 = 0xe;
const GATE_TRAP: u8 = 0xf;

/// How the event arose, which decides the return address, the gate-DPL
/// check, and whether an error code is pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
    /// INT n / INT3: returns after the instruction; gate DPL is checked.
    Software { next_rip: u64 },
    /// A fault: returns to the faulting instruction.
    Fault { error_code: Option<u32> },
}

/// One decoded 64-bit IDT gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gate {
    offset: u64,
    selector: u16,
    ist: u8,
    kind: u8,
    dpl: u8,
    present: bool,
}

impl Gate {
    fn parse(b: &[u8; 16]) -> Self {
        let word = |i: usize| u64::from(u16::from_le_bytes([b[i], b[i + 1]]));
        let high = u64::from(u32::from_le_bytes([b[8], b[9], b[10], b[11]]));
        Gate {
            offset: word(0) | (word(6) << 16) | (high << 32),
            selector: u16::from_le_bytes([b[2], b[3]]),
            ist: b[4] & 7,
            kind: b[5] & 0xf,
            dpl: (b[5] >> 5) & 3,
            present: b[5] & 0x80 != 0,
        }
    }
}

/// Reads the GDT descriptor of `selector` into the register form.
fn load_code_segment(ctx: &Ctx<'_>, selector: u16) -> Result<SegmentRegister, AssistError> {
    let gdt = ctx.sregs.gdt;
    if selector & 4 != 0 {
        return Err(AssistError::UnsupportedMode(
            "interrupt gate selector in the LDT",
        ));
    }
    let index = u64::from(selector & !7);
    if index == 0 || index + 7 > u64::from(gdt.limit) {
        return Err(AssistError::BadDescriptor("gate selector outside the GDT"));
    }
    let mut d = [0u8; 8];
    read_virt(ctx.mem, &ctx.sregs, 0, gdt.base.wrapping_add(index), &mut d)?;
    let access = d[5];
    let flags = d[6] >> 4;
    if access & 0x80 == 0 || access & 0x18 != 0x18 {
        return Err(AssistError::BadDescriptor(
            "gate selector is not a present code segment",
        ));
    }
    let raw_limit = u32::from(u16::from_le_bytes([d[0], d[1]])) | (u32::from(d[6] & 0xf) << 16);
    let granular = flags & 8 != 0;
    Ok(SegmentRegister {
        base: u64::from(u32::from_le_bytes([d[2], d[3], d[4], d[7]])),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: access & 0xf,
        present: 1,
        dpl: (access >> 5) & 3,
        db: (flags >> 2) & 1,
        s: 1,
        l: (flags >> 1) & 1,
        g: flags >> 3,
        avl: flags & 1,
        unusable: 0,
        padding: 0,
    })
}

/// Delivers `vector` to the guest. On success the context's registers point
/// at the handler with the frame pushed.
pub(super) fn deliver(ctx: &mut Ctx<'_>, vector: u8, event: Event) -> Result<(), AssistError> {
    if !ctx.long_mode() {
        return Err(AssistError::UnsupportedMode(
            "interrupt delivery outside 64-bit mode",
        ));
    }
    let idt = ctx.sregs.idt;
    let offset = u64::from(vector) * 16;
    if offset + 15 > u64::from(idt.limit) {
        return Err(AssistError::BadDescriptor("vector beyond the IDT limit"));
    }
    let mut raw = [0u8; 16];
    read_virt(
        ctx.mem,
        &ctx.sregs,
        0,
        idt.base.wrapping_add(offset),
        &mut raw,
    )?;
    let gate = Gate::parse(&raw);
    if !gate.present || (gate.kind != GATE_INTERRUPT && gate.kind != GATE_TRAP) {
        return Err(AssistError::BadDescriptor(
            "IDT gate not present or not an interrupt/trap gate",
        ));
    }
    if matches!(event, Event::Software { .. }) && gate.dpl < ctx.cpl {
        return Err(AssistError::BadDescriptor(
            "software interrupt through a more privileged gate",
        ));
    }
    let mut cs = load_code_segment(ctx, gate.selector)?;
    if cs.l != 1 {
        return Err(AssistError::BadDescriptor(
            "interrupt handler segment is not 64-bit code",
        ));
    }
    let new_cpl = cs.dpl.min(ctx.cpl);
    cs.selector = (gate.selector & !3) | u16::from(new_cpl);
    cs.dpl = new_cpl;

    let tss = ctx.sregs.tr.base;
    let mut stack = ctx.regs.rsp;
    if gate.ist != 0 {
        stack = ctx.read_u64(tss.wrapping_add(0x24 + 8 * u64::from(gate.ist - 1)), 0)?;
    } else if new_cpl < ctx.cpl {
        stack = ctx.read_u64(tss.wrapping_add(4 + 8 * u64::from(new_cpl)), 0)?;
    }
    stack &= !0xf;

    let return_rip = match event {
        Event::Software { next_rip } => next_rip,
        Event::Fault { .. } => ctx.regs.rip,
    };
    let mut frame = vec![
        u64::from(ctx.sregs.ss.selector),
        ctx.regs.rsp,
        ctx.regs.rflags,
        u64::from(ctx.sregs.cs.selector),
        return_rip,
    ];
    if let Event::Fault {
        error_code: Some(code),
    } = event
    {
        frame.push(u64::from(code));
    }
    // Linear addresses wrap, as on the CPU; the guest chose them.
    let new_rsp = stack.wrapping_sub(8 * frame.len() as u64);
    // The frame in memory, lowest address first.
    let bytes: Vec<u8> = frame.iter().rev().flat_map(|v| v.to_le_bytes()).collect();
    write_virt(ctx.mem, &ctx.sregs, new_cpl, new_rsp, &bytes)?;

    if new_cpl != ctx.cpl {
        // 64-bit mode loads a null SS carrying the new privilege level.
        ctx.sregs.ss = SegmentRegister {
            selector: u16::from(new_cpl),
            dpl: new_cpl,
            ..ctx.sregs.ss
        };
    }
    ctx.sregs.cs = cs;
    ctx.sregs_dirty = true;
    ctx.cpl = new_cpl;
    ctx.regs.rsp = new_rsp;
    ctx.regs.rip = gate.offset;
    ctx.regs.rflags &= !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
    if gate.kind == GATE_INTERRUPT {
        ctx.regs.rflags &= !RFLAGS_IF;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_fields() {
        // offset 0xffffffff81234567, selector 0x10, IST 2, interrupt gate,
        // DPL 3, present.
        let b = [
            0x67, 0x45, 0x10, 0x00, 0x02, 0xee, 0x23, 0x81, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ];
        let g = Gate::parse(&b);
        assert_eq!(
            g,
            Gate {
                offset: 0xffff_ffff_8123_4567,
                selector: 0x10,
                ist: 2,
                kind: GATE_INTERRUPT,
                dpl: 3,
                present: true
            }
        );
    }
}
