//! The muxer's pool of connections opened ahead of time (`muxer::pool`)
//! against the scripted guest.

use std::time::Instant;

use super::*;

/// A muxer pooling the agent's port 52.
fn pooled(fx: &Fixture, mem: &GuestMemoryMmap, drv: &FakeDriver) -> Muxer {
    let mut m = fx.muxer(mem, drv);
    m.set_pool(&[52]);
    m
}

/// Runs the muxer's round (no host event needed) and returns what the
/// guest received.
fn round(m: &mut Muxer, drv: &mut FakeDriver) -> Vec<(Header, Vec<u8>)> {
    m.poll_host(0).unwrap();
    drv.received()
}

fn requests(got: &[(Header, Vec<u8>)]) -> Vec<u32> {
    got.iter()
        .filter(|(h, _)| h.op == Op::Request && h.dst_port == 52)
        .map(|(h, _)| h.src_port)
        .collect()
}

/// The pool's request for port 52, accepted by the guest: its local port.
fn accept_pooled(m: &mut Muxer, drv: &mut FakeDriver, buf_alloc: u32) -> u32 {
    let got = round(m, drv);
    let reqs = requests(&got);
    assert_eq!(reqs.len(), 1, "one pooled request: {got:?}");
    let mut resp = guest_packet(Op::Response, 52, reqs[0], 0);
    resp.buf_alloc = buf_alloc;
    drv.send(resp, &[]);
    m.process_tx();
    assert_eq!(m.pooled(), 1);
    reqs[0]
}

fn connect(fx: &Fixture, first: &[u8]) -> UnixStream {
    let mut host = UnixStream::connect(&fx.path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(first).unwrap();
    host
}

/// Polls until the guest has received something (or 5 s passed).
fn poll_some(m: &mut Muxer, drv: &mut FakeDriver) -> Vec<(Header, Vec<u8>)> {
    for _ in 0..50 {
        m.poll_host(100).unwrap();
        let got = drv.received();
        if !got.is_empty() {
            return got;
        }
    }
    Vec::new()
}

#[test]
fn a_pooled_connection_answers_connect_at_once_and_is_refilled_after() {
    let fx = Fixture::new("pool-lend");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(40);
    let mut m = pooled(&fx, &mem, &drv);
    let local = accept_pooled(&mut m, &mut drv, 64 << 10);
    assert!(round(&mut m, &mut drv).is_empty(), "idle: nothing more");

    // The host program's CONNECT is answered without the guest: its
    // request (sent with the line) goes on the pooled connection.
    let mut host = connect(&fx, b"CONNECT 52\nhello");
    let got = poll_some(&mut m, &mut drv);
    assert_eq!(read_line(&mut host), format!("OK {local}"));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0.op, got[0].0.src_port), (Op::Rw, local));
    assert_eq!(&got[0].1, b"hello");
    assert_eq!(m.pooled(), 0);
    // While it is in use, no new one competes with it for the guest.
    assert!(requests(&round(&mut m, &mut drv)).is_empty());

    drv.send(guest_packet(Op::Rw, 52, local, 4), b"pong");
    m.process_tx();
    let mut pong = [0u8; 4];
    host.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"pong");

    // Once it is done, the pool opens the next.
    drop(host);
    let got = poll_some(&mut m, &mut drv);
    assert_eq!((got[0].0.op, got[0].0.src_port), (Op::Shutdown, local));
    drv.send(guest_packet(Op::Rst, 52, local, 0), &[]);
    m.process_tx();
    let next = requests(&round(&mut m, &mut drv));
    assert_eq!(next.len(), 1);
    assert_ne!(next[0], local);
    assert_eq!(m.connections(), 1);
}

