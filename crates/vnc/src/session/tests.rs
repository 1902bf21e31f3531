use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::encoding::tests_support::ZrleDecoder;

/// Everything the session hands to its receivers.
#[derive(Default)]
pub(crate) struct Recorder {
    pub(crate) keys: Mutex<Vec<(u16, bool)>>,
    pub(crate) pointer: Mutex<Vec<(u32, u32, u8, i32)>>,
    pub(crate) clip: Mutex<Vec<String>>,
    pub(crate) resizes: Mutex<Vec<(u16, u16)>>,
}

impl InputSink for Recorder {
    fn key(&self, code: u16, pressed: bool) {
        self.keys.lock().unwrap().push((code, pressed));
    }
    fn pointer(&self, x: u32, y: u32, buttons: u8, wheel: i32) {
        self.pointer.lock().unwrap().push((x, y, buttons, wheel));
    }
}

impl Clipboard for Recorder {
    fn client_text(&self, text: &str) {
        self.clip.lock().unwrap().push(text.to_string());
    }
}

impl ResizeHandler for Recorder {
    fn request_resize(&self, width: u16, height: u16) -> bool {
        self.resizes.lock().unwrap().push((width, height));
        width != 666
    }
}

struct Client {
    s: UnixStream,
    rec: Arc<Recorder>,
    display: Arc<Display>,
    thread: Option<SessionThread>,
}

type SessionThread = std::thread::JoinHandle<Result<(), SessionError>>;

fn start(password: Option<&str>) -> (UnixStream, Arc<Recorder>, Arc<Display>, SessionThread) {
    let (a, b) = UnixStream::pair().unwrap();
    let rec = Arc::new(Recorder::default());
    let display = Display::new(100, 70).unwrap();
    let ctx = Context {
        display: display.clone(),
        input: rec.clone(),
        clipboard: rec.clone(),
        resize: rec.clone(),
        password: password.map(|p| p.as_bytes().to_vec()),
        name: "test".into(),
        handshake_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
    };
    let t = std::thread::spawn(move || run(Conn::Unix(b), &ctx));
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (a, rec, display, t)
}

impl Client {
    /// Connects with RFB 3.8 and security None; reads ServerInit.
    fn connect() -> Client {
        let (mut s, rec, display, t) = start(None);
        let mut v = [0u8; 12];
        s.read_exact(&mut v).unwrap();
        assert_eq!(&v, b"RFB 003.008\n");
        s.write_all(b"RFB 003.008\n").unwrap();
        let mut types = [0u8; 2];
        s.read_exact(&mut types).unwrap();
        assert_eq!(types, [1, 1], "one type: None");
        s.write_all(&[1]).unwrap();
        assert_eq!(read_u32(&mut s), 0, "SecurityResult OK");
        s.write_all(&[1]).unwrap();
        let mut init = [0u8; 24];
        s.read_exact(&mut init).unwrap();
        assert_eq!(&init[..4], &[0, 100, 0, 70]);
        assert_eq!(&init[4..20], &PixelFormat::NATIVE.to_bytes());
        let mut name = vec![0u8; read_be32(&init[20..24]) as usize];
        s.read_exact(&mut name).unwrap();
        assert_eq!(name, b"test");
        Client {
            s,
            rec,
            display,
            thread: Some(t),
        }
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    fn encodings(&mut self, list: &[i32]) {
        let mut m = vec![2, 0];
        m.extend_from_slice(&(list.len() as u16).to_be_bytes());
        for e in list {
            m.extend_from_slice(&e.to_be_bytes());
        }
        self.send(&m);
    }

    fn request(&mut self, incremental: bool, x: u16, y: u16, w: u16, h: u16) {
        let mut m = vec![3, u8::from(incremental)];
        for v in [x, y, w, h] {
            m.extend_from_slice(&v.to_be_bytes());
        }
        self.send(&m);
    }

    fn key(&mut self, down: bool, keysym: u32) {
        let mut m = vec![4, u8::from(down), 0, 0];
        m.extend_from_slice(&keysym.to_be_bytes());
        self.send(&m);
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// Reads one FramebufferUpdate: (x, y, w, h, encoding, payload)
    /// per rectangle; Raw and ZRLE pixels decoded to `0x00RRGGBB`.
    fn update(&mut self, zrle: &mut ZrleDecoder) -> Vec<(Rect, i32, Vec<u32>)> {
        let h = self.read_n(4);
        assert_eq!(h[0], 0, "FramebufferUpdate");
        let n = u16::from_be_bytes([h[2], h[3]]);
        (0..n)
            .map(|_| {
                let r = self.read_n(12);
                let be = |i: usize| u32::from(u16::from_be_bytes([r[i], r[i + 1]]));
                let rect = Rect::new(be(0), be(2), be(4), be(6));
                let enc = i32::from_be_bytes(r[8..12].try_into().unwrap());
                let px = rect.width as usize * rect.height as usize;
                let pixels = match enc {
                    protocol::ENC_RAW => self
                        .read_n(px * 4)
                        .chunks(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], 0]))
                        .collect(),
                    protocol::ENC_ZRLE => {
                        let len = read_u32(&mut self.s) as usize;
                        let mut data = (len as u32).to_be_bytes().to_vec();
                        data.extend(self.read_n(len));
                        zrle.decode(&data, rect.width as usize, rect.height as usize)
                    }
                    protocol::ENC_EXTENDED_DESKTOP_SIZE => {
                        let n = self.read_n(4)[0];
                        self.read_n(16 * usize::from(n));
                        vec![]
                    }
                    protocol::ENC_DESKTOP_SIZE => vec![],
                    other => panic!("encoding {other}"),
                };
                (rect, enc, pixels)
            })
            .collect()
    }

    /// True if the server sends nothing for `ms`.
    fn quiet(&mut self, ms: u64) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_millis(ms)))
            .unwrap();
        let mut b = [0u8; 1];
        let r = self.s.read(&mut b);
        self.s
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        matches!(r, Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Waits for the session to end; its result.
    fn finish(&mut self) -> Result<(), SessionError> {
        self.thread.take().unwrap().join().unwrap()
    }
}

