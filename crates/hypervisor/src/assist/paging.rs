//! Guest-virtual to guest-physical translation, by walking the guest's page
//! tables in guest memory. Written by hand: the assists need the walk to be
//! exact and testable without an accelerator, and no rust-vmm crate offers
//! it.

use vm_memory::{Bytes, GuestAddress};

use super::AssistError;
use crate::x86::{CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, EFER_LMA};
use crate::{GuestMemoryMmap, SpecialRegisters};

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

pub const PAGE_SIZE: u64 = 4096;

/// How an address is accessed, for the permission checks of the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Translates `gva` for an access at privilege level `cpl`.
pub fn translate(
    mem: &GuestMemoryMmap,
    sregs: &SpecialRegisters,
    gva: u64,
    access: Access,
    cpl: u8,
) -> Result<u64, AssistError> {
    if sregs.cr0 & CR0_PG == 0 {
        return Ok(gva & 0xffff_ffff);
    }
    if sregs.efer & EFER_LMA == 0 || sregs.cr4 & CR4_PAE == 0 {
        return Err(AssistError::UnsupportedMode("paging outside long mode"));
    }
    let levels: u32 = if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let fault = || AssistError::PageFault { gva };
    let mut table = sregs.cr3 & PTE_ADDR_MASK;
    let mut writable = true;
    let mut user = true;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let index = (gva >> shift) & 0x1ff;
        let entry: u64 = mem
            .read_obj(GuestAddress(table + index * 8))
            .map_err(|_| AssistError::BadPhysicalAddress(table + index * 8))?;
        if entry & PTE_PRESENT == 0 {
            return Err(fault());
        }
        writable &= entry & PTE_WRITABLE != 0;
        user &= entry & PTE_USER != 0;
        let leaf = level == 1 || ((level == 2 || level == 3) && entry & PTE_HUGE != 0);
        if leaf {
            if cpl == 3 && !user {
                return Err(fault());
            }
            if access == Access::Write && !writable && (cpl == 3 || sregs.cr0 & CR0_WP != 0) {
                return Err(fault());
            }
            let page_mask = (1u64 << shift) - 1;
            return Ok((entry & PTE_ADDR_MASK & !page_mask) | (gva & page_mask));
        }
        table = entry & PTE_ADDR_MASK;
    }
    Err(fault())
}

/// Reads `buf.len()` bytes at guest-virtual `gva`, page by page.
pub fn read_virt(
    mem: &GuestMemoryMmap,
    sregs: &SpecialRegisters,
    cpl: u8,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), AssistError> {
    let mut done = 0usize;
    while done < buf.len() {
        let addr = gva.wrapping_add(done as u64);
        let chunk = ((PAGE_SIZE - addr % PAGE_SIZE) as usize).min(buf.len() - done);
        let gpa = translate(mem, sregs, addr, Access::Read, cpl)?;
        mem.read_slice(&mut buf[done..done + chunk], GuestAddress(gpa))
            .map_err(|_| AssistError::BadPhysicalAddress(gpa))?;
        done += chunk;
    }
    Ok(())
}

