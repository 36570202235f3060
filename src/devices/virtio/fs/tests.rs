//! The server driven with FUSE requests as a guest sends them, on real directories: what it
//! serves, and what a hostile guest cannot make it do.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::abi::{self, op, Wire};
use super::server::{Limits, Server};

/// Sends requests to a server as a guest would.
pub(super) struct Client {
    pub server: Server,
    unique: u64,
    pub uid: u32,
    pub gid: u32,
}

/// A reply: the error (0 or a positive errno) and the payload.
pub(super) type Reply = (i32, Vec<u8>);

impl Client {
    pub fn new(dir: &Path, read_only: bool, limits: Limits) -> Client {
        let mut c = Client {
            server: Server::new(dir, read_only, limits).expect("server"),
            unique: 0,
            uid: 0,
            gid: 0,
        };
        let (e, out) = c.call(
            op::INIT,
            abi::ROOT_ID,
            &[abi::InitIn {
                major: 7,
                minor: 41,
                max_readahead: 1 << 17,
                flags: u32::MAX,
            }
            .bytes()],
        );
        assert_eq!(e, 0);
        let init = abi::InitOut::read(&out).expect("init out");
        assert_eq!((init.major, init.max_write), (7, super::server::MAX_WRITE));
        c
    }

    pub fn call(&mut self, opcode: u32, node: u64, parts: &[&[u8]]) -> Reply {
        self.call_room(opcode, node, parts, 2 << 20)
    }

    pub fn call_room(&mut self, opcode: u32, node: u64, parts: &[&[u8]], room: usize) -> Reply {
        self.unique += 1;
        let body: Vec<u8> = parts.concat();
        let mut req = abi::InHeader {
            len: (40 + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid: node,
            uid: self.uid,
            gid: self.gid,
            ..Default::default()
        }
        .bytes()
        .to_vec();
        req.extend_from_slice(&body);
        let Some(out) = self.server.handle(&req, room) else {
            return (-1, Vec::new());
        };
        let h = abi::OutHeader::read(&out).expect("reply header");
        assert_eq!(h.unique, self.unique);
        assert_eq!(h.len as usize, out.len());
        assert!(out.len() <= room);
        (-h.error, out[16..].to_vec())
    }

    pub fn lookup(&mut self, parent: u64, name: &str) -> Result<abi::EntryOut, i32> {
        let (e, out) = self.call(op::LOOKUP, parent, &[name.as_bytes(), b"\0"]);
        if e != 0 {
            return Err(e);
        }
        Ok(abi::EntryOut::read(&out).expect("entry"))
    }

    pub fn create(&mut self, parent: u64, name: &str, mode: u32) -> Result<(u64, u64), i32> {
        let (e, out) = self.call(
            op::CREATE,
            parent,
            &[
                abi::CreateIn {
                    flags: libc::O_RDWR as u32,
                    mode,
                    ..Default::default()
                }
                .bytes(),
                name.as_bytes(),
                b"\0",
            ],
        );
        if e != 0 {
            return Err(e);
        }
        let entry = abi::EntryOut::read(&out).expect("entry");
        let open = abi::OpenOut::read(&out[128..]).expect("open");
        Ok((entry.nodeid, open.fh))
    }

    pub fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        let (e, out) = self.call(
            op::OPEN,
            node,
            &[abi::OpenIn {
                flags: flags as u32,
                open_flags: 0,
            }
            .bytes()],
        );
        if e != 0 {
            return Err(e);
        }
        Ok(abi::OpenOut::read(&out).expect("open").fh)
    }

