//! virtio-fs: the share's rules (ownership, no escape, read-only) on the
//! file system itself, and hostile requests through the queue.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{self as fuse, CreateIn};
use fuse_backend_rs::api::filesystem::{Context, FileSystem, SetattrValid, ROOT_ID};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vm_memory_fuse::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::test_util::{desc, F_NEXT, F_WRITE};

/// A fresh directory: `share/` (the share) and `outside/` next to it.
struct Dirs {
    base: PathBuf,
}

impl Dirs {
    fn new(tag: &str) -> Self {
        let base = std::env::temp_dir().join(format!(
            "hv-fs-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("share")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/secret"), b"host secret").unwrap();
        Dirs { base }
    }
    fn share(&self) -> PathBuf {
        self.base.join("share")
    }
    fn outside(&self) -> PathBuf {
        self.base.join("outside")
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn fs(dirs: &Dirs, opts: ShareOptions) -> ShareFs {
    ShareFs::new(&dirs.share(), opts).unwrap()
}

fn ctx(uid: u32, gid: u32) -> Context {
    Context { uid, gid, pid: 1 }
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn create(f: &ShareFs, cx: &Context, parent: u64, name: &str, mode: u32) -> std::io::Result<u64> {
    let args = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT) as u32,
        mode: libc::S_IFREG | mode,
        umask: 0,
        fuse_flags: 0,
    };
    let (e, h, _, _) = f.create(cx, parent, &c(name), args)?;
    if let Some(h) = h {
        f.release(cx, e.inode, 0, h, false, false, None).unwrap();
    }
    Ok(e.inode)
}

fn host_ids() -> (u32, u32) {
    // SAFETY: reads the process's credentials only.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

#[test]
fn guest_files_are_the_host_users_and_keep_the_guests_owner() {
    let dirs = Dirs::new("own");
    let f = fs(&dirs, ShareOptions::default());
    let user = ctx(1000, 1000);
    let ino = create(&f, &user, ROOT_ID, "mine", 0o644).unwrap();
    let meta = std::fs::metadata(dirs.share().join("mine")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), host_ids(), "host owner");
    let (st, _) = f.getattr(&user, ino, None).unwrap();
    assert_eq!((st.st_uid, st.st_gid), (1000, 1000), "guest owner");

    // chown in the guest: the guest view changes, the host owner not.
    let mut attr = st;
    attr.st_uid = 1000;
    attr.st_gid = 2000;
    let (st, _) = f
        .setattr(
            &user,
            ino,
            attr,
            None,
            SetattrValid::UID | SetattrValid::GID,
        )
        .unwrap();
    assert_eq!((st.st_uid, st.st_gid), (1000, 2000));
    let meta = std::fs::metadata(dirs.share().join("mine")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), host_ids());

    // A directory and a symlink made by the guest user.
    let d = f.mkdir(&user, ROOT_ID, &c("dir"), 0o755, 0).unwrap();
    assert_eq!((d.attr.st_uid, d.attr.st_gid), (1000, 1000));
    let l = f.symlink(&user, &c("mine"), ROOT_ID, &c("link")).unwrap();
    assert_eq!(l.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);

    // Host files without a record show as the default guest owner.
    std::fs::write(dirs.share().join("hostfile"), b"x").unwrap();
    let e = f.lookup(&user, ROOT_ID, &c("hostfile")).unwrap();
    assert_eq!((e.attr.st_uid, e.attr.st_gid), (0, 0));
    let f2 = fs(
        &dirs,
        ShareOptions {
            default_owner: (1000, 1000),
            ..ShareOptions::default()
        },
    );
    let e = f2.lookup(&user, ROOT_ID, &c("hostfile")).unwrap();
    assert_eq!((e.attr.st_uid, e.attr.st_gid), (1000, 1000));
    // Guest root's files carry no record when root is the default.
    let r = create(&f, &ctx(0, 0), ROOT_ID, "roots", 0o600).unwrap();
    assert_eq!(
        f.listxattr(&ctx(0, 0), r, 0).map(|_| ()).ok(),
        Some(()),
        "listxattr works"
    );
    assert!(xattr_names(&dirs.share().join("roots")).is_empty());
}

