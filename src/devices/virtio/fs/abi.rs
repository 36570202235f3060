//! The FUSE wire format as a virtio-fs guest speaks it (linux/fuse.h, protocol 7.x), decoded from
//! untrusted bytes with every length checked. Only what [`super::server`] serves is here.

/// Plain-data wire structs: every bit pattern is a valid value, there is no implicit padding, and
/// the host is little-endian like the guest (x86_64).
///
/// # Safety
/// Implement only for `#[repr(C)]` structs made of integer fields with no padding.
pub unsafe trait Wire: Copy + Default {
    /// Reads one from the front of `b`, if it is long enough.
    fn read(b: &[u8]) -> Option<Self> {
        let n = std::mem::size_of::<Self>();
        if b.len() < n {
            return None;
        }
        // SAFETY: b holds at least size_of::<Self>() bytes and any bit pattern is a valid Self
        // (trait contract); read_unaligned copes with any alignment.
        Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<Self>()) })
    }
    /// Its bytes.
    fn bytes(&self) -> &[u8] {
        // SAFETY: a plain struct without padding (trait contract) viewed as its bytes.
        unsafe {
            std::slice::from_raw_parts(
                (self as *const Self).cast::<u8>(),
                std::mem::size_of::<Self>(),
            )
        }
    }
}

macro_rules! wire {
    ($($(#[$m:meta])* struct $name:ident { $($f:ident: $t:ty),* $(,)? })*) => {$(
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name { $(pub $f: $t),* }
        // SAFETY: repr(C), integer fields only, laid out without padding (checked by the size
        // assertions in the tests).
        unsafe impl Wire for $name {}
    )*};
}

wire! {
    struct InHeader { len: u32, opcode: u32, unique: u64, nodeid: u64, uid: u32, gid: u32, pid: u32, total_extlen: u16, padding: u16 }
    struct OutHeader { len: u32, error: i32, unique: u64 }
    struct InitIn { major: u32, minor: u32, max_readahead: u32, flags: u32 }
    struct InitOut {
        major: u32, minor: u32, max_readahead: u32, flags: u32, max_background: u16,
        congestion_threshold: u16, max_write: u32, time_gran: u32, max_pages: u16,
        map_alignment: u16, flags2: u32, max_stack_depth: u32, unused: [u32; 6],
    }
    struct Attr {
        ino: u64, size: u64, blocks: u64, atime: u64, mtime: u64, ctime: u64, atimensec: u32,
        mtimensec: u32, ctimensec: u32, mode: u32, nlink: u32, uid: u32, gid: u32, rdev: u32,
        blksize: u32, flags: u32,
    }
    struct EntryOut {
        nodeid: u64, generation: u64, entry_valid: u64, attr_valid: u64, entry_valid_nsec: u32,
        attr_valid_nsec: u32, attr: Attr,
    }
    struct AttrOut { attr_valid: u64, attr_valid_nsec: u32, dummy: u32, attr: Attr }
    struct GetattrIn { getattr_flags: u32, dummy: u32, fh: u64 }
    struct SetattrIn {
        valid: u32, padding: u32, fh: u64, size: u64, lock_owner: u64, atime: u64, mtime: u64,
        ctime: u64, atimensec: u32, mtimensec: u32, ctimensec: u32, mode: u32, unused4: u32,
        uid: u32, gid: u32, unused5: u32,
    }
    struct ForgetIn { nlookup: u64 }
    struct BatchForgetIn { count: u32, dummy: u32 }
    struct ForgetOne { nodeid: u64, nlookup: u64 }
    struct MknodIn { mode: u32, rdev: u32, umask: u32, padding: u32 }
    struct MkdirIn { mode: u32, umask: u32 }
    struct RenameIn { newdir: u64 }
    struct Rename2In { newdir: u64, flags: u32, padding: u32 }
    struct LinkIn { oldnodeid: u64 }
    struct OpenIn { flags: u32, open_flags: u32 }
    struct OpenOut { fh: u64, open_flags: u32, backing_id: i32 }
    struct CreateIn { flags: u32, mode: u32, umask: u32, open_flags: u32 }
    struct ReadIn { fh: u64, offset: u64, size: u32, read_flags: u32, lock_owner: u64, flags: u32, padding: u32 }
    struct WriteIn { fh: u64, offset: u64, size: u32, write_flags: u32, lock_owner: u64, flags: u32, padding: u32 }
    struct WriteOut { size: u32, padding: u32 }
    struct ReleaseIn { fh: u64, flags: u32, release_flags: u32, lock_owner: u64 }
    struct FsyncIn { fh: u64, fsync_flags: u32, padding: u32 }
    struct StatfsOut {
        blocks: u64, bfree: u64, bavail: u64, files: u64, ffree: u64, bsize: u32, namelen: u32,
        frsize: u32, padding: u32, spare: [u32; 6],
    }
    struct Dirent { ino: u64, off: u64, namelen: u32, typ: u32 }
}

/// Opcodes (enum fuse_opcode).
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
}

