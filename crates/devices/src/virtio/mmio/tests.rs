use std::sync::Mutex;

use vm_memory::GuestAddress;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::Queue;

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::common::word;

fn low_half(v: u64) -> u32 {
    word(v, 0)
}

fn high_half(v: u64) -> u32 {
    word(v, 1)
}
use crate::virtio::{ActivateError, Activation, INT_CONFIG, INT_VRING, VIRTIO_F_VERSION_1};

#[derive(Default)]
struct Record {
    activations: Vec<(usize, u64)>,
    resets: usize,
    /// The next_avail of each queue the device was last started with.
    started_at: Vec<u16>,
    sleeps: usize,
}

struct FakeDevice {
    record: Arc<Mutex<Record>>,
    sizes: Vec<u16>,
    fail: bool,
    /// The queues of a running device.
    queues: Option<Vec<Queue>>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn name(&self) -> &'static str {
        "fake"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        1 << 3
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&[9, 8, 7, 6], offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if self.fail {
            return Err(ActivateError::QueueCount {
                expected: 9,
                got: 1,
            });
        }
        let mut record = self.record.lock().unwrap();
        record.activations.push((a.queues.len(), a.acked_features));
        record.started_at = a.queues.iter().map(|(q, _)| q.next_avail()).collect();
        self.queues = Some(a.queues.into_iter().map(|(q, _)| q).collect());
        Ok(())
    }
    fn reset(&mut self) {
        self.record.lock().unwrap().resets += 1;
        self.queues = None;
    }
    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, crate::virtio::WorkerError> {
        self.record.lock().unwrap().sleeps += 1;
        Ok(self.queues.take().map(|mut qs| {
            // As if the worker had served three requests on each queue.
            for q in &mut qs {
                q.set_next_avail(q.next_avail().wrapping_add(3));
            }
            qs
        }))
    }
    fn save_state(&self) -> crate::virtio::VirtioDeviceState {
        crate::virtio::VirtioDeviceState::Rng(crate::virtio::persist::RngState {})
    }
    fn restore_state(
        &mut self,
        state: &crate::virtio::VirtioDeviceState,
    ) -> Result<(), crate::virtio::VirtioStateError> {
        match state {
            crate::virtio::VirtioDeviceState::Rng(_) => Ok(()),
            other => Err(crate::virtio::VirtioStateError::wrong("fake", other)),
        }
    }
}

struct Harness {
    t: MmioTransport,
    record: Arc<Mutex<Record>>,
    line: EventFd,
}

fn harness(fail: bool) -> Harness {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let record = Arc::new(Mutex::new(Record::default()));
    let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(Interrupt::new(line.try_clone().unwrap()));
    let device = FakeDevice {
        record: record.clone(),
        sizes: vec![16, 8],
        fail,
        queues: None,
    };
    let t = MmioTransport::new(Box::new(device), mem, interrupt).unwrap();
    Harness { t, record, line }
}