    pub fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let (e, out) = self.call(
            op::WRITE,
            1,
            &[
                abi::WriteIn {
                    fh,
                    offset,
                    size: data.len() as u32,
                    ..Default::default()
                }
                .bytes(),
                data,
            ],
        );
        if e != 0 {
            return Err(e);
        }
        Ok(abi::WriteOut::read(&out).expect("write out").size)
    }

    pub fn read(&mut self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let (e, out) = self.call(
            op::READ,
            1,
            &[abi::ReadIn {
                fh,
                offset,
                size,
                ..Default::default()
            }
            .bytes()],
        );
        if e != 0 {
            return Err(e);
        }
        Ok(out)
    }

    pub fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<abi::EntryOut, i32> {
        let (e, out) = self.call(
            op::MKDIR,
            parent,
            &[
                abi::MkdirIn { mode, umask: 0 }.bytes(),
                name.as_bytes(),
                b"\0",
            ],
        );
        if e != 0 {
            return Err(e);
        }
        Ok(abi::EntryOut::read(&out).expect("entry"))
    }

    /// Every name in directory node `node` (READDIR to the end, in small pieces).
    pub fn list(&mut self, node: u64) -> Result<Vec<String>, i32> {
        let (e, out) = self.call(op::OPENDIR, node, &[abi::OpenIn::default().bytes()]);
        if e != 0 {
            return Err(e);
        }
        let fh = abi::OpenOut::read(&out).expect("open").fh;
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let (e, out) = self.call(
                op::READDIR,
                node,
                &[abi::ReadIn {
                    fh,
                    offset,
                    size: 4096,
                    ..Default::default()
                }
                .bytes()],
            );
            assert_eq!(e, 0);
            if out.is_empty() {
                break;
            }
            let mut pos = 0;
            while pos < out.len() {
                let d = abi::Dirent::read(&out[pos..]).expect("dirent");
                let name = &out[pos + 24..pos + 24 + d.namelen as usize];
                names.push(String::from_utf8_lossy(name).into_owned());
                offset = d.off;
                pos += (24 + d.namelen as usize + 7) & !7;
            }
        }
        self.call(
            op::RELEASEDIR,
            node,
            &[abi::ReleaseIn {
                fh,
                ..Default::default()
            }
            .bytes()],
        );
        names.retain(|n| n != "." && n != "..");
        names.sort();
        Ok(names)
    }
}

fn share() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    let share = t.path().join("share");
    std::fs::create_dir(&share).expect("mkdir");
    (t, share)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn serves_files_directories_and_links() {
    let (_t, dir) = share();
    std::fs::write(dir.join("hello"), "from host\n").expect("write");
    let mut c = Client::new(&dir, false, Limits::default());

    let e = c.lookup(1, "hello").expect("lookup");
    assert_eq!(e.attr.size, 10);
    let fh = c.open(e.nodeid, libc::O_RDONLY).expect("open");
    assert_eq!(c.read(fh, 5, 100).expect("read"), b"host\n");

    let (node, fh) = c.create(1, "new", 0o640).expect("create");
    assert_eq!(c.write(fh, 0, b"written by the guest").expect("write"), 20);
    assert_eq!(
        std::fs::read_to_string(dir.join("new")).expect("read"),
        "written by the guest"
    );
    assert_eq!(
        std::fs::metadata(dir.join("new")).expect("meta").mode() & 0o7777,
        0o640
    );
    // A second lookup of the same file is the same node.
    assert_eq!(c.lookup(1, "new").expect("lookup").nodeid, node);

    let d = c.mkdir(1, "sub", 0o750).expect("mkdir");
    assert_eq!(d.attr.mode & 0o7777, 0o750);
    let (e, _) = c.call(op::SYMLINK, d.nodeid, &[b"link\0", b"/etc/passwd\0"]);
    assert_eq!(e, 0);
    assert_eq!(
        std::fs::read_link(dir.join("sub/link")).expect("symlink"),
        Path::new("/etc/passwd")
    );
    let l = c.lookup(d.nodeid, "link").expect("lookup link");
    let (e, target) = c.call(op::READLINK, l.nodeid, &[]);
    assert_eq!((e, target.as_slice()), (0, &b"/etc/passwd"[..]));
    let (e, _) = c.call(
        op::LINK,
        d.nodeid,
        &[abi::LinkIn { oldnodeid: node }.bytes(), b"hard\0"],
    );
    assert_eq!(e, 0);
    assert_eq!(std::fs::metadata(dir.join("new")).expect("meta").nlink(), 2);
    let (e, _) = c.call(
        op::RENAME,
        1,
        &[
            abi::RenameIn { newdir: d.nodeid }.bytes(),
            b"hello\0",
            b"moved\0",
        ],
    );
    assert_eq!(e, 0);
    assert!(dir.join("sub/moved").exists());
    assert_eq!(c.list(d.nodeid).expect("list"), ["hard", "link", "moved"]);
    let (e, _) = c.call(op::UNLINK, d.nodeid, &[b"hard\0"]);
    assert_eq!(e, 0);
    let (e, _) = c.call(op::RMDIR, 1, &[b"sub\0"]);
    assert_eq!(e, libc::ENOTEMPTY);

    // setattr: truncate, mode, times.
    let s = abi::SetattrIn {
        valid: abi::fattr::SIZE | abi::fattr::MODE | abi::fattr::MTIME,
        size: 7,
        mode: 0o600,
        mtime: 1_577_934_245,
        ..Default::default()
    };
    let (e, out) = c.call(op::SETATTR, node, &[s.bytes()]);
    assert_eq!(e, 0);
    let a = abi::AttrOut::read(&out).expect("attr").attr;
    assert_eq!(
        (a.size, a.mode & 0o7777, a.mtime),
        (7, 0o600, 1_577_934_245)
    );
    let m = std::fs::metadata(dir.join("new")).expect("meta");
    assert_eq!((m.len(), m.mtime()), (7, 1_577_934_245));

    let (e, out) = c.call(op::STATFS, 1, &[]);
    assert_eq!(e, 0);
    assert!(abi::StatfsOut::read(&out).expect("statfs").bsize > 0);
}

