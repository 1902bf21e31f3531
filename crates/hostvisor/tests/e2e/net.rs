//! Networks end to end, on the default guest: the NAT (DHCP lease, a page
//! from the host's loopback, ICMP echo, DNS through the relay to the
//! host's resolver, a port forward into the guest's httpd), an internal network between two VMs that cannot reach the host,
//! and a TAP in a network namespace. Tests that need a namespace make
//! their own on a thread of their own (CLONE_NEWNET is per thread, and
//! the processes it starts inherit it), which needs root: CI sets
//! HOSTVISOR_REQUIRE_NETNS=1 to fail instead of skipping. The NAT and
//! internal-network VMs are resumed from booted templates
//! (tests/common/template.rs); the `run` script and the TAP guest boot.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should fail the test

use super::common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::template;
use common::*;

/// Runs `body` on a thread in a new network namespace with loopback up;
/// false (after printing why) when namespaces cannot be made.
fn in_netns(body: impl FnOnce() + Send + 'static) -> bool {
    let t = std::thread::spawn(move || {
        // SAFETY: unshare(2) with CLONE_NEWNET moves only this thread
        // (which ends with the test) into a new namespace; no memory is
        // passed.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = std::io::Error::last_os_error();
            assert!(
                std::env::var("HOSTVISOR_REQUIRE_NETNS").as_deref() != Ok("1"),
                "network namespaces are required (HOSTVISOR_REQUIRE_NETNS=1): {e}"
            );
            eprintln!("SKIPPED: cannot make a network namespace ({e}); run as root");
            return false;
        }
        tool("ip", &["link", "set", "lo", "up"]);
        body();
        true
    });
    match t.join() {
        Ok(ran) => ran,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs `script` in the guest until its output contains every one of
/// `needles` (a command of the script that the nested host's exec-time
/// crash ended leaves its part out: the script runs again).
fn wait_for(vm: &TestVm, script: &str, needles: &[&str], limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let out = vm.exec(&["sh", "-c", script]);
        if needles.iter().all(|n| out.stdout.contains(n)) {
            return out.stdout;
        }
        if start.elapsed() > limit {
            let state = vm.exec(&["sh", "-c", "ps; ip addr; ls /run; dmesg | tail -15"]);
            panic!(
                "{script}: not all of {needles:?} within {limit:?}; last: {}{}\nguest state:\n{}{}\nconsole ends:\n{}",
                out.stdout,
                out.stderr,
                state.stdout,
                state.stderr,
                vm.console_tail(20)
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// A host HTTP server answering every request with `body`; returns its
/// port and a counter of connections.
fn http_server(
    addr: &str,
    body: &'static [u8],
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind((addr, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut req = [0u8; 4096];
            let _ = conn.read(&mut req);
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(body);
        }
    });
    (port, hits)
}

/// Makes this thread's view of /etc/resolv.conf name 127.0.0.1 (in a
/// mount namespace of its own, inherited by the VM process) and answers
/// DNS there: A queries for `name` get `addr`, others an empty answer.
fn fake_resolver(name: &'static str, addr: [u8; 4]) {
    // SAFETY: unshare(2) and mount(2) with constant C strings; they change
    // only this thread's mount namespace.
    unsafe {
        assert_eq!(
            libc::unshare(libc::CLONE_NEWNS),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
        let root = c"/";
        assert_eq!(
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            ),
            0
        );
    }
    let conf = temp_dir("resolv").join("resolv.conf");
    std::fs::write(&conf, "nameserver 127.0.0.1\n").unwrap();
    let src = std::ffi::CString::new(conf.to_str().unwrap()).unwrap();
    // SAFETY: a bind mount of a file we made over /etc/resolv.conf, in
    // this thread's own mount namespace.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            c"/etc/resolv.conf".as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let sock = std::net::UdpSocket::bind("127.0.0.1:53").unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let q = &buf[..n];
            if n < 17 {
                continue;
            }
            // The question: labels from byte 12, then type and class.
            let mut at = 12;
            let mut labels = Vec::new();
            while at < n && q[at] != 0 {
                let len = usize::from(q[at]);
                labels
                    .push(String::from_utf8_lossy(&q[at + 1..(at + 1 + len).min(n)]).into_owned());
                at += 1 + len;
            }
            let end = at + 5;
            if end > n {
                continue;
            }
            let qtype = u16::from_be_bytes([q[at + 1], q[at + 2]]);
            let hit = qtype == 1 && labels.join(".") == name;
            let mut r = Vec::from(&q[..2]);
            r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(hit), 0, 0, 0, 0]);
            r.extend_from_slice(&q[12..end]);
            if hit {
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                r.extend_from_slice(&addr);
            }
            let _ = sock.send_to(&r, from);
        }
    });
}

