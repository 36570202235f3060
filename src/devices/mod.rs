//! Emulated devices: 16550 serial ports, a minimal i8042, the virtio-mmio transport and virtio devices.

pub mod serial;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an EventFd registered with KVM as an irqfd for one GSI.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl IrqLine {
    pub fn new() -> std::io::Result<IrqLine> {
        Ok(IrqLine(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    pub fn try_clone(&self) -> std::io::Result<IrqLine> {
        Ok(IrqLine(self.0.try_clone()?))
    }

    /// Raises the interrupt (edge).
    pub fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}

/// The i8042 keyboard controller, as far as a guest kernel needs it: it answers probes, and the reset
/// command (0xFE to port 0x64, what `reboot=k` does) ends the VM.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct I8042 {
    /// Last command byte written to the command port.
    pub last_cmd: u8,
}

/// What a port write asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum I8042Action {
    None,
    Reset,
}

impl I8042 {
    /// Status register: output buffer empty, input buffer empty (nothing to read, ready for commands).
    pub fn read(&mut self, port_offset: u16) -> u8 {
        match port_offset {
            0 => 0,    // data: nothing
            4 => 0x00, // status
            _ => 0xff,
        }
    }

    pub fn write(&mut self, port_offset: u16, value: u8) -> I8042Action {
        if port_offset == 4 {
            self.last_cmd = value;
            if value == 0xfe {
                return I8042Action::Reset;
            }
        }
        I8042Action::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset_and_probe() {
        let mut k = I8042::default();
        assert_eq!(k.write(4, 0xaa), I8042Action::None);
        assert_eq!(k.read(4), 0);
        assert_eq!(
            k.write(0, 0xfe),
            I8042Action::None,
            "0xfe on the data port is not a reset"
        );
        assert_eq!(k.write(4, 0xfe), I8042Action::Reset);
    }
}
