//! The multiport virtio-console's queues and host fds (guest memory from the input): rvmm::fuzzing::virtio_console.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rvmm::fuzzing::virtio_console(data));
