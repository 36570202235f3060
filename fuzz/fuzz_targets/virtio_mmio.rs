//! The virtio-mmio register interface of a blk or net device, and the queue work it triggers: rvmm::fuzzing::virtio_mmio.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rvmm::fuzzing::virtio_mmio(data));
