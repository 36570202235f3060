//! Detached runs (`rvmm run -d`). A run without a terminal needs no supervisor process: started
//! here in a session of its own, it writes the workload's output to the run's log itself
//! ([`OwnLog`]; a container run becomes `rvmm-shim wait` once its workload runs: one small
//! process per detached container, the role conmon plays for podman). A terminal run (`-dt`)
//! gets a supervisor, `rvmm __supervise`, which starts `rvmm run` again, attached, logs its
//! output and reports its start. The run itself (state, cleanup, signals, exit status) is the same code as an attached
//! run's, in either isolation; `rvmm stop`, `kill` and `wait` talk to it through its state file
//! and signals.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::sync::mpsc;
use std::time::Duration;

use crate::error::IoContext;

use super::logs;
use super::state;

/// Set for the attached `rvmm run` a supervisor starts: the run ID to use.
pub const RUN_ID_ENV: &str = "RVMM_RUN_ID";
/// Set for the attached `rvmm run` a supervisor starts: it is the supervised run (so `-d` means
/// nothing more to it).
pub const SUPERVISED_ENV: &str = "RVMM_SUPERVISED";
/// Set for a detached run that has no supervisor process: it writes its log itself.
pub const LOGS_ITSELF_ENV: &str = "RVMM_LOGS_ITSELF";
/// Names the fd on which the supervised run reports that its workload started.
pub const START_FD_ENV: &str = "RVMM_START_FD";
/// The fd the supervisor reports on (to `rvmm run -d`), and the fd the supervised run reports
/// its start on (to the supervisor).
const REPORT_FD: i32 = 3;

/// The hidden subcommand the supervisor runs as.
pub const SUPERVISE: &str = "__supervise";
/// How much of a failed run's stderr is reported back.
const MAX_REPORT: usize = 64 << 10;

/// `rvmm run -d`: starts the supervisor of run `id` with this process's own arguments and waits
/// until the workload has started (prints the ID, status 0) or the run failed (its stderr and
/// status, as an attached run would have given them).
///
/// A run without a terminal (`alone`) needs no supervisor process: the run itself, in a session
/// of its own, writes the workload's output to its log (a container run as `rvmm-shim` once its
/// workload runs: one small process per detached container, as conmon is for podman). A terminal
/// run gets a supervisor that reads the terminal.
pub fn detach(root: &Path, id: &str, alone: bool) -> super::Result<u8> {
    let exe = std::env::current_exe().at(|| "locating rvmm")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if alone {
        return detach_alone(&exe, id, &args);
    }
    // The supervisor is rvmm itself: it maps the same pages as the run it keeps (a VM run's
    // `rvmm run` stays), so it costs little beyond its own heap and stack.
    let mut cmd = Command::new(&exe);
    cmd.arg(SUPERVISE)
        .arg(state::run_dir(root, id))
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let (mut child, report) = spawn_reporting(cmd, "starting the run's supervisor")?;
    // The supervisor goes on alone; reap it if it is already gone.
    let _ = child.try_wait();
    match report.split_first() {
        Some((b'S', _)) => {
            println!("{id}");
            Ok(0)
        }
        Some((b'E', rest)) => {
            let (code, msg) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            let _ = std::io::stderr().write_all(msg);
            Ok(std::str::from_utf8(code)
                .ok()
                .and_then(|c| c.parse::<u8>().ok())
                .unwrap_or(125))
        }
        _ => Err(super::Error::SupervisorGone),
    }
}

