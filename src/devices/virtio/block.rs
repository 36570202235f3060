//! virtio-blk on a raw image file: read, write, flush, get-id, and a read-only mode.
//!
//! Every request is checked before it touches the file: the chain must lie in guest RAM
//! (virtio-queue's Reader/Writer), the sector range must lie inside the disk, and writes to a
//! read-only disk fail with VIRTIO_BLK_S_IOERR. A malformed chain is returned to the guest with
//! a zero length; a chain without room for the status byte is returned the same way.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_queue::{DescriptorChain, Queue, Reader, Writer};

use super::{Mem, VirtioDevice, F_EVENT_IDX, TYPE_BLOCK};

pub const SECTOR_SIZE: u64 = 512;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// `seg_max` in the config space is valid. Without it Linux puts one segment in a request, so a
/// 128 KiB readahead into scattered pages becomes 32 requests, each one a trip through the guest's
/// block layer and the virtqueue (on kvm_pvm, where the guest kernel is emulated, that was ~20% of a
/// warm start's guest time).
pub const F_SEG_MAX: u64 = 1 << 2;
/// Data segments per request: the ring minus the header and status descriptors (we offer no
/// indirect descriptors, so a request's descriptors all sit in the ring), as QEMU does.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Bytes copied per file access.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {0} is not a regular file or block device")]
    NotAFile(PathBuf),
}

/// Request counters (for tests and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub errors: u64,
    pub bad_chains: u64,
}