fn read_be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}

fn read_u32(s: &mut UnixStream) -> u32 {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}

fn paint(display: &Display, rect: Rect, colour: u32) {
    let px: Vec<u8> = (0..rect.width * rect.height)
        .flat_map(|_| {
            let [b, g, r, _] = colour.to_le_bytes();
            [b, g, r, 0xff]
        })
        .collect();
    display.update(rect, &px, rect.width as usize * 4).unwrap();
}

#[test]
fn updates_are_sent_only_when_asked_and_something_changed() {
    let mut c = Client::connect();
    let mut z = ZrleDecoder::new();
    paint(&c.display, Rect::new(0, 0, 100, 70), 0x0011_2233);
    c.encodings(&[protocol::ENC_RAW]);
    c.request(false, 0, 0, 100, 70);
    let u = c.update(&mut z);
    let all: Vec<u32> = u.iter().flat_map(|(_, _, p)| p.clone()).collect();
    assert_eq!(u[0].0, Rect::new(0, 0, 100, 64), "bands of 64 rows");
    assert_eq!(u[1].0, Rect::new(0, 64, 100, 6));
    assert_eq!(all, vec![0x0011_2233; 7000]);
    // Nothing changed: an incremental request waits.
    c.request(true, 0, 0, 100, 70);
    assert!(c.quiet(200), "no update without a change");
    // A change is sent, and only its rectangle.
    paint(&c.display, Rect::new(10, 20, 3, 2), 0x00ff_0000);
    let u = c.update(&mut z);
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].0, Rect::new(10, 20, 3, 2));
    assert_eq!(u[0].2, vec![0x00ff_0000; 6]);
    // Changes without a request wait for one, coalesced.
    paint(&c.display, Rect::new(0, 0, 1, 1), 1);
    paint(&c.display, Rect::new(0, 0, 2, 2), 2);
    assert!(c.quiet(100));
    c.encodings(&[protocol::ENC_ZRLE, protocol::ENC_RAW]);
    c.request(true, 0, 0, 100, 70);
    let u = c.update(&mut z);
    assert_eq!(u.len(), 1);
    assert_eq!(
        (u[0].0, u[0].1),
        (Rect::new(0, 0, 2, 2), protocol::ENC_ZRLE)
    );
    assert_eq!(u[0].2, vec![2; 4]);
    drop(c.s.try_clone().unwrap().shutdown(std::net::Shutdown::Both));
    assert!(c.finish().is_ok());
}

