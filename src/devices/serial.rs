//! 16550 UARTs (vm-superio) on the legacy COM ports. Output goes to a writer; input is fed by the event
//! loop only while the receive FIFO has room, and resumes when the guest drains it.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::IrqLine;

/// Tells the event loop when the guest has emptied the receive FIFO.
#[derive(Debug)]
pub struct RxEvents {
    pub drained: EventFd,
    waiting: AtomicBool,
}

impl RxEvents {
    pub fn new() -> std::io::Result<Arc<RxEvents>> {
        Ok(Arc::new(RxEvents {
            drained: EventFd::new(libc::EFD_NONBLOCK)?,
            waiting: AtomicBool::new(false),
        }))
    }

    /// The event loop stopped feeding because the FIFO was full.
    pub fn set_waiting(&self) {
        self.waiting.store(true, Ordering::SeqCst);
    }
}

impl SerialEvents for RxEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if self.waiting.swap(false, Ordering::SeqCst) {
            let _ = self.drained.write(1);
        }
    }
}

pub type SerialDevice = Serial<IrqLine, Arc<RxEvents>, Box<dyn Write + Send>>;

pub fn new_serial(irq: IrqLine, events: Arc<RxEvents>, out: Box<dyn Write + Send>) -> SerialDevice {
    Serial::with_events(irq, events, out)
}

/// Feeds as much of `bytes` as the FIFO takes; returns how many were taken.
pub fn feed(serial: &mut SerialDevice, bytes: &[u8]) -> usize {
    let room = serial.fifo_capacity();
    if room == 0 {
        return 0;
    }
    let n = room.min(bytes.len());
    serial.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
}
