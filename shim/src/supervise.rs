//! The supervisor of a detached run whose output rvmm itself cannot keep (a VM run, or any run
//! when the shim is missing): it runs `rvmm run` again, attached, with the same arguments and
//! the run ID chosen by the command the user typed, writes the workload's stdout and stderr to
//! the run's log, and tells that command, over a pipe, when the workload has started or that the
//! run failed (with its status and its one line). A detached container run needs no supervisor
//! process: it becomes `rvmm-shim wait` itself (`keep`).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::log as logs;

/// Set for the attached `rvmm run` a supervisor starts: the run ID to use.
pub const RUN_ID_ENV: &str = "RVMM_RUN_ID";
/// Set for the attached `rvmm run` a supervisor starts: it is the supervised run (so `-d` means
/// nothing more to it).
pub const SUPERVISED_ENV: &str = "RVMM_SUPERVISED";
/// Set for a detached container run that has no supervisor process: it writes its log itself.
pub const LOGS_ITSELF_ENV: &str = "RVMM_LOGS_ITSELF";
/// Names the fd on which the supervised run reports that its workload started.
pub const START_FD_ENV: &str = "RVMM_START_FD";
/// The fd the supervisor reports on (to `rvmm run -d`), and the fd the supervised run reports
/// its start on (to the supervisor).
pub const REPORT_FD: i32 = 3;
/// How much of a failed run's stderr is reported back.
const MAX_REPORT: usize = 64 << 10;

/// The supervisor of the run in directory `dir` (ROOT/runs/ID): runs `RVMM ARGS` attached, logs
/// its output, reports the start or the failure on fd 3, and waits for the run to end.
pub fn supervise(rvmm: &Path, dir: &Path, args: &[OsString]) -> std::io::Result<u8> {
    let id = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| std::io::Error::other(format!("{} names no run", dir.display())))?;
    // SAFETY: fd 3 was set up by `detach` for this process alone.
    let mut report = Some(std::fs::File::from(unsafe {
        OwnedFd::from_raw_fd(REPORT_FD)
    }));
    let (start_r, start_w) = crate::pipe()?;
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
    let mut child = cmd.spawn()?;
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

/// Makes `fd` available as `target` across exec (in a child between fork and exec).
pub fn fd_at(fd: i32, target: i32) -> std::io::Result<()> {
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

/// Has the supervised run said that its workload started?
fn started(mut start: &std::fs::File) -> bool {
    let mut b = [0u8; 1];
    matches!(start.read(&mut b), Ok(1))
}

pub fn set_nonblocking(f: &std::fs::File) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}
