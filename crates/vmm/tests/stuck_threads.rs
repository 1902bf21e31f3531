//! A VM ends in bounded time whatever its threads are stuck in: a vCPU
//! blocked writing console output nobody reads, a device worker blocked
//! in a slow backend (killed, or reset by the guest meanwhile). Tiny
//! assembly guests on real KVM; each run has a watchdog so that a hang
//! fails the test instead of stalling it.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

mod common;

use common::kvm;
use hypervisor::kvm::KvmHypervisor;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::worker::{stop_worker, WorkerThread};
use devices::virtio::{
    ActivateError, Activation, Queue, VirtioDevice, VirtioDeviceState, VirtioStateError,
    WorkerError,
};
use iced_x86::code_asm::*;
use vmm::control::{ControlRequest, VmControl};
use vmm::{Machine, MachineSpec, RunEnd, RunOptions, VmOutcome};

const CODE: u64 = 0x10_0000;
const VIRTIO_BASE: u64 = 0xd000_0000;
const DESC: u64 = 0x30_0000;
const AVAIL: u64 = 0x30_1000;
const USED: u64 = 0x30_2000;
/// What "bounded" means here: the VMM's own limits are a few seconds.
const LIMIT: Duration = Duration::from_secs(15);

/// A gate the slow backend waits at; opened when the test ends so that no
/// thread outlives it for long.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// A virtio device whose worker blocks in its "backend" on the first
/// notification, as a disk stuck in slow I/O does. Its config space reads
/// 1 once the worker is blocked.
struct SlowDevice {
    busy: Arc<AtomicBool>,
    entered: Sender<()>,
    backend: Arc<Gate>,
    worker: Option<WorkerThread<()>>,
}

impl VirtioDevice for SlowDevice {
    fn device_type(&self) -> u32 {
        4
    }
    fn name(&self) -> &'static str {
        "slow"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = u8::from(self.busy.load(Ordering::Acquire));
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let (_mem, _irq, [(_queue, event)]) = a.take_queues::<1>()?;
        let (busy, entered, backend) = (
            self.busy.clone(),
            self.entered.clone(),
            self.backend.clone(),
        );
        let worker = WorkerThread::start("slow", vec![event], (), move |(), _| {
            busy.store(true, Ordering::Release);
            let _ = entered.send(());
            backend.wait();
        })
        .map_err(ActivateError::Thread)?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
    }
    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, WorkerError> {
        Ok(stop_worker(&mut self.worker)?.map(|()| Vec::new()))
    }
    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Rng(devices::virtio::persist::RngState {})
    }
    fn restore_state(&mut self, _: &VirtioDeviceState) -> Result<(), VirtioStateError> {
        Ok(())
    }
}

/// Sets up queue 0 of the virtio-mmio device at VIRTIO_BASE, starts the
/// device and notifies the queue.
fn start_device(a: &mut CodeAssembler) {
    a.mov(rbx, VIRTIO_BASE).unwrap();
    let w = |a: &mut CodeAssembler, offset: i32, value: u32| {
        a.mov(dword_ptr(rbx + offset), value).unwrap();
    };
    w(a, 0x70, 1); // ACKNOWLEDGE
    w(a, 0x70, 3); // DRIVER
    w(a, 0x24, 1); // DriverFeaturesSel: bits 32..63
    w(a, 0x20, 1); // VIRTIO_F_VERSION_1
    w(a, 0x70, 0xb); // FEATURES_OK
    w(a, 0x30, 0); // QueueSel
    w(a, 0x38, 16); // QueueNum
    for (offset, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
        w(a, offset, u32::try_from(addr).unwrap());
        w(a, offset + 4, 0);
    }
    w(a, 0x44, 1); // QueueReady
    w(a, 0x70, 0xf); // DRIVER_OK
    w(a, 0x50, 0); // QueueNotify: the worker wakes and blocks
}

fn spin(a: &mut CodeAssembler) {
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.pause().unwrap();
    a.jmp(top).unwrap();
}

/// Runs `machine` on a thread; the end arrives on the receiver.
fn start(machine: Machine, control: &VmControl) -> Receiver<(RunEnd, Duration)> {
    let (tx, rx) = channel();
    let control = control.clone();
    std::thread::spawn(move || {
        let options = RunOptions {
            started: Instant::now(),
            control: Some(&control),
            stdin: None,
        };
        let end = machine.run_with(options).unwrap();
        let _ = tx.send((end, Duration::ZERO));
    });
    rx
}

fn machine(hv: &KvmHypervisor, serial_out: Box<dyn std::io::Write + Send>) -> Machine {
    let spec = MachineSpec {
        cpus: 1,
        memory: 32 << 20,
        memory_options: Default::default(),
        hidden_features: Vec::new(),
        serial_out,
    };
    Machine::new(hv, spec).unwrap()
}