#[test]
fn keys_become_linux_codes_with_shift_added_when_needed() {
    let mut c = Client::connect();
    c.key(true, 'A' as u32);
    c.key(false, 'A' as u32);
    // With the viewer's own Shift: no extra Shift.
    c.key(true, 0xffe1);
    c.key(true, '!' as u32);
    c.key(false, '!' as u32);
    c.key(false, 0xffe1);
    c.key(true, 0xff0d);
    c.key(false, 0xff0d);
    c.key(true, 0xe9); // é: no key, ignored
    let want = vec![
        (42, true),
        (30, true),
        (30, false),
        (42, false),
        (42, true),
        (2, true),
        (2, false),
        (42, false),
        (28, true),
        (28, false),
    ];
    assert!(crate::tests_wait(
        || c.rec.keys.lock().unwrap().len() >= want.len()
    ));
    assert_eq!(*c.rec.keys.lock().unwrap(), want);
}

#[test]
fn pointer_scales_to_the_tablet_range_with_buttons_and_wheel() {
    let mut c = Client::connect();
    // 100 x 70 screen: the last pixel is 32767.
    c.send(&[5, 0b001, 0, 99, 0, 0]);
    c.send(&[5, 0b1000, 0, 0, 0, 69]); // wheel up pressed
    c.send(&[5, 0b0000, 0, 0, 0, 69]); // released
    c.send(&[5, 0b10100, 0xff, 0xff, 0, 35]); // right + wheel down, x beyond
    assert!(crate::tests_wait(
        || c.rec.pointer.lock().unwrap().len() == 4
    ));
    assert_eq!(
        *c.rec.pointer.lock().unwrap(),
        vec![
            (32767, 0, 1, 0),
            (0, 32767, 0, 1),
            (0, 32767, 0, 0),
            (32767, 35 * 32767 / 69, 4, -1)
        ]
    );
}

#[test]
fn clipboard_text_goes_both_ways_in_latin1() {
    let mut c = Client::connect();
    c.send(&[6, 0, 0, 0, 0, 0, 0, 3, b'h', 0xe9, b'!']);
    assert!(crate::tests_wait(|| !c.rec.clip.lock().unwrap().is_empty()));
    assert_eq!(c.rec.clip.lock().unwrap()[0], "hé!");
    c.display.set_clipboard("ok€");
    let m = c.read_n(8);
    assert_eq!(&m[..4], &[3, 0, 0, 0]);
    assert_eq!(read_be32(&m[4..]), 3);
    assert_eq!(c.read_n(3), b"ok?");
}