#[test]
fn a_connection_still_handshaking_is_lent_and_answered_when_accepted() {
    let fx = Fixture::new("pool-early");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(40);
    let mut m = pooled(&fx, &mem, &drv);
    let local = requests(&round(&mut m, &mut drv))[0];
    let mut host = connect(&fx, b"CONNECT 52\nx");
    m.poll_host(1000).unwrap();
    assert!(
        requests(&drv.received()).is_empty(),
        "no second request: the pooled one is taken"
    );
    drv.send(guest_packet(Op::Response, 52, local, 0), &[]);
    m.process_tx();
    assert_eq!(read_line(&mut host), format!("OK {local}"));
    m.fill_rx();
    let got = drv.received();
    assert_eq!((got[0].0.op, &got[0].1[..]), (Op::Rw, &b"x"[..]));
}

#[test]
fn the_pool_backs_off_while_nothing_listens_and_connects_fresh_meanwhile() {
    let fx = Fixture::new("pool-backoff");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(100);
    let mut m = pooled(&fx, &mem, &drv);
    let mut refused = 0;
    let mut waits = Vec::new();
    let mut since = Instant::now();
    while refused < 4 {
        let got = poll_some(&mut m, &mut drv);
        let reqs = requests(&got);
        assert_eq!(reqs.len(), 1, "one attempt at a time: {got:?}");
        if refused > 0 {
            waits.push(since.elapsed());
        }
        // Nothing listens: the guest refuses.
        drv.send(guest_packet(Op::Rst, 52, reqs[0], 0), &[]);
        m.process_tx();
        since = Instant::now();
        refused += 1;
        assert!(
            requests(&round(&mut m, &mut drv)).is_empty(),
            "no attempt right after a refusal"
        );
        assert!(m.connections() <= 1);
    }
    // 50, 100, 200 ms (the test's polls add a little).
    for (wait, least) in waits.iter().zip([50, 100, 200]) {
        assert!(
            *wait >= Duration::from_millis(least),
            "waits grow: {waits:?}"
        );
    }
    // Meanwhile a host program connects afresh, at once.
    let mut host = connect(&fx, b"CONNECT 52\n");
    m.poll_host(1000).unwrap();
    let reqs = requests(&drv.received());
    assert_eq!(reqs.len(), 1, "a fresh request");
    drv.send(guest_packet(Op::Response, 52, reqs[0], 0), &[]);
    m.process_tx();
    assert_eq!(read_line(&mut host), format!("OK {}", reqs[0]));
}

#[test]
fn a_pooled_connection_the_guest_closed_is_never_lent() {
    let fx = Fixture::new("pool-dead");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(40);
    let mut m = pooled(&fx, &mem, &drv);
    let local = accept_pooled(&mut m, &mut drv, 64 << 10);
    // The guest's agent restarts: its reset is queued but the muxer has
    // not taken it yet when the host program comes.
    drv.send(guest_packet(Op::Rst, 52, local, 0), &[]);
    let mut host = connect(&fx, b"CONNECT 52\n");
    m.poll_host(1000).unwrap();
    let reqs = requests(&drv.received());
    assert_eq!(reqs.len(), 1, "connected afresh");
    assert_ne!(reqs[0], local);
    drv.send(guest_packet(Op::Response, 52, reqs[0], 0), &[]);
    m.process_tx();
    assert_eq!(read_line(&mut host), format!("OK {}", reqs[0]));

    // A pooled connection the guest shuts down is reset, not lent.
    drop(host);
    let fx = Fixture::new("pool-shut");
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(40);
    let mut m = pooled(&fx, &mem, &drv);
    let local = accept_pooled(&mut m, &mut drv, 64 << 10);
    let mut shut = guest_packet(Op::Shutdown, 52, local, 0);
    shut.flags = SHUTDOWN_SEND;
    drv.send(shut, &[]);
    m.process_tx();
    let got = round(&mut m, &mut drv);
    assert!(
        got.iter()
            .any(|(h, _)| h.op == Op::Rst && h.src_port == local),
        "{got:?}"
    );
    assert_eq!(m.pooled(), 0);
}

