//! The port-I/O bus: COM1, COM2 (16550) and the i8042, accessed as a guest does: rvmm::fuzzing::serial_i8042.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rvmm::fuzzing::serial_i8042(data));