#[test]
fn desktop_size_requests_reach_the_handler_and_resizes_reach_the_viewer() {
    let mut c = Client::connect();
    let mut z = ZrleDecoder::new();
    c.encodings(&[protocol::ENC_RAW, protocol::ENC_EXTENDED_DESKTOP_SIZE]);
    c.request(true, 0, 0, 100, 70);
    // The first update announces ExtendedDesktopSize.
    let u = c.update(&mut z);
    assert_eq!(u[0].1, protocol::ENC_EXTENDED_DESKTOP_SIZE);
    assert_eq!(u[0].0, Rect::new(0, 0, 100, 70));
    let size = |w: u16, h: u16| {
        let mut m = vec![251, 0];
        m.extend_from_slice(&w.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        m.extend_from_slice(&[1, 0]);
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&w.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        m.extend_from_slice(&[0; 4]);
        m
    };
    for (w, h, status) in [(1024, 768, 0), (666, 10, 1), (0, 10, 3)] {
        c.send(&size(w, h));
        c.request(true, 0, 0, 100, 70);
        let u = c.update(&mut z);
        assert_eq!(u.len(), 1);
        assert_eq!((u[0].0.x, u[0].0.y), (1, status), "reply to {w}x{h}");
    }
    assert_eq!(*c.rec.resizes.lock().unwrap(), vec![(1024, 768), (666, 10)]);
    // The display follows: the viewer hears the new size and gets the
    // whole new screen.
    c.display.resize(120, 50).unwrap();
    c.request(true, 0, 0, 100, 70);
    let u = c.update(&mut z);
    assert_eq!(
        (u[0].0, u[0].1),
        (
            Rect::new(0, 0, 120, 50),
            protocol::ENC_EXTENDED_DESKTOP_SIZE
        )
    );
    assert_eq!(u[1].0, Rect::new(0, 0, 120, 50));
}

#[test]
fn malformed_messages_close_the_session() {
    for bad in [
        vec![9u8],
        vec![2, 0, 0xff, 0xff],
        vec![6, 0, 0, 0, 0x80, 0, 0, 0],
        vec![
            0, 0, 0, 0, 24, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ],
    ] {
        let mut c = Client::connect();
        c.send(&bad);
        let mut b = [0u8; 1];
        assert_eq!(c.s.read(&mut b).unwrap(), 0, "closed after {bad:?}");
        assert!(matches!(c.finish(), Err(SessionError::Protocol(_))));
    }
}

#[test]
fn vnc_authentication_checks_the_password() {
    for (given, ok) in [("secret", true), ("wrong", false)] {
        let (mut s, _rec, _d, t) = start(Some("secret"));
        let mut v = [0u8; 12];
        s.read_exact(&mut v).unwrap();
        s.write_all(b"RFB 003.008\n").unwrap();
        let mut types = [0u8; 2];
        s.read_exact(&mut types).unwrap();
        assert_eq!(types, [1, 2], "only VNC Authentication");
        s.write_all(&[2]).unwrap();
        let mut challenge = [0u8; 16];
        s.read_exact(&mut challenge).unwrap();
        s.write_all(&crate::auth::response(given.as_bytes(), &challenge))
            .unwrap();
        let result = read_u32(&mut s);
        if ok {
            assert_eq!(result, 0);
            drop(s);
        } else {
            assert_eq!(result, 1);
            let len = read_u32(&mut s) as usize;
            let mut why = vec![0u8; len];
            s.read_exact(&mut why).unwrap();
            assert_eq!(why, b"authentication failed");
            assert!(matches!(t.join().unwrap(), Err(SessionError::AuthFailed)));
        }
    }
    // Choosing None where only a password is offered fails.
    let (mut s, _rec, _d, t) = start(Some("secret"));
    let mut v = [0u8; 14];
    s.write_all(b"RFB 003.008\n").unwrap();
    s.read_exact(&mut v).unwrap();
    s.write_all(&[1]).unwrap();
    assert_eq!(read_u32(&mut s), 1);
    assert!(matches!(
        t.join().unwrap(),
        Err(SessionError::SecurityType(1))
    ));
    // Not RFB at all.
    let (mut s, _rec, _d, t) = start(None);
    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    assert!(matches!(t.join().unwrap(), Err(SessionError::Version(_))));
}

#[test]
fn rfb_3_3_clients_are_told_the_security_type() {
    let (mut s, _rec, _d, t) = start(None);
    let mut v = [0u8; 12];
    s.read_exact(&mut v).unwrap();
    s.write_all(b"RFB 003.003\n").unwrap();
    assert_eq!(read_u32(&mut s), 1, "None, chosen by the server");
    s.write_all(&[0]).unwrap();
    let mut init = [0u8; 24];
    s.read_exact(&mut init).unwrap();
    assert_eq!(&init[..4], &[0, 100, 0, 70]);
    let mut name = [0u8; 4];
    s.read_exact(&mut name).unwrap();
    drop(s);
    let r = t.join().unwrap();
    assert!(r.is_ok(), "{r:?}");
}

#[test]
fn held_keys_are_bounded_and_shift_tracking_survives_the_bound() {
    let rec = Recorder::default();
    let mut kb = Keyboard::default();
    // 64 keys held (letters, digits, F keys...): the next press is dropped.
    let syms: Vec<u32> = (0x61..=0x7a)
        .chain(0x30..=0x39)
        .chain(0xffbe..=0xffd5)
        .chain([0xff50, 0xff51, 0xff52, 0xff53])
        .collect();
    assert_eq!(syms.len(), MAX_KEYS_DOWN);
    for &k in &syms {
        kb.event(k, true, &rec);
    }
    kb.event(0xffe1, true, &rec);
    assert_eq!(kb.down.len(), MAX_KEYS_DOWN);
    for &k in &syms {
        kb.event(k, false, &rec);
    }
    kb.event(0xffe1, false, &rec);
    rec.keys.lock().unwrap().clear();
    // The dropped Shift does not count as held: 'A' still gets one.
    kb.event('A' as u32, true, &rec);
    kb.event('A' as u32, false, &rec);
    assert_eq!(
        *rec.keys.lock().unwrap(),
        vec![(42, true), (30, true), (30, false), (42, false)]
    );
    // Auto-repeat: repeated presses, one Shift.
    rec.keys.lock().unwrap().clear();
    kb.event('!' as u32, true, &rec);
    kb.event('!' as u32, true, &rec);
    kb.event('!' as u32, false, &rec);
    assert_eq!(
        *rec.keys.lock().unwrap(),
        vec![(42, true), (2, true), (2, true), (2, false), (42, false)]
    );
}