#[test]
fn a_pooled_connection_keeps_the_credit_rules() {
    let fx = Fixture::new("pool-credit");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(40);
    let mut m = pooled(&fx, &mem, &drv);
    let local = accept_pooled(&mut m, &mut drv, 10);
    // An idle connection answers a credit request like any other.
    let mut ask = guest_packet(Op::CreditRequest, 52, local, 0);
    ask.buf_alloc = 10;
    drv.send(ask, &[]);
    m.process_tx();
    let got = round(&mut m, &mut drv);
    assert_eq!((got[0].0.op, got[0].0.src_port), (Op::CreditUpdate, local));

    let mut host = connect(&fx, b"CONNECT 52\n0123456789abcdefghij");
    credit_limits_hold(&mut m, &mut drv, 52, local);
    assert_eq!(read_line(&mut host), format!("OK {local}"));

    // Data from the guest on a connection nobody was lent: reset, and
    // never handed to a host program.
    let fx = Fixture::new("pool-talk");
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(40);
    let mut m = pooled(&fx, &mem, &drv);
    let local = accept_pooled(&mut m, &mut drv, 64 << 10);
    drv.send(guest_packet(Op::Rw, 52, local, 5), b"early");
    m.process_tx();
    let got = round(&mut m, &mut drv);
    assert!(got
        .iter()
        .any(|(h, _)| h.op == Op::Rst && h.src_port == local));
    let mut host = connect(&fx, b"CONNECT 52\n");
    m.poll_host(1000).unwrap();
    let reqs = requests(&drv.received());
    assert_eq!(reqs.len(), 1);
    assert_ne!(reqs[0], local);
    drv.send(guest_packet(Op::Response, 52, reqs[0], 0), &[]);
    m.process_tx();
    assert_eq!(read_line(&mut host), format!("OK {}", reqs[0]));
}

#[test]
fn the_pool_is_bounded_against_a_guest_that_accepts_and_closes() {
    let fx = Fixture::new("pool-churn");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(200);
    let mut m = fx.muxer(&mem, &drv);
    // More ports than pooled at most, and duplicates.
    m.set_pool(&[52, 52, 53, 54, 55, 56, 57]);
    let got = round(&mut m, &mut drv);
    let ports: Vec<u32> = got
        .iter()
        .filter(|(h, _)| h.op == Op::Request)
        .map(|(h, _)| h.dst_port)
        .collect();
    assert_eq!(ports, [52, 53, 54, 55], "{got:?}");
    // The guest accepts and drops each at once, again and again: one
    // connection per port at any time, and each drop makes the next
    // attempt wait longer.
    let mut pending: Vec<Header> = got.into_iter().map(|(h, _)| h).collect();
    for _ in 0..3 {
        for req in pending.drain(..) {
            drv.send(
                guest_packet(Op::Response, req.dst_port, req.src_port, 0),
                &[],
            );
            drv.send(guest_packet(Op::Rst, req.dst_port, req.src_port, 0), &[]);
        }
        m.process_tx();
        assert!(m.connections() <= 4);
        pending = poll_some(&mut m, &mut drv)
            .into_iter()
            .map(|(h, _)| h)
            .filter(|h| h.op == Op::Request)
            .collect();
        m.poll_host(300).unwrap();
        pending.extend(
            drv.received()
                .into_iter()
                .map(|(h, _)| h)
                .filter(|h| h.op == Op::Request),
        );
        assert!(pending.len() <= 4, "{pending:?}");
    }
    assert!(m.connections() <= 4);
}

