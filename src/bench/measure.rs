//! Running one contender once and reading what it costs the host.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::Error;

/// What one timed run produced.
#[derive(Debug, Clone)]
pub struct Timed {
    /// Launch → first byte on stdout (None if it printed nothing).
    pub first_byte: Option<Duration>,
    /// Launch → exit.
    pub exit: Duration,
    /// Exit code, or 128+signal.
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Spawns `cmd` in its own process group so that a timeout can kill everything it started.
pub fn spawn_group(cmd: &mut Command) -> Result<Child, Error> {
    cmd.process_group(0);
    cmd.spawn().map_err(|source| Error::Spawn {
        program: program_name(cmd),
        source,
    })
}

fn program_name(cmd: &Command) -> String {
    cmd.get_program().to_string_lossy().into_owned()
}

/// Kills the process group led by `pid` (SIGKILL).
pub fn kill_group(pid: u32) {
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
    unsafe {
        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
    }
}

/// Runs `cmd` to completion with stdin closed, timing the first stdout byte (or, with `marker`, the first
/// time stdout contains it) and the exit. On timeout the whole process group is killed and
/// `Error::Timeout` returned.
pub fn run_timed(
    cmd: &mut Command,
    timeout: Duration,
    marker: Option<&[u8]>,
) -> Result<Timed, Error> {
    let marker: Option<Vec<u8>> = marker.map(<[u8]>::to_vec);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = spawn_group(cmd)?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<(bool, Option<Instant>, Vec<u8>)>();
    let mut readers = Vec::new();
    for (is_out, pipe) in [
        (
            true,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        (
            false,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ] {
        let Some(mut pipe) = pipe else { continue };
        let tx = tx.clone();
        let marker = marker.clone().filter(|_| is_out);
        readers.push(std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut first = None;
            let mut chunk = [0u8; 4096];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let from = buf
                            .len()
                            .saturating_sub(marker.as_ref().map_or(0, Vec::len));
                        buf.extend_from_slice(&chunk[..n]);
                        let seen = match &marker {
                            None => true,
                            Some(m) => contains(&buf[from..], m),
                        };
                        if seen && first.is_none() {
                            first = Some(Instant::now());
                        }
                    }
                }
            }
            let _ = tx.send((is_out, first, buf));
        }));
    }
    drop(tx);
    let deadline = start + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(source) => {
                kill_group(pid);
                let _ = child.wait();
                return Err(Error::Wait(source));
            }
        }
        if Instant::now() >= deadline {
            kill_group(pid);
            let _ = child.wait();
            return Err(Error::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let exit = start.elapsed();
    // Anything the group left behind holding the pipes open must not hang us.
    kill_group(pid);
    let mut out = Timed {
        first_byte: None,
        exit,
        code: status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    for (is_out, first, buf) in rx.iter() {
        if is_out {
            // The reader thread stamps a byte when it gets to run, which on a busy host can be after the
            // exit was seen; the byte existed before the exit, so the exit bounds it.
            out.first_byte = first.map(|t| t.duration_since(start).min(exit));
            out.stdout = buf;
        } else {
            out.stderr = buf;
        }
    }
    for r in readers {
        let _ = r.join();
    }
    Ok(out)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// `Pss:` of a process in KiB, from /proc/PID/smaps_rollup.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    field_kib(&text, "Pss:")
}

/// `Rss:` and the private (unshared) pages, `Private_Clean:` + `Private_Dirty:`, of a process in
/// KiB, from /proc/PID/smaps_rollup.
pub fn rss_uss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let uss = field_kib(&text, "Private_Clean:")? + field_kib(&text, "Private_Dirty:")?;
    Some((field_kib(&text, "Rss:")?, uss))
}

fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The resident size (KiB) of the guest RAM mapping(s) of a VMM process: anonymous or file mappings whose
/// size is at least `min_size_kib` (the guest RAM is by far the largest mapping a VMM has).
pub fn guest_ram_rss_kib(pid: u32, min_size_kib: u64) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(guest_ram_rss_from_smaps(&text, min_size_kib))
}

fn guest_ram_rss_from_smaps(text: &str, min_size_kib: u64) -> u64 {
    big_mapping_field(text, min_size_kib, "Rss:")
}

