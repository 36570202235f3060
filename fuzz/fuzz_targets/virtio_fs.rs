//! virtio-fs's FUSE server on a real share, fed a guest's requests: rvmm::fuzzing::virtio_fs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rvmm::fuzzing::virtio_fs(data));