#[test]
fn new_files_belong_to_the_guest_caller() {
    if !is_root() {
        return;
    }
    let (_t, dir) = share();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let mut c = Client::new(&dir, false, Limits::default());
    c.uid = 1000;
    c.gid = 1001;
    c.create(1, "f", 0o644).expect("create");
    let d = c.mkdir(1, "d", 0o755).expect("mkdir");
    c.call(op::SYMLINK, d.nodeid, &[b"l\0", b"x\0"]);
    c.call(
        op::MKNOD,
        1,
        &[
            abi::MknodIn {
                mode: libc::S_IFIFO | 0o600,
                ..Default::default()
            }
            .bytes(),
            b"fifo\0",
        ],
    );
    for p in ["f", "d", "d/l", "fifo"] {
        let m = std::fs::symlink_metadata(dir.join(p)).expect(p);
        assert_eq!((m.uid(), m.gid()), (1000, 1001), "{p}");
    }
    assert_eq!(
        std::fs::metadata(dir.join("fifo")).expect("fifo").mode() & 0o7777,
        0o600
    );
}

/// Names, symlinks, hardlinks, devices and handles: nothing leads outside the share.
#[test]
fn a_hostile_guest_stays_inside_its_share() {
    let (t, dir) = share();
    let outside = t.path().join("outside");
    std::fs::write(&outside, "secret").expect("write");
    std::os::unix::fs::symlink(&outside, dir.join("abs")).expect("symlink");
    std::os::unix::fs::symlink("../outside", dir.join("rel")).expect("symlink");
    std::os::unix::fs::symlink("..", dir.join("up")).expect("symlink");
    let mut c = Client::new(&dir, false, Limits::default());

    for bad in ["..", ".", "", "up/..", "../outside", "rel/x"] {
        assert_eq!(c.lookup(1, bad).err(), Some(libc::EINVAL), "{bad:?}");
    }
    // Symlinks come back as symlinks; they cannot be opened, listed or walked on the host.
    for l in ["abs", "rel", "up"] {
        let e = c.lookup(1, l).expect(l);
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFLNK, "{l}");
        assert_eq!(
            c.open(e.nodeid, libc::O_RDONLY).err(),
            Some(libc::EACCES),
            "{l}"
        );
        assert_eq!(c.list(e.nodeid).err(), Some(libc::ENOTDIR), "{l}");
        assert!(c.lookup(e.nodeid, "outside").is_err(), "{l}");
        assert!(c.create(e.nodeid, "x", 0o644).is_err(), "{l}");
        let (err, _) = c.call(
            op::LINK,
            1,
            &[
                abi::LinkIn {
                    oldnodeid: e.nodeid,
                }
                .bytes(),
                b"hardlink-to-link\0",
            ],
        );
        if err == 0 {
            // A hard link to the symlink itself (still a symlink, still inside).
            let m = std::fs::symlink_metadata(dir.join("hardlink-to-link")).expect("link");
            assert!(m.file_type().is_symlink());
            std::fs::remove_file(dir.join("hardlink-to-link")).expect("rm");
        }
    }
    // Creating through a symlink name fails rather than writing outside.
    assert!(c.create(1, "abs", 0o644).is_err());
    assert_eq!(
        std::fs::read_to_string(&outside).expect("outside"),
        "secret"
    );
    // Renaming out of the share: names are single components.
    let (e, _) = c.call(
        op::RENAME,
        1,
        &[
            abi::RenameIn { newdir: 1 }.bytes(),
            b"abs\0",
            b"../escaped\0",
        ],
    );
    assert_eq!(e, libc::EINVAL);
    // No device nodes.
    for kind in [libc::S_IFCHR, libc::S_IFBLK] {
        let (e, _) = c.call(
            op::MKNOD,
            1,
            &[
                abi::MknodIn {
                    mode: kind | 0o666,
                    rdev: 0x0103,
                    ..Default::default()
                }
                .bytes(),
                b"dev\0",
            ],
        );
        assert_eq!(e, libc::EPERM);
    }
    // Unknown nodes and handles, forgotten ones, short and lying requests.
    assert_eq!(c.lookup(999, "x").err(), Some(libc::EBADF));
    assert_eq!(c.read(12345, 0, 10).err(), Some(libc::EBADF));
    let (node, fh) = c.create(1, "f", 0o644).expect("create");
    c.call(
        op::RELEASE,
        node,
        &[abi::ReleaseIn {
            fh,
            ..Default::default()
        }
        .bytes()],
    );
    assert_eq!(c.read(fh, 0, 10).err(), Some(libc::EBADF));
    let (e, _) = c.call(
        op::WRITE,
        1,
        &[abi::WriteIn {
            fh,
            size: 1 << 30,
            ..Default::default()
        }
        .bytes()],
    );
    assert_eq!(e, libc::EINVAL);
    c.call(
        op::FORGET,
        node,
        &[abi::ForgetIn { nlookup: u64::MAX }.bytes()],
    );
    assert_eq!(c.lookup(node, "x").err(), Some(libc::EBADF));
    c.call(
        op::FORGET,
        1,
        &[abi::ForgetIn { nlookup: u64::MAX }.bytes()],
    );
    assert!(c.lookup(1, "f").is_ok(), "the root cannot be forgotten");
    // A reply never exceeds the room given; too little room for a header is no reply.
    let f = c.lookup(1, "f").expect("f").nodeid;
    let fh = c.open(f, libc::O_RDWR).expect("open");
    c.write(fh, 0, &[7u8; 5000]).expect("write");
    let (e, data) = c.call_room(
        op::READ,
        1,
        &[abi::ReadIn {
            fh,
            size: 5000,
            ..Default::default()
        }
        .bytes()],
        100,
    );
    assert_eq!((e, data.len()), (0, 84));
    assert_eq!(c.call_room(op::GETATTR, 1, &[], 8).0, -1);
    assert!(c.server.handle(&[1, 2, 3], 4096).is_none());
}

