//! Mount and file helpers on plain system calls.

use std::ffi::CString;

use crate::{check, Failure};

/// A C string; a string with a NUL byte becomes the empty string (which every call refuses).
pub fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// mount(2); empty strings are passed as NULL.
pub fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), Failure> {
    let (s, t, f, d) = (c(src), c(target), c(fstype), c(data));
    let opt = |v: &str, p: *const libc::c_char| if v.is_empty() { std::ptr::null() } else { p };
    // SAFETY: NUL-terminated strings (or null for empty) valid across the call.
    let r = unsafe {
        libc::mount(
            opt(src, s.as_ptr()),
            t.as_ptr(),
            opt(fstype, f.as_ptr()),
            flags,
            opt(data, d.as_ptr()).cast(),
        )
    };
    check(r, || format!("mounting {target}"))
}

/// A bind mount of `src` on `target`, made read-only when `ro`.
pub fn bind(src: &str, target: &str, ro: bool) -> Result<(), Failure> {
    mount(src, target, "", libc::MS_BIND | libc::MS_REC, "")?;
    if ro {
        mount(
            "",
            target,
            "",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
            "",
        )?;
    }
    Ok(())
}

/// Makes the mount point `path` (absolute, in the current root) as Docker's securejoin does:
/// symlinks on the way are followed inside the current root, missing directories are made, and
/// a missing last component becomes a directory (`dir`) or an empty file. Returns the path with
/// no symlink left in it, where the mount goes: a dangling symlink in an image (`/data ->
/// /srv/data`) gets its target made, as with Docker, instead of failing the mount.
pub fn mount_point(path: &str, dir: bool) -> Result<String, Failure> {
    use std::io::ErrorKind;
    let mut todo: std::collections::VecDeque<String> =
        path.split('/').map(str::to_string).collect();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(comp) = todo.pop_front() {
        match comp.as_str() {
            "" | "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let here = format!(
            "/{}",
            done.iter()
                .chain([&comp])
                .cloned()
                .collect::<Vec<_>>()
                .join("/")
        );
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(Failure::setup(format!(
                        "mount point {path}: too many levels of symbolic links"
                    )));
                }
                let target = std::fs::read_link(&here)
                    .map_err(|e| Failure::setup(format!("mount point {path}: {here}: {e}")))?;
                let target = target.to_string_lossy();
                if target.starts_with('/') {
                    done.clear();
                }
                for (i, t) in target.split('/').enumerate() {
                    todo.insert(i, t.to_string());
                }
            }
            Ok(_) => done.push(comp),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let last = todo.iter().all(|c| c.is_empty() || c == ".");
                if last && !dir {
                    touch(&here);
                } else {
                    // SAFETY: NUL-terminated path.
                    unsafe { libc::mkdir(c(&here).as_ptr(), 0o755) };
                }
                done.push(comp);
            }
            Err(e) => return Err(Failure::setup(format!("mount point {path}: {here}: {e}"))),
        }
    }
    Ok(format!("/{}", done.join("/")))
}

/// mkdir -p (mode 0755); errors are left to the call that needs the directory.
pub fn mkdir_p(path: &str) {
    let mut cur = String::with_capacity(path.len());
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        cur.push('/');
        cur.push_str(comp);
        // SAFETY: NUL-terminated path.
        unsafe { libc::mkdir(c(&cur).as_ptr(), 0o755) };
    }
}

/// Creates an empty file to bind a file onto (parents included); never follows a final symlink.
/// Leaves whatever is already there alone: opening an image's file for writing would copy it (and
/// its directory) up into an overlay's upper layer for nothing.
pub fn touch(path: &str) {
    if std::fs::symlink_metadata(path).is_ok() {
        return;
    }
    if let Some(i) = path.rfind('/') {
        mkdir_p(&path[..i]);
    }
    // SAFETY: NUL-terminated path; the fd is closed at once.
    unsafe {
        let fd = libc::open(
            c(path).as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o644,
        );
        if fd >= 0 {
            libc::close(fd);
        }
    }
}

/// A device node with exactly `mode` (the umask does not narrow it).
pub fn mknod(path: &str, mode: libc::mode_t, major: u32, minor: u32) -> Result<(), Failure> {
    let p = c(path);
    // SAFETY: NUL-terminated path.
    let r = unsafe { libc::mknod(p.as_ptr(), mode, libc::makedev(major, minor)) };
    check(r, || format!("mknod {path}"))?;
    // SAFETY: as above.
    unsafe { libc::chmod(p.as_ptr(), mode & 0o7777) };
    Ok(())
}

/// Some(true) for a directory, Some(false) for anything else, None when nothing is there (a
/// symlink is not followed).
pub fn is_dir_nofollow(path: &str) -> Option<bool> {
    // SAFETY: st is plain data filled by lstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated path, valid stat buffer.
    if unsafe { libc::lstat(c(path).as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.st_mode & libc::S_IFMT) == libc::S_IFDIR)
}