impl Harness {
    fn r(&mut self, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        self.t.read(0, offset, &mut d);
        u32::from_le_bytes(d)
    }
    fn w(&mut self, offset: u64, value: u32) {
        self.t.write(0, offset, &value.to_le_bytes());
    }
    fn setup_queue(&mut self, index: u32, base: u64) {
        self.setup_queue_sized(index, base, 8);
    }
    fn setup_queue_sized(&mut self, index: u32, base: u64, size: u32) {
        self.w(0x30, index);
        self.w(0x38, size);
        self.w(0x80, low_half(base));
        self.w(0x84, high_half(base));
        self.w(0x90, low_half(base + 0x1000));
        self.w(0x94, 0);
        self.w(0xa0, low_half(base + 0x2000));
        self.w(0xa4, 0);
        self.w(0x44, 1);
    }
    /// The Linux driver's sequence up to FEATURES_OK.
    fn negotiate(&mut self, features: u64) -> u32 {
        self.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        self.w(0x24, 0);
        self.w(0x20, low_half(features));
        self.w(0x24, 1);
        self.w(0x20, high_half(features));
        self.w(
            0x70,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        self.r(0x70)
    }
    fn driver_ok(&mut self) {
        let s = self.r(0x70);
        self.w(0x70, s | VIRTIO_CONFIG_S_DRIVER_OK);
    }
}

const V1: u64 = 1 << VIRTIO_F_VERSION_1;

#[test]
fn identification_registers() {
    let mut h = harness(false);
    assert_eq!(h.r(0x000), 0x7472_6976);
    assert_eq!(h.r(0x004), 2);
    assert_eq!(h.r(0x008), 42);
    h.w(0x14, 0);
    assert_eq!(h.r(0x010), 1 << 3);
    h.w(0x14, 1);
    assert_eq!(h.r(0x010), 1, "VIRTIO_F_VERSION_1 is offered");
    h.w(0x30, 1);
    assert_eq!(h.r(0x034), 8);
    h.w(0x30, 7);
    assert_eq!(h.r(0x034), 0, "queues beyond the count have size 0");
}

#[test]
fn full_handshake_activates_the_device_and_reset_stops_it() {
    let mut h = harness(false);
    let status = h.negotiate(V1 | (1 << 3));
    assert_ne!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    h.setup_queue(0, 0x10000);
    h.setup_queue(1, 0x20000);
    h.driver_ok();
    assert_eq!(
        h.record.lock().unwrap().activations,
        vec![(2, V1 | (1 << 3))]
    );
    assert_ne!(h.r(0x70) & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    // Live queues cannot be reconfigured.
    h.w(0x30, 0);
    h.w(0x44, 0);
    assert_eq!(h.r(0x44), 1);
    h.w(0x70, 0);
    assert_eq!(h.record.lock().unwrap().resets, 1);
    assert_eq!(h.r(0x70), 0);
    assert_eq!(h.r(0x44), 0, "reset clears the queues");
}

#[test]
fn features_not_offered_or_without_version_1_are_refused() {
    let mut h = harness(false);
    let status = h.negotiate(V1 | (1 << 5));
    assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    let mut h = harness(false);
    let status = h.negotiate(1 << 3);
    assert_eq!(
        status & VIRTIO_CONFIG_S_FEATURES_OK,
        0,
        "legacy drivers are refused"
    );
    h.setup_queue(0, 0x10000);
    h.setup_queue(1, 0x20000);
    h.driver_ok();
    assert!(h.record.lock().unwrap().activations.is_empty());
}

#[test]
fn queues_outside_memory_make_the_device_need_a_reset() {
    let mut h = harness(false);
    h.negotiate(V1);
    h.setup_queue(0, 0x10000);
    h.setup_queue(1, 0xffff_0000_0000); // far beyond the 1 MiB of RAM
    h.driver_ok();
    assert!(h.record.lock().unwrap().activations.is_empty());
    assert_ne!(h.r(0x70) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_ne!(h.r(0x60) & INT_CONFIG, 0);
    assert!(h.line.read().is_ok(), "the driver is interrupted");
}

#[test]
fn failed_activation_needs_a_reset() {
    let mut h = harness(true);
    h.negotiate(V1);
    h.setup_queue(0, 0x10000);
    h.setup_queue(1, 0x20000);
    h.driver_ok();
    assert_ne!(h.r(0x70) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
}

#[test]
fn odd_accesses_are_ignored_without_harm() {
    let mut h = harness(false);
    // Two-byte register accesses.
    let mut d = [0xffu8; 2];
    h.t.read(0, 0x000, &mut d);
    assert_eq!(d, [0, 0]);
    h.t.write(0, 0x070, &[1, 0]);
    assert_eq!(h.r(0x70), 0);
    // Unknown registers, absurd queue selections and sizes.
    h.w(0x0ff0 & !0xf, 1);
    h.w(0x30, u32::MAX);
    h.w(0x38, 3);
    h.w(0x44, 1);
    h.w(0x50, 99);
    // Clearing status bits is not a reset.
    h.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    h.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(
        h.r(0x70),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    );
    // A queue of a size that is not a power of two never becomes valid.
    h.w(0x30, 0);
    h.w(0x38, 3);
}

#[test]
fn notify_without_ioeventfd_fires_the_queue_event() {
    let mut h = harness(false);
    h.w(0x50, 1);
    assert_eq!(h.t.queue_events()[1].read().unwrap(), 1);
    assert!(h.t.queue_events()[0].read().is_err());
}

#[test]
fn config_space_is_forwarded() {
    let mut h = harness(false);
    let mut d = [0u8; 2];
    h.t.read(0, 0x101, &mut d);
    assert_eq!(d, [8, 7]);
}

#[test]
fn interrupt_acknowledge() {
    let mut h = harness(false);
    h.t.common.interrupt.signal_used();
    assert_eq!(h.r(0x60), 1);
    h.w(0x64, 1);
    assert_eq!(h.r(0x60), 0);
}

/// QueueNum is 16 bits wide in the virtio-mmio register file's queue, but
/// the register is 32: 0x10010 used to be taken as 16 (`value as u16`).
/// Sizes out of range, not a power of two, or above the maximum are
/// refused: the device then needs a reset instead of running with a size
/// the driver did not write.
#[test]
fn queue_sizes_out_of_range_are_refused() {
    for bad in [0x1_0010, 0x8000_0008, 17, 32, 0] {
        let mut h = harness(false);
        h.negotiate(V1);
        h.setup_queue_sized(0, 0x10000, bad);
        h.setup_queue(1, 0x20000);
        h.driver_ok();
        assert!(
            h.record.lock().unwrap().activations.is_empty(),
            "size {bad:#x} was accepted"
        );
        assert_ne!(h.r(0x70) & VIRTIO_CONFIG_S_NEEDS_RESET, 0, "{bad:#x}");
        // A reset forgets the refusal; a good size then works.
        h.w(0x70, 0);
        h.negotiate(V1);
        h.setup_queue_sized(0, 0x10000, 16);
        h.setup_queue(1, 0x20000);
        h.driver_ok();
        assert_eq!(h.record.lock().unwrap().activations.len(), 1, "{bad:#x}");
    }
}

/// Misaligned rings are refused the same way (they were ignored, leaving
/// the previous address in place).
#[test]
fn misaligned_ring_addresses_are_refused() {
    for (register, addr) in [(0x80, 0x10008), (0x90, 0x11001), (0xa0, 0x12002)] {
        let mut h = harness(false);
        h.negotiate(V1);
        h.setup_queue(0, 0x10000);
        h.setup_queue(1, 0x20000);
        h.w(0x30, 0);
        h.w(register, addr);
        h.driver_ok();
        assert!(
            h.record.lock().unwrap().activations.is_empty(),
            "{register:#x}"
        );
        assert_ne!(h.r(0x70) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }
}

/// Status values beyond the 8 status bits are ignored, not taken in part.
#[test]
fn status_beyond_eight_bits_is_ignored() {
    let mut h = harness(false);
    h.w(0x70, 0x100 | VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(h.r(0x70), 0);
    h.w(0x70, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(h.r(0x70), VIRTIO_CONFIG_S_ACKNOWLEDGE);
}

/// Selectors and notifications beyond the queues (or beyond `usize`) are
/// ignored.
#[test]
fn selectors_out_of_range_are_ignored() {
    let mut h = harness(false);
    h.negotiate(V1);
    h.w(0x30, u32::MAX);
    h.w(0x38, 8);
    assert_eq!(h.r(0x34), 0);
    h.w(0x50, u32::MAX);
    h.setup_queue(0, 0x10000);
    h.setup_queue(1, 0x20000);
    h.driver_ok();
    assert_eq!(h.record.lock().unwrap().activations.len(), 1);
}

/// A running harness: negotiated, both queues set up, activated.
fn running() -> Harness {
    let mut h = harness(false);
    h.negotiate(V1 | (1 << 3));
    h.setup_queue(0, 0x10000);
    h.setup_queue(1, 0x20000);
    h.driver_ok();
    h
}

#[test]
fn sleep_keeps_the_queues_the_device_hands_back_and_wake_returns_them() {
    let mut h = running();
    assert!(!h.t.is_asleep());
    assert!(
        matches!(
            h.t.save_state(),
            Err(super::persist::MmioStateError::Awake(_))
        ),
        "a running device's queues are not the transport's to read"
    );
    h.t.sleep().unwrap();
    assert!(h.t.is_asleep());
    h.t.sleep().unwrap();
    assert_eq!(h.record.lock().unwrap().sleeps, 1, "sleeping twice is once");
    let saved = h.t.save_state().unwrap();
    assert_eq!(
        saved
            .queues
            .iter()
            .map(|q| q.next_avail)
            .collect::<Vec<_>>(),
        [3, 3]
    );
    h.t.wake().unwrap();
    assert!(!h.t.is_asleep());
    let r = h.record.lock().unwrap();
    assert_eq!(r.activations.len(), 2);
    assert_eq!(r.started_at, [3, 3], "woken at the positions it slept at");
}

#[test]
fn a_not_activated_transport_sleeps_and_saves_at_once() {
    let mut h = harness(false);
    h.negotiate(V1);
    h.t.sleep().unwrap();
    let saved = h.t.save_state().unwrap();
    assert!(!saved.activated);
    assert_eq!(h.record.lock().unwrap().sleeps, 0);
    h.t.wake().unwrap();
    assert!(h.record.lock().unwrap().activations.is_empty());
}

#[test]
fn transport_state_round_trips_and_the_device_runs_on_where_it_was() {
    let mut h = running();
    h.w(0x30, 1);
    h.w(0x14, 1);
    h.t.common.interrupt.signal_used();
    h.t.sleep().unwrap();
    let saved = h.t.save_state().unwrap();
    let json = crate::test_util::json(&saved);
    let parsed: super::persist::MmioTransportState = serde_json::from_str(&json).unwrap();

    let mut fresh = harness(false);
    let _ = fresh.line.read();
    fresh.t.restore(&parsed).unwrap();
    // Activated again, without the guest negotiating, at the saved
    // positions, with the interrupt the guest had not handled raised.
    {
        let r = fresh.record.lock().unwrap();
        assert_eq!(r.activations, vec![(2, V1 | (1 << 3))]);
        assert_eq!(r.started_at, [3, 3]);
    }
    assert_eq!(fresh.r(0x60), INT_VRING);
    assert_eq!(fresh.line.read().unwrap(), 1);
    for e in fresh.t.queue_events() {
        assert_eq!(e.read().unwrap(), 1, "the notification is replayed");
    }
    assert_eq!(fresh.r(0x70), saved.status);
    assert_eq!(fresh.r(0x44), 1, "queue 1 selected and ready");
    fresh.t.sleep().unwrap();
    let again = fresh.t.save_state().unwrap();
    // The fake device moves each queue on by 3 per run.
    let mut expected = saved.clone();
    for q in &mut expected.queues {
        q.next_avail += 3;
    }
    assert_eq!(
        crate::test_util::json(&again),
        crate::test_util::json(&expected)
    );
}

#[test]
fn a_restored_state_round_trips_exactly() {
    let mut h = running();
    h.t.sleep().unwrap();
    let saved = h.t.save_state().unwrap();
    let json = crate::test_util::json(&saved);
    // Not activated: nothing runs between restore and save.
    let idle = super::persist::MmioTransportState {
        activated: false,
        ..saved
    };
    let mut fresh = harness(false);
    fresh.t.restore(&idle).unwrap();
    assert_eq!(
        crate::test_util::json(&fresh.t.save_state().unwrap()),
        crate::test_util::json(&idle)
    );
    assert!(fresh.record.lock().unwrap().activations.is_empty());
    assert_ne!(json, crate::test_util::json(&idle));
}

#[test]
fn hostile_transport_states_are_refused_without_panicking() {
    use super::persist::{MmioStateError, MmioTransportState};
    let mut h = running();
    h.t.sleep().unwrap();
    let good = h.t.save_state().unwrap();
    let with = |f: &dyn Fn(&mut MmioTransportState)| {
        let mut s = good.clone();
        f(&mut s);
        s
    };
    let bad: Vec<(&str, MmioTransportState)> = vec![
        ("device type", with(&|s| s.device_type = 2)),
        (
            "queue count",
            with(&|s| {
                s.queues.pop();
            }),
        ),
        ("size", with(&|s| s.queues[0].size = 6)),
        ("size above max", with(&|s| s.queues[0].size = 32)),
        ("max", with(&|s| s.queues[0].max_size = 32)),
        ("misaligned", with(&|s| s.queues[1].desc_table = 0x20008)),
        ("outside RAM", with(&|s| s.queues[1].used_ring = 0x10_0000)),
        ("features", with(&|s| s.acked_features |= 1 << 5)),
        ("status", with(&|s| s.status = 0x1ff)),
        ("interrupt", with(&|s| s.interrupt_status = 4)),
        ("not ready", with(&|s| s.status = 0xb)),
        ("queue not ready", with(&|s| s.queues[0].ready = false)),
        (
            "reason",
            with(&|s| s.refused_queue_setup = Some("x".repeat(5000))),
        ),
        (
            "device state",
            with(&|s| {
                s.device =
                    crate::virtio::VirtioDeviceState::Vsock(crate::virtio::persist::VsockState {
                        guest_cid: 3,
                    })
            }),
        ),
    ];
    for (what, state) in bad {
        let mut fresh = harness(false);
        let err = fresh.t.restore(&state).expect_err(what);
        assert!(
            fresh.record.lock().unwrap().activations.is_empty(),
            "{what}"
        );
        assert_eq!(fresh.r(0x70), 0, "{what}: nothing restored");
        if what == "device state" {
            assert!(matches!(err, MmioStateError::Device(..)), "{err}");
        }
    }
    // A transport the guest already set up is not restored into.
    let mut busy = running();
    assert!(matches!(
        busy.t.restore(&good),
        Err(MmioStateError::Active(_))
    ));
}

#[test]
fn a_restored_device_that_cannot_start_is_an_error() {
    let mut h = running();
    h.t.sleep().unwrap();
    let saved = h.t.save_state().unwrap();
    let mut fresh = harness(true);
    assert!(matches!(
        fresh.t.restore(&saved),
        Err(super::persist::MmioStateError::Activate(..))
    ));
}

/// A device whose worker blocks on its first notification until the
/// test lets it go, as one stuck in a slow backend does.
struct StuckDevice {
    gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
    entered: std::sync::mpsc::Sender<()>,
    worker: Option<crate::virtio::worker::WorkerThread<Queue>>,
}

impl VirtioDevice for StuckDevice {
    fn device_type(&self) -> u32 {
        4
    }
    fn name(&self) -> &'static str {
        "stuck"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let (_mem, _irq, [(queue, event)]) = a.take_queues::<1>()?;
        let (gate, entered) = (self.gate.clone(), self.entered.clone());
        let worker =
            crate::virtio::worker::WorkerThread::start("stuck", vec![event], queue, move |_, _| {
                let _ = entered.send(());
                let (lock, cv) = &*gate;
                let mut open = lock.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
            })
            .map_err(ActivateError::Thread)?
            .with_stop_timeout(std::time::Duration::from_millis(100));
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
    }
    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, crate::virtio::WorkerError> {
        Ok(crate::virtio::worker::stop_worker(&mut self.worker)?.map(|q| vec![q]))
    }
    fn save_state(&self) -> crate::virtio::VirtioDeviceState {
        crate::virtio::VirtioDeviceState::Rng(crate::virtio::persist::RngState {})
    }
    fn restore_state(
        &mut self,
        _: &crate::virtio::VirtioDeviceState,
    ) -> Result<(), crate::virtio::VirtioStateError> {
        Ok(())
    }
}

/// A worker stuck in its backend makes sleep fail (in bounded time)
/// instead of hanging; the state cannot be saved meanwhile; once the
/// backend lets go, wake collects the worker and starts it again.
#[test]
fn sleeping_a_stuck_device_fails_in_bounded_time_and_wake_recovers() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let device = StuckDevice {
        gate: gate.clone(),
        entered: entered_tx,
        worker: None,
    };
    let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let t = MmioTransport::new(Box::new(device), mem, Arc::new(Interrupt::new(line))).unwrap();
    let mut h = Harness {
        t,
        record: Arc::default(),
        line: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    };
    h.negotiate(V1);
    h.setup_queue(0, 0x10000);
    h.driver_ok();
    h.t.queue_events()[0].write(1).unwrap();
    entered
        .recv_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    let started = std::time::Instant::now();
    let err = h.t.sleep().unwrap_err();
    assert!(
        matches!(err, crate::virtio::WorkerError::Stuck { .. }),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert!(!h.t.is_asleep());
    assert!(h.t.save_state().is_err(), "no state from a running worker");
    // Still stuck: wake fails too, in bounded time.
    assert!(matches!(h.t.wake(), Err(ActivateError::Worker(_))));
    // Released: wake collects the worker and runs the device again.
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    h.t.wake().unwrap();
    assert!(!h.t.is_asleep());
    h.t.sleep().unwrap();
    assert!(h.t.save_state().is_ok());
}