#[test]
fn a_read_only_share_refuses_every_change() {
    let (_t, dir) = share();
    std::fs::write(dir.join("f"), "x").expect("write");
    let mut c = Client::new(&dir, true, Limits::default());
    let f = c.lookup(1, "f").expect("lookup");
    assert_eq!(c.create(1, "new", 0o644).err(), Some(libc::EROFS));
    assert_eq!(c.mkdir(1, "d", 0o755).err(), Some(libc::EROFS));
    for flags in [
        libc::O_WRONLY,
        libc::O_RDWR,
        libc::O_RDONLY | libc::O_TRUNC,
        libc::O_RDONLY | libc::O_APPEND,
    ] {
        assert_eq!(
            c.open(f.nodeid, flags).err(),
            Some(libc::EROFS),
            "{flags:o}"
        );
    }
    let fh = c.open(f.nodeid, libc::O_RDONLY).expect("open");
    assert_eq!(c.write(fh, 0, b"y").err(), Some(libc::EROFS));
    let s = abi::SetattrIn {
        valid: abi::fattr::MODE,
        mode: 0o777,
        ..Default::default()
    };
    assert_eq!(c.call(op::SETATTR, f.nodeid, &[s.bytes()]).0, libc::EROFS);
    assert_eq!(c.call(op::UNLINK, 1, &[b"f\0"]).0, libc::EROFS);
    assert_eq!(std::fs::read_to_string(dir.join("f")).expect("f"), "x");
}

