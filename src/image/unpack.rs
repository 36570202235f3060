//! Unpacking one layer tar into an empty directory, without letting the tar reach outside it.
//!
//! Rules (an entry breaking one fails the whole layer, and the caller removes the directory):
//! - paths are made relative (a leading `/` is dropped); a `..` component is rejected;
//! - nothing is ever written through a symlink: every parent of an entry must be a real directory
//!   inside the layer, files are created with `O_NOFOLLOW`, metadata is set with the no-follow calls;
//! - a hardlink's target must be an earlier non-directory entry of the same layer;
//! - device nodes only when privileged (skipped otherwise); fifos always;
//! - whiteouts become overlayfs whiteouts when privileged (`.wh.x` → char device 0:0 named `x`,
//!   `.wh..wh..opq` → `trusted.overlay.opaque=y` on the directory), so the layer directories stack
//!   directly as overlayfs lower dirs. Unprivileged, the `.wh.` markers are kept as empty files.
//! - ownership (privileged), modes, `user.*` and `security.capability` xattrs (privileged), mtimes.

use std::ffi::{CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a layer could not be unpacked. Paths are relative to the layer root unless noted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading layer tar")]
    ReadTar(#[source] io::Error),
    #[error("reading pax headers")]
    PaxHeaders(#[source] io::Error),
    #[error("tar entry name contains a NUL byte")]
    NulInName,
    #[error("tar entry {0:?} escapes the layer (\"..\")")]
    Escapes(String),
    #[error("tar entry {0:?} is a malformed whiteout")]
    BadWhiteout(String),
    #[error("tar entry would write through the symlink {}", .0.display())]
    ThroughSymlink(PathBuf),
    #[error("tar entry needs {} to be a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("marking {} opaque", path.display())]
    Opaque {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating whiteout for {}", path.display())]
    Whiteout {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("replacing {}", path.display())]
    Replace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("symlink {} has no target", .0.display())]
    SymlinkNoTarget(PathBuf),
    #[error("creating symlink {}", path.display())]
    Symlink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("hardlink {} points at the layer root", .0.display())]
    HardlinkToRoot(PathBuf),
    #[error("hardlink {} points at a directory", .0.display())]
    HardlinkToDir(PathBuf),
    #[error("hardlink {} points at {}, which is in no layer", path.display(), target.display())]
    HardlinkDangling { path: PathBuf, target: PathBuf },
    #[error("hardlink {} points at a lower-layer entry that is not a regular file", .0.display())]
    HardlinkNotFile(PathBuf),
    #[error("hardlink target directory {} is not in this layer", path.display())]
    HardlinkTargetDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("hardlink target {} is reached through a symlink or file", .0.display())]
    HardlinkThroughSymlink(PathBuf),
    #[error("creating hardlink {}", path.display())]
    Hardlink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("copying hardlink target for {}", path.display())]
    CopyHardlink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating device {}", path.display())]
    Device {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating fifo {}", path.display())]
    Fifo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("chown {}", path.display())]
    Chown {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("xattr {key} on {}", path.display())]
    Xattr {
        key: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("chmod {}", path.display())]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `path` is absolute.
    #[error("setting mtime of {}", path.display())]
    Mtime {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// `map_err` helper: the io error of an operation on `path` as the variant `f` builds.
fn at<'a>(
    f: fn(PathBuf, io::Error) -> Error,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| f(path.to_path_buf(), source)
}

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions<'a> {
    /// Running with CAP_MKNOD/CAP_CHOWN/CAP_SYS_ADMIN: devices, ownership, overlay whiteouts.
    pub privileged: bool,
    /// The unpacked layers below this one, top-most first: a hardlink to a file of a lower layer
    /// becomes a copy of it (layer directories never share inodes).
    pub lowers: &'a [PathBuf],
}

