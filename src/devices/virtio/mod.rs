//! Virtio devices over the virtio-mmio transport (virtio 1.x, split virtqueues from virtio-queue).

pub mod block;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod net;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// VIRTIO_F_VERSION_1: the modern interface, the only one we offer.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Device type ids.
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;

/// The guest memory type devices work on.
pub type Mem = GuestMemoryMmap<()>;

/// Serves the available chains of `queue`, each with `serve` (which returns the bytes it wrote),
/// putting each back on the used ring; `device` names it in debug logs. At most one ring's worth
/// per call (the transport calls again when this ran out): a guest whose used ring overlaps its
/// avail ring makes every request it completes a new one (found by fuzz/fuzz_targets/virtio_blk.rs),
/// and a busy one must not keep its thread from other work either. Returns true when it used
/// buffers.
pub fn serve_chains(
    queue: &mut Queue,
    mem: &Mem,
    device: &str,
    mut serve: impl FnMut(DescriptorChain<&Mem>) -> u32,
) -> bool {
    let mut used = false;
    let mut budget = queue.size();
    loop {
        let _ = queue.disable_notification(mem);
        let mut progressed = false;
        while budget > 0 {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            let len = serve(chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                log::debug!("{device}: add_used: {e}");
            }
            used = true;
            progressed = true;
        }
        // enable_notification says whether more buffers arrived meanwhile; a guest that lies
        // about its avail index must not keep us here, so stop when nothing was popped.
        match queue.enable_notification(mem) {
            Ok(true) if progressed && budget > 0 => continue,
            _ => break,
        }
    }
    used
}

/// What a virtio device implements; the transport does the rest (registers, features, queues,
/// interrupts). Device state is plain data so it can be saved and restored.
pub trait VirtioDevice: Send {
    /// Virtio device type id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (the transport adds VERSION_1).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space. Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Called on DRIVER_OK with the features the driver accepted.
    fn activate(&mut self, _acked_features: u64) {}
    /// Handles the available buffers of queue `index`. Returns true when it put buffers on the used
    /// ring (the transport then interrupts the guest if the queue wants it).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &Mem) -> bool;
    /// Handles a notification of queue `index` with every queue at hand (a device whose queues
    /// depend on each other overrides this). Returns the mask of queues (bit i = queue i) it put
    /// buffers on the used ring of.
    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &Mem) -> u64 {
        let Some(q) = queues.get_mut(index) else {
            return 0;
        };
        if self.process_queue(index, q, mem) {
            1u64.checked_shl(index as u32).unwrap_or(0)
        } else {
            0
        }
    }
    /// Called on a device reset (status 0).
    fn reset(&mut self) {}
    /// Replaces a disk's backing file with `file` of `size` bytes (the transport then announces
    /// the change). Devices without a disk return false.
    fn replace_disk(&mut self, _file: std::fs::File, _size: u64) -> bool {
        false
    }
    /// The device's backend (e.g. a tap) became ready; returns the queue it used, if any.
    fn backend_event(&mut self, _queues: &mut [Queue], _mem: &Mem) -> Option<usize> {
        None
    }
    /// Backend fd `fd` is ready; returns the mask of queues used (see [`VirtioDevice::process`]).
    fn backend_fd_event(
        &mut self,
        _fd: std::os::fd::RawFd,
        queues: &mut [Queue],
        mem: &Mem,
    ) -> u64 {
        self.backend_event(queues, mem)
            .map_or(0, |i| 1u64.checked_shl(i as u32).unwrap_or(0))
    }
    /// A queue the last call stopped on at its budget with work left that the ring indices do
    /// not show (e.g. a long chain taken in pieces): the transport notifies it again later.
    fn take_more(&mut self) -> Option<usize> {
        None
    }
    /// Guest output taken from a queue is still waiting for room on a host fd.
    fn output_pending(&self) -> bool {
        false
    }
    /// Device state beyond the transport's and the queues', for snapshots.
    fn save_state(&self) -> Option<serde_json::Value> {
        None
    }
    /// Puts back what [`VirtioDevice::save_state`] saved.
    fn restore_state(&mut self, _state: serde_json::Value) -> Result<(), String> {
        Ok(())
    }
}
