//! The host side of the VM channel: frames from the guest, read in pieces and applied: rvmm::fuzzing::channel_host.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rvmm::fuzzing::channel_host(data));
