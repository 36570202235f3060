//! What rvmm-init reads from the host, without side effects: the `Start` (SPEC frames up to
//! SPEC_END, then the JSON) and the checks that run on it before PID 1 acts on any of it. A library
//! so that it is unit-tested on the host and fuzzed (fuzz/fuzz_targets/guest_start.rs): whatever
//! the host process sends, PID 1 must answer with a FAILED frame, never crash (a crashing PID 1
//! panics the guest kernel).

use rvmm_proto::{frame, Start};

/// A failure before the workload starts: the status for the FAILED frame (125) and one line.
pub type Fail = rvmm_workload::Failure;
use rvmm_workload::Failure;

/// The largest `Start` accepted.
pub const MAX_START: usize = 16 << 20;

/// Collects the host's SPEC frames until SPEC_END; other frame kinds are ignored.
#[derive(Default)]
pub struct StartReader {
    dec: frame::Decoder,
    raw: Vec<u8>,
}

impl StartReader {
    /// Takes bytes read from the channel; returns the checked `Start` once SPEC_END arrived.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Start>, Fail> {
        self.dec.feed(bytes);
        while let Some((kind, payload)) = self.dec.next_frame().map_err(Failure::setup)? {
            match kind {
                frame::SPEC if self.raw.len() + payload.len() <= MAX_START => {
                    self.raw.extend(payload)
                }
                frame::SPEC => return Err(Failure::setup("the run spec is too large")),
                frame::SPEC_END => {
                    let start: Start = serde_json::from_slice(&self.raw)
                        .map_err(|e| Failure::setup(format!("parsing the run spec: {e}")))?;
                    check(&start)?;
                    return Ok(Some(start));
                }
                _ => {}
            }
        }
        Ok(None)
    }
}

/// Refuses a `Start` that PID 1 could not act on: no command, or a network address it cannot
/// configure.
pub fn check(start: &Start) -> Result<(), Fail> {
    let spec = &start.spec;
    if start.pause_at_root {
        return Ok(()); // root-only: its spec is not used
    }
    if spec.argv.is_empty() {
        return Err(Failure::setup("no command"));
    }
    if let (Some(a), Some(gw)) = (&spec.network.address, &spec.network.gateway) {
        parse_cidr(a)
            .and_then(|_| parse_ipv4(gw).ok_or("bad gateway"))
            .map_err(|e| Failure::setup(format!("configuring eth0: {e}")))?;
    }
    Ok(())
}

/// A dotted-quad IPv4 address.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let v: Vec<u8> = s
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    v.try_into().ok()
}

/// `ADDR/PREFIX`: the address and its netmask.
pub fn parse_cidr(s: &str) -> Result<([u8; 4], [u8; 4]), &'static str> {
    let (ip, prefix) = s.split_once('/').ok_or("address needs a prefix")?;
    let ip = parse_ipv4(ip).ok_or("bad address")?;
    let prefix: u32 = prefix.parse().map_err(|_| "bad prefix")?;
    // checked_shl: a prefix over 32 is refused (it underflowed `32 - prefix`: a panic with
    // overflow checks, a wrong netmask without; found by fuzz/fuzz_targets/guest_start.rs).
    let mask = match prefix {
        0 => 0,
        1..=32 => u32::MAX.checked_shl(32 - prefix).unwrap_or(0),
        _ => return Err("bad prefix"),
    };
    Ok((ip, mask.to_be_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(start: &[u8]) -> Vec<u8> {
        let mut v = frame::encode(frame::READY, &[]);
        v.extend(frame::encode_chunked(frame::SPEC, start));
        v.extend(frame::encode(frame::SPEC_END, &[]));
        v
    }

    #[test]
    fn a_start_in_pieces_is_read() {
        let mut s = Start::default();
        s.spec.argv = vec!["true".into()];
        s.spec.network.address = Some("10.0.0.2/24".into());
        s.spec.network.gateway = Some("10.0.0.1".into());
        let json = serde_json::to_vec(&s).expect("json");
        let mut r = StartReader::default();
        let bytes = frames(&json);
        let (a, b) = bytes.split_at(bytes.len() / 2);
        assert_eq!(r.feed(a), Ok(None));
        assert_eq!(r.feed(b), Ok(Some(s)));
    }

    #[test]
    fn bad_starts_are_one_failure_each() {
        let fail = |bytes: &[u8]| match StartReader::default().feed(bytes) {
            Err(f) if f.status == 125 => f.message,
            other => panic!("{other:?}"),
        };
        assert!(fail(&frames(b"{")).starts_with("parsing the run spec"));
        assert_eq!(
            fail(&frames(b"{\"spec\":{}}")),
            "parsing the run spec: missing field `argv` at line 1 column 10"
        );
        let mut s = Start::default();
        assert_eq!(
            fail(&frames(&serde_json::to_vec(&s).expect("json"))),
            "no command"
        );
        // A root-only start carries no run: nothing of its spec is checked (or used).
        let root_only = Start {
            pause_at_root: true,
            ..Default::default()
        };
        let json = serde_json::to_vec(&root_only).expect("json");
        assert_eq!(
            StartReader::default().feed(&frames(&json)),
            Ok(Some(root_only))
        );
        s.spec.argv = vec!["true".into()];
        s.spec.network.address = Some("10.0.0.2".into());
        s.spec.network.gateway = Some("10.0.0.1".into());
        let e = fail(&frames(&serde_json::to_vec(&s).expect("json")));
        assert_eq!(e, "configuring eth0: address needs a prefix");
        assert!(fail(&[frame::SPEC, 0xff, 0xff, 0xff, 0xff]).contains("over the limit"));
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_cidr("10.1.2.3/24"),
            Ok(([10, 1, 2, 3], [255, 255, 255, 0]))
        );
        assert_eq!(parse_cidr("10.1.2.3/0"), Ok(([10, 1, 2, 3], [0; 4])));
        assert_eq!(parse_cidr("10.1.2.3/32"), Ok(([10, 1, 2, 3], [255; 4])));
        assert_eq!(parse_cidr("10.1.2/8"), Err("bad address"));
        assert_eq!(parse_cidr("10.1.2.3/x"), Err("bad prefix"));
        assert_eq!(parse_ipv4("1.2.3.256"), None);
        assert_eq!(parse_cidr("10.1.2.3/33"), Err("bad prefix"));
        assert_eq!(parse_cidr("10.1.2.3/4294967295"), Err("bad prefix"));
    }

    /// fuzz/seeds/guest_start/regression-prefix-over-32: a `Start` with `10.88.0.2/36` made
    /// PID 1 panic (overflow) before it could report anything.
    #[test]
    fn a_prefix_over_32_is_a_failure_not_a_panic() {
        let mut s = Start::default();
        s.spec.argv = vec!["true".into()];
        s.spec.network.address = Some("10.88.0.2/36".into());
        s.spec.network.gateway = Some("10.88.0.1".into());
        let r = StartReader::default().feed(&frames(&serde_json::to_vec(&s).expect("json")));
        assert_eq!(r, Err(Failure::setup("configuring eth0: bad prefix")));
    }
}
