//! 16550 UART (vm-superio) on a port-I/O window, with flow-controlled input.
//!
//! Input never gets dropped: the event thread only enqueues what the 64-byte FIFO has room for and
//! keeps the rest pending; when the guest drains the FIFO the device signals `drained` and the event
//! thread feeds the next bytes.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::{BusDevice, IrqLine};

/// Tells the event thread that the receive FIFO became empty.
pub struct DrainSignal(pub Arc<EventFd>);

impl SerialEvents for DrainSignal {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// The 16550's receive FIFO size (vm-superio's, which it does not export).
const FIFO_SIZE: usize = 64;

/// Where the guest's transmitted bytes go.
pub type SerialOut = Box<dyn Write + Send>;

/// A writer that keeps the first `limit` bytes and silently drops the rest: a guest flooding its
/// console cannot fill the host's disk.
pub struct Capped<W> {
    inner: W,
    left: u64,
}

impl<W: Write> Capped<W> {
    pub fn new(inner: W, limit: u64) -> Self {
        Self { inner, left: limit }
    }
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let keep = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if keep > 0 {
            let n = self.inner.write(&buf[..keep])?;
            self.left -= n as u64;
            if n < keep {
                return Ok(n);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A 16550 UART.
pub struct SerialDevice {
    serial: Serial<IrqLine, DrainSignal, SerialOut>,
}

impl SerialDevice {
    pub fn new(irq: IrqLine, out: SerialOut, drained: Arc<EventFd>) -> Self {
        Self {
            serial: Serial::with_events(irq, DrainSignal(drained), out),
        }
    }

    /// A UART with saved register state and FIFO contents (snapshot restore). A FIFO longer than
    /// the UART's is cut to its size.
    pub fn from_state(
        state: &SerialState,
        irq: IrqLine,
        out: SerialOut,
        drained: Arc<EventFd>,
    ) -> Result<Self, String> {
        let mut state = state.clone();
        state.in_buffer.truncate(FIFO_SIZE);
        let serial = Serial::from_state(&state, irq, DrainSignal(drained), out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Self { serial })
    }

    /// Free space in the receive FIFO.
    pub fn fifo_room(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Feeds bytes to the guest; returns how many were taken (at most [`Self::fifo_room`]).
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.serial.fifo_capacity() == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot enqueue input: {e:?}");
                0
            }
        }
    }

    /// Register state, for snapshots.
    pub fn state(&self) -> SerialState {
        self.serial.state()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; wider accesses read the first register only.
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(off, v) {
                log::debug!("serial: write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_keeps_the_first_bytes_and_accepts_the_rest() {
        let mut w = Capped::new(Vec::new(), 5);
        assert_eq!(w.write(b"abc").expect("write"), 3);
        assert_eq!(w.write(b"defgh").expect("write"), 5);
        assert_eq!(w.write(b"ij").expect("write"), 2);
        assert_eq!(w.inner, b"abcde");
    }
}
