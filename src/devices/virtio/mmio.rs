//! The virtio-mmio transport (virtio 1.x, version 2 register layout).
//!
//! The transport owns the register state machine and the queues, and activates the device on
//! DRIVER_OK. A hostile driver can write anything: invalid accesses (wrong size, unaligned, undefined
//! registers, queue setup after DRIVER_OK) are ignored, and queues whose rings lie outside guest RAM
//! stop the device from activating (DEVICE_NEEDS_RESET) instead of being used.

use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};

use super::{status, Mem, VirtioDevice, F_EVENT_IDX, F_VERSION_1};
use crate::devices::{BusDevice, IrqLine};

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5256_4d4d; // "RVMM"

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the QueueNotify register (for the ioeventfd).
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// Interrupt status bit: a used buffer was added.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the device configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Transport register state (plain data, for snapshots).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub activated: bool,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Mem,
    queues: Vec<Queue>,
    irq: Arc<IrqLine>,
    state: TransportState,
}

impl MmioTransport {
    /// Wraps `device`. Fails only if the device asks for an invalid queue size.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Mem,
        irq: Arc<IrqLine>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&s| Queue::new(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            queues,
            irq,
            state: TransportState::default(),
        })
    }

    pub fn state(&self) -> &TransportState {
        &self.state
    }

    /// `device` as a driver would leave it: features accepted, every queue of 16 entries ready
    /// in the first MiB of `mem`, DRIVER_OK.
    #[cfg(test)]
    pub(crate) fn activated_for_tests(device: Box<dyn VirtioDevice>, mem: Mem) -> Self {
        let irq = Arc::new(IrqLine {
            gsi: 5,
            evt: vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd"),
        });
        let mut t = Self::new(device, mem, irq).expect("transport");
        let w = |t: &mut Self, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        w(&mut t, reg::STATUS, 3);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::STATUS, 0xb);
        for q in 0..t.queues.len() as u32 {
            let base = 0x1_0000 + q * 0x4000;
            w(&mut t, reg::QUEUE_SEL, q);
            w(&mut t, reg::QUEUE_NUM, 16);
            w(&mut t, reg::QUEUE_DESC_LOW, base);
            w(&mut t, reg::QUEUE_AVAIL_LOW, base + 0x1000);
            w(&mut t, reg::QUEUE_USED_LOW, base + 0x2000);
            w(&mut t, reg::QUEUE_READY, 1);
        }
        w(&mut t, reg::STATUS, 0xf);
        assert!(t.state.activated);
        t
    }

    /// The saved form of the transport and its queues (for snapshots; the device's own state is
    /// its backend, which a restore provides anew).
    pub fn save(&self) -> (TransportState, Vec<QueueState>) {
        (
            self.state.clone(),
            self.queues.iter().map(|q| q.state()).collect(),
        )
    }

    /// Wraps `device` with saved transport and queue state. The queues must match the device's
    /// and, if the device was active, lie in guest memory; the device is activated again with the
    /// features the driver had accepted.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: Mem,
        irq: Arc<IrqLine>,
        state: TransportState,
        queues: Vec<QueueState>,
    ) -> Result<Self, String> {
        let sizes = device.queue_max_sizes();
        if queues.len() != sizes.len()
            || queues.iter().zip(sizes).any(|(q, &max)| q.max_size != max)
        {
            return Err("virtio queue layout differs from the device's".into());
        }
        let queues = queues
            .into_iter()
            .map(Queue::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("virtio queue state: {e}"))?;
        if state.activated
            && !queues
                .iter()
                .filter(|q| q.ready())
                .all(|q| q.is_valid(&mem))
        {
            return Err("a saved virtio queue lies outside guest memory".into());
        }
        let mut t = Self {
            device,
            mem,
            queues,
            irq,
            state,
        };
        if t.state.activated {
            t.device.activate(t.state.acked_features);
        }
        Ok(t)
    }

    /// Tells the driver the device configuration changed (e.g. a disk's capacity).
    pub fn config_changed(&mut self) {
        self.state.config_generation = self.state.config_generation.wrapping_add(1);
        self.state.interrupt_status |= INT_CONFIG;
        self.irq.trigger();
    }

    /// Replaces a disk device's backing file and announces the new capacity to the driver.
    /// Returns false for a device that has no disk.
    pub fn replace_disk(&mut self, file: std::fs::File, size: u64) -> bool {
        if !self.device.replace_disk(file, size) {
            return false;
        }
        self.config_changed();
        true
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn device_features(&self) -> u64 {
        self.device.features() | F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let i = self.state.queue_sel as usize;
        // Queue setup is only allowed before DRIVER_OK and while the queue is not ready.
        if self.state.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(i).filter(|q| !q.ready())
    }

    /// The driver notified queue `index` (ioeventfd or a trapped QueueNotify write). Returns
    /// true when the device used its whole budget (a ring's worth of buffers): more may be
    /// waiting, and the caller should notify again once it has seen to its other work.
    pub fn notify(&mut self, index: usize) -> bool {
        if !self.state.activated {
            return false;
        }
        if !self.queues.get(index).is_some_and(|q| q.ready()) {
            return false;
        }
        let before = self.avail_positions();
        let used = self.device.process(index, &mut self.queues, &self.mem);
        self.signal_used(used);
        let more = self.device.take_more();
        self.exhausted(&before).or(more).is_some()
    }

    /// Guest output the device took is still waiting for room on a host fd.
    pub fn output_pending(&self) -> bool {
        self.state.activated && self.device.output_pending()
    }

    /// Where each queue's available ring stands (see [`Self::exhausted`]).
    fn avail_positions(&self) -> Vec<u16> {
        self.queues.iter().map(|q| q.next_avail()).collect()
    }

    /// The first queue the device took a whole ring's worth from since `before`: the device
    /// stopped at its budget there and more may be waiting.
    fn exhausted(&self, before: &[u16]) -> Option<usize> {
        self.queues
            .iter()
            .zip(before)
            .position(|(q, b)| q.size() > 0 && q.next_avail().wrapping_sub(*b) >= q.size())
    }

    /// The device's backend fd `fd` has work (e.g. frames waiting on a tap). Returns the queue to
    /// notify again when the device used its whole budget on it (see [`Self::notify`]).
    pub fn backend_event(&mut self, fd: std::os::fd::RawFd) -> Option<usize> {
        if !self.state.activated {
            return None;
        }
        let before = self.avail_positions();
        let used = self
            .device
            .backend_fd_event(fd, &mut self.queues, &self.mem);
        self.signal_used(used);
        let more = self.device.take_more();
        self.exhausted(&before).or(more)
    }

    /// Interrupts the guest if one of the queues in `used` (bit i = queue i) wants it.
    fn signal_used(&mut self, used: u64) {
        if used == 0 {
            return;
        }
        let mut needs = false;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if i < 64 && used & (1 << i) != 0 {
                needs |= q.needs_notification(&self.mem).unwrap_or(true);
            }
        }
        if needs {
            self.state.interrupt_status |= INT_VRING;
            self.irq.trigger();
        }
    }

    /// The device state beyond the transport's (for snapshots).
    pub fn device_state(&self) -> Option<serde_json::Value> {
        self.device.save_state()
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
        self.state = TransportState {
            config_generation: self.state.config_generation,
            ..TransportState::default()
        };
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.state.status;
        // A driver only ever adds status bits (virtio 1.x, 2.1.1); a write that clears one is
        // ignored. Otherwise a running device could lose DRIVER_OK and have its queues set up
        // again, unchecked, while it runs (found by fuzz/fuzz_targets/virtio_mmio.rs).
        if v & old != old {
            log::debug!("virtio: status {v:#x} would clear bits of {old:#x}; ignored");
            return;
        }
        let mut new = v;
        // FEATURES_OK is only accepted with VERSION_1 negotiated.
        if new & status::FEATURES_OK != 0
            && old & status::FEATURES_OK == 0
            && self.state.acked_features & F_VERSION_1 == 0
        {
            new &= !status::FEATURES_OK;
        }
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            if new & status::FEATURES_OK == 0 {
                new &= !status::DRIVER_OK;
            } else {
                let mem = &self.mem;
                let all_valid = self
                    .queues
                    .iter()
                    .filter(|q| q.ready())
                    .all(|q| q.is_valid(mem));
                if all_valid {
                    let event_idx = self.state.acked_features & F_EVENT_IDX != 0;
                    for q in &mut self.queues {
                        q.set_event_idx(event_idx);
                    }
                    self.device.activate(self.state.acked_features);
                    self.state.activated = true;
                } else {
                    log::debug!("virtio: driver set up a queue outside guest memory");
                    new = (new & !status::DRIVER_OK) | status::DEVICE_NEEDS_RESET;
                }
            }
        }
        self.state.status = new;
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let q = self.queues.get(self.state.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.state.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map(|q| u32::from(q.max_size())).unwrap_or(0),
            reg::QUEUE_READY => q.map(|q| u32::from(q.ready())).unwrap_or(0),
            reg::INTERRUPT_STATUS => self.state.interrupt_status,
            reg::STATUS => self.state.status,
            reg::CONFIG_GENERATION => self.state.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let driver_phase =
            self.state.status & status::DRIVER != 0 && self.state.status & status::FEATURES_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.state.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.state.driver_features_sel = v,
            reg::DRIVER_FEATURES if driver_phase => {
                let offered = self.device_features();
                let (shift, mask) = match self.state.driver_features_sel {
                    0 => (0, 0xffff_ffffu64),
                    1 => (32, 0xffff_ffff_0000_0000u64),
                    _ => return,
                };
                let acked = (u64::from(v) << shift) & offered;
                self.state.acked_features = (self.state.acked_features & !mask) | acked;
            }
            reg::QUEUE_SEL => self.state.queue_sel = v,
            reg::QUEUE_NUM => {
                if let (Some(q), Ok(size)) = (self.selected_queue(), u16::try_from(v)) {
                    // virtio-queue rejects sizes that are not a power of two or exceed the max.
                    if q.try_set_size(size).is_err() {
                        log::debug!("virtio: bad queue size {v}");
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                } else if v == 0 {
                    // Allow a driver to disable a queue at any time.
                    if let Some(q) = self.queues.get_mut(self.state.queue_sel as usize) {
                        q.set_ready(false);
                    }
                }
            }
            reg::QUEUE_NOTIFY => {
                self.notify(v as usize);
            }
            reg::INTERRUPT_ACK => self.state.interrupt_status &= !v,
            reg::STATUS => self.set_status(v),
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_AVAIL_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_AVAIL_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_USED_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_USED_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => log::debug!("virtio: write to undefined register {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q)
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        // Registers are 32-bit and naturally aligned; anything else reads as zero.
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!("virtio: {}-byte read at {offset:#x} ignored", data.len());
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!("virtio: {}-byte write at {offset:#x} ignored", data.len());
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    struct Dummy {
        processed: usize,
        sizes: [u16; 1],
    }
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(7);
        }
        fn process_queue(&mut self, _i: usize, _q: &mut Queue, _m: &Mem) -> bool {
            self.processed += 1;
            true
        }
    }

    fn transport() -> MmioTransport {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(IrqLine {
            gsi: 5,
            evt: EventFd::new(0).unwrap(),
        });
        let dev = Dummy {
            processed: 0,
            sizes: [16],
        };
        MmioTransport::new(Box::new(dev), mem, irq).unwrap()
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn setup_queue(t: &mut MmioTransport, desc: u32) {
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_NUM, 16);
        w(t, reg::QUEUE_DESC_LOW, desc);
        w(t, reg::QUEUE_AVAIL_LOW, 0x2000);
        w(t, reg::QUEUE_USED_LOW, 0x3000);
        w(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn happy_path_activates() {
        let mut t = transport();
        assert_eq!(r(&mut t, reg::MAGIC), MAGIC);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 42);
        w(&mut t, reg::STATUS, 3);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::STATUS, 0xb);
        assert_eq!(r(&mut t, reg::STATUS), 0xb);
        setup_queue(&mut t, 0x1000);
        w(&mut t, reg::STATUS, 0xf);
        assert!(t.state().activated);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), INT_VRING);
        w(&mut t, reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        // Reset clears everything.
        w(&mut t, reg::STATUS, 0);
        assert!(!t.state().activated);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn hostile_driver_is_refused() {
        let mut t = transport();
        // Notify before anything: ignored.
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        w(&mut t, reg::QUEUE_NOTIFY, 99);
        // FEATURES_OK without VERSION_1 is not accepted.
        w(&mut t, reg::STATUS, 3);
        w(&mut t, reg::STATUS, 0xb);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK is not accepted.
        w(&mut t, reg::STATUS, 0x7);
        assert!(!t.state().activated);
        // Queue rings outside RAM: DEVICE_NEEDS_RESET instead of activation.
        w(&mut t, reg::STATUS, 0);
        w(&mut t, reg::STATUS, 3);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::STATUS, 0xb);
        setup_queue(&mut t, 0xfff0_0000);
        w(&mut t, reg::STATUS, 0xf);
        assert!(!t.state().activated);
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // Odd sizes, unaligned and undefined registers: ignored, reads give zero.
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(reg::STATUS, &[0]);
        t.write(reg::STATUS + 1, &[0, 0, 0, 0]);
        w(&mut t, 0xc8, 0xffff_ffff);
        assert_eq!(r(&mut t, 0xc8), 0);
        assert_eq!(r(&mut t, reg::MAGIC + 2), 0);
        // Bad queue sizes and selectors are ignored.
        w(&mut t, reg::STATUS, 0);
        w(&mut t, reg::QUEUE_SEL, 7);
        w(&mut t, reg::QUEUE_NUM, 3);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 3); // not a power of two
        w(&mut t, reg::QUEUE_NUM, 1 << 15); // above the max
                                            // Config space of any size goes to the device.
        let mut c = [0u8; 3];
        t.read(reg::CONFIG + 1, &mut c);
        assert_eq!(c, [7, 7, 7]);
    }

    /// fuzz/seeds/virtio_mmio/regression-status-clears-driver-ok: a status write without
    /// DRIVER_OK left the device running with its queues open to set-up again.
    #[test]
    fn status_bits_cannot_be_cleared_but_by_a_reset() {
        let mut t = transport();
        w(&mut t, reg::STATUS, 3);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::STATUS, 0xb);
        setup_queue(&mut t, 0x1000);
        w(&mut t, reg::STATUS, 0xf);
        assert!(t.state().activated);
        w(&mut t, reg::STATUS, 0x3);
        assert_eq!(r(&mut t, reg::STATUS), 0xf);
        w(&mut t, reg::QUEUE_READY, 0);
        w(&mut t, reg::QUEUE_DESC_LOW, 0xfff0_0000);
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(
            r(&mut t, reg::QUEUE_READY),
            0,
            "no queue set-up while running"
        );
        w(&mut t, reg::STATUS, 0x8f); // FAILED may be added
        assert_eq!(r(&mut t, reg::STATUS), 0x8f);
        w(&mut t, reg::STATUS, 0);
        assert!(!t.state().activated);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn saved_state_restores_and_bad_state_is_refused() {
        let mut t = transport();
        w(&mut t, reg::STATUS, 3);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::STATUS, 0xb);
        setup_queue(&mut t, 0x1000);
        w(&mut t, reg::STATUS, 0xf);
        assert!(t.state().activated);
        let (state, queues) = t.save();
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = || {
            Arc::new(IrqLine {
                gsi: 5,
                evt: EventFd::new(0).unwrap(),
            })
        };
        let dev = || {
            Box::new(Dummy {
                processed: 0,
                sizes: [16],
            })
        };
        let mut back =
            MmioTransport::restore(dev(), mem.clone(), irq(), state.clone(), queues.clone())
                .unwrap();
        assert_eq!(back.state(), t.state());
        assert_eq!(r(&mut back, reg::STATUS), 0xf);
        // Queues outside the (smaller) memory of the restoring VM are refused.
        let small = Mem::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(
            MmioTransport::restore(dev(), small, irq(), state.clone(), queues.clone()).is_err()
        );
        // So is a queue layout the device does not have.
        let mut q2 = queues.clone();
        q2.push(q2[0]);
        assert!(MmioTransport::restore(dev(), mem, irq(), state, q2).is_err());
    }

    #[test]
    fn config_change_bumps_the_generation_and_interrupts() {
        let mut t = transport();
        let g = r(&mut t, reg::CONFIG_GENERATION);
        t.config_changed();
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), g + 1);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
        assert_eq!(t.irq.evt.read().unwrap(), 1);
        w(&mut t, reg::INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        // The dummy has no disk: nothing to replace, no interrupt.
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(!t.replace_disk(f, 512));
        assert_eq!(r(&mut t, reg::CONFIG_GENERATION), g + 1);
    }
}
