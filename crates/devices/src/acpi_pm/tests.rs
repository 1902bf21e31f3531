// Register offsets and values are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::sync::{Arc, Mutex};

use super::*;

struct Rig {
    pm: AcpiPm,
    sci: EventFd,
    seen: Arc<Mutex<Vec<PlatformRequest>>>,
}

fn rig() -> Rig {
    let sci = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let pm = AcpiPm::new(
        sci.try_clone().unwrap(),
        Arc::new(move |r| sink.lock().unwrap().push(r)),
    );
    Rig { pm, sci, seen }
}

impl Rig {
    fn r16(&mut self, off: u64) -> u16 {
        let mut b = [0u8; 2];
        self.pm.read(PM_BASE, off, &mut b);
        u16::from_le_bytes(b)
    }

    fn w16(&mut self, off: u64, v: u16) {
        self.pm.write(PM_BASE, off, &v.to_le_bytes());
    }

    fn timer(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.pm.read(PM_BASE, PM_TMR, &mut b);
        u32::from_le_bytes(b)
    }

    /// How many SCI pulses came since the last look.
    fn pulses(&self) -> u64 {
        self.sci.read().unwrap_or(0)
    }

    fn requests(&self) -> Vec<PlatformRequest> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

#[test]
fn the_power_button_raises_the_sci_once_enabled_until_cleared() {
    let mut r = rig();
    // Disabled: the status shows, no interrupt.
    r.pm.press_power_button();
    assert_eq!(r.r16(PM1_EVT), PWRBTN_STS);
    assert_eq!(r.pulses(), 0);
    // Enabling a pending event raises it.
    r.w16(PM1_EVT + 2, PWRBTN_STS);
    assert_eq!(r.pulses(), 1);
    assert!(r.pm.sci_pending());
    // The OS's EOI with the status still set: delivered again.
    r.pm.resample();
    assert_eq!(r.pulses(), 1);
    // Writing 1 clears it; writing 0 changes nothing.
    r.w16(PM1_EVT, 0);
    assert_eq!(r.r16(PM1_EVT), PWRBTN_STS);
    r.w16(PM1_EVT, PWRBTN_STS);
    assert_eq!(r.r16(PM1_EVT), 0);
    assert!(!r.pm.sci_pending());
    r.pm.resample();
    assert_eq!(r.pulses(), 0);
    // A second press raises a new edge.
    r.pm.press_power_button();
    assert_eq!(r.pulses(), 1);
}

#[test]
fn byte_and_dword_writes_touch_only_their_bytes() {
    let mut r = rig();
    r.pm.press_power_button();
    // PWRBTN_STS is bit 8: a byte write to the high half clears it.
    r.pm.write(PM_BASE, PM1_EVT + 1, &[0x01]);
    assert_eq!(r.r16(PM1_EVT), 0);
    // One 32-bit write: status (clear nothing) and enable.
    let v = (u32::from(PWRBTN_STS) << 16).to_le_bytes();
    r.pm.write(PM_BASE, PM1_EVT, &v);
    assert_eq!(r.r16(PM1_EVT + 2), PWRBTN_STS);
    // A byte write to the enable register's low half keeps its high half.
    r.pm.write(PM_BASE, PM1_EVT + 2, &[0x01]);
    assert_eq!(r.r16(PM1_EVT + 2), PWRBTN_STS | TMR_STS);
    // Unknown enable bits are not kept.
    r.w16(PM1_EVT + 2, 0xffff);
    assert_eq!(r.r16(PM1_EVT + 2), PM1_EN_MASK);
}

#[test]
fn s5_powers_off_other_sleep_types_do_nothing_and_reset_resets() {
    let mut r = rig();
    assert_eq!(r.r16(PM1_CNT) & SCI_EN, SCI_EN, "ACPI mode from the start");
    // SLP_TYP without SLP_EN: nothing.
    r.w16(PM1_CNT, SLP_TYP_S5 << 10);
    assert_eq!(r.requests(), vec![]);
    // S3 is not offered.
    r.w16(PM1_CNT, (3 << 10) | (1 << 13));
    assert_eq!(r.requests(), vec![]);
    r.w16(PM1_CNT, (SLP_TYP_S5 << 10) | (1 << 13));
    assert_eq!(r.requests(), vec![PlatformRequest::PowerOff]);
    // SLP_EN reads back as 0; SCI_EN stays set.
    assert_eq!(r.r16(PM1_CNT) & (1 << 13), 0);
    assert_eq!(r.r16(PM1_CNT) & SCI_EN, SCI_EN);
    r.pm.write(PM_BASE, RESET, &[0x01]);
    assert_eq!(r.requests(), vec![]);
    r.pm.write(PM_BASE, RESET, &[RESET_VALUE]);
    assert_eq!(r.requests(), vec![PlatformRequest::Reset]);
}

#[test]
fn the_timer_runs_at_3_58_mhz_and_is_read_only() {
    let mut r = rig();
    let a = r.timer();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let b = r.timer();
    // At least 20 ms worth of ticks (71,590); sleeping may take longer.
    assert!(b.wrapping_sub(a) >= 71_000, "{a} → {b}");
    r.pm.write(PM_BASE, PM_TMR, &[0, 0, 0, 0]);
    assert!(
        r.timer().wrapping_sub(b) < u32::MAX / 2,
        "the write did not rewind it"
    );
}

#[test]
fn gpe_events_follow_their_enable_bits() {
    let mut r = rig();
    r.pm.raise_gpe(3);
    r.pm.raise_gpe(200);
    assert_eq!(r.r16(GPE0), 1 << 3);
    assert_eq!(r.pulses(), 0);
    r.w16(GPE0 + 2, 1 << 3);
    assert_eq!(r.pulses(), 1);
    r.w16(GPE0, 1 << 3);
    assert!(!r.pm.sci_pending());
}

#[test]
fn random_port_traffic_never_panics() {
    let mut r = rig();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..50_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = x % (PM_LEN + 4);
        let width = [1usize, 2, 4][(x >> 8) as usize % 3];
        let bytes = (x >> 16).to_le_bytes();
        if x & (1 << 40) != 0 {
            // Not the reset or S5 commands, which end the run in a VM.
            r.pm.write(PM_BASE, off, &bytes[..width]);
        } else {
            let mut b = [0u8; 4];
            r.pm.read(PM_BASE, off, &mut b[..width]);
        }
    }
}

