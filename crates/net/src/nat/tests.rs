//! The NAT driven with hand-made guest frames: DHCP, ARP, a TCP connection
//! out to a host listener, a port forward in, bad input.

use super::*;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    [&dst[..], &GUEST_MAC, &ethertype.to_be_bytes(), payload].concat()
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = csum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    [h, payload.to_vec()].concat()
}

fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum()
}

fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = [
        &src.1.to_be_bytes()[..],
        &dst.1.to_be_bytes(),
        &(len as u16).to_be_bytes(),
        &[0, 0],
        payload,
    ]
    .concat();
    let c = csum(&u, pseudo_sum(src.0, dst.0, 17, len));
    u[6..8].copy_from_slice(&c.to_be_bytes());
    eth([0xff; 6], 0x0800, &ipv4(src.0, dst.0, 17, &u))
}

fn tcp_syn(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), gw_mac: [u8; 6]) -> Vec<u8> {
    let mut t = [
        &src.1.to_be_bytes()[..],
        &dst.1.to_be_bytes(),
        &1000u32.to_be_bytes(),
        &0u32.to_be_bytes(),
        &[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0],
    ]
    .concat();
    let c = csum(&t, pseudo_sum(src.0, dst.0, 6, t.len()));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    eth(gw_mac, 0x0800, &ipv4(src.0, dst.0, 6, &t))
}

fn dhcp_discover() -> Vec<u8> {
    let mut b = vec![0u8; 240];
    b[0] = 1; // BOOTREQUEST
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    b[28..34].copy_from_slice(&GUEST_MAC);
    b[236..240].copy_from_slice(&[0x63, 0x82, 0x53, 0x63]);
    b.extend_from_slice(&[53, 1, 1, 255]);
    udp((Ipv4Addr::UNSPECIFIED, 68), (Ipv4Addr::BROADCAST, 67), &b)
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&GUEST_MAC);
    a.extend_from_slice(&GUEST.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    eth([0xff; 6], 0x0806, &a)
}

/// Runs the engine until `want` accepts one of its frames.
fn until(engine: &mut Engine, what: &str, want: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        while let Some(f) = engine.pop_output() {
            if want(&f) {
                return f;
            }
        }
        engine.poll(20, &mut []);
    }
    panic!("no {what} from the NAT");
}

fn is_dhcp_offer(f: &[u8]) -> bool {
    f.len() > 42 + 240 && f[12..14] == [8, 0] && f[23] == 17 && f[36..38] == [0, 68]
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn hostfwd_strings_parse_like_qemus() {
    let f: HostFwd = "tcp:127.0.0.1:8080-:80".parse().unwrap();
    assert_eq!(
        f,
        HostFwd {
            udp: false,
            host_addr: Ipv4Addr::LOCALHOST,
            host_port: 8080,
            guest_addr: GUEST,
            guest_port: 80
        }
    );
    assert_eq!(f.to_string(), "tcp:127.0.0.1:8080-10.0.2.15:80");
    assert_eq!(f.to_string().parse::<HostFwd>().unwrap(), f);
    let u: HostFwd = "udp::5353-10.0.2.16:53".parse().unwrap();
    assert!(u.udp && u.host_addr.is_unspecified() && u.guest_addr == Ipv4Addr::new(10, 0, 2, 16));
    for bad in [
        "",
        "tcp",
        "icmp:1-:2",
        "tcp:127.0.0.1:8080",
        "tcp:127.0.0.1:0-:80",
        "tcp:127.0.0.1:70000-:80",
        "tcp:localhost:80-:80",
        "tcp:127.0.0.1:80-:x",
    ] {
        let e = bad.parse::<HostFwd>().unwrap_err();
        assert!(e.contains("hostfwd"), "{e}");
    }
}

#[test]
fn dhcp_arp_and_a_tcp_connection_to_the_host() {
    let mut engine = Engine::new(&NatConfig::default(), Arc::default()).unwrap();
    engine.input(&dhcp_discover());
    let offer = until(&mut engine, "DHCP offer", is_dhcp_offer);
    // yiaddr: BOOTP offset 16, after Ethernet (14), IP (20) and UDP (8).
    assert_eq!(&offer[42 + 16..42 + 20], &GUEST.octets());
    assert_eq!(&offer[42 + 28..42 + 34], &GUEST_MAC, "chaddr");

    engine.input(&arp_request(GATEWAY));
    let reply = until(&mut engine, "ARP reply", |f| {
        f[12..14] == [8, 6] && f[20..22] == [0, 2]
    });
    let gw_mac: [u8; 6] = reply[22..28].try_into().unwrap();
    assert_eq!(&reply[28..32], &GATEWAY.octets());

    // The gateway is the host's loopback: a SYN to 10.0.2.2:P reaches a
    // listener on 127.0.0.1:P, and the guest gets the SYN-ACK.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    engine.input(&tcp_syn((GUEST, 40000), (GATEWAY, port), gw_mac));
    let synack = until(&mut engine, "SYN-ACK", |f| {
        f.len() >= 54 && f[23] == 6 && f[47] & 0x12 == 0x12
    });
    assert_eq!(u16::from_be_bytes([synack[34], synack[35]]), port);
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    while listener.accept().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no host connection"
        );
        engine.poll(20, &mut []);
    }
}

