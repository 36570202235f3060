//! virtio-net on a TAP device: one RX and one TX queue, a MAC address, no offloads.
//!
//! Frames carry the 12-byte `virtio_net_hdr_v1` in the queues; with no offloads negotiated the
//! header is all zeros on RX and ignored on TX. RX is driven by the tap fd (edge-triggered on the
//! event thread) and by the guest adding RX buffers; a frame that arrives while the guest has no
//! buffer waits (the tap queues further frames in the kernel).

use std::io::{Read, Write};

use virtio_queue::{Queue, QueueT, Reader, Writer};

use super::{Mem, VirtioDevice, TYPE_NET};
use crate::devices::tap::Tap;

pub const F_MAC: u64 = 1 << 5;
pub const QUEUE_SIZE: u16 = 256;
pub const RX: usize = 0;
pub const TX: usize = 1;
/// virtio_net_hdr_v1 (with num_buffers), used whenever VERSION_1 is negotiated.
pub const HDR_LEN: usize = 12;
/// Largest frame we move: 64 KiB plus the Ethernet header and a VLAN tag.
const MAX_FRAME: usize = 65536 + 18;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_truncated: u64,
    pub bad_chains: u64,
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    queue_sizes: [u16; 2],
    /// A frame (with its zeroed header) read from the tap and not yet delivered.
    rx_pending: Option<Vec<u8>>,
    buf: Vec<u8>,
    pub stats: NetStats,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Self {
            tap,
            mac,
            queue_sizes: [QUEUE_SIZE; 2],
            rx_pending: None,
            buf: Vec::new(),
            stats: NetStats::default(),
        }
    }

    pub fn tap_fd(&self) -> std::os::fd::RawFd {
        self.tap.fd()
    }

    /// Delivers frames to RX buffers until the tap is empty or the guest has no buffers left.
    fn rx(&mut self, q: &mut Queue, mem: &Mem) -> bool {
        let mut used = false;
        // One ring's worth per call: a guest whose used ring lies on its avail ring got an
        // endless supply of broken buffers here, each keeping the frame for the next (found by
        // fuzz/fuzz_targets/virtio_net.rs, a hang). The transport calls again.
        let mut budget = q.size();
        while budget > 0 {
            if self.rx_pending.is_none() {
                let mut frame = vec![0u8; HDR_LEN + MAX_FRAME];
                match self.tap.read_frame(&mut frame[HDR_LEN..]) {
                    Ok(Some(n)) => {
                        frame.truncate(HDR_LEN + n);
                        self.rx_pending = Some(frame);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log::debug!("virtio-net: tap read: {e}");
                        break;
                    }
                }
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break; // no buffer: the frame waits for the guest's next RX notification
            };
            budget -= 1;
            let head = chain.head_index();
            let len = match Writer::new(mem, chain) {
                Ok(mut w) => {
                    let frame = self.rx_pending.take().unwrap_or_default();
                    let n = frame.len().min(w.available_bytes());
                    if n < frame.len() {
                        self.stats.rx_truncated += 1;
                    }
                    if w.write_all(&frame[..n]).is_err() {
                        self.stats.bad_chains += 1;
                    }
                    self.stats.rx_frames += 1;
                    w.bytes_written()
                }
                Err(_) => {
                    // A broken buffer: give it back empty, keep the frame for the next one.
                    self.stats.bad_chains += 1;
                    0
                }
            };
            if let Err(e) = q.add_used(mem, head, u32::try_from(len).unwrap_or(0)) {
                log::debug!("virtio-net: add_used: {e}");
            }
            used = true;
        }
        used
    }

    fn tx(&mut self, q: &mut Queue, mem: &Mem) -> bool {
        let mut used = false;
        // One ring's worth per call, as virtio-blk (the transport calls again).
        let mut budget = q.size();
        while budget > 0 {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            match Reader::new(mem, chain) {
                Ok(mut r) => {
                    let n = r.available_bytes();
                    if n > HDR_LEN && n <= HDR_LEN + MAX_FRAME {
                        self.buf.resize(n, 0);
                        if r.read_exact(&mut self.buf).is_ok() {
                            if let Err(e) = self.tap.write_frame(&self.buf[HDR_LEN..]) {
                                log::debug!("virtio-net: tap write: {e}");
                            }
                            self.stats.tx_frames += 1;
                        }
                    } else {
                        self.stats.bad_chains += 1;
                    }
                }
                Err(_) => self.stats.bad_chains += 1,
            }
            if let Err(e) = q.add_used(mem, head, 0) {
                log::debug!("virtio-net: add_used: {e}");
            }
            used = true;
        }
        used
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], then status etc. (not offered).
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| self.mac.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &Mem) -> bool {
        match index {
            RX => self.rx(queue, mem),
            TX => self.tx(queue, mem),
            _ => false,
        }
    }

    fn backend_event(&mut self, queues: &mut [Queue], mem: &Mem) -> Option<usize> {
        let q = queues.get_mut(RX)?;
        if q.ready() && self.rx(q, mem) {
            Some(RX)
        } else {
            None
        }
    }

    fn reset(&mut self) {
        self.rx_pending = None;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// fuzz/seeds/virtio_net/regression-used-ring-on-avail-ring: RX with the used ring on the
    /// avail ring (used index ahead) and a frame waiting on the tap never returned.
    #[test]
    fn rx_over_a_used_ring_on_the_avail_ring_returns() {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::Datagram,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&b),
            &[0x42; 60],
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        let mut net = Net::new(Tap::from_fd(a).unwrap(), [2, 0, 0, 0, 0, 1]);
        let m = Mem::from_ranges(&[(GuestAddress(0), 0x10_000)]).unwrap();
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.try_set_size(16).unwrap();
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_next_used(5);
        q.set_ready(true);
        assert!(q.is_valid(&m));
        m.write_obj(1u16, GuestAddress(0x2002)).unwrap();
        // Descriptor 0: a buffer outside guest RAM.
        m.write_obj(0xffff_0000_0000u64, GuestAddress(0x1000))
            .unwrap();
        m.write_obj(16u32, GuestAddress(0x1008)).unwrap();
        m.write_obj(2u16, GuestAddress(0x100c)).unwrap();
        net.process_queue(RX, &mut q, &m);
        assert_eq!(q.next_avail(), 16);
        assert_eq!(net.stats.rx_frames, 0);
    }
}
