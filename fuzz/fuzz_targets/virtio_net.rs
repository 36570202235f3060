//! virtio-net filling RX buffers and sending TX chains (guest memory from the input): rvmm::fuzzing::virtio_net.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rvmm::fuzzing::virtio_net(data));
