//! Detached runs (`rvmm run -d`). A container run needs no supervisor process: started here in a
//! session of its own, it becomes `rvmm-shim wait` once its workload runs and writes the
//! workload's output to the run's log itself (one small process per detached container, the
//! role conmon plays for podman). A VM run (or any run without `rvmm-shim`) gets a supervisor,
//! `rvmm-shim supervise` (`rvmm __supervise` without the shim; `rvmm_shim::supervise`), which
//! starts `rvmm run` again, attached, logs its output and reports its start. The run itself
//! (state, cleanup, signals, exit status) is the same code as an attached run's, in either
//! isolation; `rvmm stop`, `kill` and `wait` talk to it through its state file and signals.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rvmm_shim::supervise::{fd_at, set_nonblocking, REPORT_FD};
pub use rvmm_shim::supervise::{LOGS_ITSELF_ENV, RUN_ID_ENV, START_FD_ENV, SUPERVISED_ENV};

use crate::error::IoContext;

use super::logs;
use super::state;

/// The hidden subcommand the supervisor runs as when `rvmm-shim` is missing.
pub const SUPERVISE: &str = "__supervise";

/// `rvmm run -d`: starts the supervisor of run `id` with this process's own arguments and waits
/// until the workload has started (prints the ID, status 0) or the run failed (its stderr and
/// status, as an attached run would have given them).
///
/// A container run (`one_process`, no terminal) needs no supervisor process when `rvmm-shim` is
/// there: the run itself, in a session of its own, becomes the shim once its workload runs and
/// writes the workload's output to the log (one small process per detached container, as conmon
/// is for podman).
pub fn detach(root: &Path, id: &str, one_process: bool) -> super::Result<u8> {
    let exe = std::env::current_exe().at(|| "locating rvmm")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if one_process && super::shim::binary_path().is_some() {
        return detach_alone(&exe, id, &args);
    }
    let (r, w) = super::stdio::pipe()?;
    let wfd = w.as_raw_fd();
    // The supervisor lives as long as the run: `rvmm-shim supervise` when it is next to rvmm
    // (a few pages of its own), else `rvmm __supervise`.
    let mut cmd = match super::shim::binary_path() {
        Some(shim) => {
            let mut c = Command::new(shim);
            c.args(rvmm_shim::args("supervise")).arg(&exe);
            c
        }
        None => {
            let mut c = Command::new(&exe);
            c.arg(SUPERVISE);
            c
        }
    };
    cmd.arg(state::run_dir(root, id))
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls: setsid, dup2, fcntl.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            fd_at(wfd, REPORT_FD)
        });
    }
    let mut child = cmd.spawn().at(|| "starting the run's supervisor")?;
    drop(w);
    let mut report = Vec::new();
    let _ = std::fs::File::from(r).read_to_end(&mut report);
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

/// `rvmm run -d` of a container: the run, started here in a session of its own, reports its
/// workload's start on fd 3 (then becomes `rvmm-shim`, which keeps it and its log) or fails with
/// its status and stderr, which are passed on as an attached run would give them.
fn detach_alone(exe: &Path, id: &str, args: &[OsString]) -> super::Result<u8> {
    let (r, w) = super::stdio::pipe()?;
    let wfd = w.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(RUN_ID_ENV, id)
        .env(SUPERVISED_ENV, "1")
        .env(LOGS_ITSELF_ENV, "1")
        .env(START_FD_ENV, REPORT_FD.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe calls: setsid, dup2, fcntl.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            fd_at(wfd, REPORT_FD)
        });
    }
    let mut child = cmd.spawn().at(|| "starting the run")?;
    drop(w);
    let mut stderr = child
        .stderr
        .take()
        .map(|e| std::fs::File::from(OwnedFd::from(e)));
    let mut report = Vec::new();
    let _ = std::fs::File::from(r).read_to_end(&mut report);
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

/// A supervised run keeps its start fd away from the workload and the VMM: close-on-exec, from
/// the run's first moment.
pub fn protect_start_fd() {
    if let Some(fd) = start_fd() {
        // SAFETY: fcntl on a descriptor the supervisor gave us.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

fn start_fd() -> Option<i32> {
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

/// The run's directory as the supervisor sees it (for tests and tools).
pub fn log_path(root: &Path, id: &str) -> PathBuf {
    state::run_dir(root, id).join(logs::LOG_FILE)
}