#[test]
fn state_round_trips_and_the_timer_continues() {
    let mut r = rig();
    r.w16(PM1_EVT + 2, PWRBTN_STS);
    r.pm.press_power_button();
    r.w16(GPE0 + 2, 0x0f);
    r.pm.raise_gpe(1);
    r.pulses();
    let saved = r.pm.save();
    let json = serde_json::to_vec(&saved).unwrap();
    let state: AcpiPmState = serde_json::from_slice(&json).unwrap();

    let sci = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let restored = AcpiPm::restore(
        AcpiPmArgs {
            sci: sci.try_clone().unwrap(),
            requests: Arc::new(|_| {}),
        },
        &state,
    )
    .unwrap();
    // The pending events are raised again in the new VM.
    assert_eq!(sci.read().unwrap(), 1);
    let again = restored.save();
    assert_eq!(
        AcpiPmState {
            timer: saved.timer,
            ..again.clone()
        },
        saved
    );
    assert!(again.timer.wrapping_sub(saved.timer) < PM_TIMER_HZ as u32);
    // Restored values are masked as guest writes are.
    let wild = AcpiPmState {
        pm1_sts: 0xffff,
        pm1_en: 0xffff,
        pm1_cnt: 0xffff,
        ..Default::default()
    };
    let pm = AcpiPm::restore(
        AcpiPmArgs {
            sci,
            requests: Arc::new(|_| {}),
        },
        &wild,
    )
    .unwrap();
    let s = pm.save();
    assert_eq!((s.pm1_sts, s.pm1_en), (PM1_STS_MASK, PM1_EN_MASK));
    assert_eq!(s.pm1_cnt & (1 << 13), 0);
}
