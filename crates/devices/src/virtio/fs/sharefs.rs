//! The file system a share serves: fuse-backend-rs's passthrough file
//! system rooted at the host directory, wrapped for hostvisor's rules.
//!
//! - **Ownership.** Every host-side operation runs as the user running
//!   hostvisor (the passthrough is handed uid/gid 0, which it takes as "do
//!   not switch credentials"), so whatever the guest creates is owned on
//!   the host by that user, with or without root. The guest's view of an
//!   owner is kept in the xattr [`OWNER_XATTR`] (`"uid:gid"`): set when a
//!   guest user other than the share's default owner creates a file, and
//!   by chown/chgrp in the guest (never a host chown). A file without it
//!   that the hostvisor user owns shows as the share's default guest owner
//!   (0:0 unless configured); files of other host users show their host
//!   ids. Symlinks cannot carry user xattrs: they show the default owner
//!   and a chown of one fails with EPERM. The guest can neither read, list
//!   nor set the xattr itself.
//! - **No escape.** The passthrough resolves every name relative to a
//!   directory it opened, one component at a time, with `O_NOFOLLOW`, and
//!   refuses `.`, `..` and names with `/`; it never follows a symlink on
//!   the host (the guest resolves them in its own namespace), opens only
//!   regular files and directories, and does not use file handles
//!   (`open_by_handle_at`). Hard links can only name inodes the guest
//!   reached inside the share. On top of that this wrapper refuses to
//!   create device nodes (EPERM), strips set-user/group-ID bits from files
//!   (a setuid file of the host user — root, maybe — would be a way out),
//!   and refuses xattr operations on symlinks.
//! - **Read-only shares** refuse every operation that writes (EROFS),
//!   including opens for writing.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn, FsOptions, OpenOptions};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, GetxattrReply, ListxattrReply, SetattrValid,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};

/// Where the guest's view of a file's owner is kept.
pub const OWNER_XATTR: &CStr = c"user.hostvisor.owner";
/// The xattr namespace the guest cannot touch.
const PRIVATE_PREFIX: &[u8] = b"user.hostvisor.";
/// The largest xattr name list Linux has (XATTR_LIST_MAX).
const XATTR_LIST_MAX: u32 = 65536;

type Inode = u64;
type Handle = u64;

/// How much the guest may cache (the passthrough's cache policy, with
/// entry/attribute timeouts to match).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cache {
    /// Close-to-open consistency; names and attributes cached for 1 s.
    #[default]
    Auto,
    /// Everything cached (the guest is the directory's only writer).
    Always,
    /// Nothing cached (the host changes the directory too).
    Never,
}

/// How a share is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareOptions {
    pub readonly: bool,
    pub cache: Cache,
    /// The guest owner of host-user files that carry no owner xattr.
    pub default_owner: (u32, u32),
}

impl Default for ShareOptions {
    fn default() -> Self {
        ShareOptions {
            readonly: false,
            cache: Cache::Auto,
            default_owner: (0, 0),
        }
    }
}

