//! The passthrough filesystem behind a virtio-fs device: FUSE requests from the guest served on
//! one shared host directory, confined to it.
//!
//! Confinement: every node the guest can name is an `O_PATH` descriptor reached from the share's
//! root one name at a time, with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS) and names that
//! are single components (no `/`, not `.` or `..`): a symlink is returned as the symlink itself
//! (the guest resolves it in its own view), never followed on the host. Files are reopened for
//! I/O through /proc/self/fd (the exact inode, never a path), and only regular files and
//! directories are ever opened (a FIFO or a device in the share cannot block or reach the host).
//! A read-only share refuses every change with EROFS here, whatever the guest mounted. New nodes
//! get the owner the guest's request names (as a bind mount in a container would give them),
//! which needs CAP_CHOWN in the serving thread; the guest kernel checks permissions itself
//! (virtio-fs mounts with `default_permissions`).
//!
//! Resources a guest can make the server hold are bounded: node descriptors
//! ([`Limits::inodes`]), open handles ([`Limits::handles`]), and every reply by the room the
//! guest gave for it.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::abi::{self, fattr, op, Body, Request, Wire};

/// The largest WRITE (and READ) the guest is told to send (with 256 pages per request).
pub const MAX_WRITE: u32 = 1 << 20;
const MAX_PAGES: u16 = 256;
/// How long the guest may cache names and attributes (seconds): short, so that two VMs sharing a
/// directory see each other's changes soon (virtiofsd's cache=auto).
const TIMEOUT: u64 = 1;

/// What a guest can make the server hold at most.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Node descriptors (each an open O_PATH fd).
    pub inodes: usize,
    /// Open files and directories.
    pub handles: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            inodes: 1 << 16,
            handles: 1 << 12,
        }
    }
}

struct Inode {
    fd: OwnedFd,
    key: (u64, u64),
    /// The guest's lookup count: the node goes when FORGET brings it to 0.
    refs: u64,
}

enum Handle {
    File(OwnedFd),
    Dir(OwnedFd),
}

/// One share's server.
pub struct Server {
    proc_fd: OwnedFd,
    read_only: bool,
    limits: Limits,
    inodes: HashMap<u64, Inode>,
    by_key: HashMap<(u64, u64), u64>,
    next_id: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    initialized: bool,
}

type Result<T> = std::result::Result<T, i32>;

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn cvt(r: libc::c_int) -> Result<libc::c_int> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// openat2(2)'s `struct open_how`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// A name the guest gave, checked: one path component.
fn component(name: &[u8]) -> Result<CString> {
    if name.is_empty() || name.len() > 255 || name == b"." || name == b".." || name.contains(&b'/')
    {
        return Err(libc::EINVAL);
    }
    CString::new(name).map_err(|_| libc::EINVAL)
}