impl UnpackOptions<'_> {
    /// Privileged when running as root; no lower layers.
    pub fn for_current_user() -> UnpackOptions<'static> {
        UnpackOptions {
            // SAFETY: geteuid has no preconditions.
            privileged: unsafe { libc::geteuid() } == 0,
            lowers: &[],
        }
    }
}

/// What an unpack wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnpackStats {
    pub entries: u64,
    pub bytes: u64,
}

/// Unpacks the (uncompressed) tar stream into `dest`, an existing empty directory, then reads the
/// stream to its end (so a digest computed over it covers every byte).
pub fn unpack<R: Read>(reader: R, dest: &Path, opts: UnpackOptions) -> Result<UnpackStats> {
    let mut archive = tar::Archive::new(reader);
    let mut stats = UnpackStats::default();
    // Directories whose mode and mtime are set at the end: (path relative to dest, mode, mtime).
    let mut dirs: Vec<(PathBuf, u32, i64)> = Vec::new();
    for entry in archive.entries().map_err(Error::ReadTar)? {
        let mut entry = entry.map_err(Error::ReadTar)?;
        stats.entries += 1;
        let raw = entry.path_bytes().into_owned();
        let Some(rel) = clean(&raw)? else {
            continue; // the layer root itself
        };
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent = ensure_dirs(dest, parent_rel)?;
        let path = parent.join(rel.file_name().unwrap_or_default());

        if name == OPAQUE {
            if opts.privileged {
                set_xattr(&parent, "trusted.overlay.opaque", b"y").map_err(at(
                    |path, source| Error::Opaque { path, source },
                    parent_rel,
                ))?;
            } else {
                write_marker(&path, &rel)?;
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(Error::BadWhiteout(
                    String::from_utf8_lossy(&raw).into_owned(),
                ));
            }
            if opts.privileged {
                let target = parent.join(hidden);
                remove_existing(&target, &parent_rel.join(hidden))?;
                mknod(&target, libc::S_IFCHR, 0)
                    .map_err(at(|path, source| Error::Whiteout { path, source }, &rel))?;
            } else {
                write_marker(&path, &rel)?;
            }
            continue;
        }

        let header = entry.header().clone();
        // From the entry, not the header: GNU long-link and PAX linkpath extensions apply.
        let link = entry.link_name_bytes().map(|b| b.into_owned());
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let uid = header.uid().unwrap_or(0) as u32;
        let gid = header.gid().unwrap_or(0) as u32;
        let mtime = header.mtime().unwrap_or(0) as i64;
        let xattrs = read_xattrs(&mut entry)?;

        use tar::EntryType as T;
        match kind {
            T::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_existing(&path, &rel)?;
                        fs::create_dir(&path).map_err(at(create, &rel))?;
                    }
                    Err(_) => fs::create_dir(&path).map_err(at(create, &rel))?,
                }
                dirs.push((rel.clone(), mode, mtime));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                remove_existing(&path, &rel)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(at(create, &rel))?;
                stats.bytes += io::copy(&mut entry, &mut f)
                    .map_err(at(|path, source| Error::Write { path, source }, &rel))?;
            }
            T::Symlink => {
                let target = link.clone().unwrap_or_default();
                if target.is_empty() {
                    return Err(Error::SymlinkNoTarget(rel));
                }
                remove_existing(&path, &rel)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(at(|path, source| Error::Symlink { path, source }, &rel))?;
            }
            T::Link => {
                let target = link.clone().unwrap_or_default();
                let Some(trel) = clean(&target)? else {
                    return Err(Error::HardlinkToRoot(rel));
                };
                let tparent_rel = trel.parent().unwrap_or(Path::new(""));
                let tname = trel.file_name().unwrap_or_default();
                let here = existing_dir(dest, tparent_rel)
                    .ok()
                    .map(|d| d.join(tname))
                    .filter(|p| fs::symlink_metadata(p).is_ok());
                let hardlink = |path, source| Error::Hardlink { path, source };
                if let Some(tpath) = here {
                    if fs::symlink_metadata(&tpath)
                        .map_err(at(hardlink, &rel))?
                        .is_dir()
                    {
                        return Err(Error::HardlinkToDir(rel));
                    }
                    if tpath == path {
                        continue;
                    }
                    remove_existing(&path, &rel)?;
                    // link(2) does not follow a symlink target: the link is to the symlink itself.
                    fs::hard_link(&tpath, &path).map_err(at(hardlink, &rel))?;
                    continue; // shares the target's metadata
                }
                let lower = opts.lowers.iter().find_map(|l| {
                    let p = existing_dir(l, tparent_rel).ok()?.join(tname);
                    let m = fs::symlink_metadata(&p).ok()?;
                    Some((p, m))
                });
                let Some((lpath, lmeta)) = lower else {
                    return Err(Error::HardlinkDangling {
                        path: rel,
                        target: trel,
                    });
                };
                if !lmeta.is_file() {
                    return Err(Error::HardlinkNotFile(rel));
                }
                remove_existing(&path, &rel)?;
                copy_file(&lpath, &path, &lmeta, opts.privileged).map_err(at(
                    |path, source| Error::CopyHardlink { path, source },
                    &rel,
                ))?;
                continue;
            }
            T::Char | T::Block => {
                if !opts.privileged {
                    continue;
                }
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let fmt = if kind == T::Char {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                remove_existing(&path, &rel)?;
                mknod(&path, fmt | mode, libc::makedev(major, minor))
                    .map_err(at(|path, source| Error::Device { path, source }, &rel))?;
            }
            T::Fifo => {
                remove_existing(&path, &rel)?;
                mknod(&path, libc::S_IFIFO | mode, 0)
                    .map_err(at(|path, source| Error::Fifo { path, source }, &rel))?;
            }
            _ => continue, // pax/GNU headers are folded in by the tar crate; other types carry nothing
        }

        let is_symlink = kind == T::Symlink;
        if opts.privileged {
            lchown(&path, uid, gid)
                .map_err(at(|path, source| Error::Chown { path, source }, &rel))?;
            for (k, v) in &xattrs {
                set_xattr(&path, k, v).map_err(|source| Error::Xattr {
                    key: k.clone(),
                    path: rel.clone(),
                    source,
                })?;
            }
        }
        if !is_symlink && kind != T::Directory {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(at(chmod, &rel))?;
        }
        if kind != T::Directory {
            set_mtime(&path, mtime).map_err(at(mtime_err, &path))?;
        }
    }
    // Directory modes and mtimes last (a read-only directory still takes its children; creating
    // them changed the mtime), deepest first.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0.as_os_str().len()));
    for (rel, mode, mtime) in dirs {
        // Walked again component by component: a later entry may have replaced the directory, or
        // one of its parents, by a file or by a symlink pointing anywhere.
        let Ok(d) = existing_dir(dest, &rel) else {
            continue;
        };
        fs::set_permissions(&d, fs::Permissions::from_mode(mode)).map_err(at(chmod, &rel))?;
        set_mtime(&d, mtime).map_err(at(mtime_err, &d))?;
    }
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(Error::ReadTar)?;
    Ok(stats)
}