/// A share's file system.
pub struct ShareFs {
    inner: PassthroughFs<()>,
    opts: ShareOptions,
    host: (u32, u32),
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// A single name inside a directory: not `.`, `..`, empty or with a `/`.
/// (The passthrough lets LOOKUP take `..` for NFS exports — at the
/// share's root that is its host parent.)
fn check_name(name: &CStr) -> io::Result<()> {
    fuse_backend_rs::api::validate_path_component(name)?;
    if name.to_bytes().is_empty() {
        return Err(err(libc::EINVAL));
    }
    Ok(())
}

fn is_private(name: &CStr) -> bool {
    name.to_bytes().starts_with(PRIVATE_PREFIX)
}

/// The host's own context: no credential switch in the passthrough.
fn host_ctx(ctx: &Context) -> Context {
    Context {
        uid: 0,
        gid: 0,
        pid: ctx.pid,
    }
}

/// A mode without the set-user/group-ID bits, except on directories
/// (where set-group-ID only picks the group of new files).
fn safe_mode(mode: u32) -> u32 {
    if mode & libc::S_IFMT == libc::S_IFDIR {
        mode & !libc::S_ISUID
    } else {
        mode & !(libc::S_ISUID | libc::S_ISGID)
    }
}

fn parse_owner(v: &[u8]) -> Option<(u32, u32)> {
    let s = std::str::from_utf8(v).ok()?;
    let (u, g) = s.split_once(':')?;
    Some((u.parse().ok()?, g.parse().ok()?))
}

impl ShareFs {
    /// Serves `root` (a directory; it is opened once, here).
    pub fn new(root: &std::path::Path, opts: ShareOptions) -> io::Result<Self> {
        let root_dir = root
            .to_str()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "share path is not UTF-8"))?
            .to_string();
        let (policy, timeout, writeback) = match opts.cache {
            Cache::Never => (CachePolicy::Never, Duration::ZERO, false),
            Cache::Always => (
                CachePolicy::Always,
                Duration::from_secs(86400),
                !opts.readonly,
            ),
            Cache::Auto => (CachePolicy::Auto, Duration::from_secs(1), false),
        };
        let cfg = Config {
            root_dir,
            cache_policy: policy,
            entry_timeout: timeout,
            attr_timeout: timeout,
            writeback,
            xattr: true,
            do_import: true,
            inode_file_handles: false,
            ..Config::default()
        };
        let inner = PassthroughFs::<()>::new(cfg)?;
        inner.import()?;
        // SAFETY: geteuid/getegid only read the process's credentials.
        let host = unsafe { (libc::geteuid(), libc::getegid()) };
        Ok(ShareFs { inner, opts, host })
    }

    fn writable(&self) -> io::Result<()> {
        if self.opts.readonly {
            Err(err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// The guest owner saved on `inode`, if any.
    fn saved_owner(&self, ctx: &Context, inode: Inode) -> Option<(u32, u32)> {
        match self.inner.getxattr(&host_ctx(ctx), inode, OWNER_XATTR, 64) {
            Ok(GetxattrReply::Value(v)) => parse_owner(&v),
            _ => None,
        }
    }

    /// Turns host attributes into what the guest sees.
    fn present(&self, ctx: &Context, inode: Inode, st: &mut stat64) {
        let saved = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            None
        } else {
            self.saved_owner(ctx, inode)
        };
        if let Some((u, g)) = saved {
            st.st_uid = u;
            st.st_gid = g;
            return;
        }
        if st.st_uid == self.host.0 {
            st.st_uid = self.opts.default_owner.0;
        }
        if st.st_gid == self.host.1 {
            st.st_gid = self.opts.default_owner.1;
        }
    }

    fn present_entry(&self, ctx: &Context, mut e: Entry) -> Entry {
        self.present(ctx, e.inode, &mut e.attr);
        e
    }

    /// Records `owner` as the guest owner of `inode` (removes the record
    /// when it is the default).
    fn set_owner(&self, ctx: &Context, inode: Inode, owner: (u32, u32)) -> io::Result<()> {
        let hctx = host_ctx(ctx);
        if owner == self.opts.default_owner {
            match self.inner.removexattr(&hctx, inode, OWNER_XATTR) {
                Err(e) if e.raw_os_error() != Some(libc::ENODATA) => return Err(e),
                _ => return Ok(()),
            }
        }
        let v = format!("{}:{}", owner.0, owner.1);
        self.inner
            .setxattr(&hctx, inode, OWNER_XATTR, v.as_bytes(), 0)
    }

    /// After a create: the creator becomes the guest owner.
    fn created(&self, ctx: &Context, e: Entry) -> io::Result<Entry> {
        let owner = (ctx.uid, ctx.gid);
        let is_link = e.attr.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if owner != self.opts.default_owner && !is_link {
            self.set_owner(ctx, e.inode, owner)?;
        }
        Ok(self.present_entry(ctx, e))
    }

    fn is_symlink(&self, ctx: &Context, inode: Inode) -> io::Result<bool> {
        let (st, _) = self.inner.getattr(&host_ctx(ctx), inode, None)?;
        Ok(st.st_mode & libc::S_IFMT == libc::S_IFLNK)
    }
}

impl FileSystem for ShareFs {
    type Inode = Inode;
    type Handle = Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<Entry> {
        check_name(name)?;
        let e = self.inner.lookup(&host_ctx(ctx), parent, name)?;
        Ok(self.present_entry(ctx, e))
    }

    fn forget(&self, ctx: &Context, inode: Inode, count: u64) {
        self.inner.forget(&host_ctx(ctx), inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Inode, u64)>) {
        self.inner.batch_forget(&host_ctx(ctx), requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Option<Handle>,
    ) -> io::Result<(stat64, Duration)> {
        let (mut st, t) = self.inner.getattr(&host_ctx(ctx), inode, handle)?;
        self.present(ctx, inode, &mut st);
        Ok((st, t))
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Inode,
        mut attr: stat64,
        handle: Option<Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        let hctx = host_ctx(ctx);
        let chown = valid & (SetattrValid::UID | SetattrValid::GID);
        let rest = valid - chown;
        if !chown.is_empty() {
            let (mut now, _) = self.getattr(ctx, inode, handle)?;
            if now.st_mode & libc::S_IFMT == libc::S_IFLNK {
                return Err(err(libc::EPERM));
            }
            if valid.contains(SetattrValid::UID) {
                now.st_uid = attr.st_uid;
            }
            if valid.contains(SetattrValid::GID) {
                now.st_gid = attr.st_gid;
            }
            self.set_owner(ctx, inode, (now.st_uid, now.st_gid))?;
        }
        if rest.contains(SetattrValid::MODE) {
            attr.st_mode = safe_mode(attr.st_mode);
        }
        let (mut st, t) = if rest.is_empty() {
            self.inner.getattr(&hctx, inode, handle)?
        } else {
            self.inner.setattr(&hctx, inode, attr, handle, rest)?
        };
        self.present(ctx, inode, &mut st);
        Ok((st, t))
    }

    fn readlink(&self, ctx: &Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(&host_ctx(ctx), inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        let e = self.inner.symlink(&host_ctx(ctx), linkname, parent, name)?;
        self.created(ctx, e)
    }

    fn mknod(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            _ => return Err(err(libc::EPERM)),
        }
        let e = self
            .inner
            .mknod(&host_ctx(ctx), parent, name, safe_mode(mode), rdev, umask)?;
        self.created(ctx, e)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(name)?;
        let e = self
            .inner
            .mkdir(&host_ctx(ctx), parent, name, safe_mode(mode), umask)?;
        self.created(ctx, e)
    }

    fn unlink(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_name(name)?;
        self.inner.unlink(&host_ctx(ctx), parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Inode, name: &CStr) -> io::Result<()> {
        self.writable()?;
        check_name(name)?;
        self.inner.rmdir(&host_ctx(ctx), parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        check_name(oldname)?;
        check_name(newname)?;
        self.inner
            .rename(&host_ctx(ctx), olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.writable()?;
        check_name(newname)?;
        let e = self.inner.link(&host_ctx(ctx), inode, newparent, newname)?;
        Ok(self.present_entry(ctx, e))
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions, Option<u32>)> {
        let write = libc::O_WRONLY | libc::O_RDWR | libc::O_TRUNC | libc::O_APPEND;
        if self.opts.readonly && (flags & write as u32) != 0 {
            return Err(err(libc::EROFS));
        }
        self.inner.open(&host_ctx(ctx), inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Inode,
        name: &CStr,
        mut args: CreateIn,
    ) -> io::Result<(Entry, Option<Handle>, OpenOptions, Option<u32>)> {
        self.writable()?;
        check_name(name)?;
        args.mode = safe_mode(args.mode);
        let (e, h, o, p) = self.inner.create(&host_ctx(ctx), parent, name, args)?;
        Ok((self.created(ctx, e)?, h, o, p))
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner.read(
            &host_ctx(ctx),
            inode,
            handle,
            w,
            size,
            offset,
            lock_owner,
            flags,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        self.inner.write(
            &host_ctx(ctx),
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(&host_ctx(ctx), inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: Inode, datasync: bool, handle: Handle) -> io::Result<()> {
        self.inner.fsync(&host_ctx(ctx), inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner
            .fallocate(&host_ctx(ctx), inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner.release(
            &host_ctx(ctx),
            inode,
            flags,
            handle,
            flush,
            flock_release,
            lock_owner,
        )
    }

    fn statfs(&self, ctx: &Context, inode: Inode) -> io::Result<statvfs64> {
        let mut s = self.inner.statfs(&host_ctx(ctx), inode)?;
        if self.opts.readonly {
            s.f_flag |= libc::ST_RDONLY;
        }
        Ok(s)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        if is_private(name) || self.is_symlink(ctx, inode)? {
            return Err(err(libc::EPERM));
        }
        self.inner
            .setxattr(&host_ctx(ctx), inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        if is_private(name) || self.is_symlink(ctx, inode)? {
            return Err(err(libc::ENODATA));
        }
        self.inner.getxattr(&host_ctx(ctx), inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: Inode, size: u32) -> io::Result<ListxattrReply> {
        if self.is_symlink(ctx, inode)? {
            return Ok(if size == 0 {
                ListxattrReply::Count(0)
            } else {
                ListxattrReply::Names(Vec::new())
            });
        }
        let names = match self
            .inner
            .listxattr(&host_ctx(ctx), inode, XATTR_LIST_MAX)?
        {
            ListxattrReply::Names(n) => n,
            ListxattrReply::Count(_) => Vec::new(),
        };
        let mut shown = Vec::with_capacity(names.len());
        for name in names.split_inclusive(|b| *b == 0) {
            if !name.starts_with(PRIVATE_PREFIX) {
                shown.extend_from_slice(name);
            }
        }
        let len = u32::try_from(shown.len()).map_err(|_| err(libc::E2BIG))?;
        if size == 0 {
            Ok(ListxattrReply::Count(len))
        } else if len > size {
            Err(err(libc::ERANGE))
        } else {
            Ok(ListxattrReply::Names(shown))
        }
    }

    fn removexattr(&self, ctx: &Context, inode: Inode, name: &CStr) -> io::Result<()> {
        self.writable()?;
        if is_private(name) || self.is_symlink(ctx, inode)? {
            return Err(err(libc::EPERM));
        }
        self.inner.removexattr(&host_ctx(ctx), inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
    ) -> io::Result<(Option<Handle>, OpenOptions)> {
        self.inner.opendir(&host_ctx(ctx), inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(&host_ctx(ctx), inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut patched = |d: DirEntry, e: Entry| {
            let e = if e.inode == 0 {
                e
            } else {
                self.present_entry(ctx, e)
            };
            add_entry(d, e)
        };
        self.inner
            .readdirplus(&host_ctx(ctx), inode, handle, size, offset, &mut patched)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Inode,
        datasync: bool,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(&host_ctx(ctx), inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Inode,
        flags: u32,
        handle: Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(&host_ctx(ctx), inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: Inode, mask: u32) -> io::Result<()> {
        if self.opts.readonly && mask & libc::W_OK as u32 != 0 {
            return Err(err(libc::EROFS));
        }
        self.inner.access(&host_ctx(ctx), inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Inode,
        handle: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner
            .lseek(&host_ctx(ctx), inode, handle, offset, whence)
    }
}
