//! The CMOS RAM and MC146818 real-time clock (ports 0x70/0x71), so the guest
//! reads the host's wall clock (UTC) at boot. Time registers report the
//! clock in BCD, 24-hour mode; writes to them are ignored (the host's clock
//! stays the source of truth), other CMOS bytes are plain RAM.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use snapshot::Persist;

use crate::BusDevice;

pub const CMOS_PORT: u64 = 0x70;
pub const CMOS_PORT_LEN: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Seconds since the Unix epoch, as a function so tests can fix the time.
pub type Clock = Box<dyn Fn() -> i64 + Send>;

pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    clock: Clock,
    /// Seconds added to the clock (0: the guest's RTC is the host's UTC
    /// clock; kept in the state so an RTC the guest can set later fits).
    offset: i64,
}

/// A calendar date and time in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Sunday.
    pub weekday: u32,
}

impl DateTime {
    /// Converts Unix time to a UTC date (the "days from civil" algorithm
    /// inverted, after Howard Hinnant; exact for the proleptic Gregorian
    /// calendar).
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        // rem_euclid keeps these in range: 0..86_400 seconds, days 1..=31,
        // months 1..=12, weekdays 0..7.
        let rem = small(secs.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = small(doy - (153 * mp + 2) / 5 + 1);
        let month = small(if mp < 10 { mp + 3 } else { mp - 9 });
        let year = yoe + era * 400 + i64::from(month <= 2);
        DateTime {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem / 60 % 60,
            second: rem % 60,
            weekday: small((days + 4).rem_euclid(7)),
        }
    }
}

/// A calendar field known to be small and non-negative.
fn small(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

/// The two low decimal digits of `v` in BCD (at most 0x99).
fn bcd(v: u32) -> u8 {
    let [low, ..] = (((v / 10) % 10) << 4 | (v % 10)).to_le_bytes();
    low
}

/// The host's clock (UTC seconds), which an RTC reads by default.
pub fn host_clock() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new(Box::new(host_clock))
    }
}

impl Cmos {
    pub fn new(clock: Clock) -> Self {
        Cmos {
            index: 0,
            ram: [0; 128],
            clock,
            offset: 0,
        }
    }

