//! The ACPI fixed-hardware power-management block of the `pc` machine:
//! PM1 event (status/enable) and control registers, the PM timer, GPE0,
//! and a reset register — what the FADT describes and every ACPI OS
//! (Windows included, which needs fixed hardware on x86) drives: the
//! power button, S5 (soft off) and an ACPI reset.
//!
//! Written here: a register block of a few ports, defined by the ACPI
//! specification (4.8 "ACPI hardware model"); the crates in the field
//! (acpi_tables) build the tables that describe it, not the device.
//!
//! Layout from [`PM_BASE`]: PM1a_EVT (status 2, enable 2), PM1a_CNT (2),
//! two reserved bytes, PM_TMR (4), GPE0 (status 2, enable 2), RESET (1).
//! The SCI (the ACPI interrupt) is asserted while any enabled status bit
//! is set; it is an eventfd pulse on each rise and on each resample (the
//! VMM's level-triggered-interrupt EOI), so a level the guest did not
//! clear is delivered again.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use snapshot::Persist;
use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, PlatformRequest, PlatformRequestSink};

/// The block's first port.
pub const PM_BASE: u64 = 0x600;
/// The ports it covers.
pub const PM_LEN: u64 = 0x11;

/// Offsets (and lengths, for the FADT) of the registers.
pub const PM1_EVT: u64 = 0x0;
pub const PM1_EVT_LEN: u8 = 4;
pub const PM1_CNT: u64 = 0x4;
pub const PM1_CNT_LEN: u8 = 2;
pub const PM_TMR: u64 = 0x8;
pub const PM_TMR_LEN: u8 = 4;
pub const GPE0: u64 = 0xc;
pub const GPE0_LEN: u8 = 4;
pub const RESET: u64 = 0x10;
/// What the guest writes to [`RESET`] to reset the machine (the FADT's
/// RESET_VALUE).
pub const RESET_VALUE: u8 = 0x06;
/// The SLP_TYP value of S5, which the DSDT's `\_S5` package names.
pub const SLP_TYP_S5: u16 = 5;
/// The PM timer's frequency (ACPI: 3.579545 MHz).
pub const PM_TIMER_HZ: u128 = 3_579_545;

/// PM1 status/enable bits.
pub const TMR_STS: u16 = 1 << 0;
pub const GBL_STS: u16 = 1 << 5;
pub const PWRBTN_STS: u16 = 1 << 8;
pub const SLPBTN_STS: u16 = 1 << 9;
pub const RTC_STS: u16 = 1 << 10;
pub const WAK_STS: u16 = 1 << 15;
/// The status bits this block can set; the rest read as 0.
const PM1_STS_MASK: u16 = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS | WAK_STS;
const PM1_EN_MASK: u16 = TMR_STS | GBL_STS | PWRBTN_STS | SLPBTN_STS | RTC_STS;

/// PM1 control bits.
pub const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;
/// Control bits kept (SLP_EN is write-only).
const PM1_CNT_MASK: u16 = SCI_EN | 0b110 | SLP_TYP_MASK;

pub struct AcpiPm {
    pm1_sts: u16,
    pm1_en: u16,
    pm1_cnt: u16,
    gpe0_sts: u16,
    gpe0_en: u16,
    /// The timer counts from here: its value is the ticks since `epoch`
    /// plus `timer_base`.
    epoch: Instant,
    timer_base: u32,
    sci: EventFd,
    /// Whether the SCI was asserted at the last change.
    sci_level: bool,
    requests: PlatformRequestSink,
}

impl AcpiPm {
    /// A block in ACPI mode (SCI_EN set: there is no SMI command port to
    /// switch modes), raising its SCI through `sci` and asking the machine
    /// to power off or reset through `requests`.
    pub fn new(sci: EventFd, requests: PlatformRequestSink) -> Self {
        AcpiPm {
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: SCI_EN,
            gpe0_sts: 0,
            gpe0_en: 0,
            epoch: Instant::now(),
            timer_base: 0,
            sci,
            sci_level: false,
            requests,
        }
    }

    /// The power button was pressed (`hostvisor stop` without an agent):
    /// the guest's ACPI sees a fixed power-button event.
    pub fn press_power_button(&mut self) {
        self.pm1_sts |= PWRBTN_STS;
        self.update_sci();
    }

    /// Raises general-purpose event `bit` (0..16) of GPE0.
    pub fn raise_gpe(&mut self, bit: u8) {
        if let Some(mask) = 1u16.checked_shl(u32::from(bit)) {
            self.gpe0_sts |= mask;
            self.update_sci();
        }
    }

    /// Whether the SCI is asserted now: an enabled event is pending.
    pub fn sci_pending(&self) -> bool {
        self.pm1_sts & self.pm1_en != 0 || self.gpe0_sts & self.gpe0_en != 0
    }

    /// The guest ended a level-triggered SCI (its EOI): if the level is
    /// still up, it is delivered again.
    pub fn resample(&mut self) {
        if self.sci_pending() {
            self.pulse();
        }
    }

    fn update_sci(&mut self) {
        let level = self.sci_pending();
        if level && !self.sci_level {
            self.pulse();
        }
        self.sci_level = level;
    }

