//! XRSTOR (standard format) into the vCPU's XSAVE state.
//!
//! The accelerator's XSAVE image (KVM_GET/SET_XSAVE) uses the standard,
//! non-compacted layout, the same as XRSTOR's memory operand in standard
//! form, so each requested component is copied at its own offset and the
//! image's XSTATE_BV says which components hold data and which are in their
//! initial state.

use iced_x86::Instruction;

use super::AssistError;
use super::Ctx;

const LEGACY_AREA: usize = 512;
const HEADER_SIZE: usize = 64;
const X87: u64 = 1 << 0;
const SSE: u64 = 1 << 1;
const YMM: u64 = 1 << 2;

/// Offset and size of extended state component `i` (2..63) in the standard
/// layout, from CPUID leaf 0xD of the host, whose layout the accelerator's
/// XSAVE image follows.
fn component_layout(i: u32) -> (usize, usize) {
    let leaf = std::arch::x86_64::__cpuid_count(0xd, i);
    (leaf.ebx as usize, leaf.eax as usize)
}

/// Performs XRSTOR; returns false when the CPU would raise #GP.
pub(super) fn xrstor(ctx: &mut Ctx<'_>, insn: &Instruction) -> Result<bool, AssistError> {
    let addr = ctx.memory_address(insn)?;
    if addr % 64 != 0 {
        return Ok(false);
    }
    let xcr0 = ctx.cpu.xcr0()?;
    let rfbm = xcr0 & ((ctx.regs.rdx << 32) | (ctx.regs.rax & 0xffff_ffff));
    let mut header = [0u8; HEADER_SIZE];
    ctx.read_mem(addr.wrapping_add(LEGACY_AREA as u64), &mut header)?;
    let xstate_bv = u64::from_le_bytes(header[0..8].try_into().unwrap_or_default());
    let xcomp_bv = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    if xcomp_bv != 0 {
        // Compacted form (XCOMP_BV[63] set) is not implemented; any other
        // nonzero XCOMP_BV is #GP in standard form.
        if xcomp_bv >> 63 == 1 {
            return Err(AssistError::UnsupportedMode(
                "XRSTOR of a compacted XSAVE area",
            ));
        }
        return Ok(false);
    }
    if xstate_bv & !xcr0 != 0 || header[16..].iter().any(|&b| b != 0) {
        return Ok(false);
    }

    let mut image = ctx.cpu.xsave()?;
    // SAFETY: kvm_xsave's region is 1024 u32s of plain data; viewing it as
    // 4096 bytes is sound (u8 has no alignment or validity requirements).
    let region: &mut [u8; 4096] = unsafe { &mut *image.region.as_mut_ptr().cast::<[u8; 4096]>() };
    let mut image_bv = u64::from_le_bytes(
        region[LEGACY_AREA..LEGACY_AREA + 8]
            .try_into()
            .unwrap_or_default(),
    );

    if rfbm & X87 != 0 {
        let mut x87 = [0u8; 160];
        if xstate_bv & X87 != 0 {
            ctx.read_mem(addr, &mut x87)?;
        } else {
            x87[0..2].copy_from_slice(&0x037fu16.to_le_bytes()); // FCW
        }
        region[0..24].copy_from_slice(&x87[0..24]);
        region[32..160].copy_from_slice(&x87[32..160]);
        image_bv |= X87;
    }
    if rfbm & SSE != 0 {
        let mut xmm = [0u8; 256];
        if xstate_bv & SSE != 0 {
            ctx.read_mem(addr.wrapping_add(160), &mut xmm)?;
        }
        region[160..416].copy_from_slice(&xmm);
        image_bv |= SSE;
    }
    if rfbm & (SSE | YMM) != 0 {
        // MXCSR is loaded whenever SSE or AVX state is requested.
        let mut mxcsr = [0u8; 4];
        ctx.read_mem(addr.wrapping_add(24), &mut mxcsr)?;
        region[24..28].copy_from_slice(&mxcsr);
        image_bv |= SSE;
    }
    for i in 2..63u32 {
        let bit = 1u64 << i;
        if rfbm & bit == 0 {
            continue;
        }
        let (offset, size) = component_layout(i);
        let Some(dst) = region.get_mut(offset..offset + size) else {
            return Err(AssistError::UnsupportedMode("XSAVE component beyond 4 KiB"));
        };
        if xstate_bv & bit != 0 {
            read_virt_into(ctx, addr.wrapping_add(offset as u64), dst)?;
            image_bv |= bit;
        } else {
            dst.fill(0);
            image_bv &= !bit;
        }
    }
    region[LEGACY_AREA..LEGACY_AREA + 8].copy_from_slice(&image_bv.to_le_bytes());
    ctx.cpu.set_xsave(&image)?;
    Ok(true)
}

fn read_virt_into(ctx: &Ctx<'_>, gva: u64, dst: &mut [u8]) -> Result<(), AssistError> {
    ctx.read_mem(gva, dst)
}