/// `rvmm run -d` without a terminal: the run, started here in a session of its own, reports its
/// workload's start on fd 3 (and goes on alone, writing its log) or fails with its status and
/// stderr, which are passed on as an attached run would give them.
fn detach_alone(exe: &Path, id: &str, args: &[OsString]) -> super::Result<u8> {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(RUN_ID_ENV, id)
        .env(SUPERVISED_ENV, "1")
        .env(LOGS_ITSELF_ENV, "1")
        .env(START_FD_ENV, REPORT_FD.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let (mut child, report) = spawn_reporting(cmd, "starting the run")?;
    let mut stderr = child
        .stderr
        .take()
        .map(|e| std::fs::File::from(OwnedFd::from(e)));
    if report.first() == Some(&b'S') {
        // Started: what it said so far (warnings) is passed on; it goes on alone.
        if let Some(e) = stderr.as_mut() {
            set_nonblocking(e);
            let mut said = Vec::new();
            let _ = e.read_to_end(&mut said);
            let _ = std::io::stderr().write_all(&said);
        }
        let _ = child.try_wait();
        println!("{id}");
        return Ok(0);
    }
    let mut said = Vec::new();
    if let Some(mut e) = stderr {
        let _ = e.read_to_end(&mut said);
    }
    let status = child.wait().at(|| "waiting for the run")?;
    let _ = std::io::stderr().write_all(&said);
    match status.code() {
        Some(c) => Ok(c.clamp(0, 255) as u8),
        None => Err(super::Error::SupervisorGone),
    }
}

/// Starts `cmd` in a session of its own with the write end of a new pipe as its fd 3, and reads
/// that pipe to its end: the child, and what it reported there (its start, or nothing).
fn spawn_reporting(
    mut cmd: Command,
    what: &'static str,
) -> super::Result<(std::process::Child, Vec<u8>)> {
    let (r, w) = super::stdio::pipe()?;
    let wfd = w.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls: setsid, dup2, fcntl.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            fd_at(wfd, REPORT_FD)
        });
    }
    let child = cmd.spawn().at(|| what)?;
    drop(w);
    let mut report = Vec::new();
    let _ = std::fs::File::from(r).read_to_end(&mut report);
    Ok((child, report))
}