fn create(path: PathBuf, source: io::Error) -> Error {
    Error::Create { path, source }
}

fn chmod(path: PathBuf, source: io::Error) -> Error {
    Error::Chmod { path, source }
}

fn mtime_err(path: PathBuf, source: io::Error) -> Error {
    Error::Mtime { path, source }
}

/// Normalizes a tar path: relative, no `.`; `..` is an error. `None` for the root itself.
pub fn clean(raw: &[u8]) -> Result<Option<PathBuf>> {
    if raw.contains(&0) {
        return Err(Error::NulInName);
    }
    let mut out = PathBuf::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(Error::Escapes(String::from_utf8_lossy(raw).into_owned())),
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Makes every component of `rel` under `root` a real directory (creating missing ones, 0755),
/// refusing symlinks and non-directories. Returns the absolute path.
fn ensure_dirs(root: &Path, rel: &Path) -> Result<PathBuf> {
    let mut cur = root.to_path_buf();
    for comp in rel.components() {
        cur.push(comp);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::ThroughSymlink(rel.to_path_buf()))
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::NotADirectory(rel.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(at(create, rel))?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                    .map_err(at(create, rel))?;
            }
            Err(e) => return Err(create(rel.to_path_buf(), e)),
        }
    }
    Ok(cur)
}

