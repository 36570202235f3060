//! virtio-blk walking the guest's descriptor chains (guest memory from the input): rvmm::fuzzing::virtio_blk.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rvmm::fuzzing::virtio_blk(data));
