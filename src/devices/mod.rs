//! Emulated devices: serial, i8042, virtio-mmio transport and virtio devices.
//!
//! Devices sit on a [`Bus`] (port I/O or MMIO) and are called from the vCPU threads on exits; queue
//! work and console input run on the event thread. Every device is behind its own `Mutex`, so a
//! device never sees two accesses at once, and a guest can only ever reach a device through its
//! register window.

pub mod i8042;
pub mod serial;
pub mod tap;
pub mod virtio;

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Something a vCPU exit can reach: a window of registers.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` into the window. Unknown registers read as the device
    /// likes (usually zero); the bus pre-fills `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` into the window. Unknown registers are ignored.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Address → device routing for one address space (port I/O or MMIO).
#[derive(Default, Clone)]
pub struct Bus {
    ranges: Vec<(u64, u64, SharedDevice)>,
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("device window {base:#x}+{len:#x} overlaps another")]
    Overlap { base: u64, len: u64 },
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `dev` for addresses `base..base+len`.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), Error> {
        let end = base.checked_add(len).ok_or(Error::Overlap { base, len })?;
        if self.ranges.iter().any(|(b, l, _)| base < b + l && *b < end) {
            return Err(Error::Overlap { base, len });
        }
        self.ranges.push((base, len, dev));
        self.ranges.sort_by_key(|r| r.0);
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let i = self.ranges.partition_point(|(b, _, _)| *b <= addr);
        let (base, len, dev) = self.ranges.get(i.checked_sub(1)?)?;
        let off = addr - base;
        // The whole access must fall inside the window.
        if off.checked_add(size as u64)? <= *len {
            Some((off, dev))
        } else {
            None
        }
    }

    /// Dispatches a read. Returns false (and fills `data` with `fill`) when nothing lives there.
    pub fn read(&self, addr: u64, data: &mut [u8], fill: u8) -> bool {
        data.fill(fill);
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                lock(dev).read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when nothing lives there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                lock(dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if another thread panicked while holding it (the device state is
/// plain data; a half-done access is no worse than a guest's bad access).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An interrupt line: an EventFd registered with KVM as an irqfd for one IOAPIC pin.
#[derive(Debug)]
pub struct IrqLine {
    pub gsi: u32,
    pub evt: EventFd,
}

impl IrqLine {
    /// Pulses the line. A failing eventfd write only loses an interrupt; it is logged.
    pub fn trigger(&self) {
        if let Err(e) = self.evt.write(1) {
            log::warn!("irq {}: cannot signal: {e}", self.gsi);
        }
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct Regs([u8; 8]);
    impl BusDevice for Regs {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn bus_routes_and_rejects_straddling_accesses() {
        let mut bus = Bus::new();
        let dev: SharedDevice = Arc::new(Mutex::new(Regs([0; 8])));
        bus.insert(0x100, 8, dev.clone()).unwrap();
        assert!(bus.insert(0x104, 8, dev).is_err());
        assert!(bus.write(0x102, &[1, 2]));
        let mut b = [0u8; 2];
        assert!(bus.read(0x102, &mut b, 0xff));
        assert_eq!(b, [1, 2]);
        // Straddles the end of the window: not routed.
        let mut b = [0u8; 4];
        assert!(!bus.read(0x106, &mut b, 0xff));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(u64::MAX, &[1]));
        assert!(!bus.read(0x50, &mut [0u8; 1], 0));
    }
}