/// GET / from the host; the body, once something answers.
fn host_get(port: u16, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let got = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        });
        match got {
            Ok(text) if text.contains("\r\n\r\n") => {
                return text.split_once("\r\n\r\n").unwrap().1.to_string()
            }
            other => assert!(
                start.elapsed() < limit,
                "nothing answered on 127.0.0.1:{port}: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn nat_gives_a_lease_reaches_the_host_and_forwards_ports() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    in_netns(|| {
        fake_resolver("web.hostvisor.test", [192, 0, 2, 7]);
        let (port, _) = http_server("127.0.0.1", b"hello from the host\n");
        // The booted default guest (its lease taken), resumed here with a
        // port forward: NAT flows do not cross a restore, the lease does.
        let vm = TestVm::from_template(
            "nat",
            &template::DEFAULT,
            &["--net", "nat,hostfwd=tcp:127.0.0.1:18080-:80"],
        );
        let show = vm.ok(&["show", "nat"]);
        assert!(
            show.contains("eth0: nat,hostfwd=tcp:127.0.0.1:18080-10.0.2.15:80,mac=52:54:00:"),
            "{show}"
        );

        // The lease: address, gateway, DNS relay; and the large NAT MTU.
        wait_for(
            &vm,
            "ip -4 addr show eth0; ip route; cat /etc/resolv.conf",
            &[
                "inet 10.0.2.15/24",
                "mtu 65520",
                "default via 10.0.2.2 dev eth0",
                "nameserver 10.0.2.3",
            ],
            Duration::from_secs(120),
        );

        // Out: the gateway is the host's loopback.
        let page = vm.sh(&format!("wget -q -O - http://10.0.2.2:{port}/"));
        assert_eq!(page, "hello from the host\n");
        let ping = vm.sh("ping -c 2 -W 10 10.0.2.2");
        assert!(ping.contains("2 packets received"), "{ping}");
        // DNS (UDP) through the relay at 10.0.2.3 to the host's resolver.
        let dns = vm.sh("nslookup web.hostvisor.test 10.0.2.3");
        assert!(dns.contains("192.0.2.7"), "{dns}");

        // In: a port forward to the guest's httpd.
        vm.sh("httpd -p 80 -h /www");
        assert_eq!(
            host_get(18080, Duration::from_secs(60)),
            "hostvisor guest\n"
        );
    });
}

/// `hostvisor run --net nat` with a `hostvisor.run=` script: /init brings
/// the network up before the script, so its first command can fetch from
/// the host. The same boot (a NIC, a vsock device and the agent, an RNG)
/// prints no alarming lines.
#[test]
fn a_run_script_has_the_network_on_its_first_line() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    in_netns(|| {
        let (port, hits) = http_server("127.0.0.1", b"fetched at once\n");
        let dir = temp_dir("runnet");
        let socket = dir.join("vsock.sock");
        // Run once more only if a signal (the nested host's exec-time
        // crash) ended wget; a failure for want of a network is final.
        let get = format!("wget -q -O - http://10.0.2.2:{port}/");
        let script =
            format!("{get}; s=$?; if [ $s -gt 128 ]; then {get}; s=$?; fi; echo WGET-STATUS=$s");
        let append = format!("hostvisor.run={}", base64(script.as_bytes()));
        let vsock = format!("cid=9,socket={}", socket.display());
        let out = hostvisor(
            &[
                "run", "--net", "nat", "--rng", "--vsock", &vsock, "--append", &append,
            ],
            &[],
            BOOT + Duration::from_secs(60),
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("fetched at once"), "{}", out.stdout);
        assert!(out.stdout.contains("WGET-STATUS=0"), "{}", out.stdout);
        assert!(hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        assert!(
            out.stdout.contains("hostvisor: eth0 has 10.0.2.15/24"),
            "{}",
            out.stdout
        );
        assert_clean_boot_log(&out.stdout);
    });
}

