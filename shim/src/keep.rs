//! `rvmm-shim wait`: the waiting half of a container run, in the process that set it up (rvmm
//! exec'd the shim there once the workload started). It relays signals and published ports,
//! writes the workload's output to the run's log (a detached run), waits for the workload, and
//! execs `rvmm __finish` for the run's epilogue.

use std::ffi::OsString;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::signals::{self, Status};
use crate::{forward, log, Handover};

/// The hidden rvmm subcommand that ends a kept run.
pub const FINISH: &str = "__finish";

/// Keeps the run `h` describes until its workload ends; returns only if rvmm could not be run
/// to end it (with the workload's status).
pub fn keep(h: &Handover) -> u8 {
    signals::forward_to(h.pid, h.stops);
    signals::block_all(false);
    if let Some(target) = h.target {
        // SAFETY: rvmm made these listening sockets inheritable for this process alone.
        let (tcp, udp) = unsafe {
            (
                h.tcp
                    .iter()
                    .map(|&(fd, p)| (TcpListener::from_raw_fd(fd), p))
                    .collect(),
                h.udp
                    .iter()
                    .map(|&(fd, p)| (UdpSocket::from_raw_fd(fd), p))
                    .collect(),
            )
        };
        forward::start(tcp, udp, target);
    }
    if !signals::is_child(h.pid) {
        say(h, &format!("process {} is not this process's child", h.pid));
        return 2;
    }
    let status = match h.log {
        Some((out, err)) => {
            // Nobody reads this process's own stdout and stderr any more (the `rvmm run -d`
            // that started it has returned): what it has to say goes to the log.
            crate::null_stdio();
            // SAFETY: adopting the pipes rvmm made inheritable for this process alone.
            let (out, err) = unsafe { (OwnedFd::from_raw_fd(out), OwnedFd::from_raw_fd(err)) };
            wait_logging(h, out, err)
        }
        None => signals::wait_child(h.pid),
    };
    // Between the workload's end and the run's, a stop signal has nothing to stop.
    signals::stop_forwarding();
    signals::ignore_relayed();
    let status = status.unwrap_or(Status::Exited(125));
    let e = crate::exec(&h.rvmm, &finish_args(h, status));
    say(
        h,
        &format!(
            "cannot run {} to end the run ({e}); `rvmm gc` will clean up after it",
            h.rvmm.display()
        ),
    );
    status.code().clamp(0, 255) as u8
}

/// Waits for the workload while its output goes to the log, until both have ended: on one
/// thread (poll on the pipes and a pidfd) where the kernel has pidfds, else with a relay thread.
fn wait_logging(h: &Handover, out: OwnedFd, err: OwnedFd) -> Option<Status> {
    let Some(pidfd) = signals::pidfd(h.pid) else {
        let relay = log::relay(h.dir.clone(), out, err);
        let status = signals::wait_child(h.pid);
        relay.finish();
        return status;
    };
    let mut status = None;
    let mut reap = || status = signals::wait_child(h.pid);
    log::pump(&h.dir, out, err, Some((pidfd.as_raw_fd(), &mut reap)));
    status
}

/// `rvmm __finish DIR STATUS [--rm] [--memory N] [--log]`.
fn finish_args(h: &Handover, status: Status) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["rvmm".into(), FINISH.into(), h.dir.clone().into()];
    a.push(status_arg(status).into());
    if h.remove {
        a.push("--rm".into());
    }
    if let Some(m) = h.memory {
        a.push(format!("--memory={m}").into());
    }
    if h.log.is_some() {
        a.push("--log".into());
    }
    a
}

/// A workload's end as `__finish` takes it: `exit:N` or `signal:N`.
pub fn status_arg(s: Status) -> String {
    match s {
        Status::Exited(c) => format!("exit:{c}"),
        Status::Signaled(n) => format!("signal:{n}"),
    }
}

/// The inverse of [`status_arg`].
pub fn parse_status(s: &str) -> Option<Status> {
    let (kind, n) = s.split_once(':')?;
    let n = n.parse().ok()?;
    match kind {
        "exit" => Some(Status::Exited(n)),
        "signal" => Some(Status::Signaled(n)),
        _ => None,
    }
}

/// One line of the shim's own, to the log of a detached run, else to stderr.
fn say(h: &Handover, what: &str) {
    log::say(
        &h.dir,
        h.log.is_some(),
        &format!("{}: {what}\n", crate::BINARY),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for s in [Status::Exited(0), Status::Exited(125), Status::Signaled(9)] {
            assert_eq!(parse_status(&status_arg(s)), Some(s));
        }
        for bad in ["", "exit", "exit:x", "stop:1", "1"] {
            assert_eq!(parse_status(bad), None, "{bad}");
        }
    }
}
