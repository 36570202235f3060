//! snapshot.json as Vm::restore reads it, and the device state restored from it: rvmm::fuzzing::snapshot.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rvmm::fuzzing::snapshot(data));