#[test]
fn what_a_guest_can_make_it_hold_is_bounded() {
    let (_t, dir) = share();
    for i in 0..20 {
        std::fs::write(dir.join(format!("f{i}")), "").expect("write");
    }
    let mut c = Client::new(
        &dir,
        false,
        Limits {
            inodes: 8,
            handles: 4,
        },
    );
    let mut refused = 0;
    for i in 0..20 {
        if c.lookup(1, &format!("f{i}")) == Err(libc::ENFILE) {
            refused += 1;
        }
    }
    assert_eq!(refused, 13);
    assert_eq!(c.server.held().0, 8);
    let node = c.lookup(1, "f0").expect("held");
    let mut opened = 0;
    for _ in 0..10 {
        if c.open(node.nodeid, libc::O_RDONLY).is_ok() {
            opened += 1;
        }
    }
    assert_eq!(opened, 4);
    // A new INIT (the guest remounted) lets everything go but the root.
    c.call(
        op::INIT,
        1,
        &[abi::InitIn {
            major: 7,
            minor: 41,
            ..Default::default()
        }
        .bytes()],
    );
    assert_eq!(c.server.held(), (1, 0));
}

#[test]
fn ten_thousand_entries_are_listed_completely() {
    let (_t, dir) = share();
    for i in 0..10_000 {
        std::fs::write(dir.join(format!("f{i:05}")), "").expect("write");
    }
    let mut c = Client::new(&dir, false, Limits::default());
    let names = c.list(1).expect("list");
    assert_eq!(names.len(), 10_000);
    assert_eq!(names[0], "f00000");
    assert_eq!(names[9_999], "f09999");
}

#[test]
fn requests_before_init_and_unknown_ones_are_refused() {
    let (_t, dir) = share();
    let mut s = Server::new(&dir, false, Limits::default()).expect("server");
    let mut req = abi::InHeader {
        len: 40,
        opcode: op::GETATTR,
        unique: 9,
        nodeid: 1,
        ..Default::default()
    }
    .bytes()
    .to_vec();
    let out = s.handle(&req, 4096).expect("reply");
    assert_eq!(abi::OutHeader::read(&out).expect("h").error, -libc::EIO);
    let mut c = Client::new(&dir, false, Limits::default());
    for opcode in [0, 22, 39, 48, 9999] {
        assert_eq!(c.call(opcode, 1, &[]).0, libc::ENOSYS, "{opcode}");
    }
    req[4..8].copy_from_slice(&op::INIT.to_le_bytes());
    let out = s.handle(&req, 4096).expect("reply to a short INIT");
    assert_eq!(abi::OutHeader::read(&out).expect("h").error, -libc::EINVAL);
}