/// Opens `name` in directory `dir`, resolved beneath it without following any symlink.
fn open_beneath(dir: RawFd, name: &CString, flags: i32, mode: u32) -> Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
        mode: u64::from(mode),
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a NUL-terminated name and a valid open_how of the size given; the
    // result is a new descriptor we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    } as RawFd;
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd was just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn stat_fd(fd: RawFd) -> Result<libc::stat> {
    // SAFETY: st is plain data filled by fstatat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstatat of a descriptor we hold, with an empty path and a valid stat buffer.
    cvt(unsafe {
        libc::fstatat(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

fn attr_of(st: &libc::stat) -> abi::Attr {
    abi::Attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as u64,
        mtime: st.st_mtime as u64,
        ctime: st.st_ctime as u64,
        atimensec: st.st_atime_nsec as u32,
        mtimensec: st.st_mtime_nsec as u32,
        ctimensec: st.st_ctime_nsec as u32,
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn is(st: &libc::stat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

/// The reply to request `unique`: a header and `parts`.
fn reply(unique: u64, error: i32, parts: &[&[u8]]) -> Vec<u8> {
    let len = std::mem::size_of::<abi::OutHeader>() + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(
        abi::OutHeader {
            len: len as u32,
            error,
            unique,
        }
        .bytes(),
    );
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

const HEADER: usize = std::mem::size_of::<abi::OutHeader>();

impl Server {
    /// A server of `dir` (the guest cannot leave it), read-only or not.
    pub fn new(dir: &Path, read_only: bool, limits: Limits) -> std::io::Result<Server> {
        let open = |p: &Path| -> std::io::Result<OwnedFd> {
            let c = CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: NUL-terminated path; the result is a new descriptor we own.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd was just returned to us.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        Ok(Server::with_fds(
            open(dir)?,
            open(Path::new("/proc/self/fd"))?,
            read_only,
            limits,
        ))
    }

    /// A server of the directory `root` (an O_PATH descriptor), reopening nodes through
    /// `proc_self_fd` (/proc/self/fd opened as a directory).
    pub fn with_fds(
        root: OwnedFd,
        proc_self_fd: OwnedFd,
        read_only: bool,
        limits: Limits,
    ) -> Server {
        let key = stat_fd(root.as_raw_fd())
            .map(|st| (st.st_dev, st.st_ino))
            .unwrap_or_default();
        let mut s = Server {
            proc_fd: proc_self_fd,
            read_only,
            limits,
            inodes: HashMap::new(),
            by_key: HashMap::new(),
            next_id: abi::ROOT_ID + 1,
            handles: HashMap::new(),
            next_fh: 1,
            initialized: false,
        };
        s.inodes.insert(
            abi::ROOT_ID,
            Inode {
                fd: root,
                key,
                refs: 1,
            },
        );
        s.by_key.insert(key, abi::ROOT_ID);
        s
    }

    /// How many nodes and handles the server holds (root included).
    pub fn held(&self) -> (usize, usize) {
        (self.inodes.len(), self.handles.len())
    }

    /// Serves one request (the readable bytes of a chain); `room` is the size of the writable
    /// part. Returns the reply, or None when there is none to give (FORGET, INTERRUPT, a request
    /// too short to answer, or no room for even a header).
    pub fn handle(&mut self, bytes: &[u8], room: usize) -> Option<Vec<u8>> {
        let req = Request::parse(bytes)?;
        let h = req.header;
        let out = match h.opcode {
            op::FORGET => {
                if let Some(f) = Body::new(req.body).take::<abi::ForgetIn>() {
                    self.forget(h.nodeid, f.nlookup);
                }
                return None;
            }
            op::BATCH_FORGET => {
                let mut b = Body::new(req.body);
                if let Some(n) = b.take::<abi::BatchForgetIn>() {
                    for _ in 0..n.count {
                        let Some(f) = b.take::<abi::ForgetOne>() else {
                            break;
                        };
                        self.forget(f.nodeid, f.nlookup);
                    }
                }
                return None;
            }
            op::INTERRUPT => return None,
            op::INIT => self.init(req.body),
            _ if !self.initialized => Err(libc::EIO),
            _ => self.dispatch(&req, room.saturating_sub(HEADER)),
        };
        let r = match out {
            Ok(payload) if HEADER + payload.len() <= room => reply(h.unique, 0, &[&payload]),
            Ok(_) => reply(h.unique, -libc::EINVAL, &[]),
            Err(e) => reply(h.unique, -e, &[]),
        };
        (r.len() <= room).then_some(r)
    }

    fn init(&mut self, body: &[u8]) -> Result<Vec<u8>> {
        let i = Body::new(body).take::<abi::InitIn>().ok_or(libc::EINVAL)?;
        if i.major < abi::KERNEL_VERSION {
            return Err(libc::EPROTO);
        }
        let mut out = abi::InitOut {
            major: abi::KERNEL_VERSION,
            minor: abi::KERNEL_MINOR_VERSION,
            ..Default::default()
        };
        if i.major == abi::KERNEL_VERSION {
            // A newer major gets only the version (the kernel then asks again with ours).
            let want = abi::init::ASYNC_READ
                | abi::init::BIG_WRITES
                | abi::init::DO_READDIRPLUS
                | abi::init::READDIRPLUS_AUTO
                | abi::init::PARALLEL_DIROPS
                | abi::init::MAX_PAGES;
            out.max_readahead = i.max_readahead;
            out.flags = i.flags & want;
            out.max_background = 64;
            out.congestion_threshold = 48;
            out.max_write = MAX_WRITE;
            out.time_gran = 1;
            out.max_pages = MAX_PAGES;
            // A new session: whatever the last one held goes.
            self.reset();
            self.initialized = true;
        }
        Ok(out.bytes().to_vec())
    }

    /// Back to a fresh mount: only the root stays (DESTROY, a new INIT, a device reset).
    pub fn reset(&mut self) {
        self.handles.clear();
        self.inodes.retain(|&id, _| id == abi::ROOT_ID);
        self.by_key.retain(|_, id| *id == abi::ROOT_ID);
        if let Some(r) = self.inodes.get_mut(&abi::ROOT_ID) {
            r.refs = 1;
        }
        self.initialized = false;
    }

    fn dispatch(&mut self, req: &Request, room: usize) -> Result<Vec<u8>> {
        let h = &req.header;
        let mut b = Body::new(req.body);
        let node = h.nodeid;
        let writes = matches!(
            h.opcode,
            op::SETATTR
                | op::SYMLINK
                | op::MKNOD
                | op::MKDIR
                | op::UNLINK
                | op::RMDIR
                | op::RENAME
                | op::RENAME2
                | op::LINK
                | op::CREATE
                | op::WRITE
        );
        if writes && self.read_only {
            return Err(libc::EROFS);
        }
        match h.opcode {
            op::LOOKUP => {
                let name = component(b.name().ok_or(libc::EINVAL)?)?;
                self.lookup(node, &name)
            }
            op::GETATTR => self.getattr(node),
            op::SETATTR => {
                let s = b.take::<abi::SetattrIn>().ok_or(libc::EINVAL)?;
                self.setattr(node, &s)
            }
            op::READLINK => {
                let fd = self.fd(node)?;
                let mut buf = vec![0u8; libc::PATH_MAX as usize];
                // SAFETY: readlinkat of a descriptor we hold into a buffer of the length given.
                let n = unsafe {
                    libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                };
                if n < 0 {
                    return Err(errno());
                }
                buf.truncate(n as usize);
                Ok(buf)
            }
            op::SYMLINK => {
                let name = component(b.name().ok_or(libc::EINVAL)?)?;
                let target =
                    CString::new(b.name().ok_or(libc::EINVAL)?).map_err(|_| libc::EINVAL)?;
                if target.as_bytes().is_empty()
                    || target.as_bytes().len() >= libc::PATH_MAX as usize
                {
                    return Err(libc::EINVAL);
                }
                let dir = self.fd(node)?;
                // SAFETY: symlinkat with NUL-terminated strings relative to a directory we hold.
                cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) })?;
                self.created(node, &name, h, None)
            }
            op::MKNOD => {
                let m = b.take::<abi::MknodIn>().ok_or(libc::EINVAL)?;
                let name = component(b.name().ok_or(libc::EINVAL)?)?;
                // No device nodes in a host directory: a guest's device would be the host's.
                let kind = m.mode & libc::S_IFMT;
                if ![libc::S_IFREG, libc::S_IFIFO, libc::S_IFSOCK].contains(&kind) {
                    return Err(libc::EPERM);
                }
                let dir = self.fd(node)?;
                // SAFETY: mknodat with a NUL-terminated name relative to a directory we hold.
                cvt(unsafe { libc::mknodat(dir, name.as_ptr(), kind | 0o600, 0) })?;
                self.created(node, &name, h, Some(m.mode & 0o7777))
            }
            op::MKDIR => {
                let m = b.take::<abi::MkdirIn>().ok_or(libc::EINVAL)?;
                let name = component(b.name().ok_or(libc::EINVAL)?)?;
                let dir = self.fd(node)?;
                // SAFETY: mkdirat with a NUL-terminated name relative to a directory we hold.
                cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), 0o700) })?;
                self.created(node, &name, h, Some(m.mode & 0o7777))
            }
            op::UNLINK | op::RMDIR => {
                let name = component(b.name().ok_or(libc::EINVAL)?)?;
                let dir = self.fd(node)?;
                let flags = if h.opcode == op::RMDIR {
                    libc::AT_REMOVEDIR
                } else {
                    0
                };
                // SAFETY: unlinkat with a NUL-terminated name relative to a directory we hold.
                cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) })?;
                Ok(Vec::new())
            }
            op::RENAME | op::RENAME2 => {
                let (newdir, flags) = if h.opcode == op::RENAME {
                    (b.take::<abi::RenameIn>().ok_or(libc::EINVAL)?.newdir, 0)
                } else {
                    let r = b.take::<abi::Rename2In>().ok_or(libc::EINVAL)?;
                    (r.newdir, r.flags)
                };
                if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
                    return Err(libc::EINVAL);
                }
                let old = component(b.name().ok_or(libc::EINVAL)?)?;
                let new = component(b.name().ok_or(libc::EINVAL)?)?;
                let (from, to) = (self.fd(node)?, self.fd(newdir)?);
                // SAFETY: renameat2 with NUL-terminated names relative to directories we hold.
                cvt(unsafe {
                    libc::syscall(
                        libc::SYS_renameat2,
                        from,
                        old.as_ptr(),
                        to,
                        new.as_ptr(),
                        flags,
                    ) as libc::c_int
                })?;
                Ok(Vec::new())
            }
            op::LINK => {
                let l = b.take::<abi::LinkIn>().ok_or(libc::EINVAL)?;
                let name = component(b.name().ok_or(libc::EINVAL)?)?;
                let src = self.fd(l.oldnodeid)?;
                if is(&stat_fd(src)?, libc::S_IFDIR) {
                    return Err(libc::EPERM);
                }
                let dir = self.fd(node)?;
                let via = proc_name(src);
                // SAFETY: linkat from our own /proc/self/fd entry (the exact inode) to a
                // NUL-terminated name in a directory we hold.
                cvt(unsafe {
                    libc::linkat(
                        self.proc_fd.as_raw_fd(),
                        via.as_ptr(),
                        dir,
                        name.as_ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                })?;
                self.lookup(node, &name)
            }
            op::OPEN | op::OPENDIR => {
                let o = b.take::<abi::OpenIn>().ok_or(libc::EINVAL)?;
                let dir = h.opcode == op::OPENDIR;
                let flags = if dir {
                    libc::O_RDONLY | libc::O_DIRECTORY
                } else {
                    open_flags(o.flags as i32)
                };
                if !dir && self.read_only && opens_for_writing(flags) {
                    return Err(libc::EROFS);
                }
                let fd = self.reopen(node, flags, dir)?;
                let fh = self.add_handle(if dir {
                    Handle::Dir(fd)
                } else {
                    Handle::File(fd)
                })?;
                Ok(abi::OpenOut {
                    fh,
                    ..Default::default()
                }
                .bytes()
                .to_vec())
            }
            op::CREATE => {
                let c = b.take::<abi::CreateIn>().ok_or(libc::EINVAL)?;
                let name = component(b.name().ok_or(libc::EINVAL)?)?;
                self.create(node, &name, &c, h)
            }
            op::READ => {
                let r = b.take::<abi::ReadIn>().ok_or(libc::EINVAL)?;
                let fd = self.file(r.fh)?;
                let n = (r.size.min(MAX_WRITE) as usize).min(room);
                let mut buf = vec![0u8; n];
                // SAFETY: pread into our buffer of the length given.
                let got =
                    unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), n, r.offset as libc::off_t) };
                if got < 0 {
                    return Err(errno());
                }
                buf.truncate(got as usize);
                Ok(buf)
            }
            op::WRITE => {
                let w = b.take::<abi::WriteIn>().ok_or(libc::EINVAL)?;
                let data = b.rest();
                let n = w.size as usize;
                if n > data.len() || w.size > MAX_WRITE {
                    return Err(libc::EINVAL);
                }
                let fd = self.file(w.fh)?;
                // SAFETY: pwrite from the request's bytes, of the length given.
                let put =
                    unsafe { libc::pwrite(fd, data.as_ptr().cast(), n, w.offset as libc::off_t) };
                if put < 0 {
                    return Err(errno());
                }
                Ok(abi::WriteOut {
                    size: put as u32,
                    padding: 0,
                }
                .bytes()
                .to_vec())
            }
            op::STATFS => {
                let fd = self.fd(node)?;
                // SAFETY: st is plain data filled by fstatfs on a descriptor we hold.
                let mut st: libc::statfs = unsafe { std::mem::zeroed() };
                // SAFETY: as above.
                cvt(unsafe { libc::fstatfs(fd, &mut st) })?;
                Ok(abi::StatfsOut {
                    blocks: st.f_blocks,
                    bfree: st.f_bfree,
                    bavail: st.f_bavail,
                    files: st.f_files,
                    ffree: st.f_ffree,
                    bsize: st.f_bsize as u32,
                    namelen: st.f_namelen as u32,
                    frsize: st.f_frsize as u32,
                    ..Default::default()
                }
                .bytes()
                .to_vec())
            }
            op::RELEASE | op::RELEASEDIR => {
                let r = b.take::<abi::ReleaseIn>().ok_or(libc::EINVAL)?;
                self.handles.remove(&r.fh);
                Ok(Vec::new())
            }
            op::FLUSH => Ok(Vec::new()),
            op::FSYNC | op::FSYNCDIR => {
                let f = b.take::<abi::FsyncIn>().ok_or(libc::EINVAL)?;
                let fd = match self.handles.get(&f.fh) {
                    Some(Handle::File(fd) | Handle::Dir(fd)) => fd.as_raw_fd(),
                    None => return Err(libc::EBADF),
                };
                // SAFETY: fsync/fdatasync of a descriptor we hold.
                cvt(unsafe {
                    if f.fsync_flags & 1 != 0 {
                        libc::fdatasync(fd)
                    } else {
                        libc::fsync(fd)
                    }
                })?;
                Ok(Vec::new())
            }
            op::READDIR | op::READDIRPLUS => {
                let r = b.take::<abi::ReadIn>().ok_or(libc::EINVAL)?;
                let fd = match self.handles.get(&r.fh) {
                    Some(Handle::Dir(fd)) => fd.as_raw_fd(),
                    _ => return Err(libc::EBADF),
                };
                let limit = (r.size as usize).min(room).min(MAX_WRITE as usize);
                let entries = read_dir(fd, r.offset, limit, h.opcode == op::READDIRPLUS)?;
                if h.opcode == op::READDIR {
                    return Ok(entries.concat());
                }
                // Each entry with its node and attributes (a lookup the guest will FORGET), so
                // that listing a directory does not cost a round trip per name; "." and ".."
                // and names that cannot be looked up go without (node 0).
                let mut out = Vec::with_capacity(limit);
                for e in entries {
                    let d = abi::Dirent::read(&e).unwrap_or_default();
                    let name = &e[24..24 + d.namelen as usize];
                    let entry = component(name)
                        .ok()
                        .and_then(|n| self.lookup(node, &n).ok())
                        .unwrap_or_else(|| abi::EntryOut::default().bytes().to_vec());
                    out.extend_from_slice(&entry);
                    out.extend_from_slice(&e);
                }
                Ok(out)
            }
            op::DESTROY => {
                self.reset();
                Ok(Vec::new())
            }
            // Extended attributes, locks, lseek, fallocate, ioctl, DAX and the rest: the guest
            // kernel remembers ENOSYS and does without.
            _ => Err(libc::ENOSYS),
        }
    }

    /// The O_PATH descriptor of node `id`.
    fn fd(&self, id: u64) -> Result<RawFd> {
        self.inodes
            .get(&id)
            .map(|i| i.fd.as_raw_fd())
            .ok_or(libc::EBADF)
    }

    fn file(&self, fh: u64) -> Result<RawFd> {
        match self.handles.get(&fh) {
            Some(Handle::File(fd)) => Ok(fd.as_raw_fd()),
            _ => Err(libc::EBADF),
        }
    }

    fn add_handle(&mut self, h: Handle) -> Result<u64> {
        if self.handles.len() >= self.limits.handles {
            return Err(libc::ENFILE);
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, h);
        Ok(fh)
    }

    /// Opens node `id` for I/O through /proc/self/fd: a regular file (or a directory with
    /// `dir`), nothing else.
    fn reopen(&self, id: u64, flags: i32, dir: bool) -> Result<OwnedFd> {
        let fd = self.fd(id)?;
        let st = stat_fd(fd)?;
        let want = if dir { libc::S_IFDIR } else { libc::S_IFREG };
        if !is(&st, want) {
            return Err(if is(&st, libc::S_IFDIR) {
                libc::EISDIR
            } else if dir {
                libc::ENOTDIR
            } else {
                libc::EACCES
            });
        }
        let via = proc_name(fd);
        // SAFETY: openat of our own /proc/self/fd entry, which names the exact inode.
        let r = unsafe {
            libc::openat(
                self.proc_fd.as_raw_fd(),
                via.as_ptr(),
                flags | libc::O_CLOEXEC,
            )
        };
        if r < 0 {
            return Err(errno());
        }
        // SAFETY: r was just returned to us.
        Ok(unsafe { OwnedFd::from_raw_fd(r) })
    }

    /// `name` in directory node `parent` as a node of ours (its lookup count raised), as an
    /// entry reply.
    fn lookup(&mut self, parent: u64, name: &CString) -> Result<Vec<u8>> {
        let dir = self.fd(parent)?;
        let fd = open_beneath(dir, name, libc::O_PATH, 0)?;
        let st = stat_fd(fd.as_raw_fd())?;
        let key = (st.st_dev, st.st_ino);
        let id = match self.by_key.get(&key) {
            Some(&id) => {
                if let Some(i) = self.inodes.get_mut(&id) {
                    i.refs = i.refs.saturating_add(1);
                }
                id
            }
            None => {
                if self.inodes.len() >= self.limits.inodes {
                    return Err(libc::ENFILE);
                }
                let id = self.next_id;
                self.next_id += 1;
                self.inodes.insert(id, Inode { fd, key, refs: 1 });
                self.by_key.insert(key, id);
                id
            }
        };
        Ok(abi::EntryOut {
            nodeid: id,
            generation: 0,
            entry_valid: TIMEOUT,
            attr_valid: TIMEOUT,
            attr: attr_of(&st),
            ..Default::default()
        }
        .bytes()
        .to_vec())
    }

    fn forget(&mut self, id: u64, n: u64) {
        if id == abi::ROOT_ID {
            return;
        }
        let gone = match self.inodes.get_mut(&id) {
            Some(i) => {
                i.refs = i.refs.saturating_sub(n);
                (i.refs == 0).then_some(i.key)
            }
            None => None,
        };
        if let Some(key) = gone {
            self.inodes.remove(&id);
            self.by_key.remove(&key);
        }
    }

    fn getattr(&self, id: u64) -> Result<Vec<u8>> {
        let st = stat_fd(self.fd(id)?)?;
        Ok(abi::AttrOut {
            attr_valid: TIMEOUT,
            attr: attr_of(&st),
            ..Default::default()
        }
        .bytes()
        .to_vec())
    }

    /// A node just made in `parent`: owned by the requester, with `mode` (not for a symlink),
    /// then looked up.
    fn created(
        &mut self,
        parent: u64,
        name: &CString,
        h: &abi::InHeader,
        mode: Option<u32>,
    ) -> Result<Vec<u8>> {
        let dir = self.fd(parent)?;
        let fd = open_beneath(dir, name, libc::O_PATH, 0)?;
        self.own(fd.as_raw_fd(), h.uid, h.gid, mode)?;
        self.lookup(parent, name)
    }

    /// Gives node `fd` (O_PATH) owner `uid`:`gid` and, unless None, `mode` (set after the owner:
    /// chown clears set-id bits).
    fn own(&self, fd: RawFd, uid: u32, gid: u32, mode: Option<u32>) -> Result<()> {
        // SAFETY: fchownat of a descriptor we hold, on itself.
        cvt(unsafe {
            libc::fchownat(
                fd,
                c"".as_ptr(),
                uid,
                gid,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        if let Some(mode) = mode {
            self.chmod(fd, mode)?;
        }
        Ok(())
    }

    /// chmod of node `fd` (not a symlink) through /proc/self/fd: the exact inode.
    fn chmod(&self, fd: RawFd, mode: u32) -> Result<()> {
        if is(&stat_fd(fd)?, libc::S_IFLNK) {
            return Err(libc::EOPNOTSUPP);
        }
        let via = proc_name(fd);
        // SAFETY: fchmodat of our own /proc/self/fd entry.
        cvt(unsafe { libc::fchmodat(self.proc_fd.as_raw_fd(), via.as_ptr(), mode & 0o7777, 0) })?;
        Ok(())
    }

    fn setattr(&mut self, id: u64, s: &abi::SetattrIn) -> Result<Vec<u8>> {
        let fd = self.fd(id)?;
        if s.valid & (fattr::UID | fattr::GID) != 0 {
            let uid = if s.valid & fattr::UID != 0 {
                s.uid
            } else {
                u32::MAX
            };
            let gid = if s.valid & fattr::GID != 0 {
                s.gid
            } else {
                u32::MAX
            };
            self.own(fd, uid, gid, None)?;
        }
        if s.valid & fattr::MODE != 0 {
            self.chmod(fd, s.mode)?;
        }
        if s.valid & fattr::SIZE != 0 {
            let handle = (s.valid & fattr::FH != 0)
                .then(|| self.file(s.fh).ok())
                .flatten();
            let owned;
            let f = match handle {
                Some(f) => f,
                None => {
                    owned = self.reopen(id, libc::O_WRONLY, false)?;
                    owned.as_raw_fd()
                }
            };
            // SAFETY: ftruncate of a descriptor we hold.
            cvt(unsafe { libc::ftruncate(f, s.size as libc::off_t) })?;
        }
        if s.valid & (fattr::ATIME | fattr::MTIME) != 0 {
            let t = |set: u32, now: u32, sec: u64, nsec: u32| libc::timespec {
                tv_sec: sec as libc::time_t,
                tv_nsec: if s.valid & set == 0 {
                    libc::UTIME_OMIT
                } else if s.valid & now != 0 {
                    libc::UTIME_NOW
                } else {
                    i64::from(nsec)
                },
            };
            let times = [
                t(fattr::ATIME, fattr::ATIME_NOW, s.atime, s.atimensec),
                t(fattr::MTIME, fattr::MTIME_NOW, s.mtime, s.mtimensec),
            ];
            if !is(&stat_fd(fd)?, libc::S_IFLNK) {
                let via = proc_name(fd);
                // SAFETY: utimensat of our own /proc/self/fd entry with two timespecs.
                cvt(unsafe {
                    libc::utimensat(self.proc_fd.as_raw_fd(), via.as_ptr(), times.as_ptr(), 0)
                })?;
            }
        }
        self.getattr(id)
    }

    fn create(
        &mut self,
        parent: u64,
        name: &CString,
        c: &abi::CreateIn,
        h: &abi::InHeader,
    ) -> Result<Vec<u8>> {
        let dir = self.fd(parent)?;
        let flags = open_flags(c.flags as i32);
        // Made by us (O_EXCL) or opened as it is: only a file we made gets the requester as owner.
        let (fd, made) = match open_beneath(dir, name, flags | libc::O_CREAT | libc::O_EXCL, 0o600)
        {
            Ok(fd) => (fd, true),
            Err(libc::EEXIST) if c.flags as i32 & libc::O_EXCL == 0 => {
                let fd = open_beneath(dir, name, flags, 0)?;
                if !is(&stat_fd(fd.as_raw_fd())?, libc::S_IFREG) {
                    return Err(libc::EACCES);
                }
                (fd, false)
            }
            Err(e) => return Err(e),
        };
        if made {
            // SAFETY: fchown/fchmod of the file we just made.
            unsafe {
                cvt(libc::fchown(fd.as_raw_fd(), h.uid, h.gid))?;
                cvt(libc::fchmod(fd.as_raw_fd(), c.mode & 0o7777))?;
            }
        }
        let entry = self.lookup(parent, name)?;
        let fh = match self.add_handle(Handle::File(fd)) {
            Ok(fh) => fh,
            Err(e) => {
                if let Some(id) = abi::EntryOut::read(&entry).map(|e| e.nodeid) {
                    self.forget(id, 1);
                }
                return Err(e);
            }
        };
        let mut out = entry;
        out.extend_from_slice(
            abi::OpenOut {
                fh,
                ..Default::default()
            }
            .bytes(),
        );
        Ok(out)
    }
}

/// The entry of `fd` under /proc/self/fd.
fn proc_name(fd: RawFd) -> CString {
    CString::new(fd.to_string()).unwrap_or_default()
}

/// The open flags a guest may ask for (access mode, append, sync, nonblocking, truncation);
/// never creation, no_follow games, O_PATH, O_NOATIME or O_DIRECT.
fn open_flags(f: i32) -> i32 {
    f & (libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_TRUNC
        | libc::O_NONBLOCK
        | libc::O_SYNC
        | libc::O_DSYNC)
}

fn opens_for_writing(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_APPEND) != 0
}

/// Directory entries of `fd` from cookie `offset`, each a FUSE dirent (name padded to 8 bytes),
/// as many as fit in `limit` bytes (each with an entry_out before it when `plus`).
fn read_dir(fd: RawFd, offset: u64, limit: usize, plus: bool) -> Result<Vec<Vec<u8>>> {
    // SAFETY: lseek of a directory descriptor we hold to a cookie the guest had from us (a bad
    // one gives an error or no entries).
    if unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_SET) } < 0 {
        return Err(errno());
    }
    let extra = if plus {
        std::mem::size_of::<abi::EntryOut>()
    } else {
        0
    };
    let mut out = Vec::new();
    let mut used = 0;
    let mut buf = vec![0u8; limit.clamp(512, 64 << 10)];
    'outer: loop {
        // SAFETY: getdents64 into our buffer of the length given.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(errno());
        }
        if n == 0 {
            break;
        }
        let mut pos = 0usize;
        while pos + 19 <= n as usize {
            let ent = &buf[pos..n as usize];
            let ino = u64::from_ne_bytes(ent[0..8].try_into().unwrap_or_default());
            let off = u64::from_ne_bytes(ent[8..16].try_into().unwrap_or_default());
            let reclen = u16::from_ne_bytes([ent[16], ent[17]]) as usize;
            let typ = ent[18];
            if reclen < 19 || reclen > ent.len() {
                break 'outer;
            }
            let name = &ent[19..reclen];
            let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
            let d = abi::Dirent {
                ino,
                off,
                namelen: name.len() as u32,
                typ: u32::from(typ),
            };
            let mut e = Vec::new();
            if !abi::push_dirent(&mut e, limit.saturating_sub(used + extra), d, name) {
                break 'outer;
            }
            used += extra + e.len();
            out.push(e);
            pos += reclen;
        }
    }
    Ok(out)
}
