//! virtio over MMIO (version 2): the transport owns the register state machine and activates the device
//! on DRIVER_OK; devices process their queues when the guest notifies. A guest that programs garbage gets
//! errors or silence, never a VMM crash.

pub mod block;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::IrqLine;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_4552; // "REMU", as QEMU's; any value works

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Interrupt status bit: the device used buffers.
pub const INT_VRING: u32 = 1;

/// A device behind the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Feature bits offered (VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    fn queue_max_sizes(&self) -> &[u16];
    /// Device config space read at `offset`; bytes past the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Processes what the guest made available on queue `idx`. Returns true when the guest should be
    /// interrupted.
    fn process_queue(&mut self, idx: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
}

/// Register state of one virtio-mmio transport.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: Arc<AtomicU32>,
    config_generation: u32,
    irq: IrqLine,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: IrqLine) -> MmioTransport {
        let queues = device
            .queue_max_sizes()
            .iter()
            .filter_map(|&s| Queue::new(s).ok())
            .collect();
        MmioTransport {
            device,
            mem,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: Arc::new(AtomicU32::new(0)),
            config_generation: 0,
            irq,
        }
    }

    fn features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A read of `data.len()` bytes at `offset` inside the device's MMIO window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0); // registers are 32-bit only
            return;
        }
        let v: u32 = match offset {
            0x00 => MMIO_MAGIC,
            0x04 => MMIO_VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .device
                .queue_max_sizes()
                .get(self.queue_sel as usize)
                .copied()
                .map_or(0, u32::from),
            0x44 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt_status.load(Ordering::SeqCst),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A write at `offset`; returns true when it was a queue notification that was processed.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            return; // config space is read-only for our devices
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let driver_ok = self.status & STATUS_DRIVER_OK != 0;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & STATUS_FEATURES_OK == 0 => {
                let v = u64::from(v);
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if !driver_ok => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            0x44 if !driver_ok => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => self.notify(v as usize),
            0x64 => {
                self.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if !driver_ok => {
                let hi = offset & 4 != 0;
                let (lo, high) = if hi { (None, Some(v)) } else { (Some(v), None) };
                if let Some(q) = self.selected() {
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, high),
                        0x90 => q.set_avail_ring_address(lo, high),
                        _ => q.set_used_ring_address(lo, high),
                    }
                }
            }
            _ => {} // undefined or read-only register: ignored
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Only what we offered, and a modern driver.
            let offered = self.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        if v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
            let valid = self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.mem));
            if !valid {
                self.status = v | STATUS_NEEDS_RESET;
                return;
            }
        }
        self.status = v;
    }

    fn notify(&mut self, idx: usize) {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        let Some(q) = self.queues.get_mut(idx) else {
            return;
        };
        if !q.ready() {
            return;
        }
        if self.device.process_queue(idx, q, &self.mem) {
            self.interrupt_status.fetch_or(INT_VRING, Ordering::SeqCst);
            if let Err(e) = self.irq.trigger() {
                log::warn!("virtio interrupt failed: {e}");
            }
        }
    }
}
