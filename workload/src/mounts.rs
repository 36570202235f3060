//! The workload's own mounts (`-v`, `--mount`, `--tmpfs`): a tmpfs's options, and filling a new
//! volume with what the image has at its mount point (Docker's copy-up).

use std::os::fd::RawFd;

use crate::{c, check, mount, Failure};

/// Options of a tmpfs as `--tmpfs` takes them, split into mount flags and the data string the
/// kernel's tmpfs parses. Docker's defaults (`nosuid,nodev,noexec`) come first; a later option
/// overrides an earlier one (`exec`). An option tmpfs does not know is refused.
pub fn tmpfs_options(options: &str) -> Result<(libc::c_ulong, String), String> {
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mut data: Vec<&str> = Vec::new();
    for o in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (key, value) = o.split_once('=').unwrap_or((o, ""));
        let flag = |set: bool, f: libc::c_ulong, flags: &mut libc::c_ulong| {
            if set {
                *flags |= f
            } else {
                *flags &= !f
            }
        };
        match (key, value.is_empty()) {
            ("ro", true) => flag(true, libc::MS_RDONLY, &mut flags),
            ("rw", true) => flag(false, libc::MS_RDONLY, &mut flags),
            ("noexec", true) => flag(true, libc::MS_NOEXEC, &mut flags),
            ("exec", true) => flag(false, libc::MS_NOEXEC, &mut flags),
            ("nosuid", true) => flag(true, libc::MS_NOSUID, &mut flags),
            ("suid", true) => flag(false, libc::MS_NOSUID, &mut flags),
            ("nodev", true) => flag(true, libc::MS_NODEV, &mut flags),
            ("dev", true) => flag(false, libc::MS_NODEV, &mut flags),
            ("noatime", true) => flag(true, libc::MS_NOATIME, &mut flags),
            ("atime", true) => flag(false, libc::MS_NOATIME, &mut flags),
            ("nodiratime", true) => flag(true, libc::MS_NODIRATIME, &mut flags),
            ("relatime", true) => flag(true, libc::MS_RELATIME, &mut flags),
            ("strictatime", true) => flag(true, libc::MS_STRICTATIME, &mut flags),
            ("sync", true) => flag(true, libc::MS_SYNCHRONOUS, &mut flags),
            ("async", true) => flag(false, libc::MS_SYNCHRONOUS, &mut flags),
            ("size" | "nr_blocks" | "nr_inodes", false)
                if value
                    .trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G', '%'])
                    .parse::<u64>()
                    .is_ok() =>
            {
                data.retain(|d| !d.starts_with(&format!("{key}=")));
                data.push(o);
            }
            ("mode", false) if u32::from_str_radix(value, 8).is_ok_and(|m| m <= 0o7777) => {
                data.retain(|d| !d.starts_with("mode="));
                data.push(o);
            }
            ("uid" | "gid", false) if value.parse::<u32>().is_ok() => {
                data.retain(|d| !d.starts_with(&format!("{key}=")));
                data.push(o);
            }
            _ => return Err(format!("invalid tmpfs option {o:?}")),
        }
    }
    Ok((flags, data.join(",")))
}

/// A new tmpfs on `target` (created if missing) with `options` (see [`tmpfs_options`]).
pub fn tmpfs(target: &str, options: &str, read_only: bool) -> Result<(), Failure> {
    let (mut flags, data) = tmpfs_options(options).map_err(Failure::setup)?;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    let target = crate::mount_point(target, true)?;
    mount("tmpfs", &target, "tmpfs", flags, &data)
}

// The new mount API (Linux 5.2; mount_setattr 5.12), not all in the libc crate.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// openat2(2)'s `struct open_how` (the libc crate's cannot be built outside it).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// A detached copy of the mount tree at `src` (a recursive bind, read-only throughout when `ro`)
/// that is attached nowhere yet: made while `src` can be reached, attached with [`attach`] once
/// the workload's root is its own (the host's root detached), where no path can lead out of it.
pub fn clone_tree(src: &str, ro: bool) -> Result<RawFd, Failure> {
    let what = || format!("binding {src}");
    // SAFETY: open_tree with a NUL-terminated path; the result is a descriptor we own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c(src).as_ptr(),
            OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint,
        )
    } as RawFd;
    check(fd, what)?;
    if ro {
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: mount_setattr on our detached tree with a valid attribute struct of the size
        // given.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                fd,
                c"".as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        } as libc::c_int;
        if r != 0 {
            let f = Failure::os(format!("making the bind of {src} read-only"));
            // SAFETY: closing the descriptor opened above.
            unsafe { libc::close(fd) };
            return Err(f);
        }
    }
    Ok(fd)
}

