//! Relaying signals to a run's workload: what an attached `rvmm run` does, and what `rvmm stop`
//! and `rvmm kill` rely on (they signal the process that keeps the run).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// The signals a run passes on to its workload (Ctrl-C, `rvmm stop`, `rvmm kill -s ...`).
pub const RELAYED: &[libc::c_int] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

static CHILD: AtomicI32 = AtomicI32::new(0);
static STOPS: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        if sig == libc::SIGINT || sig == libc::SIGTERM {
            // A second Ctrl-C / TERM kills: PID 1 ignores signals it has no handler for.
            if STOPS.fetch_add(1, Ordering::SeqCst) >= 1 {
                // SAFETY: kill is async-signal-safe.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return;
            }
        }
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// From now on the relayed signals and SIGWINCH go to `pid`; `stops` stop signals were already
/// passed on (the next SIGINT/SIGTERM after one kills).
pub fn forward_to(pid: i32, stops: i32) {
    STOPS.store(stops, Ordering::SeqCst);
    CHILD.store(pid, Ordering::SeqCst);
    install_handler(forward, RELAYED);
    install_handler(forward, &[libc::SIGWINCH]);
}

/// Signals are no longer passed on (the workload is gone).
pub fn stop_forwarding() {
    CHILD.store(0, Ordering::SeqCst);
}

/// The relayed signals are ignored from now on, in this process and in what it execs.
pub fn ignore_relayed() {
    for &sig in RELAYED.iter().chain(&[libc::SIGWINCH]) {
        // SAFETY: setting a signal's disposition to SIG_IGN.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
}

/// How many stop signals were passed on so far.
pub fn stops() -> i32 {
    STOPS.load(Ordering::SeqCst)
}

/// Installs `handler` for `sigs`. The handler must only use async-signal-safe calls.
pub fn install_handler(handler: extern "C" fn(libc::c_int), sigs: &[libc::c_int]) {
    for &sig in sigs {
        // SAFETY: installing a handler that only calls async-signal-safe functions (the caller's
        // contract).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Blocks every signal (before an exec that must lose none: the mask and pending signals survive
/// it), or unblocks every signal (once the handlers are in place).
pub fn block_all(block: bool) {
    // SAFETY: changing this thread's signal mask with a set we fill.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        if block {
            libc::sigfillset(&mut set);
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        } else {
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        }
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
}

impl Status {
    /// Docker's numbering: the exit code, or 128 + the signal.
    pub fn code(self) -> i32 {
        match self {
            Status::Exited(c) => c,
            Status::Signaled(s) => 128 + s,
        }
    }
}

/// Is `pid` a child of this process (running or not yet reaped)?
pub fn is_child(pid: i32) -> bool {
    // SAFETY: waitid with WNOWAIT|WNOHANG only looks; the siginfo is ours.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        ) == 0
    }
}

/// A pidfd of `pid` (readable once it has ended), where the kernel has pidfds.
pub fn pidfd(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) with a pid and no flags; the result is a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    // SAFETY: pidfd_open returned a descriptor nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits at most `limit` for child `pid` to end (None: still running, or no pidfd to wait on).
/// Signals that interrupt the wait are handled and the wait goes on.
pub fn wait_child_for(pid: i32, limit: std::time::Duration) -> Option<Status> {
    let fd = pidfd(pid)?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis() as libc::c_int) };
        match n {
            1 => return wait_child(pid),
            0 => return None,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return None,
        }
    }
}

/// Waits for child `pid` to end; None if it is not a child of this process.
pub fn wait_child(pid: i32) -> Option<Status> {
    loop {
        let mut st = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == pid {
            if libc::WIFEXITED(st) {
                return Some(Status::Exited(libc::WEXITSTATUS(st)));
            }
            if libc::WIFSIGNALED(st) {
                return Some(Status::Signaled(libc::WTERMSIG(st)));
            }
            continue;
        }
        if r < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ECHILD) => return None,
                _ => return Some(Status::Exited(125)),
            }
        }
    }
}