    fn pulse(&self) {
        if let Err(e) = self.sci.write(1) {
            tracing::warn!("ACPI SCI lost: {e}");
        }
    }

    fn timer(&self) -> u32 {
        let ticks = self.epoch.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000;
        // The timer is 32 bits wide and wraps.
        self.timer_base
            .wrapping_add(u32::try_from(ticks % (1u128 << 32)).unwrap_or(0))
    }

    fn write_cnt(&mut self, value: u16) {
        self.pm1_cnt = (value & PM1_CNT_MASK) | SCI_EN;
        if value & SLP_EN != 0 {
            let typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
            if typ == SLP_TYP_S5 {
                (self.requests)(PlatformRequest::PowerOff);
            } else {
                // No other sleep state is offered (the DSDT names only
                // \_S5); an OS that tries one anyway stays awake.
                tracing::warn!("the guest asked for ACPI sleep type {typ}, which is not offered");
            }
        }
    }

    /// The value of the 16-bit register at `reg` (PM1/GPE0 halves), for
    /// reads of any width within the block.
    fn reg16(&self, reg: u64) -> u16 {
        match reg {
            0x0 => self.pm1_sts,
            0x2 => self.pm1_en,
            0x4 => self.pm1_cnt,
            0xc => self.gpe0_sts,
            0xe => self.gpe0_en,
            _ => 0,
        }
    }

    /// A write of the bytes `mask` selects of `value` into the 16-bit
    /// register at `reg`.
    fn write16(&mut self, reg: u64, mask: u16, value: u16) {
        let merge = |old: u16| (old & !mask) | (value & mask);
        match reg {
            // Status bits are cleared by writing 1s.
            0x0 => self.pm1_sts &= !(value & mask),
            0x2 => self.pm1_en = merge(self.pm1_en) & PM1_EN_MASK,
            0x4 => self.write_cnt(merge(self.pm1_cnt)),
            0xc => self.gpe0_sts &= !(value & mask),
            0xe => self.gpe0_en = merge(self.gpe0_en),
            _ => {}
        }
        self.update_sci();
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let timer = self.timer().to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = match at {
                o if (PM_TMR..PM_TMR + 4).contains(&o) => {
                    timer[usize::try_from(o - PM_TMR).unwrap_or(0)]
                }
                o if o < RESET => self.reg16(o & !1).to_le_bytes()[usize::from(o & 1 == 1)],
                _ => 0,
            };
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == RESET {
            if data.first() == Some(&RESET_VALUE) {
                (self.requests)(PlatformRequest::Reset);
            }
            return;
        }
        // The registers are 16 bits wide; a write of any width at any
        // offset changes the bytes it covers, register by register (a
        // 32-bit write to PM1_EVT sets status and enable together).
        let mut pending: Option<(u64, u16, u16)> = None;
        for (i, &byte) in data.iter().enumerate() {
            let at = offset + i as u64;
            if at >= RESET || (PM_TMR..PM_TMR + 4).contains(&at) {
                continue;
            }
            let (reg, shift) = (at & !1, (at & 1) * 8);
            let (mask, value) = (0xffu16 << shift, u16::from(byte) << shift);
            pending = match pending {
                Some((r, m, v)) if r == reg => Some((r, m | mask, v | value)),
                Some((r, m, v)) => {
                    self.write16(r, m, v);
                    Some((reg, mask, value))
                }
                None => Some((reg, mask, value)),
            };
        }
        if let Some((r, m, v)) = pending {
            self.write16(r, m, v);
        }
    }
}

/// The block's registers; the timer as its value at the save, so a
/// restored timer continues from there.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct AcpiPmState {
    pub pm1_sts: u16,
    pub pm1_en: u16,
    pub pm1_cnt: u16,
    pub gpe0_sts: u16,
    pub gpe0_en: u16,
    pub timer: u32,
}

/// What a restored block is wired to.
pub struct AcpiPmArgs {
    pub sci: EventFd,
    pub requests: PlatformRequestSink,
}

impl Persist for AcpiPm {
    type State = AcpiPmState;
    type Args = AcpiPmArgs;
    type Error = std::convert::Infallible;

    fn save(&self) -> AcpiPmState {
        AcpiPmState {
            pm1_sts: self.pm1_sts,
            pm1_en: self.pm1_en,
            pm1_cnt: self.pm1_cnt,
            gpe0_sts: self.gpe0_sts,
            gpe0_en: self.gpe0_en,
            timer: self.timer(),
        }
    }

    /// Any register values are accepted (masked as guest writes would
    /// be); a pending SCI is raised again.
    fn restore(args: AcpiPmArgs, s: &AcpiPmState) -> Result<Self, Self::Error> {
        let mut pm = AcpiPm::new(args.sci, args.requests);
        pm.pm1_sts = s.pm1_sts & PM1_STS_MASK;
        pm.pm1_en = s.pm1_en & PM1_EN_MASK;
        pm.pm1_cnt = (s.pm1_cnt & PM1_CNT_MASK) | SCI_EN;
        pm.gpe0_sts = s.gpe0_sts;
        pm.gpe0_en = s.gpe0_en;
        pm.timer_base = s.timer;
        pm.update_sci();
        Ok(pm)
    }
}

#[cfg(test)]
mod tests;