/// Opens a disk image file or block device (read-write unless `read_only`) and finds its size
/// in bytes.
pub fn open_backing(path: &Path, read_only: bool) -> Result<(File, u64), Error> {
    let err = |source| Error::Open {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    let size = if meta.is_file() {
        meta.len()
    } else {
        use std::io::Seek;
        if meta.is_dir() {
            return Err(Error::NotAFile(path.to_owned()));
        }
        (&file).seek(std::io::SeekFrom::End(0)).map_err(err)?
    };
    Ok((file, size))
}

pub struct Block {
    file: File,
    read_only: bool,
    /// Usable size in bytes (whole sectors).
    size: u64,
    id: [u8; ID_BYTES],
    queue_sizes: [u16; 1],
    buf: Vec<u8>,
    pub stats: BlockStats,
}

impl Block {
    /// Opens a raw disk image. `id` is what GET_ID answers (truncated to 20 bytes).
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Self, Error> {
        let (file, size) = open_backing(path, read_only)?;
        Ok(Self::from_file(file, size, read_only, id))
    }

    /// Wraps an already open file of `size` bytes.
    pub fn from_file(file: File, size: u64, read_only: bool, id: &str) -> Self {
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Self {
            file,
            read_only,
            size: size / SECTOR_SIZE * SECTOR_SIZE,
            id: idb,
            queue_sizes: [QUEUE_SIZE],
            buf: Vec::new(),
            stats: BlockStats::default(),
        }
    }

    /// Makes the disk read-only (or not) for the driver; a disk opened read-only stays so for
    /// writes whatever this says, since its file cannot be written.
    pub fn set_read_only(&mut self, read_only: bool) {
        self.read_only = read_only;
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Checks that `len` bytes at `sector` lie inside the disk; returns the byte offset.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let off = sector.checked_mul(SECTOR_SIZE)?;
        let end = off.checked_add(len as u64)?;
        (end <= self.size).then_some(off)
    }

    fn read_to_guest(&mut self, mut off: u64, w: &mut Writer<'_>) -> std::io::Result<()> {
        let mut left = w.available_bytes();
        self.buf.resize(CHUNK.min(left.max(1)), 0);
        while left > 0 {
            let n = left.min(self.buf.len());
            self.file.read_exact_at(&mut self.buf[..n], off)?;
            w.write_all(&self.buf[..n])?;
            left -= n;
            off += n as u64;
        }
        Ok(())
    }

    fn write_from_guest(&mut self, mut off: u64, r: &mut Reader<'_>) -> std::io::Result<()> {
        let mut left = r.available_bytes();
        self.buf.resize(CHUNK.min(left.max(1)), 0);
        while left > 0 {
            let n = left.min(self.buf.len());
            r.read_exact(&mut self.buf[..n])?;
            self.file.write_all_at(&self.buf[..n], off)?;
            left -= n;
            off += n as u64;
        }
        Ok(())
    }

    /// Handles one request; returns the number of bytes written into the guest's buffers.
    pub fn handle_chain(&mut self, chain: DescriptorChain<&Mem>, mem: &Mem) -> u32 {
        let (mut reader, mut writer) =
            match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
                (Ok(r), Ok(w)) => (r, w),
                _ => {
                    self.stats.bad_chains += 1;
                    return 0;
                }
            };
        let mut hdr = [0u8; 16];
        let avail = writer.available_bytes();
        if avail == 0 || reader.read_exact(&mut hdr).is_err() {
            self.stats.bad_chains += 1;
            return 0;
        }
        let Ok(mut status_w) = writer.split_at(avail - 1) else {
            self.stats.bad_chains += 1;
            return 0;
        };
        let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);

        let status = match rtype {
            T_IN => match self.range(sector, writer.available_bytes()) {
                Some(off) => {
                    self.stats.reads += 1;
                    match self.read_to_guest(off, &mut writer) {
                        Ok(()) => S_OK,
                        Err(e) => {
                            log::debug!("virtio-blk: read at sector {sector}: {e}");
                            S_IOERR
                        }
                    }
                }
                None => S_IOERR,
            },
            T_OUT if self.read_only => S_IOERR,
            T_OUT => match self.range(sector, reader.available_bytes()) {
                Some(off) => {
                    self.stats.writes += 1;
                    match self.write_from_guest(off, &mut reader) {
                        Ok(()) => S_OK,
                        Err(e) => {
                            log::debug!("virtio-blk: write at sector {sector}: {e}");
                            S_IOERR
                        }
                    }
                }
                None => S_IOERR,
            },
            T_FLUSH => {
                self.stats.flushes += 1;
                if self.read_only || self.file.sync_data().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_GET_ID => {
                let n = writer.available_bytes().min(ID_BYTES);
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => S_OK,
                    Err(_) => S_IOERR,
                }
            }
            _ => S_UNSUPP,
        };
        if status != S_OK {
            self.stats.errors += 1;
        }
        if status_w.write_all(&[status]).is_err() {
            self.stats.bad_chains += 1;
        }
        let written = writer.bytes_written() + status_w.bytes_written();
        u32::try_from(written).unwrap_or(u32::MAX)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { F_RO } else { 0 };
        F_FLUSH | F_SEG_MAX | F_EVENT_IDX | ro
    }

    fn replace_disk(&mut self, file: File, size: u64) -> bool {
        self.file = file;
        self.size = size / SECTOR_SIZE * SECTOR_SIZE;
        true
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (le64), size_max (le32, not offered: 0), seg_max (le32).
        let mut cfg = [0u8; 16];
        cfg[..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        cfg[12..].copy_from_slice(&SEG_MAX.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &Mem) -> bool {
        super::serve_chains(queue, mem, "virtio-blk", |chain| {
            self.handle_chain(chain, mem)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn mem() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn disk(ro: bool) -> (tempfile::NamedTempFile, Block) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..8 * 512).map(|i| (i / 512) as u8).collect();
        std::fs::write(f.path(), data).unwrap();
        let b = Block::open(f.path(), ro, "rvmm-test").unwrap();
        (f, b)
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn hdr(m: &Mem, at: u64, t: u32, sector: u64) {
        m.write_obj(t, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// Runs one chain through the device; returns (used len, status byte at `status_at`).
    fn run(b: &mut Block, m: &Mem, descs: &[RawDescriptor], status_at: u64) -> (u32, u8) {
        let vq = MockSplitQueue::new(m, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        let len = b.handle_chain(chain, m);
        (len, m.read_obj(GuestAddress(status_at)).unwrap())
    }

    #[test]
    fn read_write_flush_get_id() {
        let m = mem();
        let (f, mut b) = disk(false);
        assert_eq!(b.capacity_sectors(), 8);
        // Read sector 3.
        hdr(&m, 0x1000, T_IN, 3);
        let (len, st) = run(
            &mut b,
            &m,
            &[
                desc(0x1000, 16, 0),
                desc(0x2000, 512, F_WRITE),
                desc(0x3000, 1, F_WRITE),
            ],
            0x3000,
        );
        assert_eq!((len, st), (513, S_OK));
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert!(got.iter().all(|&x| x == 3));
        // Write sector 5.
        m.write_slice(&[0xab; 512], GuestAddress(0x4000)).unwrap();
        hdr(&m, 0x1000, T_OUT, 5);
        let (len, st) = run(
            &mut b,
            &m,
            &[
                desc(0x1000, 16, 0),
                desc(0x4000, 512, 0),
                desc(0x3000, 1, F_WRITE),
            ],
            0x3000,
        );
        assert_eq!((len, st), (1, S_OK));
        let on_disk = std::fs::read(f.path()).unwrap();
        assert!(on_disk[5 * 512..6 * 512].iter().all(|&x| x == 0xab));
        // Flush.
        hdr(&m, 0x1000, T_FLUSH, 0);
        let (_, st) = run(
            &mut b,
            &m,
            &[desc(0x1000, 16, 0), desc(0x3000, 1, F_WRITE)],
            0x3000,
        );
        assert_eq!(st, S_OK);
        // Get id.
        hdr(&m, 0x1000, T_GET_ID, 0);
        let (len, st) = run(
            &mut b,
            &m,
            &[
                desc(0x1000, 16, 0),
                desc(0x5000, 20, F_WRITE),
                desc(0x3000, 1, F_WRITE),
            ],
            0x3000,
        );
        assert_eq!((len, st), (21, S_OK));
        let mut id = [0u8; 9];
        m.read_slice(&mut id, GuestAddress(0x5000)).unwrap();
        assert_eq!(&id, b"rvmm-test");
        // Unknown type.
        hdr(&m, 0x1000, 99, 0);
        let (_, st) = run(
            &mut b,
            &m,
            &[desc(0x1000, 16, 0), desc(0x3000, 1, F_WRITE)],
            0x3000,
        );
        assert_eq!(st, S_UNSUPP);
    }

    #[test]
    fn a_request_spans_many_segments() {
        let m = mem();
        let (f, mut b) = disk(false);
        assert_ne!(b.features() & F_SEG_MAX, 0);
        let mut seg_max = [0u8; 4];
        b.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
        let mut capacity = [0u8; 8];
        b.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 8);
        // Sectors 1..7 read into seven scattered 512-byte buffers, in one chain.
        hdr(&m, 0x1000, T_IN, 1);
        let mut chain = vec![desc(0x1000, 16, 0)];
        for i in 0..7u64 {
            chain.push(desc(0x8000 + i * 0x1000, 512, F_WRITE));
        }
        chain.push(desc(0x3000, 1, F_WRITE));
        let (len, st) = run(&mut b, &m, &chain, 0x3000);
        assert_eq!((len, st), (7 * 512 + 1, S_OK));
        for i in 0..7u64 {
            let mut got = [0u8; 512];
            m.read_slice(&mut got, GuestAddress(0x8000 + i * 0x1000))
                .unwrap();
            assert!(got.iter().all(|&x| u64::from(x) == i + 1), "segment {i}");
        }
        // And written back from seven segments, each its own pattern.
        hdr(&m, 0x1000, T_OUT, 1);
        let mut chain = vec![desc(0x1000, 16, 0)];
        for i in 0..7u64 {
            m.write_slice(&[0x80 + i as u8; 512], GuestAddress(0x8000 + i * 0x1000))
                .unwrap();
            chain.push(desc(0x8000 + i * 0x1000, 512, 0));
        }
        chain.push(desc(0x3000, 1, F_WRITE));
        let (_, st) = run(&mut b, &m, &chain, 0x3000);
        assert_eq!(st, S_OK);
        let on_disk = std::fs::read(f.path()).unwrap();
        for i in 0..7usize {
            let sector = &on_disk[(i + 1) * 512..(i + 2) * 512];
            assert!(
                sector.iter().all(|&x| x == 0x80 + i as u8),
                "sector {}",
                i + 1
            );
        }
        assert!(on_disk[..512].iter().all(|&x| x == 0));
    }

    #[test]
    fn an_empty_slot_takes_a_disk_later() {
        let m = mem();
        let mut b = Block::open(Path::new("/dev/null"), true, "rvmm-vda").unwrap();
        assert_eq!(b.capacity_sectors(), 0);
        hdr(&m, 0x1000, T_IN, 0);
        let chain = [
            desc(0x1000, 16, F_NEXT),
            desc(0x2000, 512, F_NEXT | F_WRITE),
            desc(0x3000, 1, F_WRITE),
        ];
        assert_eq!(run(&mut b, &m, &chain, 0x3000).1, S_IOERR);
        let (f, _) = disk(true);
        assert!(b.replace_disk(File::open(f.path()).unwrap(), 8 * 512 + 100));
        assert_eq!(b.capacity_sectors(), 8);
        let mut cfg = [0u8; 8];
        b.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 8);
        hdr(&m, 0x1000, T_IN, 7);
        assert_eq!(run(&mut b, &m, &chain, 0x3000).1, S_OK);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 7);
    }

    #[test]
    fn hostile_requests_fail_cleanly() {
        let m = mem();
        let (f, mut ro) = disk(true);
        // Write to a read-only disk.
        hdr(&m, 0x1000, T_OUT, 0);
        let (_, st) = run(
            &mut ro,
            &m,
            &[
                desc(0x1000, 16, 0),
                desc(0x4000, 512, 0),
                desc(0x3000, 1, F_WRITE),
            ],
            0x3000,
        );
        assert_eq!(st, S_IOERR);
        assert!(std::fs::read(f.path()).unwrap()[..512]
            .iter()
            .all(|&x| x == 0));
        let (_f2, mut b) = disk(false);
        // Read past the end of the disk.
        hdr(&m, 0x1000, T_IN, 7);
        let (_, st) = run(
            &mut b,
            &m,
            &[
                desc(0x1000, 16, 0),
                desc(0x2000, 1024, F_WRITE),
                desc(0x3000, 1, F_WRITE),
            ],
            0x3000,
        );
        assert_eq!(st, S_IOERR);
        // Sector number that overflows.
        hdr(&m, 0x1000, T_IN, u64::MAX);
        let (_, st) = run(
            &mut b,
            &m,
            &[
                desc(0x1000, 16, 0),
                desc(0x2000, 512, F_WRITE),
                desc(0x3000, 1, F_WRITE),
            ],
            0x3000,
        );
        assert_eq!(st, S_IOERR);
        // Buffer outside guest RAM, and an absurd length: the chain is refused, nothing written.
        hdr(&m, 0x1000, T_IN, 0);
        m.write_obj(0x55u8, GuestAddress(0x3000)).unwrap();
        let (len, st) = run(
            &mut b,
            &m,
            &[
                desc(0x1000, 16, 0),
                desc(0xffff_0000_0000, 512, F_WRITE),
                desc(0x3000, 1, F_WRITE),
            ],
            0x3000,
        );
        assert_eq!((len, st), (0, 0x55));
        let (len, _) = run(
            &mut b,
            &m,
            &[
                desc(0x1000, 16, 0),
                desc(0x2000, u32::MAX, F_WRITE),
                desc(0x3000, 1, F_WRITE),
            ],
            0x3000,
        );
        assert_eq!(len, 0);
        // No writable status byte at all.
        let (len, _) = run(&mut b, &m, &[desc(0x1000, 16, 0)], 0x3000);
        assert_eq!(len, 0);
        // Header too short.
        let (len, _) = run(
            &mut b,
            &m,
            &[desc(0x1000, 4, 0), desc(0x3000, 1, F_WRITE)],
            0x3000,
        );
        assert_eq!(len, 0);
        assert!(b.stats.bad_chains >= 4);
    }

    #[test]
    fn looping_chain_and_bogus_avail_index_terminate() {
        let m = mem();
        let (_f, mut b) = disk(false);
        let vq = MockSplitQueue::new(&m, 16);
        // Two descriptors pointing at each other.
        vq.desc_table()
            .store(0, desc_next(0x1000, 16, F_NEXT, 1))
            .unwrap();
        vq.desc_table()
            .store(1, desc_next(0x2000, 16, F_NEXT, 0))
            .unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(u16::to_le(0));
        vq.avail().idx().store(u16::to_le(1));
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(b.process_queue(0, &mut q, &m));
        assert_eq!(q.next_used(), 1);
        // An avail index far ahead of the ring: nothing is processed, no endless loop.
        vq.avail().idx().store(u16::to_le(1000));
        let _ = b.process_queue(0, &mut q, &m);
    }

    /// fuzz/seeds/virtio_blk/regression-used-ring-on-avail-ring: with the used ring at the
    /// avail ring's address and the used index ahead of the avail one, every used buffer made
    /// the avail index run ahead again, and the device never returned. Now it stops after one
    /// ring's worth.
    #[test]
    fn a_used_ring_over_the_avail_ring_does_not_loop() {
        let m = mem();
        let (_f, mut b) = disk(false);
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.try_set_size(16).unwrap();
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_next_used(5);
        q.set_ready(true);
        assert!(q.is_valid(&m));
        m.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        b.process_queue(0, &mut q, &m);
        assert_eq!(q.next_avail(), 16);
    }

    fn desc_next(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }
}
