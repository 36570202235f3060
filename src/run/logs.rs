//! The run's log: what a detached workload wrote, one JSON record per chunk, in Docker's json-file
//! shape (`{"log":"…","stream":"stdout","time":"2026-12-04T18:00:00.123456789Z"}`), in
//! ROOT/runs/ID/log.json. When the file passes [`MAX_LOG_BYTES`] it is rotated once to
//! log.json.1, so a chatty workload keeps at most twice that on disk.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use rvmm_shim::log::{relay, rfc3339, say, Relay, Writer, LOG_FILE, MAX_LOG_BYTES};

/// One record.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub log: String,
    pub stream: String,
    pub time: String,
}

impl Record {
    /// The record's time as nanoseconds since the epoch (0 when unreadable).
    pub fn nanos(&self) -> u128 {
        parse_rfc3339(&self.time).unwrap_or(0)
    }
}

/// Every record of the run's log in `dir`, oldest first (the rotated file, then the current one).
/// A torn last line (the writer was killed mid-write) is skipped.
pub fn read(dir: &Path) -> Vec<Record> {
    let mut out = Vec::new();
    for p in [dir.join(format!("{LOG_FILE}.1")), dir.join(LOG_FILE)] {
        if let Ok(f) = File::open(&p) {
            out.extend(read_from(&mut BufReader::new(f)));
        }
    }
    out
}

/// Complete records from `r` (stops at a line without its newline).
pub fn read_from(r: &mut impl BufRead) -> Vec<Record> {
    let mut out = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if !line.ends_with('\n') => break,
            Ok(_) => {
                if let Ok(rec) = serde_json::from_str::<Record>(&line) {
                    out.push(rec);
                }
            }
        }
    }
    out
}

/// Nanoseconds since the epoch of an RFC 3339 time (`Z` or `±hh:mm`, any fraction).
pub fn parse_rfc3339(s: &str) -> Option<u128> {
    let (date, rest) = s.split_once('T')?;
    let mut dp = date.splitn(3, '-');
    let y: i64 = dp.next()?.parse().ok()?;
    let m: u32 = dp.next()?.parse().ok()?;
    let d: u32 = dp.next()?.parse().ok()?;
    let (time, offset) = if let Some(t) = rest.strip_suffix('Z') {
        (t, 0i64)
    } else {
        let i = rest.rfind(['+', '-'])?;
        let (t, o) = rest.split_at(i);
        let sign = if o.starts_with('-') { -1 } else { 1 };
        let (oh, om) = o[1..].split_once(':')?;
        (
            t,
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60),
        )
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut tp = hms.splitn(3, ':');
    let h: i64 = tp.next()?.parse().ok()?;
    let mi: i64 = tp.next()?.parse().ok()?;
    let se: i64 = tp.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut nanos: u128 = 0;
    if !frac.is_empty() {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let f = &frac[..frac.len().min(9)];
        nanos = f.parse::<u128>().ok()? * 10u128.pow(9 - f.len() as u32);
    }
    let secs = days_from_civil(y, m, d) * 86_400 + h * 3600 + mi * 60 + se - offset;
    let secs = u128::try_from(secs).ok()?;
    Some(secs * 1_000_000_000 + nanos)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn times_round_trip() {
        for secs in [0u64, 951_782_400, 1_796_406_295, 4_102_444_800] {
            let t = UNIX_EPOCH + Duration::new(secs, 123_456_789);
            let s = rfc3339(t);
            assert_eq!(
                parse_rfc3339(&s),
                Some(u128::from(secs) * 1_000_000_000 + 123_456_789),
                "{s}"
            );
        }
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000000Z"
        );
        assert_eq!(
            parse_rfc3339("2000-02-29T01:00:00+01:00"),
            Some(951_782_400_000_000_000)
        );
        assert_eq!(parse_rfc3339("2000-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn the_log_rotates_and_reads_back_in_order() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Writer::with_limit(d.path(), 300).unwrap();
        for i in 0..10 {
            w.write(
                if i % 2 == 0 { "stdout" } else { "stderr" },
                format!("line {i}\n").as_bytes(),
            )
            .unwrap();
        }
        assert!(d.path().join("log.json.1").exists());
        let recs = read(d.path());
        // The oldest records went with the second rotation; what is kept is in order.
        let lines: Vec<_> = recs.iter().map(|r| r.log.clone()).collect();
        assert!(lines.last().unwrap() == "line 9\n", "{lines:?}");
        let n: Vec<u32> = lines
            .iter()
            .map(|l| l.trim().trim_start_matches("line ").parse().unwrap())
            .collect();
        assert!(n.windows(2).all(|w| w[1] == w[0] + 1), "{n:?}");
        assert!(recs
            .iter()
            .all(|r| r.stream == "stdout" || r.stream == "stderr"));
        // A torn last line is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(d.path().join(LOG_FILE))
            .unwrap()
            .write_all(b"{\"log\":\"torn")
            .unwrap();
        assert_eq!(read(d.path()).len(), recs.len());
    }

    /// The shim writes records by hand: whatever a workload prints reads back as it was (invalid
    /// UTF-8 replaced).
    #[test]
    fn any_output_reads_back_from_the_log() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Writer::open(d.path()).unwrap();
        let mut all: Vec<u8> = (0u8..=255).collect();
        all.extend_from_slice("quote \" back\\slash \u{7f} é 日本 🚀\n".as_bytes());
        let chunks: Vec<&[u8]> = vec![b"", b"plain\n", b"\x00\x01\x1f\t\r\n", b"\xff\xfe", &all];
        for c in &chunks {
            w.write("stdout", c).unwrap();
        }
        let recs = read(d.path());
        assert_eq!(recs.len(), chunks.len());
        for (r, c) in recs.iter().zip(&chunks) {
            assert_eq!(r.log, String::from_utf8_lossy(c), "{c:?}");
            assert_eq!(r.stream, "stdout");
            assert!(r.nanos() > 0, "{}", r.time);
        }
    }
}
