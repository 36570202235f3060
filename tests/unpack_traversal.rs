//! A corpus of hostile layer tars for `image::unpack::unpack`.
//!
//! Every case is unpacked into `ROOT/a/b/dest` next to a canary file, a lower layer and an
//! `outside` directory (the target of the symlinks that point out), unprivileged with the lower
//! layer, and with `UnpackOptions::for_current_user()` (privileged when the tests run as root).
//! Whatever `unpack` returns, nothing outside `dest` may be created, removed or changed (content,
//! links, modes, owners, mtimes). Where unpack.rs documents the behaviour (a `..` component is
//! rejected, a leading `/` is dropped, nothing is written through a symlink, a hardlink must name an
//! earlier entry of the layer or a lower-layer file, whiteout markers), the outcome is asserted too.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rvmm::image::unpack::{unpack, UnpackOptions};
use tar::EntryType as T;

const CANARY: &[u8] = b"canary: must not change\n";
const LOWER: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n";

/// One entry, with raw (unchecked) name and link name: the tar crate's setters refuse `..`.
struct E {
    kind: T,
    name: Vec<u8>,
    link: Vec<u8>,
    data: Vec<u8>,
    mode: u32,
    mtime: u64,
    /// PAX records emitted in an `x` header before the entry.
    pax: Vec<(&'static str, Vec<u8>)>,
}

fn entry(kind: T, name: impl AsRef<[u8]>) -> E {
    E {
        kind,
        name: name.as_ref().to_vec(),
        link: Vec::new(),
        data: Vec::new(),
        mode: if kind == T::Directory { 0o755 } else { 0o644 },
        mtime: 1_000_000,
        pax: Vec::new(),
    }
}

fn file(name: impl AsRef<[u8]>, data: &[u8]) -> E {
    E {
        data: data.to_vec(),
        ..entry(T::Regular, name)
    }
}

fn dir(name: impl AsRef<[u8]>) -> E {
    entry(T::Directory, name)
}

fn symlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
    E {
        link: target.as_ref().to_vec(),
        ..entry(T::Symlink, name)
    }
}