/// Like [`ensure_dirs`] but creates nothing: `rel` must already be real directories.
fn existing_dir(root: &Path, rel: &Path) -> Result<PathBuf> {
    let mut cur = root.to_path_buf();
    for comp in rel.components() {
        cur.push(comp);
        let m = fs::symlink_metadata(&cur).map_err(at(
            |path, source| Error::HardlinkTargetDir { path, source },
            rel,
        ))?;
        if !m.is_dir() || m.file_type().is_symlink() {
            return Err(Error::HardlinkThroughSymlink(rel.to_path_buf()));
        }
    }
    Ok(cur)
}

/// Copies a regular file without following symlinks at either end, keeping mode, owner and mtime.
fn copy_file(src: &Path, dst: &Path, meta: &fs::Metadata, privileged: bool) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut from = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(src)?;
    let mut to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dst)?;
    io::copy(&mut from, &mut to)?;
    if privileged {
        lchown(dst, meta.uid(), meta.gid())?;
    }
    fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    set_mtime(dst, meta.mtime())
}

/// Removes whatever is at `path` (`rel` in the layer) so an entry can take its place.
fn remove_existing(path: &Path, rel: &Path) -> Result<()> {
    let replace = |path, source| Error::Replace { path, source };
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(at(replace, rel))?,
        Ok(_) => fs::remove_file(path).map_err(at(replace, rel))?,
        Err(_) => {}
    }
    Ok(())
}

fn write_marker(path: &Path, rel: &Path) -> Result<()> {
    remove_existing(path, rel)?;
    fs::write(path, b"").map_err(at(create, rel))?;
    Ok(())
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("path contains NUL"))
}

