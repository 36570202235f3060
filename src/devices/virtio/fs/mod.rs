//! virtio-fs (issue 19): shared host directories served to the guest over FUSE. [`server`] is
//! the passthrough filesystem, confined to its directory; [`abi`] the FUSE wire format it
//! decodes; [`Fs`] the virtio device that carries requests and replies between the guest's
//! queues and the server.
//!
//! One device per VM, tag [`TAG`], present from boot (so a warm snapshot has it), with or
//! without a server: its root is the VMM jail's directory of shares (one subdirectory per
//! shared directory), which rvmm-init mounts once and binds from.

pub mod abi;
pub mod server;
#[cfg(test)]
mod tests;

use virtio_queue::{DescriptorChain, Queue, Reader, Writer};

pub use server::{Limits, Server};

use super::{Mem, VirtioDevice};

/// The virtio device type of a filesystem device.
pub const TYPE_FS: u32 = 26;
/// The tag the guest mounts (`mount -t virtiofs rvmm /...`).
pub const TAG: &str = "rvmm";
/// Queue size offered (the high-priority queue and one request queue).
pub const QUEUE_SIZE: u16 = 256;
/// The largest request read from a chain: a WRITE of [`server::MAX_WRITE`] and its headers.
const MAX_REQUEST: usize = server::MAX_WRITE as usize + 4096;

/// Request counters (for tests and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsStats {
    pub requests: u64,
    pub bad_chains: u64,
}

/// The virtio-fs device.
pub struct Fs {
    tag: [u8; 36],
    server: Option<Server>,
    queue_sizes: [u16; 2],
    pub stats: FsStats,
}

impl Fs {
    /// A device with tag [`TAG`] serving `server` (None: every request fails with EIO, nothing
    /// is shared).
    pub fn new(server: Option<Server>) -> Fs {
        let mut tag = [0u8; 36];
        tag[..TAG.len()].copy_from_slice(TAG.as_bytes());
        Fs {
            tag,
            server,
            queue_sizes: [QUEUE_SIZE; 2],
            stats: FsStats::default(),
        }
    }

    /// Serves one chain: the request from its readable part, the reply into its writable part.
    /// Returns the bytes written.
    pub fn handle_chain(&mut self, chain: DescriptorChain<&Mem>, mem: &Mem) -> u32 {
        let (mut reader, mut writer) =
            match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
                (Ok(r), Ok(w)) => (r, w),
                _ => {
                    self.stats.bad_chains += 1;
                    return 0;
                }
            };
        let n = reader.available_bytes().min(MAX_REQUEST);
        let mut req = vec![0u8; n];
        if std::io::Read::read_exact(&mut reader, &mut req).is_err() {
            self.stats.bad_chains += 1;
            return 0;
        }
        self.stats.requests += 1;
        let room = writer.available_bytes();
        let reply = match self.server.as_mut() {
            Some(s) => s.handle(&req, room),
            None => no_server(&req, room),
        };
        match reply {
            Some(out) if std::io::Write::write_all(&mut writer, &out).is_ok() => out.len() as u32,
            Some(_) => {
                self.stats.bad_chains += 1;
                0
            }
            None => 0,
        }
    }
}

/// The reply of a device without a server: EIO to every request that wants one.
fn no_server(req: &[u8], room: usize) -> Option<Vec<u8>> {
    use abi::Wire;
    let h = abi::Request::parse(req)?.header;
    if matches!(
        h.opcode,
        abi::op::FORGET | abi::op::BATCH_FORGET | abi::op::INTERRUPT
    ) {
        return None;
    }
    let out = abi::OutHeader {
        len: 16,
        error: -libc::EIO,
        unique: h.unique,
    };
    (room >= 16).then(|| out.bytes().to_vec())
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config: tag[36], num_request_queues (le32).
        let mut cfg = [0u8; 40];
        cfg[..36].copy_from_slice(&self.tag);
        cfg[36..].copy_from_slice(&1u32.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn reset(&mut self) {
        if let Some(s) = self.server.as_mut() {
            s.reset();
        }
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &Mem) -> bool {
        super::serve_chains(queue, mem, "virtio-fs", |chain| {
            self.handle_chain(chain, mem)
        })
    }
}