/// The raw xattr names of a host file.
fn xattr_names(p: &Path) -> Vec<u8> {
    let path = c(p.to_str().unwrap());
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` is writable for its length; `path` is NUL-terminated.
    let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    buf.truncate(usize::try_from(n).unwrap_or(0));
    buf
}

#[test]
fn the_owner_record_is_invisible_and_untouchable_to_the_guest() {
    let dirs = Dirs::new("xattr");
    let f = fs(&dirs, ShareOptions::default());
    let user = ctx(1000, 1000);
    let ino = create(&f, &user, ROOT_ID, "f", 0o644).unwrap();
    assert!(!xattr_names(&dirs.share().join("f")).is_empty(), "recorded");
    match f.listxattr(&user, ino, 0).unwrap() {
        fuse_backend_rs::api::filesystem::ListxattrReply::Count(n) => assert_eq!(n, 0),
        _ => panic!("count expected"),
    }
    assert_eq!(
        errno(
            f.getxattr(&user, ino, super::sharefs::OWNER_XATTR, 64)
                .err()
                .unwrap()
        ),
        libc::ENODATA
    );
    assert_eq!(
        errno(
            f.setxattr(&user, ino, super::sharefs::OWNER_XATTR, b"0:0", 0)
                .unwrap_err()
        ),
        libc::EPERM
    );
    assert_eq!(
        errno(
            f.removexattr(&user, ino, super::sharefs::OWNER_XATTR)
                .unwrap_err()
        ),
        libc::EPERM
    );
    let (st, _) = f.getattr(&user, ino, None).unwrap();
    assert_eq!(st.st_uid, 1000, "still the guest user's");
    // Other user xattrs work.
    f.setxattr(&user, ino, &c("user.mine"), b"v", 0).unwrap();
    match f.listxattr(&user, ino, 4096).unwrap() {
        fuse_backend_rs::api::filesystem::ListxattrReply::Names(n) => {
            assert_eq!(n, b"user.mine\0".to_vec())
        }
        _ => panic!("names expected"),
    }
}

#[test]
fn names_cannot_leave_the_share() {
    let dirs = Dirs::new("names");
    let f = fs(&dirs, ShareOptions::default());
    let root = ctx(0, 0);
    for name in ["..", ".", "../outside", "a/b", "/etc"] {
        assert!(f.lookup(&root, ROOT_ID, &c(name)).is_err(), "{name}");
        assert!(create(&f, &root, ROOT_ID, name, 0o644).is_err(), "{name}");
        assert!(
            f.mkdir(&root, ROOT_ID, &c(name), 0o755, 0).is_err(),
            "{name}"
        );
    }
    assert!(!dirs.base.join("etc").exists());
    assert_eq!(std::fs::read_dir(dirs.outside()).unwrap().count(), 1);
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    let dirs = Dirs::new("links");
    let f = fs(&dirs, ShareOptions::default());
    let root = ctx(0, 0);
    // Made by the guest, and made on the host: to / and to a file outside.
    f.symlink(&root, &c("/"), ROOT_ID, &c("to-root")).unwrap();
    std::os::unix::fs::symlink(dirs.outside(), dirs.share().join("to-out")).unwrap();
    std::os::unix::fs::symlink(
        dirs.outside().join("secret"),
        dirs.share().join("to-secret"),
    )
    .unwrap();
    let out = f.lookup(&root, ROOT_ID, &c("to-out")).unwrap();
    assert_eq!(out.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
    // Used as a directory: nothing is created outside, nothing is listed.
    assert!(create(&f, &root, out.inode, "planted", 0o644).is_err());
    assert!(f.mkdir(&root, out.inode, &c("d"), 0o755, 0).is_err());
    assert!(f.lookup(&root, out.inode, &c("secret")).is_err());
    assert!(f.opendir(&root, out.inode, 0).is_err());
    let root_link = f.lookup(&root, ROOT_ID, &c("to-root")).unwrap();
    assert!(f.lookup(&root, root_link.inode, &c("etc")).is_err());
    // Opened as a file: refused, not the target.
    let secret = f.lookup(&root, ROOT_ID, &c("to-secret")).unwrap();
    assert!(f.open(&root, secret.inode, libc::O_RDWR as u32, 0).is_err());
    assert!(f.open(&root, secret.inode, 0, 0).is_err());
    // Its xattrs are not the target's.
    assert!(f
        .setxattr(&root, secret.inode, &c("user.x"), b"1", 0)
        .is_err());
    assert!(xattr_names(&dirs.outside().join("secret")).is_empty());
    // A hard link of the symlink is a link of the symlink, inside.
    let hl = f.link(&root, secret.inode, ROOT_ID, &c("hard")).unwrap();
    assert_eq!(hl.attr.st_mode & libc::S_IFMT, libc::S_IFLNK);
    let outside_meta = std::fs::metadata(dirs.outside().join("secret")).unwrap();
    assert_eq!(outside_meta.nlink(), 1, "the outside file got no link");
    // Created, truncated or chmodded through the symlink: the target
    // stays as it was.
    let args = CreateIn {
        flags: (libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC) as u32,
        mode: libc::S_IFREG | 0o666,
        umask: 0,
        fuse_flags: 0,
    };
    assert!(f.create(&root, ROOT_ID, &c("to-secret"), args).is_err());
    let mut attr = secret.attr;
    attr.st_size = 0;
    attr.st_mode = libc::S_IFREG | 0o777;
    let _ = f.setattr(&root, secret.inode, attr, None, SetattrValid::SIZE);
    let _ = f.setattr(&root, secret.inode, attr, None, SetattrValid::MODE);
    let meta = std::fs::metadata(dirs.outside().join("secret")).unwrap();
    assert_eq!(meta.len(), 11);
    assert_ne!(meta.permissions().mode() & 0o777, 0o777);
    // readlink shows the text (the guest resolves it in its own tree).
    assert_eq!(f.readlink(&root, root_link.inode).unwrap(), b"/".to_vec());
    assert_eq!(
        std::fs::read(dirs.outside().join("secret")).unwrap(),
        b"host secret"
    );
    assert_eq!(std::fs::read_dir(dirs.outside()).unwrap().count(), 1);
}

#[test]
fn device_nodes_and_setuid_bits_do_not_reach_the_host() {
    let dirs = Dirs::new("nodes");
    let f = fs(&dirs, ShareOptions::default());
    let root = ctx(0, 0);
    for (name, kind) in [("chr", libc::S_IFCHR), ("blk", libc::S_IFBLK)] {
        // /dev/sda's numbers.
        let e = f
            .mknod(&root, ROOT_ID, &c(name), kind | 0o666, (8 << 8) as u32, 0)
            .unwrap_err();
        assert_eq!(errno(e), libc::EPERM, "{name}");
        assert!(!dirs.share().join(name).exists());
    }
    f.mknod(&root, ROOT_ID, &c("fifo"), libc::S_IFIFO | 0o644, 0, 0)
        .unwrap();
    let suid = create(&f, &root, ROOT_ID, "suid", 0o4755).unwrap();
    let mode = std::fs::metadata(dirs.share().join("suid"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "no set-user-ID on the host");
    let (mut st, _) = f.getattr(&root, suid, None).unwrap();
    st.st_mode = libc::S_IFREG | 0o6755;
    f.setattr(&root, suid, st, None, SetattrValid::MODE)
        .unwrap();
    let mode = std::fs::metadata(dirs.share().join("suid"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "chmod u+s is stripped");
}

#[test]
fn a_readonly_share_refuses_every_write() {
    let dirs = Dirs::new("ro");
    std::fs::write(dirs.share().join("file"), b"data").unwrap();
    std::fs::create_dir(dirs.share().join("dir")).unwrap();
    let f = fs(
        &dirs,
        ShareOptions {
            readonly: true,
            ..ShareOptions::default()
        },
    );
    let root = ctx(0, 0);
    let file = f.lookup(&root, ROOT_ID, &c("file")).unwrap();
    let rofs = |r: std::io::Result<()>| assert_eq!(errno(r.unwrap_err()), libc::EROFS);
    rofs(create(&f, &root, ROOT_ID, "new", 0o644).map(drop));
    rofs(f.mkdir(&root, ROOT_ID, &c("d2"), 0o755, 0).map(drop));
    rofs(
        f.mknod(&root, ROOT_ID, &c("p"), libc::S_IFIFO | 0o644, 0, 0)
            .map(drop),
    );
    rofs(f.symlink(&root, &c("file"), ROOT_ID, &c("s")).map(drop));
    rofs(f.link(&root, file.inode, ROOT_ID, &c("h")).map(drop));
    rofs(f.unlink(&root, ROOT_ID, &c("file")));
    rofs(f.rmdir(&root, ROOT_ID, &c("dir")));
    rofs(f.rename(&root, ROOT_ID, &c("file"), ROOT_ID, &c("moved"), 0));
    rofs(
        f.setattr(&root, file.inode, file.attr, None, SetattrValid::MODE)
            .map(drop),
    );
    rofs(f.setxattr(&root, file.inode, &c("user.x"), b"1", 0));
    rofs(f.removexattr(&root, file.inode, &c("user.x")));
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_TRUNC, libc::O_APPEND] {
        rofs(f.open(&root, file.inode, flags as u32, 0).map(drop));
    }
    rofs(f.access(&root, file.inode, libc::W_OK as u32));
    // Reading works.
    let (h, _, _) = f.open(&root, file.inode, 0, 0).unwrap();
    f.release(&root, file.inode, 0, h.unwrap(), false, false, None)
        .unwrap();
    assert_ne!(
        f.statfs(&root, ROOT_ID).unwrap().f_flag & libc::ST_RDONLY,
        0
    );
    assert_eq!(std::fs::read(dirs.share().join("file")).unwrap(), b"data");
    assert_eq!(std::fs::read_dir(dirs.share()).unwrap().count(), 2);
}

#[test]
fn tags_are_checked() {
    let dirs = Dirs::new("tags");
    for bad in ["", "a\0b", &"t".repeat(37)] {
        assert!(VirtioFs::new(bad, &dirs.share(), ShareOptions::default()).is_err());
    }
    let dev = VirtioFs::new(&"t".repeat(36), &dirs.share(), ShareOptions::default()).unwrap();
    let mut cfg = [0u8; 40];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..36], "t".repeat(36).as_bytes());
    assert_eq!(cfg[36..], 1u32.to_le_bytes());
    assert!(VirtioFs::new("x", &dirs.base.join("missing"), ShareOptions::default()).is_err());
}

// ---- requests through the queue ----

const REQ: u64 = 0x10_0000;
const REPLY: u64 = 0x20_0000;

struct Rig {
    _dirs: Dirs,
    mem: GuestMemoryMmap,
    server: Arc<Server<ShareFs>>,
    bridge: Bridge,
    irq: Interrupt,
    unique: u64,
}

impl Rig {
    fn new(tag: &str) -> Self {
        let dirs = Dirs::new(tag);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let server = Arc::new(Server::new(fs(&dirs, ShareOptions::default())));
        let bridge = Bridge::new(&mem).unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        Rig {
            _dirs: dirs,
            mem,
            server,
            bridge,
            irq,
            unique: 0,
        }
    }

    fn share(&self) -> PathBuf {
        self._dirs.share()
    }

    /// Runs the chains `descs` through a fresh queue; the used lengths.
    fn run(&mut self, descs: &[virtio_queue::desc::RawDescriptor], chains: u16) -> Vec<u32> {
        let mock = MockSplitQueue::create(&self.mem, GuestAddress(0x1000), 64);
        mock.build_multiple_desc_chains(descs).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        process_queue(&mut q, &self.mem, &mut self.bridge, &self.server, &self.irq);
        (0..chains)
            .map(|i| mock.used().ring().ref_at(i.into()).unwrap().load().len())
            .collect()
    }

    /// Sends one FUSE request (`opcode`, `nodeid`, body) and returns the
    /// reply header and body.
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (fuse::OutHeader, Vec<u8>) {
        self.unique += 1;
        let len = u32::try_from(std::mem::size_of::<fuse::InHeader>() + body.len()).unwrap();
        let h = fuse::InHeader {
            len,
            opcode,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        let mut req = h.as_slice().to_vec();
        req.extend_from_slice(body);
        self.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        let used = self.run(
            &[
                desc(REQ, len, F_NEXT, 1),
                desc(REPLY, 64 * 1024, F_WRITE, 0),
            ],
            1,
        )[0];
        let mut out = vec![0u8; used as usize];
        self.mem.read_slice(&mut out, GuestAddress(REPLY)).unwrap();
        let hdr_len = std::mem::size_of::<fuse::OutHeader>();
        assert!(out.len() >= hdr_len, "a reply header");
        let mut hdr = fuse::OutHeader::default();
        hdr.as_mut_slice().copy_from_slice(&out[..hdr_len]);
        assert_eq!(hdr.unique, self.unique);
        (hdr, out[hdr_len..].to_vec())
    }

    fn init(&mut self) {
        let init = fuse::InitIn {
            major: 7,
            minor: 31,
            max_readahead: 1 << 17,
            flags: 0,
        };
        let mut body = init.as_slice().to_vec();
        body.extend_from_slice(&[0u8; 48]);
        let (h, _) = self.call(fuse::Opcode::Init as u32, 0, &body);
        assert_eq!(h.error, 0);
    }
}

fn name_body(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

#[test]
fn requests_through_the_queue_reach_the_share() {
    let mut rig = Rig::new("queue");
    std::fs::write(rig.share().join("hello"), b"hello from the host").unwrap();
    rig.init();
    let (h, body) = rig.call(fuse::Opcode::Lookup as u32, ROOT_ID, &name_body("hello"));
    assert_eq!(h.error, 0);
    let mut entry = fuse::EntryOut::default();
    entry
        .as_mut_slice()
        .copy_from_slice(&body[..std::mem::size_of::<fuse::EntryOut>()]);
    assert_eq!(entry.attr.size, 19);
    // Open and read it.
    let open = fuse::OpenIn::default();
    let (h, body) = rig.call(fuse::Opcode::Open as u32, entry.nodeid, open.as_slice());
    assert_eq!(h.error, 0);
    let mut oo = fuse::OpenOut::default();
    oo.as_mut_slice()
        .copy_from_slice(&body[..std::mem::size_of::<fuse::OpenOut>()]);
    let read = fuse::ReadIn {
        fh: oo.fh,
        offset: 0,
        size: 4096,
        ..Default::default()
    };
    let (h, body) = rig.call(fuse::Opcode::Read as u32, entry.nodeid, read.as_slice());
    assert_eq!(h.error, 0);
    assert_eq!(body, b"hello from the host");
    // A lookup of ".." is refused.
    let (h, _) = rig.call(fuse::Opcode::Lookup as u32, ROOT_ID, &name_body(".."));
    assert_ne!(h.error, 0);
    // Mkdir through the queue lands on the host.
    let mut mk = fuse::MkdirIn {
        mode: 0o755,
        umask: 0,
    }
    .as_slice()
    .to_vec();
    mk.extend_from_slice(&name_body("made-by-guest"));
    let (h, _) = rig.call(fuse::Opcode::Mkdir as u32, ROOT_ID, &mk);
    assert_eq!(h.error, 0);
    assert!(rig.share().join("made-by-guest").is_dir());
}

#[test]
fn hostile_requests_fail_alone() {
    let mut rig = Rig::new("hostile");
    rig.init();
    let hdr = std::mem::size_of::<fuse::InHeader>() as u32;
    // A header cut short.
    rig.mem.write_slice(&[1u8; 8], GuestAddress(REQ)).unwrap();
    let used = rig.run(&[desc(REQ, 8, F_NEXT, 1), desc(REPLY, 4096, F_WRITE, 0)], 1);
    assert_eq!(used, [0]);
    // A header claiming 4 GiB, an unknown opcode, a body cut short.
    for (len, opcode, body_len) in [
        (u32::MAX, fuse::Opcode::Write as u32, 0u32),
        (hdr, 9999, 0),
        (hdr + 4096, fuse::Opcode::Write as u32, 4),
        (hdr, fuse::Opcode::Lookup as u32, 0),
    ] {
        let h = fuse::InHeader {
            len,
            opcode,
            unique: 77,
            nodeid: ROOT_ID,
            ..Default::default()
        };
        rig.mem
            .write_slice(h.as_slice(), GuestAddress(REQ))
            .unwrap();
        let used = rig.run(
            &[
                desc(REQ, hdr + body_len, F_NEXT, 1),
                desc(REPLY, 4096, F_WRITE, 0),
            ],
            1,
        );
        assert!(used[0] <= 4096, "{opcode}: {used:?}");
    }
    // Buffers outside RAM, a reply buffer before the request, a reply
    // that does not fit, no reply buffer at all, a chain of one
    // readable byte.
    let used = rig.run(
        &[
            desc(0xffff_0000_0000, hdr, F_NEXT, 1),
            desc(REPLY, 4096, F_WRITE, 0),
            desc(REPLY, 4096, F_WRITE | F_NEXT, 3),
            desc(REQ, hdr, 0, 0),
            desc(REQ, hdr, F_NEXT, 5),
            desc(0x3f_ffff, 4096, F_WRITE, 0),
            desc(REQ, hdr, 0, 0),
            desc(REQ, 1, 0, 0),
        ],
        5,
    );
    assert_eq!(used, [0, 0, 0, 0, 0]);
    // A valid request still works afterwards.
    let (h, _) = rig.call(fuse::Opcode::Getattr as u32, ROOT_ID, &[0u8; 16]);
    assert_eq!(h.error, 0);
}

#[test]
fn a_request_with_too_many_buffers_is_refused_whole() {
    let mut rig = Rig::new("many");
    let descs: Vec<_> = (0..56u16)
        .map(|i| desc(REQ + u64::from(i), 1, F_NEXT, i + 1))
        .chain(std::iter::once(desc(REPLY, 4096, F_WRITE, 0)))
        .collect();
    let buffers: Vec<Buffer> = (0..=MAX_DESCRIPTORS)
        .map(|i| Buffer {
            addr: REQ + u64::from(i),
            len: 1,
            write: false,
        })
        .collect();
    let mem = rig.mem.clone();
    assert!(matches!(
        rig.bridge.handle(&mem, &buffers, &rig.server),
        Err(bridge::RequestError::Bridge(
            bridge::BridgeError::TooManyBuffers
        ))
    ));
    assert!(rig.bridge.handle(&mem, &[], &rig.server).is_err());
    // A request in 56 one-byte pieces: reassembled, and answered.
    let h = fuse::InHeader {
        len: 56,
        opcode: fuse::Opcode::Getattr as u32,
        unique: 5,
        nodeid: ROOT_ID,
        ..Default::default()
    };
    let mut req = h.as_slice().to_vec();
    req.extend_from_slice(&[0u8; 16]);
    rig.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    let used = rig.run(&descs, 1);
    assert!(used[0] > 0, "{used:?}");
}

#[test]
fn activation_needs_both_queues() {
    let dirs = Dirs::new("act");
    let mut dev = VirtioFs::new("t", &dirs.share(), ShareOptions::default()).unwrap();
    let err = dev
        .activate(Activation {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            queues: vec![],
            acked_features: 0,
        })
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 2,
            got: 0
        }
    ));
}