/// The supervisor (`rvmm __supervise DIR -- ARGS`) of the run in directory `dir` (ROOT/runs/ID):
/// runs `RVMM ARGS` attached, logs its output, reports the start or the failure on fd 3, and
/// waits for the run to end.
pub fn supervise(rvmm: &Path, dir: &Path, args: &[OsString]) -> super::Result<u8> {
    let id = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    // SAFETY: fd 3 was set up by `detach` for this process alone.
    let mut report = Some(std::fs::File::from(unsafe {
        OwnedFd::from_raw_fd(REPORT_FD)
    }));
    let (start_r, start_w) = super::stdio::pipe()?;
    let swfd = start_w.as_raw_fd();
    let mut cmd = Command::new(rvmm);
    cmd.args(args)
        .env(RUN_ID_ENV, id)
        .env(SUPERVISED_ENV, "1")
        .env(START_FD_ENV, REPORT_FD.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The run dies with its supervisor (as an attached run's workload dies with its rvmm): a
    // supervisor killed with SIGKILL leaves no run behind that nobody logs or waits for, and
    // `rvmm gc` then frees what it held.
    let supervisor = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec only prctl, getppid, dup2 and fcntl, which are
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != supervisor {
                // The supervisor died before the line above took effect.
                libc::_exit(137);
            }
            fd_at(swfd, REPORT_FD)
        });
    }
    let mut child = cmd.spawn().at(|| "starting the run")?;
    drop(start_w);
    // The run writes one byte there when its workload starts (and closes it when it exits).
    let start_r = std::fs::File::from(start_r);
    set_nonblocking(&start_r);
    let (tx, rx) = mpsc::channel::<(&'static str, Vec<u8>)>();
    let mut readers = Vec::new();
    for (name, pipe) in [
        (
            "stdout",
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
        (
            "stderr",
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ),
    ] {
        let Some(mut pipe) = pipe else { continue };
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send((name, buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }
    drop(tx);
    let mut log: Option<logs::Writer> = None;
    // Output that came before the run directory existed, and the stderr a failure reports.
    let mut early: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let mut early_bytes = 0usize;
    let mut stderr_head = Vec::new();
    let mut status: Option<i32> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((stream, bytes)) => {
                if stream == "stderr" && stderr_head.len() < MAX_REPORT {
                    let room = MAX_REPORT - stderr_head.len();
                    stderr_head.extend_from_slice(&bytes[..bytes.len().min(room)]);
                }
                if log.is_none() && dir.is_dir() {
                    log = logs::Writer::open(dir).ok();
                    if let Some(w) = log.as_mut() {
                        for (s, b) in early.drain(..) {
                            let _ = w.write(s, &b);
                        }
                    }
                }
                match log.as_mut() {
                    Some(w) => {
                        let _ = w.write(stream, &bytes);
                    }
                    None if early_bytes < MAX_REPORT * 16 => {
                        early_bytes += bytes.len();
                        early.push((stream, bytes));
                    }
                    None => {}
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if status.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if report.is_some() && started(&start_r) {
            if let Some(mut r) = report.take() {
                let _ = r.write_all(b"S\n");
            }
        }
        if status.is_none() {
            if let Ok(Some(st)) = child.try_wait() {
                status = Some(st.code().unwrap_or(125));
            }
        }
    }
    // The run has ended and its output is all read.
    if let Some(mut r) = report.take() {
        if started(&start_r) {
            let _ = r.write_all(b"S\n");
        } else {
            // Ended before it started: what an attached run would have said, and its status.
            let mut msg = format!("E{}\n", status.unwrap_or(125)).into_bytes();
            msg.extend_from_slice(&stderr_head);
            let _ = r.write_all(&msg);
        }
    }
    for r in readers {
        let _ = r.join();
    }
    Ok(status.unwrap_or(125).clamp(0, 255) as u8)
}

/// Has the supervised run said that its workload started?
fn started(mut start: &std::fs::File) -> bool {
    let mut b = [0u8; 1];
    matches!(start.read(&mut b), Ok(1))
}

/// A supervised run keeps its start fd away from the workload and the VMM: close-on-exec, from
/// the run's first moment.
pub fn protect_start_fd() {
    if let Some(fd) = start_fd() {
        // SAFETY: fcntl on a descriptor the supervisor gave us.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// The fd on which a supervised run reports its start, if it is one.
pub fn start_fd() -> Option<i32> {
    std::env::var(START_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|&fd| fd > 2)
}

/// Called by a supervised run when its workload has started: one byte to the supervisor, once.
pub fn report_started() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Some(fd) = start_fd() else {
            return;
        };
        // SAFETY: the supervisor gave us this fd for exactly this; we own it from here on.
        let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let _ = f.write_all(b"S");
    });
}

/// The log of a detached run that has no supervisor process (`run -d` without a terminal): pipes
/// whose read ends a thread of this process copies into the run's log. The workload's output is
/// written to the write ends from the start; once the workload runs, this process's own stdout
/// and stderr go there too ([`OwnLog::take_over_stdio`]), so rvmm's last line about the run is
/// in the log, as a supervisor would have put it there.
pub struct OwnLog {
    out: OwnedFd,
    err: OwnedFd,
}

/// The relay of this process's [`OwnLog`], joined by [`close_own_log`].
static OWN_LOG: std::sync::Mutex<Option<rvmm_shim::log::Relay>> = std::sync::Mutex::new(None);

impl OwnLog {
    pub fn open(dir: &Path) -> super::Result<OwnLog> {
        let (out_r, out) = super::stdio::pipe()?;
        let (err_r, err) = super::stdio::pipe()?;
        let relay = logs::relay(dir.to_path_buf(), out_r, err_r);
        *OWN_LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(relay);
        Ok(OwnLog { out, err })
    }

    /// The write ends: (stdout, stderr).
    pub fn fds(&self) -> (std::os::fd::RawFd, std::os::fd::RawFd) {
        (self.out.as_raw_fd(), self.err.as_raw_fd())
    }

    /// From now on this process's stdout and stderr go to the log (the `rvmm run -d` that
    /// started it has returned).
    pub fn take_over_stdio(&self) {
        // SAFETY: dup2 of descriptors we own onto this process's stdout and stderr.
        unsafe {
            libc::dup2(self.out.as_raw_fd(), 1);
            libc::dup2(self.err.as_raw_fd(), 2);
        }
    }
}

/// At the end of a process that wrote its own log: closes its stdout and stderr (the last write
/// ends) and waits until everything is in the log. Nothing to do in other processes.
pub fn close_own_log() {
    let relay = OWN_LOG.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(relay) = relay {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        rvmm_shim::null_stdio();
        relay.finish();
    }
}

/// The run's directory as the supervisor sees it (for tests and tools).
pub fn log_path(root: &Path, id: &str) -> PathBuf {
    state::run_dir(root, id).join(logs::LOG_FILE)
}

/// Makes `fd` available as `target` across exec (in a child between fork and exec).
fn fd_at(fd: i32, target: i32) -> std::io::Result<()> {
    // SAFETY: dup2/fcntl on descriptors of this (forked) process.
    let r = unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(f: &std::fs::File) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}
