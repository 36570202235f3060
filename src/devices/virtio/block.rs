//! virtio-blk over a raw image file: read, write, flush, get-id; read-only mode. Every guest-supplied
//! address and length is checked: a bad request completes with an error status, never a panic.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::VirtioDevice;

pub const TYPE_BLOCK: u32 = 2;
const SECTOR_SIZE: u64 = 512;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const ID_LEN: usize = 20;
const QUEUE_SIZE: u16 = 256;
/// Copy granularity between the file and guest memory.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open disk {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub struct Block {
    file: File,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_LEN],
    queue_sizes: [u16; 1],
    buf: Vec<u8>,
}

impl Block {
    pub fn open(path: &Path, read_only: bool) -> Result<Block, Error> {
        let err = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (d, s) in id.iter_mut().zip(name.bytes()) {
            *d = s;
        }
        Ok(Block {
            file,
            read_only,
            capacity: len / SECTOR_SIZE,
            id,
            queue_sizes: [QUEUE_SIZE],
            buf: vec![0; CHUNK],
        })
    }

    /// Handles one request chain; returns the number of bytes written into guest memory.
    fn handle(&mut self, mem: &GuestMemoryMmap, descs: &[(GuestAddress, u32, bool)]) -> u32 {
        // [header (readable, 16 bytes)] [data ...] [status (writable, >= 1 byte)]
        let (Some(&(haddr, hlen, hw)), Some(&(saddr, slen, sw))) = (descs.first(), descs.last())
        else {
            return 0;
        };
        if descs.len() < 2 || hw || hlen < 16 || !sw || slen < 1 {
            return 0; // malformed: nothing sane to write a status into
        }
        let mut hdr = [0u8; 16];
        if mem.read_slice(&mut hdr, haddr).is_err() {
            return 0;
        }
        let typ = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let data = &descs[1..descs.len() - 1];
        let mut written = 0u32;
        let status = match typ {
            T_IN | T_OUT => {
                let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
                let in_range = sector
                    .checked_mul(SECTOR_SIZE)
                    .and_then(|off| off.checked_add(total))
                    .is_some_and(|end| end <= self.capacity * SECTOR_SIZE);
                let dir_ok = data.iter().all(|d| d.2 == (typ == T_IN));
                let writable = typ == T_IN || !self.read_only;
                if !writable || !in_range || !dir_ok {
                    S_IOERR
                } else {
                    match self.transfer(mem, typ == T_IN, sector * SECTOR_SIZE, data) {
                        Ok(n) => {
                            written = n;
                            S_OK
                        }
                        Err(()) => S_IOERR,
                    }
                }
            }
            T_FLUSH => {
                if self.read_only || self.file.sync_data().is_ok() {
                    S_OK
                } else {
                    S_IOERR
                }
            }
            T_GET_ID => match data.first() {
                Some(&(addr, len, true)) => {
                    let n = (len as usize).min(ID_LEN);
                    if mem.write_slice(&self.id[..n], addr).is_ok() {
                        written = n as u32;
                        S_OK
                    } else {
                        S_IOERR
                    }
                }
                _ => S_IOERR,
            },
            _ => S_UNSUPP,
        };
        if mem.write_obj(status, saddr).is_err() {
            return written;
        }
        written + 1
    }

    fn transfer(
        &mut self,
        mem: &GuestMemoryMmap,
        read: bool,
        mut off: u64,
        data: &[(GuestAddress, u32, bool)],
    ) -> Result<u32, ()> {
        let mut done = 0u32;
        for &(addr, len, _) in data {
            let mut pos = 0usize;
            while pos < len as usize {
                let n = CHUNK.min(len as usize - pos);
                let gaddr = addr.0.checked_add(pos as u64).map(GuestAddress).ok_or(())?;
                let buf = &mut self.buf[..n];
                if read {
                    self.file.read_exact_at(buf, off).map_err(|_| ())?;
                    mem.write_slice(buf, gaddr).map_err(|_| ())?;
                    done += n as u32;
                } else {
                    mem.read_slice(buf, gaddr).map_err(|_| ())?;
                    self.file.write_all_at(buf, off).map_err(|_| ())?;
                }
                pos += n;
                off += n as u64;
            }
        }
        Ok(done)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config { le64 capacity; ... }: only capacity is ours.
        let cfg = self.capacity.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn process_queue(&mut self, _idx: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used_any = false;
        // Bounded: at most one pass over the ring per notification.
        for _ in 0..queue.size() {
            let chain = match queue.pop_descriptor_chain(mem) {
                Some(c) => c,
                None => break,
            };
            let head = chain.head_index();
            // The chain iterator stops at loops and at the queue size (virtio-queue's TTL).
            let descs: Vec<(GuestAddress, u32, bool)> = chain
                .map(|d| (d.addr(), d.len(), d.is_write_only()))
                .collect();
            let len = self.handle(mem, &descs);
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used_any = true;
        }
        used_any && queue.needs_notification(mem).unwrap_or(true)
    }
}