/// Attaches the tree `tree` of [`clone_tree`] on `target` (which must exist) and closes it.
pub fn attach(tree: RawFd, target: &str) -> Result<(), Failure> {
    // SAFETY: move_mount of a descriptor we own onto a NUL-terminated path; closed after.
    let r = unsafe {
        let r = libc::syscall(
            libc::SYS_move_mount,
            tree,
            c"".as_ptr(),
            libc::AT_FDCWD,
            c(target).as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        ) as libc::c_int;
        let f = (r != 0).then(|| Failure::os(format!("mounting on {target}")));
        libc::close(tree);
        f
    };
    r.map_or(Ok(()), Err)
}

/// One of the workload's mounts (`-v`, `--mount`, `--tmpfs`), taken while its source can be
/// reached (a container's host root, a VM's shared directories) and attached once the
/// workload's root is the only one left ([`Prepared::attach`]).
pub struct Prepared<'a> {
    mount: &'a rvmm_proto::Mount,
    /// A bind or a volume: the detached copy of its source, whether that is a directory, and
    /// for a volume to fill from the image (copy-up), a descriptor of its directory.
    tree: Option<(RawFd, bool, Option<RawFd>)>,
}

impl<'a> Prepared<'a> {
    /// Takes `mount`'s source, `source` as this process sees it now (unused for a tmpfs).
    pub fn new(mount: &'a rvmm_proto::Mount, source: &str) -> Result<Prepared<'a>, Failure> {
        use rvmm_proto::MountKind;
        if mount.kind == MountKind::Tmpfs {
            return Ok(Prepared { mount, tree: None });
        }
        let dir = std::fs::metadata(source).is_ok_and(|m| m.is_dir());
        let copy_up = if mount.kind == MountKind::Volume && mount.copy_up {
            // SAFETY: NUL-terminated path.
            let fd = unsafe {
                libc::open(
                    c(source).as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            check(fd, || format!("opening volume {source}"))?;
            Some(fd)
        } else {
            None
        };
        let tree = clone_tree(source, mount.read_only)?;
        Ok(Prepared {
            mount,
            tree: Some((tree, dir, copy_up)),
        })
    }

    /// Mounts it at its destination in the current root (a new volume filled from what the
    /// root has there first).
    pub fn attach(self) -> Result<(), Failure> {
        let dst = &self.mount.destination;
        let Some((tree, dir, copy_up)) = self.tree else {
            return tmpfs(dst, &self.mount.options, self.mount.read_only);
        };
        if let Some(fd) = copy_up {
            let r = self::copy_up("/", dst, fd);
            // SAFETY: closing the descriptor opened in `new`.
            unsafe { libc::close(fd) };
            r?;
        }
        attach(tree, &crate::mount_point(dst, dir)?)
    }
}

/// Is the directory `dir` (a descriptor) empty?
pub fn is_empty_dir(dir: RawFd) -> bool {
    let mut empty = true;
    let _ = for_each_entry(dir, |_| {
        empty = false;
        Ok(false)
    });
    empty
}

/// Docker's copy-up: fills the empty volume directory `volume` (a descriptor) with what the
/// workload's root `root` has at `path` (absolute in that root): owner, mode and times of the
/// directory itself, then every entry below it. `path` is resolved inside `root` (symlinks cannot
/// lead out of it) and nothing below it is followed: a symlink is copied as a symlink. Nothing is
/// done when the volume is not empty or the root has no directory there.
pub fn copy_up(root: &str, path: &str, volume: RawFd) -> Result<(), Failure> {
    if !is_empty_dir(volume) {
        return Ok(());
    }
    // SAFETY: NUL-terminated path.
    let root_fd = unsafe {
        libc::open(
            c(root).as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check(root_fd, || format!("opening {root}"))?;
    let rel = path.trim_start_matches('/');
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    let target = if rel.is_empty() { "." } else { rel };
    // SAFETY: openat2 with a NUL-terminated path and a valid open_how of the size given.
    let src = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root_fd,
            c(target).as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    } as RawFd;
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(root_fd) };
    if src < 0 {
        // Nothing there (or not a directory): nothing to copy, as with Docker.
        return Ok(());
    }
    // The directory's own attributes last: filling it changes its times.
    let r = copy_tree(src, volume, 0).and_then(|()| copy_attributes(src, volume));
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(src) };
    r
}

/// How deep a copy-up goes (a deeper image tree is refused rather than exhausting descriptors).
const MAX_DEPTH: u32 = 128;

/// Copies every entry of directory `src` into directory `dst` (both descriptors), recursively.
fn copy_tree(src: RawFd, dst: RawFd, depth: u32) -> Result<(), Failure> {
    if depth > MAX_DEPTH {
        return Err(Failure::setup(format!(
            "copying the image's files into a volume: more than {MAX_DEPTH} directories deep"
        )));
    }
    for_each_entry(src, |name| {
        copy_entry(src, dst, name, depth)?;
        Ok(true)
    })
}

fn copy_entry(src: RawFd, dst: RawFd, name: &std::ffi::CStr, depth: u32) -> Result<(), Failure> {
    let what = || format!("copying {} into a volume", name.to_string_lossy());
    // SAFETY: st is plain data filled by fstatat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated name relative to a directory descriptor, a valid stat buffer.
    let r = unsafe { libc::fstatat(src, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    check(r, what)?;
    let nofollow = libc::O_NOFOLLOW | libc::O_CLOEXEC;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => {
            // SAFETY: *at calls with NUL-terminated names on directory descriptors we hold.
            unsafe {
                check(libc::mkdirat(dst, name.as_ptr(), 0o700), what)?;
                let s = libc::openat(
                    src,
                    name.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | nofollow,
                );
                check(s, what)?;
                let d = libc::openat(
                    dst,
                    name.as_ptr(),
                    libc::O_RDONLY | libc::O_DIRECTORY | nofollow,
                );
                if d < 0 {
                    libc::close(s);
                    return Err(Failure::os(what()));
                }
                let r = copy_tree(s, d, depth + 1).and_then(|()| copy_attributes(s, d));
                libc::close(s);
                libc::close(d);
                r
            }
        }
        libc::S_IFREG => {
            // SAFETY: *at calls with NUL-terminated names on directory descriptors we hold; the
            // file descriptors are closed on every path.
            unsafe {
                let s = libc::openat(src, name.as_ptr(), libc::O_RDONLY | nofollow);
                check(s, what)?;
                let d = libc::openat(
                    dst,
                    name.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | nofollow,
                    0o600,
                );
                if d < 0 {
                    libc::close(s);
                    return Err(Failure::os(what()));
                }
                let r = copy_data(s, d)
                    .map_err(|()| Failure::os(what()))
                    .and_then(|()| copy_attributes(s, d));
                libc::close(s);
                libc::close(d);
                r
            }
        }
        libc::S_IFLNK => {
            let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
            // SAFETY: readlinkat into a buffer of the length given.
            let n = unsafe {
                libc::readlinkat(src, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len() - 1)
            };
            if n < 0 {
                return Err(Failure::os(what()));
            }
            buf.truncate(n as usize);
            buf.push(0);
            // SAFETY: symlinkat with NUL-terminated strings; the link itself is never followed
            // (fchownat and utimensat with AT_SYMLINK_NOFOLLOW).
            unsafe {
                check(
                    libc::symlinkat(buf.as_ptr().cast(), dst, name.as_ptr()),
                    what,
                )?;
            }
            own_at(dst, name, &st, None);
            Ok(())
        }
        libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK => {
            // SAFETY: mknodat with a NUL-terminated name, then owner, mode and times of the new
            // node (not a symlink: nothing to follow).
            unsafe {
                check(
                    libc::mknodat(dst, name.as_ptr(), st.st_mode, st.st_rdev),
                    what,
                )?;
            }
            own_at(dst, name, &st, Some(st.st_mode & 0o7777));
            Ok(())
        }
        // Sockets are not copied (Docker neither).
        _ => Ok(()),
    }
}

/// Owner, then `mode` (not for a symlink), then times of `st` onto `name` in directory `dst`,
/// a node just made there (a symlink is never followed).
fn own_at(dst: RawFd, name: &std::ffi::CStr, st: &libc::stat, mode: Option<libc::mode_t>) {
    let times = times_of(st);
    // SAFETY: *at calls with a NUL-terminated name relative to a directory we hold; fchmodat
    // only for a node that is not a symlink (the caller says so by giving a mode).
    unsafe {
        libc::fchownat(
            dst,
            name.as_ptr(),
            st.st_uid,
            st.st_gid,
            libc::AT_SYMLINK_NOFOLLOW,
        );
        if let Some(mode) = mode {
            libc::fchmodat(dst, name.as_ptr(), mode, 0);
        }
        libc::utimensat(
            dst,
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        );
    }
}

/// The access and modification times of `st`, as utimensat takes them.
fn times_of(st: &libc::stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

/// Owner, mode (set after the owner: chown clears set-id bits) and times of `src` onto `dst`.
fn copy_attributes(src: RawFd, dst: RawFd) -> Result<(), Failure> {
    // SAFETY: st is plain data filled by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat/fchown/fchmod/futimens on descriptors we hold.
    unsafe {
        check(libc::fstat(src, &mut st), || {
            "reading an image directory".into()
        })?;
        check(libc::fchown(dst, st.st_uid, st.st_gid), || {
            "setting a volume file's owner".into()
        })?;
        check(libc::fchmod(dst, st.st_mode & 0o7777), || {
            "setting a volume file's mode".into()
        })?;
        let times = times_of(&st);
        libc::futimens(dst, times.as_ptr());
    }
    Ok(())
}

/// Copies the file `src` to `dst` (both descriptors) to its end.
fn copy_data(src: RawFd, dst: RawFd) -> Result<(), ()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // SAFETY: reading into our buffer of the length given.
        let n = unsafe { libc::read(src, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(());
        }
        if n == 0 {
            return Ok(());
        }
        let mut rest = &buf[..n as usize];
        while !rest.is_empty() {
            // SAFETY: writing from our buffer, of the length given.
            let w = unsafe { libc::write(dst, rest.as_ptr().cast(), rest.len()) };
            if w < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(());
            }
            rest = &rest[w as usize..];
        }
    }
}

/// Calls `f` with the name of every entry of directory `dir` (a descriptor, not consumed) but
/// `.` and `..`, until it returns false.
fn for_each_entry(
    dir: RawFd,
    mut f: impl FnMut(&std::ffi::CStr) -> Result<bool, Failure>,
) -> Result<(), Failure> {
    // SAFETY: a new open file of the same directory (its own offset) for fdopendir, which then
    // owns it.
    let d = unsafe {
        let fd = libc::openat(
            dir,
            c(".").as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(Failure::os("reading a directory"));
        }
        let d = libc::fdopendir(fd);
        if d.is_null() {
            libc::close(fd);
            return Err(Failure::os("reading a directory"));
        }
        d
    };
    let mut r = Ok(());
    loop {
        // SAFETY: readdir on the stream opened above; the entry is read before the next call.
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let name = unsafe { std::ffi::CStr::from_ptr((*e).d_name.as_ptr()) };
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        match f(name) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                r = Err(e);
                break;
            }
        }
    }
    // SAFETY: closing the stream opened above.
    unsafe { libc::closedir(d) };
    r
}

#[cfg(test)]
mod tests {
    use super::tmpfs_options;

    #[test]
    fn tmpfs_options_follow_docker() {
        let d = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        assert_eq!(tmpfs_options(""), Ok((d, String::new())));
        assert_eq!(
            tmpfs_options("size=64m,mode=1777"),
            Ok((d, "size=64m,mode=1777".into()))
        );
        assert_eq!(
            tmpfs_options("exec,size=1k,size=2k,ro"),
            Ok((
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RDONLY,
                "size=2k".into()
            ))
        );
        for bad in [
            "size=lots",
            "mode=999",
            "mode=17777",
            "bind",
            "uid=x",
            "ro=1",
            "x-foo",
        ] {
            assert!(tmpfs_options(bad).is_err(), "{bad}");
        }
    }
}
