//! Writing a run's log: what a detached workload wrote, one JSON record per chunk, in Docker's
//! json-file shape (`{"log":"…","stream":"stdout","time":"2026-12-04T18:00:00.123456789Z"}`), in
//! ROOT/runs/ID/log.json. When the file passes [`MAX_LOG_BYTES`] it is rotated once to
//! log.json.1, so a chatty workload keeps at most twice that on disk. rvmm reads it back
//! (`rvmm::run::logs`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Size at which the log rotates.
pub const MAX_LOG_BYTES: u64 = 16 << 20;
pub const LOG_FILE: &str = "log.json";

/// Appends records to a run's log, rotating it when it grows past the limit.
pub struct Writer {
    path: PathBuf,
    file: File,
    size: u64,
    limit: u64,
}

impl Writer {
    pub fn open(dir: &Path) -> std::io::Result<Writer> {
        Writer::with_limit(dir, MAX_LOG_BYTES)
    }

    pub fn with_limit(dir: &Path, limit: u64) -> std::io::Result<Writer> {
        let path = dir.join(LOG_FILE);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(Writer {
            path,
            file,
            size,
            limit,
        })
    }

    /// Writes `bytes` from `stream` ("stdout" or "stderr") as one record (invalid UTF-8 is
    /// replaced, as Docker does).
    pub fn write(&mut self, stream: &str, bytes: &[u8]) -> std::io::Result<()> {
        let mut line = String::with_capacity(bytes.len() + 80);
        line.push_str("{\"log\":");
        json_string(&mut line, &String::from_utf8_lossy(bytes));
        line.push_str(",\"stream\":");
        json_string(&mut line, stream);
        line.push_str(",\"time\":\"");
        line.push_str(&rfc3339(SystemTime::now()));
        line.push_str("\"}\n");
        if self.size > 0 && self.size + line.len() as u64 > self.limit {
            let old = self.path.with_extension("json.1");
            std::fs::rename(&self.path, &old)?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.size = 0;
        }
        self.file.write_all(line.as_bytes())?;
        self.size += line.len() as u64;
        Ok(())
    }
}

/// Appends `s` as a JSON string (quotes, backslashes and control characters escaped).
fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A line (with its newline) of rvmm's own about a run: to the run's log in `dir` as a stderr
/// record when `to_log` (a detached run: nobody reads its stderr), else to stderr.
pub fn say(dir: &Path, to_log: bool, line: &str) {
    if to_log {
        if let Ok(mut w) = Writer::open(dir) {
            let _ = w.write("stderr", line.as_bytes());
        }
    } else {
        // Not eprint!: a stderr nobody reads any more is no reason to panic.
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    }
}

/// `t` as RFC 3339 in UTC with nanoseconds, as Docker writes log times.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Copies a workload's stdout and stderr (the read ends of its pipes) into the run's log in `dir`,
/// one record per read, until both are closed (every process holding them is gone), on a thread
/// of its own.
pub fn relay(dir: PathBuf, out: OwnedFd, err: OwnedFd) -> Relay {
    Relay(std::thread::spawn(move || pump(&dir, out, err, None)))
}

/// What [`relay`] does, on the calling thread. With `also`, `poll` watches one more descriptor
/// and calls its function once when it becomes readable (the shim waits for its workload this
/// way, on a pidfd, so that it needs no second thread).
pub fn pump(dir: &Path, out: OwnedFd, err: OwnedFd, mut also: Option<(RawFd, &mut dyn FnMut())>) {
    let mut log = Writer::open(dir).ok();
    let mut open = [Some(out), Some(err)];
    // Not zeroed: a page of it is touched (and stays resident) only once output fills it.
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    while open.iter().any(Option::is_some) || also.is_some() {
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .flatten()
            .map(|fd| fd.as_raw_fd())
            .chain(also.as_ref().map(|a| a.0))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll on an array of pollfds we own, of the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        for p in fds.iter().filter(|p| p.revents != 0) {
            if also.as_ref().is_some_and(|a| a.0 == p.fd) {
                if let Some((_, f)) = also.take() {
                    f();
                }
                continue;
            }
            let i = usize::from(open[1].as_ref().is_some_and(|e| e.as_raw_fd() == p.fd));
            // SAFETY: reading into our buffer's capacity from a descriptor we own.
            let r = unsafe { libc::read(p.fd, buf.as_mut_ptr().cast(), buf.capacity()) };
            if r > 0 {
                // SAFETY: read(2) initialised the first r bytes.
                let got = unsafe { std::slice::from_raw_parts(buf.as_ptr(), r as usize) };
                if let Some(w) = log.as_mut() {
                    let _ = w.write(STREAMS[i], got);
                }
            } else if r == 0
                || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                open[i] = None;
            }
        }
    }
}

const STREAMS: [&str; 2] = ["stdout", "stderr"];

/// A running [`relay`].
pub struct Relay(std::thread::JoinHandle<()>);

impl Relay {
    /// Waits until the workload's output is all in the log.
    pub fn finish(self) {
        let _ = self.0.join();
    }
}