#[test]
fn a_full_connection_table_makes_the_pool_wait_not_spin() {
    let fx = Fixture::new("pool-full");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(40);
    let mut m = pooled(&fx, &mem, &drv);
    m.set_max_connections(1);
    // Refused once: the next attempt is due in 50 ms.
    let local = requests(&round(&mut m, &mut drv))[0];
    drv.send(guest_packet(Op::Rst, 52, local, 0), &[]);
    m.process_tx();
    assert!(requests(&round(&mut m, &mut drv)).is_empty());
    // Meanwhile a guest connection takes the only place.
    let mut port_path = fx.path.clone().into_os_string();
    port_path.push("_9");
    let _service = UnixListener::bind(&port_path).unwrap();
    drv.send(guest_packet(Op::Request, 100, 9, 0), &[]);
    m.process_tx();
    assert_eq!(m.connections(), 1);
    // Once the attempt is due there is no room: the event loop still
    // sleeps between attempts (not a 1 ms spin on a past deadline).
    let due = Instant::now() + Duration::from_millis(60);
    while Instant::now() < due {
        m.poll_host(20).unwrap();
    }
    for _ in 0..3 {
        assert!(requests(&round(&mut m, &mut drv)).is_empty());
        let wait = m.pool_timeout_ms();
        assert!(wait >= 10, "the event loop would spin: {wait} ms");
    }
    assert_eq!(m.pooled(), 0);
}

#[test]
fn the_pool_waits_until_the_guest_handled_a_transport_reset() {
    let fx = Fixture::new("pool-reset");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    drv.post_rx(40);
    let ev = MockSplitQueue::create(&mem, GuestAddress(0x30000), 16);
    let mut m = pooled(&fx, &mem, &drv);
    m.detach();
    m.attach(Guest {
        mem: mem.clone(),
        interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        rx: drv.rx.create_queue().unwrap(),
        tx: drv.tx.create_queue().unwrap(),
        events: ev.create_queue().unwrap(),
    });
    m.request_transport_reset();
    assert!(
        round(&mut m, &mut drv).is_empty(),
        "nothing before the event"
    );
    ev.add_desc_chains(&[d(0x180000, 8, crate::test_util::F_WRITE, 0)], 0)
        .unwrap();
    m.deliver_events();
    assert!(!m.transport_reset_pending());
    m.poll_host(100).unwrap();
    assert!(
        requests(&drv.received()).is_empty(),
        "nothing while the guest handles the reset"
    );
    // The guest posts its event buffer again: it has handled the reset.
    ev.add_desc_chains(&[d(0x190000, 8, crate::test_util::F_WRITE, 0)], 1)
        .unwrap();
    m.deliver_events();
    assert_eq!(requests(&round(&mut m, &mut drv)).len(), 1);
}

/// The device's own thread: a refused pooled connection is tried again
/// on the pool's timer (no guest kick), and nothing happens while the
/// device sleeps.
#[test]
fn the_device_thread_retries_on_its_timer_and_not_asleep() {
    use crate::virtio::mmio::MmioTransport;
    let fx = Fixture::new("pool-dev");
    let mem = memory();
    let mut drv = FakeDriver::new(&mem);
    let ev = MockSplitQueue::create(&mem, GuestAddress(0x30000), 16);
    let mut dev = super::super::Vsock::new(CID, &fx.path).unwrap();
    dev.set_pool(&[52]);
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::new(Box::new(dev), mem.clone(), irq).unwrap();
    crate::test_util::set_up_driver(&mut t, &[&drv.rx, &drv.tx, &ev], &[256, 256, 16], 0);
    drv.post_rx(40);
    t.queue_events()[0].write(1).unwrap();
    let req = wait_received(&mut drv)[0].0;
    assert_eq!((req.op, req.dst_port), (Op::Request, 52));
    drv.send(guest_packet(Op::Rst, 52, req.src_port, 0), &[]);
    t.queue_events()[1].write(1).unwrap();
    let again = wait_received(&mut drv)[0].0;
    assert_eq!((again.op, again.dst_port), (Op::Request, 52));
    drv.send(guest_packet(Op::Rst, 52, again.src_port, 0), &[]);
    t.queue_events()[1].write(1).unwrap();
    // Asleep (the retry is due in 100 ms): the guest's memory is left
    // alone; awake, the retry comes.
    t.sleep().unwrap();
    let used = drv.rx.used().idx().load();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(drv.rx.used().idx().load(), used, "nothing while asleep");
    t.wake().unwrap();
    let third = wait_received(&mut drv)[0].0;
    assert_eq!((third.op, third.dst_port), (Op::Request, 52));
}