/// The device: requests read from a chain's readable descriptors (split anywhere), replies
/// written to its writable ones; without a server every request gets EIO; the config names the
/// tag.
#[test]
fn the_device_carries_requests_and_replies_through_chains() {
    use super::Fs;
    use crate::devices::virtio::{Mem, VirtioDevice};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    let m = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("mem");
    let (_t, dir) = share();
    std::fs::write(dir.join("hello"), "hi").expect("write");
    let desc =
        |addr: u64, len: u32, flags: u16| RawDescriptor::from(Descriptor::new(addr, len, flags, 0));
    let request = |opcode: u32, unique: u64, body: &[u8]| {
        let mut r = abi::InHeader {
            len: (40 + body.len()) as u32,
            opcode,
            unique,
            nodeid: 1,
            ..Default::default()
        }
        .bytes()
        .to_vec();
        r.extend_from_slice(body);
        r
    };
    let send = |dev: &mut Fs, req: &[u8], split: usize| -> abi::OutHeader {
        m.write_slice(&req[..split], GuestAddress(0x1000))
            .expect("write");
        m.write_slice(&req[split..], GuestAddress(0x3000))
            .expect("write");
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq
            .build_desc_chain(&[
                desc(0x1000, split as u32, 1),
                desc(0x3000, (req.len() - split) as u32, 1),
                desc(0x5000, 4096, 2),
            ])
            .expect("chain");
        let n = dev.handle_chain(chain, &m);
        let mut out = vec![0u8; n as usize];
        m.read_slice(&mut out, GuestAddress(0x5000)).expect("read");
        abi::OutHeader::read(&out).expect("reply")
    };
    let mut dev = Fs::new(Some(
        Server::new(&dir, false, Limits::default()).expect("server"),
    ));
    let init = abi::InitIn {
        major: 7,
        minor: 41,
        ..Default::default()
    };
    let r = send(&mut dev, &request(op::INIT, 1, init.bytes()), 40);
    assert_eq!((r.error, r.unique, r.len), (0, 1, 16 + 64));
    let r = send(&mut dev, &request(op::LOOKUP, 2, b"hello\0"), 13);
    assert_eq!((r.error, r.unique, r.len), (0, 2, 16 + 128));
    let r = send(&mut dev, &request(op::LOOKUP, 3, b"nope\0"), 40);
    assert_eq!((r.error, r.unique), (-libc::ENOENT, 3));
    let mut bare = Fs::new(None);
    let r = send(&mut bare, &request(op::INIT, 4, init.bytes()), 40);
    assert_eq!((r.error, r.unique), (-libc::EIO, 4));
    let mut cfg = [0u8; 40];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..5], b"rvmm\0");
    assert_eq!(cfg[36], 1);
    assert_eq!(dev.device_type(), super::TYPE_FS);
}

/// READDIRPLUS: every name with its node and attributes (a lookup each, "." and ".." none).
#[test]
fn readdirplus_gives_nodes_with_the_names() {
    let (_t, dir) = share();
    for n in ["a", "b"] {
        std::fs::write(dir.join(n), n).expect("write");
    }
    let mut c = Client::new(&dir, false, Limits::default());
    let (e, out) = c.call(op::OPENDIR, 1, &[abi::OpenIn::default().bytes()]);
    assert_eq!(e, 0);
    let fh = abi::OpenOut::read(&out).expect("open").fh;
    let (e, out) = c.call(
        op::READDIRPLUS,
        1,
        &[abi::ReadIn {
            fh,
            size: 4096,
            ..Default::default()
        }
        .bytes()],
    );
    assert_eq!(e, 0);
    let mut pos = 0;
    let mut seen = Vec::new();
    while pos < out.len() {
        let entry = abi::EntryOut::read(&out[pos..]).expect("entry");
        let d = abi::Dirent::read(&out[pos + 128..]).expect("dirent");
        let name = String::from_utf8_lossy(&out[pos + 152..pos + 152 + d.namelen as usize]);
        seen.push((name.to_string(), entry.nodeid != 0, entry.attr.size));
        pos += (152 + d.namelen as usize + 7) & !7;
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            (".".to_string(), false, 0),
            ("..".to_string(), false, 0),
            ("a".to_string(), true, 1),
            ("b".to_string(), true, 1)
        ]
    );
    assert_eq!(c.server.held().0, 3);
    // Too little room for one entry with its attributes: none, and no lookup counted.
    let (e, out) = c.call(
        op::READDIRPLUS,
        1,
        &[abi::ReadIn {
            fh,
            size: 100,
            ..Default::default()
        }
        .bytes()],
    );
    assert_eq!((e, out.len()), (0, 0));
    assert_eq!(c.server.held().0, 3);
}