fn slow_device(machine: &mut Machine) -> (Receiver<()>, Arc<Gate>) {
    let (entered, entered_rx) = channel();
    let backend = Arc::new(Gate::default());
    let device = SlowDevice {
        busy: Arc::new(AtomicBool::new(false)),
        entered,
        backend: backend.clone(),
        worker: None,
    };
    machine.add_virtio_device(Box::new(device)).unwrap();
    (entered_rx, backend)
}

/// `hostvisor kill` (a Kill request) of a VM whose device worker is
/// blocked in its backend ends the VM in bounded time: the worker is
/// left behind instead of joined forever.
#[test]
fn kill_ends_a_vm_whose_device_worker_is_stuck() {
    let Some(hv) = kvm() else { return };
    let mut m = machine(&hv, Box::new(std::io::sink()));
    let (entered, backend) = slow_device(&mut m);
    let mut a = CodeAssembler::new(64).unwrap();
    start_device(&mut a);
    spin(&mut a);
    m.load_code(CODE, &a.assemble(CODE).unwrap(), 0).unwrap();
    let control = VmControl::new();
    let ended = start(m, &control);
    entered.recv_timeout(LIMIT).expect("the worker never ran");
    let asked = Instant::now();
    control.request(ControlRequest::Kill).unwrap();
    let (end, _) = ended
        .recv_timeout(LIMIT)
        .expect("the VM did not end after a kill");
    assert_eq!(end.outcome, VmOutcome::Killed);
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    backend.open();
}

/// The guest resets the device while its worker is blocked: the reset,
/// which runs on the vCPU thread, gives up on the worker after a bounded
/// wait and the guest goes on (here: to the debug-exit port).
#[test]
fn a_reset_does_not_wait_forever_for_a_busy_worker() {
    let Some(hv) = kvm() else { return };
    let mut m = machine(&hv, Box::new(std::io::sink()));
    let (entered, backend) = slow_device(&mut m);
    let mut a = CodeAssembler::new(64).unwrap();
    start_device(&mut a);
    // Wait until the worker is blocked (config byte 0 reads 1), then reset.
    let mut wait = a.create_label();
    a.set_label(&mut wait).unwrap();
    a.mov(eax, dword_ptr(rbx + 0x100)).unwrap();
    a.test(eax, eax).unwrap();
    a.jz(wait).unwrap();
    a.mov(dword_ptr(rbx + 0x70), 0u32).unwrap();
    a.mov(al, 0u32).unwrap();
    a.out(0xf4, al).unwrap();
    spin(&mut a);
    m.load_code(CODE, &a.assemble(CODE).unwrap(), 0).unwrap();
    let control = VmControl::new();
    let ended = start(m, &control);
    entered.recv_timeout(LIMIT).expect("the worker never ran");
    let started = Instant::now();
    let result = ended.recv_timeout(LIMIT);
    backend.open();
    let (end, _) = result.expect("the vCPU stayed stuck in the device reset");
    assert_eq!(end.outcome, VmOutcome::DebugExit(0));
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A vCPU blocked writing console output to a pipe nobody reads does not
/// keep a kill from ending the VM: it is left behind, and said to be.
#[test]
fn kill_ends_a_vm_whose_vcpu_is_blocked_on_console_output() {
    let Some(hv) = kvm() else { return };
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two-int array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created and are owned here.
    let (reader, writer) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // A small pipe fills after a few thousand exits.
    // SAFETY: F_SETPIPE_SZ on a pipe we own.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096) };
    let mut m = machine(&hv, Box::new(writer));
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(dx, 0x3f8u32).unwrap();
    a.mov(al, u32::from(b'A')).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.out(dx, al).unwrap();
    a.jmp(top).unwrap();
    m.load_code(CODE, &a.assemble(CODE).unwrap(), 0).unwrap();
    let control = VmControl::new();
    let ended = start(m, &control);
    // Wait until the pipe is full (the vCPU is then blocked in write).
    let start_fill = Instant::now();
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        unsafe { libc::ioctl(fds[0], libc::FIONREAD, &mut queued) };
        if queued >= 4096 {
            break;
        }
        assert!(start_fill.elapsed() < LIMIT, "the pipe never filled");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    control.request(ControlRequest::Kill).unwrap();
    let (end, _) = ended
        .recv_timeout(LIMIT)
        .expect("the VM did not end while its vCPU was blocked");
    assert_eq!(end.outcome, VmOutcome::Killed);
    assert_eq!(end.stuck, ["vCPU 0"]);
    assert!(asked.elapsed() < Duration::from_secs(10));
    // Reading the pipe lets the left-behind vCPU finish.
    drop(reader);
}