/// The protocol version we speak (the guest's 6.12 kernel speaks 7.41 and accepts 7.31+ here).
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 31;

/// INIT flags.
pub mod init {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// SETATTR `valid` bits.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// The node ID of the share's root.
pub const ROOT_ID: u64 = 1;

/// One request: its header and the bytes after it (bounded by the header's length).
#[derive(Debug)]
pub struct Request<'a> {
    pub header: InHeader,
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    /// Splits `b` (what the guest put in the readable part of a chain) into a request. None when
    /// the header is short or claims more or less than is there.
    pub fn parse(b: &'a [u8]) -> Option<Request<'a>> {
        let header = InHeader::read(b)?;
        let hlen = std::mem::size_of::<InHeader>();
        let len = header.len as usize;
        if len < hlen || len > b.len() {
            return None;
        }
        Some(Request {
            header,
            body: &b[hlen..len],
        })
    }
}

/// Reads the fields of a request body front to back.
pub struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    pub fn new(b: &'a [u8]) -> Body<'a> {
        Body(b)
    }

    /// A fixed struct.
    pub fn take<T: Wire>(&mut self) -> Option<T> {
        let v = T::read(self.0)?;
        self.0 = &self.0[std::mem::size_of::<T>()..];
        Some(v)
    }

    /// A NUL-terminated name (the NUL not included).
    pub fn name(&mut self) -> Option<&'a [u8]> {
        let end = self.0.iter().position(|&c| c == 0)?;
        let name = &self.0[..end];
        self.0 = &self.0[end + 1..];
        Some(name)
    }

    /// What is left.
    pub fn rest(&self) -> &'a [u8] {
        self.0
    }
}

/// Appends one directory entry (name padded to 8 bytes) to `out` if it fits in `limit` bytes.
pub fn push_dirent(out: &mut Vec<u8>, limit: usize, d: Dirent, name: &[u8]) -> bool {
    let len = std::mem::size_of::<Dirent>() + name.len();
    let padded = (len + 7) & !7;
    if out.len() + padded > limit {
        return false;
    }
    out.extend_from_slice(d.bytes());
    out.extend_from_slice(name);
    out.resize(out.len() + (padded - len), 0);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_sizes_match_linux() {
        use std::mem::size_of;
        assert_eq!(size_of::<InHeader>(), 40);
        assert_eq!(size_of::<OutHeader>(), 16);
        assert_eq!(size_of::<InitOut>(), 64);
        assert_eq!(size_of::<Attr>(), 88);
        assert_eq!(size_of::<EntryOut>(), 128);
        assert_eq!(size_of::<AttrOut>(), 104);
        assert_eq!(size_of::<SetattrIn>(), 88);
        assert_eq!(size_of::<OpenOut>(), 16);
        assert_eq!(size_of::<ReadIn>(), 40);
        assert_eq!(size_of::<WriteIn>(), 40);
        assert_eq!(size_of::<ReleaseIn>(), 24);
        assert_eq!(size_of::<StatfsOut>(), 80);
        assert_eq!(size_of::<Dirent>(), 24);
        assert_eq!(size_of::<CreateIn>(), 16);
        assert_eq!(size_of::<Rename2In>(), 16);
    }

    #[test]
    fn requests_are_bounded_by_their_header() {
        let mut b = InHeader {
            len: 45,
            opcode: op::LOOKUP,
            ..Default::default()
        }
        .bytes()
        .to_vec();
        b.extend_from_slice(b"name\0extra");
        let r = Request::parse(&b).expect("request");
        assert_eq!(r.body, b"name\0");
        let mut body = Body::new(r.body);
        assert_eq!(body.name(), Some(&b"name"[..]));
        assert_eq!(body.name(), None);
        for len in [0u32, 39, 51, u32::MAX] {
            b[..4].copy_from_slice(&len.to_le_bytes());
            assert!(Request::parse(&b).is_none(), "{len}");
        }
        assert!(Request::parse(&b[..39]).is_none());
    }
}