fn hardlink(name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> E {
    E {
        link: target.as_ref().to_vec(),
        ..entry(T::Link, name)
    }
}

/// A GNU long-name (`L`), long-link (`K`) or PAX (`x`) extension header carrying `data`.
fn extension(b: &mut tar::Builder<Vec<u8>>, kind: u8, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(T::new(kind));
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).expect("append extension");
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    // "LEN key=value\n" where LEN counts itself.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

fn build(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        if !e.pax.is_empty() {
            let recs: Vec<u8> = e.pax.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
            extension(&mut b, b'x', &recs);
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_mtime(e.mtime);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(e.data.len() as u64);
        let old = h.as_old_mut();
        if e.name.len() <= old.name.len() {
            old.name[..e.name.len()].copy_from_slice(&e.name);
        } else {
            old.name.copy_from_slice(&e.name[..100]);
        }
        if e.link.len() <= old.linkname.len() {
            old.linkname[..e.link.len()].copy_from_slice(&e.link);
        } else {
            old.linkname.copy_from_slice(&e.link[..100]);
        }
        h.set_cksum();
        if e.name.len() > 100 {
            let mut d = e.name.clone();
            d.push(0);
            extension(&mut b, b'L', &d);
        }
        if e.link.len() > 100 {
            let mut d = e.link.clone();
            d.push(0);
            extension(&mut b, b'K', &d);
        }
        b.append(&h, &e.data[..]).expect("append");
    }
    b.into_inner().expect("finish tar")
}

/// The directories around `dest` for one unpack.
struct Site {
    root: tempfile::TempDir,
    /// ROOT/a/b
    work: PathBuf,
    dest: PathBuf,
    canary: PathBuf,
    lower: PathBuf,
    outside: PathBuf,
}

/// What must not change outside `dest`.
#[derive(Debug, PartialEq)]
struct Snap {
    path: PathBuf,
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    mtime: (i64, i64),
    content: Option<Vec<u8>>,
    children: Option<Vec<String>>,
}

impl Site {
    fn new() -> Site {
        let root = tempfile::tempdir().expect("tempdir");
        let work = root.path().join("a/b");
        let s = Site {
            dest: work.join("dest"),
            canary: work.join("canary"),
            lower: work.join("lower"),
            outside: work.join("outside"),
            work,
            root,
        };
        fs::create_dir_all(&s.dest).expect("mkdir dest");
        fs::create_dir_all(s.lower.join("etc")).expect("mkdir lower");
        fs::create_dir_all(s.outside.join("sub")).expect("mkdir outside");
        fs::write(&s.canary, CANARY).expect("canary");
        fs::write(s.lower.join("etc/passwd"), LOWER).expect("lower file");
        fs::set_permissions(s.outside.join("sub"), fs::Permissions::from_mode(0o750))
            .expect("chmod");
        fs::set_permissions(&s.canary, fs::Permissions::from_mode(0o640)).expect("chmod");
        s
    }

    /// Everything outside `dest` (ROOT and below, `dest` itself excluded), not following symlinks.
    fn snapshot(&self) -> Vec<Snap> {
        let mut out = Vec::new();
        snap_tree(self.root.path(), &self.dest, &mut out);
        out
    }
}

fn snap_tree(p: &Path, skip: &Path, out: &mut Vec<Snap>) {
    let m = fs::symlink_metadata(p).expect("lstat");
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    };
    let mut children = None;
    if ft.is_dir() {
        let mut names: Vec<String> = fs::read_dir(p)
            .expect("read_dir")
            .map(|e| {
                e.expect("dirent")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        children = Some(names);
    }
    out.push(Snap {
        path: p.to_path_buf(),
        kind,
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        nlink: m.nlink(),
        // A directory's mtime changes when its children do; the children list covers that, so
        // ROOT/a/b (the parent of dest) is compared by mtime too: unpack never touches it.
        mtime: (m.mtime(), m.mtime_nsec()),
        content: ft.is_file().then(|| fs::read(p).expect("read")),
        children: children.clone(),
    });
    for c in children.unwrap_or_default() {
        let cp = p.join(c);
        if cp != skip {
            snap_tree(&cp, skip, out);
        }
    }
}

fn lgetxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path");
    let k = std::ffi::CString::new(name).expect("name");
    let mut buf = [0u8; 64];
    // SAFETY: both strings are NUL-terminated; buf is valid for its length.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `privileged: false`, the lower layer below.
    UnprivilegedWithLower,
    /// `UnpackOptions::for_current_user()`: no lower layer.
    CurrentUser,
}

/// What a case expects, beyond "nothing outside dest changed".
enum Want {
    /// `unpack` fails.
    Reject,
    /// `unpack` succeeds, and then this holds of (site, mode).
    Accept(fn(&Site, Mode)),
    /// Either outcome (behaviour not documented); only confinement is checked.
    Confined,
}

struct Case {
    name: &'static str,
    entries: fn(&Site) -> Vec<E>,
    want: fn(Mode) -> Want,
}

fn run_case(case: &Case, mode: Mode) -> Result<(), String> {
    let site = Site::new();
    let tar = build(&(case.entries)(&site));
    let before = site.snapshot();
    let lowers = [site.lower.clone()];
    let opts = match mode {
        Mode::UnprivilegedWithLower => UnpackOptions {
            privileged: false,
            lowers: &lowers,
        },
        Mode::CurrentUser => UnpackOptions::for_current_user(),
    };
    let result = std::panic::catch_unwind(|| unpack(&tar[..], &site.dest, opts))
        .map_err(|_| format!("{} ({mode:?}): unpack panicked", case.name))?;
    let after = site.snapshot();
    if before != after {
        let diff: Vec<String> = before
            .iter()
            .zip(after.iter())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("  before {a:?}\n  after  {b:?}"))
            .chain(
                (before.len() != after.len())
                    .then(|| format!("  {} entries before, {} after", before.len(), after.len())),
            )
            .collect();
        return Err(format!(
            "{} ({mode:?}): something outside dest changed (unpack returned {:?}):\n{}",
            case.name,
            result.as_ref().map(|_| ()),
            diff.join("\n")
        ));
    }
    if !fs::symlink_metadata(&site.dest).is_ok_and(|m| m.is_dir()) {
        return Err(format!(
            "{} ({mode:?}): dest is no longer a directory",
            case.name
        ));
    }
    match ((case.want)(mode), result) {
        (Want::Reject, Err(_)) | (Want::Confined, _) => Ok(()),
        (Want::Reject, Ok(_)) => Err(format!("{} ({mode:?}): accepted, should fail", case.name)),
        (Want::Accept(_), Err(e)) => Err(format!(
            "{} ({mode:?}): failed, should succeed: {e:#}",
            case.name
        )),
        (Want::Accept(check), Ok(_)) => {
            std::panic::catch_unwind(|| check(&site, mode)).map_err(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                format!("{} ({mode:?}): {msg}", case.name)
            })
        }
    }
}

