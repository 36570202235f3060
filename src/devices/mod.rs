//! Emulated devices: serial, i8042, virtio-mmio transport and virtio devices.
