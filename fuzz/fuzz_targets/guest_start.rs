//! rvmm-init's side of the VM channel: what the host sends, in pieces (a length byte, then that
//! many bytes), until the `Start` is read or refused. PID 1 must answer anything with a `Start`
//! or a one-line failure (status 125), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rvmm::fuzzing::Input;
use rvmm_guest_init::StartReader;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut reader = StartReader::default();
    while !input.is_empty() {
        let n = usize::from(input.u8()).max(1);
        match reader.feed(input.bytes(n)) {
            Ok(None) => {}
            Ok(Some(start)) => {
                assert!(!start.spec.argv.is_empty());
                if let (Some(a), Some(_)) =
                    (&start.spec.network.address, &start.spec.network.gateway)
                {
                    assert!(rvmm_guest_init::parse_cidr(a).is_ok());
                }
                return;
            }
            Err(f) => {
                assert_eq!(f.status, 125);
                assert!(!f.message.contains('\n'), "one line: {:?}", f.message);
                return;
            }
        }
    }
});
