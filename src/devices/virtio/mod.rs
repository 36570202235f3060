//! Virtio devices over the virtio-mmio transport (virtio 1.x, split virtqueues from virtio-queue).

pub mod block;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod net;

use virtio_queue::Queue;
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
    /// Device state beyond the transport's and the queues', for snapshots.
    fn save_state(&self) -> Option<serde_json::Value> {
        None
    }
    /// Puts back what [`VirtioDevice::save_state`] saved.
    fn restore_state(&mut self, _state: serde_json::Value) -> Result<(), String> {
        Ok(())
    }
}