#[test]
fn vms_on_an_internal_network_reach_each_other_and_not_the_host() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    let net = format!("lab-{}", std::process::id());
    let nic = format!("internal={net}");
    // Clones of one booted guest: each has its own MAC (a resumed clone's
    // is set by the agent), as two `create`d VMs would.
    let a = TestVm::from_template("lab-a", &template::INTERNAL, &["--net", &nic]);
    let b = TestVm::from_template("lab-b", &template::INTERNAL, &["--net", &nic]);
    // A host service on every address, which nothing on the network may
    // reach.
    let (port, hits) = http_server("0.0.0.0", b"host\n");
    for (vm, me) in [(&a, "192.168.50.1"), (&b, "192.168.50.2")] {
        vm.sh(&format!(
            "ip link set eth0 up && ip addr replace {me}/24 dev eth0 && ip route replace default dev eth0"
        ));
    }
    let ping = a.sh("ping -c 3 -W 10 192.168.50.2");
    assert!(ping.contains("3 packets received"), "{ping}");
    let ping = b.sh("ping -c 3 -W 10 192.168.50.1");
    assert!(ping.contains("3 packets received"), "{ping}");
    // Frames for anyone else go nowhere: no gateway answers, the host's
    // service sees nothing.
    // wget's own failure (status 1, "can't connect"), not a crash: with
    // `-T 5` busybox wget died of SIGSEGV here every time (booted or
    // resumed guest alike), and a crash passed for "nothing answered".
    for target in ["10.0.2.2", "127.0.0.1", "192.168.50.254"] {
        let out = a.exec(&["wget", "-q", "-O", "-", &format!("http://{target}:{port}/")]);
        assert_eq!(out.code, 1, "{target}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stderr.contains("can't connect to remote host"),
            "{target}: {}",
            out.stderr
        );
    }
    let ping = a.exec(&["ping", "-c", "1", "-W", "3", "10.0.2.2"]);
    assert_eq!(ping.code, 1, "{}{}", ping.stdout, ping.stderr);
    assert!(
        ping.stdout.contains("0 packets received"),
        "{}",
        ping.stdout
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    drop((a, b));
    let dir = net::switch::network_dir(&net);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "stopped VMs leave their sockets: {left:?}");
    let _ = std::fs::remove_dir(&dir);
}

#[test]
fn a_guest_on_a_tap_reaches_a_peer_in_its_namespace() {
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    in_netns(|| {
        tool("ip", &["tuntap", "add", "dev", "hvtap0", "mode", "tap"]);
        tool("ip", &["addr", "add", "192.168.77.1/24", "dev", "hvtap0"]);
        tool("ip", &["link", "set", "hvtap0", "up"]);
        // 1 MiB: TCP segments big enough for the offloads the TAP takes.
        static BODY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let body: &'static [u8] =
            BODY.get_or_init(|| (0..1 << 20).map(|i| (i % 251) as u8).collect());
        let (port, _) = http_server("192.168.77.1", body);
        let vm = TestVm::start("tap", &["--net", "tap=hvtap0"]);
        vm.sh("ip link set eth0 up && ip addr replace 192.168.77.2/24 dev eth0");
        let ping = vm.sh("ping -c 3 -W 10 192.168.77.1");
        assert!(ping.contains("3 packets received"), "{ping}");
        let sum = vm.sh(&format!(
            "wget -q -O /tmp/body http://192.168.77.1:{port}/ && wc -c < /tmp/body && md5sum /tmp/body"
        ));
        let file = temp_dir("tap-body").join("body");
        std::fs::write(&file, body).unwrap();
        let host_sum = tool("md5sum", &[file.to_str().unwrap()]);
        let digest = host_sum.split_whitespace().next().unwrap();
        assert_eq!(
            sum.lines().next(),
            Some(body.len().to_string().as_str()),
            "{sum}"
        );
        assert!(
            sum.contains(digest),
            "the guest got other bytes: {sum} vs {host_sum}"
        );
        let _ = std::fs::remove_dir_all(file.parent().unwrap());
    });
}

#[test]
fn bad_nic_options_are_one_line_errors() {
    let out = hostvisor(&["run", "--net", "bridge=br0"], &[], QUICK);
    assert_one_line_error(&out, 2, "nat, tap=IFNAME or internal=NAME");
    let out = hostvisor(
        &["run", "--net", "nat,hostfwd=tcp:127.0.0.1:x-:80"],
        &[],
        QUICK,
    );
    assert_one_line_error(&out, 2, "is not a port");
    let out = hostvisor(&["run", "--net", "none", "--net", "nat"], &[], QUICK);
    assert_one_line_error(&out, 2, "cannot be combined");
    if !kvm_usable() || default_guest().is_none() {
        return;
    }
    // A forward whose port is taken stops the VM before it boots.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let rule = format!("nat,hostfwd=tcp:127.0.0.1:{port}-:80");
    let out = hostvisor(&["run", "--serial", "none", "--net", &rule], &[], QUICK);
    assert_one_line_error(
        &out,
        1,
        &format!("port forward tcp:127.0.0.1:{port}-10.0.2.15:80"),
    );
}