/// Private_Dirty (KiB) of the guest RAM mapping(s) of a VMM process (as in
/// [`guest_ram_rss_kib`]): the guest pages written since a restore copied them from the snapshot.
pub fn guest_ram_private_dirty_kib(pid: u32, min_size_kib: u64) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(big_mapping_field(&text, min_size_kib, "Private_Dirty:"))
}

fn big_mapping_field(text: &str, min_size_kib: u64, key: &str) -> u64 {
    let mut total = 0;
    let mut in_big = false;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            in_big = v
                .split_whitespace()
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|s| s >= min_size_kib);
        } else if in_big && line.starts_with(key) {
            total += field_kib(line, key).unwrap_or(0);
        }
    }
    total
}

/// `pid` and all its descendants, found through /proc/*/stat parent links.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(pp) = parent_of(p) {
                parents.push((p, pp));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let cur = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    tree
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Memory charged to the cgroup(s) of `pid`, in KiB: cgroup v2 `memory.current`, else v1
/// `memory.usage_in_bytes`. None when the process has no memory cgroup of its own.
pub fn cgroup_memory_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if path == "/" {
            continue;
        }
        let file = if controllers.split(',').any(|c| c == "memory") {
            Path::new("/sys/fs/cgroup/memory")
                .join(path.trim_start_matches('/'))
                .join("memory.usage_in_bytes")
        } else if controllers.is_empty() {
            let base = if Path::new("/sys/fs/cgroup/unified").is_dir() {
                "/sys/fs/cgroup/unified"
            } else {
                "/sys/fs/cgroup"
            };
            Path::new(base)
                .join(path.trim_start_matches('/'))
                .join("memory.current")
        } else {
            continue;
        };
        if let Some(v) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            return Some(v / 1024);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_a_real_command() {
        let t = run_timed(
            Command::new("sh").args(["-c", "echo hi; echo err >&2; exit 3"]),
            Duration::from_secs(20),
            None,
        )
        .expect("sh runs");
        assert_eq!(t.code, 3);
        assert_eq!(t.stdout, b"hi\n");
        assert_eq!(t.stderr, b"err\n");
        let fb = t.first_byte.expect("printed something");
        assert!(fb <= t.exit);
    }

    #[test]
    fn marker_time_is_when_the_marker_appears() {
        let t = run_timed(
            Command::new("sh").args(["-c", "echo boot; sleep 0.2; echo READY; sleep 0.1"]),
            Duration::from_secs(20),
            Some(b"READY"),
        )
        .expect("sh runs");
        let m = t.first_byte.expect("marker seen");
        assert!(m >= Duration::from_millis(200), "marker at {m:?}");
        assert!(m <= t.exit);
        let none = run_timed(
            Command::new("sh").args(["-c", "echo boot"]),
            Duration::from_secs(20),
            Some(b"READY"),
        )
        .expect("sh runs");
        assert_eq!(none.first_byte, None);
    }

    #[test]
    fn timeout_kills_the_group() {
        let err = run_timed(
            Command::new("sh").args(["-c", "sleep 30 & sleep 30"]),
            Duration::from_millis(300),
            None,
        )
        .expect_err("must time out");
        assert!(matches!(err, Error::Timeout(_)), "{err}");
    }

    #[test]
    fn own_memory_is_visible() {
        let me = std::process::id();
        assert!(pss_kib(me).is_some_and(|k| k > 0));
        let (rss, uss) = rss_uss_kib(me).expect("smaps_rollup");
        assert!(uss > 0 && uss <= rss, "{uss} {rss}");
        assert!(process_tree(me).contains(&me));
    }

    #[test]
    fn guest_ram_is_the_big_mapping() {
        let smaps = "7f00-7f10 rw-p 0 0 0\nSize: 131072 kB\nRss: 2048 kB\nPss: 2048 kB\n\
                     5500-5600 r-xp 0 0 0 /usr/bin/x\nSize: 1024 kB\nRss: 900 kB\n";
        assert_eq!(guest_ram_rss_from_smaps(smaps, 131072), 2048);
        assert_eq!(guest_ram_rss_from_smaps(smaps, 262144), 0);
    }
}