/// Writes `buf` at guest-virtual `gva`, page by page. All pages are
/// translated before anything is written, so a fault writes nothing.
pub fn write_virt(
    mem: &GuestMemoryMmap,
    sregs: &SpecialRegisters,
    cpl: u8,
    gva: u64,
    buf: &[u8],
) -> Result<(), AssistError> {
    let mut pieces = Vec::with_capacity(2);
    let mut done = 0usize;
    while done < buf.len() {
        let addr = gva.wrapping_add(done as u64);
        let chunk = ((PAGE_SIZE - addr % PAGE_SIZE) as usize).min(buf.len() - done);
        let gpa = translate(mem, sregs, addr, Access::Write, cpl)?;
        pieces.push((gpa, done, chunk));
        done += chunk;
    }
    for (gpa, start, len) in pieces {
        mem.write_slice(&buf[start..start + len], GuestAddress(gpa))
            .map_err(|_| AssistError::BadPhysicalAddress(gpa))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Guest memory with 4-level tables at 0x1000.. mapping:
    /// - 0xffff_8000_0000_0000 + 0x20_0000 via a 2 MiB page to 0x40_0000,
    /// - 0x7000 identity via 4 KiB pages (read-only),
    /// - 0x40_0000_0000 via a 1 GiB page to 0 (user).
    pub(crate) fn paged_memory() -> (GuestMemoryMmap, SpecialRegisters) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let w = |addr: u64, val: u64| mem.write_obj(val, GuestAddress(addr)).unwrap();
        // PML4 at 0x1000.
        w(0x1000 + 256 * 8, 0x2000 | 3); // 0xffff_8000_0000_0000
        w(0x1000, 0x3000 | 7); // low half, user
                               // PDPT for the high half at 0x2000: entry 0 -> PD at 0x4000.
        w(0x2000, 0x4000 | 3);
        // PD at 0x4000: entry 1 (2 MiB..4 MiB) is a 2 MiB page at 4 MiB.
        w(0x4000 + 8, 0x40_0000 | 0x83);
        // Low PDPT at 0x3000: entry 0 -> PD at 0x5000; entry 256 is 1 GiB.
        w(0x3000, 0x5000 | 7);
        w(0x3000 + 256 * 8, 0x87);
        // PD 0x5000 entry 0 -> PT at 0x6000; PT entry 7 -> 0x7000, read-only.
        w(0x5000, 0x6000 | 7);
        w(0x6000 + 7 * 8, 0x7000 | 5);
        let sregs = SpecialRegisters {
            cr0: CR0_PG | CR0_WP | 1,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            ..Default::default()
        };
        (mem, sregs)
    }

    #[test]
    fn walks_4k_2m_and_1g_pages() {
        let (mem, sregs) = paged_memory();
        let t = |gva, access| translate(&mem, &sregs, gva, access, 0);
        assert_eq!(t(0xffff_8000_0020_1234, Access::Write).unwrap(), 0x40_1234);
        assert_eq!(t(0x7abc, Access::Read).unwrap(), 0x7abc);
        assert_eq!(t(0x40_0000_0123, Access::Read).unwrap(), 0x123);
    }

    #[test]
    fn faults_on_missing_and_read_only_pages() {
        let (mem, sregs) = paged_memory();
        assert!(matches!(
            translate(&mem, &sregs, 0x8000, Access::Read, 0),
            Err(AssistError::PageFault { gva: 0x8000 })
        ));
        assert!(matches!(
            translate(&mem, &sregs, 0x7000, Access::Write, 0),
            Err(AssistError::PageFault { .. })
        ));
        // Supervisor-only page from CPL 3.
        assert!(translate(&mem, &sregs, 0xffff_8000_0020_0000, Access::Read, 3).is_err());
    }

    #[test]
    fn table_outside_memory_is_an_error_not_a_panic() {
        let (mem, mut sregs) = paged_memory();
        sregs.cr3 = 0xffff_f000_0000;
        assert!(matches!(
            translate(&mem, &sregs, 0x1000, Access::Read, 0),
            Err(AssistError::BadPhysicalAddress(_))
        ));
    }

    #[test]
    fn no_paging_is_identity() {
        let (mem, mut sregs) = paged_memory();
        sregs.cr0 = 1;
        assert_eq!(
            translate(&mem, &sregs, 0x1234, Access::Write, 0).unwrap(),
            0x1234
        );
    }

    #[test]
    fn virtual_reads_and_writes_cross_pages() {
        let (mem, sregs) = paged_memory();
        let gva = 0xffff_8000_0020_0ffe;
        write_virt(&mem, &sregs, 0, gva, &[1, 2, 3, 4]).unwrap();
        let mut buf = [0u8; 4];
        read_virt(&mem, &sregs, 0, gva, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        let mut phys = [0u8; 4];
        mem.read_slice(&mut phys, GuestAddress(0x40_0ffe)).unwrap();
        assert_eq!(phys, [1, 2, 3, 4]);
    }
}
