//! A minimal i8042 keyboard controller: just enough for the guest's reset (0xFE to port 0x64) to
//! end the VM, which is how a Linux guest with `reboot=k` reboots or powers off here.

use super::BusDevice;

/// Offset of the command/status port (0x64) from the data port (0x60).
pub const CMD_OFFSET: u64 = 4;
/// Window size: 0x60..=0x64.
pub const WINDOW: u64 = 5;
/// The "pulse reset line" command.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// Called when the guest resets the machine.
pub type ResetFn = Box<dyn Fn() + Send>;

pub struct I8042 {
    on_reset: ResetFn,
}

impl I8042 {
    pub fn new(on_reset: ResetFn) -> Self {
        Self { on_reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty; data: nothing.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == CMD_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn only_fe_to_the_command_port_resets() {
        let hit = Arc::new(AtomicBool::new(false));
        let h = hit.clone();
        let mut d = I8042::new(Box::new(move || h.store(true, Ordering::SeqCst)));
        d.write(0, &[0xfe]);
        d.write(CMD_OFFSET, &[0xaa]);
        d.write(CMD_OFFSET, &[]);
        assert!(!hit.load(Ordering::SeqCst));
        d.write(CMD_OFFSET, &[0xfe]);
        assert!(hit.load(Ordering::SeqCst));
    }
}