fn run_all(cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        for mode in [Mode::UnprivilegedWithLower, Mode::CurrentUser] {
            if let Err(e) = run_case(case, mode) {
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn reject(_: Mode) -> Want {
    Want::Reject
}

fn confined(_: Mode) -> Want {
    Want::Confined
}

fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn abs(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

/// Names, link targets and `..`.
fn path_cases() -> Vec<Case> {
    vec![
        Case {
            name: "../x",
            entries: |_| vec![file("../x", b"x")],
            want: reject,
        },
        Case {
            name: "./../x",
            entries: |_| vec![file("./../x", b"x")],
            want: reject,
        },
        Case {
            name: "a/../../x",
            entries: |_| vec![dir("a/"), file("a/../../x", b"x")],
            want: reject,
        },
        Case {
            name: "a/../b (.. that stays inside is still rejected)",
            entries: |_| vec![dir("a/"), file("a/../b", b"x")],
            want: reject,
        },
        Case {
            name: "directory a/..",
            entries: |_| vec![dir("a/"), dir("a/../")],
            want: reject,
        },
        Case {
            name: "fifo ../p",
            entries: |_| vec![entry(T::Fifo, "../p")],
            want: reject,
        },
        Case {
            name: "/abs/x is confined",
            entries: |_| vec![file("/abs/x", b"abs")],
            want: |_| {
                Want::Accept(|s, _| {
                    assert_eq!(fs::read(s.dest.join("abs/x")).ok(), Some(b"abs".to_vec()));
                })
            },
        },
        Case {
            name: "absolute path to the canary is confined",
            entries: |s| vec![file(abs(&s.canary), b"pwned")],
            want: |_| {
                Want::Accept(|s, _| {
                    let rel = s.canary.strip_prefix("/").expect("absolute");
                    assert_eq!(fs::read(s.dest.join(rel)).ok(), Some(b"pwned".to_vec()));
                })
            },
        },
        Case {
            name: "//..//x",
            entries: |_| vec![file("//..//x", b"x")],
            want: reject,
        },
        Case {
            name: "root entries (./ and /) are skipped, even as symlinks",
            entries: |_| {
                vec![
                    symlink("./", "/etc"),
                    symlink("/", "../outside"),
                    dir("./"),
                    file("x", b"x"),
                ]
            },
            want: |_| {
                Want::Accept(|s, _| {
                    assert!(lstat(&s.dest).is_dir());
                    assert!(lstat(&s.dest.join("x")).is_file());
                })
            },
        },
        Case {
            name: "PAX path ../pax overriding a harmless name",
            entries: |_| {
                vec![E {
                    pax: vec![("path", b"../pax".to_vec())],
                    ..file("harmless", b"x")
                }]
            },
            want: reject,
        },
        Case {
            name: "PAX path with a NUL",
            entries: |_| {
                vec![E {
                    pax: vec![("path", b"x\0/../../y".to_vec())],
                    ..file("harmless", b"x")
                }]
            },
            want: reject,
        },
        Case {
            name: "PAX linkpath ../../etc/passwd on a hardlink",
            entries: |_| {
                vec![
                    file("harmless", b"x"),
                    E {
                        pax: vec![("linkpath", b"../../etc/passwd".to_vec())],
                        ..hardlink("h", "harmless")
                    },
                ]
            },
            // Should be rejected; see `link_targets_from_tar_extensions_are_used` for why it is
            // only checked for confinement here.
            want: confined,
        },
        Case {
            name: "file under a file",
            entries: |_| vec![file("f", b"f"), file("f/x", b"x")],
            want: reject,
        },
        Case {
            name: "file under a fifo",
            entries: |_| vec![entry(T::Fifo, "p"), file("p/x", b"x")],
            want: reject,
        },
        Case {
            name: "directory replacing a file",
            entries: |_| vec![file("f", b"f"), dir("f/"), file("f/x", b"x")],
            want: confined,
        },
    ]
}

/// Long names (GNU long-name and long-link extensions).
fn long_name_cases() -> Vec<Case> {
    vec![
        Case {
            name: "long but valid name (250-byte components)",
            entries: |_| {
                let a = "a".repeat(250);
                vec![file(format!("{a}/{a}/f"), b"x")]
            },
            want: |_| {
                Want::Accept(|s, _| {
                    let a = "a".repeat(250);
                    assert!(lstat(&s.dest.join(format!("{a}/{a}/f"))).is_file());
                })
            },
        },
        Case {
            name: "component longer than NAME_MAX",
            entries: |_| vec![file("b".repeat(300), b"x")],
            want: reject,
        },
        Case {
            name: "path longer than PATH_MAX",
            entries: |_| {
                let c = "c".repeat(200);
                vec![file(format!("{}x", format!("{c}/").repeat(25)), b"x")]
            },
            want: reject,
        },
        Case {
            name: "long name hiding .. at the end",
            entries: |_| {
                let a = "a".repeat(150);
                vec![dir(format!("{a}/")), file(format!("{a}/../../../x"), b"x")]
            },
            want: reject,
        },
        Case {
            name: "long link name hiding ..",
            entries: |_| {
                let a = "a".repeat(150);
                vec![
                    dir(format!("{a}/")),
                    file("t", b"t"),
                    hardlink("h", format!("{a}/../../../canary")),
                ]
            },
            want: reject,
        },
        Case {
            name: "long symlink target out of the layer, then a file through it",
            entries: |_| {
                let up = "../".repeat(60);
                vec![symlink("l", format!("{up}tmp")), file("l/x", b"x")]
            },
            want: reject,
        },
    ]
}

/// Symlinks: never written through.
fn symlink_cases() -> Vec<Case> {
    vec![
        Case {
            name: "l -> /abs/outside, then l/x",
            entries: |s| vec![symlink("l", abs(&s.outside)), file("l/x", b"x")],
            want: reject,
        },
        Case {
            name: "l -> ../.., then l/x",
            entries: |_| vec![symlink("l", "../.."), file("l/x", b"x")],
            want: reject,
        },
        Case {
            name: "l -> ../outside, then directory l/sub/ and l/sub/x",
            entries: |_| {
                vec![
                    symlink("l", "../outside"),
                    dir("l/sub/"),
                    file("l/sub/x", b"x"),
                ]
            },
            want: reject,
        },
        Case {
            name: "l -> ../outside, then fifo l/p",
            entries: |_| vec![symlink("l", "../outside"), entry(T::Fifo, "l/p")],
            want: reject,
        },
        Case {
            name: "l -> ../canary, then a regular file l replaces the symlink",
            entries: |_| vec![symlink("l", "../canary"), file("l", b"pwned")],
            want: |_| {
                Want::Accept(|s, _| {
                    assert!(lstat(&s.dest.join("l")).is_file());
                    assert_eq!(fs::read(s.dest.join("l")).expect("read"), b"pwned".to_vec());
                })
            },
        },
        Case {
            name: "l -> ../outside, then directory l/ replaces the symlink",
            entries: |_| vec![symlink("l", "../outside"), dir("l/"), file("l/x", b"x")],
            want: |_| {
                Want::Accept(|s, _| {
                    assert!(lstat(&s.dest.join("l")).is_dir());
                    assert!(lstat(&s.dest.join("l/x")).is_file());
                })
            },
        },
        Case {
            name: "symlink chain a -> b -> c -> ../outside, then a/x",
            entries: |_| {
                vec![
                    symlink("c", "../outside"),
                    symlink("b", "c"),
                    symlink("a", "b"),
                    file("a/x", b"x"),
                ]
            },
            want: reject,
        },
        Case {
            name:
                "symlink chain pointing inside (d1 -> d2/, a real dir) is still not written through",
            entries: |_| vec![dir("d2/"), symlink("d1", "d2"), file("d1/x", b"x")],
            want: reject,
        },
        Case {
            name: "dir d/, symlink d/l -> ../../outside, then d/l/x",
            entries: |_| {
                vec![
                    dir("d/"),
                    symlink("d/l", "../../outside"),
                    file("d/l/x", b"x"),
                ]
            },
            want: reject,
        },
        Case {
            name: "symlink with mode and mtime pointing at the canary (metadata not followed)",
            entries: |_| {
                vec![E {
                    mode: 0o777,
                    mtime: 42,
                    ..symlink("l", "../canary")
                }]
            },
            want: |_| {
                Want::Accept(|s, _| {
                    assert!(lstat(&s.dest.join("l")).file_type().is_symlink());
                })
            },
        },
    ]
}

/// Hardlinks: to an earlier non-directory entry of the layer, or (copied) a lower-layer file.
fn hardlink_cases() -> Vec<Case> {
    vec![
        Case {
            name: "hardlink to ../../etc/passwd",
            entries: |_| vec![hardlink("h", "../../etc/passwd")],
            want: reject,
        },
        Case {
            name: "hardlink to ../canary",
            entries: |_| vec![hardlink("h", "../canary")],
            want: reject,
        },
        Case {
            name: "hardlink to the canary's absolute path",
            entries: |s| vec![hardlink("h", abs(&s.canary))],
            want: reject,
        },
        Case {
            name: "hardlink to the lower layer's absolute path",
            entries: |s| vec![hardlink("h", abs(&s.lower.join("etc/passwd")))],
            want: reject,
        },
        Case {
            name: "hardlink to /etc/passwd: a lower-layer file is copied, else rejected",
            entries: |_| vec![hardlink("h", "/etc/passwd")],
            want: |mode| match mode {
                Mode::UnprivilegedWithLower => Want::Accept(|s, _| {
                    let m = lstat(&s.dest.join("h"));
                    assert!(m.is_file());
                    assert_eq!(m.nlink(), 1, "a copy, not a link into the lower layer");
                    assert_eq!(fs::read(s.dest.join("h")).expect("read"), LOWER.to_vec());
                }),
                Mode::CurrentUser => Want::Reject,
            },
        },
        Case {
            name: "hardlink to ../lower/etc/passwd",
            entries: |_| vec![hardlink("h", "../lower/etc/passwd")],
            want: reject,
        },
        Case {
            name: "hardlink to a symlink pointing out links the symlink itself",
            entries: |s| vec![symlink("s", abs(&s.canary)), hardlink("h", "s")],
            want: |_| {
                Want::Accept(|s, _| {
                    let m = lstat(&s.dest.join("h"));
                    assert!(m.file_type().is_symlink());
                    assert_eq!(m.nlink(), 2);
                })
            },
        },
        Case {
            name: "hardlink to a symlink pointing out, then a file of the hardlink's name",
            entries: |s| {
                vec![
                    symlink("s", abs(&s.canary)),
                    hardlink("h", "s"),
                    file("h", b"over"),
                ]
            },
            want: |_| {
                Want::Accept(|s, _| {
                    assert!(lstat(&s.dest.join("h")).is_file());
                    assert!(lstat(&s.dest.join("s")).file_type().is_symlink());
                })
            },
        },
        Case {
            name: "hardlink to a symlinked directory pointing out, then a file under it",
            entries: |_| {
                vec![
                    symlink("s", "../outside"),
                    hardlink("h", "s"),
                    file("h/x", b"x"),
                ]
            },
            want: reject,
        },
        Case {
            name: "hardlink through a symlinked directory (s -> .., h -> s/canary)",
            entries: |_| vec![symlink("s", ".."), hardlink("h", "s/canary")],
            want: reject,
        },
        Case {
            name: "hardlink through a symlinked directory into the lower layer",
            entries: |_| vec![symlink("s", "../lower/etc"), hardlink("h", "s/passwd")],
            want: reject,
        },
        Case {
            name: "hardlink to a directory",
            entries: |_| vec![dir("d/"), hardlink("h", "d")],
            want: reject,
        },
        Case {
            name: "hardlink to itself",
            entries: |_| vec![hardlink("h", "h")],
            want: reject,
        },
        Case {
            name: "hardlink to the layer root",
            entries: |_| vec![hardlink("h", "./")],
            want: reject,
        },
        Case {
            name: "hardlink to a later entry",
            entries: |_| vec![hardlink("h", "f"), file("f", b"f")],
            want: reject,
        },
    ]
}

/// Whiteouts.
fn whiteout_cases() -> Vec<Case> {
    vec![
        Case {
            name: "whiteout ../.wh.x",
            entries: |_| vec![file("../.wh.x", b"")],
            want: reject,
        },
        Case {
            name: "whiteout .wh... (hides ..)",
            entries: |_| vec![file(".wh...", b"")],
            want: reject,
        },
        Case {
            name: "whiteout d/.wh.. (hides .)",
            entries: |_| vec![dir("d/"), file("d/.wh..", b"")],
            want: reject,
        },
        Case {
            name: "whiteout .wh. (hides nothing)",
            entries: |_| vec![file(".wh.", b"")],
            want: reject,
        },
        Case {
            name: "whiteout .wh../x (a directory named .wh..)",
            entries: |_| vec![file(".wh../x", b"")],
            want: confined,
        },
        Case {
            name: "whiteout .wh.canary at the top hides dest/canary only",
            entries: |_| vec![file(".wh.canary", b"")],
            want: |_| Want::Accept(|_, _| {}),
        },
        Case {
            name: "whiteout under a symlink pointing out (l -> ../outside, l/.wh.sub)",
            entries: |_| vec![symlink("l", "../outside"), file("l/.wh.sub", b"")],
            want: reject,
        },
        Case {
            name: "opaque whiteout ../.wh..wh..opq",
            entries: |_| vec![file("../.wh..wh..opq", b"")],
            want: reject,
        },
        Case {
            name: "opaque whiteout under a symlink pointing out",
            entries: |_| vec![symlink("l", "../outside"), file("l/.wh..wh..opq", b"")],
            want: reject,
        },
        Case {
            name: "opaque whiteout at the top level marks dest only",
            entries: |_| vec![file(".wh..wh..opq", b"")],
            want: |mode| {
                let privileged = matches!(mode, Mode::CurrentUser) && is_root();
                if privileged {
                    Want::Accept(|s, _| {
                        assert_eq!(
                            lgetxattr(&s.dest, "trusted.overlay.opaque"),
                            Some(b"y".to_vec())
                        );
                        assert_eq!(lgetxattr(&s.work, "trusted.overlay.opaque"), None);
                        assert!(!s.dest.join(".wh..wh..opq").exists());
                    })
                } else {
                    Want::Accept(|s, _| {
                        assert_eq!(lgetxattr(&s.dest, "trusted.overlay.opaque"), None);
                        assert_eq!(
                            fs::read(s.dest.join(".wh..wh..opq")).expect("marker"),
                            b"".to_vec()
                        );
                    })
                }
            },
        },
        Case {
            name: "whiteout .wh.x: a char device 0:0 when privileged, else an empty marker",
            entries: |_| vec![file("x", b"x"), file(".wh.x", b"")],
            want: |mode| {
                if matches!(mode, Mode::CurrentUser) && is_root() {
                    Want::Accept(|s, _| {
                        use std::os::unix::fs::FileTypeExt;
                        let m = lstat(&s.dest.join("x"));
                        assert!(m.file_type().is_char_device());
                        assert_eq!(m.rdev(), 0);
                        assert!(!s.dest.join(".wh.x").exists());
                    })
                } else {
                    Want::Accept(|s, _| {
                        assert!(lstat(&s.dest.join(".wh.x")).is_file());
                        assert!(lstat(&s.dest.join("x")).is_file());
                    })
                }
            },
        },
    ]
}

#[test]
fn hostile_paths() {
    run_all(&path_cases());
}

#[test]
fn hostile_long_names() {
    run_all(&long_name_cases());
}

#[test]
fn hostile_symlinks() {
    run_all(&symlink_cases());
}

#[test]
fn hostile_hardlinks() {
    run_all(&hardlink_cases());
}

#[test]
fn hostile_whiteouts() {
    run_all(&whiteout_cases());
}

/// Directory modes and mtimes are applied after all entries. A directory whose parent was
/// replaced by a symlink in the meantime must not have them applied through that symlink.
#[test]
fn deferred_directory_metadata_is_not_applied_through_a_symlink() {
    run_all(&[
        Case {
            name: "a/, a/sub/ (mode 0777), then a -> ../outside",
            entries: |_| {
                vec![
                    dir("a/"),
                    E {
                        mode: 0o777,
                        mtime: 42,
                        ..dir("a/sub/")
                    },
                    symlink("a", "../outside"),
                ]
            },
            want: confined,
        },
        Case {
            name: "a/, a/sub/ (mode 0777), then a -> /abs/outside",
            entries: |s| {
                vec![
                    dir("a/"),
                    E {
                        mode: 0o777,
                        mtime: 42,
                        ..dir("a/sub/")
                    },
                    symlink("a", abs(&s.outside)),
                ]
            },
            want: confined,
        },
    ]);
}

/// Link targets longer than the 100-byte ustar field come from a GNU long-link (`K`) header or a
/// PAX `linkpath` record, which the tar crate folds into `Entry::link_name_bytes`; the header's own
/// field holds a truncated (or, with PAX, an unrelated) value.
#[test]
fn link_targets_from_tar_extensions_are_used() {
    const LONG: &str = "/usr/lib/x86_64-linux-gnu/some-package-with-a-long-name/versions/1.2.3/lib/libsomething.so.1.2.3.4.5.6";
    run_all(&[
        Case {
            name: "symlink with a 104-byte target (GNU long link)",
            entries: |_| vec![symlink("l", LONG)],
            want: |_| {
                Want::Accept(|s, _| {
                    let t = fs::read_link(s.dest.join("l")).expect("readlink");
                    assert_eq!(t, PathBuf::from(LONG));
                })
            },
        },
        Case {
            name: "hardlink to a long name (GNU long link)",
            entries: |_| {
                let a = "a".repeat(150);
                vec![
                    dir(format!("{a}/")),
                    file(format!("{a}/f"), b"x"),
                    hardlink("h", format!("{a}/f")),
                ]
            },
            want: |_| {
                Want::Accept(|s, _| {
                    assert_eq!(lstat(&s.dest.join("h")).nlink(), 2);
                })
            },
        },
        Case {
            name: "PAX linkpath ../../etc/passwd on a hardlink",
            entries: |_| {
                vec![
                    file("harmless", b"x"),
                    E {
                        pax: vec![("linkpath", b"../../etc/passwd".to_vec())],
                        ..hardlink("h", "harmless")
                    },
                ]
            },
            want: reject,
        },
        Case {
            name: "PAX linkpath on a symlink",
            entries: |_| {
                vec![E {
                    pax: vec![("linkpath", b"/pax/target".to_vec())],
                    ..symlink("l", "ustar-target")
                }]
            },
            want: |_| {
                Want::Accept(|s, _| {
                    let t = fs::read_link(s.dest.join("l")).expect("readlink");
                    assert_eq!(t, PathBuf::from("/pax/target"));
                })
            },
        },
    ]);
}

#[test]
fn snapshot_sees_outside_changes() {
    // The harness itself: changes inside dest are not looked at, changes next to it are.
    let site = Site::new();
    let before = site.snapshot();
    fs::write(site.dest.join("inside"), b"x").expect("write");
    assert_eq!(before, site.snapshot());
    fs::set_permissions(site.outside.join("sub"), fs::Permissions::from_mode(0o777))
        .expect("chmod");
    assert_ne!(before, site.snapshot());
    let site = Site::new();
    let before = site.snapshot();
    fs::write(&site.canary, CANARY).expect("rewrite");
    assert_ne!(before, site.snapshot(), "canary mtime");
}