fn mknod(path: &Path, mode: libc::mode_t, dev: libc::dev_t) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    if unsafe { libc::mknod(c.as_ptr(), mode, dev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

fn set_xattr(path: &Path, key: &str, value: &[u8]) -> io::Result<()> {
    let c = cpath(path)?;
    let k = CString::new(key).map_err(|_| io::Error::other("xattr name contains NUL"))?;
    // SAFETY: both strings are NUL-terminated and live across the call; value is a valid slice.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            k.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_mtime(path: &Path, mtime: i64) -> io::Result<()> {
    let c = cpath(path)?;
    let ts = [
        libc::timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        },
    ];
    // SAFETY: c is NUL-terminated, ts points at two timespecs, as utimensat requires.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The xattrs a layer may carry and we are willing to set: `user.*` and `security.capability`.
/// `trusted.*` (overlayfs metadata among them) is never taken from a tar.
fn read_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions().map_err(Error::PaxHeaders)? {
        for ext in exts {
            let ext = ext.map_err(Error::PaxHeaders)?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                if name.starts_with("user.") || name == "security.capability" {
                    out.push((name.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(clean(b"./a/b/").ok().flatten(), Some(PathBuf::from("a/b")));
        assert_eq!(
            clean(b"/etc/passwd").ok().flatten(),
            Some(PathBuf::from("etc/passwd"))
        );
        assert_eq!(clean(b"./").ok().flatten(), None);
        assert!(clean(b"a/../../x").is_err());
        assert!(clean(b"..").is_err());
        assert!(clean(b"a\0b").is_err());
    }

    fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().expect("tar")
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    fn unpack_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<UnpackStats>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = unpack(
            bytes,
            dir.path(),
            UnpackOptions {
                privileged: false,
                lowers: &[],
            },
        );
        (dir, r)
    }

    /// Writes raw names (the tar crate's own setters refuse `..`, which is the point here).
    fn raw_name(h: &mut tar::Header, name: &[u8]) {
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name);
        h.set_cksum();
    }

    #[test]
    fn rejects_dotdot() {
        let t = tar_with(|b| {
            let mut h = header(tar::EntryType::Regular, 1);
            raw_name(&mut h, b"../escape");
            b.append(&h, &b"x"[..]).expect("append");
        });
        let (_d, r) = unpack_bytes(&t);
        assert!(r.is_err());
    }

    #[test]
    fn rejects_write_through_symlink() {
        let outside = tempfile::tempdir().expect("tempdir");
        let t = tar_with(|b| {
            let mut h = header(tar::EntryType::Symlink, 0);
            h.set_link_name(outside.path()).expect("link");
            b.append_data(&mut h, "evil", io::empty()).expect("append");
            let mut h = header(tar::EntryType::Regular, 1);
            b.append_data(&mut h, "evil/pwned", &b"x"[..])
                .expect("append");
        });
        let (_d, r) = unpack_bytes(&t);
        assert!(r.is_err());
        assert!(!outside.path().join("pwned").exists());
    }

    #[test]
    fn rejects_hardlink_out_of_layer() {
        let t = tar_with(|b| {
            let mut h = header(tar::EntryType::Link, 0);
            h.set_link_name("etc/shadow").expect("link");
            b.append_data(&mut h, "stolen", io::empty())
                .expect("append");
        });
        let (_d, r) = unpack_bytes(&t);
        assert!(r.is_err());
    }

    #[test]
    fn absolute_paths_are_confined() {
        let t = tar_with(|b| {
            let mut h = header(tar::EntryType::Regular, 2);
            raw_name(&mut h, b"/tmp/rvmm-unpack-abs-test");
            b.append(&h, &b"hi"[..]).expect("append");
        });
        let (d, r) = unpack_bytes(&t);
        r.expect("unpack");
        assert_eq!(
            fs::read(d.path().join("tmp/rvmm-unpack-abs-test")).ok(),
            Some(b"hi".to_vec())
        );
    }

    #[test]
    fn files_links_and_modes() {
        let t = tar_with(|b| {
            let mut h = header(tar::EntryType::Directory, 0);
            h.set_mode(0o750);
            b.append_data(&mut h, "bin/", io::empty()).expect("append");
            let mut h = header(tar::EntryType::Regular, 3);
            h.set_mode(0o755);
            h.set_mtime(1_000_000);
            b.append_data(&mut h, "bin/sh", &b"elf"[..])
                .expect("append");
            let mut h = header(tar::EntryType::Link, 0);
            h.set_link_name("bin/sh").expect("link");
            b.append_data(&mut h, "bin/ash", io::empty())
                .expect("append");
            let mut h = header(tar::EntryType::Symlink, 0);
            h.set_link_name("/bin/sh").expect("link");
            b.append_data(&mut h, "bin/bash", io::empty())
                .expect("append");
        });
        let (d, r) = unpack_bytes(&t);
        let stats = r.expect("unpack");
        assert_eq!(stats.entries, 4);
        let p = d.path();
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(p.join("bin/sh")).expect("sh");
        assert_eq!(m.mode() & 0o7777, 0o755);
        assert_eq!(m.mtime(), 1_000_000);
        assert_eq!(m.nlink(), 2);
        assert_eq!(
            fs::metadata(p.join("bin")).expect("bin").mode() & 0o7777,
            0o750
        );
        assert_eq!(
            fs::read_link(p.join("bin/bash")).expect("link"),
            PathBuf::from("/bin/sh")
        );
    }
}