#[test]
fn port_forwards_listen_and_reach_the_guest_and_a_busy_port_is_an_error() {
    let port = free_port();
    let fwd: HostFwd = format!("tcp:127.0.0.1:{port}-:80").parse().unwrap();
    let config = NatConfig {
        hostfwd: vec![fwd],
        restricted: true,
    };
    let mut engine = Engine::new(&config, Arc::default()).unwrap();
    // Let the NAT learn the guest's MAC, as a booting guest's DHCP does.
    engine.input(&arp_request(GATEWAY));
    let _conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let syn = until(&mut engine, "SYN to the guest", |f| {
        f.len() >= 54 && f[12..14] == [8, 0] && f[23] == 6 && f[47] & 0x12 == 0x02
    });
    assert_eq!(&syn[30..34], &GUEST.octets());
    assert_eq!(u16::from_be_bytes([syn[36], syn[37]]), 80);
    // The same port again cannot listen: a clear error, not a NAT without it.
    let e = Engine::new(&config, Arc::default()).unwrap_err();
    assert!(matches!(e, NetError::HostFwd(_)), "{e}");
    assert!(e.to_string().contains(&port.to_string()));
}

#[test]
fn garbage_frames_are_dropped() {
    let stats = Arc::new(NatStats::default());
    let config = NatConfig {
        restricted: true,
        ..NatConfig::default()
    };
    let mut engine = Engine::new(&config, stats).unwrap();
    let mut seed = 0x9e37_79b9u32;
    for len in (0..200).chain([1514, 9000, 65_000, MAX_PACKET + 1]) {
        let frame: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        engine.input(&frame);
        // The same bytes as IPv4 and as ARP, past the Ethernet check.
        if len > 14 {
            let mut ip = frame.clone();
            ip[12..14].copy_from_slice(&[8, 0]);
            engine.input(&ip);
            ip[12..14].copy_from_slice(&[8, 6]);
            engine.input(&ip);
        }
        engine.poll(0, &mut []);
    }
    // Still serving.
    engine.input(&dhcp_discover());
    until(&mut engine, "DHCP offer", is_dhcp_offer);
}

#[test]
fn the_nat_thread_moves_frames_through_its_socket() {
    let mut nat = Nat::start(&NatConfig::default()).unwrap();
    nat.send(&dhcp_discover()).unwrap();
    let mut buf = vec![0u8; MAX_PACKET];
    let start = Instant::now();
    loop {
        match nat.recv(&mut buf) {
            Ok(n) if is_dhcp_offer(&buf[..n]) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no offer");
    }
    drop(nat); // joins the thread
}