    fn read_register(&self, index: u8) -> u8 {
        let now = || DateTime::from_unix((self.clock)().saturating_add(self.offset));
        match index {
            REG_SECONDS => bcd(now().second),
            REG_MINUTES => bcd(now().minute),
            REG_HOURS => bcd(now().hour),
            REG_WEEKDAY => bcd(now().weekday + 1),
            REG_DAY => bcd(now().day),
            REG_MONTH => bcd(now().month),
            REG_YEAR => bcd(small(now().year.rem_euclid(100))),
            REG_CENTURY => bcd(small((now().year / 100).rem_euclid(100))),
            // Divider on, 1024 Hz rate; never "update in progress".
            REG_STATUS_A => 0x26,
            // 24-hour mode, BCD, no interrupts enabled.
            REG_STATUS_B => 0x02,
            REG_STATUS_C => 0,
            // Valid RAM and time.
            REG_STATUS_D => 0x80,
            i => self.ram[usize::from(i & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = if offset == 1 {
            self.read_register(self.index)
        } else {
            self.index
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if offset == 0 {
            // Bit 7 is the NMI mask, not part of the index.
            self.index = value & 0x7f;
        } else if self.index > REG_STATUS_D {
            self.ram[usize::from(self.index)] = value;
        }
    }
}

/// The CMOS state: the selected index, the RAM bytes and the clock's
/// offset from the host's (the time itself is the host's, read anew).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct CmosState {
    pub index: u8,
    /// Seconds the guest's RTC is ahead of the host's UTC clock.
    pub offset_secs: i64,
    /// All 128 bytes (the time and status registers among them are
    /// computed, not read from here).
    pub nvram: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum CmosStateError {
    #[error("the CMOS state has {0} RAM bytes, not 128")]
    Ram(usize),
    #[error("CMOS index {0:#x} is beyond the 128 bytes")]
    Index(u8),
}

impl Cmos {
    /// Takes a saved state in place (the device already on the bus);
    /// nothing changes if it is refused.
    pub fn restore_state(&mut self, state: &CmosState) -> Result<(), CmosStateError> {
        let ram = <[u8; 128]>::try_from(state.nvram.as_slice())
            .map_err(|_| CmosStateError::Ram(state.nvram.len()))?;
        if state.index > 0x7f {
            return Err(CmosStateError::Index(state.index));
        }
        self.index = state.index;
        self.ram = ram;
        self.offset = state.offset_secs;
        Ok(())
    }
}

/// The CMOS bytes a PC BIOS reads the machine's size from (the IBM PC/AT
/// layout that SeaBIOS and QEMU keep).
const REG_BASE_MEM: usize = 0x15;
const REG_EXT_MEM: usize = 0x17;
const REG_EXT_MEM_POST: usize = 0x30;
const REG_MEM_ABOVE_16M: usize = 0x34;
const REG_MEM_ABOVE_4G: usize = 0x5b;
const REG_SMP_COUNT: usize = 0x5f;

impl Cmos {
    /// Records the machine's RAM and CPUs where firmware looks for them:
    /// base memory (640 KiB), memory from 1 MiB up to 64 MiB in KiB,
    /// from 16 MiB up to `below_4g` in 64 KiB units, above 4 GiB in 64
    /// KiB units (three bytes), and the CPU count less one.
    pub fn set_machine_size(&mut self, below_4g: u64, above_4g: u64, cpus: u8) {
        let mut put16 = |at: usize, v: u16| {
            self.ram[at..at + 2].copy_from_slice(&v.to_le_bytes());
        };
        put16(REG_BASE_MEM, 640);
        let ext_kib = (below_4g.saturating_sub(1 << 20) >> 10).min(0xffff);
        // Clamped to 16 bits just above.
        let ext_kib = u16::try_from(ext_kib).unwrap_or(u16::MAX);
        put16(REG_EXT_MEM, ext_kib);
        put16(REG_EXT_MEM_POST, ext_kib);
        let above_16m = (below_4g.saturating_sub(16 << 20) >> 16).min(0xffff);
        put16(
            REG_MEM_ABOVE_16M,
            u16::try_from(above_16m).unwrap_or(u16::MAX),
        );
        let above = (above_4g >> 16).min(0xff_ffff).to_le_bytes();
        self.ram[REG_MEM_ABOVE_4G..REG_MEM_ABOVE_4G + 3].copy_from_slice(&above[..3]);
        self.ram[REG_SMP_COUNT] = cpus.saturating_sub(1);
    }
}

impl Persist for Cmos {
    type State = CmosState;
    /// The clock the restored RTC reads.
    type Args = Clock;
    type Error = CmosStateError;

    fn save(&self) -> CmosState {
        CmosState {
            index: self.index,
            offset_secs: self.offset,
            nvram: self.ram.to_vec(),
        }
    }

    fn restore(clock: Clock, state: &CmosState) -> Result<Self, CmosStateError> {
        let mut cmos = Cmos::new(clock);
        cmos.restore_state(state)?;
        Ok(cmos)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn firmware_reads_the_machine_size() {
        let mut c = Cmos::new(Box::new(|| 0));
        c.set_machine_size(3 << 30, 5 << 30, 4);
        let mut byte = |i: u8| {
            c.write(CMOS_PORT, 0, &[i]);
            let mut b = [0u8];
            c.read(CMOS_PORT, 1, &mut b);
            u32::from(b[0])
        };
        assert_eq!(byte(0x15) | byte(0x16) << 8, 640);
        assert_eq!(
            byte(0x17) | byte(0x18) << 8,
            0xffff,
            "1 MiB..64 MiB, clamped"
        );
        assert_eq!(byte(0x30) | byte(0x31) << 8, 0xffff);
        assert_eq!(byte(0x34) | byte(0x35) << 8, ((3 << 30) - (16 << 20)) >> 16);
        // 5 GiB in 64 KiB units.
        assert_eq!(byte(0x5b) | byte(0x5c) << 8 | byte(0x5d) << 16, 5 << 14);
        assert_eq!(byte(0x5f), 3);
        // A small machine: no memory above 16 MiB or 4 GiB.
        let mut c = Cmos::new(Box::new(|| 0));
        c.set_machine_size(8 << 20, 0, 1);
        let mut byte = |i: u8| {
            c.write(CMOS_PORT, 0, &[i]);
            let mut b = [0u8];
            c.read(CMOS_PORT, 1, &mut b);
            u32::from(b[0])
        };
        assert_eq!(byte(0x17) | byte(0x18) << 8, 7 << 10);
        assert_eq!(byte(0x34) | byte(0x35) << 8, 0);
        assert_eq!(byte(0x5f), 0);
    }
    use super::*;

    fn read(cmos: &mut Cmos, reg: u8) -> u8 {
        cmos.write(CMOS_PORT, 0, &[reg | 0x80]);
        let mut b = [0u8];
        cmos.read(CMOS_PORT, 1, &mut b);
        b[0]
    }

    #[test]
    fn dates_from_unix_time() {
        assert_eq!(
            DateTime::from_unix(0),
            DateTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 4
            }
        );
        // 2024-02-29 13:37:42 UTC, a Thursday.
        assert_eq!(
            DateTime::from_unix(1_709_213_862),
            DateTime {
                year: 2024,
                month: 2,
                day: 29,
                hour: 13,
                minute: 37,
                second: 42,
                weekday: 4
            }
        );
        // 2000-03-01 00:00:00, the day after a century leap day.
        let d = DateTime::from_unix(951_868_800);
        assert_eq!((d.year, d.month, d.day, d.weekday), (2000, 3, 1, 3));
    }

    #[test]
    fn registers_report_the_clock_in_bcd() {
        let mut cmos = Cmos::new(Box::new(|| 1_709_213_862));
        assert_eq!(read(&mut cmos, REG_SECONDS), 0x42);
        assert_eq!(read(&mut cmos, REG_MINUTES), 0x37);
        assert_eq!(read(&mut cmos, REG_HOURS), 0x13);
        assert_eq!(read(&mut cmos, REG_DAY), 0x29);
        assert_eq!(read(&mut cmos, REG_MONTH), 0x02);
        assert_eq!(read(&mut cmos, REG_YEAR), 0x24);
        assert_eq!(read(&mut cmos, REG_CENTURY), 0x20);
        assert_eq!(read(&mut cmos, REG_WEEKDAY), 0x05);
        assert_eq!(
            read(&mut cmos, REG_STATUS_A) & 0x80,
            0,
            "no update in progress"
        );
        assert_eq!(read(&mut cmos, REG_STATUS_B), 0x02);
        assert_eq!(read(&mut cmos, REG_STATUS_D), 0x80);
    }

    #[test]
    fn host_clock_is_used_by_default() {
        let mut cmos = Cmos::default();
        let now = DateTime::from_unix(host_clock());
        assert_eq!(read(&mut cmos, REG_CENTURY), bcd(small(now.year / 100)));
    }

    #[test]
    fn ram_bytes_are_kept_and_time_writes_ignored() {
        let mut cmos = Cmos::new(Box::new(|| 0));
        cmos.write(CMOS_PORT, 0, &[0x40]);
        cmos.write(CMOS_PORT, 1, &[0xab]);
        assert_eq!(read(&mut cmos, 0x40), 0xab);
        cmos.write(CMOS_PORT, 0, &[REG_YEAR]);
        cmos.write(CMOS_PORT, 1, &[0x99]);
        assert_eq!(read(&mut cmos, REG_YEAR), 0x70);
    }

    #[test]
    fn state_round_trips_and_keeps_ram_and_index() {
        let mut cmos = Cmos::new(Box::new(|| 1_709_213_862));
        cmos.write(CMOS_PORT, 0, &[0x40]);
        cmos.write(CMOS_PORT, 1, &[0xab]);
        cmos.write(CMOS_PORT, 0, &[0x41]);
        let saved = cmos.save();
        assert_eq!(saved.index, 0x41);
        let json = crate::test_util::json(&saved);
        let mut restored = Cmos::restore(Box::new(|| 1_709_213_862), &saved).unwrap();
        assert_eq!(crate::test_util::json(&restored.save()), json);
        // The selected index is kept: a data write goes to 0x41.
        restored.write(CMOS_PORT, 1, &[0xcd]);
        assert_eq!(read(&mut restored, 0x40), 0xab);
        assert_eq!(read(&mut restored, 0x41), 0xcd);
        // The time is the clock's, plus the offset.
        let later = CmosState {
            offset_secs: 60,
            ..saved
        };
        let mut ahead = Cmos::restore(Box::new(|| 1_709_213_862), &later).unwrap();
        assert_eq!(read(&mut ahead, REG_MINUTES), 0x38);
    }

    #[test]
    fn hostile_states_are_refused() {
        let saved = Cmos::new(Box::new(|| 0)).save();
        let short = CmosState {
            nvram: vec![0; 12],
            ..saved.clone()
        };
        assert!(Cmos::restore(Box::new(|| 0), &short).is_err());
        let index = CmosState {
            index: 0x80,
            ..saved.clone()
        };
        assert!(Cmos::restore(Box::new(|| 0), &index).is_err());
        let huge = CmosState {
            offset_secs: i64::MAX,
            ..saved
        };
        let mut c = Cmos::restore(Box::new(|| 1), &huge).unwrap();
        let _ = read(&mut c, REG_YEAR);
    }

    #[test]
    fn a_cmos_on_the_bus_takes_a_state_in_place() {
        let mut src = Cmos::new(Box::new(|| 0));
        src.write(CMOS_PORT, 0, &[0x50]);
        src.write(CMOS_PORT, 1, &[0x11]);
        let saved = src.save();
        let mut dev = Cmos::new(Box::new(|| 0));
        let bad = CmosState {
            nvram: vec![],
            ..saved.clone()
        };
        assert!(dev.restore_state(&bad).is_err());
        assert_eq!(read(&mut dev, 0x50), 0, "unchanged after a refusal");
        dev.restore_state(&saved).unwrap();
        assert_eq!(read(&mut dev, 0x50), 0x11);
    }
}
